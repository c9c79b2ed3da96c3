"""Hub-layout components: safetensors in PyTorch's layout become Flax parameters without torch."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file
from tiny_hub import TINY_CLIP

from jaxclean.diffusion import adapter, hub


def _tiny_components():
    unet = adapter.make_unet((32, 64), 1, 8, 4, 8, 16)
    vae = adapter.make_vae((32, 64), 1, 4, 3, 16)
    clip = adapter.make_clip_image_encoder(TINY_CLIP)
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "unet": (adapter.init_unet(unet, keys[0], (8, 8, 4), 1), "diffusers"),
        "vae": (adapter.init_vae(vae, keys[1], (16, 16, 3)), "diffusers"),
        "image_encoder": (adapter.init_clip_image_encoder(clip, keys[2]), "transformers"),
    }


def _write(root, component, tensors, filename="model.safetensors", config=None):
    os.makedirs(os.path.join(root, component), exist_ok=True)
    save_file(tensors, os.path.join(root, component, filename))
    with open(os.path.join(root, component, "config.json"), "w") as f:
        json.dump(config or {}, f)


@pytest.fixture(scope="module")
def components():
    return _tiny_components()


@pytest.mark.slow
@pytest.mark.parametrize("component", ["unet", "vae", "image_encoder"])
def test_safetensors_in_pytorch_layout_load_as_the_same_flax_params(
    components, tmp_path, component
):
    params, naming = components[component]
    tensors = hub.flax_to_pytorch(params, naming)
    # PyTorch names: dotted module lists, `weight` for kernels, scales and embeddings.
    assert all(not k.endswith((".kernel", ".scale", ".embedding")) for k in tensors)
    if naming == "diffusers":
        assert not any("blocks_0" in k or "resnets_0" in k for k in tensors)
    _write(str(tmp_path), component, tensors)
    loaded = hub.pytorch_to_flax(hub.read_weights(str(tmp_path), component), params, component)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))


def test_conv_and_linear_weights_are_transposed_as_pytorch_stores_them(components):
    params, _ = components["unet"]
    tensors = hub.flax_to_pytorch(params, "diffusers")
    kernel = np.asarray(params["conv_in"]["kernel"])  # [kh, kw, in, out]
    assert tensors["conv_in.weight"].shape == (kernel.shape[3], kernel.shape[2], 3, 3)
    dense = np.asarray(params["time_embedding"]["linear_1"]["kernel"])  # [in, out]
    np.testing.assert_array_equal(tensors["time_embedding.linear_1.weight"], dense.T)


def test_bad_checkpoints_are_named(components, tmp_path):
    root = str(tmp_path)
    with pytest.raises(hub.HubError, match="no 'unet' component"):
        hub.read_weights(root, "unet")
    os.makedirs(os.path.join(root, "vae"))
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(hub.HubError, match="pickled .bin"):
        hub.read_weights(root, "vae")
    params, naming = components["unet"]
    tensors = hub.flax_to_pytorch(params, naming)
    del tensors["conv_in.bias"]
    tensors["extra.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(hub.HubError, match=r"1 parameters missing.*conv_in/bias.*extra.weight"):
        hub.pytorch_to_flax(tensors, params, "unet")


def test_a_hub_id_needs_downloads_allowed():
    with pytest.raises(hub.HubError, match="downloading is off"):
        hub.resolve("lambdalabs/sd-image-variations-diffusers", ["unet"], allow_download=False)

"""The Flax components against diffusers' and transformers' PyTorch ones, on the same weights.

Needs torch (the `bench` extra); skipped without it. The weights go Flax -> PyTorch layout ->
PyTorch modules, so a key or transpose the converter gets wrong fails here.
"""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_hub import _tiny_components  # noqa: E402
from tiny_hub import TINY_CLIP  # noqa: E402

from jaxclean.diffusion import adapter, hub  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402


@pytest.fixture(scope="module")
def components():
    return _tiny_components()


def _load(module, params, naming):
    state = {k: torch.from_numpy(v.copy()) for k, v in hub.flax_to_pytorch(params, naming).items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("position_ids")]
    return module.eval()


@pytest.mark.slow
def test_unet_matches_diffusers_pytorch(components):
    params, naming = components["unet"]
    pt = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=16,
    )
    pt = _load(pt, params, naming)
    unet = adapter.make_unet((32, 64), 1, 8, 4, 8, 16)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 1, 16)).astype(np.float32)
    timesteps = np.array([10, 500], np.int32)
    ours = adapter.predict_noise(unet, params, latents, jnp.asarray(timesteps), context)
    with torch.inference_mode():
        theirs = pt(
            torch.from_numpy(latents.transpose(0, 3, 1, 2)),
            torch.from_numpy(timesteps),
            torch.from_numpy(context),
        ).sample.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs.transpose(0, 2, 3, 1), atol=1e-3, rtol=1e-3)


def test_vae_matches_diffusers_pytorch(components):
    params, naming = components["vae"]
    pt = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=16,
    )
    pt = _load(pt, params, naming)
    vae = adapter.make_vae((32, 64), 1, 4, 3, 16)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    mean, _ = adapter.encode(vae, params, images)
    decoded = adapter.decode(vae, params, mean)
    with torch.inference_mode():
        posterior = pt.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
        theirs_decoded = pt.decode(posterior.mean).sample.numpy()
    np.testing.assert_allclose(
        np.asarray(mean), posterior.mean.numpy().transpose(0, 2, 3, 1), atol=2e-4
    )
    np.testing.assert_allclose(np.asarray(decoded), theirs_decoded.transpose(0, 2, 3, 1), atol=2e-4)


def test_clip_image_encoder_matches_transformers_with_projection(components):
    params, naming = components["image_encoder"]
    pt = _load(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)), params, naming)
    encoder = adapter.make_clip_image_encoder(TINY_CLIP)
    pixels = np.random.default_rng(2).standard_normal((2, 30, 30, 3)).astype(np.float32)
    ours = encoder.apply({"params": params}, jnp.asarray(pixels))
    with torch.inference_mode():
        theirs = pt(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).image_embeds
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=2e-5)

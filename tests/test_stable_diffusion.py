"""Stable Diffusion generators: tiny random weights in the hub's layout, through the regenerate
stage (sd_image_variations, the method; sd_img2img, the SDEdit baseline)."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_variations import read_all, run_worker
from tiny_hub import TINY_RESOLUTION, write_tiny_sd_image_variations, write_tiny_sd_img2img

from configs import common, smoke
from jaxclean import pipeline, sharding
from jaxclean.diffusion import sampler
from jaxclean.diffusion import stable_diffusion as sd


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_sd_image_variations(str(tmp_path_factory.mktemp("hub") / "tiny-sd"))


@pytest.fixture(scope="module")
def tiny_img2img(tmp_path_factory):
    return write_tiny_sd_img2img(str(tmp_path_factory.mktemp("hub") / "tiny-sd-img2img"))


def _config(idx_dir, model_dir, generator="sd_image_variations"):
    config = smoke.get_config()
    config.data.dir = idx_dir
    make = {
        "sd_image_variations": common.sd_image_variations_config,
        "sd_img2img": common.sd_img2img_config,
    }[generator]
    config.generator = make(model=model_dir, download=False, resolution=TINY_RESOLUTION)
    if generator == "sd_img2img":
        config.regenerate.strength = 0.5
    return config


def test_loads_every_component_with_the_scheduler_of_the_model(tiny_model):
    model, params = sd.load_sd_image_variations(tiny_model, (28, 28, 1), TINY_RESOLUTION)
    assert set(params) == {"unet", "vae", "image_encoder"}
    assert model.latent_shape == (8, 8, 4)
    # set_alpha_to_one=False and steps_offset=1, as SD's DDIM config says.
    assert model.steps_offset == 1
    assert model.final_alpha_cumprod == pytest.approx(model.alphas_cumprod[0])


@pytest.mark.slow
def test_condition_corruption_reaches_sd_only_through_the_clip_condition(tiny_model, tiny_img2img):
    """With the option on, SD image variations are those of the corrupted copies of the
    sources (colour transfer off, so the sources enter nowhere else); img2img conditions on the
    class prompt alone, so the option cannot reach it."""
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    labels = np.arange(4, dtype=np.int32)
    indices = np.arange(4, dtype=np.int32)
    mesh = sharding.make_mesh()
    rng = jax.random.key(7)

    def vary(model, params, sources, condition_corruption, strength=1.0):
        settings = sampler.SamplerSettings(
            steps=2,
            guidance=2.0,
            strength=strength,
            color_transfer=False,
            condition_corruption=condition_corruption,
        )
        sample = sampler.make_sampler(model, settings, mesh)
        return np.asarray(sample(params, sources, indices, labels, rng))

    model, params = sd.load_sd_image_variations(tiny_model, (28, 28, 1), TINY_RESOLUTION)
    copies = np.asarray(
        sampler.corrupt_sources(images, sampler.sample_keys(rng, jnp.asarray(indices)), 1.0)
    )
    corrupted = vary(model, params, images, 1.0)
    np.testing.assert_array_equal(corrupted, vary(model, params, copies, 0.0))
    assert np.abs(corrupted.astype(int) - vary(model, params, images, 0.0)).max() > 0

    model, params = sd.load_sd_img2img(
        tiny_img2img, (28, 28, 1), TINY_RESOLUTION, [str(c) for c in range(10)], "a photo of {}"
    )
    np.testing.assert_array_equal(
        vary(model, params, images, 1.0, strength=0.5), vary(model, params, images, 0.0, 0.5)
    )


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["sd_image_variations", "sd_img2img"])
def test_regenerate_stage_runs_on_a_hub_layout_model(
    generator, idx_dir, tiny_model, tiny_img2img, tmp_path
):
    model_dir = tiny_img2img if generator == "sd_img2img" else tiny_model
    workdir = str(tmp_path / "run")
    pipeline.run(_config(idx_dir, model_dir, generator), workdir, "poison,generator,regenerate")
    shards = os.path.join(workdir, "regenerated", "variations", "shards")
    first = np.load(os.path.join(shards, sorted(os.listdir(shards))[0]))
    assert first["images"].dtype == np.uint8 and first["images"].shape[1:] == (28, 28, 1)
    assert os.path.exists(os.path.join(workdir, "generator", "samples.png"))


def test_missing_component_and_download_off_are_named(idx_dir, tiny_model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(pipeline.ConfigError, match="no 'unet' component"):
        pipeline.run(_config(idx_dir, str(broken)), str(tmp_path / "a"), "generator")
    with pytest.raises(pipeline.ConfigError, match="downloading is off"):
        pipeline.run(_config(idx_dir, "someone/missing-model"), str(tmp_path / "b"), "generator")


def test_img2img_prompts_come_from_the_class_names(tiny_img2img):
    names = ("cat", "dog", "cat")
    model, params = sd.load_sd_img2img(tiny_img2img, (28, 28, 1), TINY_RESOLUTION, names, "a {}")
    assert model.class_tokens[0] == model.class_tokens[2] != model.class_tokens[1]
    images = np.zeros((3, 28, 28, 1), np.uint8)
    context, null = model.conditions(params, images, np.array([0, 1, 2]))
    np.testing.assert_allclose(context[0], context[2])
    assert np.abs(np.asarray(context[0] - context[1])).max() > 1e-3
    np.testing.assert_array_equal(null[0], null[1])  # The empty prompt, whatever the label.
    with pytest.raises(sd.hub.HubError, match="no {} for the class name"):
        sd.load_sd_img2img(tiny_img2img, (28, 28, 1), TINY_RESOLUTION, names, "a photo")


def test_img2img_without_tokenizer_or_placeholder_is_named(idx_dir, tiny_img2img, tmp_path):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_img2img, broken)
    shutil.rmtree(broken / "tokenizer")
    config = _config(idx_dir, str(broken), "sd_img2img")
    with pytest.raises(pipeline.ConfigError, match="no 'tokenizer' component"):
        pipeline.run(config, str(tmp_path / "a"), "generator")
    config = _config(idx_dir, tiny_img2img, "sd_img2img")
    config.generator.prompt = "a photo"
    with pytest.raises(pipeline.ConfigError, match="needs a {} for the class name"):
        pipeline.run(config, str(tmp_path / "b"), "generator")


@pytest.mark.slow
def test_bfloat16_unet_stores_bf16_weights_and_stays_close(tiny_model):
    full, params = sd.load_sd_image_variations(tiny_model, (28, 28, 1), TINY_RESOLUTION)
    half, half_params = sd.load_sd_image_variations(
        tiny_model, (28, 28, 1), TINY_RESOLUTION, dtype="bfloat16"
    )
    assert {x.dtype for x in jax.tree.leaves(half_params["unet"])} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(half_params["vae"])} == {np.dtype("float32")}
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, *full.latent_shape)).astype(np.float32)
    context = rng.standard_normal((2, 1, 16)).astype(np.float32)
    t = jax.numpy.array([10, 900], jax.numpy.int32)
    exact = np.asarray(full.predict_noise(params, latents, t, context))
    approx = np.asarray(half.predict_noise(half_params, latents, t, context))
    assert approx.dtype == np.float32  # DDIM's update stays in float32.
    error = np.abs(approx - exact).max() / np.abs(exact).max()
    assert 0 < error < 0.05  # Rounded (so bf16 is really used), and only rounded.


def test_unknown_dtype_is_a_config_error(idx_dir, tiny_model, tmp_path):
    config = _config(idx_dir, tiny_model)
    config.generator.dtype = "float16"
    with pytest.raises(pipeline.ConfigError, match="generator.dtype 'float16'"):
        pipeline.run(config, str(tmp_path / "run"), "generator")


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["sd_image_variations", "sd_img2img"])
def test_sd_output_is_bit_identical_on_one_and_four_devices(
    generator, tiny_model, tiny_img2img, tmp_path
):
    model_dir = tiny_img2img if generator == "sd_img2img" else tiny_model
    outputs = []
    for devices in (1, 4):
        out = tmp_path / f"devices{devices}"
        code, stdout, stderr = run_worker(
            out, devices, per_device_batch=4, sd_model=model_dir, sd_generator=generator
        )
        assert code == 0, stderr[-3000:]
        assert f"local={devices}" in stdout
        outputs.append(read_all(out))
    assert outputs[0].std() > 10  # Not trivial: colour transfer gives each its source's spread.
    np.testing.assert_array_equal(outputs[0], outputs[1])

"""SD image variations: tiny random weights in the hub's layout, through the regenerate stage."""

import os

import numpy as np
import pytest
from test_regenerate import read_all, run_worker
from tiny_hub import TINY_RESOLUTION, write_tiny_sd_image_variations

from configs import common, smoke
from jaxclean import pipeline
from jaxclean.diffusion import stable_diffusion as sd


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_sd_image_variations(str(tmp_path_factory.mktemp("hub") / "tiny-sd"))


def _config(idx_dir, model_dir):
    config = smoke.get_config()
    config.data.dir = idx_dir
    config.generator = common.sd_image_variations_config(
        model=model_dir, download=False, resolution=TINY_RESOLUTION
    )
    return config


def test_loads_every_component_with_the_scheduler_of_the_model(tiny_model):
    model, params = sd.load_sd_image_variations(tiny_model, (28, 28, 1), TINY_RESOLUTION)
    assert set(params) == {"unet", "vae", "image_encoder"}
    assert model.latent_shape == (8, 8, 4)
    # set_alpha_to_one=False and steps_offset=1, as SD's DDIM config says.
    assert model.steps_offset == 1
    assert model.final_alpha_cumprod == pytest.approx(model.alphas_cumprod[0])


@pytest.mark.slow
def test_regenerate_stage_runs_on_a_hub_layout_model(idx_dir, tiny_model, tmp_path):
    workdir = str(tmp_path / "run")
    pipeline.run(_config(idx_dir, tiny_model), workdir, "poison,generator,regenerate")
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


@pytest.mark.slow
def test_sd_variations_are_bit_identical_on_one_and_four_devices(tiny_model, tmp_path):
    outputs = []
    for devices in (1, 4):
        out = tmp_path / f"devices{devices}"
        code, stdout, stderr = run_worker(out, devices, per_device_batch=4, sd_model=tiny_model)
        assert code == 0, stderr[-3000:]
        assert f"local={devices}" in stdout
        outputs.append(read_all(out))
    assert outputs[0].std() > 10  # Not trivial: colour transfer gives each its source's spread.
    np.testing.assert_array_equal(outputs[0], outputs[1])

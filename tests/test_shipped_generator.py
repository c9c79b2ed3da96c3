"""The generator shipped in pretrained/: intact, small, and what the Fashion-MNIST configs ask for.

A change to the generator defaults without retraining the shipped weights fails here, not in a
user's run an hour in.
"""

import hashlib
import json
import os

import pytest

from configs import common, fashion_mnist_badnets, fashion_mnist_blended
from jaxclean import checkpointing, data
from jaxclean.artifacts import SPEC_VERSION
from jaxclean.checks import ConfigError
from jaxclean.diffusion import generator as generator_lib
from jaxclean.stages import generator as generator_stage

SHIPPED = common.FASHION_MNIST_GENERATOR
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(SHIPPED, "done.json")), reason="no shipped generator"
)


def _read(name):
    with open(os.path.join(SHIPPED, name)) as f:
        return json.load(f)


def test_shipped_generator_is_intact_and_small():
    with open(os.path.join(SHIPPED, generator_stage.EXPORT_FILE), "rb") as f:
        blob = f.read()
    assert len(blob) <= 20 * 2**20
    digest = hashlib.sha256(blob).hexdigest()
    assert digest == _read("done.json")["model_sha256"]
    # Its model card names the file it describes.
    with open(os.path.join(SHIPPED, "README.md")) as f:
        assert digest in f.read()
    assert _read("spec.json")["spec_version"] == SPEC_VERSION


@pytest.mark.parametrize("module", [fashion_mnist_badnets, fashion_mnist_blended])
def test_full_configs_describe_the_shipped_generator(module):
    config = module.get_config()
    assert config.generator.pretrained == SHIPPED
    spec = _read("spec.json")
    wanted = generator_stage.generator_weights_config(config.generator)
    assert json.loads(json.dumps(wanted)) == spec["generator"]
    assert spec["seed"] == config.seed and spec["train_split"] == "trusted"


def test_shipped_weights_fit_the_configured_architecture():
    config = fashion_mnist_badnets.get_config()
    spec = _read("spec.json")
    shape, classes = tuple(spec["image_shape"]), spec["num_classes"]
    with open(os.path.join(SHIPPED, generator_stage.EXPORT_FILE), "rb") as f:
        params = checkpointing.from_safetensors(f.read())
    model = generator_lib.build(config.generator, shape, classes)
    checked = generator_stage.check_generator_params(model, params, SHIPPED)
    assert set(checked) == {
        "encoder",
        "vae",
        "unet",
        "label_table",
        "embed_mean",
        "embed_std",
        "latent_scale",
    }
    # The check is not vacuous: the same weights against another UNet width are refused.
    config.generator.unet.block_out_channels = (64, 64, 64)
    other = generator_lib.build(config.generator, shape, classes)
    with pytest.raises(ConfigError, match="another architecture"):
        generator_stage.check_generator_params(other, params, SHIPPED)


@pytest.mark.skipif(
    not os.path.exists(os.path.join(common.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST not installed",
)
def test_shipped_generator_was_trained_on_this_trusted_split():
    config = fashion_mnist_badnets.get_config()
    splits = data.load_splits(config.data, config.seed)
    assert splits.trusted.fingerprint() == _read("spec.json")["split_fingerprint"]

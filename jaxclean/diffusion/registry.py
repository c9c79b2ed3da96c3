"""Image-variation generators by name: how each is checked, made and where it comes from.

Two kinds: one trained here, from the trusted split, by the `encoder` and `generator` stages
(the offline default), and pretrained models in the Hugging Face hub's layout, loaded from
safetensors. Adding a generator is one entry in GENERATORS (and, for a new architecture, a
model class with the sampler's interface: see `jaxclean.diffusion.generator.LatentDiffusion`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxclean import checks
from jaxclean.checks import ConfigError
from jaxclean.diffusion import generator as latent_diffusion
from jaxclean.diffusion import hub
from jaxclean.diffusion import stable_diffusion as sd

# What the encoder and the generator trained here may learn from: the trusted split (the
# method), or the poisoned training split (a test of the method's premise).
TRAIN_SPLITS = ("trusted", "poisoned_train")


@dataclasses.dataclass(frozen=True)
class GeneratorKind:
    """One generator, by the name config.generator.name gives it.

    Attributes:
      name: the config's name for it.
      description: one line.
      trains_here: made by the encoder and generator stages; otherwise loaded from the hub.
      components: the folders of its hub-layout directory (none when it trains here).
      validate: config.generator -> None, raising ConfigError.
      build: (config.generator, image shape, num classes) -> the model, for one trained here.
      load: (config.generator, directory, image shape, class names) -> (model, params), for a
        hub model.
    """

    name: str
    description: str
    trains_here: bool
    validate: Callable
    components: tuple[str, ...] = ()
    build: Callable | None = None
    load: Callable | None = None


def _validate_latent_diffusion(config) -> None:
    checks.one_of(config.train_split, TRAIN_SPLITS, "generator.train_split")
    checks.one_of(config.condition, latent_diffusion.CONDITIONS, "generator.condition")
    checks.probability(config.cond_dropout, "generator.cond_dropout")
    checks.probability(config.condition_corruption, "generator.condition_corruption")
    checks.recipe(config.encoder, "generator.encoder")
    if config.encoder_invariance_weight < 0:
        raise ConfigError(
            f"generator.encoder_invariance_weight {config.encoder_invariance_weight} must be >= 0"
        )
    checks.positive(config.encode_batch_size, "generator.encode_batch_size")
    for part in ("vae", "unet"):
        for key in ("num_epochs", "batch_size", "learning_rate"):
            checks.positive(config[part][key], f"generator.{part}.{key}")
    downsample = 2 ** (len(config.vae.block_out_channels) - 1)
    if config.image_size <= 0 or config.image_size % downsample:
        raise ConfigError(
            f"generator.image_size {config.image_size} must be a positive multiple of "
            f"{downsample} (the VAE's downsampling)"
        )


def _validate_hub(config) -> None:
    checks.positive(config.resolution, "generator.resolution")
    checks.one_of(config.dtype, tuple(sd.DTYPES), "generator.dtype")
    if config.name == "sd_img2img" and "{}" not in config.prompt:
        raise ConfigError(f"generator.prompt {config.prompt!r} needs a {{}} for the class name")


def _build_latent_diffusion(config, image_shape, num_classes: int):
    return latent_diffusion.build(config, image_shape, num_classes)


def _load_sd_image_variations(config, root: str, image_shape, class_names):
    del class_names  # The image embedding alone conditions.
    return sd.load_sd_image_variations(root, image_shape, config.resolution, config.dtype)


def _load_sd_img2img(config, root: str, image_shape, class_names):
    return sd.load_sd_img2img(
        root, image_shape, config.resolution, class_names, config.prompt, config.dtype
    )


GENERATORS = {
    kind.name: kind
    for kind in (
        GeneratorKind(
            "latent_diffusion",
            "image variations from a small latent diffusion model trained on the trusted split",
            trains_here=True,
            validate=_validate_latent_diffusion,
            build=_build_latent_diffusion,
        ),
        GeneratorKind(
            "sd_image_variations",
            "Stable Diffusion image variations (lambdalabs/sd-image-variations-diffusers): the "
            "paper's generator",
            trains_here=False,
            validate=_validate_hub,
            components=sd.SD_IMAGE_VARIATIONS_COMPONENTS,
            load=_load_sd_image_variations,
        ),
        GeneratorKind(
            "sd_img2img",
            "SDEdit on a text-to-image Stable Diffusion 1.x model, class-name prompts (a "
            "baseline: it keeps the source's layout)",
            trains_here=False,
            validate=_validate_hub,
            components=sd.SD_IMG2IMG_COMPONENTS,
            load=_load_sd_img2img,
        ),
    )
}


def get(name: str) -> GeneratorKind:
    if name not in GENERATORS:
        raise ConfigError(f"unknown generator {name!r}; known: {tuple(GENERATORS)}")
    return GENERATORS[name]


def validate(config) -> None:
    """config.generator, whichever generator it names."""
    get(config.name).validate(config)


def hub_directory(config) -> str:
    """The local directory of a hub generator's weights (fetched once when allowed), checked
    to hold every component its kind needs."""
    kind = get(config.name)
    try:
        root = hub.resolve(config.model, kind.components, config.download)
        for component in kind.components:
            hub.component_dir(root, component)
    except hub.HubError as e:
        raise ConfigError(str(e)) from e
    return root


def load_hub(config, image_shape, class_names):
    """(model, params, directory) of a hub generator."""
    root = hub_directory(config)
    try:
        model, params = get(config.name).load(config, root, image_shape, class_names)
    except hub.HubError as e:
        raise ConfigError(str(e)) from e
    return model, params, root

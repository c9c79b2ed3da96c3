"""The whole Flax samplers against diffusers' PyTorch pipelines, on the same tiny weights.

Both sides load the same hub-layout directory (PyTorch through its own from_pretrained) and
start from the same initial latents, so every stage is compared at once: CLIP preprocessing and
encoders, guidance, the DDIM schedule and updates, the VAE, and the conversion to images. Needs
torch (the `bench` extra); skipped without it.
"""

import warnings

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tiny_hub import (  # noqa: E402
    TINY_RESOLUTION,
    write_tiny_sd_image_variations,
    write_tiny_sd_img2img,
)

from jaxclean.diffusion import sampler  # noqa: E402
from jaxclean.diffusion import stable_diffusion as sd  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import diffusers  # noqa: E402
    import transformers  # noqa: E402
    from diffusers.pipelines.stable_diffusion import (  # noqa: E402
        pipeline_stable_diffusion_img2img as img2img_module,
    )

SIZE = TINY_RESOLUTION  # Images, generation and CLIP input all at one size: no resampling.
STEPS, GUIDANCE = 4, 2.0
CLASS_NAMES = ("T-shirt", "trouser", "bag")


def _images(count: int, seed: int) -> np.ndarray:
    """Smooth random colour images (uint8), so the VAE sees more than noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (count, 4, 4, 3))
    return np.repeat(np.repeat(coarse, SIZE // 4, 1), SIZE // 4, 2).astype(np.uint8)


def _ours(model, params, settings, images, labels, rng):
    indices = np.arange(len(images), dtype=np.int32)
    run = jax.jit(sampler.make_variation_fn(model, settings))
    out = np.asarray(run(params, images, indices, labels, rng))
    noise = np.asarray(sampler.initial_noise(rng, indices, model.latent_shape))
    return out, torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())


def _assert_same_images(ours_uint8, theirs_unit):
    theirs = theirs_unit * 255.0
    assert theirs.std() > 5  # Images with structure, so agreement means something.
    # Ours are rounded to uint8 (at most 0.5 off); the rest is float error.
    np.testing.assert_array_less(np.abs(ours_uint8.astype(np.float64) - theirs), 1.0)


def _from_pretrained(cls, root, subfolder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(root, subfolder=subfolder)


@pytest.mark.slow
def test_image_variations_match_the_pytorch_pipeline(tmp_path):
    root = write_tiny_sd_image_variations(str(tmp_path / "variations"), clip_size=SIZE)
    model, params = sd.load_sd_image_variations(root, (SIZE, SIZE, 3), SIZE)
    settings = sampler.SamplerSettings(steps=STEPS, guidance=GUIDANCE, color_transfer=False)
    images = _images(3, seed=0)
    ours, noise = _ours(model, params, settings, images, np.zeros(3, np.int32), jax.random.key(7))

    pipe = diffusers.StableDiffusionImageVariationPipeline(
        vae=_from_pretrained(diffusers.AutoencoderKL, root, "vae"),
        image_encoder=_from_pretrained(
            transformers.CLIPVisionModelWithProjection, root, "image_encoder"
        ),
        unet=_from_pretrained(diffusers.UNet2DConditionModel, root, "unet"),
        scheduler=_from_pretrained(diffusers.DDIMScheduler, root, "scheduler"),
        feature_extractor=_from_pretrained(
            transformers.CLIPImageProcessor, root, "feature_extractor"
        ),
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    from PIL import Image

    with torch.inference_mode():
        theirs = pipe(
            image=[Image.fromarray(image) for image in images],
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            eta=0.0,
            latents=noise,
            output_type="np",
        ).images
    _assert_same_images(ours, theirs)


@pytest.mark.slow
def test_img2img_matches_the_pytorch_pipeline(tmp_path, monkeypatch):
    root = write_tiny_sd_img2img(str(tmp_path / "img2img"))
    template = "a photo of a {}"
    model, params = sd.load_sd_img2img(root, (SIZE, SIZE, 3), SIZE, CLASS_NAMES, template)
    settings = sampler.SamplerSettings(
        steps=STEPS, guidance=GUIDANCE, strength=0.5, color_transfer=False
    )
    images, labels = _images(3, seed=1), np.array([2, 0, 1], np.int32)
    ours, noise = _ours(model, params, settings, images, labels, jax.random.key(3))

    # The pipeline draws its noise inside; it gets ours. jaxclean encodes the source with the
    # VAE posterior's mean (SD's posterior std is ~1e-3 of its mean), the pipeline samples it:
    # it gets the mean too.
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda shape, **kwargs: noise)
    monkeypatch.setattr(
        img2img_module, "retrieve_latents", lambda output, generator=None: output.latent_dist.mode()
    )
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=_from_pretrained(diffusers.AutoencoderKL, root, "vae"),
        text_encoder=_from_pretrained(transformers.CLIPTextModel, root, "text_encoder"),
        tokenizer=_from_pretrained(transformers.CLIPTokenizer, root, "tokenizer"),
        unet=_from_pretrained(diffusers.UNet2DConditionModel, root, "unet"),
        scheduler=_from_pretrained(diffusers.DDIMScheduler, root, "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    source = torch.from_numpy((images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2))
    with torch.inference_mode():
        theirs = pipe(
            prompt=[template.format(CLASS_NAMES[label]) for label in labels],
            image=source,
            strength=0.5,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            eta=0.0,
            output_type="np",
        ).images
    _assert_same_images(ours, theirs)

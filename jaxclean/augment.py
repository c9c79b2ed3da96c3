"""Training-time augmentation and photometric corruption, inside the jitted steps.

Every random draw comes from the image's own key (folded from its index in the dataset), and
each kind of corruption from its own stream of that key, so what happens to an image depends
neither on its batch nor on which other options are on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training-time augmentation, applied inside the jitted step.

    Attributes:
      crop_padding: zero-pad by this many pixels, then crop back at a random offset.
      flip: random horizontal flips.
      corruption: probability that an image also gets a random photometric corruption
        (`corrupt_image`). Meant for the generator's semantic encoder: CLIP, which the paper's
        generators condition on, keeps describing an image through noise and contrast changes
        because of the scale of its training data; a small encoder trained on clean images
        does not, and its embedding of a corrupted image falls off the data it was trained on.
      corruption_noise: the largest standard deviation of the corruption's pixel noise; 0 leaves
        contrast and brightness only. The trigger-learnability classifiers use 0: a Blended
        trigger lowers an image's contrast and lifts its black level, which alone leaves a small
        classifier unable to read the image, while pixel noise would teach it to ignore the faint
        pixel traces it is there to find.
    """

    crop_padding: int = 0
    flip: bool = False
    corruption: float = 0.0
    corruption_noise: float = 0.2

    @classmethod
    def from_recipe(cls, recipe) -> Augment:
        """The augmentation a classifier recipe (configs/common.py) asks for."""
        return cls(
            crop_padding=recipe.crop_padding,
            flip=recipe.flip,
            corruption=recipe.corruption,
            corruption_noise=recipe.corruption_noise,
        )


def normalize(images: jax.Array) -> jax.Array:
    """Images in [0, 255] (uint8, or float for unquantized triggered test images) to float32
    [-1, 1], the range the generators use too."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def augment_images(images: jax.Array, keys: jax.Array, augment: Augment) -> jax.Array:
    """Random crop-with-padding and flip, one key per image.

    Args:
      images: float [N, H, W, C].
      keys: [N] keys, one per image, so an image's augmentation does not depend on its batch.
      augment: what to apply.
    """
    if augment.crop_padding == 0 and not augment.flip and augment.corruption == 0:
        return images
    pad = augment.crop_padding
    height, width = images.shape[1:3]

    def one(image, key):
        crop_key, flip_key = jax.random.split(key)
        if augment.corruption:
            # Its own key, so crops and flips stay those of a run without corruption.
            image = corrupt_image(
                image,
                jax.random.fold_in(key, AUGMENT_CORRUPTION_STREAM),
                augment.corruption,
                augment.corruption_noise,
            )
        if pad:
            # Pad with the value of black: the images are in [-1, 1].
            padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=-1.0)
            offsets = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
            image = jax.lax.dynamic_slice(
                padded, (offsets[0], offsets[1], 0), (height, width, image.shape[-1])
            )
        if augment.flip:
            image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
        return image

    return jax.vmap(one)(images, keys)


def corrupt_image(
    image: jax.Array,
    key: jax.Array,
    probability: float,
    max_noise_std: float = 0.2,
    min_contrast: float = 0.5,
) -> jax.Array:
    """With `probability`, a random contrast, brightness and pixel-noise corruption of `image`.

    x' = c * x + (1 - c) * b + s * n: contrast c ~ U(min_contrast, 1) towards a flat level
    b ~ U(-1, 1), plus Gaussian pixel noise n of std s ~ U(0, max_noise_std), clipped to
    [-1, 1]; the common photometric corruptions of corruption-robustness benchmarks
    (ImageNet-C's contrast, brightness and Gaussian noise), at strengths that leave the content
    recognisable. With max_noise_std 0 the draws are the same and only the noise is gone; a
    higher min_contrast keeps the draws mild.
    """
    apply_key, contrast_key, level_key, amount_key, noise_key = jax.random.split(key, 5)
    contrast = jax.random.uniform(contrast_key, (), minval=min_contrast, maxval=1.0)
    level = jax.random.uniform(level_key, (), minval=-1.0, maxval=1.0)
    amount = jax.random.uniform(amount_key, (), maxval=max_noise_std)
    noise = jax.random.normal(noise_key, image.shape)
    corrupted = jnp.clip(contrast * image + (1.0 - contrast) * level + amount * noise, -1.0, 1.0)
    return jnp.where(jax.random.bernoulli(apply_key, probability), corrupted, image)


# Streams folded into an image's own key, one per corruption, so that each draws independently
# of the others and of the crops and flips (which use the key itself).
AUGMENT_CORRUPTION_STREAM = 2
STUDENT_CORRUPTION_STREAM = 3
INVARIANCE_COPY_STREAM = 4


def corrupt_images(
    images: jax.Array,
    keys: jax.Array,
    stream: int,
    probability: float,
    max_noise_std: float = 0.2,
) -> jax.Array:
    """`corrupt_image` of each of [N, ...] images from its own key of [N] keys, folded with
    `stream`, so an image's corruption does not depend on its batch."""
    return jax.vmap(
        lambda image, key: corrupt_image(
            image, jax.random.fold_in(key, stream), probability, max_noise_std
        )
    )(images, keys)


def sample_keys(rng: jax.Array, indices: jax.Array) -> jax.Array:
    """One key per sample, folded from its index in the dataset."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(indices)

"""Backdoor attacks: triggers, the poison plan, and the triggered test sets.

Triggers work on uint8 NHWC numpy arrays, on the host, once per run: poisoning is data
preparation, not a training-time transform, so it happens before any batch reaches a device.
A trigger is picked by name from `ATTACKS`; adding one is one class and one entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re

import numpy as np

from jaxclean.data import ImageDataset


class AttackError(ValueError):
    """An attack configured in a way that cannot be applied."""


_HEX = r"#[0-9a-fA-F]{6}"


def _parse_colour(text: str) -> np.ndarray:
    if not re.fullmatch(_HEX, text):
        raise AttackError(f"colour {text!r} is not of the form #rrggbb")
    return np.array([int(text[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def _to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """An RGB colour as `channels` values; one channel takes ITU-R 601 luma, as PIL's "L"."""
    if channels == 3:
        return rgb
    if channels == 1:
        return np.array([(rgb[0] * 299 + rgb[1] * 587 + rgb[2] * 114) / 1000])
    raise AttackError(f"images with {channels} channels are not supported (use 1 or 3)")


@dataclasses.dataclass(frozen=True)
class BadNets:
    """A square patch pasted over the image (Gu et al. 2017).

    Attributes:
      pattern: "checkerboard" ((row + col) % 2 with 0, black, at the top-left), "white",
        "black", "#rrggbb", or "checkerboard_#rrggbb_#rrggbb" (first colour where
        (row + col) % 2 == 0).
      size: the patch's side in pixels.
      location: "bottom_right", or "random": a position drawn per image from (seed, index).
      seed: seeds the random locations.
    """

    pattern: str = "checkerboard"
    size: int = 3
    location: str = "bottom_right"
    seed: int = 0

    def __post_init__(self):
        if self.location not in ("bottom_right", "random"):
            raise AttackError(f"BadNets location {self.location!r}: use bottom_right or random")
        if self.size < 1:
            raise AttackError(f"BadNets patch size {self.size} must be at least 1")
        self._colours()  # Validates the pattern now, not at first use.

    def _colours(self) -> tuple[np.ndarray, np.ndarray]:
        """The colours of the (row + col) % 2 == 0 and == 1 cells."""
        black, white = np.zeros(3), np.full(3, 255.0)
        if self.pattern == "checkerboard":
            return black, white
        if self.pattern == "white":
            return white, white
        if self.pattern == "black":
            return black, black
        match = re.fullmatch(f"checkerboard_({_HEX})_({_HEX})", self.pattern)
        if match:
            return _parse_colour(match.group(1)), _parse_colour(match.group(2))
        if re.fullmatch(_HEX, self.pattern):
            colour = _parse_colour(self.pattern)
            return colour, colour
        raise AttackError(
            f"unknown BadNets pattern {self.pattern!r}: use checkerboard, white, black, "
            "#rrggbb or checkerboard_#rrggbb_#rrggbb"
        )

    def patch(self, channels: int) -> np.ndarray:
        """The patch as uint8 [size, size, channels]."""
        even, odd = (_to_channels(c, channels) for c in self._colours())
        rows, cols = np.indices((self.size, self.size))
        parity = ((rows + cols) % 2)[..., None]
        return np.round(np.where(parity == 0, even, odd)).astype(np.uint8)

    def validate(self, image_shape: tuple[int, int, int]) -> None:
        height, width, _ = image_shape
        if self.size > height or self.size > width:
            raise AttackError(
                f"BadNets trigger of size {self.size} is larger than the {height}x{width} images"
            )

    def locations(self, image_shape, indices: np.ndarray, stream: str) -> np.ndarray:
        """Top-left corners [N, 2] of the patch for the images with these indices."""
        height, width, _ = image_shape
        if self.location == "bottom_right":
            corner = (height - self.size, width - self.size)
            return np.tile(np.array(corner), (len(indices), 1))
        stream_id = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")
        corners = []
        for index in indices:
            rng = np.random.default_rng([self.seed, stream_id, int(index)])
            corners.append(
                (rng.integers(0, height - self.size + 1), rng.integers(0, width - self.size + 1))
            )
        return np.array(corners, dtype=np.int64).reshape(-1, 2)

    def apply(self, images: np.ndarray, indices: np.ndarray, stream: str = "train") -> np.ndarray:
        """Returns a copy of `images` with the patch pasted.

        Args:
          images: uint8 [N, H, W, C].
          indices: each image's index in its split; decides random locations.
          stream: the split's name, so train and test images of equal index differ.
        """
        self.validate(images.shape[1:])
        out = images.copy()
        patch = self.patch(images.shape[-1])
        for i, (row, col) in enumerate(self.locations(images.shape[1:], indices, stream)):
            out[i, row : row + self.size, col : col + self.size] = patch
        return out


@dataclasses.dataclass(frozen=True)
class Blended:
    """A full-image pattern blended in: (1 - ratio) * image + ratio * pattern (Chen et al. 2017).

    Attributes:
      pattern: "noise" (uniform integers in [0, 255] from `noise_seed`) or an image file path.
      ratio: the pattern's weight.
      noise_seed: seeds the noise pattern (the attack's published default is 42).
    """

    pattern: str = "noise"
    ratio: float = 0.2
    noise_seed: int = 42

    def __post_init__(self):
        if not 0.0 < self.ratio <= 1.0:
            raise AttackError(f"Blended ratio {self.ratio} must be in (0, 1]")

    def validate(self, image_shape) -> None:
        self.pattern_array(image_shape)

    def pattern_array(self, image_shape) -> np.ndarray:
        """The pattern as float64 [H, W, C] in [0, 255]."""
        height, width, channels = image_shape
        if self.pattern == "noise":
            # RandomState, not default_rng: its stream is the one the published attacks use.
            rng = np.random.RandomState(self.noise_seed)
            return rng.randint(0, 256, size=(height, width, channels)).astype(np.float64)
        from PIL import Image

        try:
            with Image.open(self.pattern) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                image = image.resize((width, height), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float64)
        except OSError as e:
            raise AttackError(f"Blended pattern {self.pattern!r}: cannot read image: {e}") from e
        return array[..., None] if array.ndim == 2 else array

    def apply(self, images: np.ndarray, indices: np.ndarray, stream: str = "train") -> np.ndarray:
        del indices, stream  # The same pattern for every image.
        pattern = self.pattern_array(images.shape[1:])
        blended = (1.0 - self.ratio) * images.astype(np.float64) + self.ratio * pattern
        return np.clip(np.round(blended), 0, 255).astype(np.uint8)


ATTACKS = {"badnets": BadNets, "blended": Blended}


def make_trigger(attack_config):
    """Builds the trigger named by config.attack.name from config.attack.trigger."""
    name = attack_config.name
    if name not in ATTACKS:
        raise AttackError(f"unknown attack {name!r}; known: {sorted(ATTACKS)} or none")
    params = dict(attack_config.trigger)
    fields = {f.name for f in dataclasses.fields(ATTACKS[name])}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise AttackError(
            f"attack {name!r} has no parameters {unknown} (its trigger takes {sorted(fields)}): "
            f"start from its config, configs/fashion_mnist_{name}.py, or give "
            "--config.attack.trigger its parameters"
        )
    return ATTACKS[name](**params)


def validate_config(attack_config) -> None:
    """What can be told wrong about config.attack before any data is read."""
    if attack_config.name == "none":
        return
    make_trigger(attack_config)
    if not 0.0 < attack_config.rate <= 1.0:
        raise AttackError(
            f"poisoning rate {attack_config.rate} must be in (0, 1]; for a run without an "
            "attack set --config.attack.name=none"
        )


def validate_for_data(attack_config, train: ImageDataset) -> None:
    """What can be told wrong about config.attack once the training split is known."""
    validate_attack_config(attack_config, train.num_classes)
    make_trigger(attack_config).validate(train.image_shape)
    eligible = (
        len(train.labels)
        if attack_config.include_target
        else int((train.labels != attack_config.target).sum())
    )
    wanted = math.ceil(attack_config.rate * len(train.labels))
    if wanted > eligible:
        raise AttackError(
            f"poisoning rate {attack_config.rate} asks for {wanted} poisoned images but only "
            f"{eligible} are not of the target class: lower --config.attack.rate, or set "
            "--config.attack.include_target=True to poison target-class images too"
        )


@dataclasses.dataclass(frozen=True)
class PoisonPlan:
    """Which training samples carry the trigger, and everything needed to redo it exactly."""

    indices: np.ndarray
    target: int
    rate: float
    seed: int
    include_target: bool
    attack: str
    trigger: dict
    poisoned_fingerprint: str = ""

    def to_json(self) -> dict:
        return {
            "indices": [int(i) for i in self.indices],
            "num_poisoned": int(len(self.indices)),
            "target": self.target,
            "rate": self.rate,
            "seed": self.seed,
            "include_target": self.include_target,
            "attack": self.attack,
            "trigger": self.trigger,
            "poisoned_fingerprint": self.poisoned_fingerprint,
        }


def validate_attack_config(attack_config, num_classes: int) -> None:
    """Checks target and rate before any work is done."""
    if not 0 <= attack_config.target < num_classes:
        raise AttackError(
            f"target class {attack_config.target} out of range for {num_classes} classes: set "
            f"--config.attack.target to one in [0, {num_classes - 1}]"
        )
    if not 0.0 <= attack_config.rate <= 1.0:
        raise AttackError(f"poisoning rate {attack_config.rate} must be in [0, 1]")


def choose_poison_indices(
    labels: np.ndarray, rate: float, target: int, seed: int, include_target: bool
) -> np.ndarray:
    """Draws ceil(rate * n) indices without replacement, by default from non-target samples.

    Returns the indices sorted.
    """
    candidates = np.arange(len(labels)) if include_target else np.flatnonzero(labels != target)
    num_poisoned = math.ceil(rate * len(labels))
    if num_poisoned > len(candidates):
        raise AttackError(
            f"rate {rate} asks for {num_poisoned} poisoned samples but only {len(candidates)} "
            "are eligible: lower the rate, or set include_target=True"
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=num_poisoned, replace=False)).astype(np.int64)


def poison(train: ImageDataset, attack_config) -> tuple[ImageDataset, PoisonPlan]:
    """Applies the configured attack to the training set.

    Returns:
      The poisoned dataset (triggered images relabelled to the target) and its plan.
    """
    if attack_config.name == "none":
        plan = PoisonPlan(
            np.zeros(0, np.int64),
            attack_config.target,
            0.0,
            attack_config.seed,
            False,
            "none",
            {},
            train.fingerprint(),
        )
        return train, plan
    validate_attack_config(attack_config, train.num_classes)
    trigger = make_trigger(attack_config)
    trigger.validate(train.image_shape)
    indices = choose_poison_indices(
        train.labels,
        attack_config.rate,
        attack_config.target,
        attack_config.seed,
        attack_config.include_target,
    )
    images = train.images.copy()
    labels = train.labels.copy()
    images[indices] = trigger.apply(train.images[indices], indices, stream="train")
    labels[indices] = attack_config.target
    poisoned = ImageDataset(images, labels, train.class_names)
    plan = PoisonPlan(
        indices=indices,
        target=int(attack_config.target),
        rate=float(attack_config.rate),
        seed=int(attack_config.seed),
        include_target=bool(attack_config.include_target),
        attack=attack_config.name,
        trigger=dataclasses.asdict(trigger),
        poisoned_fingerprint=poisoned.fingerprint(),
    )
    return poisoned, plan


def relabel_without_trigger(dataset: ImageDataset, attack_config, seed: int) -> ImageDataset:
    """The poisoning's label changes with no trigger: a rate of the images relabelled to target.

    A reference for what a classifier learns from the poisoned labels alone. The relabelled
    images are drawn as the poisoned ones are (same rate, same eligibility), with `seed`.
    """
    validate_attack_config(attack_config, dataset.num_classes)
    indices = choose_poison_indices(
        dataset.labels,
        attack_config.rate,
        attack_config.target,
        seed,
        attack_config.include_target,
    )
    labels = dataset.labels.copy()
    labels[indices] = attack_config.target
    return ImageDataset(dataset.images, labels, dataset.class_names)


def trigger_removed(clean: ImageDataset, poisoned: ImageDataset) -> ImageDataset:
    """The poisoned split as a perfect regeneration would leave it: clean images, poisoned labels.

    Each poisoned row gets its clean source back and keeps the target label; the poisoning's
    label changes are all that is left of it. A classifier trained on this is the floor of any
    regeneration's trigger learnability.
    """
    if len(clean) != len(poisoned) or clean.image_shape != poisoned.image_shape:
        raise AttackError(
            f"the poisoned split ({len(poisoned)} images of {poisoned.image_shape}) is not a "
            f"poisoning of the clean one ({len(clean)} images of {clean.image_shape})"
        )
    return ImageDataset(clean.images, poisoned.labels, clean.class_names)


@dataclasses.dataclass(frozen=True)
class TriggeredTestSets:
    """Every non-target test image with the trigger, labelled two ways.

    Attributes:
      attack_success: labels are the target; accuracy on it is the attack success rate.
      robust: labels are the true classes; accuracy on it is the robust accuracy.
      source_indices: each image's index in the clean test set.
    """

    attack_success: ImageDataset
    robust: ImageDataset
    source_indices: np.ndarray


def triggered_test_sets(test: ImageDataset, attack_config) -> TriggeredTestSets | None:
    """Builds the ASR and RA sets; None when the config has no attack."""
    if attack_config.name == "none":
        return None
    trigger = make_trigger(attack_config)
    trigger.validate(test.image_shape)
    indices = np.flatnonzero(test.labels != attack_config.target)
    images = trigger.apply(test.images[indices], indices, stream="test")
    true_labels = test.labels[indices]
    target_labels = np.full_like(true_labels, attack_config.target)
    return TriggeredTestSets(
        attack_success=ImageDataset(images, target_labels, test.class_names),
        robust=ImageDataset(images, true_labels, test.class_names),
        source_indices=indices,
    )

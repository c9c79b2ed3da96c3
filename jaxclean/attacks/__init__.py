"""Backdoor attacks: triggers by name, the poison plan, and the triggered test sets.

Triggers work on uint8 NHWC numpy arrays, on the host, once per run: poisoning is data
preparation, not a training-time transform, so it happens before any batch reaches a device.
A trigger is picked by name from `ATTACKS`; adding one is one class (`attacks.base` says what
it implements) and one entry. docs/attacks.md has each attack's semantics and where they
follow, or knowingly differ from, the code they come from.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxclean.attacks.badnets import BadNets
from jaxclean.attacks.base import AttackError
from jaxclean.attacks.blended import Blended
from jaxclean.attacks.bpp import BppAttack
from jaxclean.attacks.sig import SIG
from jaxclean.attacks.wanet import WaNet
from jaxclean.data import ImageDataset

__all__ = ["ATTACKS", "AttackError", "BadNets", "Blended", "BppAttack", "SIG", "WaNet"]

ATTACKS = {"badnets": BadNets, "blended": Blended, "wanet": WaNet, "sig": SIG, "bpp": BppAttack}
# What the poisoning rate is a share of: "eligible", the images that may be poisoned (the
# official code's count), or "all" the training images (BackdoorBench's).
RATE_OF = ("eligible", "all")


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
    if attack_config.rate_of not in RATE_OF:
        raise AttackError(f"attack.rate_of {attack_config.rate_of!r}: use one of {RATE_OF}")


def validate_attack_config(attack_config, num_classes: int) -> None:
    """Checks target and rate before any work is done."""
    if not 0 <= attack_config.target < num_classes:
        raise AttackError(
            f"target class {attack_config.target} out of range for {num_classes} classes: set "
            f"--config.attack.target to one in [0, {num_classes - 1}]"
        )
    if not 0.0 <= attack_config.rate <= 1.0:
        raise AttackError(f"poisoning rate {attack_config.rate} must be in [0, 1]")


def eligible_indices(labels: np.ndarray, attack_config, trigger) -> np.ndarray:
    """The training images the attack may poison: those of the target class for a
    clean-label attack, the others for a relabelling one (all with include_target)."""
    target = attack_config.target
    if trigger.clean_label:
        return np.flatnonzero(labels == target)
    if attack_config.include_target:
        return np.arange(len(labels))
    return np.flatnonzero(labels != target)


def poison_count(labels: np.ndarray, attack_config, trigger) -> int:
    """ceil(rate x the eligible images), or x all images under rate_of='all'."""
    eligible = eligible_indices(labels, attack_config, trigger)
    base = len(eligible) if attack_config.rate_of == "eligible" else len(labels)
    return math.ceil(attack_config.rate * base)


def validate_for_data(attack_config, train: ImageDataset) -> None:
    """What can be told wrong about config.attack once the training split is known."""
    validate_attack_config(attack_config, train.num_classes)
    trigger = make_trigger(attack_config)
    trigger.validate(train.image_shape)
    eligible = len(eligible_indices(train.labels, attack_config, trigger))
    wanted = poison_count(train.labels, attack_config, trigger)
    if wanted == 0:
        raise AttackError(
            f"poisoning rate {attack_config.rate} poisons none of the {eligible} eligible images: "
            "raise --config.attack.rate, or run without an attack (--config.attack.name=none)"
        )
    if wanted > eligible:
        kind = "of the target class" if trigger.clean_label else "not of the target class"
        fix = (
            "lower --config.attack.rate"
            if trigger.clean_label
            else "lower --config.attack.rate, or set --config.attack.include_target=True to "
            "poison target-class images too"
        )
        raise AttackError(
            f"poisoning rate {attack_config.rate} asks for {wanted} poisoned images but only "
            f"{eligible} are {kind}: {fix}"
        )
    crossed = math.ceil(trigger.cross_ratio * wanted)
    if crossed > len(train.labels) - wanted:
        raise AttackError(
            f"{attack_config.name} asks for {crossed} noise-mode samples beside {wanted} "
            f"poisoned ones in {len(train.labels)} images: lower its cross_ratio or the rate"
        )


def choose_poison_indices(candidates: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` of `candidates`, drawn as the official code draws them:
    `np.random.seed(seed); np.random.choice(candidates, count, replace=False)`; sorted."""
    if count > len(candidates):
        raise AttackError(
            f"{count} poisoned samples asked for but only {len(candidates)} are eligible: lower "
            "the rate, or set include_target=True"
        )
    chosen = np.random.RandomState(seed).choice(candidates, count, replace=False)
    return np.sort(chosen).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class PoisonPlan:
    """Which training samples carry the trigger, and everything needed to redo it exactly.

    Attributes:
      indices: the poisoned samples.
      cross_indices: samples given a randomly perturbed trigger and their own labels (WaNet's
        noise mode); empty for other attacks.
      clean_label: whether the poisoned samples kept their labels (of the target class).
    """

    indices: np.ndarray
    target: int
    rate: float
    seed: int
    include_target: bool
    attack: str
    trigger: dict
    poisoned_fingerprint: str = ""
    rate_of: str = "eligible"
    clean_label: bool = False
    cross_indices: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    def to_json(self) -> dict:
        return {
            "indices": [int(i) for i in self.indices],
            "num_poisoned": int(len(self.indices)),
            "cross_indices": [int(i) for i in self.cross_indices],
            "target": self.target,
            "rate": self.rate,
            "rate_of": self.rate_of,
            "seed": self.seed,
            "include_target": self.include_target,
            "clean_label": self.clean_label,
            "attack": self.attack,
            "trigger": self.trigger,
            "poisoned_fingerprint": self.poisoned_fingerprint,
        }


def poison(train: ImageDataset, attack_config) -> tuple[ImageDataset, PoisonPlan]:
    """Applies the configured attack to the training set.

    Returns:
      The poisoned dataset (triggered images, relabelled to the target unless the attack is
      clean-label; noise-mode samples with their own labels) and its plan.
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
    validate_for_data(attack_config, train)
    trigger = make_trigger(attack_config)
    candidates = eligible_indices(train.labels, attack_config, trigger)
    count = poison_count(train.labels, attack_config, trigger)
    indices = choose_poison_indices(candidates, count, attack_config.seed)
    images = train.images.copy()
    labels = train.labels.copy()
    images[indices] = trigger.apply(train.images[indices], indices, stream="train")
    if not trigger.clean_label:
        labels[indices] = attack_config.target
    cross = np.zeros(0, np.int64)
    if trigger.cross_ratio:
        rest = np.setdiff1d(np.arange(len(labels)), indices)
        num_cross = math.ceil(trigger.cross_ratio * count)
        rng = np.random.default_rng([attack_config.seed, 1])
        cross = np.sort(rng.choice(rest, num_cross, replace=False)).astype(np.int64)
        images[cross] = trigger.cross_samples(train.images[cross], cross)
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
        rate_of=attack_config.rate_of,
        clean_label=trigger.clean_label,
        cross_indices=cross,
    )
    return poisoned, plan


def relabel_without_trigger(dataset: ImageDataset, attack_config, seed: int) -> ImageDataset:
    """The poisoning's label changes with no trigger: as many images relabelled to the target
    as the attack would poison, drawn alike, with `seed`. A clean-label attack changes no
    label, so for it this is `dataset` itself."""
    validate_attack_config(attack_config, dataset.num_classes)
    trigger = make_trigger(attack_config)
    if trigger.clean_label:
        return dataset
    candidates = eligible_indices(dataset.labels, attack_config, trigger)
    count = poison_count(dataset.labels, attack_config, trigger)
    indices = choose_poison_indices(candidates, count, seed)
    labels = dataset.labels.copy()
    labels[indices] = attack_config.target
    return ImageDataset(dataset.images, labels, dataset.class_names)


def trigger_removed(clean: ImageDataset, poisoned: ImageDataset) -> ImageDataset:
    """The poisoned split as a perfect regeneration would leave it: clean images, poisoned labels.

    Each poisoned row gets its clean source back and keeps its poisoned label; the poisoning's
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
    """Every non-target test image with the trigger, as the attack's test-time code makes it.

    Attributes:
      images: float32 [N, H, W, C] in [0, 255], unquantized where the attack leaves them so.
      target_labels: the target, for each: accuracy against them is the attack success rate.
      true_labels: their classes: accuracy against them is the robust accuracy.
      source_indices: each image's index in the clean test set.
    """

    images: np.ndarray
    target_labels: np.ndarray
    true_labels: np.ndarray
    source_indices: np.ndarray


def triggered_test_sets(test: ImageDataset, attack_config) -> TriggeredTestSets | None:
    """Builds the ASR and RA sets; None when the config has no attack."""
    if attack_config.name == "none":
        return None
    trigger = make_trigger(attack_config)
    trigger.validate(test.image_shape)
    indices = np.flatnonzero(test.labels != attack_config.target)
    true_labels = test.labels[indices]
    return TriggeredTestSets(
        images=np.asarray(trigger.apply_test(test.images[indices], indices), np.float32),
        target_labels=np.full_like(true_labels, attack_config.target),
        true_labels=true_labels,
        source_indices=indices,
    )

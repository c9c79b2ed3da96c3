"""Config checks the stages share: the error every bad input raises, and the value checks.

Each stage declares its own check (`jaxclean.stages.base.Stage.validate`); what several of them
check alike (a classifier recipe, a probability) is here, so the messages read the same.
"""

from __future__ import annotations

OPTIMIZERS = ("adam", "adamw", "sgd")
SELECTIONS = ("last", "best")


class ConfigError(ValueError):
    """A config or command line that cannot be run; its message names the fix."""


def probability(value, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} {value} must be a probability in [0, 1]")


def positive(value, name: str) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")


def non_negative_int(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} {value!r} must be an integer >= 0")


def one_of(value, choices, name: str) -> None:
    if value not in choices:
        raise ConfigError(f"{name} {value!r}: use one of {tuple(choices)}")


def recipe(recipe, name: str) -> None:
    """A classifier recipe (`configs.common.classifier_recipe`) that can be trained."""
    from jaxclean.models import CLASSIFIERS

    one_of(recipe.model, sorted(CLASSIFIERS), f"{name}.model")
    for key in ("num_epochs", "batch_size", "learning_rate", "width", "eval_batch_size"):
        positive(recipe[key], f"{name}.{key}")
    one_of(recipe.optimizer, OPTIMIZERS, f"{name}.optimizer")
    one_of(recipe.select, SELECTIONS, f"{name}.select")
    probability(recipe.corruption, f"{name}.corruption")
    if recipe.corruption_noise < 0.0:
        raise ConfigError(
            f"{name}.corruption_noise {recipe.corruption_noise} must be a standard deviation >= 0"
        )
    if recipe.crop_padding < 0:
        raise ConfigError(f"{name}.crop_padding {recipe.crop_padding} must be >= 0")
    for key in ("checkpoint_every_steps",):
        if recipe[key] < 0:
            raise ConfigError(f"{name}.{key} {recipe[key]} must be >= 0 (0: never)")
    positive(recipe.max_to_keep, f"{name}.max_to_keep")
    positive(recipe.log_every_steps, f"{name}.log_every_steps")
    epochs = tuple(recipe.lr_decay_epochs)
    if any(not 0 < e <= recipe.num_epochs for e in epochs) or list(epochs) != sorted(epochs):
        raise ConfigError(
            f"{name}.lr_decay_epochs {epochs} must rise within (0, num_epochs={recipe.num_epochs}]"
        )

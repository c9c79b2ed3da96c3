"""Classifiers by name. Adding one is a constructor and an entry in CLASSIFIERS."""

from __future__ import annotations

import functools

from jaxclean.models import resnet

CLASSIFIERS = {
    "cifar_resnet20": functools.partial(resnet.cifar_resnet, 20),
    "cifar_resnet32": functools.partial(resnet.cifar_resnet, 32),
    "cifar_resnet56": functools.partial(resnet.cifar_resnet, 56),
    "resnet18": functools.partial(resnet.imagenet_resnet, 18),
    "resnet34": functools.partial(resnet.imagenet_resnet, 34),
    "resnet50": functools.partial(resnet.imagenet_resnet, 50),
    "resnet101": functools.partial(resnet.imagenet_resnet, 101),
}


def make_classifier(name: str, num_classes: int, **kwargs):
    """Returns the linen module registered under `name`.

    Args:
      name: a key of CLASSIFIERS.
      num_classes: size of the output layer.
      **kwargs: passed to the constructor (e.g. width).
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name](num_classes=num_classes, **kwargs)


def classifier_from_recipe(recipe, num_classes: int):
    """The linen module a classifier recipe (`configs.common.classifier_recipe`) names."""
    return make_classifier(
        recipe.model, num_classes, width=recipe.width, standardize_input=recipe.standardize_input
    )

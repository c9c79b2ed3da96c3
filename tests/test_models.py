"""Shapes and parameter counts of the registered classifiers."""

import jax
import jax.numpy as jnp
import pytest

from configs import common
from jaxclean.models import CLASSIFIERS, classifier_from_recipe, make_classifier
from jaxclean.models.resnet import standardize_per_image


def num_params(variables):
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet32"])
def test_cifar_resnet_shapes(name):
    model = make_classifier(name, num_classes=10)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
    logits = jax.eval_shape(model.apply, variables, jnp.zeros((2, 28, 28, 1)))
    assert logits.shape == (2, 10)
    assert "batch_stats" in variables


def test_resnet20_has_the_published_size():
    model = make_classifier("cifar_resnet20", num_classes=10)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    # He et al. report 0.27M parameters for ResNet-20 on CIFAR-10 (with projection shortcuts
    # where the width changes, as here).
    assert 0.26e6 < num_params(variables) < 0.29e6


@pytest.mark.parametrize(
    "name, low, high", [("resnet18", 11.0e6, 11.8e6), ("resnet50", 25.0e6, 26.0e6)]
)
def test_imagenet_resnet_sizes(name, low, high):
    model = make_classifier(name, num_classes=1000)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert low < num_params(variables) < high
    logits = jax.eval_shape(model.apply, variables, jnp.zeros((1, 224, 224, 3)))
    assert logits.shape == (1, 1000)


def test_registry_lists_paper_models_and_rejects_unknown():
    assert {"resnet18", "resnet50", "resnet101", "cifar_resnet20"} <= set(CLASSIFIERS)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        make_classifier("vgg", 10)


def test_batch_norm_statistics_update_only_in_training():
    model = make_classifier("cifar_resnet20", num_classes=10, width=4)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1)) * 3 + 2
    variables = model.init(jax.random.key(0), x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not jnp.allclose(a, b) for a, b in zip(before, after))


def test_output_modes_share_one_pass_and_bad_mode_is_named():
    model = make_classifier("cifar_resnet20", num_classes=10, width=4)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    logits = model.apply(variables, x)
    features = model.apply(variables, x, output="features")
    both_logits, both_features = model.apply(variables, x, output="both")
    assert features.shape == (3, 4 * 4)  # the third stage's width, pooled
    assert jnp.allclose(both_logits, logits) and jnp.allclose(both_features, features)
    dense = variables["params"]["Dense_0"]
    assert jnp.allclose(features @ dense["kernel"] + dense["bias"], logits, atol=1e-5)
    with pytest.raises(ValueError, match="output must be one of .* got 'pooled'"):
        model.apply(variables, x, output="pooled")


def test_a_standardising_classifier_cannot_see_contrast_or_black_level():
    # A blend 0.8 x + 0.2 p is mostly a contrast and black-level change of x: a classifier that
    # standardises its input answers the same to x and to any a x + b (a > 0), a plain one not.
    images = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1), minval=-1.0, maxval=1.0)
    washed_out = 0.6 * images - 0.3
    recipe = common.classifier_recipe(width=4, standardize_input=True)
    standardising = classifier_from_recipe(recipe, num_classes=10)
    variables = standardising.init(jax.random.key(0), images)
    assert jnp.allclose(
        standardising.apply(variables, images),
        standardising.apply(variables, washed_out),
        atol=1e-4,
    )
    plain = make_classifier("cifar_resnet20", num_classes=10, width=4)
    assert not jnp.allclose(
        plain.apply(variables, images), plain.apply(variables, washed_out), atol=1e-2
    )


def test_standardising_keeps_a_flat_image_finite_and_adds_no_parameters():
    flat = jnp.full((2, 4, 4, 3), 0.7)
    assert jnp.allclose(standardize_per_image(flat), 0.0, atol=1e-5)
    ramp = jnp.arange(16.0).reshape(1, 4, 4, 1)
    standardised = standardize_per_image(ramp)
    assert jnp.allclose(standardised.mean(), 0.0, atol=1e-6)
    assert jnp.allclose(standardised.std(), 1.0, atol=1e-5)
    # Off by default: the plain module, with the same parameter tree as the standardising one.
    old_recipe = common.classifier_recipe(width=4)
    assert old_recipe.standardize_input is False
    assert not classifier_from_recipe(old_recipe, 10).standardize_input
    on = classifier_from_recipe(common.classifier_recipe(width=4, standardize_input=True), 10)
    shapes = [
        jax.tree.map(jnp.shape, jax.eval_shape(model.init, jax.random.key(0), flat))
        for model in (classifier_from_recipe(old_recipe, 10), on)
    ]
    assert shapes[0] == shapes[1]

"""Shapes and parameter counts of the registered classifiers."""

import jax
import jax.numpy as jnp
import pytest

from jaxclean.models import CLASSIFIERS, make_classifier


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

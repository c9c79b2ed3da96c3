"""The trigger detector: pair splits, paired accuracy, and a detector that sees a real trace."""

import functools

import jax
import numpy as np
import pytest

from configs import common
from jaxclean import augment, detectability, sharding, steps, train
from jaxclean.models import classifier_from_recipe


def test_split_pairs_is_a_seeded_partition():
    fit, held = detectability.split_pairs(50, 0.2, seed=3)
    assert len(held) == 10 and len(fit) == 40
    np.testing.assert_array_equal(np.sort(np.concatenate([fit, held])), np.arange(50))
    again = detectability.split_pairs(50, 0.2, seed=3)
    np.testing.assert_array_equal(again[1], held)
    assert not np.array_equal(detectability.split_pairs(50, 0.2, seed=4)[1], held)
    with pytest.raises(ValueError, match="too few pairs"):
        detectability.split_pairs(2, 0.2, seed=0)
    with pytest.raises(ValueError, match="held_out 1.0"):
        detectability.split_pairs(50, 1.0, seed=0)


def test_paired_accuracy_counts_wins_and_half_the_ties():
    triggered = np.array([3.0, 2.0, 1.0, 5.0])
    clean = np.array([1.0, 2.0, 3.0, 4.0])
    assert detectability.paired_accuracy(triggered, clean) == pytest.approx((2 + 0.5) / 4)
    # A detector's bias moves every score alike and changes nothing.
    assert detectability.paired_accuracy(triggered + 10, clean + 10) == pytest.approx(2.5 / 4)
    same = np.full(7, 0.3)
    assert detectability.paired_accuracy(same, same) == 0.5
    with pytest.raises(ValueError, match="equal 1-d"):
        detectability.paired_accuracy(triggered, clean[:3])
    assert detectability.chance_standard_error(100) == pytest.approx(0.05)


def test_pair_dataset_labels_the_triggered_member_one():
    clean = np.zeros((3, 4, 4, 1), np.uint8)
    dataset = detectability.pair_dataset(clean + 9, clean)
    np.testing.assert_array_equal(dataset.labels, [0, 0, 0, 1, 1, 1])
    assert dataset.images[3:].min() == 9 and dataset.images[:3].max() == 0
    with pytest.raises(ValueError, match="unequal shapes"):
        detectability.pair_dataset(clean[:2], clean)


def _trained_detector(triggered, clean, tmp_path):
    """A width-4 ResNet trained on the pairs, as the diagnostics stage trains its detector."""
    recipe = common.classifier_recipe(
        width=4, num_epochs=8, lr_decay_epochs=(6,), batch_size=16, crop_padding=0
    )
    mesh = sharding.local_mesh()
    dataset = detectability.pair_dataset(triggered, clean)
    model = classifier_from_recipe(recipe, 2)
    tx, _ = train.make_optimizer(recipe, len(dataset) // recipe.batch_size)
    state = train.create_train_state(model, tx, dataset.image_shape, jax.random.key(0), mesh)
    step = train.jit_step(functools.partial(steps.train_step, augment=augment.Augment()), mesh)
    result = train.fit(
        state,
        step,
        dataset,
        batch_size=recipe.batch_size,
        num_epochs=recipe.num_epochs,
        seed=0,
        mesh=mesh,
        checkpoint_dir=str(tmp_path / "detector"),
    )
    predict_fn = train.make_predict_fn(model.apply, mesh)
    return lambda images: detectability.detector_scores(
        predict_fn, result.state.variables, images, 16, mesh
    )


@pytest.mark.slow
def test_detector_sees_a_fixed_trace_and_nothing_in_identical_pairs(tmp_path):
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 200, (160, 12, 12, 1), dtype=np.uint8)
    # A fixed trace: +48 grey levels on a 3x3 corner, within the images' own pixel spread, so
    # no single pixel gives it away.
    triggered = clean.copy()
    triggered[:, :3, :3] += 48
    fit, held = detectability.split_pairs(len(clean), 0.25, seed=0)
    scores = _trained_detector(triggered[fit], clean[fit], tmp_path)
    seen = detectability.paired_accuracy(scores(triggered[held]), scores(clean[held]))
    assert seen > 0.9
    # Pairs with nothing between them score alike: exactly chance.
    assert detectability.paired_accuracy(scores(clean[held]), scores(clean[held])) == 0.5

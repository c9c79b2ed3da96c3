"""The jitted steps: they learn, the KD loss is the formula, and devices do not change results."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, synthetic_images

from jaxclean import augment, sharding, steps, train
from jaxclean.models import make_classifier


def tiny_state(mesh, width=4, seed=0):
    model = make_classifier("cifar_resnet20", num_classes=10, width=width)
    return model, train.create_train_state(
        model, optax.adam(1e-2), (28, 28, 1), jax.random.key(seed), mesh
    )


def batch_of(images, labels, mesh):
    return sharding.to_global(
        {
            "image": images,
            "label": labels.astype(np.int32),
            "index": np.arange(len(labels), dtype=np.int32),
        },
        mesh,
    )


@pytest.mark.slow
def test_train_step_lowers_loss_on_a_tiny_set():
    mesh = sharding.make_mesh()
    _, state = tiny_state(mesh)
    images, labels = synthetic_images(32, seed=0)
    batch = batch_of(images[..., None], labels, mesh)
    step = train.jit_step(functools.partial(steps.train_step, augment=augment.Augment()), mesh)
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 25


def test_feature_invariance_is_zero_when_still_scale_free_and_two_when_unrelated():
    rng = np.random.default_rng(0)
    clean = jnp.asarray(rng.normal(size=(4096, 8)) * np.arange(1, 9), jnp.float32)
    moved = clean + 0.3 * jnp.asarray(rng.normal(size=clean.shape), jnp.float32)
    assert float(steps.feature_invariance(clean, clean)) == 0.0
    small = float(steps.feature_invariance(clean, moved))
    # Shrinking (or growing) the features does not meet it: only holding them still does.
    np.testing.assert_allclose(steps.feature_invariance(5 * clean, 5 * moved), small, rtol=1e-4)
    unrelated = jnp.asarray(rng.normal(size=clean.shape) * np.arange(1, 9), jnp.float32)
    np.testing.assert_allclose(steps.feature_invariance(clean, unrelated), 2.0, atol=0.1)
    assert 0.0 < small < 0.5 * float(steps.feature_invariance(clean, unrelated))


@pytest.mark.slow
def test_invariance_step_is_cross_entropy_plus_weighted_invariance_and_lowers_it():
    mesh = sharding.make_mesh()
    images, labels = synthetic_images(64, seed=0)
    batch = batch_of(images[..., None], labels, mesh)
    settings = augment.Augment(crop_padding=2)

    def step_fn(weight):
        return train.jit_step(
            functools.partial(steps.invariance_step, augment=settings, weight=weight), mesh
        )

    # Fresh states of the same seed: the step donates its state.
    _, plain = step_fn(0.0)(tiny_state(mesh)[1], batch, jax.random.key(0))
    _, weighted = step_fn(3.0)(tiny_state(mesh)[1], batch, jax.random.key(0))
    # The same state, batch and key: the same copies, so the same two terms.
    np.testing.assert_allclose(plain["cross_entropy"], weighted["cross_entropy"], rtol=1e-5)
    np.testing.assert_allclose(plain["loss"], plain["cross_entropy"], rtol=1e-6)
    np.testing.assert_allclose(
        weighted["loss"], weighted["cross_entropy"] + 3.0 * weighted["invariance"], rtol=1e-5
    )
    assert float(weighted["invariance"]) > 0.0  # The copy is corrupted: the features move.

    step, state = step_fn(10.0), tiny_state(mesh)[1]
    invariances = []
    for k in range(30):
        state, metrics = step(state, batch, jax.random.key(k))
        invariances.append(float(metrics["invariance"]))
    assert np.mean(invariances[-5:]) < 0.5 * np.mean(invariances[:5]), invariances


def test_kd_loss_matches_hand_computation_and_limits():
    student = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = jnp.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    labels = jnp.array([1, 2])
    alpha, temperature = 0.3, 4.0

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    kl = np.mean(
        [
            np.sum(
                softmax(t / temperature)
                * (np.log(softmax(t / temperature)) - np.log(softmax(s / temperature)))
            )
            for s, t in zip(np.asarray(student), np.asarray(teacher))
        ]
    )
    ce = np.mean([-np.log(softmax(s)[y]) for s, y in zip(np.asarray(student), [1, 2])])
    expected = alpha * temperature**2 * kl + (1 - alpha) * ce
    got = steps.distillation_loss(student, teacher, labels, alpha, temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # alpha = 0: plain cross-entropy; alpha = 1: pure distillation, zero when the two agree.
    np.testing.assert_allclose(
        steps.distillation_loss(student, teacher, labels, 0.0, temperature), ce, rtol=1e-5
    )
    np.testing.assert_allclose(
        steps.distillation_loss(student, student, labels, 1.0, temperature), 0.0, atol=1e-6
    )


def test_distill_step_pulls_student_toward_teacher():
    mesh = sharding.make_mesh()
    model, teacher = tiny_state(mesh, seed=1)
    _, student = tiny_state(mesh, seed=2)
    images, labels = synthetic_images(32, seed=3)
    batch = batch_of(images[..., None], labels, mesh)
    step_fn = functools.partial(
        steps.distill_step,
        teacher_apply=model.apply,
        augment=augment.Augment(),
        alpha=1.0,
        temperature=2.0,
    )
    step = train.jit_step(step_fn, mesh, num_static_args=1)
    teacher_vars = teacher.variables
    losses = []
    for _ in range(20):
        student, metrics = step(student, teacher_vars, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def one_step_distill_loss(mesh, batch, teacher_apply, rng, **step_settings) -> float:
    """The loss of one distillation step (alpha 0.5, T 2) of a fresh seed-2 student."""
    step_fn = functools.partial(
        steps.distill_step,
        teacher_apply=teacher_apply,
        augment=augment.Augment(),
        alpha=0.5,
        temperature=2.0,
        **step_settings,
    )
    # A fresh student each time: the jitted step donates the state it is given.
    _, fresh = tiny_state(mesh, seed=2)
    _, metrics = train.jit_step(step_fn, mesh, num_static_args=1)(fresh, {}, batch, rng)
    return float(metrics["loss"])


def test_teacher_prior_correction_is_the_log_ratio_of_the_two_label_priors():
    # The teacher's set: half class 0 (poisoned towards it), the trusted set balanced.
    teacher_labels = np.array([0] * 50 + [1] * 25 + [2] * 25)
    trusted_labels = np.array([0] * 10 + [1] * 10 + [2] * 10)
    offset = steps.teacher_prior_correction(teacher_labels, trusted_labels, 3)
    # Add-one smoothed: p_teacher = (51, 26, 26) / 103, p_trusted = (11, 11, 11) / 33.
    want = np.log(np.array([11, 11, 11]) / 33) - np.log(np.array([51, 26, 26]) / 103)
    np.testing.assert_allclose(offset, want, rtol=1e-6)
    assert offset[0] < 0 < offset[1]
    # A class absent from one split stays finite; equal priors give no correction.
    assert np.all(np.isfinite(steps.teacher_prior_correction([0, 0], [1, 1], 3)))
    np.testing.assert_allclose(steps.teacher_prior_correction(trusted_labels, trusted_labels, 3), 0)


@pytest.mark.slow
def test_teacher_logit_offset_shifts_only_the_soft_labels():
    mesh = sharding.make_mesh()
    images, labels = synthetic_images(16, seed=3)
    batch = batch_of(images[..., None], labels, mesh)
    offset = (-2.0, 1.0) + (0.0,) * 8

    def teacher_apply(variables, x, train):
        del variables, train
        return jnp.tile(jnp.linspace(-1.0, 1.0, 10), (len(x), 1))

    def step_loss(teacher_logit_offset):
        return one_step_distill_loss(
            mesh, batch, teacher_apply, jax.random.key(7), teacher_logit_offset=teacher_logit_offset
        )

    _, student = tiny_state(mesh, seed=2)
    logits, _ = student.apply_fn(
        student.variables,
        augment.normalize(jnp.asarray(images[..., None])),
        train=True,
        mutable=["batch_stats"],
    )
    shifted = teacher_apply(None, images, False) + jnp.asarray(offset)
    want = float(steps.distillation_loss(logits, shifted, jnp.asarray(labels), 0.5, 2.0))
    np.testing.assert_allclose(step_loss(offset), want, rtol=1e-4)
    assert abs(step_loss(offset) - step_loss(None)) > 1e-3


@pytest.mark.slow
def test_student_corruption_corrupts_only_the_students_copy():
    mesh = sharding.make_mesh()
    model, student = tiny_state(mesh, seed=2)
    images, labels = synthetic_images(16, seed=3)
    batch = batch_of(images[..., None], labels, mesh)
    rng = jax.random.key(7)

    # A teacher that answers to brightness and contrast, so clean and corrupted inputs differ.
    def teacher_apply(variables, x, train):
        del variables, train
        stats = jnp.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], -1)
        return 10.0 * jnp.concatenate([stats, -stats, jnp.zeros((len(x), 6))], -1)

    def step_loss(corruption):
        return one_step_distill_loss(mesh, batch, teacher_apply, rng, student_corruption=corruption)

    clean = augment.normalize(jnp.asarray(images[..., None]))
    keys = augment.sample_keys(rng, jnp.arange(len(labels)))
    # Written out rather than through augment.corrupt_images, so the step is checked against an
    # independent per-image draw from the student's stream.
    student_stream = augment.STUDENT_CORRUPTION_STREAM
    corrupted = jax.vmap(
        lambda x, k: augment.corrupt_image(x, jax.random.fold_in(k, student_stream), 1.0)
    )(clean, keys)
    assert np.all(np.any(np.asarray(corrupted != clean), axis=(1, 2, 3)))

    def expected(student_input, teacher_input):
        logits, _ = student.apply_fn(
            student.variables, student_input, train=True, mutable=["batch_stats"]
        )
        teacher_logits = teacher_apply(None, teacher_input, False)
        return float(steps.distillation_loss(logits, teacher_logits, jnp.asarray(labels), 0.5, 2.0))

    want = {
        "corrupted_vs_clean": expected(corrupted, clean),
        "corrupted_vs_corrupted": expected(corrupted, corrupted),
        "clean_vs_clean": expected(clean, clean),
    }
    # The student learns from the corrupted copy what the teacher says of the clean image.
    got = step_loss(1.0)
    np.testing.assert_allclose(got, want["corrupted_vs_clean"], rtol=1e-4)
    assert abs(got - want["corrupted_vs_corrupted"]) > 1e-3
    np.testing.assert_allclose(step_loss(0.0), want["clean_vs_clean"], rtol=1e-4)


def test_augmentation_is_per_sample_and_batch_independent():
    images = jnp.arange(2 * 6 * 6, dtype=jnp.float32).reshape(2, 6, 6, 1)
    keys = augment.sample_keys(jax.random.key(0), jnp.array([10, 11]))
    settings = augment.Augment(crop_padding=2, flip=True)
    both = augment.augment_images(images, keys, settings)
    second_alone = augment.augment_images(images[1:], keys[1:], settings)
    np.testing.assert_array_equal(both[1], second_alone[0])
    # A crop keeps 6x6 pixels; values either come from the image or are padding (-1).
    assert both.shape == images.shape
    assert set(np.unique(both)).issubset(set(np.unique(images)) | {-1.0})


def test_corruption_changes_only_the_chosen_images_and_leaves_crops_alone():
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (64, 8, 8, 1)), jnp.float32)
    keys = augment.sample_keys(jax.random.key(0), jnp.arange(64))
    plain = augment.augment_images(images, keys, augment.Augment(crop_padding=2))
    half = augment.augment_images(images, keys, augment.Augment(crop_padding=2, corruption=0.5))
    changed = np.any(np.asarray(plain != half), axis=(1, 2, 3))
    # About half are corrupted; the rest keep exactly the crop they had without corruption.
    assert 16 <= changed.sum() <= 48, changed.sum()
    assert np.all(np.abs(np.asarray(half)) <= 1.0)
    always = augment.augment_images(images, keys, augment.Augment(corruption=1.0))
    assert np.all(np.any(np.asarray(always != images), axis=(1, 2, 3)))
    # A corruption lowers the contrast (towards a flat level) more than its noise adds back.
    spread = lambda x: np.asarray(x).std(axis=(1, 2, 3))  # noqa: E731
    assert np.mean(spread(always)) < np.mean(spread(images))


def test_corruption_without_noise_is_the_same_contrast_and_level_change_only():
    images = jnp.asarray(np.random.default_rng(1).uniform(-0.5, 0.5, (32, 8, 8, 1)), jnp.float32)
    keys = augment.sample_keys(jax.random.key(2), jnp.arange(32))
    noisy = augment.augment_images(images, keys, augment.Augment(corruption=1.0))
    flat = augment.augment_images(
        images, keys, augment.Augment(corruption=1.0, corruption_noise=0.0)
    )
    x, y = np.asarray(images).reshape(32, -1), np.asarray(flat).reshape(32, -1)
    # Each image is mapped by one affine function c * x + (1 - c) * b, so a least-squares line
    # through its pixels fits exactly, with a contrast c in [0.5, 1] (inputs in [-0.5, 0.5] stay
    # inside [-1, 1] under it, so nothing is clipped).
    for xi, yi in zip(x, y):
        slope, intercept = np.polyfit(xi, yi, 1)
        assert 0.5 <= slope <= 1.0
        np.testing.assert_allclose(slope * xi + intercept, yi, atol=1e-5)
    # The noisy corruption is the same contrast and level plus pixel noise: their difference
    # averages out (zero-mean noise) and is not zero.
    residual = np.asarray(noisy).reshape(32, -1) - y
    assert np.abs(residual).max() > 1e-3
    assert abs(residual.mean()) < 0.01


def test_corrupt_images_draws_each_image_from_its_own_key_and_stream():
    images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (16, 8, 8, 1)), jnp.float32)
    keys = augment.sample_keys(jax.random.key(5), jnp.arange(16))
    stream = augment.STUDENT_CORRUPTION_STREAM
    out = np.asarray(augment.corrupt_images(images, keys, stream, 1.0))
    # Image i is corrupt_image of it under its key folded with the stream, whatever the batch:
    # the same images in reverse order give the same corruptions, reversed.
    for i in (0, 7, 15):
        one = augment.corrupt_image(images[i], jax.random.fold_in(keys[i], stream), 1.0)
        np.testing.assert_allclose(out[i], np.asarray(one), atol=1e-6)
    reversed_out = augment.corrupt_images(images[::-1], keys[::-1], stream, 1.0)
    np.testing.assert_allclose(np.asarray(reversed_out)[::-1], out, atol=1e-6)
    # Another stream draws other corruptions from the same keys; probability 0 is the identity.
    other = np.asarray(augment.corrupt_images(images, keys, augment.INVARIANCE_COPY_STREAM, 1.0))
    assert np.all(np.any(other != out, axis=(1, 2, 3)))
    np.testing.assert_array_equal(
        np.asarray(augment.corrupt_images(images, keys, stream, 0.0)), np.asarray(images)
    )
    assert np.abs(out).max() <= 1.0


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = train.epoch_order(100, seed=0, epoch=3)
    np.testing.assert_array_equal(a, train.epoch_order(100, seed=0, epoch=3))
    assert not np.array_equal(a, train.epoch_order(100, seed=0, epoch=4))
    assert sorted(a.tolist()) == list(range(100))


DEVICE_SCRIPT = """
import functools, json, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import jax, numpy as np, optax
from conftest import synthetic_images
from jaxclean import augment, sharding, steps, train
from jaxclean.models import make_classifier
mesh = sharding.make_mesh()
model = make_classifier("cifar_resnet20", num_classes=10, width=4)
state = train.create_train_state(model, optax.adam(1e-3), (28, 28, 1), jax.random.key(0), mesh)
images, labels = synthetic_images(16, seed=0)
batch = sharding.to_global({{"image": images[..., None], "label": labels.astype(np.int32),
                            "index": np.arange(16, dtype=np.int32)}}, mesh)
step = train.jit_step(functools.partial(steps.train_step,
                      augment=augment.Augment(crop_padding=2, flip=True)), mesh)
losses = []
for _ in range(3):
    state, metrics = step(state, batch, jax.random.key(5))
    losses.append(float(metrics["loss"]))
leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(state.params)]
print(json.dumps({{"devices": jax.device_count(), "losses": losses,
                  "params": np.concatenate(leaves)[:2000].tolist()}}))
"""


def run_on_devices(devices: int) -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    script = DEVICE_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests"))
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_one_and_four_devices_give_the_same_training():
    one, four = run_on_devices(1), run_on_devices(4)
    assert (one["devices"], four["devices"]) == (1, 4)
    np.testing.assert_allclose(one["losses"], four["losses"], rtol=1e-5)
    np.testing.assert_allclose(one["params"], four["params"], rtol=1e-4, atol=1e-6)

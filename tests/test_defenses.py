"""The field's defenses: each step on tiny data moves its loss the way it should, ABL isolates
what is trivially separable, ANP prunes only the masked channels, and the stages refuse bad
settings and resume after a kill."""

import functools
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_launch, smoke_args, smoke_config, synthetic_images

from configs import common
from jaxclean import augment, checkpointing, pipeline, sharding, steps, train
from jaxclean.defenses import abl, anp, nad
from jaxclean.models import make_classifier


def tiny_state(mesh, seed=0, learning_rate=1e-2):
    model = make_classifier("cifar_resnet20", num_classes=10, width=4)
    state = train.create_train_state(
        model, optax.sgd(learning_rate, momentum=0.9), (28, 28, 1), jax.random.key(seed), mesh
    )
    return model, state


def batch_of(images, labels, mesh):
    local = {
        "image": images,
        "label": labels.astype(np.int32),
        "index": np.arange(len(labels), dtype=np.int32),
    }
    return sharding.to_global(local, mesh)


def test_attention_maps_are_normalised_and_the_loss_is_zero_only_when_they_agree():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(3, 4, 4, 5)), jnp.float32)
    maps = nad.attention_map(a, 2.0)
    assert maps.shape == (3, 16)
    np.testing.assert_allclose(jnp.linalg.norm(maps, axis=1), 1.0, rtol=1e-5)
    # Scaling the activations does not change the map.
    np.testing.assert_allclose(nad.attention_map(3 * a, 2.0), maps, rtol=1e-5)
    assert float(nad.attention_loss((a,), (a,), (100.0,), 2.0)) == 0.0
    b = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
    assert float(nad.attention_loss((a,), (b,), (100.0,), 2.0)) > 0.0


@pytest.mark.slow
def test_nad_step_pulls_the_attention_to_the_teachers():
    mesh = sharding.make_mesh()
    images, labels = synthetic_images(64, seed=0)
    batch = batch_of(images[..., None], labels, mesh)
    model, teacher_state = tiny_state(mesh, seed=1)
    _, state = tiny_state(mesh, seed=2)
    teacher = jax.device_put(teacher_state.variables, sharding.replicated(mesh))
    step = train.jit_step(
        functools.partial(
            nad.nad_step,
            teacher_apply=model.apply,
            augment=augment.Augment(),
            betas=(500.0, 1000.0, 1000.0),
            power=2.0,
        ),
        mesh,
        num_static_args=1,
    )
    losses = []
    for _ in range(15):
        state, metrics = step(state, teacher, batch, jax.random.key(0))
        losses.append(float(metrics["attention_loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_flooding_descends_above_the_flood_and_ascends_below():
    grad = jax.grad(lambda x: abl.flooded(x, 0.5))
    assert float(grad(2.0)) == 1.0 and float(grad(0.1)) == -1.0
    assert float(abl.flooded(jnp.asarray(0.1), 0.5)) == pytest.approx(0.9)


@pytest.mark.slow
def test_abl_isolates_the_samples_learnt_first_and_unlearning_raises_their_loss():
    """On a toy set where the clean rows are noise under random labels (slow to fit) and the
    poisoned rows carry a blatant patch and the target label, the flooded model fits the
    poisoned rows first: the lowest losses are theirs."""
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(3)
    images = rng.integers(0, 60, (256, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 256).astype(np.int32)
    poisoned = np.arange(0, 256, 16)  # 16 rows.
    images[poisoned, :6, :6] = 255
    labels[poisoned] = 0
    model, state = tiny_state(mesh, learning_rate=5e-2)
    step = train.jit_step(
        functools.partial(abl.isolation_step, augment=augment.Augment(), flood=0.5), mesh
    )
    order = np.random.default_rng(0)
    for epoch in range(6):
        for rows in np.array_split(order.permutation(256), 8):
            state, _ = step(
                state, batch_of(images[rows], labels[rows], mesh), jax.random.key(epoch)
            )
    losses = abl.per_sample_losses(model.apply, state.variables, images, labels, 64, mesh)
    isolated = abl.isolate(losses, 16 / 256)
    assert np.isin(isolated, poisoned).mean() >= 0.75, (isolated, poisoned)
    # Gradient ascent on the isolated rows raises their loss.
    unlearn = train.jit_step(
        functools.partial(abl.unlearning_step, augment=augment.Augment()), mesh
    )
    before = losses[isolated].mean()
    for _ in range(5):
        state, metrics = unlearn(
            state, batch_of(images[isolated], labels[isolated], mesh), jax.random.key(9)
        )
        assert float(metrics["loss"]) == pytest.approx(-float(metrics["cross_entropy"]))
    after = abl.per_sample_losses(model.apply, state.variables, images, labels, 64, mesh)
    assert after[isolated].mean() > before


def test_isolate_takes_the_lowest_share():
    losses = np.array([0.5, 0.1, 0.9, 0.05, 0.3])
    np.testing.assert_array_equal(abl.isolate(losses, 0.4), [1, 3])


def masked_scale(params, key):
    node = params
    for part in key.split("/"):
        node = node[part]
    return np.asarray(node["scale"])


def test_anp_masks_cover_every_batch_norm_channel_and_pruning_touches_only_the_masked():
    mesh = sharding.make_mesh()
    model, state = tiny_state(mesh)
    params = jax.device_get(state.params)
    masks = anp.neuron_masks(params)
    scales = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0] if "scale" in str(p)]
    assert len(masks) == len(anp.batch_norm_paths(params)) == len(scales) >= 19
    # All ones: the masked parameters are the parameters.
    same = anp.masked_params(params, masks)
    jax.tree.map(np.testing.assert_array_equal, same, params)
    # A layer whose scale is not zero (a block's last batch norm starts at zero).
    key = next(k for k in sorted(masks) if float(masked_scale(params, k)[1]) != 0.0)
    lowered = dict(masks)
    lowered[key] = masks[key].at[1].set(0.1)
    pruned = anp.pruned_params(params, lowered, threshold=0.2)
    flat, flat_pruned = (dict(jax.tree_util.tree_flatten_with_path(p)[0]) for p in (params, pruned))
    changed = [path for path in flat if not np.array_equal(flat[path], flat_pruned[path])]
    assert len(changed) == 1 and "scale" in jax.tree_util.keystr(changed[0])
    scale = flat_pruned[changed[0]]
    assert float(scale[1]) == 0.0
    np.testing.assert_array_equal(np.delete(scale, 1), np.delete(flat[changed[0]], 1))


@pytest.mark.slow
def test_anp_step_keeps_masks_in_range_and_lowers_its_objective():
    mesh = sharding.make_mesh()
    images, labels = synthetic_images(64, seed=0)
    batch = batch_of(images[..., None], labels, mesh)
    model, trained = tiny_state(mesh, learning_rate=5e-2)
    fit = train.jit_step(functools.partial(steps.train_step, augment=augment.Augment()), mesh)
    for i in range(20):
        trained, _ = fit(trained, batch, jax.random.key(i))
    variables = jax.device_put(trained.variables, sharding.replicated(mesh))
    state = anp.ANPState.create(anp.neuron_masks(trained.params), 0.2)
    step = train.jit_step(
        functools.partial(anp.anp_step, apply_fn=model.apply, eps=0.4, steps=1, alpha=0.2),
        mesh,
        num_static_args=1,
    )
    objectives = []
    for i in range(25):
        state, metrics = step(state, variables, batch, jax.random.key(i))
        objectives.append(float(metrics["loss"]))
    masks = jax.tree.leaves(state.masks)
    assert all(float(m.min()) >= 0.0 and float(m.max()) <= 1.0 for m in masks)
    assert np.mean(objectives[-5:]) < np.mean(objectives[:5])
    # The perturbation hurts: the perturbed loss is above the natural one.
    assert float(metrics["perturbed_loss"]) > float(metrics["natural_loss"])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: setattr(d, "clean_data", "poisoned"), "defenses.clean_data 'poisoned'"),
        (lambda d: setattr(d, "clean_fraction", 0.0), r"clean_fraction 0.0 must be in \(0, 1\]"),
        (lambda d: setattr(d.ft, "lr_schedule", "linear"), "defenses.ft.lr_schedule 'linear'"),
        (lambda d: setattr(d.ft, "width", 32), "differ from the teacher's"),
        (lambda d: setattr(d.nad, "betas", (-1.0,)), "betas"),
        (lambda d: setattr(d.anp, "eps", 0.0), "defenses.anp.eps 0.0"),
        (lambda d: setattr(d.anp, "thresholds", (1.5,)), "thresholds"),
        (lambda d: setattr(d.abl, "isolation_ratio", 0.0), "isolation_ratio 0.0"),
        (lambda d: setattr(d.abl.unlearning, "num_epochs", 0), "unlearning.num_epochs"),
    ],
)
def test_bad_defense_settings_are_refused_before_any_work(idx_dir, tmp_path, mutate, message):
    config = smoke_config(idx_dir)
    mutate(config.defenses)
    with pytest.raises(pipeline.ConfigError, match=message):
        pipeline.run(config, str(tmp_path / "run"), "ft")
    assert not (tmp_path / "run").exists()


def test_clean_data_is_the_trusted_split_or_a_balanced_share_of_it(idx_dir, tmp_path):
    from jaxclean.experiment import Experiment
    from jaxclean.stages import defenses

    config = smoke_config(idx_dir)
    exp = Experiment(config, str(tmp_path))
    assert defenses.clean_data(exp).fingerprint() == exp.splits.trusted.fingerprint()
    config.defenses.clean_data = "fraction"
    config.defenses.clean_fraction = 0.125  # 20 of the 160 training images' size.
    share = defenses.clean_data(exp)
    assert len(share) == 20 and np.bincount(share.labels, minlength=10).max() == 2
    trusted_rows = {image.tobytes() for image in exp.splits.trusted.images}
    assert all(image.tobytes() in trusted_rows for image in share.images)


def test_defense_recipes_follow_the_teacher():
    config = common.fashion_mnist_config(common.badnets_attack())
    for recipe in (config.defenses.ft, config.defenses.nad.recipe, config.defenses.abl.isolation):
        assert (
            (recipe.model, recipe.width)
            == (config.teacher.model, config.teacher.width)
            == (
                "cifar_resnet20",
                8,
            )
        )
    assert config.defenses.ft.lr_schedule == "cosine"


@pytest.mark.slow
def test_every_defense_runs_as_a_stage_and_abl_resumes_after_a_kill(run_copy, idx_dir):
    # The smoke run ran every defense as a stage; its report has a row for each.
    table = open(os.path.join(run_copy, "report", "results.md")).read()
    for name in ("ft", "nad", "anp", "abl"):
        assert f"| {name} |" in table, name
    assert "threshold" in open(os.path.join(run_copy, "anp", "done.json")).read()
    # The smoke config checkpoints ABL's fine-tuning every step; a save waits for the one
    # before, so a kill at step 3 of 4 leaves step 2 saved.
    expected = checkpointing.load_tree(os.path.join(run_copy, "abl", "model"))
    shutil.rmtree(os.path.join(run_copy, "abl"))
    killed = run_launch(
        smoke_args(run_copy, idx_dir, "--stages=abl"), env={"JAXCLEAN_KILL_AT": "abl finetuning:3"}
    )
    assert killed.returncode == -9
    resumed = run_launch(smoke_args(run_copy, idx_dir, "--stages=abl,report"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"abl finetuning: resuming from step [23] of 4", resumed.stdout)
    got = checkpointing.load_tree(os.path.join(run_copy, "abl", "model"))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

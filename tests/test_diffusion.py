"""Diffusion pieces: DDIM against diffusers' scheduler, SDEdit strength, colour transfer, the
generator's train steps, and the errors for bad sampler settings and checkpoints."""

import functools
import json
import os
import subprocess
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, synthetic_images

from configs import smoke
from jaxclean import checkpointing, sharding, train
from jaxclean.checks import ConfigError
from jaxclean.data import ImageDataset
from jaxclean.diffusion import adapter, generator, sampler, trainer
from jaxclean.diffusion.postprocess import Postprocess
from jaxclean.stages import generator as generator_stage
from jaxclean.stages import regenerate as regenerate_stage


def test_ddim_matches_diffusers_flax_scheduler():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import FlaxDDIMScheduler

    scheduler = FlaxDDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=True,
        clip_sample=False,
    )  # Latents are not in [-1, 1].
    state = scheduler.set_timesteps(scheduler.create_state(), 10)
    timesteps, previous = sampler.ddim_timesteps(1000, 10, 1.0)
    np.testing.assert_array_equal(timesteps, np.asarray(state.timesteps))
    alphas = adapter.alphas_cumprod(1000, "scaled_linear")
    np.testing.assert_allclose(alphas, np.asarray(state.common.alphas_cumprod), rtol=1e-6)
    latents = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    for t, prev in zip(timesteps, previous):
        noise_pred = jax.random.normal(jax.random.fold_in(jax.random.key(1), int(t)), latents.shape)
        expected = scheduler.step(state, noise_pred, int(t), latents).prev_sample
        alpha_prev = alphas[prev] if prev >= 0 else 1.0
        got = sampler.ddim_update(latents, noise_pred, alphas[t], alpha_prev, 0.0, 0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        latents = expected


def test_strength_runs_only_the_last_part_of_the_schedule():
    full, _ = sampler.ddim_timesteps(1000, 20, 1.0)
    partial, previous = sampler.ddim_timesteps(1000, 20, 0.3)
    assert len(full) == 20 and len(partial) == 6
    np.testing.assert_array_equal(partial, full[-6:])
    assert previous[-1] < 0


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(steps=0), "steps must be at least 1"),
        (dict(strength=0.0), r"strength 0.0 must be in \(0, 1\]"),
        (dict(strength=1.5), r"strength 1.5"),
        (dict(guidance=0.5), "guidance"),
        (dict(eta=-1.0), "eta"),
        (dict(condition_corruption=1.5), r"condition_corruption 1.5 must be in \[0, 1\]"),
        (dict(condition_neighbours=-1), "condition_neighbours -1 must be >= 0"),
        (dict(neighbours_same_label=True), "neighbours_same_label needs condition_neighbours"),
    ],
)
def test_bad_sampler_settings(settings, message):
    with pytest.raises(sampler.SamplerError, match=message):
        sampler.SamplerSettings(**settings)


def test_black_level_clears_dark_pixels_only_and_composes():
    pixels = np.asarray([[0, 5, 15, 16, 17, 200]], np.uint8)
    level16, level6 = Postprocess(black_level=16), Postprocess(black_level=6)
    np.testing.assert_array_equal(level16(pixels), [[0, 0, 0, 16, 17, 200]])
    np.testing.assert_array_equal(Postprocess()(pixels), pixels)
    np.testing.assert_array_equal(level16(level6(pixels)), level16(pixels))
    # A higher level covers a lower one (reapplied, it gives its own output); not the reverse.
    assert level16.covers(level6) and level16.covers(level16) and not level6.covers(level16)
    with pytest.raises(ConfigError, match=r"black_level 256 must be in \[0, 255\]"):
        Postprocess(black_level=256)


def test_colour_transfer_matches_source_statistics():
    rng = np.random.default_rng(0)
    variation = jnp.asarray(rng.normal(0.3, 0.1, (2, 8, 8, 3)), jnp.float32)
    source = jnp.asarray(rng.normal(-0.2, 0.5, (2, 8, 8, 3)), jnp.float32)
    out = sampler.color_transfer(variation, source)
    np.testing.assert_allclose(out.mean((1, 2)), source.mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(out.std((1, 2)), source.std((1, 2)), rtol=1e-3)


def tiny_model(condition="embedding"):
    config = smoke.get_config().generator
    config.condition = condition
    return generator.build(config, (28, 28, 1), 10)


@pytest.mark.slow
def test_condition_corruption_changes_only_what_the_encoder_reads():
    """Each source's corrupted copy comes from its own key (not its batch), the pixels and
    noise of the variation are those of a run without the option, and it reaches the output
    only through the condition."""
    images, labels = synthetic_images(6, seed=1)
    images, labels = images[..., None], labels.astype(np.int32)
    keys = sampler.sample_keys(jax.random.key(4), jnp.arange(6))
    copies = np.asarray(sampler.corrupt_sources(images, keys, 1.0))
    assert copies.dtype == np.uint8 and copies.shape == images.shape
    assert all(not np.array_equal(c, x) for c, x in zip(copies, images))
    alone = np.asarray(sampler.corrupt_sources(images[3:4], keys[3:4], 1.0))
    np.testing.assert_array_equal(alone, copies[3:4])
    np.testing.assert_array_equal(sampler.corrupt_sources(images, keys, 0.0), images)

    mesh = sharding.make_mesh()
    indices = np.arange(6, dtype=np.int32)

    def vary(model, condition_corruption):
        params = trainer.random_params(model, jax.random.key(0))
        settings = sampler.SamplerSettings(
            steps=3, guidance=2.0, condition_corruption=condition_corruption
        )
        sample = sampler.make_sampler(model, settings, mesh)
        return np.asarray(sample(params, images, indices, labels, jax.random.key(4)))

    embedding_model = tiny_model("embedding")
    plain, smoothed = vary(embedding_model, 0.0), vary(embedding_model, 1.0)
    assert np.abs(plain.astype(int) - smoothed).max() > 0  # The condition moved.
    label_model = tiny_model("label")  # Reads no embedding: the option cannot reach it.
    np.testing.assert_array_equal(vary(label_model, 1.0), vary(label_model, 0.0))


def test_nearest_conditions_are_means_of_the_nearest_codebook_rows():
    codebook = np.asarray([[0.0, 0.0], [1.0, 0.0], [0.0, 4.0], [5.0, 5.0]], np.float32)
    codebook_labels = np.asarray([0, 1, 1, 0], np.int32)
    context = np.asarray([[[0.9, 0.2]], [[4.0, 4.5]]], np.float32)  # [B, T=1, D].
    labels = np.asarray([0, 1], np.int32)

    def nearest(k, same_label):
        return np.asarray(
            sampler.nearest_conditions(context, labels, codebook, codebook_labels, k, same_label)
        )

    np.testing.assert_array_equal(nearest(1, False), [[[1.0, 0.0]], [[5.0, 5.0]]])
    np.testing.assert_array_equal(nearest(2, False), [[[0.5, 0.0]], [[2.5, 4.5]]])
    # Among their own label's rows only: row 0 may not take row 1, row 1 not row 3.
    np.testing.assert_array_equal(nearest(1, True), [[[0.0, 0.0]], [[0.0, 4.0]]])


def test_regenerate_spec_names_the_neighbour_options_only_when_on():
    """Variations recorded before the options existed keep their spec while they are off."""
    settings = smoke.get_config().regenerate
    off = regenerate_stage.spec_settings(settings)
    assert "condition_neighbours" not in off and "neighbours_same_label" not in off
    assert off == {k: v for k, v in settings.to_dict().items() if k in off}
    settings.condition_neighbours = 3
    settings.neighbours_same_label = True
    on = regenerate_stage.spec_settings(settings)
    assert on["condition_neighbours"] == 3 and on["neighbours_same_label"] is True


def test_same_label_neighbours_are_refused_beyond_the_rarest_trusted_label():
    labels = np.asarray([0, 0, 0, 1, 1], np.int32)  # Label 1 has two trusted images.
    trusted = ImageDataset(np.zeros((5, 4, 4, 1), np.uint8), labels, ("a", "b"))
    config = smoke.get_config()
    config.regenerate.neighbours_same_label = True
    exp = types.SimpleNamespace(config=config, splits=types.SimpleNamespace(trusted=trusted))
    config.regenerate.condition_neighbours = 2
    regenerate_stage._check_same_label_neighbours(exp)
    config.regenerate.condition_neighbours = 3
    with pytest.raises(ConfigError, match="exceeds the 2 trusted images of the rarest label"):
        regenerate_stage._check_same_label_neighbours(exp)


@pytest.mark.slow
def test_condition_neighbours_let_the_source_choose_only_among_trusted_conditions():
    """With one trusted condition to choose from, a triggered source gets exactly its clean
    twin's variation, and any other source's of the same key; with one per label, the row's
    label alone decides. Without the option the overlay reaches the output."""
    images, labels = synthetic_images(6, seed=2)
    images, labels = images[..., None], (np.arange(6) % 2).astype(np.int32)
    triggered = np.clip(images.astype(int) + 40, 0, 255).astype(np.uint8)
    trusted, _ = synthetic_images(2, seed=3)
    model = tiny_model("embedding")
    params = trainer.random_params(model, jax.random.key(0))
    mesh = sharding.make_mesh()
    same_key = np.zeros(6, np.int32)  # One index, so every row draws the same noise.

    samplers = {
        (neighbours, same_label): sampler.make_sampler(
            model,
            sampler.SamplerSettings(
                steps=2,
                guidance=2.0,
                color_transfer=False,  # It would give each variation its source's statistics.
                condition_neighbours=neighbours,
                neighbours_same_label=same_label,
            ),
            mesh,
        )
        for neighbours, same_label in ((0, False), (1, False), (1, True))
    }

    def vary(sources, neighbours=0, codebook_size=1, same_label=False):
        codebook = sampler.condition_codebook(
            model, params, trusted[:codebook_size, ..., None], np.arange(2, dtype=np.int32), 8
        )
        assert codebook["condition_codebook"].shape == (codebook_size, model.embed_dim)
        sample = samplers[neighbours, same_label]
        out = sample({**params, **codebook}, sources, same_key, labels, jax.random.key(1))
        return np.asarray(out).astype(int)

    one = vary(triggered, neighbours=1)
    np.testing.assert_array_equal(one, vary(images, neighbours=1))
    assert all(np.array_equal(row, one[0]) for row in one)
    by_label = vary(triggered, neighbours=1, codebook_size=2, same_label=True)
    np.testing.assert_array_equal(by_label[0::2], np.repeat(by_label[:1], 3, 0))
    np.testing.assert_array_equal(by_label[1::2], np.repeat(by_label[1:2], 3, 0))
    assert np.abs(by_label[0] - by_label[1]).max() > 0
    plain = vary(images)
    assert np.abs(vary(triggered) - plain).max() > 0
    assert np.abs(plain[0] - plain[2]).max() > 0  # Plain, each source its own variation.


@pytest.mark.slow
def test_generator_train_steps_lower_their_losses():
    model = tiny_model()
    mesh = sharding.make_mesh()
    images, labels = synthetic_images(16, seed=0)
    batch = sharding.to_global(
        {
            "image": images[..., None],
            "label": labels.astype(np.int32),
            "index": np.arange(16, dtype=np.int32),
        },
        mesh,
    )
    params = trainer.random_params(model, jax.random.key(0))
    vae_state = generator.EMATrainState.create(params["vae"], optax.adam(3e-3))
    vae_step = train.jit_step(
        functools.partial(generator.vae_train_step, model=model, kl_weight=1e-6, ema_decay=0.9),
        mesh,
    )
    vae_losses = []
    for _ in range(12):
        vae_state, metrics = vae_step(vae_state, batch, jax.random.key(0))
        vae_losses.append(float(metrics["loss"]))
    assert vae_losses[-1] < 0.7 * vae_losses[0], vae_losses
    # EMA trails the weights: after training it differs from both init and the weights.
    leaf = lambda tree: jax.tree.leaves(tree)[0]  # noqa: E731
    assert not np.allclose(leaf(vae_state.ema_params), leaf(vae_state.params))

    latents = np.asarray(jax.random.normal(jax.random.key(1), (16, *model.latent_shape)))
    fields = {
        "latent_mean": latents,
        "latent_std": np.full_like(latents, 0.01),
        "embedding": np.eye(16, model.embed_dim, dtype=np.float32),
        "label": labels.astype(np.int32),
        "index": np.arange(16, dtype=np.int32),
    }
    denoiser_params = {"unet": params["unet"], "label_table": params["label_table"]}
    state = generator.EMATrainState.create(denoiser_params, optax.adam(3e-3))
    step = train.jit_step(
        functools.partial(
            generator.denoiser_train_step, model=model, cond_dropout=0.1, ema_decay=0.9
        ),
        mesh,
    )
    global_fields = sharding.to_global(fields, mesh)
    losses = []
    for _ in range(30):
        # A fixed key: the same timesteps and noise each step, so the loss is comparable.
        state, metrics = step(state, global_fields, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_label_condition_adds_a_token_and_null_rows_differ():
    config = smoke.get_config().generator
    config.condition = "embedding+label"
    model = generator.build(config, (28, 28, 1), 10)
    table = jnp.arange(11 * model.embed_dim, dtype=jnp.float32).reshape(11, model.embed_dim)
    embedding = jnp.ones((2, model.embed_dim))
    context = model.context(table, embedding, jnp.array([3, 4]), jnp.array([False, True]))
    assert context.shape == (2, 2, model.embed_dim)
    np.testing.assert_array_equal(context[1, 0], 0.0)  # Dropped embedding: the zero token.
    np.testing.assert_array_equal(context[1, 1], table[10])  # Dropped label: the null row.
    np.testing.assert_array_equal(context[0, 1], table[3])


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    model = tiny_model()
    config = smoke.get_config().generator
    config.unet.block_out_channels = (32, 64)
    other = generator.build(config, (28, 28, 1), 10)
    path = os.path.join(tmp_path, "model")
    checkpointing.save_tree(path, jax.device_get(trainer.random_params(other, jax.random.key(0))))
    with pytest.raises(ConfigError, match="another architecture"):
        generator_stage.load_generator_params(model, path)
    with pytest.raises(ConfigError, match="no generator checkpoint"):
        generator_stage.load_generator_params(model, os.path.join(tmp_path, "missing"))
    assert generator_stage.load_generator_params(other, path)["latent_scale"] == 1.0


def test_generator_widths_must_suit_group_norm():
    config = smoke.get_config().generator
    config.unet.block_out_channels = (32, 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        generator.build(config, (28, 28, 1), 10)


@pytest.mark.slow
def test_denoiser_can_be_conditioned_on_corrupted_sources():
    """With condition_corruption 1 every sample reads one of its corrupted copies' embeddings; with
    0 the step is the plain one, whatever copies the batch carries."""
    model = tiny_model()
    mesh = sharding.make_mesh()
    params = trainer.random_params(model, jax.random.key(0))
    images, labels = synthetic_images(8, seed=0)
    dataset = ImageDataset(images[..., None], labels.astype(np.int32), tuple("0123456789"))
    encoded = trainer.encode_dataset(model, params, dataset, 8, mesh, corrupted_copies=3, seed=5)
    corrupted = encoded["corrupted_features"]
    assert corrupted.shape == (8, 3, encoded["features"].shape[1])
    # Each copy is its own corruption, and none is the clean image's embedding.
    assert not np.allclose(corrupted[:, 0], corrupted[:, 1])
    assert not np.allclose(corrupted[:, 0], encoded["features"])
    again = trainer.encode_dataset(model, params, dataset, 4, mesh, corrupted_copies=3, seed=5)
    np.testing.assert_allclose(again["corrupted_features"], corrupted, rtol=1e-5, atol=1e-5)

    latents = np.asarray(jax.random.normal(jax.random.key(1), (8, *model.latent_shape)))
    fields = {
        "latent_mean": latents,
        "latent_std": np.full_like(latents, 0.01),
        "embedding": encoded["features"],
        "corrupted_embedding": corrupted,
        "label": labels.astype(np.int32),
        "index": np.arange(8, dtype=np.int32),
    }
    denoiser_params = {"unet": params["unet"], "label_table": params["label_table"]}

    def loss(batch, condition_corruption):
        state = generator.EMATrainState.create(denoiser_params, optax.sgd(0.0))
        _, metrics = generator.denoiser_train_step(
            state,
            sharding.to_global(batch, mesh),
            jax.random.key(0),
            model=model,
            cond_dropout=0.0,
            ema_decay=0.9,
            condition_corruption=condition_corruption,
        )
        return float(metrics["loss"])

    plain = {k: v for k, v in fields.items() if k != "corrupted_embedding"}
    assert loss(fields, 0.0) == loss(plain, 0.0)
    all_copies_alike = dict(fields, corrupted_embedding=np.repeat(corrupted[:, :1], 3, axis=1))
    as_clean = dict(plain, embedding=corrupted[:, 0])
    np.testing.assert_allclose(loss(all_copies_alike, 1.0), loss(as_clean, 0.0), rtol=1e-6)
    assert loss(fields, 1.0) != loss(fields, 0.0)


_WITHOUT_FLAX_CLIP = """
import json, sys
sys.path.insert(0, {repo!r})
# As under transformers 5, which has no Flax models: the import fails.
sys.modules["transformers.models.clip.modeling_flax_clip"] = None
import jax, numpy as np
from configs import common
from jaxclean import pipeline  # Every stage module, as launch.py imports them.
from jaxclean.diffusion import adapter, generator, trainer
model = generator.build(common.generator_config(), (28, 28, 1), 10)
params = trainer.random_params(model, jax.random.key(0))
try:
    adapter.make_clip_image_encoder({{}})
    error = ""
except ImportError as e:
    error = str(e)
print(json.dumps({{"params": len(jax.tree_util.tree_leaves(params)), "error": error}}))
"""


@pytest.mark.slow
def test_offline_generator_needs_no_flax_clip_and_sd_path_names_it():
    # GPU images ship transformers 5, which has no Flax CLIP: everything but the Stable
    # Diffusion path must import and build without it, and that path must say what it needs.
    script = _WITHOUT_FLAX_CLIP.format(repo=REPO)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["params"] > 0
    assert "transformers 4.x" in result["error"] and "Flax CLIP" in result["error"]

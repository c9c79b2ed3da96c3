"""Training the self-trained generator: the VAE, then the denoiser on its latents.

Both phases run through train.fit, so they shard over the mesh, checkpoint with Orbax and
resume after a kill like every classifier does. Between them, the VAE latents and the encoder
embeddings of the training split are computed once: the denoiser's steps then touch neither.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclean import augment, sharding, train
from jaxclean.data import ImageDataset
from jaxclean.diffusion import adapter
from jaxclean.diffusion.generator import (
    EMATrainState,
    LatentDiffusion,
    denoiser_train_step,
    init_denoiser_params,
    vae_train_step,
)
from jaxclean.metrics import MetricWriter


def _fit_phase(phase, state, step, data, config, seed, directory, mesh, writer) -> dict:
    """Runs one generator phase through train.fit; returns the EMA parameters."""
    result = train.fit(
        state,
        step,
        data,
        batch_size=config.batch_size,
        num_epochs=config.num_epochs,
        seed=seed,
        mesh=mesh,
        checkpoint_dir=os.path.join(directory, f"{phase}_checkpoints"),
        writer=writer,
        prefix=f"generator/{phase}",
        log_every_steps=config.log_every_steps,
        checkpoint_every_steps=config.checkpoint_every_steps,
        description=f"generator {phase}",
    )
    return result.state.ema_params


def _adam(learning_rate: float, clip: float = 1.0):
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(learning_rate))


def train_vae(
    model: LatentDiffusion,
    dataset: ImageDataset,
    config,
    directory: str,
    mesh,
    writer: MetricWriter,
    seed: int,
) -> dict:
    """Phase 1: the autoencoder. Returns its (EMA) parameters."""
    tx = _adam(config.learning_rate)
    generator_shape = (model.image_size, model.image_size, model.image_shape[-1])
    init = functools.partial(adapter.init_vae, model.vae, image_shape=generator_shape)
    state = jax.jit(
        lambda key: EMATrainState.create(init(rng=key), tx), out_shardings=sharding.replicated(mesh)
    )(jax.random.key(seed))
    step = train.jit_step(
        functools.partial(
            vae_train_step, model=model, kl_weight=config.kl_weight, ema_decay=config.ema_decay
        ),
        mesh,
    )
    return _fit_phase("vae", state, step, dataset, config, seed, directory, mesh, writer)


# Corrupted copies per image whose embeddings the denoiser may be conditioned on.
CORRUPTED_COPIES = 4


def encode_dataset(
    model: LatentDiffusion,
    params: dict,
    dataset: ImageDataset,
    batch_size: int,
    mesh,
    corrupted_copies: int = 0,
    seed: int = 0,
) -> dict:
    """Embeddings and VAE posterior (mean, std) of every image, for the denoiser's training.

    With `corrupted_copies`, also the embeddings of that many corrupted versions of each image
    (augment.corrupt_image; copy k of image i from its own key), as "corrupted_features" (N, K, D).
    """
    key = jax.random.key(seed)

    def embed(params, images):
        return model.encoder.apply(params["encoder"], images, train=False, output="features")

    @jax.jit
    def features(params, images, indices):
        normalized = augment.normalize(images)
        mean, std = adapter.encode(model.vae, params["vae"], model.to_generator_space(normalized))
        outputs = (embed(params, normalized), mean, std)
        if corrupted_copies:
            per_image = augment.sample_keys(key, indices)
            copies = [
                augment.corrupt_images(normalized, per_image, c, 1.0)
                for c in range(corrupted_copies)
            ]
            outputs += (jnp.stack([embed(params, x) for x in copies], axis=1),)
        return outputs

    indices = np.arange(len(dataset), dtype=np.int32)
    outputs = train.batched_apply(features, params, (dataset.images, indices), batch_size, mesh)
    encoded = {"features": outputs[0], "latent_mean": outputs[1], "latent_std": outputs[2]}
    if corrupted_copies:
        encoded["corrupted_features"] = outputs[3]
    return encoded


def train_denoiser(
    model: LatentDiffusion,
    fields: dict,
    config,
    cond_dropout: float,
    directory: str,
    mesh,
    writer: MetricWriter,
    seed: int,
    condition_corruption: float = 0.0,
) -> dict:
    """Phase 2: the conditional UNet on precomputed latents. Returns its EMA parameters."""
    tx = _adam(config.learning_rate)
    state = jax.jit(
        lambda key: EMATrainState.create(init_denoiser_params(model, key), tx),
        out_shardings=sharding.replicated(mesh),
    )(jax.random.key(seed + 1))
    step = train.jit_step(
        functools.partial(
            denoiser_train_step,
            model=model,
            cond_dropout=cond_dropout,
            condition_corruption=condition_corruption,
            ema_decay=config.ema_decay,
        ),
        mesh,
    )
    return _fit_phase("unet", state, step, fields, config, seed + 1, directory, mesh, writer)


def train_generator(
    model: LatentDiffusion,
    dataset: ImageDataset,
    encoder_variables: dict,
    gen_config,
    directory: str,
    mesh,
    writer: MetricWriter,
    seed: int,
) -> dict:
    """Trains VAE then denoiser on `dataset`; returns the sampler's parameter pytree."""
    vae_params = train_vae(model, dataset, gen_config.vae, directory, mesh, writer, seed)
    params = {"encoder": encoder_variables, "vae": vae_params}
    # Conditioning on embeddings of corrupted sources while denoising the clean image teaches
    # the UNet to render what an image shows, not the overlay on it: the encoder's features
    # still carry a blend's lower contrast, which a variation would otherwise reproduce.
    condition_corruption = gen_config.condition_corruption
    encoded = encode_dataset(
        model,
        params,
        dataset,
        gen_config.encode_batch_size,
        mesh,
        corrupted_copies=CORRUPTED_COPIES if condition_corruption else 0,
        seed=seed + 2,
    )
    features = encoded["features"]
    embed_mean = features.mean(0)
    embed_std = features.std(0) + 1e-6
    # Scale latents to unit variance, as SD's 0.18215 does for its VAE.
    latent_scale = float(
        1.0 / np.sqrt(np.mean(encoded["latent_mean"] ** 2 + encoded["latent_std"] ** 2))
    )
    fields = {
        "latent_mean": encoded["latent_mean"] * latent_scale,
        "latent_std": encoded["latent_std"] * latent_scale,
        "embedding": (features - embed_mean) / embed_std,
        "label": dataset.labels,
    }
    if condition_corruption:
        fields["corrupted_embedding"] = (encoded["corrupted_features"] - embed_mean) / embed_std
    denoiser = train_denoiser(
        model,
        fields,
        gen_config.unet,
        gen_config.cond_dropout,
        directory,
        mesh,
        writer,
        seed,
        condition_corruption=condition_corruption,
    )
    return {
        **params,
        "unet": denoiser["unet"],
        "label_table": denoiser["label_table"],
        "embed_mean": jnp.asarray(embed_mean),
        "embed_std": jnp.asarray(embed_std),
        "latent_scale": jnp.asarray(latent_scale, jnp.float32),
    }


def abstract_params(model: LatentDiffusion, encoder_variables_like) -> dict:
    """Shapes of the sampler's parameters, to check a checkpoint against the architecture."""
    size = model.image_size
    vae = jax.eval_shape(
        functools.partial(
            adapter.init_vae, model.vae, image_shape=(size, size, model.image_shape[-1])
        ),
        jax.random.key(0),
    )
    denoiser = jax.eval_shape(functools.partial(init_denoiser_params, model), jax.random.key(0))
    return {
        "encoder": encoder_variables_like,
        "vae": vae,
        "unet": denoiser["unet"],
        "label_table": denoiser["label_table"],
        "embed_mean": jax.ShapeDtypeStruct((model.embed_dim,), jnp.float32),
        "embed_std": jax.ShapeDtypeStruct((model.embed_dim,), jnp.float32),
        "latent_scale": jax.ShapeDtypeStruct((), jnp.float32),
    }


def random_params(model: LatentDiffusion, rng) -> dict:
    """Untrained parameters of every part: for tests and benchmarks, never for regeneration."""
    keys = jax.random.split(rng, 3)
    size = model.image_size
    encoder = model.encoder.init(keys[0], jnp.zeros((1, *model.image_shape)))
    denoiser = init_denoiser_params(model, keys[2])
    return {
        "encoder": encoder,
        "vae": adapter.init_vae(model.vae, keys[1], (size, size, model.image_shape[-1])),
        "unet": denoiser["unet"],
        "label_table": denoiser["label_table"],
        "embed_mean": jnp.zeros((model.embed_dim,)),
        "embed_std": jnp.ones((model.embed_dim,)),
        "latent_scale": jnp.asarray(1.0, jnp.float32),
    }

"""The self-trained image-variation generator: the offline stand-in for a pretrained model.

It has the shape of Stable Diffusion image variations, shrunk to what trains on a CPU from the
trusted split alone:

  source image -> semantic encoder (a classifier trained on trusted; its pooled features,
                  standardised, are one cross-attention token, as CLIP's image embedding is)
  pure noise   -> DDIM over VAE latents with a conditional UNet -> VAE decoder -> variation

No pixel of the source reaches the output; only its embedding does, and every component has
seen only trusted (trigger-free) images. The unconditional branch for classifier-free guidance
is the zero embedding, as in SD image variations. An optional label token conditions on the
class too.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxclean.augment import normalize, sample_keys
from jaxclean.diffusion import adapter
from jaxclean.models import classifier_from_recipe

CONDITIONS = ("embedding", "label", "embedding+label")


class EMATrainState(flax.struct.PyTreeNode):
    """A generative model's training state with an exponential moving average of its weights."""

    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx):
        # A copy, not the same buffers: the train step donates the state, and one buffer
        # cannot be donated twice.
        ema = jax.tree.map(jnp.copy, params)
        return cls(jnp.zeros((), jnp.int32), params, ema, tx.init(params), tx)

    def apply_gradients(self, grads, ema_decay: float):
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        # Warm-up: the average starts short so that a briefly trained model is not all init.
        decay = jnp.minimum(ema_decay, (1.0 + self.step) / (10.0 + self.step))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, self.ema_params, params)
        return self.replace(step=self.step + 1, params=params, ema_params=ema, opt_state=opt_state)


@dataclasses.dataclass(frozen=True)
class LatentDiffusion:
    """Modules and static settings of the generator; parameters live in a separate pytree.

    Attributes:
      encoder: the semantic encoder (a classifier module; its pooled features are used).
      vae: diffusers' FlaxAutoencoderKL.
      unet: diffusers' FlaxUNet2DConditionModel.
      image_shape: the dataset's (H, W, C).
      image_size: the generator's square resolution.
      latent_shape: (h, w, c) of the VAE latents.
      condition: one of CONDITIONS.
      num_classes: for the label token.
      alphas_cumprod: the training noise schedule.
    """

    encoder: object
    vae: object
    unet: object
    image_shape: tuple
    image_size: int
    latent_shape: tuple
    condition: str
    num_classes: int
    alphas_cumprod: tuple
    embed_dim: int

    @property
    def num_tokens(self) -> int:
        return 2 if self.condition == "embedding+label" else 1

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    # -------------------------------------------------------------- image space

    def to_generator_space(self, images: jax.Array) -> jax.Array:
        """Dataset-size float images in [-1, 1] to the generator's square size.

        Smaller images are padded with black (-1), as MNIST-like digits sit on black; others
        are resized.
        """
        height, width = images.shape[1:3]
        size = self.image_size
        if height <= size and width <= size:
            top, left = (size - height) // 2, (size - width) // 2
            return jnp.pad(
                images,
                ((0, 0), (top, size - height - top), (left, size - width - left), (0, 0)),
                constant_values=-1.0,
            )
        return jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "linear")

    def from_generator_space(self, images: jax.Array) -> jax.Array:
        height, width = self.image_shape[:2]
        size = self.image_size
        if height <= size and width <= size:
            top, left = (size - height) // 2, (size - width) // 2
            return images[:, top : top + height, left : left + width]
        return jax.image.resize(
            images, (images.shape[0], height, width, images.shape[-1]), "linear"
        )

    # -------------------------------------------------------------- conditioning

    def embed(self, params: dict, images_uint8: jax.Array) -> jax.Array:
        """Standardised semantic embeddings [B, D] of uint8 dataset images."""
        features = self.encoder.apply(
            params["encoder"], normalize(images_uint8), train=False, output="features"
        )
        return (features - params["embed_mean"]) / params["embed_std"]

    def context(self, label_table, embedding, labels, drop) -> jax.Array:
        """Cross-attention tokens [B, T, D]; `drop` marks rows that get the null condition."""
        tokens = []
        if "embedding" in self.condition:
            tokens.append(jnp.where(drop[:, None], 0.0, embedding)[:, None, :])
        if "label" in self.condition:
            label_ids = jnp.where(drop, self.num_classes, labels)
            tokens.append(label_table[label_ids][:, None, :])
        return jnp.concatenate(tokens, axis=1)

    # -------------------------------------------------------------- the sampler's interface
    # (shared with the pretrained generators in stable_diffusion.py)

    steps_offset = 0  # Timestep spacing as trained: plain "leading".
    final_alpha_cumprod = 1.0  # The last DDIM step lands on the clean image.

    def conditions(self, params: dict, images_uint8, labels):
        """(conditional, unconditional) cross-attention tokens for classifier-free guidance."""
        return self.guidance_contexts(params, self.embed(params, images_uint8), labels)

    def guidance_contexts(self, params: dict, embedding, labels):
        """`conditions` from an embedding already made (a probe may have altered it)."""
        keep = jnp.zeros(embedding.shape[0], bool)
        return (
            self.context(params["label_table"], embedding, labels, keep),
            self.context(params["label_table"], embedding, labels, ~keep),
        )

    def encode_source(self, params: dict, source: jax.Array) -> jax.Array:
        """Unit-variance latents of dataset-size images in [-1, 1] (for strength < 1)."""
        mean, _ = adapter.encode(self.vae, params["vae"], self.to_generator_space(source))
        return mean * params["latent_scale"]

    def predict_noise(self, params: dict, latents, timesteps, context) -> jax.Array:
        return adapter.predict_noise(self.unet, params["unet"], latents, timesteps, context)

    def decode_latents(self, params: dict, latents) -> jax.Array:
        """Dataset-size images in [-1, 1]."""
        decoded = adapter.decode(self.vae, params["vae"], latents / params["latent_scale"])
        return jnp.clip(self.from_generator_space(decoded), -1.0, 1.0)


def build(gen_config, image_shape, num_classes: int) -> LatentDiffusion:
    """The generator a config describes (modules only; no parameters)."""
    if gen_config.condition not in CONDITIONS:
        raise ValueError(f"generator.condition {gen_config.condition!r}: use one of {CONDITIONS}")
    encoder_recipe = gen_config.encoder
    encoder = classifier_from_recipe(encoder_recipe, num_classes)
    embed_dim = _feature_dim(encoder, image_shape)
    vae_config, unet_config = gen_config.vae, gen_config.unet
    size = gen_config.image_size
    downsample = 2 ** (len(vae_config.block_out_channels) - 1)
    if size % downsample:
        raise ValueError(f"generator.image_size {size} is not divisible by {downsample}")
    latent_shape = (size // downsample, size // downsample, vae_config.latent_channels)
    vae = adapter.make_vae(
        vae_config.block_out_channels,
        vae_config.layers_per_block,
        vae_config.latent_channels,
        image_shape[-1],
        size,
    )
    unet = adapter.make_unet(
        unet_config.block_out_channels,
        unet_config.layers_per_block,
        unet_config.attention_head_dim,
        vae_config.latent_channels,
        latent_shape[0],
        embed_dim,
    )
    alphas = adapter.alphas_cumprod(unet_config.num_train_timesteps, unet_config.beta_schedule)
    return LatentDiffusion(
        encoder=encoder,
        vae=vae,
        unet=unet,
        image_shape=tuple(image_shape),
        image_size=size,
        latent_shape=latent_shape,
        condition=gen_config.condition,
        num_classes=num_classes,
        alphas_cumprod=tuple(float(a) for a in alphas),
        embed_dim=embed_dim,
    )


def _feature_dim(encoder, image_shape) -> int:
    variables = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    features = jax.eval_shape(
        functools.partial(encoder.apply, train=False, output="features"),
        variables,
        jnp.zeros((1, *image_shape)),
    )
    return int(features.shape[-1])


# ----------------------------------------------------------------------------- train steps


def _norms(grads, params) -> dict:
    return {"grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params)}


def vae_train_step(
    state: EMATrainState, batch, rng, *, model: LatentDiffusion, kl_weight: float, ema_decay: float
):
    """One autoencoder step: L1 reconstruction plus a small KL to N(0, I), as SD's VAE (less
    its perceptual and adversarial terms, which do not pay on 28-pixel grayscale images)."""
    images = model.to_generator_space(normalize(batch["image"]))
    keys = sample_keys(rng, batch["index"])

    def loss_fn(params):
        mean, std = adapter.encode(model.vae, params, images)
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(keys)
        recon = adapter.decode(model.vae, params, mean + std * noise)
        reconstruction = jnp.mean(jnp.abs(recon - images))
        kl = 0.5 * jnp.mean(jnp.sum(mean**2 + std**2 - 1.0 - jnp.log(std**2 + 1e-12), (1, 2, 3)))
        return reconstruction + kl_weight * kl, {"reconstruction_l1": reconstruction, "kl": kl}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads, ema_decay)
    return new_state, {"loss": loss, **aux, **_norms(grads, state.params)}


def denoiser_train_step(
    state: EMATrainState,
    batch,
    rng,
    *,
    model: LatentDiffusion,
    cond_dropout: float,
    ema_decay: float,
    condition_corruption: float = 0.0,
):
    """One noise-prediction step on precomputed latents and embeddings.

    batch: {"latent_mean", "latent_std"} (already scaled to unit variance), "embedding",
    "label", "index", and with `condition_corruption` > 0 "corrupted_embedding" (B, K, D): with that
    probability a sample is conditioned on one of its K corrupted copies' embeddings instead.
    Each sample's latent draw, timestep, noise and condition dropout come from its own key,
    folded from its index.
    """
    alphas = jnp.asarray(model.alphas_cumprod)
    keys = jax.vmap(lambda k: jax.random.split(k, 4))(sample_keys(rng, batch["index"]))
    shape = batch["latent_mean"].shape[1:]
    latents = batch["latent_mean"] + batch["latent_std"] * jax.vmap(
        lambda k: jax.random.normal(k, shape)
    )(keys[:, 0])
    timesteps = jax.vmap(lambda k: jax.random.randint(k, (), 0, len(model.alphas_cumprod)))(
        keys[:, 1]
    )
    noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys[:, 2])
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, cond_dropout))(keys[:, 3])
    signal = jnp.sqrt(alphas[timesteps])[:, None, None, None]
    noisy = signal * latents + jnp.sqrt(1.0 - signal**2) * noise
    embedding = batch["embedding"]
    if condition_corruption > 0:
        # Keys of their own, so the draws above are those of a run without the option.
        corrupt_keys = jax.vmap(lambda k: jax.random.split(k))(
            sample_keys(jax.random.fold_in(rng, 1), batch["index"])
        )
        corrupted = batch["corrupted_embedding"]
        which = jax.vmap(lambda k: jax.random.randint(k, (), 0, corrupted.shape[1]))(
            corrupt_keys[:, 0]
        )
        use = jax.vmap(lambda k: jax.random.bernoulli(k, condition_corruption))(corrupt_keys[:, 1])
        chosen = jnp.take_along_axis(corrupted, which[:, None, None], axis=1)[:, 0]
        embedding = jnp.where(use[:, None], chosen, embedding)

    def loss_fn(params):
        context = model.context(params["label_table"], embedding, batch["label"], drop)
        predicted = adapter.predict_noise(model.unet, params["unet"], noisy, timesteps, context)
        return jnp.mean((predicted - noise) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state = state.apply_gradients(grads, ema_decay)
    return new_state, {"loss": loss, **_norms(grads, state.params)}


def init_denoiser_params(model: LatentDiffusion, rng) -> dict:
    unet_key, label_key = jax.random.split(rng)
    return {
        "unet": adapter.init_unet(model.unet, unet_key, model.latent_shape, model.num_tokens),
        # One row per class plus the null label of the unconditional branch.
        "label_table": 0.02
        * jax.random.normal(label_key, (model.num_classes + 1, model.embed_dim)),
    }

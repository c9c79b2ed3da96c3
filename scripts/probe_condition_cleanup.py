"""Does cleaning the source before the encoder embeds it remove what a trigger leaves?

The diagnostics' detector (`jaxclean.detectability`) tells the method's Blended variations
from their clean twins in 87% of pairs, through the embedding rather than the pattern's pixels.
This probe regenerates the poisoned rows and their clean twins with the encoder reading a
cleaned copy of each source (the generator and its weights unchanged), and reports the same
detector's paired accuracy and the teacher's accuracy on variations of clean test images (the
content the cleaning costs):

  python scripts/probe_condition_cleanup.py --config configs/fashion_mnist_blended.py \\
      --workdir runs/blended --cleanup median_autocontrast [--embedding_noise 0.5] \\
      [--test_images 1000] [--config.regenerate.guidance=1.5 --tag guidance_1.5]

Cleanups (uint8 in, uint8 out, per image; none knows the trigger):
  none                 the method as it is (a check: its figures are the diagnostics')
  median               a 3x3 median filter (takes out pixel noise, keeps edges)
  median_autocontrast  the median, then the image stretched to span 0..255
The detector trains as a stage named detectability/probe_<cleanup> in the workdir.
"""

from __future__ import annotations

import dataclasses
import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

import flax.serialization  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxclean import detectability, evaluate, experiment, generation, regenerate, sharding, train  # noqa: E402
from jaxclean.diffusion import sampler as sampler_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "a workdir with a finished diagnostics stage")
_CLEANUP = flags.DEFINE_enum(
    "cleanup", "median_autocontrast", ["none", "median", "median_autocontrast"], "what to apply"
)
_EMBEDDING_NOISE = flags.DEFINE_float(
    "embedding_noise", 0.0, "noise added to the embedding, in units of each feature's spread"
)
_ENCODER = flags.DEFINE_string(
    "encoder", "", "encoder variables (flax msgpack) to embed with instead of the generator's own"
)
_TEST_IMAGES = flags.DEFINE_integer("test_images", 1000, "clean test images for content kept")
_TAG = flags.DEFINE_string(
    "tag",
    "",
    "appended to the stage name: a sweep over --config.regenerate.* overrides (say "
    "guidance) needs one stage per point, since a changed spec is refused",
)
flags.mark_flags_as_required(["config", "workdir"])


def median3(images: jax.Array) -> jax.Array:
    """A 3x3 median per channel, edges replicated; uint8 [N, H, W, C]."""
    height, width = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    shifted = [padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)]
    return jnp.median(jnp.stack(shifted, 0).astype(jnp.float32), axis=0).astype(jnp.uint8)


def autocontrast(images: jax.Array) -> jax.Array:
    """Each image stretched so its darkest pixel is 0 and its brightest 255."""
    values = images.astype(jnp.float32)
    low = values.min(axis=(1, 2, 3), keepdims=True)
    high = values.max(axis=(1, 2, 3), keepdims=True)
    stretched = (values - low) / jnp.maximum(high - low, 1.0) * 255.0
    return jnp.round(stretched).astype(jnp.uint8)


CLEANUPS = {
    "none": lambda images: images,
    "median": median3,
    "median_autocontrast": lambda images: autocontrast(median3(images)),
}


class CleanedConditions:
    """The generator, with its encoder reading cleaned sources and, optionally, Gaussian noise
    of `embedding_noise` times each feature's spread over the batch added to the embedding
    (conditioning augmentation, at sampling only); everything else unchanged.

    The noise is drawn from a fixed key by batch position, so a pair's two members, sampled in
    the same positions of their batches, get the same noise.
    """

    def __init__(self, model, cleanup, embedding_noise: float = 0.0):
        self._model, self._cleanup, self._noise = model, cleanup, embedding_noise

    def __getattr__(self, name):
        return getattr(self._model, name)

    def conditions(self, params, images, labels):
        embedding = self._model.embed(params, self._cleanup(images))
        if self._noise:
            noise = jax.random.normal(jax.random.key(20261128), embedding.shape)
            spread = embedding.std(axis=0, keepdims=True)
            embedding = embedding + self._noise * spread * noise
        return self._model.guidance_contexts(params, embedding, labels)


def main(argv) -> None:
    del argv
    config, cleanup = _CONFIG.value, _CLEANUP.value
    exp = experiment.Experiment(config, _WORKDIR.value)
    mesh = sharding.local_mesh()
    noise = _EMBEDDING_NOISE.value
    model = CleanedConditions(generation.build_generator(exp), CLEANUPS[cleanup], noise)
    cleanup = cleanup if not noise else f"{cleanup}_embedding_noise_{noise:g}"
    smoothing = config.regenerate.get("condition_corruption", 0.0)
    if smoothing:  # The sampler's own option (regenerate.condition_corruption).
        cleanup = f"{cleanup}_condition_corruption_{smoothing:g}"
    params = generation.load_generator_params(
        model._model, os.path.join(exp.workdir, "generator", "model")
    )
    if _ENCODER.value:
        with open(_ENCODER.value, "rb") as file:
            params["encoder"] = flax.serialization.from_bytes(params["encoder"], file.read())
        cleanup = f"{cleanup}_encoder_{os.path.basename(_ENCODER.value).split('.')[0]}"
    if _TAG.value:
        cleanup = f"{cleanup}_{_TAG.value}"
    params = jax.device_put(params, sharding.replicated(mesh))
    sample = sampler_lib.make_sampler(model, generation._sampler_settings(exp), mesh)
    batch = config.regenerate.per_device_batch * mesh.size
    train_key = jax.random.key(config.regenerate.seed)
    indices = exp.plan.indices
    labels = exp.poisoned_train.labels[indices]

    def vary(images, rows, row_labels, key):
        return regenerate.sample_rows(sample, params, images, rows, row_labels, key, batch, mesh)

    # The teacher on variations of clean test images: what the cleanup costs in content.
    test = exp.splits.test
    rows = np.arange(min(_TEST_IMAGES.value, len(test)))
    test_key = jax.random.fold_in(train_key, 1)  # As the diagnostics' test variations.
    teacher_model, teacher_vars = experiment.load_classifier(
        exp, "teacher", config.teacher, test.num_classes
    )
    predict_fn = train.make_predict_fn(teacher_model.apply, exp.mesh)
    varied = vary(test.images[rows], rows, test.labels[rows], test_key)
    content = evaluate.accuracy(
        evaluate.predictions(
            predict_fn, teacher_vars, varied, config.teacher.eval_batch_size, mesh
        ),
        test.labels[rows],
    )
    print(f"probe {cleanup}: teacher accuracy on variations of clean test images {content:.4f}")

    held_out = config.diagnostics.detectability_held_out
    fit_rows, held_rows = detectability.split_pairs(len(indices), held_out, config.seed)

    def pairs():
        triggered = vary(exp.poisoned_train.images[indices], indices, labels, train_key)
        clean = vary(exp.splits.train.images[indices], indices, labels, train_key)
        return triggered, clean

    spec = {
        **exp.poison_spec(),
        "recipe": config.diagnostics.detectability,
        "held_out": held_out,
        "probe_cleanup": cleanup,
        "embedding_noise": noise,
        "encoder": _ENCODER.value,
        # Without condition_corruption when off: the spec of the probes made before it.
        "sampler": {
            k: v
            for k, v in dataclasses.asdict(generation._sampler_settings(exp)).items()
            if k != "condition_corruption" or v
        },
    }
    metrics = generation._fit_detector(
        exp, f"detectability/probe_{cleanup}", spec, pairs, fit_rows, held_rows
    )
    print(
        f"probe {cleanup}: detector paired accuracy {metrics['paired_accuracy']:.4f} on "
        f"{len(held_rows)} held-out pairs (chance 0.5 +- "
        f"{detectability.chance_standard_error(len(held_rows)):.4f})"
    )


if __name__ == "__main__":
    app.run(main)

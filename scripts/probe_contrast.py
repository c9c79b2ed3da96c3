"""Does a finished classifier answer the target to clean images whose contrast was lowered?

A Blended trigger (x' = (1 - r) x + r * pattern) lowers an image's contrast as well as adding the
pattern; this probe asks which of the two a backdoored model has keyed on. It scales each clean
test image towards its own mean by a contrast c ~ U(0.5, 1) (no pattern, no noise), and prints
the classifier's target rate on the non-target ones and its accuracy, beside the same on the
unscaled images and under `train.corrupt_image` (contrast, brightness and Gaussian noise).

  python scripts/probe_contrast.py --config configs/fashion_mnist_blended.py \
      --workdir runs/blended [--stage teacher] [--num_images 2000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxclean import evaluate, experiment, train  # noqa: E402


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("probe_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def lower_contrast(image: jax.Array, key: jax.Array) -> jax.Array:
    """The image scaled towards its own mean: contrast only, mean brightness kept."""
    contrast = jax.random.uniform(key, (), minval=0.5, maxval=1.0)
    return contrast * image + (1.0 - contrast) * image.mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--stage", default="teacher", help="a finished classifier stage")
    parser.add_argument("--num_images", type=int, default=2000)
    args = parser.parse_args()

    config = load_config(args.config)
    exp = experiment.Experiment(config, args.workdir)
    model, variables = experiment.load_classifier(
        exp, args.stage, config.teacher, exp.splits.train.num_classes
    )
    labels = exp.splits.test.labels[: args.num_images]
    images = train.normalize(jnp.asarray(exp.splits.test.images[: args.num_images]))
    keys = train.sample_keys(jax.random.key(1), jnp.arange(len(images)))
    non_target = labels != config.attack.target

    # Float inputs (the corruptions live in [-1, 1]), batched and sharded like every evaluation.
    logits_fn = jax.jit(lambda variables, batch: model.apply(variables, batch, train=False))

    def rates(batch):
        (logits,) = train.batched_apply(
            logits_fn, variables, (np.asarray(batch),), config.teacher.eval_batch_size, exp.mesh
        )
        predicted = np.argmax(logits, -1)
        return {
            "target_rate_non_target": evaluate.accuracy(
                predicted[non_target], np.full(non_target.sum(), config.attack.target)
            ),
            "accuracy": evaluate.accuracy(predicted, labels),
        }

    corrupt = jax.vmap(lambda image, key: train.corrupt_image(image, key, 1.0))
    result = {
        "stage": args.stage,
        "num_images": int(len(labels)),
        "originals": rates(images),
        "contrast_only": rates(jax.vmap(lower_contrast)(images, keys)),
        "corrupt_image": rates(corrupt(images, keys)),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Stages `encoder` and `generator`: the image-variation generator, trained here or loaded.

A generator trained here (`latent_diffusion`) learns from the trusted split: first its semantic
encoder (a classifier, stage `encoder`), then its autoencoder and denoiser (stage `generator`).
A finished generator is exported as one safetensors file, and another run whose generator
config and trusted split are the same adopts it (`generator.pretrained`) instead of training
one, as the paper adopts a pretrained model. A hub generator (Stable Diffusion) needs no
training: its stage records which weights it is and draws samples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import jax
import numpy as np

from jaxclean import checkpointing, images, sharding, steps
from jaxclean.artifacts import CorruptOutput, FinishedStage, atomic_write_bytes, differences
from jaxclean.checks import ConfigError
from jaxclean.data import ImageDataset
from jaxclean.diffusion import hub, registry, trainer
from jaxclean.diffusion import sampler as sampler_lib
from jaxclean.diffusion.postprocess import Postprocess
from jaxclean.experiment import Experiment, Stage, log
from jaxclean.stages.classifier_stage import load_classifier, train_classifier
from jaxclean.stages.poison import require_poison_plan

EXPORT_FILE = "model.safetensors"  # The generator's weights in one portable file.


def validate(config) -> None:
    registry.validate(config.generator)
    sampler_lib.SamplerSettings.from_config(config.regenerate)
    Postprocess.from_config(config.regenerate.postprocess)


def _trains_here(config) -> bool:
    return registry.get(config.generator.name).trains_here


def generator_split(exp: Experiment) -> ImageDataset:
    """What the encoder and generator learn from: trusted (the method) or poisoned train."""
    if exp.config.generator.train_split == "poisoned_train":
        require_poison_plan(exp)
        return exp.poisoned_train
    return exp.splits.trusted


def _split_spec(exp: Experiment) -> dict:
    spec = {**exp.data_spec(), "train_split": exp.config.generator.train_split}
    if exp.config.generator.train_split == "poisoned_train":
        spec["attack"] = exp.config.attack
    return spec


# ----------------------------------------------------------------------------- encoder


def run_encoder(exp: Experiment) -> None:
    """The generator's semantic encoder: a classifier trained on the generator's split."""
    config = exp.config.generator
    if not _trains_here(exp.config):
        log(f"encoder: skipped; {config.name} brings its own")
        return
    if config.pretrained:
        log("encoder: skipped; the pretrained generator brings its own")
        return
    split = generator_split(exp)
    weight = config.encoder_invariance_weight
    spec = {
        **_split_spec(exp),
        "encoder": config.encoder,
        "invariance_weight": weight,
        "split_fingerprint": split.fingerprint(),
    }
    make_step = None
    if weight:
        make_step = lambda model, augment: functools.partial(  # noqa: E731
            steps.invariance_step, augment=augment, weight=weight
        )
    train_classifier(exp, "encoder", split, config.encoder, spec, make_step=make_step)


# ----------------------------------------------------------------------------- generator


def generator_weights_config(gen_config) -> dict:
    """The generator config as far as it decides the weights (its part of the stage's spec)."""
    gen = gen_config.to_dict()
    gen.pop("pretrained")  # Where the weights come from does not change what they are.
    return gen


def generator_spec(exp: Experiment, split: ImageDataset) -> dict:
    """What decides the generator's weights, and nothing else: its config, the seed, and the
    exact images it learns from. So a generator trained once (on the same trusted split) can be
    adopted by any attack config or training subset."""
    return {
        "seed": exp.config.seed,
        "generator": generator_weights_config(exp.config.generator),
        "train_split": exp.config.generator.train_split,
        "split_fingerprint": split.fingerprint(),
        "image_shape": list(split.image_shape),
        "num_classes": split.num_classes,
    }


def build_generator(exp: Experiment):
    """The (untrained) model of a generator trained here."""
    kind = registry.get(exp.config.generator.name)
    if not kind.trains_here:
        raise ConfigError(f"generator {kind.name!r} is not trained here")
    train = exp.splits.train
    return kind.build(exp.config.generator, train.image_shape, train.num_classes)


def run_generator(exp: Experiment) -> None:
    """Trains the image-variation generator, adopts a pretrained one of the same provenance, or
    records which hub model is used."""
    if not _trains_here(exp.config):
        _hub_generator(exp)
        return
    split = generator_split(exp)
    record = exp.record("generator", generator_spec(exp, split))
    if record.is_done():
        log(f"generator: done already ({record.path('model')})")
        return
    record.claim()
    model = build_generator(exp)
    pretrained = exp.config.generator.pretrained
    if pretrained:
        # Copied into this workdir, so the run stays whole if the other one is deleted.
        params = adopt_pretrained(model, pretrained, record.spec)
    else:
        _, encoder_variables = load_classifier(
            exp, "encoder", exp.config.generator.encoder, split.num_classes
        )
        params = trainer.train_generator(
            model,
            split,
            encoder_variables,
            exp.config.generator,
            record.directory,
            exp.mesh,
            exp.writer,
            exp.config.seed,
        )
    params = jax.device_get(params)
    checkpointing.save_tree(record.path("model"), params)
    if exp.is_writer:
        save_samples(exp, model, params, split, record.path("samples.png"))
        record.mark_done(
            {
                "trained_on": exp.config.generator.train_split,
                "pretrained": pretrained or None,
                "image_shape": list(model.image_shape),
                "model_sha256": export_params(params, record.path(EXPORT_FILE)),
            }
        )
    log(f"generator: ready; samples in {record.path('samples.png')}")


def export_params(params: dict, path: str) -> str:
    """Writes the parameters as one safetensors file; returns its sha256, which adoption
    checks."""
    blob = checkpointing.to_safetensors(params)
    atomic_write_bytes(path, blob)
    return hashlib.sha256(blob).hexdigest()


def adopt_pretrained(model, directory: str, spec: dict) -> dict:
    """The parameters of a generator trained elsewhere, if it was trained from this very
    config and split. `directory` is a finished generator stage (WORKDIR/generator) or a
    shipped copy of one (spec.json, done.json and model.safetensors, as in pretrained/)."""
    theirs = FinishedStage.read(
        directory,
        f"pretrained generator {directory!r} has no finished generator stage; pass "
        "--config.generator.pretrained= to train one in this run",
    )
    version = theirs.spec.get("spec_version", 1)
    if version != spec["spec_version"]:
        raise ConfigError(
            f"pretrained generator {directory!r} was written by another version of jaxclean "
            f"(spec version {version}; this one reads {spec['spec_version']}): remake it, or "
            "use the jaxclean that made it"
        )
    if theirs.spec != spec:
        changes = "; ".join(differences(theirs.spec, spec)[:6])
        raise ConfigError(
            f"pretrained generator {directory!r} was made from another config or trusted split "
            f"({changes}); retrain it or fix generator.pretrained"
        )
    exported = theirs.path(EXPORT_FILE)
    try:
        with open(exported, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ConfigError(f"pretrained generator {exported}: cannot read it: {e}") from e
    if hashlib.sha256(blob).hexdigest() != theirs.done.get("model_sha256"):
        raise ConfigError(
            f"pretrained generator {exported} does not match the sha256 in its done.json "
            "(corrupted or replaced): refusing it"
        )
    return check_generator_params(model, checkpointing.from_safetensors(blob), exported)


def load_generator_params(model, path: str) -> dict:
    """The generator's parameters, checked against the configured architecture."""
    if not os.path.isdir(path):
        raise ConfigError(f"no generator checkpoint at {path}: run --stages=generator first")
    try:
        params = checkpointing.load_tree(path)
    except CorruptOutput as e:
        raise CorruptOutput(path, e.detail, stage="generator") from None
    return check_generator_params(model, params, path)


def check_generator_params(model, params: dict, path: str) -> dict:
    encoder_like = jax.eval_shape(
        model.encoder.init, jax.random.key(0), np.zeros((1, *model.image_shape), np.float32)
    )
    like = trainer.abstract_params(model, encoder_like)
    expected = jax.tree.map(lambda x: tuple(x.shape), like)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ConfigError(
            f"generator checkpoint {path} is of another architecture than "
            "config.generator describes (parameter names or shapes differ)"
        )
    return params


def _hub_generator(exp: Experiment) -> None:
    """A pretrained hub model needs no training: the stage records which weights it is (a
    hash of its safetensors and configs) and draws samples, so a changed model is noticed."""
    config = exp.config.generator
    root = registry.hub_directory(config)
    spec = {
        "generator": config.to_dict(),
        "weights": hub.fingerprint(root, registry.get(config.name).components),
        "image_shape": list(exp.splits.train.image_shape),
    }
    record = exp.record("generator", spec)
    if record.is_done():
        log(f"generator: done already ({root})")
        return
    record.claim()
    model, params, _ = registry.load_hub(
        config, exp.splits.train.image_shape, exp.splits.train.class_names
    )
    if exp.is_writer:
        save_samples(exp, model, params, exp.splits.train, record.path("samples.png"))
        record.mark_done({"model_dir": root, "image_shape": list(model.image_shape)})
    log(f"generator: {config.model} ready; samples in {record.path('samples.png')}")


def load_generator(exp: Experiment):
    """(model, params) of the run's finished generator, for sampling."""
    if not _trains_here(exp.config):
        model, params, _ = registry.load_hub(
            exp.config.generator, exp.splits.train.image_shape, exp.splits.train.class_names
        )
        return model, params
    finished = exp.upstream("generator")
    image_shape = list(exp.splits.train.image_shape)
    if finished.done["image_shape"] != image_shape:
        raise ConfigError(
            f"the generator in {exp.workdir} makes {finished.done['image_shape']} images but "
            f"the training images are {image_shape}"
        )
    model = build_generator(exp)
    return model, load_generator_params(model, finished.path("model"))


def save_samples(exp: Experiment, model, params, split: ImageDataset, path: str) -> None:
    """One source per class, then variations of it drawn with three different keys."""
    first = [
        int(np.flatnonzero(split.labels == c)[0])
        for c in range(split.num_classes)
        if (split.labels == c).any()
    ]
    mesh = sharding.make_mesh(jax.local_devices()[:1])
    # The generator's own conditions: a trusted-neighbour codebook is the regeneration's.
    settings = dataclasses.replace(
        sampler_lib.SamplerSettings.from_config(exp.config.regenerate),
        condition_neighbours=0,
        neighbours_same_label=False,
    )
    sample = sampler_lib.make_sampler(model, settings, mesh)
    postprocess = Postprocess.from_config(exp.config.regenerate.postprocess)
    sources = split.images[first]
    rows = [sources]
    for seed in range(3):
        indices = np.arange(len(first), dtype=np.int32)
        drawn = sample(params, sources, indices, split.labels[first], jax.random.key(seed))
        rows.append(postprocess(np.asarray(drawn)))
    images.save_png(path, images.grid(rows))


def _reads_poison(config) -> tuple[str, ...]:
    trained = _trains_here(config) and config.generator.train_split == "poisoned_train"
    return ("poison",) if trained else ()


def _needs_encoder(config) -> tuple[str, ...]:
    trained = _trains_here(config) and not config.generator.pretrained
    return _reads_poison(config) + (("encoder",) if trained else ())


ENCODER = Stage(
    "encoder",
    "the generator's semantic encoder, trained on the trusted split",
    run_encoder,
    needs=_reads_poison,
)
GENERATOR = Stage(
    "generator",
    "the image-variation generator: trained on the trusted split, adopted, or loaded",
    run_generator,
    needs=_needs_encoder,
    validate=validate,
    result_keys=lambda config: (),
)

"""Stages that make and measure the variations: encoder, generator, regenerate, diagnostics."""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import os

import flax.serialization
import jax
import numpy as np

from jaxclean import (
    attacks,
    checkpointing,
    detectability,
    evaluate,
    images,
    regenerate,
    report,
    sharding,
    train,
)
from jaxclean.artifacts import (
    atomic_write_bytes,
    differences,
    read_json,
    to_jsonable,
    without_unset,
)
from jaxclean.data import ImageDataset
from jaxclean.diffusion import generator as generator_lib
from jaxclean.diffusion import hub, trainer
from jaxclean.diffusion import sampler as sampler_lib
from jaxclean.diffusion import stable_diffusion as sd
from jaxclean.experiment import (
    ConfigError,
    Experiment,
    fit_classifier,
    load_classifier,
    log,
    require_poison_plan,
    train_classifier,
    validate_recipe,
)
from jaxclean.models import classifier_from_recipe

GENERATOR_SPLITS = ("trusted", "poisoned_train")
# latent_diffusion: trained here on the trusted split (the offline default). The others are
# pretrained hub models: sd_image_variations (lambdalabs/sd-image-variations-diffusers or one of
# its layout, the method) and sd_img2img (SDEdit on a text-to-image SD 1.x model, a baseline).
GENERATORS = ("latent_diffusion", *sd.HUB_GENERATORS)
EXPORT_FILE = "model.msgpack"  # The generator's weights in one portable file.


def validate_config(config) -> None:
    """Generator, sampler and diagnostics settings that are wrong whatever the data."""
    if config.generator.name not in GENERATORS:
        raise ConfigError(f"unknown generator {config.generator.name!r}; known: {GENERATORS}")
    if config.generator.name in sd.HUB_GENERATORS:
        if config.generator.resolution <= 0:
            raise ConfigError(f"generator.resolution {config.generator.resolution} must be > 0")
        if config.generator.get("dtype", "float32") not in sd.DTYPES:
            raise ConfigError(
                f"generator.dtype {config.generator.dtype!r}: use one of {tuple(sd.DTYPES)}"
            )
        if config.generator.name == "sd_img2img" and "{}" not in config.generator.prompt:
            raise ConfigError(
                f"generator.prompt {config.generator.prompt!r} needs a {{}} for the class name"
            )
    elif config.generator.train_split not in GENERATOR_SPLITS:
        raise ConfigError(
            f"generator.train_split {config.generator.train_split!r}: use one of {GENERATOR_SPLITS}"
        )
    elif config.generator.condition not in generator_lib.CONDITIONS:
        raise ConfigError(
            f"generator.condition {config.generator.condition!r}: use one of "
            f"{generator_lib.CONDITIONS}"
        )
    else:
        validate_recipe(config.generator.encoder, "generator.encoder")
        cond_corruption = config.generator.get("cond_corruption", 0.0)
        if not 0.0 <= cond_corruption <= 1.0:
            raise ConfigError(f"generator.cond_corruption {cond_corruption} must be in [0, 1]")
        _validate_invariance(config.generator.get("encoder_invariance"))
    settings_from_config(config.regenerate)
    validate_recipe(config.diagnostics.learnability, "diagnostics.learnability")
    validate_recipe(config.diagnostics.detectability, "diagnostics.detectability")
    held_out = config.diagnostics.detectability_held_out
    if not 0.0 < held_out < 1.0:
        raise ConfigError(f"diagnostics.detectability_held_out {held_out} must be in (0, 1)")
    seeds = config.diagnostics.get("learnability_seeds", 1)
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"diagnostics.learnability_seeds must be an integer >= 1, got {seeds!r}")


def _validate_invariance(invariance) -> None:
    name = "generator.encoder_invariance"
    if invariance is None:
        return
    if invariance.num_epochs < 0:
        raise ConfigError(f"{name}.num_epochs must be >= 0")
    if not invariance.num_epochs:
        return
    if not 0.0 < invariance.min_contrast <= 1.0:
        raise ConfigError(f"{name}.min_contrast {invariance.min_contrast} must be in (0, 1]")
    for field in ("max_noise_std", "corrupted_weight"):
        if invariance[field] < 0:
            raise ConfigError(f"{name}.{field} {invariance[field]} must be >= 0")
    if invariance.learning_rate <= 0:
        raise ConfigError(f"{name}.learning_rate {invariance.learning_rate} must be > 0")
    if not 0.0 <= invariance.ema_decay < 1.0:
        raise ConfigError(f"{name}.ema_decay {invariance.ema_decay} must be in [0, 1)")


def generator_split(exp: Experiment) -> ImageDataset:
    """What the encoder and generator learn from: trusted (the method) or poisoned train."""
    split = exp.config.generator.train_split
    if split == "trusted":
        return exp.splits.trusted
    if split == "poisoned_train":
        require_poison_plan(exp)
        return exp.poisoned_train
    raise ConfigError(f"generator.train_split {split!r}: use one of {GENERATOR_SPLITS}")


def _split_spec(exp: Experiment) -> dict:
    spec = {**exp.data_spec(), "train_split": exp.config.generator.train_split}
    if exp.config.generator.train_split == "poisoned_train":
        spec["attack"] = exp.config.attack
    return spec


def encoder_stage(exp: Experiment) -> None:
    """The generator's semantic encoder: a classifier trained on the generator's split."""
    if exp.config.generator.name in sd.HUB_GENERATORS:
        log(f"encoder: skipped; {exp.config.generator.name} brings its own (CLIP)")
        return
    if exp.config.generator.get("pretrained", ""):
        log("encoder: skipped; the pretrained generator brings its own")
        return
    split = generator_split(exp)
    recipe = exp.config.generator.encoder
    spec = {
        **_split_spec(exp),
        "encoder": encoder_recipe_spec(recipe),
        "split_fingerprint": split.fingerprint(),
    }
    make_step = None
    weight = recipe.get("invariance_weight", 0.0)
    if weight:
        make_step = lambda model, augment: functools.partial(  # noqa: E731
            train.invariance_step, augment=augment, weight=weight
        )
    train_classifier(exp, "encoder", split, recipe, spec, make_step=make_step)


def encoder_recipe_spec(recipe) -> dict:
    """The encoder's recipe as far as it decides the weights; invariance_weight only when on,
    so encoders (and the shipped generator) made before it existed keep their specs."""
    return without_unset(recipe.to_dict(), ("invariance_weight",))


def generator_weights_config(gen_config) -> dict:
    """The generator config as far as it decides the weights (its part of the stage's spec)."""
    gen = gen_config.to_dict()
    gen.pop("pretrained", None)  # Where the weights come from does not change what they are.
    gen["encoder"] = encoder_recipe_spec(gen_config.encoder)
    if not gen.get("encoder_invariance", {}).get("num_epochs", 0):
        # Off: the spec of a generator made before the phase existed.
        gen.pop("encoder_invariance", None)
    return gen


def _generator_spec(exp: Experiment, split: ImageDataset) -> dict:
    """What decides the generator's weights, and nothing else: its config, the seed, and the
    exact images it learns from. So a generator trained once (on the same trusted split) can be
    adopted by any attack config or training subset, as the paper adopts a pretrained model."""
    return {
        "seed": exp.config.seed,
        "generator": generator_weights_config(exp.config.generator),
        "train_split": exp.config.generator.train_split,
        "split_fingerprint": split.fingerprint(),
        "image_shape": list(split.image_shape),
        "num_classes": split.num_classes,
    }


def build_generator(exp: Experiment) -> generator_lib.LatentDiffusion:
    config = exp.config.generator
    if config.name != "latent_diffusion":
        raise ConfigError(f"generator {config.name!r} is not trained here")
    return generator_lib.build(config, exp.splits.train.image_shape, exp.splits.train.num_classes)


def generator_stage(exp: Experiment) -> None:
    """Trains the image-variation generator, or adopts a pretrained one of the same provenance."""
    if exp.config.generator.name in sd.HUB_GENERATORS:
        _hub_generator_stage(exp)
        return
    split = generator_split(exp)
    record = exp.record("generator", _generator_spec(exp, split))
    if record.is_done():
        log(f"generator: done already ({record.path('model')})")
        return
    record.claim()
    model = build_generator(exp)
    pretrained = exp.config.generator.get("pretrained", "")
    invariance = exp.config.generator.get("encoder_invariance")
    if pretrained:
        # Copied into this workdir, so the run stays whole if the other one is deleted.
        params, has_invariance = _adopt_pretrained(model, pretrained, record.spec)
    else:
        encoder_model, encoder_variables = load_classifier(
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
        has_invariance = False
    if invariance is not None and not has_invariance:
        params = trainer.train_encoder_invariance(
            model,
            params,
            split,
            invariance,
            record.directory,
            exp.mesh,
            exp.writer,
            exp.config.seed,
        )
    checkpointing.save_tree(record.path("model"), jax.device_get(params))
    if exp.is_writer:
        _save_samples(exp, model, params, split, record.path("samples.png"))
        record.mark_done(
            {
                "trained_on": exp.config.generator.train_split,
                "pretrained": pretrained or None,
                "image_shape": list(model.image_shape),
                "model_sha256": _export_params(jax.device_get(params), record.path(EXPORT_FILE)),
            }
        )
    log(f"generator: ready; samples in {record.path('samples.png')}")


def _export_params(params: dict, path: str) -> str:
    """Writes the parameters as one msgpack file (portable, small enough to ship in the repo);
    returns its sha256, which adoption checks."""
    blob = flax.serialization.msgpack_serialize(params)
    atomic_write_bytes(path, blob)
    return hashlib.sha256(blob).hexdigest()


def _hub_root(exp: Experiment) -> str:
    config = exp.config.generator
    try:
        components = sd.HUB_GENERATORS[config.name]
        root = hub.resolve(config.model, components, config.download)
        for component in components:
            hub.component_dir(root, component)
        return root
    except hub.HubError as e:
        raise ConfigError(str(e)) from e


def _load_hub_generator(exp: Experiment, root: str):
    try:
        train = exp.splits.train
        return sd.load(exp.config.generator, root, train.image_shape, train.class_names)
    except hub.HubError as e:
        raise ConfigError(str(e)) from e


def _hub_generator_stage(exp: Experiment) -> None:
    """A pretrained hub model needs no training: the stage records which weights it is (a
    hash of its safetensors and configs) and draws samples, so a changed model is noticed."""
    root = _hub_root(exp)
    spec = {
        "generator": exp.config.generator.to_dict(),
        "weights": hub.fingerprint(root, sd.HUB_GENERATORS[exp.config.generator.name]),
        "image_shape": list(exp.splits.train.image_shape),
    }
    record = exp.record("generator", spec)
    if record.is_done():
        log(f"generator: done already ({root})")
        return
    record.claim()
    model, params = _load_hub_generator(exp, root)
    if exp.is_writer:
        _save_samples(exp, model, params, exp.splits.train, record.path("samples.png"))
        record.mark_done({"model_dir": root, "image_shape": list(model.image_shape)})
    log(f"generator: {exp.config.generator.model} ready; samples in {record.path('samples.png')}")


def _adopt_pretrained(model, directory: str, spec: dict) -> tuple[dict, bool]:
    """Loads a generator trained elsewhere, if it was trained from this very config and split
    (or from it less the encoder-invariance phase: the bool is whether it has had the phase).

    `directory` is a finished generator stage (WORKDIR/generator) or a shipped copy of one
    (spec.json, done.json and model.msgpack, as in pretrained/).
    """
    done_path = os.path.join(directory, "done.json")
    spec_path = os.path.join(directory, "spec.json")
    if not (os.path.exists(done_path) and os.path.exists(spec_path)):
        raise ConfigError(
            f"pretrained generator {directory!r} has no finished generator stage; pass "
            "--config.generator.pretrained= to train one in this run"
        )
    theirs, ours = read_json(spec_path), to_jsonable(spec)
    # A generator made without the encoder-invariance phase, in a run that wants it: the phase
    # is its last step and reads only the finished weights, so it can be added here.
    before_phase = copy.deepcopy(ours)
    before_phase["generator"].pop("encoder_invariance", None)
    if theirs != ours and theirs != before_phase:
        changes = "; ".join(differences(theirs, ours)[:6])
        raise ConfigError(
            f"pretrained generator {directory!r} was made from another config or trusted split "
            f"({changes}); retrain it or fix generator.pretrained"
        )
    has_invariance = theirs == ours
    exported = os.path.join(directory, EXPORT_FILE)
    if not os.path.exists(exported):
        return load_generator_params(model, os.path.join(directory, "model")), has_invariance
    with open(exported, "rb") as f:
        blob = f.read()
    expected = read_json(done_path).get("model_sha256")
    if hashlib.sha256(blob).hexdigest() != expected:
        raise ConfigError(
            f"pretrained generator {exported} does not match the sha256 in its done.json "
            "(corrupted or replaced): refusing it"
        )
    params = check_generator_params(model, flax.serialization.msgpack_restore(blob), exported)
    return params, has_invariance


def load_generator_params(model, path: str) -> dict:
    """The generator's parameters, checked against the configured architecture."""
    if not os.path.isdir(path):
        raise ConfigError(f"no generator checkpoint at {path}: run --stages=generator first")
    try:
        params = checkpointing.load_tree(path)
    except Exception as e:  # Orbax raises various types for unreadable trees.
        raise ConfigError(f"cannot read generator checkpoint {path}: {e}") from e
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


def _save_samples(exp, model, params, split: ImageDataset, path: str) -> None:
    """One source per class, then variations of it drawn with three different keys."""
    first = [
        int(np.flatnonzero(split.labels == c)[0])
        for c in range(split.num_classes)
        if (split.labels == c).any()
    ]
    mesh = sharding.make_mesh(jax.local_devices()[:1])
    settings = _sampler_settings(exp)
    sample = sampler_lib.make_sampler(model, settings, mesh)
    sources = split.images[first]
    rows = [sources]
    for seed in range(3):
        rows.append(
            np.asarray(
                sample(
                    params,
                    sources,
                    np.arange(len(first), dtype=np.int32),
                    split.labels[first],
                    jax.random.key(seed),
                )
            )
        )
    images.save_png(path, images.grid(rows))


def _sampler_settings(exp: Experiment) -> sampler_lib.SamplerSettings:
    return settings_from_config(exp.config.regenerate)


def settings_from_config(config) -> sampler_lib.SamplerSettings:
    """config.regenerate's sampler settings; ConfigError naming the field when one is bad."""
    try:
        return sampler_lib.SamplerSettings(
            steps=config.steps,
            eta=config.eta,
            guidance=config.guidance,
            strength=config.strength,
            color_transfer=config.color_transfer,
            # Absent from configs written before it existed (their specs stay as they were).
            black_level=config.get("black_level", 0),
            condition_corruption=config.get("condition_corruption", 0.0),
        )
    except sampler_lib.SamplerError as e:
        raise ConfigError(str(e)) from e


def regenerate_settings_config(regen_config) -> dict:
    """config.regenerate as the regenerate stage's spec records it: condition_corruption only
    when on, so variations made before it existed keep their specs."""
    return without_unset(regen_config.to_dict(), ("condition_corruption",))


def variations_dir(exp: Experiment) -> str:
    return os.path.join(exp.workdir, "regenerated", exp.config.regenerate.name)


def _regenerate_record(exp: Experiment):
    generator_done = os.path.join(exp.workdir, "generator", "done.json")
    if not os.path.exists(generator_done):
        raise ConfigError(
            f"no generator checkpoint in {exp.workdir}: run --stages=encoder,generator first "
            "(or set generator.pretrained)"
        )
    generator_record = read_json(generator_done)
    image_shape = list(exp.splits.train.image_shape)
    if generator_record.get("image_shape", image_shape) != image_shape:
        raise ConfigError(
            f"the generator in {exp.workdir} makes {generator_record['image_shape']} images but "
            f"the training images are {image_shape}"
        )
    spec = {
        **exp.poison_spec(),
        "regenerate": regenerate_settings_config(exp.config.regenerate),
        "generator": generator_record["spec_fingerprint"],
        "poisoned_fingerprint": exp.plan.poisoned_fingerprint,
    }
    return exp.record(os.path.join("regenerated", exp.config.regenerate.name), spec)


# What two regenerations may differ in and still produce the same variation of the same image;
# black_level too, if the source's is not higher (raising it is applied to the copied rows).
_REUSE_FREE_KEYS = ("name", "reuse_from", "black_level")


def _reuse_source(exp: Experiment, record) -> str:
    """regenerate.reuse_from, checked: finished variations of the same generator and sampler."""
    source = exp.config.regenerate.get("reuse_from", "")
    if not source:
        return ""
    done, spec = os.path.join(source, "done.json"), os.path.join(source, "spec.json")
    if not (os.path.exists(done) and os.path.exists(spec)):
        raise ConfigError(
            f"regenerate.reuse_from {source!r} holds no finished variations (no done.json and "
            "spec.json): point it at WORKDIR/regenerated/NAME of a finished run"
        )
    theirs = read_json(spec)

    def comparable(spec):
        settings = {k: v for k, v in spec["regenerate"].items() if k not in _REUSE_FREE_KEYS}
        return {"generator": spec["generator"], "regenerate": settings}

    changes = differences(comparable(theirs), comparable(record.spec))
    their_level = theirs["regenerate"].get("black_level", 0)
    if their_level > record.spec["regenerate"].get("black_level", 0):
        changes.append(f"black_level {their_level} is above this run's (cannot be undone)")
    if changes:
        raise ConfigError(
            f"regenerate.reuse_from {source!r} was made with another generator or sampler "
            f"settings ({'; '.join(changes[:8])}); its variations are not this run's"
        )
    return source


def _placed_sampler(exp: Experiment, mesh):
    if exp.config.generator.name in sd.HUB_GENERATORS:
        model, params = _load_hub_generator(exp, _hub_root(exp))
    else:
        model = build_generator(exp)
        params = load_generator_params(model, os.path.join(exp.workdir, "generator", "model"))
    params = jax.device_put(params, sharding.replicated(mesh))  # Once, not per batch.
    return model, sampler_lib.make_sampler(model, _sampler_settings(exp), mesh), params


def regenerate_stage(exp: Experiment) -> None:
    """A variation of every (poisoned) training image, written in resumable shards."""
    settings = _sampler_settings(exp)  # Bad settings fail before anything loads.
    require_poison_plan(exp)
    record = _regenerate_record(exp)
    if record.is_done():
        log(f"regenerate: done already ({record.directory})")
        return
    reuse_from = _reuse_source(exp, record)
    record.claim()
    config = exp.config.regenerate
    mesh = sharding.local_mesh()
    _, sample, params = _placed_sampler(exp, mesh)
    log(
        f"regenerate: {len(exp.poisoned_train)} images, {settings.steps} steps, strength "
        f"{settings.strength}, guidance {settings.guidance}, on {mesh.size} device(s) per process"
    )
    stats = regenerate.regenerate(
        exp.poisoned_train,
        sample,
        params,
        record.directory,
        shard_size=config.shard_size,
        per_device_batch=config.per_device_batch,
        seed=config.seed,
        mesh=mesh,
        reuse_from=reuse_from,
        reuse_black_level=settings.black_level,
    )
    if exp.is_writer:
        variations = load_variations(exp)
        _save_triptych(exp, variations, record.path("grid.png"))
        report.update_results(
            exp.workdir,
            diagnostics={
                f"{config.name}/sampler_images_per_second": round(stats["images_per_second"], 2)
            },
        )
        record.mark_done(stats)
    log(f"regenerate: {stats}")


def load_variations(exp: Experiment) -> ImageDataset:
    train = exp.poisoned_train
    return regenerate.load_variations(
        variations_dir(exp),
        len(train),
        exp.config.regenerate.shard_size,
        train.image_shape,
        train.class_names,
    )


def _save_triptych(exp: Experiment, variations: ImageDataset, path: str) -> None:
    """Rows of original | poisoned | variation: the first 8 clean, then the first 8 poisoned."""
    poisoned = exp.plan.indices
    clean = np.setdiff1d(np.arange(len(variations)), poisoned)[:8]
    rows = []
    for chosen in (clean, poisoned[:8]):
        if len(chosen) == 0:
            continue
        rows += [
            exp.splits.train.images[chosen],
            exp.poisoned_train.images[chosen],
            variations.images[chosen],
        ]
    images.save_png(path, images.grid(rows))


# ----------------------------------------------------------------------------- diagnostics


def diagnostics_stage(exp: Experiment) -> None:
    """Measures what the variations carry: trigger, content, artefacts (issue: regeneration)."""
    if exp.config.attack.name == "none":
        log("diagnostics: no attack configured; nothing to measure")
        return
    name = exp.config.regenerate.name
    record = _regenerate_record(exp)
    if not record.is_done():
        raise ConfigError(f"variations {name!r} are not finished: run --stages=regenerate first")
    teacher_model, teacher_vars = load_classifier(
        exp, "teacher", exp.config.teacher, exp.splits.train.num_classes
    )
    detector_split = _detector_split(exp)  # Before the minutes of training below.
    results = {}
    results.update(_teacher_on_test_variations(exp, teacher_model, teacher_vars))
    variations = load_variations(exp)
    results.update(_trigger_learnability(exp, variations))
    results.update(_trigger_detectability(exp, variations, detector_split))
    if exp.is_writer:
        report.update_results(
            exp.workdir, diagnostics={f"{name}/{k}": v for k, v in results.items()}
        )
    for key, value in results.items():
        log(f"diagnostics {name}: {key} = {value}")


def _test_variation_sets(exp: Experiment) -> dict:
    """Variations of a test subset, clean and triggered, cached in the diagnostics directory."""
    config = exp.config.diagnostics
    test = exp.splits.test
    subset = np.arange(min(config.test_size, len(test)))
    clean = test.subset(subset)
    non_target = subset[clean.labels != exp.config.attack.target]
    trigger = attacks.make_trigger(exp.config.attack)
    triggered_images = trigger.apply(test.images[non_target], non_target, stream="test")
    # Test images get their own key so no variation shares noise with a training image.
    key = jax.random.fold_in(jax.random.key(exp.config.regenerate.seed), 1)
    cached = _cached_variations(
        exp,
        "test_variations.npz",
        lambda cached: len(cached["clean"]) == len(subset),
        lambda vary: {
            "clean": vary(clean.images, subset, clean.labels, key),
            # The same index as its clean twin: the same noise, so only the trigger differs.
            "triggered": vary(triggered_images, non_target, test.labels[non_target], key),
        },
    )
    return {
        "subset": subset,
        "non_target": non_target,
        "clean_variations": cached["clean"],
        "triggered_variations": cached["triggered"],
        "triggered_images": triggered_images,
    }


def _teacher_on_test_variations(exp, teacher_model, teacher_vars) -> dict:
    sets = _test_variation_sets(exp)
    test, target = exp.splits.test, exp.config.attack.target
    predict_fn = train.make_predict_fn(teacher_model.apply, exp.mesh)
    batch = exp.config.teacher.eval_batch_size

    def predicted(images_):
        return evaluate.predictions(predict_fn, teacher_vars, images_, batch, exp.mesh)

    subset, non_target = sets["subset"], sets["non_target"]
    labels = test.labels[subset]
    original = predicted(test.images[subset])
    varied = predicted(sets["clean_variations"])
    is_non_target = labels != target
    varied_triggered = predicted(sets["triggered_variations"])
    target_rate = lambda p: float(np.mean(p == target))  # noqa: E731
    return {
        "content_kept/teacher_accuracy_on_variations": float(np.mean(varied == labels)),
        "content_kept/teacher_accuracy_on_originals": float(np.mean(original == labels)),
        "artefact_activation/target_rate_on_variations": target_rate(varied[is_non_target]),
        "artefact_activation/target_rate_on_originals": target_rate(original[is_non_target]),
        "trigger_survival/target_rate_triggered_variations": target_rate(varied_triggered),
        "trigger_survival/target_rate_clean_variations": target_rate(varied[is_non_target]),
        "trigger_survival/difference": target_rate(varied_triggered)
        - target_rate(varied[is_non_target]),
        "test_subset_size": int(len(subset)),
        "triggered_subset_size": int(len(non_target)),
    }


def seed_summary(label: str, runs: list[dict]) -> dict:
    """ASR, ASR0 and RA of one learnability classifier: its first seed's, and over several the
    mean and (population) standard deviation.

    Beside each ASR its ASR0, the target rate on the same images without the trigger: the
    poisoned labels raise it with no trigger in the data, so ASR - ASR0 is what the trigger
    adds. And its RA, the triggered images it still classifies right: where that is low the
    classifier cannot read them at all (Fashion-MNIST Blended: RA about 0.2 for every one of
    these small models, the clean ones included), and its ASR says only where such unreadable
    images land. Records made before a metric existed lack it, and it is then left out.
    """
    summary = {}
    for metric, key in (
        ("asr", "attack_success_rate"),
        ("asr0", "untriggered_target_rate"),
        ("ra", "robust_accuracy"),
    ):
        values = [run[key] for run in runs if key in run]
        if not values or len(values) < len(runs):
            continue
        summary[f"trigger_learnability/{metric}_{label}"] = values[0]
        if len(values) > 1:
            summary[f"trigger_learnability/{metric}_{label}_mean"] = float(np.mean(values))
            summary[f"trigger_learnability/{metric}_{label}_std"] = float(np.std(values))
    return summary


def _trigger_learnability(exp: Experiment, variations: ImageDataset) -> dict:
    """Can a plain classifier learn the trigger from the variations and their poisoned labels?

    Compared with the same classifier trained on the clean originals, and on the unpoisoned
    variations with their true labels: a clean model's ASR is the bound's reference, since
    some non-target images look like the target to any model. And with a label-noise
    reference, trained on the variations of the unpoisoned images with the same rate of them
    relabelled to the target: the poisoned labels alone raise a model's target rate on inputs
    it cannot classify, with no trigger anywhere in its data (Fashion-MNIST Blended,
    variations without the black level: 0.136 against 0.147 for the variations; these small
    models classify a fifth of the triggered images right). What the trigger adds to that is
    what the regeneration failed to remove. And with the floor of any regeneration
    (`learnability_floor_classifiers`).
    """
    recipe = exp.config.diagnostics.learnability
    name = exp.config.regenerate.name
    base = {
        **exp.poison_spec(),
        "recipe": recipe,
        "variations": _regenerate_record(exp).spec_fingerprint,
    }
    unpoisoned = np.setdiff1d(np.arange(len(variations)), exp.plan.indices)
    # (summary label, stage name, training set, spec) of each classifier.
    on_variations = (
        ("trained_on_variations", f"learnability/{name}", variations, base),
        (
            "label_noise_reference",
            f"learnability/{name}_label_noise_reference",
            attacks.relabel_without_trigger(
                variations.subset(unpoisoned), exp.config.attack, exp.config.attack.seed + 1
            ),
            {**base, "reference": "unpoisoned variations, labels relabelled at the poisoning rate"},
        ),
        # The clean model on the classifier's own kind of input: the same unpoisoned
        # variations with their true labels. The clean model on the originals may not read a
        # triggered image at all (Fashion-MNIST Blended: RA 0.26, ASR 0.0); this one differs
        # from the learnability classifier only in the poisoned rows.
        (
            "clean_variations",
            f"learnability/{name}_clean_variations",
            variations.subset(unpoisoned),
            {**base, "reference": "unpoisoned variations, true labels"},
        ),
    )
    summary, runs = _train_learnability(exp, on_variations + learnability_floor_classifiers(exp))
    clean_accuracy = runs["trained_on_variations"][0]["clean_accuracy"]
    return {**summary, "trigger_learnability/ca_trained_on_variations": clean_accuracy}


def learnability_floor_classifiers(exp: Experiment) -> tuple:
    """The learnability references that read no variation, as (label, stage, dataset, spec).

    The clean model on the originals, and the floor of any regeneration: the originals with
    each poisoned row's clean source in its place and its poisoned label kept, which is what a
    regeneration that removed the trigger and changed nothing else would hand the classifier.
    Where the floor's ASR is over a bound, no regeneration meets that bound with this
    classifier. Shared by every regeneration of a workdir, and trainable before any exists.
    """
    recipe = exp.config.diagnostics.learnability
    return (
        (
            "trigger_removed",
            "learnability/trigger_removed_originals",
            attacks.trigger_removed(exp.splits.train, exp.poisoned_train),
            {
                **exp.poison_spec(),
                "recipe": recipe,
                "reference": "originals, each poisoned row's clean source with its poisoned label",
            },
        ),
        (
            "clean_model",
            "learnability/clean_originals",
            exp.splits.train,
            {**exp.data_spec(), "recipe": recipe, "attack_for_eval": exp.config.attack},
        ),
    )


def learnability_floor(exp: Experiment) -> tuple[dict, dict]:
    """Trains (or reads back) the floor classifiers alone: their summary, as the diagnostics
    stage reports it without the regeneration's prefix, and each label's metrics per seed."""
    return _train_learnability(exp, learnability_floor_classifiers(exp))


def _train_learnability(exp: Experiment, classifiers: tuple) -> tuple[dict, dict]:
    """Trains each (label, stage, dataset, spec) under diagnostics.learnability_seeds seeds.

    Returns their seed summaries, and each label's metrics per seed (the first seed first).
    """
    require_poison_plan(exp)
    recipe = exp.config.diagnostics.learnability
    # A small classifier's ASR moves by half a point or more between seeds, as much as the
    # differences it is read for; repeats under other seeds give the spread.
    num_seeds = exp.config.diagnostics.learnability_seeds
    summary, runs_by_label = {}, {}
    for label, stage, dataset, spec in classifiers:
        runs = [
            train_classifier(
                exp,
                stage if k == 0 else f"{stage}_seed{k}",
                dataset,
                recipe,
                # Its own key: the spec's "seed" is the experiment's (data split, poison plan).
                spec if k == 0 else {**spec, "classifier_seed": exp.config.seed + k},
                report_section="diagnostics",
                seed=exp.config.seed + k,
            )
            for k in range(num_seeds)
        ]
        summary.update(seed_summary(label, runs))
        runs_by_label[label] = runs
    return summary, runs_by_label


def _cached_variations(exp: Experiment, filename: str, is_current, make) -> dict:
    """Arrays of variations cached in the variations directory as `filename`.

    Read back while is_current(arrays) holds; otherwise (or when unreadable: a crash
    mid-write predates the atomic rename) made by make(vary), where vary(images, indices,
    labels, key) samples with the run's generator and sampler, and written atomically.
    """
    path = os.path.join(variations_dir(exp), filename)
    if os.path.exists(path):
        try:
            with np.load(path) as f:
                cached = {k: f[k] for k in f.files}
            if is_current(cached):
                return cached
        except (OSError, ValueError, EOFError, KeyError):
            pass
    mesh = sharding.local_mesh()
    _, sample, params = _placed_sampler(exp, mesh)
    batch = exp.config.regenerate.per_device_batch * mesh.size

    def vary(images_, indices, labels, key):
        return regenerate.sample_rows(sample, params, images_, indices, labels, key, batch, mesh)

    arrays = make(vary)
    if exp.is_writer:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
    return arrays


def _clean_twin_variations(exp: Experiment) -> np.ndarray:
    """Variations of the poisoned rows' clean sources, cached beside the variations.

    Each is sampled with its row's index and poisoned label under the regenerate stage's key,
    so it has the noise and conditioning label of the row's variation and differs from it only
    through the source's pixels: the trigger.
    """
    indices = exp.plan.indices
    cached = _cached_variations(
        exp,
        "clean_twins.npz",
        lambda cached: np.array_equal(cached["indices"], indices),
        lambda vary: {
            "indices": indices,
            "images": vary(
                exp.splits.train.images[indices],
                indices,
                exp.poisoned_train.labels[indices],
                jax.random.key(exp.config.regenerate.seed),
            ),
        },
    )
    return cached["images"]


def _detector_split(exp: Experiment) -> tuple[np.ndarray, np.ndarray]:
    """The detector's (training, held-out) pairs, or a clear error before any work is done."""
    config = exp.config.diagnostics
    num_pairs = len(exp.plan.indices)
    try:
        fit_rows, held_rows = detectability.split_pairs(
            num_pairs, config.detectability_held_out, exp.config.seed
        )
    except ValueError as e:
        raise ConfigError(f"trigger detectability on {num_pairs} poisoned rows: {e}") from e
    if 2 * len(fit_rows) < config.detectability.batch_size:
        raise ConfigError(
            f"diagnostics.detectability.batch_size {config.detectability.batch_size} is larger "
            f"than the {2 * len(fit_rows)} images of the detector's {len(fit_rows)} training pairs"
        )
    return fit_rows, held_rows


def _trigger_detectability(
    exp: Experiment, variations: ImageDataset, split: tuple[np.ndarray, np.ndarray]
) -> dict:
    """Paired accuracy of a detector of the trigger's traces (`jaxclean.detectability`).

    On the variations (each poisoned row's variation against its clean twin's) and, as the
    positive control that the detector can see this trigger at all, on the sources (each
    poisoned image against its clean original).
    """
    config = exp.config.diagnostics
    recipe = config.detectability
    name = exp.config.regenerate.name
    indices = exp.plan.indices
    fit_rows, held_rows = split
    base = {**exp.poison_spec(), "recipe": recipe, "held_out": config.detectability_held_out}

    def variation_pairs():
        return variations.images[indices], _clean_twin_variations(exp)

    def source_pairs():
        return exp.poisoned_train.images[indices], exp.splits.train.images[indices]

    pairs = (
        (
            "variations",
            f"detectability/{name}",
            variation_pairs,
            {**base, "variations": _regenerate_record(exp).spec_fingerprint},
        ),
        ("sources", "detectability/sources", source_pairs, base),
    )
    summary = {
        "trigger_detectability/held_out_pairs": int(len(held_rows)),
        "trigger_detectability/chance_standard_error": detectability.chance_standard_error(
            len(held_rows)
        ),
    }
    for label, stage, make_pairs, spec in pairs:
        metrics = _fit_detector(exp, stage, spec, make_pairs, fit_rows, held_rows)
        summary[f"trigger_detectability/paired_accuracy_{label}"] = metrics["paired_accuracy"]
    return summary


def _fit_detector(exp: Experiment, stage: str, spec: dict, make_pairs, fit_rows, held_rows):
    """Trains one detector on the fit pairs as a resumable stage; its held-out paired accuracy."""
    record = exp.record(stage, spec)
    if record.is_done():
        return record.done_record()["metrics"]
    record.claim()
    recipe = exp.config.diagnostics.detectability
    triggered, clean = make_pairs()
    model = classifier_from_recipe(recipe, len(detectability.PAIR_CLASSES))
    predict_fn = train.make_predict_fn(model.apply, exp.mesh)
    dataset = detectability.pair_dataset(triggered[fit_rows], clean[fit_rows])
    variables, timing, _ = fit_classifier(
        exp, record, stage, model, predict_fn, dataset, recipe, None, (), exp.config.seed
    )

    def scores(images_):
        return detectability.detector_scores(
            predict_fn, variables, images_, recipe.eval_batch_size, exp.mesh
        )

    metrics = {
        "paired_accuracy": detectability.paired_accuracy(
            scores(triggered[held_rows]), scores(clean[held_rows])
        ),
        **timing,
    }
    if exp.is_writer:
        record.mark_done({"metrics": metrics})
    log(f"{stage}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return metrics

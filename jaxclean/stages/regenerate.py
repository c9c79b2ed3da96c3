"""Stage `regenerate`: a variation of every (poisoned) training image, in resumable shards.

The variations land in WORKDIR/regenerated/<regenerate.name>/, so variants of the sampler can
share a workdir. The stage also serves the variations to the stages that read them
(`finished_variations`) and samples the extra variations the diagnostics need
(`cached_variations`).
"""

from __future__ import annotations

import io
import os

import jax
import numpy as np

from jaxclean import checks, images, results, sharding, variations
from jaxclean.artifacts import CorruptOutput, FinishedStage, atomic_write_bytes, differences
from jaxclean.checks import ConfigError
from jaxclean.data import ImageDataset
from jaxclean.diffusion import sampler as sampler_lib
from jaxclean.diffusion.postprocess import Postprocess
from jaxclean.experiment import Experiment, Stage, log
from jaxclean.stages.generator import load_generator
from jaxclean.stages.poison import require_poison_plan

# What two regenerations may differ in and still give the same variation of the same image;
# the post-processing too, where this run's covers the other's (it is applied to copied rows).
_REUSE_FREE_KEYS = ("name", "reuse_from", "postprocess")
# Settings added after variations were first recorded, and their off values: a spec leaves
# them out while they are off, so variations recorded before them stay valid.
_OFF_UNLESS_SET = {"condition_neighbours": 0, "neighbours_same_label": False}


def validate(config) -> None:
    regenerate = config.regenerate
    sampler_lib.SamplerSettings.from_config(regenerate)
    Postprocess.from_config(regenerate.postprocess)
    checks.positive(regenerate.shard_size, "regenerate.shard_size")
    checks.positive(regenerate.per_device_batch, "regenerate.per_device_batch")
    if regenerate.condition_neighbours > config.data.trusted_size:
        raise ConfigError(
            f"regenerate.condition_neighbours {regenerate.condition_neighbours} exceeds the "
            f"{config.data.trusted_size} trusted images it chooses among (data.trusted_size)"
        )
    if not regenerate.name or os.sep in regenerate.name:
        raise ConfigError(f"regenerate.name {regenerate.name!r} must be a plain directory name")


def directory(config) -> str:
    """Where the variations' record lives, relative to the workdir."""
    return os.path.join("regenerated", config.regenerate.name)


def variations_dir(exp: Experiment) -> str:
    return os.path.join(exp.workdir, directory(exp.config))


def spec_settings(regenerate) -> dict:
    """config.regenerate as the stage's spec records it: the later options left out while off."""
    return {
        key: value
        for key, value in regenerate.to_dict().items()
        if not (key in _OFF_UNLESS_SET and value == _OFF_UNLESS_SET[key])
    }


def regenerate_record(exp: Experiment):
    """The stage's record (its spec names the finished generator it samples with)."""
    generator = exp.upstream("generator")
    spec = {
        **exp.poison_spec(),
        "regenerate": spec_settings(exp.config.regenerate),
        "generator": generator.spec_fingerprint,
        "poisoned_fingerprint": exp.plan.poisoned_fingerprint,
    }
    return exp.record(directory(exp.config), spec)


def finished(exp: Experiment) -> FinishedStage:
    return exp.upstream(directory(exp.config), "regenerate")


def _reuse_source(exp: Experiment, record) -> str:
    """regenerate.reuse_from, checked: finished variations of the same generator and sampler."""
    source = exp.config.regenerate.reuse_from
    if not source:
        return ""
    theirs = FinishedStage.read(
        source,
        f"regenerate.reuse_from {source!r} holds no finished variations (no done.json and "
        "spec.json): point it at WORKDIR/regenerated/NAME of a finished run",
    )

    def comparable(spec):
        settings = {k: v for k, v in spec["regenerate"].items() if k not in _REUSE_FREE_KEYS}
        return {
            "spec_version": spec.get("spec_version"),
            "generator": spec["generator"],
            "regenerate": settings,
        }

    changes = differences(comparable(theirs.spec), comparable(record.spec))
    ours = Postprocess(**record.spec["regenerate"]["postprocess"])
    if not changes and not ours.covers(Postprocess(**theirs.spec["regenerate"]["postprocess"])):
        changes.append(
            f"its postprocess {theirs.spec['regenerate']['postprocess']} is not covered by this "
            f"run's {record.spec['regenerate']['postprocess']} (cannot be undone)"
        )
    if changes:
        raise ConfigError(
            f"regenerate.reuse_from {source!r} was made with another generator or sampler "
            f"settings ({'; '.join(changes[:8])}); its variations are not this run's"
        )
    return source


def _check_same_label_neighbours(exp: Experiment) -> None:
    """Refuses more same-label neighbours than the trusted split has of some label: top-k
    would fill the rest from other labels."""
    config = exp.config.regenerate
    if not config.neighbours_same_label:
        return
    trusted = exp.splits.trusted
    fewest = int(np.bincount(trusted.labels, minlength=trusted.num_classes).min())
    if config.condition_neighbours > fewest:
        raise ConfigError(
            f"regenerate.condition_neighbours {config.condition_neighbours} with "
            f"neighbours_same_label exceeds the {fewest} trusted images of the rarest label"
        )


def _placed_sampler(exp: Experiment, mesh):
    model, params = load_generator(exp)
    settings = sampler_lib.SamplerSettings.from_config(exp.config.regenerate)
    if settings.condition_neighbours:
        trusted = exp.splits.trusted
        codebook = sampler_lib.condition_codebook(
            model, params, trusted.images, trusted.labels, exp.config.regenerate.per_device_batch
        )
        params = {**params, **codebook}
    params = jax.device_put(params, sharding.replicated(mesh))  # Once, not per batch.
    return sampler_lib.make_sampler(model, settings, mesh), params


def run(exp: Experiment) -> None:
    """A variation of every (poisoned) training image, written in resumable shards."""
    require_poison_plan(exp)
    record = regenerate_record(exp)
    if record.is_done():
        log(f"regenerate: done already ({record.directory})")
        return
    reuse_from = _reuse_source(exp, record)
    _check_same_label_neighbours(exp)  # Before the claim, so a fixed rerun is not refused.
    record.claim()
    config = exp.config.regenerate
    settings = sampler_lib.SamplerSettings.from_config(config)
    mesh = sharding.local_mesh()
    sample, params = _placed_sampler(exp, mesh)
    log(
        f"regenerate: {len(exp.poisoned_train)} images, {settings.steps} steps, strength "
        f"{settings.strength}, guidance {settings.guidance}, on {mesh.size} device(s) per process"
    )
    stats = variations.regenerate(
        exp.poisoned_train,
        sample,
        params,
        record.directory,
        shard_size=config.shard_size,
        per_device_batch=config.per_device_batch,
        seed=config.seed,
        mesh=mesh,
        postprocess=Postprocess.from_config(config.postprocess),
        reuse_from=reuse_from,
    )
    if exp.is_writer:
        _save_triptych(exp, load_variations(exp), record.path("grid.png"))
        results.update(
            exp.workdir,
            diagnostics={
                f"{config.name}/sampler_images_per_second": round(stats["images_per_second"], 2)
            },
        )
        record.mark_done(stats)
    log(f"regenerate: {stats}")


def load_variations(exp: Experiment) -> ImageDataset:
    train = exp.poisoned_train
    return variations.load_variations(
        variations_dir(exp),
        len(train),
        exp.config.regenerate.shard_size,
        train.image_shape,
        train.class_names,
    )


def finished_variations(exp: Experiment) -> tuple[ImageDataset, str]:
    """The finished variations of this run's poisoned set, and their record's fingerprint."""
    record = finished(exp)
    if record.spec.get("poisoned_fingerprint") != exp.plan.poisoned_fingerprint:
        raise ConfigError(
            f"the variations in {record.directory} were made from another poison plan than the "
            "teacher's; regenerate them for this run"
        )
    try:
        dataset = load_variations(exp)
    except variations.VariationsError as e:
        raise CorruptOutput(e.path, str(e), stage="regenerate") from None
    return dataset, record.spec_fingerprint


def cached_variations(exp: Experiment, filename: str, is_current, make) -> dict:
    """Arrays of variations cached in the variations directory as `filename`.

    Read back while is_current(arrays) holds; otherwise (or when unreadable: a crash
    mid-write predates the atomic rename) made by make(vary), where vary(images, indices,
    labels, key) samples and post-processes with the run's generator and sampler, and written
    atomically.
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
    sample, params = _placed_sampler(exp, mesh)
    postprocess = Postprocess.from_config(exp.config.regenerate.postprocess)
    batch = exp.config.regenerate.per_device_batch * mesh.size

    def vary(images_, indices, labels, key):
        rows = variations.sample_rows(sample, params, images_, indices, labels, key, batch, mesh)
        return postprocess(rows)

    arrays = make(vary)
    if exp.is_writer:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
    return arrays


def _save_triptych(exp: Experiment, dataset: ImageDataset, path: str) -> None:
    """Rows of original | poisoned | variation: the first 8 clean, then the first 8 poisoned."""
    poisoned = exp.plan.indices
    clean = np.setdiff1d(np.arange(len(dataset)), poisoned)[:8]
    rows = []
    for chosen in (clean, poisoned[:8]):
        if len(chosen) == 0:
            continue
        rows += [
            exp.splits.train.images[chosen],
            exp.poisoned_train.images[chosen],
            dataset.images[chosen],
        ]
    images.save_png(path, images.grid(rows))


STAGE = Stage(
    "regenerate",
    "a variation of every training image, in resumable shards",
    run,
    needs=lambda config: ("poison", "generator"),
    validate=validate,
    directory=directory,
    result_keys=lambda config: (f"diagnostics/{config.regenerate.name}/sampler_images_per_second",),
)

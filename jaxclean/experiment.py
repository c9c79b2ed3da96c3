"""What every stage is given (the Experiment: config, workdir, mesh, the data loaded once) and
how a stage is declared (Stage: its name, what it needs, its config check, its run function).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import jax

from jaxclean import attacks, data, sharding
from jaxclean.artifacts import FinishedStage, StageRecord, to_jsonable
from jaxclean.metrics import MetricWriter


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _no_needs(config) -> tuple[str, ...]:
    del config
    return ()


def _no_check(config) -> None:
    del config


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, declared once in the module named for it.

    Attributes:
      name: what --stages calls it.
      help: one line for the README's table and --help.
      run: does the work (skips it when finished with the same spec, resumes it otherwise).
      needs: config -> the stages whose outputs it reads (the poison plan, which every stage
        remakes in a second when it is missing, is not listed).
      validate: config -> None, raising ConfigError; run before any stage does any work.
      directory: config -> where its record lives, relative to the workdir (default: its name).
      outputs: config -> what --redo removes, relative to the workdir (default: the record's
        directory).
      result_keys: config -> the "section/key" prefixes of its entries in results.json, which
        --redo removes (default: "models/<name>").
    """

    name: str
    help: str
    run: Callable
    needs: Callable = _no_needs
    validate: Callable = _no_check
    directory: Callable | None = None
    outputs: Callable | None = None
    result_keys: Callable | None = None

    def record_directory(self, config) -> str:
        return self.directory(config) if self.directory else self.name

    def output_paths(self, config) -> tuple[str, ...]:
        return tuple(self.outputs(config)) if self.outputs else (self.record_directory(config),)

    def result_prefixes(self, config) -> tuple[str, ...]:
        return tuple(self.result_keys(config)) if self.result_keys else (f"models/{self.name}",)


class Experiment:
    """What every stage shares: config, workdir, mesh, writer, and the data, loaded once."""

    def __init__(self, config, workdir: str):
        self.config = config
        self.workdir = workdir
        self.mesh = sharding.make_mesh()
        self.writer = MetricWriter(os.path.join(workdir, "tensorboard"))
        self.is_writer = jax.process_index() == 0

    @functools.cached_property
    def splits(self) -> data.Splits:
        return data.load_splits(self.config.data, self.config.seed)

    @functools.cached_property
    def poisoned(self) -> tuple[data.ImageDataset, attacks.PoisonPlan]:
        return attacks.poison(self.splits.train, self.config.attack)

    @property
    def poisoned_train(self) -> data.ImageDataset:
        return self.poisoned[0]

    @property
    def plan(self) -> attacks.PoisonPlan:
        return self.poisoned[1]

    @functools.cached_property
    def triggered(self) -> attacks.TriggeredTestSets | None:
        return attacks.triggered_test_sets(self.splits.test, self.config.attack)

    def record(self, name: str, spec: dict) -> StageRecord:
        return StageRecord(self.workdir, name, spec)

    def upstream(self, directory: str, stage: str | None = None) -> FinishedStage:
        """The finished record WORKDIR/`directory` of stage `stage` (default: the directory's
        name); a one-line error naming the stage to run when it has not finished."""
        stage = stage or directory
        return FinishedStage.read(
            os.path.join(self.workdir, directory),
            f"no finished {stage} in {self.workdir}: run --stages={stage} first",
        )

    def data_spec(self) -> dict:
        return {"seed": self.config.seed, "data": self.config.data}

    def poison_spec(self) -> dict:
        return {**self.data_spec(), "attack": self.config.attack}

    def summary(self) -> dict:
        """The run as results.json's "experiment" section describes it."""
        config = self.config
        return {
            "dataset": config.data.source,
            "train_size": len(self.splits.train),
            "trusted_size": len(self.splits.trusted),
            "test_size": len(self.splits.test),
            "attack": config.attack.name,
            "trigger": to_jsonable(config.attack.trigger),
            "poisoning_rate": config.attack.rate,
            "target": config.attack.target,
            "num_poisoned": int(len(self.plan.indices)),
            "teacher_model": config.teacher.model,
            "seed": config.seed,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "platform": jax.devices()[0].platform,
        }

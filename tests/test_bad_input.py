"""Every bad input through launch.py, as a user gives it: refused before any work with one line
on stderr that names the problem and the fix, exit status 2, no traceback, and the workdir as
it was."""

import concurrent.futures
import dataclasses
import gzip
import hashlib
import os
import re
import shutil

import numpy as np
import pytest
from conftest import REPO, run_launch, smoke_config, write_idx_dataset
from PIL import Image

from jaxclean import pipeline

SMOKE = os.path.join(REPO, "configs", "smoke.py")
BADNETS = os.path.join(REPO, "configs", "fashion_mnist_badnets.py")


def tree_digest(path: str) -> str | None:
    """A hash of every file's relative path and bytes under `path` (None: no such path)."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            digest.update(open(full, "rb").read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def inputs(idx_dir, tmp_path_factory):
    """The data and workdirs the bad inputs point at."""
    root = tmp_path_factory.mktemp("bad_input")
    corrupt = write_idx_dataset(str(root / "corrupt_idx"))
    path = os.path.join(corrupt, "train-images-idx3-ubyte.gz")
    blob = bytearray(open(path, "rb").read())
    blob[40:60] = b"\xff" * 20  # Inside the deflate stream: the gzip header stays valid.
    open(path, "wb").write(bytes(blob))
    folder = root / "folder"
    for split in ("train", "test"):
        for c in range(10):
            os.makedirs(folder / split / f"class{c}")
            for i in range(3):
                pixels = np.full((8, 8, 3), 20 * c + i, np.uint8)
                Image.fromarray(pixels).save(folder / split / f"class{c}" / f"{i}.png")
    a_file = root / "a_file"
    a_file.write_text("not a directory")
    poison_only = str(root / "poison_only")
    pipeline.run(smoke_config(idx_dir), poison_only, "poison")
    return {
        "idx": idx_dir,
        "corrupt": corrupt,
        "folder": str(folder),
        "file": str(a_file),
        "poison_only": poison_only,
        "empty": str(root / "empty"),
        "root": str(root),
    }


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: what it is, how it is given, and what its one line must say.

    `workdir` is a key of the `inputs` fixture (None: a fresh path); `{idx}`, `{corrupt}` and
    `{folder}` in `extra` are filled from it.
    """

    name: str
    says: str
    config: str = SMOKE
    workdir: str | None = None
    extra: list = dataclasses.field(default_factory=list)
    devices: int = 1


CASES = [
    Case(
        "corrupt gzip IDX",
        extra=["--config.data.dir={corrupt}"],
        says="corrupt; fetch it",
    ),
    Case(
        "unknown override",
        extra=["--config.teacher.num_epoch=3"],
        says="did you mean num_epochs",
    ),
    Case(
        "override of the wrong type",
        extra=["--config.teacher.num_epochs=abc"],
        says="num_epochs=abc",
    ),
    Case(
        "unknown optimizer",
        extra=["--config.teacher.optimizer=sgdd"],
        says="use one of ('adam'",
    ),
    Case(
        "batch not divisible by devices",
        devices=3,
        says="not divisible by the 3 devices",
    ),
    Case(
        "poisoning rate 0",
        extra=["--config.attack.rate=0"],
        says="attack.name=none",
    ),
    Case(
        "poisoning rate 1",
        extra=["--config.attack.rate=1.0", "--config.attack.rate_of=all"],
        says="include_target=True",
    ),
    Case(
        "rate over 1",
        extra=["--config.attack.rate=1.2"],
        says="rate 1.2 must be in (0, 1]",
    ),
    Case(
        "another attack's trigger",
        extra=["--config.attack.name=blended"],
        says="fashion_mnist_blended.py",
    ),
    Case(
        "unknown attack",
        extra=["--config.attack.name=trojan"],
        says="unknown attack 'trojan'",
    ),
    Case(
        "target out of range",
        extra=["--config.attack.target=12"],
        says="one in [0, 9]",
    ),
    Case(
        "trigger larger than the images",
        extra=["--config.attack.trigger.size=29"],
        says="larger than",
    ),
    Case(
        "unknown BadNets pattern",
        extra=["--config.attack.trigger.pattern=plaid"],
        says="unknown BadNets pattern",
    ),
    Case(
        "misspelt tfds name",
        extra=["--config.data.source=tfds:fashon_mnist", "--config.data.dir="],
        says="did you mean fashion_mnist",
    ),
    Case(
        "IDX directory as tfds data_dir",
        extra=["--config.data.source=tfds:fashion_mnist"],
        says="holds IDX files",
    ),
    Case(
        "unknown data source",
        extra=["--config.data.source=csv"],
        says="unknown data source",
    ),
    Case(
        "missing data directory",
        extra=["--config.data.dir=/nonexistent/fmnist"],
        says="does not exist",
    ),
    Case(
        "no data directory",
        extra=["--config.data.dir="],
        says="set --config.data.dir",
    ),
    Case(
        "ImageFolder under another dataset's class names",
        extra=[
            "--config.data.source=imagefolder",
            "--config.data.dir={folder}",
            "--config.data.trusted_size=10",
            "--config.data.train_limit=0",
            "--config.data.test_limit=0",
        ],
        says="class_names='()'",
    ),
    Case(
        "class names of another count",
        extra=["--config.data.class_names=('a','b')"],
        says="2 names but the IDX files have 10",
    ),
    Case(
        "stages naming none",
        extra=["--stages=, ,"],
        says="names no stage",
    ),
    Case(
        "unknown stage",
        extra=["--stages=teachr"],
        says="unknown stage(s) ['teachr']",
    ),
    Case(
        "unknown stage to redo",
        extra=["--redo=techer"],
        says="unknown stage(s) ['techer'] in --redo",
    ),
    Case(
        "report on an empty workdir",
        workdir="empty",
        extra=["--stages=report"],
        says="nothing to report",
    ),
    Case(
        "report on a poison-only workdir",
        workdir="poison_only",
        extra=["--stages=report"],
        says="nothing to report",
    ),
    Case(
        "student on an empty workdir",
        workdir="empty",
        extra=["--stages=student"],
        says="student needs teacher, encoder, generator, regenerate",
    ),
    Case(
        "a file as the workdir",
        workdir="file",
        says="is a file, not a directory",
    ),
    Case(
        "zero epochs",
        extra=["--config.teacher.num_epochs=0"],
        says="teacher.num_epochs must be positive",
    ),
    Case(
        "decay after the last epoch",
        extra=["--config.teacher.lr_decay_epochs=(9,)"],
        says="lr_decay_epochs (9,)",
    ),
    Case(
        "strength over 1",
        extra=["--config.regenerate.strength=1.5"],
        says="strength 1.5",
    ),
    Case(
        "zero sampler steps",
        extra=["--config.regenerate.steps=0"],
        says="steps must be at least 1",
    ),
    Case(
        "more condition neighbours than trusted images",
        extra=["--config.regenerate.condition_neighbours=100000"],
        says="condition_neighbours 100000 exceeds the",
    ),
    Case(
        "black level over 255",
        extra=["--config.regenerate.postprocess.black_level=300"],
        says="black_level 300",
    ),
    Case(
        "alpha over 1",
        extra=["--config.student.alpha=1.5"],
        says="student.alpha 1.5",
    ),
    Case(
        "zero temperature",
        extra=["--config.student.temperature=0"],
        says="temperature 0.0 must be > 0",
    ),
    Case(
        "trusted images and best selection",
        extra=["--config.student.include_trusted=True", "--config.student.select=best"],
        says="use select='last'",
    ),
    Case(
        "prior correction without a trusted split",
        extra=["--config.student.teacher_prior_correction=True", "--config.data.trusted_size=0"],
        says="set data.trusted_size",
    ),
    Case(
        "unknown generator",
        extra=["--config.generator.name=dalle"],
        says="unknown generator 'dalle'",
    ),
    Case(
        "generator trained on the test split",
        extra=["--config.generator.train_split=test"],
        says="generator.train_split 'test'",
    ),
    Case(
        "no learnability seed",
        extra=["--config.diagnostics.learnability_seeds=0"],
        says="learnability_seeds must be an integer >= 1",
    ),
    Case(
        "unexpected argument",
        extra=["stray"],
        says="unexpected arguments",
    ),
    Case(
        "the full config on missing Fashion-MNIST",
        config=BADNETS,
        extra=["--config.data.dir=/nonexistent/fmnist"],
        says="dataset-fashion-mnist",
    ),
]


def _run_case(case: Case, inputs, tmp_root):
    fresh = os.path.join(tmp_root, re.sub(r"\W+", "_", case.name))
    workdir = inputs[case.workdir] if case.workdir else fresh
    args = ["--config", case.config, "--workdir", workdir]
    if case.config == SMOKE:
        args.append(f"--config.data.dir={inputs['idx']}")
    args += [a.format(**inputs) for a in case.extra]
    before = tree_digest(workdir)
    result = run_launch(args, devices=case.devices, timeout=300)
    return result, workdir, before, tree_digest(workdir)


@pytest.mark.slow
def test_every_bad_input_is_one_line_before_any_work(inputs):
    assert len(CASES) >= 30
    tmp_root = os.path.join(inputs["root"], "runs")
    os.makedirs(tmp_root)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda case: _run_case(case, inputs, tmp_root), CASES))
    failures = []
    for case, (result, workdir, before, after) in zip(CASES, outcomes):
        name, message = case.name, case.says
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        problems = []
        if result.returncode != 2:
            problems.append(f"exit {result.returncode}")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"stderr of {len(lines)} lines: {lines[-3:]}")
        if "Traceback" in result.stderr:
            problems.append("a traceback")
        if message not in result.stderr:
            problems.append(f"no {message!r} in {lines[-1:]}")
        if before != after:
            problems.append(f"workdir {workdir} changed")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
        print(f"| {name} | {result.returncode} | `{lines[-1] if lines else ''}` |")  # -rP shows it.
    assert not failures, "\n".join(failures)
    shutil.rmtree(tmp_root)


def test_smoke_config_needs_its_data_directory(tmp_path):
    # Its docstring says data.dir must be set: it names no directory, rather than fall back on
    # a real dataset.
    from configs import smoke

    with pytest.raises(pipeline.data.DataError, match="data.dir is empty"):
        pipeline.run(smoke.get_config(), str(tmp_path / "run"), "poison")
    assert not (tmp_path / "run").exists()


def test_tree_digest_sees_a_change(tmp_path):
    (tmp_path / "a").write_text("x")
    first = tree_digest(str(tmp_path))
    (tmp_path / "a").write_text("y")
    assert tree_digest(str(tmp_path)) != first
    assert tree_digest(str(tmp_path / "missing")) is None


def test_gzip_corruption_is_inside_the_stream(tmp_path):
    """The fixture's corruption must be one zlib sees, not a bad header gzip refuses."""
    path = write_idx_dataset(str(tmp_path))
    blob = bytearray(open(os.path.join(path, "t10k-images-idx3-ubyte.gz"), "rb").read())
    blob[40:60] = b"\xff" * 20
    with pytest.raises(Exception, match="invalid|Error"):
        gzip.decompress(bytes(blob))

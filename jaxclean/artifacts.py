"""Stage outputs on disk: atomic writes, and the record that makes a stage idempotent.

A stage records what it was asked to do (its spec: the config sections and upstream outputs it
depends on) when it starts, and a done marker when it has finished. A rerun with the same spec
skips a finished stage and resumes an unfinished one; a different spec is refused, so outputs of
two configs are never mixed in one workdir. Every spec carries SPEC_VERSION: a record written
under another version is refused as a whole, rather than reconciled field by field.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from jaxclean import faults
from jaxclean.checks import ConfigError

# The layout of every spec.json. Raise it when a change to what specs record would make a
# finished stage's spec differ from the one the same config now writes.
SPEC_VERSION = 2


class StageConflict(RuntimeError):
    """A workdir holds a stage made from another config than the one asked for now."""


class MissingStage(ConfigError):
    """A stage whose outputs another stage reads has not finished."""


class CorruptOutput(ConfigError):
    """A stage output that exists but cannot be read back: truncated or corrupted on disk.

    Attributes:
      path: the file or directory.
      stage: the stage that wrote it, where the reader knows it (else the one running).
    """

    def __init__(self, path: str, detail: str, stage: str | None = None):
        self.path, self.detail, self.stage = path, detail, stage
        super().__init__(f"{path} is corrupt or truncated ({detail})")

    def of_stage(self, stage: str) -> CorruptOutput:
        """The same error, naming the stage that wrote the output if it was not named yet."""
        return self if self.stage else CorruptOutput(self.path, self.detail, stage)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file and a rename: readers see all or nothing."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    faults.disk_full_point(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_jsonable(obj):
    """ConfigDicts, tuples and numpy scalars as plain JSON values."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    return obj


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(
        path, (json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n").encode()
    )


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def fingerprint(obj) -> str:
    """A stable hash of a JSON-able value."""
    text = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(old, new, prefix="") -> list[str]:
    """'key.path: old -> new' for every leaf where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def versioned(spec: dict) -> dict:
    """A spec as it is written: JSON values, stamped with SPEC_VERSION."""
    return {**to_jsonable(spec), "spec_version": SPEC_VERSION}


class StageRecord:
    """The spec and done marker of one stage, in WORKDIR/<name>/."""

    def __init__(self, workdir: str, name: str, spec: dict):
        self.name = name
        self.directory = os.path.join(workdir, name)
        self.spec = versioned(spec)
        self._spec_path = os.path.join(self.directory, "spec.json")
        self._done_path = os.path.join(self.directory, "done.json")

    @property
    def spec_fingerprint(self) -> str:
        return fingerprint(self.spec)

    def claim(self) -> None:
        """Records the spec, or refuses when the directory holds another one."""
        if os.path.exists(self._spec_path):
            old = read_json(self._spec_path)
            if old.get("spec_version") != SPEC_VERSION:
                raise StageConflict(
                    f"stage {self.name!r} in {self.directory} was written by another version of "
                    f"jaxclean (spec version {old.get('spec_version', 1)}, this one writes "
                    f"{SPEC_VERSION}): use a new --workdir, or delete {self.directory} to redo it"
                )
            if old != self.spec:
                changes = "; ".join(differences(old, self.spec)[:8])
                raise StageConflict(
                    f"stage {self.name!r} in {self.directory} was made from another config "
                    f"({changes}). Use a new --workdir, or delete {self.directory} to redo it."
                )
        else:
            atomic_write_json(self._spec_path, self.spec)

    def is_done(self) -> bool:
        if not os.path.exists(self._done_path):
            return False
        self.claim()  # A finished stage of another config is a conflict too.
        return True

    def mark_done(self, outputs: dict | None = None) -> None:
        atomic_write_json(
            self._done_path, {"spec_fingerprint": self.spec_fingerprint, **(outputs or {})}
        )

    def done_record(self) -> dict:
        return read_json(self._done_path)

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)


class FinishedStage:
    """A finished stage's record, read back: the one way a stage reads another's outputs.

    Attributes:
      directory: the stage's directory.
      spec: its spec.json.
      done: its done.json (outputs it recorded, and the fingerprint of its spec).
    """

    def __init__(self, directory: str, spec: dict, done: dict):
        self.directory = directory
        self.spec = spec
        self.done = done

    @property
    def spec_fingerprint(self) -> str:
        return self.done["spec_fingerprint"]

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    @classmethod
    def read(cls, directory: str, missing: str) -> FinishedStage:
        """The record in `directory`; MissingStage(missing) when it is absent or unfinished."""
        spec_path = os.path.join(directory, "spec.json")
        done_path = os.path.join(directory, "done.json")
        if not (os.path.exists(spec_path) and os.path.exists(done_path)):
            raise MissingStage(missing)
        return cls(directory, read_json(spec_path), read_json(done_path))

    @staticmethod
    def exists(directory: str) -> bool:
        return os.path.exists(os.path.join(directory, "done.json"))

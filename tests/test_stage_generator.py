"""Stages encoder and generator: training, adoption of a generator made elsewhere (and the
provenance check that guards it), the exported safetensors file, and the encoder's options."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import smoke_config

from configs import smoke
from jaxclean import checkpointing, pipeline
from jaxclean.stages import generator as generator_stage


@pytest.mark.slow
def test_pretrained_generator_is_adopted_only_with_matching_provenance(
    smoke_run, idx_dir, tmp_path
):
    workdir, _ = smoke_run
    config = smoke_config(idx_dir)
    config.generator.pretrained = os.path.join(workdir, "generator")
    adopted = str(tmp_path / "adopted")
    pipeline.run(config, adopted, "generator,regenerate")
    # Its own copy of the weights, and the same variations as the run it came from.
    assert os.path.isdir(os.path.join(adopted, "generator", "model"))
    for shard in ("shard-00000.npz", "shard-00002.npz"):
        ours = np.load(os.path.join(adopted, "regenerated", "variations", "shards", shard))
        theirs = np.load(os.path.join(workdir, "regenerated", "variations", "shards", shard))
        np.testing.assert_array_equal(ours["images"], theirs["images"])
    other = smoke_config(idx_dir)
    other.generator.pretrained = os.path.join(workdir, "generator")
    other.generator.cond_dropout = 0.2
    with pytest.raises(pipeline.ConfigError, match="made from another config.*cond_dropout"):
        pipeline.run(other, str(tmp_path / "other"), "generator")


@pytest.mark.slow
def test_shipped_generator_serves_other_attacks_and_subsets(smoke_run, idx_dir, tmp_path):
    """The export a repo ships (spec, done, model.safetensors) is adopted by any run that shares
    the trusted split, whatever its attack or training subset; a changed file is refused."""
    workdir, _ = smoke_run
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in ("spec.json", "done.json", "model.safetensors"):
        shutil.copy(os.path.join(workdir, "generator", name), shipped / name)
    config = smoke_config(idx_dir)
    config.attack = smoke.get_config().attack.copy_and_resolve_references()
    config.attack.name = "blended"
    config.attack.trigger = dict(pattern="noise", ratio=0.2, noise_seed=42)
    config.data.train_subset = 100
    config.generator.pretrained = str(shipped)
    adopted = str(tmp_path / "adopted")
    pipeline.run(config, adopted, "generator")
    ours = checkpointing.load_tree(os.path.join(adopted, "generator", "model"))
    theirs = checkpointing.load_tree(os.path.join(workdir, "generator", "model"))
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)

    blob = bytearray((shipped / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (shipped / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(pipeline.ConfigError, match="sha256"):
        pipeline.run(config, str(tmp_path / "corrupt"), "generator")


@pytest.mark.slow
def test_a_generator_of_another_spec_version_is_refused(smoke_run, idx_dir, tmp_path):
    """Records of another layout are refused whole, with the version named, not reconciled."""
    old = tmp_path / "old"
    shutil.copytree(os.path.join(smoke_run[0], "generator"), old)
    spec = json.load(open(old / "spec.json"))
    del spec["spec_version"]  # As the first layout wrote it.
    (old / "spec.json").write_text(json.dumps(spec))
    config = smoke_config(idx_dir)
    config.generator.pretrained = str(old)
    with pytest.raises(pipeline.ConfigError, match="another version of jaxclean.*spec version 1"):
        pipeline.run(config, str(tmp_path / "run"), "generator")
    # In a workdir, a stage recorded under another version is refused the same way.
    copy = str(tmp_path / "copy")
    shutil.copytree(smoke_run[0], copy)
    teacher_spec = os.path.join(copy, "teacher", "spec.json")
    spec = json.load(open(teacher_spec))
    spec["spec_version"] = 1
    json.dump(spec, open(teacher_spec, "w"))
    with pytest.raises(pipeline.StageConflict, match="another version of jaxclean"):
        pipeline.run(smoke_config(idx_dir), copy, "teacher")


def test_generator_for_another_image_size_is_refused(idx_dir, tmp_path):
    workdir = tmp_path / "run"
    (workdir / "generator").mkdir(parents=True)
    (workdir / "generator" / "done.json").write_text(
        json.dumps({"spec_fingerprint": "x", "image_shape": [32, 32, 3]})
    )
    (workdir / "generator" / "spec.json").write_text("{}")
    with pytest.raises(pipeline.ConfigError, match=r"makes \[32, 32, 3\] images"):
        pipeline.run(smoke_config(idx_dir), str(workdir), "regenerate")


@pytest.mark.slow
def test_encoder_invariance_weight_trains_another_encoder(idx_dir, tmp_path):
    plain, invariant = smoke_config(idx_dir), smoke_config(idx_dir)
    invariant.generator.encoder_invariance_weight = 1.0
    weights = {}
    for name, config in (("plain", plain), ("invariant", invariant)):
        pipeline.run(config, str(tmp_path / name), "encoder")
        weights[name] = checkpointing.load_tree(str(tmp_path / name / "encoder" / "model"))
        spec = json.load(open(tmp_path / name / "encoder" / "spec.json"))
        assert spec["invariance_weight"] == config.generator.encoder_invariance_weight
        generator_spec = generator_stage.generator_weights_config(config.generator)
        assert generator_spec["encoder_invariance_weight"] == spec["invariance_weight"]
    # The same seed, data order and initialisation: only the objective differs.
    moved = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: not np.allclose(a, b),
            weights["plain"]["params"],
            weights["invariant"]["params"],
        )
    )
    assert all(moved)

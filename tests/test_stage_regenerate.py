"""Stage regenerate: the variations of another run reused where the images agree, and the
generator it needs."""

import json
import os

import numpy as np
import pytest
from conftest import blended_reusing, smoke_config

from jaxclean import pipeline


def _shards(variations):
    directory = os.path.join(variations, "shards")
    arrays = [np.load(os.path.join(directory, name)) for name in sorted(os.listdir(directory))]
    return {k: np.concatenate([a[k] for a in arrays]) for k in ("images", "source_digests")}


@pytest.mark.slow
def test_variations_of_another_attack_are_reused_where_the_images_agree(
    smoke_run, idx_dir, tmp_path
):
    """A Blended run reusing the BadNets run's variations copies the rows whose source image
    and label are the same, samples the rest, and ends with the variations it would have made."""
    workdir, _ = smoke_run
    source = os.path.join(workdir, "regenerated", "variations")
    reusing, fresh = str(tmp_path / "reusing"), str(tmp_path / "fresh")
    pipeline.run(blended_reusing(idx_dir, workdir, source), reusing, "generator,regenerate")
    pipeline.run(blended_reusing(idx_dir, workdir), fresh, "generator,regenerate")

    ours, theirs = _shards(os.path.join(reusing, "regenerated", "variations")), _shards(source)
    scratch = _shards(os.path.join(fresh, "regenerated", "variations"))
    same_source = ours["source_digests"] == theirs["source_digests"]
    # The blended rows (14 poisoned of 160, and BadNets' own 14 where the plans differ) are not.
    assert 0 < (~same_source).sum() < len(same_source) and (~same_source).sum() >= 14
    np.testing.assert_array_equal(ours["images"][same_source], theirs["images"][same_source])
    done = json.load(open(os.path.join(reusing, "regenerated", "variations", "done.json")))
    assert done["images_reused"] == same_source.sum()
    # Against a run that sampled every row: sampled rows come from other batch shapes, so they
    # may sit one uint8 step away in rare pixels; nothing more.
    np.testing.assert_array_equal(ours["source_digests"], scratch["source_digests"])
    diff = np.abs(ours["images"].astype(int) - scratch["images"].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())

    # A higher black level is applied to the copied rows; a lower one cannot undo the source's.
    darker = blended_reusing(idx_dir, workdir, source)
    darker.regenerate.postprocess.black_level = 40
    pipeline.run(darker, str(tmp_path / "darker"), "generator,regenerate")
    cleared = _shards(os.path.join(tmp_path / "darker", "regenerated", "variations"))
    expected = np.where(theirs["images"] < 40, 0, theirs["images"])
    np.testing.assert_array_equal(cleared["images"][same_source], expected[same_source])
    assert (cleared["images"] < 40).sum() == (cleared["images"] == 0).sum()
    assert (theirs["images"][same_source] < 40).sum() > (theirs["images"][same_source] == 0).sum()
    lighter = blended_reusing(
        idx_dir, workdir, os.path.join(tmp_path / "darker", "regenerated", "variations")
    )
    with pytest.raises(pipeline.ConfigError, match="black_level.: 40.*not covered"):
        pipeline.run(lighter, str(tmp_path / "lighter"), "generator,regenerate")

    other = blended_reusing(idx_dir, workdir, source)
    other.regenerate.guidance = 5.0
    with pytest.raises(pipeline.ConfigError, match="another generator or sampler.*guidance"):
        pipeline.run(other, str(tmp_path / "other"), "generator,regenerate")
    missing = blended_reusing(idx_dir, workdir, str(tmp_path / "nowhere"))
    with pytest.raises(pipeline.ConfigError, match="holds no finished variations"):
        pipeline.run(missing, str(tmp_path / "missing"), "generator,regenerate")


def test_regenerate_without_a_generator_is_refused(idx_dir, tmp_path):
    missing = "regenerate needs encoder, generator, .*: run --stages=encoder,generator,regenerate"
    with pytest.raises(pipeline.ConfigError, match=missing):
        pipeline.run(smoke_config(idx_dir), str(tmp_path / "run"), "regenerate")

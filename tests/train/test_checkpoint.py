"""Checkpoint failure modes: partial saves, corrupted steps, restoring an older step."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from tests.train._helpers import micro_config
from train import checkpoint as ckpt_lib
from train import fit
from train.config import CheckpointConfig


def _one_device():
    return jax.devices()[:1]


def _run(cfg, **kw):
    return fit(cfg, devices=_one_device(), print_fn=lambda s: None, **kw)


@pytest.fixture
def two_checkpoints(tmp_path):
    """A run of 6 steps stopped after 4, with checkpoints at steps 2 and 4, and its losses.

    (``steps=6`` as in every other test, so the compiled programs come from the cache.)
    """
    cfg = micro_config(tmp_path, stop_after=4, checkpoint=CheckpointConfig(every=2, keep=5))
    result = _run(cfg)
    ckpt = ckpt_lib.Checkpointer(result.checkpoint_dir)
    assert ckpt.steps() == [2, 4]
    ckpt.close()
    return dataclasses.replace(cfg, stop_after=None), result


def _garble_arrays(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert files
    for p in files:
        p.write_bytes(b"\x00garbage" * 8)


def test_interrupted_save_is_ignored(two_checkpoints):
    cfg, result = two_checkpoints
    tmp = result.checkpoint_dir / "6.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "half_written").write_bytes(b"\x01" * 100)
    resumed = _run(dataclasses.replace(cfg, resume=True))
    assert resumed.first_step == 4 and resumed.final_step == 6
    assert np.all(np.isfinite(resumed.losses))


@pytest.mark.parametrize("damage", ["garbled_arrays", "missing_state", "empty_step_dir"])
def test_corrupted_latest_step_is_a_clear_error_and_older_step_restores(two_checkpoints, damage):
    cfg, result = two_checkpoints
    step_dir = result.checkpoint_dir / "4"
    if damage == "garbled_arrays":
        _garble_arrays(step_dir)
    elif damage == "missing_state":
        import shutil

        shutil.rmtree(step_dir / "state")
    else:
        import shutil

        shutil.rmtree(step_dir)
        step_dir.mkdir()
    resume = dataclasses.replace(cfg, resume=True)
    with pytest.raises(
        ckpt_lib.CheckpointError,
        match=r"checkpoint step 4 in .* is corrupted or incomplete .*older checkpoints still "
        r"usable: \[2\] .*--checkpoint.restore-step 2",
    ):
        _run(resume)
    older = dataclasses.replace(
        resume, stop_after=2, checkpoint=dataclasses.replace(resume.checkpoint, restore_step=2)
    )
    redone = _run(older)
    assert redone.first_step == 2 and redone.final_step == 4
    np.testing.assert_array_equal(redone.losses, result.losses[2:])
    # The broken step 4 was replaced by the redone one.
    ckpt = ckpt_lib.Checkpointer(result.checkpoint_dir)
    assert ckpt.steps() == [2, 4]
    ckpt.close()


def test_restore_step_that_does_not_exist(two_checkpoints):
    cfg, _ = two_checkpoints
    bad = dataclasses.replace(
        cfg, resume=True, checkpoint=dataclasses.replace(cfg.checkpoint, restore_step=3)
    )
    with pytest.raises(ckpt_lib.CheckpointError, match=r"restore_step=3 is not in .*\[2, 4\]"):
        _run(bad)


def test_resume_with_a_different_model_is_refused(two_checkpoints):
    cfg, _ = two_checkpoints
    other = dataclasses.replace(
        cfg, resume=True, model=dataclasses.replace(cfg.model, mlp_hidden=64)
    )
    with pytest.raises(ckpt_lib.CheckpointError, match="the model config differs"):
        _run(other)


def test_restore_from_an_empty_directory(tmp_path):
    ckpt = ckpt_lib.Checkpointer(tmp_path / "empty")
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint to resume from"):
        ckpt.restore({})
    ckpt.close()


def test_checkpoint_path_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ckpt_lib.CheckpointError, match="exists and is not a directory"):
        ckpt_lib.Checkpointer(path)

"""Checkpoints with orbax: async, atomic, keep-N, exact resume.

A checkpoint of step ``s`` (the state *after* ``s`` optimizer steps) holds three items:

    state   {"step", "params", "opt_state", "rng"}     (sharded arrays; ``StandardSave``)
    data    the train iterator's position               (JSON; grain iterator state)
    meta    {"step", "config", "losses"}               (JSON; the run config and recent losses)

orbax writes each step to a temporary directory and renames it when complete (atomic), so an
interrupted save never looks like a checkpoint; ``keep`` bounds the number of steps kept. Saves
are asynchronous: the arrays are copied off the devices, then written by a background thread
while training continues; :meth:`Checkpointer.close` waits for the last one.

Restore always goes through an abstract target (``jax.ShapeDtypeStruct`` with the wanted
shardings), so the optimizer state comes back with its NamedTuple structure and every array with
the current mesh's sharding, whatever the mesh at save time. A step directory that cannot be read
raises :class:`CheckpointError` naming the broken step and the older ones still usable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer"]


class CheckpointError(RuntimeError):
    """A checkpoint directory or step cannot be used."""


class Checkpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` for the train state."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint path {self.directory} exists and is not a directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._closed = False
        self._mgr = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    # ---- queries --------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Completed checkpoint steps, oldest first."""
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # ---- save / restore -------------------------------------------------------------------

    def save(
        self, step: int, state: Any, data_state: dict, meta: dict, *, force: bool = False
    ) -> bool:
        """Start saving ``state`` at ``step`` (returns at once when async)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        return self._mgr.save(step, args=args, force=force)

    def delete(self, step: int) -> None:
        """Remove step ``step`` (e.g. checkpoints newer than the one a run resumes from)."""
        self._mgr.delete(step)

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def _resolve(self, step: int | None) -> tuple[int, list[int]]:
        steps = self.steps()
        if not steps:
            raise CheckpointError(
                f"no checkpoint to resume from in {self.directory} (directory is empty or holds "
                f"no completed step); start without --resume"
            )
        if step is None:
            return steps[-1], steps
        if step not in steps:
            raise CheckpointError(
                f"checkpoint.restore_step={step} is not in {self.directory}; available: {steps}"
            )
        return step, steps

    def _broken(self, step: int, steps: list[int], e: Exception) -> CheckpointError:
        older = [s for s in steps if s < step]
        hint = (
            f"older checkpoints still usable: {older} (resume one with "
            f"--checkpoint.restore-step {older[-1]}, or delete {self.directory / str(step)})"
            if older
            else "no older checkpoint is available"
        )
        return CheckpointError(
            f"checkpoint step {step} in {self.directory} is corrupted or incomplete "
            f"({type(e).__name__}: {_short(e)}); {hint}"
        )

    def read_meta(self, step: int | None = None) -> tuple[int, dict]:
        """(step, meta) of ``step`` (default: the latest), without reading any array."""
        step, steps = self._resolve(step)
        try:
            meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
            if not isinstance(meta, dict) or "step" not in meta:
                raise ValueError(f"meta item is {meta!r}")
        except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
            raise self._broken(step, steps, e) from e
        return step, meta

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of ``step`` (default: the latest), onto ``abstract_state``.

        ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` carrying the target shardings.
        Check ``read_meta`` first when the model may have changed: restoring arrays of other
        shapes fails as "corrupted".
        """
        step, steps = self._resolve(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        try:
            out = self._mgr.restore(step, args=args)
            state, data_state, meta = out["state"], out["data"], out["meta"]
            _check_restored(abstract_state, state)
            if not isinstance(data_state, dict) or not isinstance(meta, dict):
                raise ValueError("the data or meta item is missing or not a JSON object")
        except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
            raise self._broken(step, steps, e) from e
        return state, data_state, meta

    def close(self) -> None:
        """Wait for a pending async save and release the manager (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._mgr.wait_until_finished()
        self._mgr.close()


def _short(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_restored(abstract: Any, restored: Any) -> None:
    a_leaves, a_def = jax.tree.flatten(abstract)
    r_leaves, r_def = jax.tree.flatten(restored)
    if a_def != r_def:
        raise ValueError(f"restored tree structure differs from the model's: {r_def} vs {a_def}")
    for a, r in zip(a_leaves, r_leaves, strict=True):
        if tuple(a.shape) != tuple(r.shape) or a.dtype != r.dtype:
            raise ValueError(
                f"restored array {r.shape} {r.dtype} does not match the expected "
                f"{a.shape} {a.dtype}"
            )


def read_meta(directory: str | Path, step: int) -> dict:
    """The ``meta`` item of a step, read without restoring arrays (for tools and tests)."""
    path = Path(directory) / str(step) / "meta" / "metadata"
    return json.loads(path.read_text())

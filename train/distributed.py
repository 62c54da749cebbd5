"""Multi-process launch and per-process batches.

One process per host (or several on one machine, as the tests do): each calls
:func:`initialize_distributed` first, sees every device of every process in ``jax.devices()``,
loads only the batch rows its own devices hold (:func:`local_rows`) and assembles the global
batch with ``jax.make_array_from_process_local_data`` (:func:`to_global`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding

from train import data as data_lib

__all__ = ["initialize_distributed", "local_rows", "to_global", "sync"]


def initialize_distributed(dcfg) -> bool:
    """Call ``jax.distributed.initialize`` when the config or environment asks for several
    processes; returns whether it did. Must run before any other JAX call."""
    if jax.distributed.is_initialized():
        return False
    env = os.environ
    addr = dcfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    nproc = dcfg.num_processes or (
        int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None
    )
    pid = (
        dcfg.process_id
        if dcfg.process_id is not None
        else (int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
    )
    if dcfg.auto:
        jax.distributed.initialize()
        return True
    if addr is None and nproc is None and pid is None:
        return False
    if addr is None or nproc is None or pid is None:
        raise ValueError(
            "a multi-process launch needs all of distributed.coordinator_address, "
            f"distributed.num_processes and distributed.process_id (or the JAX_COORDINATOR_ADDRESS"
            f", JAX_NUM_PROCESSES, JAX_PROCESS_ID variables); got address={addr}, "
            f"num_processes={nproc}, process_id={pid}"
        )
    if nproc == 1:
        return False
    jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid)
    return True


def local_rows(sharding: NamedSharding, global_rows: int, ndim: int = 2) -> tuple[int, int]:
    """The block of batch rows that this process's devices hold under ``sharding``."""
    shape = (global_rows,) + (1,) * (ndim - 1)
    spans = set()
    for idx in sharding.addressable_devices_indices_map(shape).values():
        sl = idx[0]
        spans.add((sl.start or 0, global_rows if sl.stop is None else sl.stop))
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = sum(b - a for a, b in spans)
    if covered != hi - lo:
        raise ValueError(
            f"this process's devices hold batch rows {sorted(spans)}, which are not one "
            f"contiguous block; order the mesh devices so each process owns whole rows"
        )
    return lo, hi - lo


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding, global_rows: int) -> dict:
    out = {}
    for k in data_lib.MODEL_KEYS:
        if k in batch:
            v = batch[k]
            out[k] = jax.make_array_from_process_local_data(
                sharding, v, (global_rows,) + v.shape[1:]
            )
    return out


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

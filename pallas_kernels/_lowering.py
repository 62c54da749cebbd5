"""Lower a function for another platform without that hardware (a CPU-side compile check).

``jax.export`` runs the Pallas lowering for ``"cuda"`` (Triton) or ``"tpu"`` (Mosaic) on a CPU
machine. That catches most of what a real compile would reject early (unsupported primitives,
bad block shapes, dtype errors in the lowering) and is used by the tests; it does not run the
backend compiler (ptxas / Mosaic's layout passes), so it is a necessary check, not a sufficient
one.
"""

from __future__ import annotations

from typing import Any

import jax

_CUSTOM_CALLS = ("__gpu$xla.gpu.triton", "tpu_custom_call", "mosaic_gpu", "mosaic_gpu_v2")


def lower_for(platform: str, fn, *args: Any, **kwargs: Any) -> str:
    """Return the StableHLO text of ``jax.jit(fn)`` lowered for ``platform`` ("cuda"/"tpu")."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _CUSTOM_CALLS]
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
        *args, **kwargs
    )
    return exported.mlir_module()

"""Backend detection and the implementation-dispatch rule shared by every op.

``implementation=None`` picks, in order, the candidates for the current backend: Pallas on TPU
and GPU, the chunked ``xla`` path otherwise. A candidate that does not support the requested
case raises :class:`NotImplementedError` and the next one is tried; an explicitly requested
implementation that does not support the case re-raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

IMPLEMENTATIONS = ("pallas", "xla", "reference")


def backend() -> str:
    """'tpu', 'gpu' or 'cpu' for the default backend."""
    b = jax.default_backend()
    if b in ("cuda", "rocm", "gpu"):
        return "gpu"
    return b


def default_order() -> tuple[str, ...]:
    return ("pallas", "xla") if backend() in ("tpu", "gpu") else ("xla",)


def check_implementation(implementation: str | None) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None; got {implementation!r}"
        )


def dispatch(
    implementation: str | None,
    candidates: dict[str, Callable[[], Any]],
    order: Sequence[str] | None = None,
) -> Any:
    """Run the requested implementation, or the first supported one when it is None.

    ``candidates`` maps implementation names to zero-argument thunks.
    """
    check_implementation(implementation)
    if implementation is not None:
        return candidates[implementation]()
    errors = []
    for name in order or default_order():
        try:
            return candidates[name]()
        except NotImplementedError as e:  # try the next one
            errors.append(f"{name}: {e}")
    raise NotImplementedError("no implementation supports this case: " + "; ".join(errors))

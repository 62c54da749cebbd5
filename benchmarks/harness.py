"""Timing harness shared by every benchmark suite.

Times jitted JAX functions properly: the first call (trace + compile + first run) is reported
separately as ``compile_s``; then ``warmup`` untimed calls; then ``repeats`` timed calls, each
ended by ``block_until_ready``. Reports the median and the spread (min, max) in milliseconds and,
where the backend reports it, the peak device memory.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


@dataclasses.dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    compile_s: float
    repeats: int
    peak_bytes: int | None = None


def _block(x):
    def ready(a):
        return a.block_until_ready() if hasattr(a, "block_until_ready") else a

    return jax.tree.map(ready, x)


def peak_memory_bytes() -> int | None:
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # backend without memory stats (CPU)
        return None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", 0)) or None


def time_fn(
    fn: Callable[..., Any],
    *args: Any,
    warmup: int = 2,
    repeats: int = 10,
    min_time_s: float = 0.0,
) -> Timing:
    """Time ``fn(*args)`` (``fn`` should already be jitted)."""
    t0 = time.perf_counter()
    _block(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        _block(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start) < min_time_s:
        t = time.perf_counter()
        _block(fn(*args))
        times.append((time.perf_counter() - t) * 1e3)
        if len(times) >= 10 * repeats:
            break
    return Timing(
        median_ms=statistics.median(times),
        min_ms=min(times),
        max_ms=max(times),
        compile_s=compile_s,
        repeats=len(times),
        peak_bytes=peak_memory_bytes(),
    )


def machine_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    import jaxlib

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table of ``rows`` restricted to ``columns``."""

    def fmt(v):
        if isinstance(v, float):
            if v != v:  # nan
                return "-"
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3e}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
        for i, c in enumerate(columns)
    ]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "-" * len(line)]
    for row in cells:
        out.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    return "\n".join(out)


def add_ratios(
    rows: list[dict[str, Any]],
    group_key: str,
    baseline_impl: str,
    value: str = "fwd_ms",
    impl_key: str = "impl",
) -> None:
    """Add ``ratio`` = row[value] / baseline row's value within each group."""
    base: dict[Any, float] = {}
    for r in rows:
        if r.get(impl_key) == baseline_impl and r.get(value):
            base[r[group_key]] = r[value]
    for r in rows:
        b = base.get(r[group_key])
        v = r.get(value)
        r["ratio"] = (v / b) if (b and v) else None


def save_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)

"""Layer suite: every registered sequence mixer and projection at one model width.

Mixers (``kind == "mixer"`` in :func:`jaxlayers.registry.all_layers`, so layers added later are
picked up without editing this file) run at ``d_model`` (512) on ``[batch=1, T, d_model]`` for
T in {1024, 4096, 16384}; projection-like layers (``kind`` "projection" or "mlp") run at
``d -> d`` on N = 8192 tokens. For each, forward and forward+backward (``grad`` of
``sum(y**2)`` with respect to params and input) are

* compiled ahead of time (``jax.jit(f).lower(...).compile()``; ``compile_s`` is that time),
* measured for memory with ``compiled.memory_analysis()``: argument + output + temporary bytes of
  the compiled program (``fwd_MiB``, ``fwdbwd_MiB``; works on CPU, where the allocator reports no
  peak),
* timed with :func:`benchmarks.harness.time_fn` (median of the repeats).

Baselines: softmax attention (the registered ``"attention"`` layer with
``implementation="xla"``, i.e. ``jax.nn.dot_product_attention``) for mixers, and ``"dense"`` for
projections; ``ratio`` is fwd+bwd time over the baseline's at the same T (mixers) or fwd time
(projections), ``mem_ratio`` the same for fwd+bwd memory.

Configs are built generically from each layer's registered ``Example.config`` with
``dataclasses.replace``: ``d_model``/``d_in``/``d_out`` set to the width, ``num_heads`` (or
``heads``/``n_heads``) to ``d_model // head_dim`` so heads are 64 wide, ``head_dim`` to 64,
``num_kv_heads`` to the number of heads (plain multi-head attention), ``value_dim`` scaled by the
same factor as the head width (so a mixer with ``value_dim = 2 * head_dim`` keeps that
expansion), ``max_decode_len`` to T, a 2-D ``grid`` to ``(h, T // h)``; integer sizes that the
tiny example shrank below the class default (chunk sizes, windows, state sizes) return to the
class default. Every other field keeps its example value. A few
projection-like layers get the sizes their papers use at this width (:data:`PROJECTION_HINTS`,
applied only to fields that exist). A layer that cannot be built or run at a size gives a row
with ``note`` = the error; the suite never stops on one layer.

Budgets: before running a size, the fwd+bwd time is extrapolated from the layer's smaller sizes
(the measured log-log slope of the last two, or quadratic from a single point) and the size is
skipped (``note`` says so) when the estimated wall time exceeds ``budget_s``; a compiled program
whose memory exceeds ``mem_budget_bytes`` is skipped before it runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import add_ratios, time_fn

__all__ = [
    "mixer_config",
    "projection_config",
    "mixers",
    "projections",
    "memory_bytes",
    "PROJECTION_HINTS",
]

MIB = 2**20

# Sizes the papers use at d = 512 (each only if the config has the field); a callable of d.
PROJECTION_HINTS: dict[str, dict[str, Callable[[int], Any]]] = {
    "mlp": {"d_hidden": lambda d: 4 * d},
    "memoryformer_projection": {"tau": lambda d: 8},
    "memoryformer_block": {"tau": lambda d: 8},
    "pattention": {"num_tokens": lambda d: d},
    "pkm": {
        "n_sub": lambda d: 128,
        "k": lambda d: 32,
        "heads": lambda d: 4,
        "d_key": lambda d: 128,
    },
    "ultramem": {
        "n_sub": lambda d: 128,
        "k": lambda d: 32,
        "heads": lambda d: 2,
        "d_key": lambda d: 64,
        "d_value": lambda d: 64,
    },
    # PEER's paper uses 1024^2 experts; 128^2 keeps the tables (2 x 16k x d floats) CPU-sized.
    "peer": {
        "n_sub": lambda d: 128,
        "k": lambda d: 16,
        "heads": lambda d: 8,
        "d_key": lambda d: 128,
    },
}

_HEAD_FIELDS = ("num_heads", "heads", "n_heads")


def _fields(cfg: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cfg)}


def _class_default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return dataclasses.MISSING


def _grid(T: int) -> tuple[int, int]:
    h = 2 ** (int(math.log2(T)) // 2)
    return (h, T // h)


def mixer_config(example_cfg: Any, d_model: int, head_dim: int, T: int) -> Any:
    """The example config of a mixer resized to ``d_model`` with heads ``head_dim`` wide.

    Widths as in the module docstring; ``grid`` (2-D mixers) becomes ``(h, T // h)`` with ``h``
    a power of two near sqrt(T); every other integer field that the example set below its class
    default (chunk sizes, windows, state sizes, low ranks, shrunk for the tiny example) returns
    to the class default.
    """
    fields = _fields(example_cfg)
    changes: dict[str, Any] = {}
    if "d_model" in fields:
        changes["d_model"] = d_model
    old_heads = next((getattr(example_cfg, f) for f in _HEAD_FIELDS if f in fields), None)
    heads = max(1, d_model // head_dim)
    for f in _HEAD_FIELDS:
        if f in fields and getattr(example_cfg, f) is not None:
            changes[f] = heads
    if "num_kv_heads" in fields and example_cfg.num_kv_heads is not None:
        changes["num_kv_heads"] = heads
    old_hd = getattr(example_cfg, "head_dim", None) or getattr(example_cfg, "key_dim", None)
    if old_hd is None and old_heads and getattr(example_cfg, "d_model", None):
        old_hd = example_cfg.d_model // old_heads
    for f in ("head_dim", "key_dim"):
        if f in fields and getattr(example_cfg, f) is not None:
            changes[f] = head_dim
    if "value_dim" in fields and example_cfg.value_dim is not None and old_hd:
        changes["value_dim"] = max(1, round(example_cfg.value_dim * head_dim / old_hd))
    if "max_decode_len" in fields:
        changes["max_decode_len"] = T
    if "grid" in fields and example_cfg.grid is not None:
        changes["grid"] = _grid(T)
    cls = type(example_cfg)
    for f in sorted(fields - set(changes)):
        v, d = getattr(example_cfg, f), _class_default(cls, f)
        is_int = isinstance(v, int) and not isinstance(v, bool)
        if (
            is_int
            and d is not dataclasses.MISSING
            and (d is None or (isinstance(d, int) and not isinstance(d, bool) and d > v))
        ):
            changes[f] = d
    return dataclasses.replace(example_cfg, **changes)


def projection_config(name: str, example_cfg: Any, d: int) -> Any:
    """The example config of a projection / MLP-like layer resized to ``d -> d``."""
    fields = _fields(example_cfg)
    width = getattr(example_cfg, "d_model", None) or getattr(example_cfg, "d_in", None) or d
    changes: dict[str, Any] = {f: d for f in ("d_model", "d_in", "d_out") if f in fields}
    if "d_hidden" in fields and example_cfg.d_hidden:
        changes["d_hidden"] = example_cfg.d_hidden * d // width
    for f, value in PROJECTION_HINTS.get(name, {}).items():
        if f in fields:
            changes[f] = value(d)
    return dataclasses.replace(example_cfg, **changes)


def memory_bytes(compiled: Any) -> int | None:
    """Argument + output + temporary bytes of a compiled program (None if not reported)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without it
        return None
    if m is None:
        return None
    parts = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return int(sum(getattr(m, p, 0) or 0 for p in parts))


def _loss_of(apply: Callable) -> Callable:
    def loss(params, x):
        y = apply(params, x)
        leaves = [a for a in jax.tree.leaves(y) if jnp.issubdtype(a.dtype, jnp.floating)]
        return sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in leaves)

    return loss


def _compile(fn: Callable, args: tuple, options: dict | None) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(options)
    return compiled, time.perf_counter() - t0


def _estimate_ms(history: list[tuple[int, float]], T: int) -> float | None:
    """Extrapolated fwd+bwd time at T from (T, ms) points: last two points' slope, else T^2."""
    if not history:
        return None
    (t1, m1) = history[-1]
    slope = 2.0
    if len(history) >= 2:
        (t0, m0) = history[-2]
        if t1 != t0 and m0 > 0 and m1 > 0:
            slope = min(max(math.log(m1 / m0) / math.log(t1 / t0), 1.0), 3.0)
    return m1 * (T / t1) ** slope


def _measure(
    apply: Callable,
    params: Any,
    x: jax.Array,
    *,
    repeats: int,
    budget_s: float,
    mem_budget_bytes: int,
    options: dict | None,
) -> dict[str, Any]:
    """Compile, size and time forward and forward+backward; returns the row's numbers."""
    row: dict[str, Any] = {}
    fwd_c, fwd_compile = _compile(apply, (params, x), options)
    fb_c, fb_compile = _compile(jax.grad(_loss_of(apply), argnums=(0, 1)), (params, x), options)
    fwd_mem, fb_mem = memory_bytes(fwd_c), memory_bytes(fb_c)
    row["compile_s"] = fwd_compile + fb_compile
    row["fwd_MiB"] = None if fwd_mem is None else fwd_mem / MIB
    row["fwdbwd_MiB"] = None if fb_mem is None else fb_mem / MIB
    if fb_mem is not None and fb_mem > mem_budget_bytes:
        row["note"] = (
            f"skipped: compiled fwd+bwd needs {fb_mem / 2**30:.1f} GiB > memory budget "
            f"{mem_budget_bytes / 2**30:.1f} GiB"
        )
        return row
    # One untimed call each tells how many repeats fit in the budget.
    t0 = time.perf_counter()
    jax.block_until_ready(fb_c(params, x))
    one_s = time.perf_counter() - t0
    n = int(max(1, min(repeats, budget_s / max(one_s, 1e-9) / 2 - 2)))
    tf = time_fn(fwd_c, params, x, warmup=0, repeats=n)
    tb = time_fn(fb_c, params, x, warmup=0, repeats=n)
    row.update(
        fwd_ms=tf.median_ms, fwdbwd_ms=tb.median_ms, repeats=n, spread_ms=tb.max_ms - tb.min_ms
    )
    return row


def _input(shape: Sequence[int], seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


def _layers_of_kind(kinds: Iterable[str], names: Sequence[str] | None) -> dict[str, Any]:
    from jaxlayers import registry

    out = {}
    for name, fns in registry.all_layers().items():
        if fns.kind in kinds and fns.example is not None and (not names or name in names):
            out[name] = fns
    return out


def _describe(cfg: Any) -> dict[str, Any]:
    keys = (
        "num_heads",
        "heads",
        "num_kv_heads",
        "head_dim",
        "value_dim",
        "d_hidden",
        "implementation",
    )
    return {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}


def _measure_layer(fns, cfg, params: Any, x: jax.Array, **opts: Any) -> dict[str, Any]:
    """``_measure`` of a registered layer's ``apply`` (with its example's apply kwargs)."""
    from jaxlayers import core

    kwargs = dict(fns.example.apply_kwargs)
    apply = lambda p, x: fns.apply(p, x, cfg, **kwargs)
    return {"params": core.count_params(params), **_measure(apply, params, x, **opts)}


def mixers(
    Ts: Sequence[int] = (1024, 4096, 16384),
    *,
    d_model: int = 512,
    head_dim: int = 64,
    batch: int = 1,
    repeats: int = 5,
    budget_s: float = 120.0,
    mem_budget_bytes: int = 8 << 30,
    names: Sequence[str] | None = None,
    compiler_options: dict | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Forward / forward+backward time and memory of every registered mixer vs T.

    ``names`` restricts the layers (default: every registered mixer; "attention" is the
    baseline and always included when registered). Returns one row per (layer, T).
    """
    layers = _layers_of_kind(("mixer",), None)
    if names:
        layers = {n: f for n, f in layers.items() if n in names or n == "attention"}
    rows: list[dict[str, Any]] = []
    for name, fns in layers.items():
        history: list[tuple[int, float]] = []
        params_cache: dict[Any, Any] = {}
        for T in Ts:
            row: dict[str, Any] = {
                "suite": "layers",
                "part": "mixer",
                "layer": name,
                "T": T,
                "shape": f"{batch}x{T}x{d_model}",
                "decode": fns.example.decode,
            }
            try:
                cfg = mixer_config(fns.example.config, d_model, head_dim, T)
                if name == "attention":
                    cfg = dataclasses.replace(cfg, implementation="xla")
                row.update(_describe(cfg))
                est = _estimate_ms(history, T)
                if est is not None:
                    # fewest calls _measure makes: 3 fwd+bwd and 2 forward (~1/3 of one)
                    need_s = est * 1e-3 * 4
                    if need_s > budget_s:
                        row["note"] = (
                            f"skipped: estimated {need_s:.0f} s (fwd+bwd "
                            f"~{est / 1e3:.1f} s/call) > budget {budget_s:.0f} s"
                        )
                        rows.append(row)
                        log(str(row))
                        continue
                # Params do not depend on T except through max_decode_len (caches only).
                pkey = (
                    dataclasses.replace(cfg, max_decode_len=1)
                    if hasattr(cfg, "max_decode_len")
                    else cfg
                )
                if pkey not in params_cache:
                    params_cache[pkey] = fns.init(jax.random.key(0), cfg)
                x = _input((batch, T, d_model), seed=T)
                row.update(
                    _measure_layer(
                        fns,
                        cfg,
                        params_cache[pkey],
                        x,
                        repeats=repeats,
                        budget_s=budget_s,
                        mem_budget_bytes=mem_budget_bytes,
                        options=compiler_options,
                    )
                )
                if row.get("fwdbwd_ms"):
                    history.append((T, row["fwdbwd_ms"]))
                    row["tokens_per_s"] = batch * T / (row["fwdbwd_ms"] * 1e-3)
            except Exception as e:  # noqa: BLE001 - report the layer, keep going
                row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            log(str(row))
    add_ratios(rows, "T", "attention", value="fwdbwd_ms", impl_key="layer")
    _mem_ratios(rows, "T", "attention")
    return rows


def projections(
    *,
    N: int = 8192,
    d: int = 512,
    repeats: int = 5,
    budget_s: float = 60.0,
    mem_budget_bytes: int = 8 << 30,
    names: Sequence[str] | None = None,
    compiler_options: dict | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Forward / forward+backward time and memory of every projection / MLP-like layer at
    ``d -> d`` on ``N`` tokens (input ``[1, N, d]``), with Dense as the baseline."""
    layers = _layers_of_kind(("projection", "mlp"), None)
    if names:
        layers = {n: f for n, f in layers.items() if n in names or n == "dense"}
    rows: list[dict[str, Any]] = []
    for name, fns in layers.items():
        row: dict[str, Any] = {
            "suite": "layers",
            "part": "projection",
            "layer": name,
            "kind": fns.kind,
            "N": N,
            "shape": f"N={N} {d}->{d}",
        }
        try:
            cfg = projection_config(name, fns.example.config, d)
            row.update(_describe(cfg))
            x = _input((1, N, d), seed=N)
            row.update(
                _measure_layer(
                    fns,
                    cfg,
                    fns.init(jax.random.key(0), cfg),
                    x,
                    repeats=repeats,
                    budget_s=budget_s,
                    mem_budget_bytes=mem_budget_bytes,
                    options=compiler_options,
                )
            )
            if row.get("fwd_ms"):
                row["tokens_per_s"] = N / (row["fwd_ms"] * 1e-3)
        except Exception as e:  # noqa: BLE001
            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        log(str(row))
    add_ratios(rows, "shape", "dense", value="fwd_ms", impl_key="layer")
    _mem_ratios(rows, "shape", "dense")
    return rows


def _mem_ratios(rows: list[dict[str, Any]], group: str, baseline: str) -> None:
    base = {r[group]: r.get("fwdbwd_MiB") for r in rows if r["layer"] == baseline}
    for r in rows:
        b, v = base.get(r[group]), r.get("fwdbwd_MiB")
        r["mem_ratio"] = (v / b) if (b and v and r.get("fwdbwd_ms")) else None


def plot(rows: list[dict[str, Any]], path: str, title: str) -> str | None:
    """Log-log fwd+bwd time (left) and memory (right) vs T, one line per mixer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return None
    groups: dict[str, list] = {}
    for r in rows:
        if r.get("part") == "mixer" and r.get("fwdbwd_ms"):
            groups.setdefault(r["layer"], []).append((r["T"], r["fwdbwd_ms"], r.get("fwdbwd_MiB")))
    if not groups:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    for name, pts in sorted(groups.items()):
        pts.sort()
        style = {"color": "k", "linestyle": "--"} if name == "attention" else {}
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, **style)
        mem = [(p[0], p[2]) for p in pts if p[2]]
        if mem:
            ax2.loglog([p[0] for p in mem], [p[1] for p in mem], marker="o", label=name, **style)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("forward+backward time (ms)")
    ax2.set_xlabel("sequence length T")
    ax2.set_ylabel("fwd+bwd program memory (MiB)")
    for a in (ax, ax2):
        a.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Peer suite: our linear-attention ops against flash-linear-attention's PyTorch references.

The peer is flash-linear-attention (fla, https://github.com/fla-org/flash-linear-attention).
Its fast kernels are Triton (GPU only); next to each it ships plain PyTorch reference functions
(``naive.py``), which run on the CPU. On identical float32 inputs (numpy-generated, one seed)
this suite compares, per variant and T:

==============  ==========================================  ==============================
variant         peer functions (fla/ops/...)                ours (pallas_kernels.linear_attention)
==============  ==========================================  ==============================
``gla``         gla/naive.py ``naive_recurrent_gla``         ``gated_linear_attention``,
                                                             log_decay [B,T,H,K]
``simple_gla``  simple_gla/naive.py                          ``gated_linear_attention``,
                ``naive_recurrent_simple_gla``,              log_decay [B,T,H] (scalar gate)
                ``naive_chunk_simple_gla``
``delta``       delta_rule/naive.py ``delta_rule_recurrence``,  ``delta_rule``
                ``delta_rule_chunkwise`` (head-first layout)
``gated_delta`` gated_delta_rule/naive.py                    ``delta_rule`` with log_decay
                ``naive_recurrent_gated_delta_rule``,        [B,T,H]
                ``naive_chunk_gated_delta_rule``
==============  ==========================================  ==============================

Every function gets the same q, k, v (keys L2-normalised for the delta rules), gates
``log_sigmoid(N(0,1) + 3)``, ``beta = sigmoid(N(0,1))``, scale ``K ** -0.5``. Each row is one
implementation: its forward time (median, :func:`benchmarks.harness.time_fn`; ours jitted, the
peers eager PyTorch) and the relative L2 error of its output (``rel_err``) and final state
(``state_rel_err``) against the peer's token-by-token recurrence (the first peer function of the
variant). ``peer_source`` says where the peer code came from:

* ``fla-core X (file)``: fla's own function. ``import fla.ops`` imports Triton, which a CPU
  machine lacks, so each ``naive.py`` is loaded by its file path from the installed package
  (those files import only torch and einops).
* ``own torch recurrence (fla not installed)``: fla is missing, so the suite runs the recurrence
  fla documents (``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, with the
  matching special cases) written here in PyTorch. This is NOT fla's code.

Install (benchmark-only, not a dependency of the package)::

    pip install torch==2.13.0          # the CPU build (on this project's machines, from local disk)
    pip install fla-core               # fla's ops package; needs only torch and einops on CPU

(``flash-linear-attention`` itself adds ``transformers``; ``fla-core`` is enough here.) Without
torch the suite prints ``skipped: ...`` and returns no rows.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks.harness import time_fn

__all__ = ["peers", "peer_functions", "VARIANTS"]

VARIANTS = ("gla", "simple_gla", "delta", "gated_delta")

INSTALL_HINT = "pip install torch==2.13.0 fla-core  (CPU build of torch; see benchmarks/peers.py)"


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_inputs(variant: str, B: int, T: int, H: int, K: int, V: int, seed: int = 0):
    """float32 numpy inputs ``[B, T, H, ...]``: q, k, v and the variant's gate / beta."""
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s, dtype=np.float32)
    q, k, v = n(B, T, H, K), n(B, T, H, K), n(B, T, H, V)
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x).astype(np.float32)
    out: dict[str, np.ndarray] = {"q": q, "k": k, "v": v}
    if variant == "gla":
        out["g"] = log_sigmoid(n(B, T, H, K) + 3.0)
    if variant in ("simple_gla", "gated_delta"):
        out["g"] = log_sigmoid(n(B, T, H) + 3.0)
    if variant in ("delta", "gated_delta"):
        out["k"] = (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32)
        out["beta"] = (1.0 / (1.0 + np.exp(-n(B, T, H)))).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Peer functions
# ---------------------------------------------------------------------------------------------


def _load_fla_file(relpath: str):
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fla is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], *relpath.split("/"))
    name = "_jaxlayers_bench_fla_" + relpath.replace("/", "_").removesuffix(".py")
    mspec = importlib.util.spec_from_file_location(name, path)
    if mspec is None or mspec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module


def _fla_functions(variant: str):
    """[(name, fn(inputs as torch tensors) -> (o [B,T,H,V], final state or None))], source."""
    version = importlib.metadata.version("fla-core")
    if variant == "gla":
        m = _load_fla_file("ops/gla/naive.py")
        fns = [
            (
                "naive_recurrent_gla",
                lambda t: m.naive_recurrent_gla(
                    t["q"], t["k"], t["v"], t["g"], output_final_state=True
                ),
            )
        ]
        src = "gla/naive.py"
    elif variant == "simple_gla":
        m = _load_fla_file("ops/simple_gla/naive.py")
        fns = [
            (
                "naive_recurrent_simple_gla",
                lambda t: m.naive_recurrent_simple_gla(
                    t["q"], t["k"], t["v"], t["g"], output_final_state=True
                ),
            ),
            (
                "naive_chunk_simple_gla",
                lambda t: m.naive_chunk_simple_gla(
                    t["q"], t["k"], t["v"], t["g"], output_final_state=True
                ),
            ),
        ]
        src = "simple_gla/naive.py"
    elif variant == "delta":
        m = _load_fla_file("ops/delta_rule/naive.py")

        def head_first(fn, **kw):
            def run(t):
                tr = lambda x: x.transpose(1, 2).contiguous()
                res = fn(tr(t["q"]), tr(t["k"]), tr(t["v"]), tr(t["beta"]), **kw)
                return tr(res[0]), res[1]

            return run

        fns = [
            ("delta_rule_recurrence", head_first(m.delta_rule_recurrence)),
            ("delta_rule_chunkwise", head_first(m.delta_rule_chunkwise, chunk_size=32)),
        ]
        src = "delta_rule/naive.py"
    elif variant == "gated_delta":
        m = _load_fla_file("ops/gated_delta_rule/naive.py")
        fns = [
            (
                "naive_recurrent_gated_delta_rule",
                lambda t: m.naive_recurrent_gated_delta_rule(
                    t["q"], t["k"], t["v"], t["beta"], t["g"], output_final_state=True
                ),
            ),
            (
                "naive_chunk_gated_delta_rule",
                lambda t: m.naive_chunk_gated_delta_rule(
                    t["q"], t["k"], t["v"], t["g"], t["beta"], output_final_state=True
                ),
            ),
        ]
        src = "gated_delta_rule/naive.py"
    else:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    return fns, f"fla-core {version} (fla/ops/{src}, loaded by file path)"


def _own_torch_recurrence(t: dict[str, Any]):
    """The gated delta / gated linear attention recurrence in PyTorch (used without fla)."""
    import torch

    q, k, v = (t[n].transpose(1, 2).float() for n in ("q", "k", "v"))  # [B,H,T,D]
    B, H, T, K = q.shape
    q = q * K**-0.5
    g, beta = t.get("g"), t.get("beta")
    S = q.new_zeros(B, H, K, v.shape[-1])
    o = torch.zeros_like(v)
    for i in range(T):
        if g is not None:
            gi = g[:, i].float().exp()  # [B,H] or [B,H,K]
            S = S * (gi[..., None, None] if gi.ndim == 2 else gi[..., None])
        ki, vi = k[:, :, i], v[:, :, i]
        if beta is not None:
            bi = beta[:, i].float()[..., None]
            vi = bi * (vi - torch.einsum("bhk,bhkv->bhv", ki, S))
        S = S + ki[..., :, None] * vi[..., None, :]
        o[:, :, i] = torch.einsum("bhk,bhkv->bhv", q[:, :, i], S)
    return o.transpose(1, 2), S


def peer_functions(variant: str) -> tuple[list[tuple[str, Callable]], str]:
    """The peer functions of a variant and where they came from (see the module docstring)."""
    try:
        return _fla_functions(variant)
    except ImportError:
        source = "own torch recurrence (fla not installed)"
        return [("own_recurrence", _own_torch_recurrence)], source


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------


def _ours(variant: str, impl: str) -> Callable:
    from pallas_kernels import linear_attention as la

    def fn(x):
        if variant in ("gla", "simple_gla"):
            return la.gated_linear_attention(
                x["q"], x["k"], x["v"], x["g"], return_final_state=True, implementation=impl
            )
        return la.delta_rule(
            x["q"],
            x["k"],
            x["v"],
            x["beta"],
            x.get("g"),
            return_final_state=True,
            implementation=impl,
        )

    return jax.jit(fn)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def peers(
    Ts: Sequence[int] = (1024, 4096),
    *,
    B: int = 1,
    H: int = 4,
    K: int = 64,
    V: int = 64,
    variants: Sequence[str] = VARIANTS,
    impls: Sequence[str] = ("xla", "reference"),
    repeats: int = 3,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Agreement and time of ours vs the peer's PyTorch references (rows as in the docstring)."""
    try:
        import torch
    except ImportError:
        log(f"peers: skipped: torch is not installed ({INSTALL_HINT})")
        return []
    import jax.numpy as jnp

    rows: list[dict[str, Any]] = []
    truth_impl: dict[str, str] = {}
    for variant in variants:
        fns, source = peer_functions(variant)
        truth_impl[variant] = f"peer:{fns[0][0]}"
        for T in Ts:
            shape = f"{B}x{T}x{H}x{K}/{V}"
            x = make_inputs(variant, B, T, H, K, V, seed=T)
            tt = {n: torch.from_numpy(a) for n, a in x.items()}
            truth = None
            cases: list[tuple[str, str, Callable, Any]] = [
                (f"peer:{n}", source, fn, tt) for n, fn in fns
            ]
            xj = {n: jnp.asarray(a) for n, a in x.items()}
            cases += [(f"jax:{impl}", "ours", _ours(variant, impl), xj) for impl in impls]
            for impl, src, fn, args in cases:
                row: dict[str, Any] = {
                    "suite": "peers",
                    "variant": variant,
                    "T": T,
                    "shape": shape,
                    "impl": impl,
                    "peer_source": src,
                }
                try:
                    if impl.startswith("peer:"):
                        with torch.no_grad():
                            o, s = fn(args)
                            t = time_fn(lambda a, fn=fn: fn(a), args, warmup=0, repeats=repeats)
                        o, s = o.numpy(), None if s is None else s.numpy()
                    else:
                        o, s = jax.device_get(fn(args))
                        t = time_fn(fn, args, warmup=1, repeats=repeats)
                    if truth is None:
                        truth = (o, s)
                    row["fwd_ms"] = t.median_ms
                    row["rel_err"] = _rel(o, truth[0])
                    if s is not None and truth[1] is not None:
                        row["state_rel_err"] = _rel(s, truth[1])
                    row["max_abs_err"] = float(
                        np.max(np.abs(np.asarray(o, np.float64) - np.asarray(truth[0], np.float64)))
                    )
                except Exception as e:  # noqa: BLE001 - report, keep going
                    row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                log(str(row))
    base = {
        (r["variant"], r["T"]): r.get("fwd_ms")
        for r in rows
        if r["impl"] == truth_impl[r["variant"]]
    }
    for r in rows:
        b, v = base.get((r["variant"], r["T"])), r.get("fwd_ms")
        r["ratio"] = (v / b) if (b and v) else None
    return rows

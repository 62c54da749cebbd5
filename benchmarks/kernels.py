"""Kernel suites: chunked linear attention and gather_sum, on whatever backend JAX runs on.

Each suite returns rows for :func:`benchmarks.harness.format_table`; ``__main__`` prints them,
saves JSON and draws the plots. Nothing here asserts a speed.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.harness import add_ratios, time_fn


def _la_inputs(B, T, H, D, variant, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(T * 7 + D), 5)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, T, H, D), dtype)
    v = jax.random.normal(ks[2], (B, T, H, D), dtype)
    extra: dict[str, Any] = {}
    if variant == "gla":
        extra["log_decay"] = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, D)) + 3.0)
    if variant == "scalar":
        extra["log_decay"] = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)) + 3.0)
    if variant in ("delta", "gated_delta"):
        k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
        extra["beta"] = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    if variant == "gated_delta":
        extra["log_decay"] = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)) + 3.0)
    return q, k, v, extra


def _la_fn(variant: str, impl: str):
    from pallas_kernels import linear_attention as la

    def fwd(q, k, v, extra):
        if variant == "softmax":
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        if variant in ("delta", "gated_delta"):
            return la.delta_rule(
                q, k, v, extra["beta"], extra.get("log_decay"), implementation=impl
            )
        return la.gated_linear_attention(q, k, v, extra.get("log_decay"), implementation=impl)

    def loss(q, k, v, extra):
        return jnp.sum(fwd(q, k, v, extra).astype(jnp.float32) ** 2)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def linear_attention(
    Ts=(256, 512, 1024, 2048, 4096, 8192, 16384),
    B=2,
    H=4,
    D=64,
    variants=("gla", "scalar", "delta"),
    impls=("xla", "reference"),
    reference_max_T=4096,
    softmax_max_T=8192,
    repeats=3,
) -> list[dict[str, Any]]:
    """Forward and forward+backward time vs T for each op/implementation and softmax."""
    rows = []
    for T in Ts:
        shape = f"{B}x{T}x{H}x{D}"
        cases = [(v, i) for v in variants for i in impls]
        cases.append(("softmax", "xla"))
        for variant, impl in cases:
            if impl == "reference" and T > reference_max_T:
                continue
            if variant == "softmax" and T > softmax_max_T:
                continue
            q, k, v, extra = _la_inputs(B, T, H, D, variant)
            fwd, fb = _la_fn(variant, impl)
            tf = time_fn(fwd, q, k, v, extra, repeats=repeats, warmup=1)
            tb = time_fn(fb, q, k, v, extra, repeats=repeats, warmup=1)
            rows.append(
                {
                    "suite": "linear_attention",
                    "shape": shape,
                    "T": T,
                    "op": variant,
                    "impl": impl,
                    "fwd_ms": tf.median_ms,
                    "fwdbwd_ms": tb.median_ms,
                    "spread_ms": tb.max_ms - tb.min_ms,
                    "compile_s": tf.compile_s + tb.compile_s,
                    "tokens_per_s": B * T / (tb.median_ms * 1e-3),
                    "group": f"{shape}/{variant}",
                }
            )
            print(rows[-1], flush=True)
    # ratio of each op/impl to its reference at the same shape (where the reference ran)
    add_ratios(rows, "group", "reference", value="fwdbwd_ms")
    return rows


def slopes(rows, impl_key=("op", "impl")) -> dict[str, float]:
    """Least-squares slope of log(fwd+bwd time) vs log(T) per (op, impl)."""
    out = {}
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in impl_key), []).append((r["T"], r["fwdbwd_ms"]))
    for g, pts in groups.items():
        if len(pts) < 2:
            continue
        xs = [math.log(t) for t, _ in pts]
        ys = [math.log(ms) for _, ms in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
        den = sum((x - mx) ** 2 for x in xs)
        out["/".join(g)] = num / den
    return out


def crossover(rows, op="gla", impl="xla") -> int | None:
    """Smallest T from which the chunked op is faster (fwd+bwd) than softmax attention."""
    by_t: dict[int, dict[str, float]] = {}
    for r in rows:
        if (r["op"], r["impl"]) == (op, impl):
            by_t.setdefault(r["T"], {})["la"] = r["fwdbwd_ms"]
        if r["op"] == "softmax":
            by_t.setdefault(r["T"], {})["sm"] = r["fwdbwd_ms"]
    winner = None
    for T in sorted(by_t, reverse=True):
        d = by_t[T]
        if "la" in d and "sm" in d and d["la"] < d["sm"]:
            winner = T
        elif "la" in d and "sm" in d:
            break
    return winner


def lookup(shapes=((8192, 512, 512, 8), (8192, 1024, 4096, 8)), repeats=3):
    """MemoryFormer hashing projection vs Dense at equal (d_in, d_out), and raw gather_sum.

    shape = (N tokens, d_in, d_out, tau). FLOPs are analytic: Dense 2*N*d_in*d_out;
    gather_sum 2*N*J*d_out with J = d_in / tau (plus the hashing, O(N*d_in)).
    """
    from pallas_kernels import lookup as lk

    rows = []
    for N, d_in, d_out, tau in shapes:
        J, R = d_in // tau, 2**tau
        shape = f"N={N} {d_in}->{d_out} tau={tau}"
        x = jax.random.normal(jax.random.key(0), (N, d_in), jnp.float32)
        w = jax.random.normal(jax.random.key(1), (d_in, d_out), jnp.float32) * d_in**-0.5
        dense = jax.jit(lambda x, w: x @ w)
        t = time_fn(dense, x, w, repeats=repeats)
        rows.append(
            {
                "suite": "lookup",
                "shape": shape,
                "impl": "dense",
                "fwd_ms": t.median_ms,
                "flops": 2 * N * d_in * d_out,
                "param_bytes": d_in * d_out * 4,
                "group": shape,
            }
        )
        idx = jax.random.randint(jax.random.key(2), (N, J), 0, R, jnp.int32)
        wts = jax.random.uniform(jax.random.key(3), (N, J), jnp.float32)
        tab = jax.random.normal(jax.random.key(4), (J, R, d_out), jnp.float32)
        for impl in ("xla",):
            f = jax.jit(lambda i, a, b, impl=impl: lk.gather_sum(i, a, b, implementation=impl))
            t = time_fn(f, idx, wts, tab, repeats=repeats)
            moved = N * J * d_out * 4 + N * d_out * 4 + N * J * 8
            rows.append(
                {
                    "suite": "lookup",
                    "shape": shape,
                    "impl": f"gather_sum/{impl}",
                    "fwd_ms": t.median_ms,
                    "flops": 2 * N * J * d_out,
                    "param_bytes": J * R * d_out * 4,
                    "GBps": moved / (t.median_ms * 1e-3) / 1e9,
                    "group": shape,
                }
            )
        try:
            from jaxlayers.lookup import memoryformer as mf

            cfg = mf.Config(d_in=d_in, d_out=d_out, tau=tau)
            params = mf.init(jax.random.key(5), cfg)
            f = jax.jit(lambda p, x: mf.apply(p, x, cfg))
            t = time_fn(f, params, x, repeats=repeats)
            rows.append(
                {
                    "suite": "lookup",
                    "shape": shape,
                    "impl": "memoryformer",
                    "fwd_ms": t.median_ms,
                    "flops": 2 * N * J * d_out + 8 * N * d_in,
                    "param_bytes": J * R * d_out * 4,
                    "group": shape,
                }
            )
        except Exception as e:  # layer API not available: report, do not hide
            rows.append(
                {
                    "suite": "lookup",
                    "shape": shape,
                    "impl": "memoryformer",
                    "error": f"{type(e).__name__}: {e}",
                    "group": shape,
                }
            )
        for r in rows[-3:]:
            print(r, flush=True)
    add_ratios(rows, "group", "dense", value="fwd_ms")
    return rows

"""One call on a real GPU: correctness of every Pallas kernel against the reference, then timings.

Usage (on a CUDA machine, from the repo root):

    python -m benchmarks.gpu_check [--parts env,correct,la,lookup,peers] [--out DIR] [--quick]

Parts:
  env      device, versions, measured copy bandwidth and bf16 matmul rate (the two ceilings)
  correct  Pallas (interpret=False) vs the float32 reference / xla path, forward and gradients,
           for every linear-attention variant and gather_sum; relative errors printed
  la       linear-attention timings: pallas vs xla vs jax.nn.dot_product_attention (cuDNN)
  lookup   gather_sum throughput (GB/s) vs the measured copy bandwidth
  peers    flash-linear-attention (fla) Triton kernels at the same shapes (needs torch + fla)

Writes ``gpu_check.json`` (all rows + machine info) under ``--out`` and prints tables.
Every number printed here was measured by this script on the machine it names.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import format_table, machine_info, save_json, time_fn

ROWS: list[dict[str, Any]] = []
ERRORS: list[str] = []


def _rel(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _guard(name):
    def deco(fn):
        def wrapped(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:  # keep going: one broken part must not hide the others
                msg = f"[{name}] {type(e).__name__}: {str(e)[:2000]}"
                ERRORS.append(msg)
                print(msg)
                traceback.print_exc(limit=6)
                return None

        return wrapped

    return deco


# ------------------------------------------------------------------------------------------
# env: ceilings
# ------------------------------------------------------------------------------------------


@_guard("env")
def part_env(args):
    info = machine_info()
    print(info)
    n = 1 << 28  # 256M float32 = 1 GiB
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    f = jax.jit(lambda a: a * 2.0)
    t = time_fn(f, x, repeats=20)
    gbps = 2 * n * 4 / (t.median_ms * 1e-3) / 1e9
    m = 8192
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    tm = time_fn(mm, a, a, repeats=20)
    tflops = 2 * m**3 / (tm.median_ms * 1e-3) / 1e12
    print(f"copy bandwidth (read+write): {gbps:.0f} GB/s; bf16 matmul {m}^3: {tflops:.0f} TFLOP/s")
    ROWS.append({"part": "env", "copy_GBps": gbps, "bf16_matmul_TFLOPs": tflops, **info})
    return gbps


# ------------------------------------------------------------------------------------------
# linear attention inputs
# ------------------------------------------------------------------------------------------

VARIANTS = ("la", "scalar", "gla", "delta", "gated_delta")


def la_inputs(key, variant, B, T, H, K, V, dtype):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.float32)
    extra: dict[str, Any] = {}
    if variant in ("delta", "gated_delta"):
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        extra["beta"] = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H), jnp.float32))
    if variant in ("scalar", "gated_delta"):
        extra["log_decay"] = jax.nn.log_sigmoid(
            jax.random.normal(ks[4], (B, T, H), jnp.float32) + 4.0
        )
    if variant == "gla":
        extra["log_decay"] = (
            jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H, K), jnp.float32) + 4.0)
            / 16.0
            * 16.0
        )
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), extra


def la_call(variant, q, k, v, extra, implementation, **kw):
    from pallas_kernels import linear_attention as la

    if variant in ("delta", "gated_delta"):
        return la.delta_rule(
            q, k, v, extra["beta"], extra.get("log_decay"), implementation=implementation, **kw
        )
    return la.gated_linear_attention(
        q, k, v, extra.get("log_decay"), implementation=implementation, **kw
    )


def la_loss_grad(variant, implementation, **kw):
    def loss(q, k, v, extra, cot):
        o = la_call(variant, q, k, v, extra, implementation, **kw)
        return jnp.sum(o.astype(jnp.float32) * cot)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


@_guard("correct-la")
def part_correct_la(args):
    shapes = [(2, 300, 3, 64, 64), (1, 1024, 2, 128, 128)]
    if not args.quick:
        shapes.append((2, 2048, 4, 128, 64))
    for variant in VARIANTS:
        for B, T, H, K, V in shapes:
            for dtype in (jnp.float32, jnp.bfloat16):
                key = jax.random.key(hash((variant, T, K, str(dtype))) & 0xFFFF)
                q, k, v, extra = la_inputs(key, variant, B, T, H, K, V, dtype)
                h0 = jax.random.normal(jax.random.key(7), (B, H, K, V), jnp.float32) * 0.1
                cot = jax.random.normal(jax.random.key(8), (B, T, H, V), jnp.float32)
                row = {
                    "part": "correct",
                    "op": variant,
                    "shape": f"{B}x{T}x{H}x{K}x{V}",
                    "dtype": jnp.dtype(dtype).name,
                }
                with jax.default_matmul_precision("highest"):
                    ref_o, ref_s = jax.jit(
                        lambda q, k, v, e: la_call(
                            variant,
                            q,
                            k,
                            v,
                            e,
                            "reference",
                            initial_state=h0,
                            return_final_state=True,
                        )
                    )(q, k, v, extra)
                    g_ref = la_loss_grad(variant, "reference", initial_state=h0)(
                        q.astype(jnp.float32),
                        k.astype(jnp.float32),
                        v.astype(jnp.float32),
                        extra,
                        cot,
                    )
                try:
                    o, s = jax.jit(
                        lambda q, k, v, e: la_call(
                            variant, q, k, v, e, "pallas", initial_state=h0, return_final_state=True
                        )
                    )(q, k, v, extra)
                    row["err_o"] = _rel(o, ref_o)
                    row["err_state"] = _rel(s, ref_s)
                    g = la_loss_grad(variant, "pallas", initial_state=h0)(q, k, v, extra, cot)
                    errs = [
                        _rel(a, b)
                        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True)
                    ]
                    row["err_grad_max"] = max(errs)
                    row["finite"] = bool(
                        all(
                            np.isfinite(np.asarray(x, np.float32)).all()
                            for x in jax.tree.leaves((o, s, g))
                        )
                    )
                except Exception as e:  # record and continue
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    where = f"correct {variant} {row['shape']} {row['dtype']}"
                    ERRORS.append(f"{where}: {row['error']}")
                ROWS.append(row)
                print(row, flush=True)


@_guard("correct-lookup")
def part_correct_lookup(args):
    from pallas_kernels import lookup

    for N, J, R, D in [(1000, 3, 64, 128), (4096, 8, 256, 256), (777, 1, 16, 64)]:
        for dtype in (jnp.float32, jnp.bfloat16):
            ks = jax.random.split(jax.random.key(N + J), 4)
            idx = jax.random.randint(ks[0], (N, J), 0, R, jnp.int32)
            w = jax.random.normal(ks[1], (N, J), jnp.float32).astype(dtype)
            tab = jax.random.normal(ks[2], (J, R, D), jnp.float32).astype(dtype)
            cot = jax.random.normal(ks[3], (N, D), jnp.float32)
            row = {
                "part": "correct",
                "op": "gather_sum",
                "shape": f"{N}x{J}x{R}x{D}",
                "dtype": jnp.dtype(dtype).name,
            }

            def loss(w, t, impl):
                return jnp.sum(
                    lookup.gather_sum(idx, w, t, implementation=impl).astype(jnp.float32) * cot
                )

            try:
                with jax.default_matmul_precision("highest"):
                    ref = jax.jit(
                        lambda w, t: lookup.gather_sum(idx, w, t, implementation="reference")
                    )(w.astype(jnp.float32), tab.astype(jnp.float32))
                    gref = jax.jit(jax.grad(lambda w, t: loss(w, t, "reference"), (0, 1)))(
                        w.astype(jnp.float32), tab.astype(jnp.float32)
                    )
                out = jax.jit(lambda w, t: lookup.gather_sum(idx, w, t, implementation="pallas"))(
                    w, tab
                )
                g = jax.jit(jax.grad(lambda w, t: loss(w, t, "pallas"), (0, 1)))(w, tab)
                row["err_o"] = _rel(out, ref)
                row["err_grad_max"] = max(_rel(a, b) for a, b in zip(g, gref, strict=True))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                ERRORS.append(f"correct gather_sum {row['shape']}: {row['error']}")
            ROWS.append(row)
            print(row, flush=True)


# ------------------------------------------------------------------------------------------
# timings
# ------------------------------------------------------------------------------------------

ISSUE_SHAPES = [(4, T, 16, 128, 128) for T in (2048, 8192, 32768)]
PEER_TABLE_SHAPES = [
    (1, 8192, 96, 128),
    (2, 16384, 16, 128),
    (4, 2048, 16, 128),
    (4, 4096, 64, 128),
    (8, 1024, 8, 64),
    (8, 2048, 32, 256),
]


def _shapes(args):
    shapes = list(ISSUE_SHAPES)
    if not args.quick:
        shapes += [(B, T, H, D, D) for (B, T, H, D) in PEER_TABLE_SHAPES]
    seen, out = set(), []
    for s in shapes:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


@_guard("la")
def part_la(args):
    for B, T, H, K, V in _shapes(args):
        shape = f"{B}x{T}x{H}x{K}"
        for variant in [x for x in args.variants.split(",") if x and args.impls]:
            q, k, v, extra = la_inputs(jax.random.key(T), variant, B, T, H, K, V, jnp.bfloat16)
            cot = jax.random.normal(jax.random.key(1), (B, T, H, V), jnp.float32)
            for impl in [i for i in args.impls.split(",") if i]:
                if impl == "xla" and T > 16384 and args.quick:
                    continue
                row = {"part": "la", "op": variant, "shape": shape, "impl": impl, "T": T}
                try:
                    fwd = jax.jit(lambda q, k, v, e: la_call(variant, q, k, v, e, impl))
                    row["fwd_ms"] = time_fn(fwd, q, k, v, extra).median_ms
                    bwd = la_loss_grad(variant, impl)
                    row["fwdbwd_ms"] = time_fn(bwd, q, k, v, extra, cot).median_ms
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                ROWS.append(row)
                print(row, flush=True)
        # softmax attention (cuDNN flash attention) at the same shape, causal, bf16
        row = {"part": "la", "op": "softmax", "shape": shape, "impl": "cudnn", "T": T}
        try:
            qa = jax.random.normal(jax.random.key(2), (B, T, H, K), jnp.bfloat16)

            def attn(q, k, v):
                return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

            row["fwd_ms"] = time_fn(jax.jit(attn), qa, qa, qa).median_ms
            g = jax.jit(
                jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), (0, 1, 2))
            )
            row["fwdbwd_ms"] = time_fn(g, qa, qa, qa).median_ms
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        ROWS.append(row)
        print(row, flush=True)


@_guard("lookup")
def part_lookup(args, copy_gbps):
    from pallas_kernels import lookup

    for N, J, R, D in [(65536, 8, 4096, 512), (131072, 16, 1024, 1024), (262144, 4, 65536, 256)]:
        for impl in ("pallas", "xla"):
            ks = jax.random.split(jax.random.key(N), 3)
            idx = jax.random.randint(ks[0], (N, J), 0, R, jnp.int32)
            w = jax.random.normal(ks[1], (N, J), jnp.bfloat16)
            tab = jax.random.normal(ks[2], (J, R, D), jnp.bfloat16)
            row = {"part": "lookup", "op": "gather_sum", "shape": f"{N}x{J}x{R}x{D}", "impl": impl}
            try:
                f = jax.jit(lambda i, w, t: lookup.gather_sum(i, w, t, implementation=impl))
                t = time_fn(f, idx, w, tab, repeats=20)
                # bytes: gathered rows read once each + output written + indices/weights read
                nbytes = N * J * D * 2 + N * D * 2 + N * J * (4 + 2)
                row["fwd_ms"] = t.median_ms
                row["GBps"] = nbytes / (t.median_ms * 1e-3) / 1e9
                if copy_gbps:
                    row["frac_of_copy"] = row["GBps"] / copy_gbps
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            ROWS.append(row)
            print(row, flush=True)


@_guard("peers")
def part_peers(args):
    import torch
    import triton
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    dev = "cuda"
    for B, T, H, K, V in _shapes(args):
        shape = f"{B}x{T}x{H}x{K}"
        for variant in args.variants.split(","):
            torch.manual_seed(0)
            q = torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16)
            k = torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16)
            v = torch.randn(B, T, H, V, device=dev, dtype=torch.bfloat16)
            if variant in ("delta", "gated_delta"):
                k = torch.nn.functional.normalize(k.float(), dim=-1).to(torch.bfloat16)
                q = torch.nn.functional.normalize(q.float(), dim=-1).to(torch.bfloat16)
            beta = torch.rand(B, T, H, device=dev, dtype=torch.bfloat16).sigmoid()
            gs = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=dev) + 4.0)
            gk = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device=dev) + 4.0)
            for t in (q, k, v, beta, gs, gk):
                t.requires_grad_(True)
            peer_fns = {
                "la": lambda q=q, k=k, v=v: chunk_simple_gla(q, k, v, g=None)[0],
                "scalar": lambda q=q, k=k, v=v, g=gs: chunk_simple_gla(q, k, v, g=g)[0],
                "gla": lambda q=q, k=k, v=v, g=gk: chunk_gla(q, k, v, g=g)[0],
                "delta": lambda q=q, k=k, v=v, b=beta: chunk_delta_rule(q, k, v, b)[0],
                "gated_delta": (
                    lambda q=q, k=k, v=v, g=gs, b=beta: chunk_gated_delta_rule(q, k, v, g, b)[0]
                ),
            }
            fn = peer_fns[variant]
            row = {"part": "la", "op": variant, "shape": shape, "impl": "fla", "T": T}
            try:
                row["fwd_ms"] = triton.testing.do_bench(
                    fn, warmup=25, rep=100, return_mode="median"
                )
                do = torch.randn(B, T, H, V, device=dev, dtype=torch.bfloat16)

                def fb():
                    o = fn()
                    o.backward(do)

                row["fwdbwd_ms"] = triton.testing.do_bench(
                    fb,
                    warmup=25,
                    rep=100,
                    return_mode="median",
                    grad_to_none=[q, k, v, beta, gs, gk],
                )
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            ROWS.append(row)
            print(row, flush=True)
            del q, k, v
            torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="env,correct,la,lookup,peers")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    p.add_argument("--impls", default="pallas,xla", help="jax implementations to time ('' = none)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    copy_gbps = None
    if "env" in parts:
        copy_gbps = part_env(args)
    if "correct" in parts:
        part_correct_la(args)
        part_correct_lookup(args)
    if "peers" in parts:
        part_peers(args)
    if "la" in parts:
        part_la(args)
    if "lookup" in parts:
        part_lookup(args, copy_gbps)
    save_json(
        os.path.join(args.out, "gpu_check.json"),
        {"machine": machine_info(), "rows": ROWS, "errors": ERRORS},
    )
    corr = [r for r in ROWS if r.get("part") == "correct"]
    if corr:
        print(
            format_table(
                corr,
                ["op", "shape", "dtype", "err_o", "err_state", "err_grad_max", "finite", "error"],
            )
        )
    timed = [r for r in ROWS if r.get("part") in ("la", "lookup")]
    if timed:
        print(
            format_table(
                timed,
                ["op", "shape", "impl", "fwd_ms", "fwdbwd_ms", "GBps", "frac_of_copy", "error"],
            )
        )
    print(f"{len(ERRORS)} errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())

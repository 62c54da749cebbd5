"""Communication volume of sequence-parallel linear attention: LASP-2 style vs all-gather K/V.

``python -m benchmarks.scaleout [--quick] [--out DIR]`` (on CPU it fakes 8 devices when JAX has
not been imported yet). For several sequence lengths ``T`` it lowers and compiles, on ``n``
devices of a 1-D mesh axis ``"sequence"``:

* ``lasp2``: :func:`pallas_kernels.linear_attention.sequence_parallel.gated_linear_attention_sp`
  / ``delta_rule_sp`` — one all_gather of each shard's state (and state transition);
* ``allgather_kv``: the baseline that all-gathers the keys, values and gates (and ``beta``)
  of the whole sequence to every shard, which then computes its own queries' outputs. (Its
  compute is deliberately naive — the full sequence with the other shards' queries zeroed —
  only its communication is compared.)

and reports, per device and per forward call, the bytes all-gathered (the size of the
all_gather results, which include the device's own part) both **analytic** and **measured** by
parsing the all-gather ops in ``jax.jit(f).lower(...).compile().as_text()``. The measured total
over every collective of a forward+backward step (all-gather, reduce-scatter, all-reduce,
collective-permute, all-to-all) is reported too. Analytic, float32, ``n`` shards::

    lasp2 GLA:     n * B * H * K * (V + 1) * 4            (state | diagonal transition)
    lasp2 delta:   n * B * H * K * (V + K) * 4            (state | K x K transition)
    allgather_kv:  T * B * H * (K + V + gate width [+ 1 for beta]) * 4

The LASP-2 volume does not depend on ``T``; the baseline's grows linearly with it.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "jax" not in sys.modules:  # fake devices for a CPU run
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import re  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks.harness import format_table, machine_info, save_json  # noqa: E402

__all__ = ["collective_bytes", "comm_volume_rows", "main", "COLUMNS"]

COLUMNS = [
    "op",
    "method",
    "T",
    "shards",
    "allgather_bytes_analytic",
    "allgather_bytes_measured",
    "fwdbwd_collective_bytes",
]

_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_COLLECTIVES = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "collective-permute",
    "all-to-all",
)
# "%name = TYPE op(" where TYPE is one array type or a tuple of them; "-start" async forms
# carry (operands, results) tuples; "-done" forms are skipped (they would double count).
_LINE = re.compile(
    r"=\s*(?P<type>\(.*?\)|\S+)\s+(?P<op>" + "|".join(_COLLECTIVES) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def _array_bytes(type_str: str) -> list[int]:
    out = []
    for dt, dims in _ARRAY.findall(type_str):
        if dt not in _ITEMSIZE:
            continue
        out.append(
            int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * _ITEMSIZE[dt]
        )
    return out


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective in an HLO module's text (per device).

    Returns ``{op_name: bytes}`` for the ops in ``_COLLECTIVES`` found. For an async
    ``*-start`` op the result tuple holds operands then results; only the second half counts.
    """
    totals: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _LINE.search(line)
        if m is None:
            continue
        sizes = _array_bytes(m.group("type"))
        if m.group("start") and len(sizes) >= 2:
            sizes = sizes[len(sizes) // 2 :]
        totals[m.group("op")] = totals.get(m.group("op"), 0) + sum(sizes)
    return totals


# ---------------------------------------------------------------------------------------------
# The two methods.
# ---------------------------------------------------------------------------------------------


def _allgather_kv(op: str, mesh: Mesh, axis: str):
    """Baseline: gather k, v, g (and beta) of the whole sequence; compute local queries."""
    from pallas_kernels.linear_attention import api

    n = mesh.shape[axis]

    def local(q, k, v, g, beta):
        tl = q.shape[1]
        s = lax.axis_index(axis)
        full = [lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v, g, beta)]
        k_f, v_f, g_f, beta_f = full
        q_f = jnp.zeros((q.shape[0], tl * n) + q.shape[2:], q.dtype)
        q_f = lax.dynamic_update_slice_in_dim(q_f, q, s * tl, axis=1)
        if op == "delta":
            o = api.delta_rule(q_f, k_f, v_f, beta_f, g_f)
        else:
            o = api.gated_linear_attention(q_f, k_f, v_f, g_f)
        return lax.dynamic_slice_in_dim(o, s * tl, tl, axis=1)

    spec = P(None, axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False)


def _lasp2(op: str, mesh: Mesh, axis: str):
    from pallas_kernels.linear_attention import sequence_parallel as sp

    def fn(q, k, v, g, beta):
        if op == "delta":
            return sp.delta_rule_sp(q, k, v, beta, g, mesh=mesh, axis_name=axis)
        return sp.gated_linear_attention_sp(q, k, v, g, mesh=mesh, axis_name=axis)

    return fn


def _shapes(op, gate, B, T, H, K, V):
    f32 = jnp.float32
    s = jax.ShapeDtypeStruct
    g_shape = (B, T, H, K) if gate == "key" else (B, T, H)
    return (
        s((B, T, H, K), f32),
        s((B, T, H, K), f32),
        s((B, T, H, V), f32),
        s(g_shape, f32),
        s((B, T, H), f32),
    )


def _analytic(op, method, gate, n, B, T, H, K, V) -> int:
    if method == "lasp2":
        return n * B * H * K * ((V + K) if op == "delta" else (V + 1)) * 4
    width = K + V + (K if gate == "key" else 1) + (1 if op == "delta" else 0)
    return T * B * H * width * 4


def _measure(fn, shapes) -> tuple[int, int]:
    """(forward all-gather bytes, forward+backward bytes over every collective)."""
    fwd = jax.jit(fn).lower(*shapes).compile().as_text()

    def loss(*args):
        return jnp.sum(jnp.square(fn(*args)))

    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*shapes).compile().as_text()
    return collective_bytes(fwd).get("all-gather", 0), sum(collective_bytes(bwd).values())


def comm_volume_rows(
    Ts: Sequence[int] = (1024, 4096, 16384),
    *,
    B: int = 1,
    H: int = 4,
    K: int = 64,
    V: int = 64,
    ops: Sequence[str] = ("gla", "delta"),
    methods: Sequence[str] = ("lasp2", "allgather_kv"),
    gate: str = "key",
    n_shards: int | None = None,
    axis_name: str = "sequence",
    with_backward: bool = True,
) -> list[dict[str, Any]]:
    """Per-device all-gathered bytes of one forward call, analytic and measured from the HLO.

    Args:
      Ts: sequence lengths (each divisible by the shard count for a clean comparison).
      B, H, K, V: batch, heads, key and value head dims.
      ops: "gla" (gate shape per ``gate``: "key" [B,T,H,K] or "head" [B,T,H]) and/or "delta"
        (gated delta rule, [B,T,H] gate).
      methods: "lasp2" and/or "allgather_kv".
      n_shards: devices on the sequence axis (default: all devices).
      with_backward: also compile the gradient and sum every collective's bytes.
    Returns:
      rows with ``op, method, T, shards, allgather_bytes_analytic, allgather_bytes_measured,
      fwdbwd_collective_bytes`` (None when not measured).
    """
    n = n_shards or jax.device_count()
    mesh = Mesh(np.array(jax.devices()[:n]), (axis_name,))
    rows = []
    for op in ops:
        op_gate = "head" if op == "delta" else gate
        for method in methods:
            for T in Ts:
                shapes = _shapes(op, op_gate, B, T, H, K, V)
                make = _lasp2 if method == "lasp2" else _allgather_kv
                fn = make(op, mesh, axis_name)
                if with_backward:
                    fwd_b, all_b = _measure(fn, shapes)
                else:
                    fwd_txt = jax.jit(fn).lower(*shapes).compile().as_text()
                    fwd_b, all_b = collective_bytes(fwd_txt).get("all-gather", 0), None
                rows.append(
                    {
                        "op": op if op == "delta" else f"gla/{op_gate}",
                        "method": method,
                        "T": T,
                        "shards": n,
                        "B": B,
                        "H": H,
                        "K": K,
                        "V": V,
                        "allgather_bytes_analytic": _analytic(
                            op, method, op_gate, n, B, T, H, K, V
                        ),
                        "allgather_bytes_measured": fwd_b,
                        "fwdbwd_collective_bytes": all_b,
                    }
                )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scaleout", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    p.add_argument("--out", default="benchmarks/out")
    args = p.parse_args(argv)
    if jax.device_count() < 2:
        print(
            "scaleout needs >= 2 devices; on CPU set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts"
        )
        return 1
    if args.quick:
        rows = comm_volume_rows(Ts=(256, 1024), H=2, K=16, V=16, with_backward=False)
    else:
        rows = comm_volume_rows()
    print(format_table(rows, COLUMNS))
    os.makedirs(args.out, exist_ok=True)
    save_json(os.path.join(args.out, "scaleout.json"), {"machine": machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

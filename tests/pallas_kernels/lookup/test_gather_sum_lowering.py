"""The Pallas gather_sum kernels lower for the real backends (Triton for CUDA, Mosaic for TPU).

Forward and backward (both kernels of the custom_vjp), float32 and bfloat16, via
``jax.export`` on this CPU machine. A necessary check only: the backend compilers do not run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels._lowering import lower_for
from pallas_kernels.lookup import gather_sum

N, J, R, D = 40, 3, 16, 256  # n is not a multiple of any block


def _args(dtype, tables=J):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    idx = jax.random.randint(k1, (N, J), 0, R, jnp.int32)
    w = jax.random.normal(k2, (N, J), jnp.float32)
    tab = jax.random.normal(k3, (tables, R, D), jnp.float32).astype(dtype)
    return idx, w, tab


CASES = [(jnp.float32, J), (jnp.bfloat16, J), (jnp.float32, 1)]


@pytest.mark.parametrize("dtype,tables", CASES, ids=["f32", "bf16", "f32_shared_table"])
@pytest.mark.parametrize("pass_", ["forward", "backward"])
@pytest.mark.parametrize("target", ["cuda", "tpu"])
def test_lowers(target, pass_, dtype, tables):
    platform = "gpu" if target == "cuda" else "tpu"

    def fwd(idx, w, tab):
        return gather_sum(idx, w, tab, implementation="pallas", kernel_platform=platform)

    def bwd(idx, w, tab):
        loss = lambda w_, t_: jnp.sum(fwd(idx, w_, t_).astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1))(w, tab)

    text = lower_for(target, fwd if pass_ == "forward" else bwd, *_args(dtype, tables))
    marker = "triton" if target == "cuda" else "tpu_custom_call"
    assert marker in text
    if pass_ == "backward":
        for name in ("gather_sum_d_weights", "gather_sum_d_tables"):
            assert name in text, f"{name} kernel missing from the lowered backward"

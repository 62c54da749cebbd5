"""gather_sum: reference == xla == Pallas (interpret; GPU- and TPU-structured kernels).

Forward and both gradients (via ``jax.vjp`` with a random cotangent) on random shapes,
including duplicate indices, J=1, a single token and every token hitting one row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.lookup import BlockSizes, gather_sum
from tests import tolerances
from tests._asserts import assert_rel_close

IMPLS = {
    "xla": dict(implementation="xla"),
    "pallas_gpu": dict(implementation="pallas", interpret=True, kernel_platform="gpu"),
    "pallas_tpu": dict(implementation="pallas", interpret=True, kernel_platform="tpu"),
}

# (n, j, r, d): r small against n so indices repeat; odd sizes exercise masking/padding.
SHAPES = [
    (37, 3, 5, 40),
    (16, 1, 7, 33),
    (1, 2, 3, 8),
]
# Larger tables, several blocks per axis; in the slow run only (CPU time budget).
SLOW_SHAPES = [(24, 4, 64, 128), (300, 8, 256, 384)]


def _inputs(key, n, j, r, d, dtype, *, index_max=None):
    k1, k2, k3 = jax.random.split(key, 3)
    idx = jax.random.randint(k1, (n, j), 0, index_max or r, jnp.int32)
    w = jax.random.normal(k2, (n, j), jnp.float32).astype(dtype)
    tab = jax.random.normal(k3, (j, r, d), jnp.float32).astype(dtype)
    return idx, w, tab


def _vjp(fn, idx, w, tab, dy):
    y, pull = jax.vjp(lambda w_, t_: fn(idx, w_, t_), w, tab)
    return y, pull(dy.astype(y.dtype))


def _ref_f32(idx, w, tab, dy):
    f = functools.partial(gather_sum, implementation="reference")
    return _vjp(f, idx, w.astype(jnp.float32), tab.astype(jnp.float32), dy)


def _check_against_reference(impl, idx, w, tab, key):
    dtype = tab.dtype
    dy = jax.random.normal(key, (idx.shape[0], tab.shape[2]), jnp.float32)
    fn = jax.jit(functools.partial(gather_sum, **IMPLS[impl]))
    y, (dw, dtab) = _vjp(fn, idx, w, tab, dy)
    y_ref, (dw_ref, dtab_ref) = _ref_f32(idx, w, tab, dy)
    assert y.dtype == dtype and dw.dtype == w.dtype and dtab.dtype == dtype
    assert_rel_close(y, y_ref, tolerances.forward(dtype), "y")
    assert_rel_close(dw, dw_ref, tolerances.grad(dtype), "d_weights")
    assert_rel_close(dtab, dtab_ref, tolerances.grad(dtype), "d_tables")


_CASES = (
    [(s, jnp.float32, False) for s in SHAPES]
    + [(SHAPES[0], jnp.bfloat16, False)]
    + [(s, jnp.float32, True) for s in SLOW_SHAPES]
)
CASES = [
    pytest.param(
        s,
        dt,
        marks=[pytest.mark.slow] if slow else [],
        id="n{}_j{}_r{}_d{}_{}".format(*s, jnp.dtype(dt).name),
    )
    for s, dt, slow in _CASES
]


@pytest.mark.parametrize("shape,dtype", CASES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_matches_reference(impl, shape, dtype, key):
    k1, k2 = jax.random.split(key)
    idx, w, tab = _inputs(k1, *shape, dtype)
    _check_against_reference(impl, idx, w, tab, k2)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_every_token_hits_one_row(impl, key):
    """Maximal duplication: the d_tables scatter-add must sum all n contributions."""
    k1, k2 = jax.random.split(key)
    idx, w, tab = _inputs(k1, 21, 2, 6, 24, jnp.float32, index_max=1)
    _check_against_reference(impl, idx, w, tab, k2)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_non_default_block_sizes(impl, key):
    """Several programs per axis and a d_tables entry loop of several steps."""
    if impl == "xla":
        pytest.skip("no blocks")
    k1, k2 = jax.random.split(key)
    idx, w, tab = _inputs(k1, 20, 2, 4, 256, jnp.float32)
    bs = BlockSizes(block_n=8 if "tpu" in impl else 16, block_d=128, block_e=8)
    dy = jax.random.normal(k2, (20, 256), jnp.float32)
    fn = jax.jit(functools.partial(gather_sum, block_sizes=bs, **IMPLS[impl]))
    y, (dw, dtab) = _vjp(fn, idx, w, tab, dy)
    y_ref, (dw_ref, dtab_ref) = _ref_f32(idx, w, tab, dy)
    assert_rel_close(y, y_ref, tolerances.forward(jnp.float32), "y")
    assert_rel_close(dw, dw_ref, tolerances.grad(jnp.float32), "d_weights")
    assert_rel_close(dtab, dtab_ref, tolerances.grad(jnp.float32), "d_tables")


def test_mixed_dtypes_weights_f32_tables_bf16(key):
    k1, k2 = jax.random.split(key)
    idx, w, tab = _inputs(k1, 20, 3, 6, 32, jnp.float32)
    tab = tab.astype(jnp.bfloat16)
    for impl in IMPLS:
        y = jax.jit(functools.partial(gather_sum, **IMPLS[impl]))(idx, w, tab)
        assert y.dtype == jnp.bfloat16
        y_ref = gather_sum(idx, w, tab.astype(jnp.float32), implementation="reference")
        assert_rel_close(y, y_ref, tolerances.forward(jnp.bfloat16), impl)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_one_shared_table(impl, key):
    """tables [1, r, d]: every j indexes the same table; d_tables sums over all j."""
    k1, k2, k3 = jax.random.split(key, 3)
    idx, w, _ = _inputs(k1, 29, 4, 6, 20, jnp.float32)
    tab = jax.random.normal(k3, (1, 6, 20), jnp.float32)
    _check_against_reference(impl, idx, w, tab, k2)

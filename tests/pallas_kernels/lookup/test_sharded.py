"""Row-sharded gather_sum on 8 fake CPU devices == the unsharded op (outputs and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.lookup import gather_sum
from pallas_kernels.lookup.sharded import gather_sum_sharded
from tests import tolerances
from tests._asserts import assert_rel_close


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "rows"))


def _inputs(key, n, j, r, d, shared=False, dtype=jnp.float32):
    seed = np.asarray(jax.random.key_data(key), np.uint32).ravel().tolist()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, r, (n, j)).astype(np.int32)
    idx[0, :] = idx[1, :]  # duplicate rows: their table gradients must add up
    tables = rng.standard_normal((1 if shared else j, r, d)).astype(np.float32)
    return (
        jnp.asarray(idx),
        jnp.asarray(rng.standard_normal((n, j)), dtype),
        jnp.asarray(tables, dtype),
        jnp.asarray(rng.standard_normal((n, d)), dtype),
    )


def _value_and_vjp(fn, idx, w, tab, ct):
    def f(w, tab, ct):
        y, vjp = jax.vjp(lambda w_, t_: fn(idx, w_, t_), w, tab)
        return y, vjp(ct)

    return jax.jit(f)(w, tab, ct)


CASES = [
    # (id, shared table, token_axis, implementation, dtype)
    ("tables_xla", False, None, "xla", jnp.float32),
    ("shared_tokens-split_xla", True, "data", "xla", jnp.float32),
    ("tables_pallas-interpret", False, "data", "pallas", jnp.float32),
]


@pytest.mark.parametrize(
    ("shared", "token_axis", "impl", "dtype"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_matches_unsharded(mesh, key, shared, token_axis, impl, dtype):
    idx, w, tab, ct = _inputs(key, n=12, j=3, r=32, d=16, shared=shared, dtype=dtype)

    def sharded(i, w_, t_):
        return gather_sum_sharded(
            i,
            w_,
            t_,
            mesh=mesh,
            axis_name="rows",
            token_axis=token_axis,
            implementation=impl,
            interpret=True,
        )

    y, (dw, dtab) = _value_and_vjp(sharded, idx, w, tab, ct)
    y_ref, (dw_ref, dtab_ref) = _value_and_vjp(
        lambda i, w_, t_: gather_sum(i, w_, t_, implementation="reference"), idx, w, tab, ct
    )
    assert y.dtype == tab.dtype and dtab.dtype == tab.dtype
    assert_rel_close(y, y_ref, tolerances.forward(dtype), "y")
    assert_rel_close(dw, dw_ref, tolerances.grad(dtype), "d_weights")
    assert_rel_close(dtab, dtab_ref, tolerances.grad(dtype), "d_tables")


@pytest.mark.slow
def test_bfloat16_and_presharded_tables(mesh, key):
    """bf16 tables passed already row-sharded; the table gradient keeps that sharding."""
    idx, w, tab, ct = _inputs(key, n=16, j=2, r=64, d=32, dtype=jnp.bfloat16)
    row_sharded = NamedSharding(mesh, P(None, "rows", None))
    tab = jax.device_put(tab, row_sharded)
    sharded = lambda i, w_, t_: gather_sum_sharded(i, w_, t_, mesh=mesh, axis_name="rows")
    y, (dw, dtab) = _value_and_vjp(sharded, idx, w, tab, ct)
    y_ref, (dw_ref, dtab_ref) = _value_and_vjp(
        lambda i, w_, t_: gather_sum(i, w_, t_, implementation="reference"), idx, w, tab, ct
    )
    assert dtab.sharding.is_equivalent_to(row_sharded, dtab.ndim)
    assert_rel_close(y, y_ref, tolerances.forward(jnp.bfloat16), "y")
    assert_rel_close(dw, dw_ref, tolerances.grad(jnp.bfloat16), "d_weights")
    assert_rel_close(dtab, dtab_ref, tolerances.grad(jnp.bfloat16), "d_tables")


def test_out_of_range_dropped_under_jit(mesh):
    """Unchecked (traced) out-of-range indices add nothing, as in the unsharded op."""
    idx = jnp.asarray([[0, 31], [-1, 5], [32, 17]], jnp.int32)
    w = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], jnp.float32)
    tab = jnp.arange(2 * 32 * 4, dtype=jnp.float32).reshape(2, 32, 4) / 100
    fn = jax.jit(lambda i: gather_sum_sharded(i, w, tab, mesh=mesh, axis_name="rows"))
    expected = jax.jit(lambda i: gather_sum(i, w, tab))(idx)
    np.testing.assert_allclose(np.asarray(fn(idx)), np.asarray(expected), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input: one test per message.
# ---------------------------------------------------------------------------------------------


def _small(r=32):
    return (
        jnp.zeros((4, 2), jnp.int32),
        jnp.ones((4, 2), jnp.float32),
        jnp.ones((2, r, 8), jnp.float32),
    )


def test_error_mesh_type():
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        gather_sum_sharded(*_small(), mesh=None, axis_name="rows")


def test_error_axis_not_in_mesh(mesh):
    with pytest.raises(ValueError, match=r"axis_name must be one of the mesh axes \('data', "):
        gather_sum_sharded(*_small(), mesh=mesh, axis_name="model")


def test_error_rows_not_divisible(mesh):
    with pytest.raises(ValueError, match=r"tables.shape\[1\] \(rows, 30\) must be divisible"):
        gather_sum_sharded(*_small(r=30), mesh=mesh, axis_name="rows")


def test_error_token_axis_not_in_mesh(mesh):
    with pytest.raises(ValueError, match="token_axis must be None or one of the mesh axes"):
        gather_sum_sharded(*_small(), mesh=mesh, axis_name="rows", token_axis="batch")


def test_error_token_axis_is_axis_name(mesh):
    with pytest.raises(ValueError, match="token_axis must differ from axis_name='rows'"):
        gather_sum_sharded(*_small(), mesh=mesh, axis_name="rows", token_axis="rows")


def test_error_tokens_not_divisible(mesh):
    idx, w, tab = _small()
    with pytest.raises(ValueError, match=r"indices.shape\[0\] \(tokens, 3\) must be divisible"):
        gather_sum_sharded(idx[:3], w[:3], tab, mesh=mesh, axis_name="rows", token_axis="data")


def test_error_index_out_of_range_global(mesh):
    """Concrete indices are checked against the global row count, like gather_sum."""
    idx, w, tab = _small()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 32\)"):
        gather_sum_sharded(idx.at[0, 0].set(32), w, tab, mesh=mesh, axis_name="rows")


def test_error_unsharded_validation(mesh):
    idx, w, tab = _small()
    with pytest.raises(ValueError, match="weights must have the shape of indices"):
        gather_sum_sharded(idx, w[:, :1], tab, mesh=mesh, axis_name="rows")

"""Thin assertion helpers over chex, with relative-error reporting."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np


def rel_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    denom = np.linalg.norm(ref.ravel())
    num = np.linalg.norm((out - ref).ravel())
    return float(num / max(denom, 1e-30))


def assert_rel_close(out, ref, tol: float, name: str = "output") -> None:
    """Assert ``||out-ref||/||ref|| <= tol`` for every leaf of two matching trees."""
    chex.assert_trees_all_equal_shapes(out, ref)
    leaves_o, tree = jax.tree.flatten(out)
    leaves_r = jax.tree.leaves(ref)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(out)[0]]
    for path, o, r in zip(paths, leaves_o, leaves_r, strict=True):
        o_np = np.asarray(jnp.asarray(o, jnp.float32))
        assert np.all(np.isfinite(o_np)), f"{name}{path}: non-finite values"
        assert np.linalg.norm(np.asarray(jnp.asarray(r, jnp.float32))) > 0, (
            f"{name}{path}: reference is all zeros; the test would be vacuous"
        )
        err = rel_err(o, r)
        assert err <= tol, f"{name}{path}: relative error {err:.3e} > tol {tol:.1e}"


assert_shape = chex.assert_shape
assert_trees_all_close = chex.assert_trees_all_close
assert_tree_all_finite = chex.assert_tree_all_finite
assert_max_traces = chex.assert_max_traces

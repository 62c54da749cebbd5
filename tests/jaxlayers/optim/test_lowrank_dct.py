"""Low-rank DCT-projected Adam: the basis, full rank == Adam in DCT coordinates (and plain Adam
with the identity basis), low-rank state memory, the refresh gap, the transposed side."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlayers.optim import adam8bit, lowrank_dct
from tests._asserts import assert_rel_close


def _grads(seed, shapes, steps):
    rng = np.random.default_rng(seed)
    return [
        {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        for _ in range(steps)
    ]


def _run(opt, grads):
    # optax's own transforms need standard promotion (its bias correction mixes int and float);
    # ours run under the suite's strict promotion too.
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(jax.tree.map(jnp.zeros_like, grads[0]))
        outs = []
        step = jax.jit(opt.update)
        for g in grads:
            u, state = step(g, state)
            outs.append(u)
    return outs, state


def test_dct_matrix_is_orthonormal_dct2():
    d = np.asarray(lowrank_dct.dct_matrix(16), np.float64)
    np.testing.assert_allclose(d.T @ d, np.eye(16), atol=1e-6)
    k, j = np.arange(16)[:, None], np.arange(16)[None, :]
    want = np.cos(np.pi * (2 * k + 1) * j / 32) * np.where(j == 0, np.sqrt(1 / 16), np.sqrt(2 / 16))
    np.testing.assert_allclose(d, want, atol=1e-6)


SHAPES = {"w": (12, 8), "wt": (6, 10), "b": (8,)}


def test_full_rank_identity_basis_is_plain_adam():
    grads = _grads(0, SHAPES, 4)
    ours, _ = _run(lowrank_dct.scale_by_dct_adam(rank=10, basis="identity", update_gap=1), grads)
    ref, _ = _run(optax.scale_by_adam(), grads)
    for a, b in zip(ours, ref, strict=True):
        assert_rel_close(a, b, 1e-5)


def test_full_rank_dct_is_adam_in_dct_coordinates():
    """r = n: lossless projection; the update is adam(G D) D^T (exact), not plain Adam."""
    grads = _grads(1, {"w": (12, 8)}, 4)
    ours, state = _run(lowrank_dct.scale_by_dct_adam(rank=8, update_gap=1), grads)
    np.testing.assert_array_equal(state.indices["w"], np.arange(8))
    d = lowrank_dct.dct_matrix(8)
    rotated = [{"w": g["w"] @ d} for g in grads]
    ref, _ = _run(optax.scale_by_adam(), rotated)
    for a, b in zip(ours, ref, strict=True):
        assert_rel_close(a["w"], b["w"] @ d.T, 1e-5)
    plain, _ = _run(optax.scale_by_adam(), grads)
    assert np.abs(np.asarray(ours[-1]["w"] - plain[-1]["w"])).max() > 1e-2


def test_low_rank_projection_state_and_selection():
    grads = _grads(2, SHAPES, 5)
    opt = lowrank_dct.scale_by_dct_adam(rank=3, update_gap=2)
    outs, state = _run(opt, grads)
    # state memory scales with r: [max(M, N), r] moments and r indices per 2-D leaf
    assert state.mu["w"].shape == (12, 3) and state.mu["wt"].shape == (10, 3)
    assert state.indices["w"].shape == (3,) and state.mu["b"].shape == (8,)
    dense = adam8bit.state_nbytes(jax.eval_shape(optax.scale_by_adam().init, grads[0]))
    assert adam8bit.state_nbytes(state) < dense
    # the last refresh (step index 4) selected the columns best aligned with that gradient
    g = np.asarray(grads[4]["w"], np.float64)
    d = np.asarray(lowrank_dct.dct_matrix(8), np.float64)
    best = np.sort(np.argsort(-np.sum((g @ d) ** 2, axis=0))[:3])
    np.testing.assert_array_equal(state.indices["w"], best)
    # updates lie in the span of the selected columns (right side for [12, 8], left for [6, 10])
    q = d[:, best]
    u = np.asarray(outs[-1]["w"], np.float64)
    np.testing.assert_allclose(u @ q @ q.T, u, atol=1e-5)
    assert outs[-1]["wt"].shape == (6, 10)


def test_indices_change_only_on_refresh_steps():
    grads = _grads(3, {"w": (16, 16)}, 4)
    opt = lowrank_dct.scale_by_dct_adam(rank=2, update_gap=3)
    state = opt.init({"w": jnp.zeros((16, 16))})
    seen = []
    for g in grads:
        _, state = opt.update(g, state)
        seen.append(np.asarray(state.indices["w"]))
    np.testing.assert_array_equal(seen[0], seen[1])
    np.testing.assert_array_equal(seen[0], seen[2])


def test_dct_adam_trains_a_regression():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    y = x @ w_true

    def loss(p):
        return jnp.mean((x @ p["w"] - y) ** 2)

    opt = lowrank_dct.dct_adam(0.05, rank=4, update_gap=10)
    p = {"w": jnp.zeros((16, 8), jnp.float32)}

    @jax.jit
    def train(p):
        def body(c, _):
            p, s = c
            u, s = opt.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (p, opt.init(p)), None, length=200)[0][0]

    assert float(loss(train(p))) < 0.05 * float(loss(p))


def test_error_rank():
    with pytest.raises(
        ValueError, match=r"rank and update_gap must be >= 1; got rank=0, update_gap=1"
    ):
        lowrank_dct.scale_by_dct_adam(rank=0, update_gap=1)


def test_error_basis():
    with pytest.raises(ValueError, match=r"basis must be one of \('dct', 'identity'\); got 'svd'"):
        lowrank_dct.scale_by_dct_adam(rank=2, basis="svd")

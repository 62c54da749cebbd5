"""TTT-Linear: paper equations in float64, dual == primal, online GD == delta rule, decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.linear_attention import ttt
from pallas_kernels.linear_attention import delta_rule
from tests import tolerances
from tests._asserts import assert_rel_close

F32 = tolerances.forward(jnp.float32)
REC = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]


def _params(cfg, seed=0):
    """Random params with a non-trivial inner LayerNorm and W_0."""
    rng = np.random.default_rng(seed)
    params = core.init(jax.random.key(seed), cfg)
    inner = dict(params["inner"])
    h, k = cfg.num_heads, cfg.head_dim
    inner["w"] = jnp.asarray(rng.normal(0, 0.3, (h, k, k)), jnp.float32)
    if cfg.inner_layer_norm:
        inner["ln_scale"] = jnp.asarray(1 + 0.2 * rng.normal(size=(h, k)), jnp.float32)
        inner["ln_bias"] = jnp.asarray(0.2 * rng.normal(size=(h, k)), jnp.float32)
    params["inner"] = inner
    return params


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _np_ttt(params, x, cfg):
    """Token-by-token float64 TTT-Linear from the paper's equations (LayerNorm Jacobian form)."""
    f64 = lambda a: np.asarray(a, np.float64)
    x = f64(x)
    b, t, _ = x.shape
    h, k, mb = cfg.num_heads, cfg.head_dim, cfg.mini_batch_size
    q, kk, v = (x @ f64(params[n]["kernel"]) for n in ("q", "k", "v"))
    q, kk, v = (a.reshape(b, t, h, k) for a in (q, kk, v))
    logits = x @ f64(params["lr"]["kernel"]) + f64(params["lr"]["bias"])
    eta = cfg.base_lr / k / (1 + np.exp(-logits))
    w0 = f64(params["inner"]["w"])
    ln = cfg.inner_layer_norm
    gamma = f64(params["inner"]["ln_scale"]) if ln else None
    beta = f64(params["inner"]["ln_bias"]) if ln else None

    def layer_norm(z, hi):
        mu = z.mean()
        sig = np.sqrt(((z - mu) ** 2).mean() + cfg.ln_eps)
        zh = (z - mu) / sig
        return gamma[hi] * zh + beta[hi], zh, sig

    out = np.zeros((b, t, h, k))
    for bi in range(b):
        for hi in range(h):
            w = w0[hi].copy()
            for ti in range(t):
                if ti % mb == 0:
                    w_start = w.copy()
                kt, vt, qt = kk[bi, ti, hi], v[bi, ti, hi], q[bi, ti, hi]
                z = kt @ w_start
                target = vt - kt if cfg.inner_residual else vt
                if ln:
                    f, zh, sig = layer_norm(z, hi)
                    jac = (gamma[hi][:, None] / sig) * (np.eye(k) - 1.0 / k - np.outer(zh, zh) / k)
                    dz = jac.T @ (f - target)
                else:
                    dz = z - target
                w = w - eta[bi, ti, hi] * np.outer(kt, dz)
                zq = qt @ w
                o = layer_norm(zq, hi)[0] if ln else zq
                out[bi, ti, hi] = qt + o if cfg.inner_residual else o
    return out.reshape(b, t, h * k) @ f64(params["o"]["kernel"])


@pytest.mark.parametrize(
    "mb,ln,res,impl",
    [
        (4, True, True, "dual"),
        (4, True, True, "primal"),
        (3, False, True, "dual"),
        (1, True, False, "dual"),
    ],
    ids=lambda v: str(v),
)
def test_matches_float64_paper_equations(mb, ln, res, impl):
    cfg = ttt.Config(
        d_model=8,
        num_heads=2,
        mini_batch_size=mb,
        inner_layer_norm=ln,
        inner_residual=res,
        implementation=impl,
    )
    params = _params(cfg)
    x = _x((2, 10, 8))
    want = _np_ttt(params, x, cfg)
    assert_rel_close(jax.jit(lambda p, xx: ttt.apply(p, xx, cfg))(params, x), want, REC)


def _inner_inputs(b, t, h, k, seed=2):
    rng = np.random.default_rng(seed)
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, h, k)), jnp.float32) for _ in range(3))
    eta = jnp.asarray(rng.uniform(0.02, 0.2, (b, t, h)), jnp.float32)
    return q, kk, v, eta


@pytest.mark.parametrize("mb", [1, 16], ids=lambda m: f"mb={m}")
def test_dual_form_equals_primal_form(mb):
    cfg = ttt.Config(d_model=8, num_heads=2, mini_batch_size=mb)
    inner = _params(cfg)["inner"]
    q, k, v, eta = _inner_inputs(2, 11, 2, 4)
    state0 = {
        "dw_start": jnp.asarray(np.random.default_rng(3).normal(0, 0.1, (2, 2, 4, 4)), jnp.float32),
        "dw": jnp.asarray(np.random.default_rng(4).normal(0, 0.1, (2, 2, 4, 4)), jnp.float32),
        "pos": jnp.asarray(min(2, mb - 1), jnp.int32),
    }

    @jax.jit
    def both(q, k, v, eta, state0):
        outs = []
        for impl in ("dual", "primal"):
            c = cfg.replace(implementation=impl)
            outs.append(ttt.inner_loop(q, k, v, eta, inner, c))
            outs.append(ttt.inner_loop(q, k, v, eta, inner, c, initial_state=state0))
        return outs

    d0, d1, p0, p1 = both(q, k, v, eta, state0)
    for name, (zd, sd), (zp, sp) in (("from W_0", d0, p0), ("from a mid-mini-batch state", d1, p1)):
        w0 = inner["w"][None]
        got = (zd, sd["dw_start"] + w0, sd["dw"] + w0)
        want = (zp, sp["dw_start"] + w0, sp["dw"] + w0)
        assert_rel_close(got, want, REC, name=name)
        assert int(sd["pos"]) == int(sp["pos"])
    assert int(d1[1]["pos"]) == (int(state0["pos"]) + 11) % mb


def test_online_gd_without_layer_norm_is_the_delta_rule():
    cfg = ttt.Config(
        d_model=8, num_heads=2, mini_batch_size=1, inner_layer_norm=False, inner_residual=False
    )
    inner = _params(cfg)["inner"]
    q, k, v, eta = _inner_inputs(2, 9, 2, 4)
    z, state = ttt.inner_loop(q, k, v, eta, inner, cfg)
    w0 = jnp.broadcast_to(inner["w"][None], (2, 2, 4, 4))
    o, s = delta_rule(
        q,
        k,
        v,
        eta,
        scale=1.0,
        initial_state=w0,
        return_final_state=True,
        implementation="reference",
    )
    assert_rel_close(z, o, F32, name="outputs")
    assert_rel_close(state["dw"] + w0, s, F32, name="final W")


def test_larger_mini_batch_is_not_the_delta_rule():
    cfg = ttt.Config(
        d_model=8, num_heads=2, mini_batch_size=4, inner_layer_norm=False, inner_residual=False
    )
    inner = _params(cfg)["inner"]
    q, k, v, eta = _inner_inputs(1, 8, 2, 4)
    z, _ = ttt.inner_loop(q, k, v, eta, inner, cfg)
    w0 = jnp.broadcast_to(inner["w"][None], (1, 2, 4, 4))
    o = delta_rule(q, k, v, eta, scale=1.0, initial_state=w0, implementation="reference")
    # Token 0 agrees (its gradient is at W_{-1} = W_0 in both); later ones do not.
    np.testing.assert_allclose(np.asarray(z[:, 0]), np.asarray(o[:, 0]), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(z[:, 1:4] - o[:, 1:4]))) > 1e-3


def test_chained_applies_and_steps_equal_one_apply():
    cfg = ttt.Config(d_model=8, num_heads=2, mini_batch_size=4)
    params = _params(cfg)
    x = _x((2, 13, 8))

    @jax.jit
    def run(p, x):
        full = ttt.apply(p, x, cfg)
        y1, s = ttt.apply(p, x[:, :3], cfg, return_state=True)  # ends at pos 3
        y2, s = ttt.apply(p, x[:, 3:9], cfg, initial_state=s, return_state=True)  # pos 1
        ys = []
        for i in range(9, 11):
            y, s = ttt.step(p, s, x[:, i], cfg)
            ys.append(y[:, None])
        y3 = ttt.apply(p, x[:, 11:], cfg, initial_state=s)
        return full, jnp.concatenate([y1, y2] + ys + [y3], axis=1)

    full, pieces = run(params, x)
    assert_rel_close(pieces, full, REC)


def test_init_state_is_w0_at_a_boundary():
    cfg = ttt.Config(d_model=8, num_heads=2, mini_batch_size=4)
    s = ttt.init_state(cfg, 3, jnp.bfloat16)
    assert s["dw"].shape == (3, 2, 4, 4) and s["dw"].dtype == jnp.float32
    assert int(s["pos"]) == 0 and not np.any(np.asarray(s["dw_start"]))


# ------------------------------------------------------------------------------------------
# Errors: one test per message
# ------------------------------------------------------------------------------------------

_CFG = ttt.Config(d_model=8, num_heads=2, mini_batch_size=4)


def _bad_state():
    s = ttt.init_state(_CFG, 2)
    return {**s, "dw": jnp.zeros((2, 2, 4, 3))}


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda p: ttt.Config(d_model=8, num_heads=0), ValueError, "num_heads must be positive"),
        (lambda p: ttt.Config(d_model=9, num_heads=2), ValueError, "d_model=9 must be divisible"),
        (
            lambda p: ttt.Config(d_model=8, num_heads=2, mini_batch_size=0),
            ValueError,
            "mini_batch_size must be >= 1",
        ),
        (
            lambda p: ttt.Config(d_model=8, num_heads=2, base_lr=0.0),
            ValueError,
            "base_lr must be positive",
        ),
        (
            lambda p: ttt.Config(d_model=8, num_heads=2, implementation="x"),
            ValueError,
            "implementation must be one of",
        ),
        (lambda p: ttt.apply(p, jnp.ones((2, 8)), _CFG), ValueError, "x must have rank 3"),
        (lambda p: ttt.apply(p, jnp.ones((2, 3, 6)), _CFG), ValueError, r"x.shape\[-1\]"),
        (
            lambda p: ttt.apply(p, jnp.ones((2, 3, 8), jnp.int32), _CFG),
            TypeError,
            "x must have a floating dtype",
        ),
        (
            lambda p: ttt.apply(p, jnp.ones((2, 3, 8)), _CFG, segment_ids=jnp.zeros((2, 3), int)),
            NotImplementedError,
            "does not support segment_ids",
        ),
        (
            lambda p: ttt.apply(p, jnp.ones((2, 3, 8)), _CFG, initial_state={"w": 0}),
            ValueError,
            "state must be a dict with keys",
        ),
        (
            lambda p: ttt.apply(p, jnp.ones((2, 3, 8)), _CFG, initial_state=_bad_state()),
            ValueError,
            r"state\['dw'\] must have shape",
        ),
        (
            lambda p: ttt.step(p, ttt.init_state(_CFG, 2), jnp.ones((2, 1, 8)), _CFG),
            ValueError,
            "x_t must have rank 2",
        ),
    ],
    ids=[
        "heads",
        "divisible",
        "mini_batch",
        "base_lr",
        "implementation",
        "x_rank",
        "x_dim",
        "x_dtype",
        "segment_ids",
        "state_keys",
        "state_shape",
        "x_t_rank",
    ],
)
def test_errors(call, exc, match):
    params = core.init(jax.random.key(0), _CFG)
    with pytest.raises(exc, match=match):
        call(params)

"""LoLCATs: the window + linear formula in float64, full window == softmax, packing, decoding,
attention transfer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import attention, core
from jaxlayers.linear_attention import lolcats as lc
from tests import tolerances
from tests._asserts import assert_rel_close

F32 = tolerances.forward(jnp.float32)
REC = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]


def _params(cfg, seed=0):
    """Random params with non-trivial feature maps and mix factors."""
    rng = np.random.default_rng(seed)
    params = core.init(jax.random.key(seed), cfg)
    h, k, f = cfg.num_heads, cfg.head_dim, cfg.f_dim
    for name in ("feature_map_q", "feature_map_k"):
        params[name] = {"kernel": jnp.asarray(rng.normal(0, 0.7, (h, k, f)), jnp.float32)}
    params["window_factor"] = {"logit": jnp.asarray(rng.normal(size=(h,)), jnp.float32)}
    return params


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_lolcats(params, x, cfg):
    """Dense float64 evaluation of the LoLCATs equation, query by query."""
    f64 = lambda a: np.asarray(a, np.float64)
    x = f64(x)
    b, t, _ = x.shape
    h, dk, w = cfg.num_heads, cfg.head_dim, cfg.window
    q, k, v = ((x @ f64(params[n]["kernel"])).reshape(b, t, h, dk) for n in ("q", "k", "v"))

    def phi(a, name):
        z = np.einsum("bthk,hkf->bthf", a, f64(params[name]["kernel"]))
        return np.concatenate([_np_softmax(z), _np_softmax(-z)], -1)

    fq, fk = phi(q, "feature_map_q"), phi(k, "feature_map_k")
    mix = 1 / (1 + np.exp(-f64(params["window_factor"]["logit"])))  # [h]
    y = np.zeros((b, t, h, dk))
    for i in range(t):
        win = np.arange(max(0, i - w + 1), i + 1)
        logits = np.einsum("bhk,bshk->bhs", q[:, i], k[:, win]) / np.sqrt(dk)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        num = mix[None, :, None] * np.einsum("bhs,bshk->bhk", a, v[:, win])
        den = mix[None] * a.sum(-1)
        if i - w >= 0:
            old = np.arange(0, i - w + 1)
            lin = np.einsum("bhf,bshf->bhs", fq[:, i], fk[:, old])
            num = num + (1 - mix)[None, :, None] * np.einsum("bhs,bshk->bhk", lin, v[:, old])
            den = den + (1 - mix)[None] * lin.sum(-1)
        y[:, i] = num / den[..., None]
    return y.reshape(b, t, h * dk) @ f64(params["o"]["kernel"])


@pytest.mark.parametrize("t,w", [(11, 4), (9, 1), (13, 5)], ids=lambda v: str(v))
def test_matches_float64_formula(t, w):
    cfg = lc.Config(d_model=8, num_heads=2, window=w, feature_dim=3)
    params = _params(cfg)
    x = _x((2, t, 8))
    got = jax.jit(lambda p, xx: lc.apply(p, xx, cfg))(params, x)
    assert_rel_close(got, _np_lolcats(params, x, cfg), F32)


@pytest.mark.parametrize("w", [12, 40], ids=lambda w: f"window={w}")
def test_full_window_is_softmax_attention(w):
    cfg = lc.Config(d_model=8, num_heads=2, window=w)
    params = _params(cfg)
    x = _x((2, 12, 8))
    teacher = attention.Config(d_model=8, num_heads=2, use_rope=False, implementation="reference")

    @jax.jit
    def run(p, x):
        want = attention.apply({n: p[n] for n in ("q", "k", "v", "o")}, x, teacher)
        got = lc.apply(p, x, cfg)
        return want, got, lc.teacher_apply(p, x, cfg), lc.attention_transfer_loss(p, x, cfg, want)

    want, got, via_teacher, loss = run(params, x)
    assert_rel_close(got, want, F32)
    assert_rel_close(via_teacher, want, F32, name="teacher_apply")
    assert float(loss) < 1e-10


def test_attention_transfer_loss_is_mse_and_trains_the_feature_maps():
    cfg = lc.Config(d_model=8, num_heads=2, window=3)
    params = _params(cfg)
    x = _x((2, 10, 8))

    @jax.jit
    def run(p, x):
        teacher = jax.lax.stop_gradient(lc.teacher_apply(p, x, cfg))
        loss, grads = jax.value_and_grad(lc.attention_transfer_loss)(p, x, cfg, teacher)
        return loss, grads, lc.apply(p, x, cfg), teacher

    loss, grads, y, teacher = run(params, x)
    want = np.mean((np.asarray(y, np.float64) - np.asarray(teacher, np.float64)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    for name in ("feature_map_q", "feature_map_k", "window_factor"):
        assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads[name])), name


def test_segment_ids_equal_separate_sequences():
    cfg = lc.Config(d_model=8, num_heads=2, window=3)
    params = _params(cfg)
    x = _x((2, 14, 8))
    cut = 6
    seg = jnp.asarray(np.repeat([[0] * cut + [1] * (14 - cut)], 2, axis=0), jnp.int32)

    @jax.jit
    def run(p, x):
        packed = lc.apply(p, x, cfg, segment_ids=seg)
        separate = jnp.concatenate(
            [lc.apply(p, x[:, :cut], cfg), lc.apply(p, x[:, cut:], cfg)], axis=1
        )
        return packed, separate

    packed, separate = run(params, x)
    assert_rel_close(packed, separate, F32)


def test_split_sequences_and_steps_equal_one_apply():
    cfg = lc.Config(d_model=8, num_heads=2, window=4)
    params = _params(cfg)
    x = _x((2, 15, 8))

    @jax.jit
    def run(p, x):
        full = lc.apply(p, x, cfg)
        y1, s = lc.apply(p, x[:, :2], cfg, return_state=True)  # shorter than the window
        y2, s = lc.apply(p, x[:, 2:9], cfg, initial_state=s, return_state=True)
        ys = []
        for i in range(9, 12):
            y, s = lc.step(p, s, x[:, i], cfg)
            ys.append(y[:, None])
        y3, s = lc.apply(p, x[:, 12:], cfg, initial_state=s, return_state=True)
        return full, jnp.concatenate([y1, y2] + ys + [y3], axis=1), s

    full, pieces, state = run(params, x)
    assert_rel_close(pieces, full, REC)
    assert int(state["index"]) == 15
    np.testing.assert_array_equal(state["k"].shape, (2, 4, 2, 4))


# ------------------------------------------------------------------------------------------
# Errors: one test per message
# ------------------------------------------------------------------------------------------

_CFG = lc.Config(d_model=8, num_heads=2, window=4)


def _bad_state():
    s = lc.init_state(_CFG, 2)
    return {**s, "k": jnp.zeros((2, 3, 2, 4))}


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda p: lc.Config(d_model=8, num_heads=0), ValueError, "num_heads must be positive"),
        (lambda p: lc.Config(d_model=9, num_heads=2), ValueError, "d_model=9 must be divisible"),
        (lambda p: lc.Config(d_model=8, num_heads=2, window=0), ValueError, "window must be >= 1"),
        (
            lambda p: lc.Config(d_model=8, num_heads=2, feature_dim=0),
            ValueError,
            "feature_dim must be >= 1",
        ),
        (lambda p: lc.apply(p, jnp.ones((2, 8)), _CFG), ValueError, "x must have rank 3"),
        (lambda p: lc.apply(p, jnp.ones((2, 3, 6)), _CFG), ValueError, r"x.shape\[-1\]"),
        (
            lambda p: lc.apply(p, jnp.ones((2, 3, 8)), _CFG, segment_ids=jnp.zeros((2, 3))),
            TypeError,
            "segment_ids must have an integer dtype",
        ),
        (
            lambda p: lc.apply(
                p, jnp.ones((2, 3, 8)), _CFG, segment_ids=jnp.zeros((2, 4), jnp.int32)
            ),
            ValueError,
            "segment_ids must have shape",
        ),
        (
            lambda p: lc.apply(
                p,
                jnp.ones((2, 3, 8)),
                _CFG,
                segment_ids=jnp.zeros((2, 3), jnp.int32),
                return_state=True,
            ),
            ValueError,
            "segment_ids cannot be combined",
        ),
        (
            lambda p: lc.apply(p, jnp.ones((2, 3, 8)), _CFG, initial_state={"k": 0}),
            ValueError,
            "state must be a dict with keys",
        ),
        (
            lambda p: lc.apply(p, jnp.ones((2, 3, 8)), _CFG, initial_state=_bad_state()),
            ValueError,
            r"state\['k'\] must have shape",
        ),
        (
            lambda p: lc.step(p, lc.init_state(_CFG, 2), jnp.ones((2, 1, 8)), _CFG),
            ValueError,
            "x_t must have rank 2",
        ),
        (
            lambda p: lc.attention_transfer_loss(p, jnp.ones((2, 3, 8)), _CFG, jnp.ones((2, 8))),
            ValueError,
            "teacher_out must have rank 3",
        ),
        (
            lambda p: lc.attention_transfer_loss(p, jnp.ones((2, 3, 8)), _CFG, jnp.ones((2, 4, 8))),
            ValueError,
            "teacher_out must have the shape of x",
        ),
    ],
    ids=[
        "heads",
        "divisible",
        "window",
        "feature_dim",
        "x_rank",
        "x_dim",
        "segment_dtype",
        "segment_shape",
        "segment_with_state",
        "state_keys",
        "state_shape",
        "x_t_rank",
        "teacher_rank",
        "teacher_shape",
    ],
)
def test_errors(call, exc, match):
    params = core.init(jax.random.key(0), _CFG)
    with pytest.raises(exc, match=match):
        call(params)

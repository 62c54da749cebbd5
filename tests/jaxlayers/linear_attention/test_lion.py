"""LION: full (masked matrix) and two-scan forms vs a float64 dense reference, segments, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.linear_attention import lion
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.jaxlayers.linear_attention.test_feature_maps import np_phi
from tests.jaxlayers.linear_attention.test_linear_attn import _np, np_dense, rand_x

REC = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_lambda(p, x, cfg: lion.Config):
    """Per-token decays ``[b, t, h]`` (ones for LION-LIT)."""
    b, t, _ = x.shape
    if cfg.decay is None:
        return np.ones((b, t, cfg.num_heads))
    if cfg.decay == "fixed":
        return np.broadcast_to(_sigmoid(p["decay"]["logit"]), (b, t, cfg.num_heads))
    return _sigmoid(x @ p["decay"]["kernel"] + p["decay"]["bias"])


def np_lion(params, x, cfg: lion.Config, segment_ids=None):
    """The paper's masked-matrix equation, with the mask built as explicit products."""
    p = _np(params)
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    h, kd = cfg.num_heads, cfg.key_dim
    q, k, v = (np_dense(p[n], x).reshape(b, t, h, kd) for n in ("q", "k", "v"))
    fq = np_phi(cfg.feature_map, q, "q", p.get("feature_map"))
    fk = np_phi(cfg.feature_map, k, "k", p.get("feature_map"))
    lam = np_lambda(p, x, cfg)
    runs = np.zeros((b, t), int)
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        runs[:, 1:] = np.cumsum(seg[:, 1:] != seg[:, :-1], axis=1)
    o = np.zeros((b, t, h, kd))
    for bi in range(b):
        for hi in range(h):
            m = np.zeros((t, t))
            for i in range(t):
                for j in range(t):
                    lo, hi_ = min(i, j), max(i, j)
                    same = runs[bi, i] == runs[bi, j]
                    m[i, j] = np.prod(lam[bi, lo + 1 : hi_ + 1, hi]) if same else 0.0
            a = cfg.op_scale * (fq[bi, :, hi] @ fk[bi, :, hi].T) * m
            num = a @ v[bi, :, hi]
            if cfg.normalize:
                num = num / (a.sum(-1, keepdims=True) + cfg.eps)
            o[bi, :, hi] = num
    return np_dense(p["o"], o.reshape(b, t, h * kd))


def make_params(cfg, seed=0):
    params = lion.init(jax.random.key(seed), cfg)
    rng = np.random.default_rng(seed + 7)
    if cfg.decay == "fixed":  # decays well below 1, so the mask matters at t = 8
        params["decay"]["logit"] = jnp.asarray(rng.uniform(0.0, 2.0, cfg.num_heads), jnp.float32)
    if cfg.decay == "selective":
        params["decay"]["kernel"] = jnp.asarray(rng.standard_normal((cfg.d_model, cfg.num_heads)))
        params["decay"]["bias"] = jnp.asarray(rng.uniform(0.0, 2.0, cfg.num_heads))
    if "feature_map" in params:
        params["feature_map"] = jax.tree.map(
            lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape)), params["feature_map"]
        )
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


@functools.cache
def _jit_apply(cfg):
    return jax.jit(lambda p, x, seg=None: lion.apply(p, x, cfg, segment_ids=seg))


SEG = np.asarray([[0, 0, 0, 1, 1, 1, 1, 1], [4, 4, 4, 4, 4, 4, 4, 4]], np.int32)


@pytest.mark.parametrize("form", lion.FORMS)
@pytest.mark.parametrize("decay", lion.DECAYS, ids=lambda d: f"decay={d}")
def test_matches_dense_reference(decay, form):
    cfg = lion.Config(d_model=16, num_heads=2, decay=decay, form=form)
    params = make_params(cfg)
    x = rand_x((2, 8, 16))
    # The full form has one path; the two-scan form passes segment_ids=None to the op.
    for seg in (None, SEG) if form == "two_scan" else (SEG,):
        y = _jit_apply(cfg)(params, x, None if seg is None else jnp.asarray(seg))
        assert_rel_close(y, np_lion(params, x, cfg, seg), REC, name=f"{decay}/{form}/{seg is None}")


CASES = {
    "hedgehog_selective": dict(feature_map="hedgehog", decay="selective"),
    "identity_fixed_unnormalized": dict(feature_map="identity", decay="fixed", normalize=False),
    "norm_aware_lit": dict(feature_map="norm_aware", use_bias=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_two_scan_equals_full_form(name):
    cfg = lion.Config(d_model=16, num_heads=2, **CASES[name])
    params = make_params(cfg)
    x = rand_x((2, 8, 16), seed=3)
    seg = jnp.asarray(SEG)
    two = _jit_apply(cfg)(params, x, seg)
    full = _jit_apply(cfg.replace(form="full"))(params, x, seg)
    assert_rel_close(two, full, REC, name=name)
    assert_rel_close(two, np_lion(params, x, cfg, SEG), REC, name=f"{name}[dense ref]")


def test_segment_ids_packed_equals_separate():
    cfg = lion.Config(d_model=16, num_heads=2, decay="selective")
    params = make_params(cfg)
    a, b = rand_x((1, 3, 16), seed=4), rand_x((1, 5, 16), seed=5)
    y = _jit_apply(cfg)(params, jnp.concatenate([a, b], 1), jnp.asarray(SEG[:1]))
    assert_rel_close(y[:, :3], _jit_apply(cfg)(params, a), REC, name="first")
    assert_rel_close(y[:, 3:], _jit_apply(cfg)(params, b), REC, name="second")


def test_fixed_decay_init_is_retnet_schedule(key):
    cfg = lion.Config(d_model=16, num_heads=4, decay="fixed")
    params = lion.init(key, cfg)
    lam = jax.nn.sigmoid(params["decay"]["logit"])
    np.testing.assert_allclose(np.asarray(lam), 1 - 2.0 ** -(5 + np.arange(4)), rtol=1e-6)
    log_lam = lion.log_decay(params, jnp.ones((1, 2, 16)), cfg)
    assert log_lam.shape == (1, 2, 4) and float(jnp.max(log_lam)) < 0


def test_decay_mask_is_symmetric_products():
    rng = np.random.default_rng(6)
    lam = rng.uniform(0.3, 1.0, (1, 6, 1))
    m = np.asarray(lion.decay_mask(jnp.asarray(np.log(lam), jnp.float32), None, 1, 6, 1))[0, 0]
    want = np.array(
        [[np.prod(lam[0, min(i, j) + 1 : max(i, j) + 1, 0]) for j in range(6)] for i in range(6)]
    )
    np.testing.assert_allclose(m, want, rtol=1e-5)
    np.testing.assert_allclose(m, m.T, rtol=1e-6)
    np.testing.assert_allclose(np.diag(m), 1.0)


def test_registered_non_causal():
    fns = core.layer_fns("lion")
    assert fns.step is None and fns.init_state is None and not fns.example.decode
    assert fns.kind == "mixer"


def test_bf16_full_form_close_to_f32():
    # The two-scan form in bf16 is covered by the shared suite (the registered example).
    form = "full"
    cfg = lion.Config(d_model=16, num_heads=2, decay="fixed", form=form)
    params = make_params(cfg)
    x = rand_x((2, 8, 16), seed=8)
    y = _jit_apply(cfg)(params, x)
    y16 = _jit_apply(cfg.replace(dtype=jnp.bfloat16))(params, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert_rel_close(y16, y, 2 * tolerances.forward(jnp.bfloat16), name=f"bf16 {form}")


# --------------------------------------------------------------------------------------------
# Errors: one test per message
# --------------------------------------------------------------------------------------------

CFG = lion.Config(d_model=16, num_heads=2)


@functools.cache
def _params():
    return lion.init(jax.random.key(0), CFG)


def test_error_no_decode_state():
    x = jnp.ones((1, 4, 16))
    with pytest.raises(ValueError, match="lion is non-causal and has no decode state"):
        lion.apply(_params(), x, CFG, return_state=True)
    with pytest.raises(ValueError, match="lion is non-causal and has no decode state"):
        lion.apply(_params(), x, CFG, initial_state={"kv": jnp.zeros(1)})


def test_error_decay():
    with pytest.raises(ValueError, match=r"decay must be one of \(None, 'fixed', 'selective'\)"):
        lion.Config(d_model=16, num_heads=2, decay="retnet")


def test_error_form():
    with pytest.raises(ValueError, match=r"form must be one of \('two_scan', 'full'\); got 'rnn'"):
        lion.Config(d_model=16, num_heads=2, form="rnn")


def test_error_normalize_signed_map():
    with pytest.raises(ValueError, match="normalize=True needs a non-negative feature map"):
        lion.Config(d_model=16, num_heads=2, feature_map="identity")


def test_error_x_rank():
    with pytest.raises(ValueError, match=r"x must have rank 3 \(\[batch, time, d_model\]\)"):
        lion.apply(_params(), jnp.ones((4, 16)), CFG)


def test_error_segment_ids_shape():
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[batch, time\] = \(1, 4\)"):
        lion.apply(_params(), jnp.ones((1, 4, 16)), CFG, segment_ids=jnp.ones((4,), jnp.int32))

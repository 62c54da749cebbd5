"""Causal linear attention: float64 token-loop reference, decode, segments, paths and errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.linear_attention import feature_maps as fmaps
from jaxlayers.linear_attention import linear_attn as la
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.jaxlayers.linear_attention.test_feature_maps import np_phi

REC = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_dense(p, x):
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def np_linear_attention(params, x, cfg: la.Config, segment_ids=None, initial_state=None):
    """The paper's recurrence, token by token in float64. Returns (y, final state)."""
    p = _np(params)
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    h, kd = cfg.num_heads, cfg.key_dim
    q, k, v = (np_dense(p[n], x).reshape(b, t, h, kd) for n in ("q", "k", "v"))
    fq = np_phi(cfg.feature_map, q, "q", p.get("feature_map"))
    fk = np_phi(cfg.feature_map, k, "k", p.get("feature_map"))
    f = fq.shape[-1]
    scale = cfg.op_scale
    o = np.zeros((b, t, h, kd))
    kv_final, z_final = np.zeros((b, h, f, kd)), np.zeros((b, h, f))
    for bi in range(b):
        s = np.zeros((h, f, kd)) if initial_state is None else _np(initial_state["kv"])[bi]
        z = np.zeros((h, f))
        if initial_state is not None and cfg.normalize:
            z = _np(initial_state["z"])[bi]
        for ti in range(t):
            if (
                segment_ids is not None
                and ti > 0
                and segment_ids[bi, ti] != segment_ids[bi, ti - 1]
            ):
                s, z = np.zeros_like(s), np.zeros_like(z)
            s = s + fk[bi, ti][:, :, None] * v[bi, ti][:, None, :]
            z = z + fk[bi, ti]
            num = scale * np.einsum("hf,hfv->hv", fq[bi, ti], s)
            if cfg.normalize:
                num = num / (scale * np.einsum("hf,hf->h", fq[bi, ti], z)[:, None] + cfg.eps)
            o[bi, ti] = num
        kv_final[bi], z_final[bi] = s, z
    if cfg.output_norm:
        o = o / np.sqrt(np.mean(o**2, axis=-1, keepdims=True) + cfg.eps) * p["out_norm"]["scale"]
    y = np_dense(p["o"], o.reshape(b, t, h * kd))
    state = {"kv": kv_final}
    if cfg.normalize:
        state["z"] = z_final
    return y, state


def make_params(cfg, seed=0):
    """Layer init, with the identity-initialised / unit params randomised (non-vacuous test)."""
    params = la.init(jax.random.key(seed), cfg)
    rng = np.random.default_rng(seed + 100)
    if "feature_map" in params:
        params["feature_map"] = jax.tree.map(
            lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), jnp.float32),
            params["feature_map"],
        )
    if "out_norm" in params:
        params["out_norm"]["scale"] = jnp.asarray(1 + 0.3 * rng.standard_normal(cfg.key_dim))
    if cfg.use_bias:
        for n in ("q", "k", "v", "o"):
            params[n]["bias"] = jnp.asarray(0.1 * rng.standard_normal(params[n]["bias"].shape))
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def rand_x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.cache
def _jit_apply(cfg):
    def fn(p, x, seg=None, s0=None):
        return la.apply(p, x, cfg, segment_ids=seg, initial_state=s0, return_state=True)

    return jax.jit(fn)


def run(params, x, cfg, segment_ids=None, initial_state=None):
    return _jit_apply(cfg)(params, x, segment_ids, initial_state)


CASES = {
    "elu": dict(feature_map="elu"),
    "hedgehog": dict(feature_map="hedgehog", output_norm=True),
    "focused": dict(feature_map="focused"),
    "norm_aware": dict(feature_map="norm_aware", use_bias=True),
    "elu_unnormalized_outnorm": dict(feature_map="elu", normalize=False, output_norm=True),
    "identity_unnormalized": dict(feature_map="identity", normalize=False, head_dim=6),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_token_loop(name):
    cfg = la.Config(d_model=16, num_heads=2, **CASES[name])
    params = make_params(cfg)
    x = rand_x((2, 9, 16))
    y, state = run(params, x, cfg)
    y_ref, state_ref = np_linear_attention(params, x, cfg)
    assert_rel_close(y, y_ref, REC, name=name)
    assert_rel_close(state, state_ref, REC, name=f"{name}[state]")


@pytest.mark.parametrize("name", ["elu_unnormalized_outnorm", "norm_aware"])
def test_step_and_prefill_match_apply(name):
    cfg = la.Config(d_model=16, num_heads=2, **CASES[name])
    params = make_params(cfg)
    x = rand_x((2, 7, 16))
    y, _ = run(params, x, cfg)

    @jax.jit
    def decode(p, state, xs):
        def body(s, x_t):
            y_t, s = la.step(p, s, x_t, cfg)
            return s, y_t

        s, ys = jax.lax.scan(body, state, jnp.moveaxis(xs, 1, 0))
        return jnp.moveaxis(ys, 0, 1), s

    ys, s_steps = decode(params, la.init_state(cfg, 2), x)
    assert_rel_close(ys, y, REC, name=f"{name}[steps]")
    y0, s0 = run(params, x[:, :3], cfg)
    y1, s1 = decode(params, s0, x[:, 3:])
    assert_rel_close(jnp.concatenate([y0, y1], axis=1), y, REC, name=f"{name}[prefill+steps]")
    # apply continuing from a state == the tail of one apply.
    y_tail, s_tail = run(params, x[:, 3:], cfg, initial_state=s0)
    assert_rel_close(y_tail, y[:, 3:], REC, name=f"{name}[prefill+apply]")
    assert_rel_close(s_tail, s_steps, REC, name=f"{name}[final state]")


def test_segment_ids_packed_equals_separate():
    cfg = la.Config(d_model=16, num_heads=2, feature_map="elu", output_norm=True)
    params = make_params(cfg)
    a, b2 = rand_x((1, 4, 16), seed=2), rand_x((1, 6, 16), seed=3)
    packed = jnp.concatenate([a, b2], axis=1)
    seg = jnp.asarray([[7] * 4 + [3] * 6], jnp.int32)
    s0 = jax.tree.map(lambda z: z + 0.3, la.init_state(cfg, 1))  # reaches the first sequence only
    y, state = run(params, packed, cfg, segment_ids=seg, initial_state=s0)
    ya, _ = run(params, a, cfg, initial_state=s0)
    yb, state_b = run(params, b2, cfg)
    assert_rel_close(y[:, :4], ya, REC, name="first sequence")
    assert_rel_close(y[:, 4:], yb, REC, name="second sequence")
    assert_rel_close(state, state_b, REC, name="final state = last sequence's")
    y_ref, _ = np_linear_attention(params, packed, cfg, np.asarray(seg), s0)
    assert_rel_close(y, y_ref, REC, name="vs token loop")


def test_reference_and_chunked_paths_agree():
    # T = 37 is not a multiple of the chunk (16).
    cfg = la.Config(d_model=16, num_heads=2, feature_map="relu", chunk_size=16)
    params = make_params(cfg)
    x = rand_x((2, 37, 16))
    seg = jnp.asarray(np.repeat(np.arange(4), [9, 12, 1, 15])[None].repeat(2, 0), jnp.int32)
    y, state = run(params, x, cfg, segment_ids=seg)
    y_ref, s_ref = run(params, x, cfg.replace(implementation="reference"), segment_ids=seg)
    assert_rel_close(y, y_ref, REC, name="xla vs reference")
    assert_rel_close(state, s_ref, REC, name="xla vs reference [state]")
    y_np, _ = np_linear_attention(params, x, cfg, np.asarray(seg))
    assert_rel_close(y, y_np, REC, name="vs token loop")


def test_pallas_interpret_matches_xla():
    cfg = la.Config(d_model=32, num_heads=2, feature_map="elu", chunk_size=16)
    params = make_params(cfg)
    x = rand_x((1, 20, 32))
    y, state = run(params, x, cfg)
    y_p, state_p = run(params, x, cfg.replace(implementation="pallas", interpret=True))
    assert_rel_close(y_p, y, REC, name="pallas(interpret) vs xla")
    assert_rel_close(state_p, state, REC, name="pallas(interpret) vs xla [state]")


def test_bf16_close_to_f32():
    cfg = la.Config(d_model=16, num_heads=2, feature_map="norm_aware", output_norm=True)
    params = make_params(cfg)
    x = rand_x((2, 9, 16))
    y, _ = run(params, x, cfg)
    y16, state16 = run(params, x.astype(jnp.bfloat16), cfg.replace(dtype=jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert state16["kv"].dtype == jnp.float32
    assert_rel_close(y16, y, 2 * tolerances.forward(jnp.bfloat16), name="bf16")


def test_init_state_and_params_layout():
    cfg = la.Config(d_model=16, num_heads=2, feature_map="hedgehog", output_norm=True)
    state = la.init_state(cfg, 3, jnp.bfloat16)
    assert state["kv"].shape == (3, 2, 16, 8) and state["kv"].dtype == jnp.float32
    assert state["z"].shape == (3, 2, 16)
    assert "z" not in la.init_state(cfg.replace(normalize=False), 3)
    specs = la.param_specs(cfg)
    assert set(specs) == {"q", "k", "v", "o", "feature_map", "out_norm"}
    assert specs["o"]["kernel"].axes == ("heads", "embed")
    assert la.Config(d_model=16, num_heads=2, normalize=False).op_scale == pytest.approx(8**-0.5)


def test_linear_scan_matches_loop():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 11, 3, 4))
    decay = rng.uniform(0.5, 1.0, (2, 11, 3))
    resets = rng.uniform(size=(2, 11)) < 0.3
    resets[:, 0] = False
    init = rng.standard_normal((2, 3, 4))
    got = jax.jit(lambda *a: la.linear_scan(a[0], decay=a[1], resets=a[2], initial=a[3]))(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(decay, jnp.float32),
        jnp.asarray(resets),
        jnp.asarray(init, jnp.float32),
    )
    want = np.zeros_like(x)
    for bi in range(2):
        y = init[bi]
        for ti in range(11):
            a = 0.0 if resets[bi, ti] else decay[bi, ti][:, None]
            y = a * y + x[bi, ti]
            want[bi, ti] = y
    assert_rel_close(got, want, REC)


# --------------------------------------------------------------------------------------------
# Errors: one test per message
# --------------------------------------------------------------------------------------------

CFG = la.Config(d_model=16, num_heads=2)


@functools.cache
def _params():
    return la.init(jax.random.key(0), CFG)


def test_error_num_heads():
    with pytest.raises(ValueError, match="num_heads must be positive; got num_heads=0"):
        la.Config(d_model=16, num_heads=0)


def test_error_d_model():
    with pytest.raises(ValueError, match="d_model must be positive; got d_model=0"):
        la.Config(d_model=0, num_heads=2)


def test_error_divisible():
    with pytest.raises(ValueError, match="d_model=30 must be divisible by num_heads=4"):
        la.Config(d_model=30, num_heads=4)


def test_error_head_dim():
    with pytest.raises(ValueError, match="head_dim must be positive or None; got head_dim=-1"):
        la.Config(d_model=16, num_heads=2, head_dim=-1)


def test_error_normalize_signed_map():
    with pytest.raises(ValueError, match="normalize=True needs a non-negative feature map"):
        la.Config(d_model=16, num_heads=2, feature_map="identity")


def test_error_implementation():
    with pytest.raises(ValueError, match=r"implementation must be one of .*got 'cuda'"):
        la.Config(d_model=16, num_heads=2, implementation="cuda")


def test_error_chunk_size():
    with pytest.raises(ValueError, match=r"chunk_size must be a power of two >= 16"):
        la.Config(d_model=16, num_heads=2, chunk_size=24)


def test_error_eps():
    with pytest.raises(ValueError, match=r"eps must be > 0; got eps=0"):
        la.Config(d_model=16, num_heads=2, eps=0)


def test_error_feature_map_kind():
    with pytest.raises(ValueError, match="feature_map kind must be one of"):
        la.Config(d_model=16, num_heads=2, feature_map="cosformer")


def test_error_x_rank():
    with pytest.raises(ValueError, match=r"x must have rank 3 \(\[batch, time, d_model\]\)"):
        la.apply(_params(), jnp.ones((4, 16)), CFG)


def test_error_x_width():
    with pytest.raises(ValueError, match=r"x.shape\[-1\] \(d_model\) must be 16; got 8"):
        la.apply(_params(), jnp.ones((1, 4, 8)), CFG)


def test_error_x_dtype():
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        la.apply(_params(), jnp.ones((1, 4, 16), jnp.int32), CFG)


def test_error_segment_ids_dtype():
    with pytest.raises(TypeError, match="segment_ids must have an integer dtype"):
        la.apply(_params(), jnp.ones((1, 4, 16)), CFG, segment_ids=jnp.ones((1, 4)))


def test_error_segment_ids_shape():
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[batch, time\] = \(1, 4\)"):
        la.apply(_params(), jnp.ones((1, 4, 16)), CFG, segment_ids=jnp.ones((1, 5), jnp.int32))


def test_error_state_keys():
    with pytest.raises(ValueError, match=r"initial_state must be a dict with keys \['kv', 'z'\]"):
        la.apply(_params(), jnp.ones((1, 4, 16)), CFG, initial_state={"kv": jnp.zeros(3)})


def test_error_state_shape():
    bad = {"kv": jnp.zeros((1, 2, 8, 8)), "z": jnp.zeros((1, 2, 4))}
    with pytest.raises(ValueError, match=r"initial_state\['z'\] must have shape \(1, 2, 8\)"):
        la.apply(_params(), jnp.ones((1, 4, 16)), CFG, initial_state=bad)


def test_error_step_rank():
    with pytest.raises(ValueError, match=r"x_t must have rank 2 \(\[batch, d_model\]\)"):
        la.step(_params(), la.init_state(CFG, 1), jnp.ones((1, 1, 16)), CFG)


def test_error_step_state_shape():
    with pytest.raises(ValueError, match=r"state\['kv'\] must have shape \(2, 2, 8, 8\)"):
        la.step(_params(), la.init_state(CFG, 1), jnp.ones((2, 16)), CFG)


def test_registered():
    fns = core.layer_fns("linear_attention")
    assert fns.config is la.Config and fns.kind == "mixer" and fns.step is la.step
    assert isinstance(fns.example.config.feature_map, fmaps.FeatureMap)

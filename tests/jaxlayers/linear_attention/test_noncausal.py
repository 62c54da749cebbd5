"""SLAB / LiT non-causal linear attention vs a float64 dense reference with a looped DWC."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.linear_attention import noncausal as nc
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.jaxlayers.linear_attention.test_feature_maps import np_phi
from tests.jaxlayers.linear_attention.test_linear_attn import _np, np_dense, rand_x

REC = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]


def np_dwc(v, kernel, bias, grid, runs):
    """Depthwise conv, head-shared kernel, zero "same" padding, by explicit loops."""
    b, n, h, kd = v.shape
    out = np.zeros_like(v)
    if grid is None:
        taps = kernel.shape[0]
        half = taps // 2
        for bi in range(b):
            for i in range(n):
                for j in range(taps):
                    src = i + j - half
                    if 0 <= src < n and runs[bi, src] == runs[bi, i]:
                        out[bi, i] += kernel[j] * v[bi, src]
    else:
        gh, gw = grid
        half = kernel.shape[0] // 2
        img = v.reshape(b, gh, gw, h, kd)
        res = out.reshape(b, gh, gw, h, kd)
        for r in range(gh):
            for c in range(gw):
                for di in range(kernel.shape[0]):
                    for dj in range(kernel.shape[1]):
                        rr, cc = r + di - half, c + dj - half
                        if 0 <= rr < gh and 0 <= cc < gw:
                            res[:, r, c] += kernel[di, dj] * img[:, rr, cc]
        out = res.reshape(b, n, h, kd)
    return out + bias


def np_noncausal(params, x, cfg, segment_ids=None):
    p = _np(params)
    x = np.asarray(x, np.float64)
    b, n, _ = x.shape
    h, kd = cfg.num_heads, cfg.key_dim
    q, k, v = (np_dense(p[name], x).reshape(b, n, h, kd) for name in ("q", "k", "v"))
    fq = np_phi(cfg.feature_map, q, "q", p.get("feature_map"))
    fk = np_phi(cfg.feature_map, k, "k", p.get("feature_map"))
    runs = np.zeros((b, n), int)
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        runs[:, 1:] = np.cumsum(seg[:, 1:] != seg[:, :-1], axis=1)
    o = np.zeros((b, n, h, kd))
    for bi in range(b):
        same = runs[bi][:, None] == runs[bi][None, :]
        for hi in range(h):
            a = (fq[bi, :, hi] @ fk[bi, :, hi].T) * same
            o[bi, :, hi] = a @ v[bi, :, hi] / (a.sum(-1, keepdims=True) + cfg.eps)
    o = o + np_dwc(v, p["dwc"]["kernel"], p["dwc"]["bias"], cfg.grid, runs)
    return np_dense(p["o"], o.reshape(b, n, h * kd))


def make_params(cfg, seed=0):
    params = nc.init(jax.random.key(seed), cfg)
    rng = np.random.default_rng(seed + 11)
    params["dwc"]["bias"] = jnp.asarray(0.2 * rng.standard_normal(cfg.key_dim), jnp.float32)
    if "feature_map" in params:
        params["feature_map"] = jax.tree.map(
            lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), jnp.float32),
            params["feature_map"],
        )
    return params


@functools.cache
def _jit_apply(cfg):
    return jax.jit(lambda p, x, seg=None: nc.apply(p, x, cfg, segment_ids=seg))


CASES = {
    "slab_grid4x4_conv3": nc.SLABConfig(d_model=16, num_heads=2, conv_size=3, grid=(4, 4)),
    "slab_grid2x3_conv5": nc.SLABConfig(d_model=16, num_heads=4, grid=(2, 3)),
    "lit_1d_conv5": nc.LiTConfig(d_model=16),
    "flatten_focused_1d": nc.SLABConfig(d_model=16, num_heads=2, feature_map="focused"),
    "lit_hedgehog_grid": nc.LiTConfig(d_model=16, feature_map="hedgehog", grid=(3, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_reference(name):
    cfg = CASES[name]
    n = 11 if cfg.grid is None else cfg.grid[0] * cfg.grid[1]
    params = make_params(cfg)
    x = rand_x((2, n, 16))
    y = _jit_apply(cfg)(params, x)
    assert_rel_close(y, np_noncausal(params, x, cfg), REC, name=name)


def test_segment_ids_packed_equals_separate():
    cfg = CASES["lit_1d_conv5"]
    params = make_params(cfg)
    a, b = rand_x((1, 4, 16), seed=2), rand_x((1, 7, 16), seed=3)
    seg = np.asarray([[1] * 4 + [0] * 7], np.int32)
    y = _jit_apply(cfg)(params, jnp.concatenate([a, b], 1), jnp.asarray(seg))
    assert_rel_close(y[:, :4], _jit_apply(cfg)(params, a), REC, name="first")
    assert_rel_close(y[:, 4:], _jit_apply(cfg)(params, b), REC, name="second")
    want = np_noncausal(params, jnp.concatenate([a, b], 1), cfg, seg)
    assert_rel_close(y, want, REC, name="dense ref")


def test_single_segment_scan_path_equals_global_path():
    # One segment id everywhere: the two-scan path must give the einsum path's numbers.
    cfg = CASES["flatten_focused_1d"]
    params = make_params(cfg)
    x = rand_x((2, 11, 16), seed=4)
    y_scan = _jit_apply(cfg)(params, x, jnp.full((2, 11), 3, jnp.int32))
    assert_rel_close(y_scan, _jit_apply(cfg)(params, x), REC)


def test_lit_defaults_and_params_layout():
    cfg = nc.LiTConfig(d_model=64, grid=(8, 8))
    assert cfg.num_heads == 2 and cfg.key_dim == 32 and cfg.conv_size == 5
    specs = nc.param_specs(cfg)
    assert specs["dwc"]["kernel"].shape == (5, 5, 32)
    assert nc.param_specs(nc.SLABConfig(d_model=16, num_heads=2))["dwc"]["kernel"].shape == (5, 8)
    assert core.layer_fns("slab_attention").step is None
    assert core.layer_fns(cfg).name == "lit_attention"


# --------------------------------------------------------------------------------------------
# Errors: one test per message
# --------------------------------------------------------------------------------------------

CFG = nc.SLABConfig(d_model=16, num_heads=2, grid=(2, 2))


@functools.cache
def _params():
    return nc.init(jax.random.key(0), CFG)


def test_error_no_decode_state():
    with pytest.raises(ValueError, match="slab_attention is non-causal and has no decode state"):
        nc.apply(_params(), jnp.ones((1, 4, 16)), CFG, return_state=True)


def test_error_tokens_vs_grid():
    with pytest.raises(
        ValueError, match=r"x.shape\[1\] \(tokens\) must be grid height \* width = 4"
    ):
        nc.apply(_params(), jnp.ones((1, 5, 16)), CFG)


def test_error_segments_with_grid():
    seg = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids need a 1-D token order; expected grid=None"):
        nc.apply(_params(), jnp.ones((1, 4, 16)), CFG, segment_ids=seg)


def test_error_conv_size():
    with pytest.raises(ValueError, match="conv_size must be a positive odd int; got 4"):
        nc.SLABConfig(d_model=16, num_heads=2, conv_size=4)


def test_error_grid():
    with pytest.raises(ValueError, match=r"grid must be None or \(height, width\) > 0"):
        nc.LiTConfig(d_model=16, grid=(4, 0))


def test_error_signed_feature_map():
    with pytest.raises(ValueError, match="needs a non-negative feature map; got feature_map="):
        nc.SLABConfig(d_model=16, num_heads=2, feature_map="identity")


def test_error_x_rank():
    with pytest.raises(ValueError, match=r"x must have rank 3 \(\[batch, tokens, d_model\]\)"):
        nc.apply(_params(), jnp.ones((4, 16)), CFG)

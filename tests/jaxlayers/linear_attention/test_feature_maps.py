"""Feature maps of linear attention vs float64 numpy formulas, their properties and errors.

``np_phi`` (the float64 reference of every map) is also used by the mixer tests of this package.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import core
from jaxlayers.linear_attention import feature_maps as fmaps
from tests import tolerances
from tests._asserts import assert_rel_close

F32 = tolerances.forward(jnp.float32)


# --------------------------------------------------------------------------------------------
# float64 references (written from the papers' formulas)
# --------------------------------------------------------------------------------------------


def _np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_phi(fm: fmaps.FeatureMap, x, role: str = "q", params=None) -> np.ndarray:
    """float64 ``phi(x)`` for ``x [..., h, k]``; ``params`` as the layer stores them."""
    x = np.asarray(x, np.float64)
    kind = fm.kind
    if kind == "elu":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    if kind == "relu":
        return np.maximum(x, 0.0)
    if kind == "identity":
        return x
    if kind == "focused":
        r = np.maximum(x, 0.0) + fm.eps
        rp = r**fm.power
        return (
            np.linalg.norm(r, axis=-1, keepdims=True)
            / np.linalg.norm(rp, axis=-1, keepdims=True)
            * rp
        )
    if kind == "norm_aware":
        if role == "k":
            return np.concatenate(
                [np.maximum(x, 0) ** fm.power, np.maximum(-x, 0) ** fm.power], axis=-1
            )
        n = np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + fm.eps**2)
        u = x / n
        p = fm.norm_power_scale * (fm.norm_power_shift + np.tanh(n))
        return np.concatenate([np.maximum(u, 0) ** p, np.maximum(-u, 0) ** p], axis=-1)
    assert kind == "hedgehog"
    w = np.asarray(params[role]["kernel"], np.float64)
    b = np.asarray(params[role]["bias"], np.float64)
    z = np.einsum("...hk,hkf->...hf", x, w) + b
    return _np_softmax(np.concatenate([z, -z], axis=-1))


def random_fm_params(fm: fmaps.FeatureMap, h: int, k: int, rng) -> dict:
    """Random (non-identity) params for a map, float32 jnp arrays."""
    specs = fmaps.param_specs(fm, h, k)
    return jax.tree.map(
        lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), jnp.float32),
        specs,
        is_leaf=lambda s: isinstance(s, core.ParamSpec),
    )


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------

CASES = {
    "elu": fmaps.FeatureMap(kind="elu"),
    "relu": fmaps.FeatureMap(kind="relu"),
    "identity": fmaps.FeatureMap(kind="identity"),
    "hedgehog": fmaps.FeatureMap(kind="hedgehog"),
    "hedgehog_f12": fmaps.FeatureMap(kind="hedgehog", feature_dim=12),
    "focused_p3": fmaps.FeatureMap(kind="focused"),
    "focused_p2.5": fmaps.FeatureMap(kind="focused", power=2.5),
    "norm_aware": fmaps.FeatureMap(kind="norm_aware"),
    "norm_aware_p2": fmaps.FeatureMap(kind="norm_aware", power=2.0, norm_power_scale=2.0),
}


@pytest.mark.parametrize("role", ["q", "k"])
@pytest.mark.parametrize("name", list(CASES))
def test_map_matches_formula(name, role):
    fm = CASES[name]
    rng = np.random.default_rng(0)
    h, k = 3, 8
    x = rng.standard_normal((2, 5, h, k)).astype(np.float32)
    params = random_fm_params(fm, h, k, rng)
    out = fmaps.apply(fm, params, jnp.asarray(x), role)
    assert out.dtype == jnp.float32
    assert out.shape == (2, 5, h, fmaps.output_dim(fm, k))
    assert_rel_close(out, np_phi(fm, x, role, params), F32, name=name)
    if fm.nonnegative:
        assert float(jnp.min(out)) >= 0.0


def test_bf16_input_returns_float32():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 2, 8)), jnp.bfloat16)
    out = fmaps.apply(fmaps.FeatureMap(kind="elu"), None, x)
    assert out.dtype == jnp.float32
    assert_rel_close(out, np_phi(fmaps.FeatureMap(), np.asarray(x, np.float32)), F32)


def test_hedgehog_init_is_sign_split_softmax(key):
    fm = fmaps.FeatureMap(kind="hedgehog")
    params = jax.tree.map(
        lambda s: s.init(key, s.shape, jnp.float32),
        fmaps.param_specs(fm, 2, 4),
        is_leaf=lambda s: isinstance(s, core.ParamSpec),
    )
    x = np.random.default_rng(2).standard_normal((3, 2, 4))
    out = fmaps.apply(fm, params, jnp.asarray(x, jnp.float32), "k")
    want = _np_softmax(np.concatenate([x, -x], axis=-1))
    assert_rel_close(out, want, F32)
    np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, rtol=1e-6)


def test_focused_keeps_the_norm_and_sharpens():
    fm = fmaps.FeatureMap(kind="focused", power=3.0)
    x = np.random.default_rng(3).standard_normal((6, 2, 8))
    out = np.asarray(fmaps.apply(fm, None, jnp.asarray(x, jnp.float32)), np.float64)
    r = np.maximum(x, 0) + fm.eps
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(r, axis=-1), rtol=1e-5)
    # The largest entry gets a larger share of the norm.
    share = out.max(-1) / np.linalg.norm(out, axis=-1)
    share_r = r.max(-1) / np.linalg.norm(r, axis=-1)
    assert np.all(share >= share_r - 1e-6)
    # power 1 is relu(x) + eps.
    one = fmaps.apply(
        fmaps.FeatureMap(kind="focused", power=1.0), None, jnp.asarray(x, jnp.float32)
    )
    assert_rel_close(one, r, F32)


def _entropy_of_weights(phi_q, phi_k):
    w = phi_q @ phi_k.T
    w = w / w.sum(-1, keepdims=True)
    return -(w * np.log(w + 1e-30)).sum(-1)


def test_norm_aware_larger_query_norm_gives_spikier_weights():
    fm = fmaps.FeatureMap(kind="norm_aware")
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 8))
    k = rng.standard_normal((64, 1, 8))
    fk = np.asarray(fmaps.apply(fm, None, jnp.asarray(k, jnp.float32), "k"))[:, 0]
    ent = []
    for c in (0.05, 0.5, 5.0):
        fq = np.asarray(fmaps.apply(fm, None, jnp.asarray(c * q, jnp.float32), "q"))
        ent.append(float(_entropy_of_weights(fq, fk)[0]))
    assert ent[0] > ent[1] > ent[2], ent


@pytest.mark.parametrize("kind", ["focused", "norm_aware", "elu", "hedgehog"])
def test_gradients_finite_at_zero(kind, key):
    fm = fmaps.FeatureMap(kind=kind)
    params = jax.tree.map(
        lambda s: s.init(key, s.shape, jnp.float32),
        fmaps.param_specs(fm, 1, 4),
        is_leaf=lambda s: isinstance(s, core.ParamSpec),
    )
    x = jnp.zeros((2, 1, 4), jnp.float32).at[1, 0, 0].set(0.7)
    for role in ("q", "k"):
        g = jax.grad(lambda xx, r=role: jnp.sum(fmaps.apply(fm, params, xx, r) ** 2))(x)
        assert np.all(np.isfinite(np.asarray(g))), (kind, role)


def test_output_dim_and_param_specs():
    assert fmaps.output_dim(fmaps.FeatureMap(kind="elu"), 8) == 8
    assert fmaps.output_dim(fmaps.FeatureMap(kind="norm_aware"), 8) == 16
    assert fmaps.output_dim(fmaps.FeatureMap(kind="hedgehog"), 8) == 16
    assert fmaps.output_dim(fmaps.FeatureMap(kind="hedgehog", feature_dim=5), 8) == 10
    assert fmaps.param_specs(fmaps.FeatureMap(kind="relu"), 2, 8) == {}
    specs = fmaps.param_specs(fmaps.FeatureMap(kind="hedgehog", feature_dim=5), 2, 8)
    assert specs["q"]["kernel"].shape == (2, 8, 5)
    assert specs["k"]["bias"].shape == (2, 5)
    assert fmaps.as_feature_map("relu") == fmaps.FeatureMap(kind="relu")


# --------------------------------------------------------------------------------------------
# Errors: one test per message
# --------------------------------------------------------------------------------------------


def test_error_unknown_kind():
    with pytest.raises(ValueError, match=r"feature_map kind must be one of .*got 'softmax'"):
        fmaps.FeatureMap(kind="softmax")


def test_error_feature_dim():
    with pytest.raises(ValueError, match="feature_dim must be positive or None; got 0"):
        fmaps.FeatureMap(kind="hedgehog", feature_dim=0)


def test_error_power():
    with pytest.raises(ValueError, match=r"power must be >= 1; got power=0.5"):
        fmaps.FeatureMap(kind="focused", power=0.5)


def test_error_norm_power():
    with pytest.raises(ValueError, match="norm_power_scale must be > 0 and norm_power_shift >= 0"):
        fmaps.FeatureMap(kind="norm_aware", norm_power_scale=-1.0)


def test_error_eps():
    with pytest.raises(ValueError, match=r"eps must be > 0; got eps=0.0"):
        fmaps.FeatureMap(eps=0.0)


def test_error_as_feature_map_type():
    with pytest.raises(TypeError, match="feature_map must be a FeatureMap or one of"):
        fmaps.as_feature_map(3)


def test_error_role():
    with pytest.raises(ValueError, match=r"role must be one of \('q', 'k'\); got 'v'"):
        fmaps.apply(fmaps.FeatureMap(), None, jnp.ones((2, 4)), "v")


def test_error_rank():
    with pytest.raises(ValueError, match=r"x must have rank >= 2 \[..., heads, key_dim\]"):
        fmaps.apply(fmaps.FeatureMap(), None, jnp.ones((4,)))


def test_error_hedgehog_missing_params():
    with pytest.raises(ValueError, match=r"feature map 'hedgehog' needs params\['k'\]"):
        fmaps.apply(fmaps.FeatureMap(kind="hedgehog"), {"q": {}}, jnp.ones((2, 4)), "k")


def test_error_hedgehog_kernel_shape():
    params = {"q": {"kernel": jnp.ones((3, 4, 4)), "bias": jnp.zeros((3, 4))}}
    with pytest.raises(ValueError, match=r"hedgehog kernel must have shape \[heads, key_dim"):
        fmaps.apply(fmaps.FeatureMap(kind="hedgehog"), params, jnp.ones((5, 2, 4)), "q")

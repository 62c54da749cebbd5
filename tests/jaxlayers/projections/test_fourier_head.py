"""Fourier head: logits against the paper's formulas evaluated naively in complex numpy
(autocorrelation, Fourier series at bin centres, normalisation, log(P + eps)); the density is
nonnegative and integrates to 1; the regulariser; one test per error message."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers.projections import fourier_head as fh
from tests import tolerances
from tests._asserts import assert_rel_close


def _coeffs_complex(params, x, cfg):
    a = np.asarray(x, np.float64) @ np.asarray(params["kernel"], np.float64)
    a = a + np.asarray(params["bias"], np.float64)
    n1 = cfg.num_frequencies + 1
    a = a[..., :n1] + 1j * a[..., n1:]
    c = np.zeros(a.shape, np.complex128)
    for k in range(n1):
        for l in range(n1 - k):
            c[..., k] += a[..., l + k] * np.conj(a[..., l])
    return c


def _naive_logits(params, x, cfg):
    c = _coeffs_complex(params, x, cfg)
    m = cfg.num_bins
    z = np.array([-1 + (2 * j + 1) / m for j in range(m)])
    k = np.arange(1, cfg.num_frequencies + 1)
    series = (c[..., 1:, None] / c[..., :1, None].real) * np.exp(1j * np.pi * k[:, None] * z)
    p = 0.5 + np.real(series.sum(axis=-2))
    probs = p / p.sum(-1, keepdims=True)
    return np.log(probs + cfg.eps)


def _random(rng, cfg, lead=(2, 3)):
    w = 2 * (cfg.num_frequencies + 1)
    params = {
        "kernel": jnp.asarray(rng.standard_normal((cfg.d_in, w)) / 3, jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(w) / 3, jnp.float32),
    }
    return params, jnp.asarray(rng.standard_normal(lead + (cfg.d_in,)), jnp.float32)


@pytest.mark.parametrize("bins,freqs", [(16, 3), (7, 8)], ids=lambda v: str(v))
def test_matches_paper_formula(bins, freqs):
    cfg = fh.Config(d_in=5, num_bins=bins, num_frequencies=freqs)
    params, x = _random(np.random.default_rng(bins), cfg)
    out = fh.apply(params, x, cfg)
    assert out.shape == (2, 3, bins)
    assert_rel_close(out, _naive_logits(params, x, cfg), 2e-5)
    np.testing.assert_allclose(np.exp(np.asarray(out)).sum(-1), 1 + bins * cfg.eps, rtol=1e-5)


def test_coefficients_and_regularization():
    cfg = fh.Config(d_in=4, num_bins=8, num_frequencies=5)
    params, x = _random(np.random.default_rng(1), cfg)
    c = _coeffs_complex(params, x, cfg)
    c_re, c_im = fh.fourier_coefficients(params, x, cfg)
    assert_rel_close(c_re, c.real, tolerances.forward(jnp.float32))
    assert_rel_close(c_im, c.imag, tolerances.forward(jnp.float32))
    k = np.arange(-5, 6)
    two_sided = np.concatenate([np.conj(c[..., :0:-1]), c], axis=-1)  # c_{-k} = conj(c_k)
    want = np.mean(np.sum(2 * np.pi**2 * k**2 * np.abs(two_sided) ** 2, axis=-1))
    np.testing.assert_allclose(float(fh.regularization(params, x, cfg)), want, rtol=1e-5)


def test_density_is_a_probability_density():
    cfg = fh.Config(d_in=4, num_bins=8, num_frequencies=6)
    params, x = _random(np.random.default_rng(2), cfg, lead=(3,))
    z = jnp.linspace(-1.0, 1.0, 4001)
    p = np.asarray(fh.density(params, x, cfg, z), np.float64)
    assert p.min() >= 0
    np.testing.assert_allclose(np.trapezoid(p, np.asarray(z), axis=-1), 1.0, rtol=1e-4)
    # the logits are the density at the bin centres, renormalised
    centres = jnp.asarray(fh.bin_centers(8), jnp.float32)
    p_c = np.asarray(fh.density(params, x, cfg, centres), np.float64)
    want = np.log(p_c / p_c.sum(-1, keepdims=True) + cfg.eps)
    np.testing.assert_allclose(fh.apply(params, x, cfg), want, rtol=1e-5, atol=1e-5)


def test_init_is_small_and_trainable(key):
    cfg = fh.Config(d_in=16, num_bins=10, num_frequencies=4)
    params = fh.init(key, cfg)
    assert params["kernel"].shape == (16, 10) and params["bias"].shape == (10,)
    assert float(jnp.std(params["kernel"])) < 0.01
    x = jnp.ones((2, 16), jnp.float32)
    y = jnp.array([3, 7])
    g = jax.grad(lambda p: -jnp.sum(jnp.take_along_axis(fh.apply(p, x, cfg), y[:, None], 1)))(
        params
    )
    assert np.all(np.isfinite(np.asarray(g["kernel"]))) and float(jnp.abs(g["kernel"]).sum()) > 0


def _raises(exc, message):
    return pytest.raises(exc, match=re.escape(message))


@pytest.mark.parametrize("field", ["d_in", "num_bins", "num_frequencies"])
def test_sizes_positive(field):
    kwargs = dict(d_in=4, num_bins=4, num_frequencies=2) | {field: 0}
    with _raises(ValueError, f"{field} must be positive; got 0"):
        fh.Config(**kwargs)


def test_eps_positive():
    with _raises(ValueError, "eps must be positive; got 0.0"):
        fh.Config(d_in=4, num_bins=4, num_frequencies=2, eps=0.0)


def test_wrong_input_width():
    cfg = fh.Config(d_in=4, num_bins=4, num_frequencies=2)
    params = jax.eval_shape(lambda: fh.init(jax.random.key(0), cfg))
    with _raises(ValueError, "x.shape[-1] (d_in) must be 4; got 5 (shape (2, 5))"):
        jax.eval_shape(lambda p, x: fh.apply(p, x, cfg), params, jnp.zeros((2, 5)))

"""Fourier head: categorical logits over bins from a learned Fourier-series density.

From "Fourier Head: Helping Large Language Models Learn Complex Probability Distributions".
A linear map gives ``N + 1`` complex numbers per input; their autocorrelation gives the Fourier
coefficients of a density on ``[-1, 1]`` that is nonnegative by construction::

    a = x W + b                          a_l = Re + i Im (first / second half of 2(N+1) outputs)
    c_k = sum_{l=0}^{N-k} a_{l+k} conj(a_l)               k = 0..N   (c_{-k} = conj(c_k))
    p(z) = 1/2 + Re sum_{k=1}^{N} (c_k / c_0) exp(i pi k z)          z in [-1, 1]
    P_j  = p(z_j) / sum_j' p(z_j')       z_j = -1 + (2j + 1)/m       bin centres, j = 0..m-1
    logits_j = log(P_j + eps)

(``p >= 0`` and ``int p = 1`` because ``sum_{|k|<=N} c_k e^{i pi k z} = |A(z)|^2`` with
``A(z) = sum_l a_l e^{i pi l z}``.) ``apply`` uses that identity directly,
``p(z) = |A(z)|^2 / (2 c_0)``: two ``[..., N+1] x [N+1, m]`` matmuls against fixed cos/sin
tables instead of an ``O(N^2)`` autocorrelation, and real arithmetic only (no complex dtypes, so
bf16 compute works). The bin probabilities are computed in float32.

Regularisation (:func:`regularization`): the paper's Fourier penalty on high frequencies,
``R = mean over inputs of sum_{k=-N}^{N} 2 pi^2 k^2 |c_k|^2`` with the *unnormalised*
autocorrelation ``c_k``; add ``gamma * R`` to the loss. Constants follow the authors' released
implementation (it sums ``k = 0..N`` and doubles, which equals the two-sided sum).

Choices: ``eps = 1e-5`` (the authors' "inverse softmax" constant); the linear map's kernel is
the Dense fan-in init scaled by ``init_scale = 0.01`` and its bias normal with std
``init_scale / sqrt(d_in)`` (the authors divide PyTorch's default init by 100; the density only
depends on ``a`` up to scale, so this sets the size of ``c`` in the penalty and of the first
updates, not the initial distribution). Params: ``"kernel" [i, 2(N+1)]`` axes
``("embed", None)``, ``"bias" [2(N+1)]``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlayers import core

__all__ = [
    "Config",
    "param_specs",
    "init",
    "apply",
    "fourier_coefficients",
    "regularization",
    "density",
    "bin_centers",
]

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """Fourier head ``[..., d_in] -> [..., num_bins]`` logits.

    Attributes:
      d_in: input features ``i``.
      num_bins: output bins ``m`` (uniform over ``[-1, 1]``).
      num_frequencies: ``N``.
      eps: added to the bin probabilities before the log.
      init_scale: multiplies the fan-in init of the kernel and bias of the linear map.
    """

    d_in: int
    num_bins: int
    num_frequencies: int
    eps: float = 1e-5
    init_scale: float = 0.01

    def __post_init__(self):
        for name in ("d_in", "num_bins", "num_frequencies"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive; got {self.eps}")


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    width = 2 * (cfg.num_frequencies + 1)
    scale = cfg.init_scale**2  # variance scale
    return {
        "kernel": core.ParamSpec(
            (cfg.d_in, width), core.initializers.fan_in(scale), ("embed", None)
        ),
        "bias": core.ParamSpec(
            (width,), core.initializers.normal(cfg.init_scale / np.sqrt(cfg.d_in)), (None,)
        ),
    }


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def bin_centers(num_bins: int) -> np.ndarray:
    """``z_j = -1 + (2j + 1) / m`` (float64 numpy)."""
    return -1.0 + (2.0 * np.arange(num_bins) + 1.0) / num_bins


@functools.lru_cache(maxsize=64)
def _tables(num_frequencies: int, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    angle = np.pi * np.outer(np.arange(num_frequencies + 1), bin_centers(num_bins))
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def _check_x(x: jax.Array, cfg: Config) -> None:
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_in={cfg.d_in}]); got shape ()")
    core.check_dim(x, -1, cfg.d_in, "x", "d_in")


def _autocorr_params(params: core.Params, x: jax.Array, cfg: Config):
    """Real and imaginary parts of ``a`` ``[..., N+1]`` each, float32."""
    dtype = core.compute_dtype(cfg, x)
    p = core.cast_floating(params, dtype)
    a = jnp.einsum("...i,iw->...w", x.astype(dtype), p["kernel"], precision=_HI)
    a = (a + p["bias"].reshape((1,) * (a.ndim - 1) + (-1,))).astype(jnp.float32)
    n1 = cfg.num_frequencies + 1
    return a[..., :n1], a[..., n1:]


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """Logits ``log(P_j + eps)``; ``x: [..., d_in] -> [..., num_bins]`` (compute dtype)."""
    _check_x(x, cfg)
    dtype = core.compute_dtype(cfg, x)
    re, im = _autocorr_params(params, x, cfg)
    cos, sin = _tables(cfg.num_frequencies, cfg.num_bins)
    # A(z) = sum_l a_l e^{i pi l z}:  Re A = re cos - im sin,  Im A = re sin + im cos.
    a_re = jnp.einsum("...l,lm->...m", re, cos, precision=_HI) - jnp.einsum(
        "...l,lm->...m", im, sin, precision=_HI
    )
    a_im = jnp.einsum("...l,lm->...m", re, sin, precision=_HI) + jnp.einsum(
        "...l,lm->...m", im, cos, precision=_HI
    )
    power = jnp.square(a_re) + jnp.square(a_im)  # 2 c_0 p(z_j)
    probs = power / jnp.sum(power, axis=-1, keepdims=True)
    return jnp.log(probs + cfg.eps).astype(dtype)


def fourier_coefficients(params: core.Params, x: jax.Array, cfg: Config):
    """The unnormalised autocorrelation ``c_k``, ``k = 0..N``, as ``(real, imag)`` float32
    arrays ``[..., N+1]`` each."""
    _check_x(x, cfg)
    re, im = _autocorr_params(params, x, cfg)
    n1 = cfg.num_frequencies + 1
    # c_k = sum_l a_{l+k} conj(a_l): sum over the k-th sub-diagonal of the outer product.
    shift = np.zeros((n1, n1, n1), np.float32)  # [k, l+k, l]
    for k in range(n1):
        shift[k, np.arange(k, n1), np.arange(n1 - k)] = 1.0
    rr = jnp.einsum("...u,...v->...uv", re, re, precision=_HI)
    ii = jnp.einsum("...u,...v->...uv", im, im, precision=_HI)
    ir = jnp.einsum("...u,...v->...uv", im, re, precision=_HI)
    ri = jnp.einsum("...u,...v->...uv", re, im, precision=_HI)
    c_re = jnp.einsum("kuv,...uv->...k", shift, rr + ii, precision=_HI)
    c_im = jnp.einsum("kuv,...uv->...k", shift, ir - ri, precision=_HI)
    return c_re, c_im


def regularization(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``mean_x sum_{k=-N}^{N} 2 pi^2 k^2 |c_k|^2`` (float32 scalar); multiply by ``gamma``."""
    c_re, c_im = fourier_coefficients(params, x, cfg)
    k = np.arange(cfg.num_frequencies + 1, dtype=np.float32)
    weight = jnp.asarray(2.0 * (2.0 * np.pi**2) * k**2, jnp.float32)  # both sides of k = 0
    weight = weight.reshape((1,) * (c_re.ndim - 1) + (-1,))
    per_input = jnp.sum(weight * (jnp.square(c_re) + jnp.square(c_im)), axis=-1)
    return jnp.mean(per_input)


def density(params: core.Params, x: jax.Array, cfg: Config, z: jax.Array) -> jax.Array:
    """The continuous density ``p(z)`` (float32) at points ``z [q]`` in ``[-1, 1]`` for every
    input: ``[..., d_in] -> [..., q]``."""
    re, im = _autocorr_params(params, x, cfg)
    angle = (
        jnp.pi
        * jnp.arange(cfg.num_frequencies + 1, dtype=jnp.float32)[:, None]
        * z.astype(jnp.float32).reshape(1, -1)
    )
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    a_re = jnp.einsum("...l,lq->...q", re, cos, precision=_HI) - jnp.einsum(
        "...l,lq->...q", im, sin, precision=_HI
    )
    a_im = jnp.einsum("...l,lq->...q", re, sin, precision=_HI) + jnp.einsum(
        "...l,lq->...q", im, cos, precision=_HI
    )
    c0 = jnp.sum(jnp.square(re) + jnp.square(im), axis=-1, keepdims=True)
    return (jnp.square(a_re) + jnp.square(a_im)) / (2.0 * c0)


core.register_layer(
    "fourier_head",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(
        config=Config(d_in=16, num_bins=12, num_frequencies=4, init_scale=1.0),
        input_shape=(2, 8, 16),
    ),
    kind="head",
)

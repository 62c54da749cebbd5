"""Tversky projection: similarities of the input to learned prototypes, Tversky's contrast model.

From "Tversky Neural Networks: Psychologically Plausible Deep Learning with Differentiable
Tversky Similarity". A vector ``a`` in R^i is also read as the *set* of features of a learned
feature bank ``Omega = {f_1 .. f_K}`` it has: ``A = {k : a . f_k > 0}``, with membership
strength ``a_k = a . f_k``. Measures of feature sets:

    salience      f(A)      = sum_k a_k 1[a_k > 0]
    intersection  f(A n B)  = sum_k Psi(a_k, b_k) 1[a_k > 0] 1[b_k > 0]
    difference    f(A - B)  = sum_k a_k 1[a_k > 0] 1[b_k <= 0]                   "ignorematch"
                            = sum_k (a_k - b_k) 1[a_k > 0] 1[b_k > 0] 1[a_k > b_k]  "substractmatch"

    S(a, b) = theta f(A n B) - alpha f(A - B) - beta f(B - A)

The projection layer compares ``x [..., i]`` with ``o`` learned prototypes ``pi_j [i]``::

    y_j = S(x, pi_j)        y: [..., o]

``Psi`` (``cfg.intersection``) is one of the paper's reductions: "product" ``a b``, "min",
"max", "mean" ``(a + b)/2``, "gmean" ``sqrt(a b)``, "softmin"
``-tau log(exp(-a/tau) + exp(-b/tau))`` (a smooth lower bound of min, ``tau`` =
``cfg.softmin_temperature``). The default pair is "product" + "ignorematch": the paper reports
product as the best intersection, and with these two every term is a matmul
(``relu(a) relu(b)^T``, ``relu(a) 1[b<=0]^T``, ``1[a<=0] relu(b)^T``), so the layer costs three
``[..., K] x [K, o]`` matmuls. The other reductions broadcast a ``[..., o, K]`` tensor.

Choices the paper leaves open, fixed here:
- indicators are hard (``1[a_k > 0]``); gradients flow through the membership strengths, the
  indicators are piecewise constant (as in the paper's formulation);
- memberships and the three measures are computed in float32 whatever the compute dtype (the
  hard indicators make low-precision memberships flip terms in and out of the sums); inputs and
  params are cast to the compute dtype first, the output is cast back to it;
- ``theta``, ``alpha``, ``beta`` are learned scalars, initialised to 1, 0.5, 0.5;
- features and prototypes start uniform in ``[-sqrt(3/i), sqrt(3/i)]`` (the paper finds uniform
  init converges most often on XOR); memberships of a unit-variance input then have unit
  variance;
- "gmean" uses ``sqrt`` of the product only where both memberships are positive (safe gradient).

Params: ``"features" [K, i]`` axes ``(None, "embed")``, ``"prototypes" [o, i]`` axes
``("mlp", "embed")``, scalars ``"theta"``, ``"alpha"``, ``"beta"``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxlayers import core

__all__ = [
    "Config",
    "param_specs",
    "init",
    "apply",
    "memberships",
    "salience",
    "INTERSECTIONS",
    "DIFFERENCES",
]

INTERSECTIONS = ("product", "min", "max", "mean", "gmean", "softmin")
DIFFERENCES = ("ignorematch", "substractmatch")
_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """Tversky projection ``[..., d_in] -> [..., d_out]`` (``d_out`` prototypes).

    Attributes:
      d_in: input features ``i``.
      d_out: prototypes ``o`` (the output width).
      num_features: size ``K`` of the feature bank ``Omega``.
      intersection: ``Psi``, one of :data:`INTERSECTIONS`.
      difference: one of :data:`DIFFERENCES`.
      softmin_temperature: ``tau`` of the "softmin" intersection.
    """

    d_in: int
    d_out: int
    num_features: int
    intersection: str = "product"
    difference: str = "ignorematch"
    softmin_temperature: float = 1.0

    def __post_init__(self):
        for name in ("d_in", "d_out", "num_features"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        core.check_choice(self.intersection, INTERSECTIONS, "intersection")
        core.check_choice(self.difference, DIFFERENCES, "difference")
        if self.softmin_temperature <= 0:
            raise ValueError(
                f"softmin_temperature must be positive; got {self.softmin_temperature}"
            )


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    s = math.sqrt(3.0 / cfg.d_in)
    uniform = core.initializers.uniform_range(-s, s)
    return {
        "features": core.ParamSpec((cfg.num_features, cfg.d_in), uniform, (None, "embed")),
        "prototypes": core.ParamSpec((cfg.d_out, cfg.d_in), uniform, ("mlp", "embed")),
        "theta": core.ParamSpec((), core.initializers.constant(1.0), ()),
        "alpha": core.ParamSpec((), core.initializers.constant(0.5), ()),
        "beta": core.ParamSpec((), core.initializers.constant(0.5), ()),
    }


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def memberships(x: jax.Array, features: jax.Array) -> jax.Array:
    """Membership strengths ``x . f_k``: ``[..., i] x [K, i] -> [..., K]``, float32."""
    return jnp.einsum(
        "...i,ki->...k", x, features, precision=_HI, preferred_element_type=jnp.float32
    )


def salience(x: jax.Array, features: jax.Array) -> jax.Array:
    """``f(A) = sum_k relu(x . f_k)``: ``[..., i] -> [...]``."""
    return jnp.sum(jax.nn.relu(memberships(x, features)), axis=-1)


def _psi(a: jax.Array, b: jax.Array, cfg: Config) -> jax.Array:
    """The intersection reduction on broadcast memberships (both positive where it is used)."""
    kind = cfg.intersection
    if kind == "min":
        return jnp.minimum(a, b)
    if kind == "max":
        return jnp.maximum(a, b)
    if kind == "mean":
        return (a + b) / 2
    if kind == "gmean":
        both = (a > 0) & (b > 0)
        return jnp.sqrt(jnp.where(both, a * b, jnp.ones_like(a)))
    tau = jnp.asarray(cfg.softmin_temperature, a.dtype)  # "softmin"
    return -tau * jnp.logaddexp(-a / tau, -b / tau)


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``y_j = S(x, pi_j)``; ``x: [..., d_in] -> [..., d_out]``."""
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_in={cfg.d_in}]); got shape ()")
    core.check_dim(x, -1, cfg.d_in, "x", "d_in")
    dtype = core.compute_dtype(cfg, x)
    p = core.cast_floating(params, dtype)
    a = memberships(x.astype(dtype), p["features"])  # [..., K]
    b = memberships(p["prototypes"], p["features"])  # [o, K]
    zero = jnp.zeros((), jnp.float32)
    a_pos, b_pos = jax.nn.relu(a), jax.nn.relu(b)
    a_in, b_in = (a > 0).astype(jnp.float32), (b > 0).astype(jnp.float32)

    def mm(u, v):  # [..., K] x [o, K] -> [..., o]
        return jnp.einsum("...k,ok->...o", u, v, precision=_HI)

    # Broadcast views for the elementwise reductions: [..., 1, K] against [1.., o, K].
    ab, bb = a[..., None, :], b.reshape((1,) * (a.ndim - 1) + b.shape)
    if cfg.intersection == "product":
        common = mm(a_pos, b_pos)
    else:
        both = (ab > 0) & (bb > 0)
        common = jnp.sum(jnp.where(both, _psi(ab, bb, cfg), zero), axis=-1)
    if cfg.difference == "ignorematch":
        x_only = mm(a_pos, 1 - b_in)
        p_only = mm(1 - a_in, b_pos)
    else:
        both = (ab > 0) & (bb > 0)
        x_only = jnp.sum(jnp.where(both, jax.nn.relu(ab - bb), zero), axis=-1)
        p_only = jnp.sum(jnp.where(both, jax.nn.relu(bb - ab), zero), axis=-1)
    theta, alpha, beta = (p[n].astype(jnp.float32) for n in ("theta", "alpha", "beta"))
    return (theta * common - alpha * x_only - beta * p_only).astype(dtype)


core.register_layer(
    "tversky",
    Config,
    param_specs=param_specs,
    apply=apply,
    # Hard membership indicators: bf16 rounding flips memberships that sit near 0, and each
    # flip moves a whole term of a sum, so bf16 is compared loosely (seen: up to ~8%).
    example=core.Example(
        config=Config(d_in=16, d_out=8, num_features=16), input_shape=(2, 4, 16), rtol_bf16=0.15
    ),
    kind="projection",
)

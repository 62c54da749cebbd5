"""Activations: pointwise functions looked up by name, and small layers with learnable params.

Pointwise functions (:func:`get` / :data:`NAMES`; every one computes in the input's dtype):

    gelu       x Phi(x)                                   exact, with the Gaussian CDF (erf)
    gelu_tanh  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    silu       x sigmoid(x)                               (= swish with beta = 1)
    swish      x sigmoid(beta x)                          beta a float or an array (learnable)
    relu       max(x, 0)
    relu2      max(x, 0)^2                                squared ReLU ("Primer")
    identity   x                                          (bilinear GLU)
    golu       x exp(-exp(-x))                            GoLU, Gompertz gate
    atlu       x (arctan(x)/pi + 1/2)                     ArcTan linear unit (xATLU at alpha=0)
    helu       max(x, 0) forward; d/dx = [x > -alpha]     HeLU, alpha = 0.05

Layers with params (``Config`` / ``param_specs`` / ``apply``, registered with the core
registry, ``kind="activation"``; ``x: [..., dim] -> [..., dim]``):

    swish                  x sigmoid(beta x), learnable ``beta`` (scalar or per channel)
    prelu                  max(x, 0) + a min(x, 0), learnable slope ``a`` (init 0.25)
    expanded_gating        x ((1 + 2 alpha) g(x) - alpha), g in {arctan, Phi, sigmoid}
    velu                   VeLU (see :func:`velu`), learnable scale ``lambda``
    poly_relu / poly_norm  PolyCom: sum_i a_i relu(x)^i + a_0 / sum_i a_i rms(x^i) + a_0
    stochastic_activation  train: per element, alt(x) with prob. p else base(x); eval: base(x)

Papers: "Gaussian Error Linear Units (GELUs)"; "Searching for Activation Functions" (Swish);
"Primer: Searching for Efficient Transformers for Language Modeling" (squared ReLU); "Delving
Deep into Rectifiers: Surpassing Human-Level Performance on ImageNet Classification" (PReLU);
"Gompertz Linear Units: Leveraging Asymmetry for Enhanced Learning Dynamics" (GoLU);
"Expanded Gating Ranges Improve Activation Functions" (xATLU, xGELU, xSiLU); "VeLU:
Variance-enhanced Learning Unit for Deep Neural Networks"; "Polynomial Composition Activations:
Unleashing the Dynamics of Large Language Models" (PolyReLU, PolyNorm); "Stochastic activations";
"Hysteresis Activation Function for Efficient Inference" (HeLU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlayers import core

__all__ = [
    "NAMES",
    "get",
    "gelu",
    "gelu_tanh",
    "silu",
    "swish",
    "relu",
    "relu2",
    "identity",
    "golu",
    "atlu",
    "helu",
    "prelu",
    "expanded_gate",
    "velu",
    "velu_ot_penalty",
    "poly_relu",
    "poly_norm",
    "stochastic",
    "SwishConfig",
    "PReLUConfig",
    "ExpandedGatingConfig",
    "VeLUConfig",
    "PolyReLUConfig",
    "PolyNormConfig",
    "StochasticConfig",
]


# --------------------------------------------------------------------------------------------
# Pointwise functions
# --------------------------------------------------------------------------------------------


def gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def silu(x: jax.Array) -> jax.Array:
    return jax.nn.silu(x)


def swish(x: jax.Array, beta: float | jax.Array = 1.0) -> jax.Array:
    """``x * sigmoid(beta * x)``; ``beta`` broadcasts against ``x`` (cast to ``x.dtype``)."""
    beta = jnp.asarray(beta, x.dtype)
    return x * jax.nn.sigmoid(beta * x)


def relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def relu2(x: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x))


def identity(x: jax.Array) -> jax.Array:
    return x


@jax.custom_jvp
def golu(x: jax.Array) -> jax.Array:
    """GoLU: ``x * exp(-exp(-x))`` (the Gompertz function as the gate).

    The derivative ``g + x e^{-x} g`` with ``g = exp(-exp(-x))`` is evaluated as
    ``g + x exp(-x - exp(-x))``: plain autodiff would form ``inf * 0 = nan`` once ``exp(-x)``
    overflows (x < -88 in float32); this form gives the true limit 0.
    """
    return x * jnp.exp(-jnp.exp(-x))


@golu.defjvp
def _golu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    e = jnp.exp(-x)
    g = jnp.exp(-e)
    return x * g, (g + x * jnp.exp(-x - e)) * t


def atlu(x: jax.Array) -> jax.Array:
    """ArcTan linear unit ``x * (arctan(x) / pi + 1/2)``."""
    return x * _atan_gate(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def helu(x: jax.Array, alpha: float = 0.05) -> jax.Array:
    """HeLU: ReLU forward; the backward passes the gradient where ``x > -alpha``.

    The hysteresis shifts only the backward threshold, so inference is a plain ReLU while
    units slightly below zero still learn. ``alpha=0.05`` is our default (the paper treats it
    as a hyper-parameter); ``alpha=0`` is ReLU's usual subgradient (0 at x = 0).
    """
    return jax.nn.relu(x)


def _helu_fwd(x, alpha):
    return jax.nn.relu(x), x


def _helu_bwd(alpha, x, g):
    return (jnp.where(x > -alpha, g, jnp.zeros_like(g)),)


helu.defvjp(_helu_fwd, _helu_bwd)


_FNS: dict[str, Callable[..., jax.Array]] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "silu": silu,
    "swish": swish,
    "relu": relu,
    "relu2": relu2,
    "identity": identity,
    "golu": golu,
    "atlu": atlu,
    "helu": helu,
}

NAMES: tuple[str, ...] = tuple(_FNS)


def get(name: str) -> Callable[..., jax.Array]:
    """The activation called ``name`` (one of :data:`NAMES`)."""
    try:
        return _FNS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {NAMES}; got {name!r}") from None


# --------------------------------------------------------------------------------------------
# Parameterised functions (the math of the layers below; usable on their own)
# --------------------------------------------------------------------------------------------


def _atan_gate(x):
    return jnp.arctan(x) * jnp.asarray(1.0 / math.pi, x.dtype) + jnp.asarray(0.5, x.dtype)


def _gelu_gate(x):
    return jnp.asarray(0.5, x.dtype) * (1 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


GATES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "atan": _atan_gate,
    "gelu": _gelu_gate,
    "silu": jax.nn.sigmoid,
}


def prelu(x: jax.Array, slope: float | jax.Array) -> jax.Array:
    """``max(x, 0) + slope * min(x, 0)``; ``slope`` broadcasts against ``x``."""
    slope = jnp.asarray(slope, x.dtype)
    return jnp.where(x >= 0, x, slope * x)


def expanded_gate(x: jax.Array, alpha: float | jax.Array, gate: str = "atan") -> jax.Array:
    """Expanded gating range: ``x * ((1 + 2 alpha) g(x) - alpha)``, ``g(x)`` in ``[0, 1]``.

    The gate's range grows from ``[0, 1]`` to ``[-alpha, 1 + alpha]``; ``alpha = 0`` gives the
    plain self-gated unit (ATLU, GELU, SiLU for ``gate="atan" | "gelu" | "silu"``).
    """
    core.check_choice(gate, tuple(GATES), "gate")
    alpha = jnp.asarray(alpha, x.dtype)
    return x * ((1 + 2 * alpha) * GATES[gate](x) - alpha)


def velu(
    x: jax.Array,
    scale: float | jax.Array = 1.0,
    *,
    alpha: float = 1.0,
    beta1: float = 1.0,
    beta2: float = 0.5,
    gamma: float = 0.1,
    mu: float = 0.5,
    eps: float = 1e-3,
) -> jax.Array:
    """VeLU, from "VeLU: Variance-enhanced Learning Unit for Deep Neural Networks":

        f(x) = lambda * x * sigmoid(alpha (arctan(beta1 x) + arcsin(clip(beta2 x)))) * s(x)
        s(x) = clip(1 + gamma tanh(mu sqrt(var(x) + eps)), 0.5, 2)

    ``var(x)`` is the variance over the last (feature) axis of each token, so ``s`` adapts per
    token; ``lambda`` (``scale``) is the one learnable parameter. The paper's Wasserstein-2 term
    is a loss, not part of the output: see :func:`velu_ot_penalty`. Choices the paper leaves
    open, made here: the statistic axis (last axis); the hyper-parameter defaults above; the
    arcsin argument is clipped to ``|.| <= 1 - 1e-6`` so its derivative stays finite. Computed
    in float32, returned in ``x.dtype``.
    """
    x32 = x.astype(jnp.float32)
    lim = 1.0 - 1e-6
    inner = jnp.arctan(beta1 * x32) + jnp.arcsin(jnp.clip(beta2 * x32, -lim, lim))
    std = jnp.sqrt(jnp.var(x32, axis=-1, keepdims=True) + eps)
    s = jnp.clip(1.0 + gamma * jnp.tanh(mu * std), 0.5, 2.0)
    y = jnp.asarray(scale, jnp.float32) * x32 * jax.nn.sigmoid(alpha * inner) * s
    return y.astype(x.dtype)


def velu_ot_penalty(y: jax.Array) -> jax.Array:
    """Squared Wasserstein-2 distance between a Gaussian fitted to ``y`` and N(0, 1).

    For two 1-D Gaussians ``W2^2 = (m1 - m2)^2 + (s1 - s2)^2``, here ``mean(y)^2 +
    (std(y) - 1)^2`` over all elements (float32 scalar). Add ``lambda_OT * penalty`` to the loss
    (the paper's OT regulariser; its exact estimator is not specified, this closed form is ours).
    """
    y32 = y.astype(jnp.float32)
    return jnp.square(jnp.mean(y32)) + jnp.square(jnp.std(y32) - 1.0)


def poly_relu(x: jax.Array, weight: jax.Array, bias: float | jax.Array = 0.0) -> jax.Array:
    """PolyReLU: ``sum_{i=1..r} weight[i-1] * relu(x)^i + bias``; ``weight: [r]``."""
    r = jax.nn.relu(x)
    y = jnp.zeros_like(x) + jnp.asarray(bias, x.dtype)
    power = r
    for i in range(weight.shape[0]):
        y = y + weight[i].astype(x.dtype) * power
        power = power * r
    return y


def poly_norm(
    x: jax.Array, weight: jax.Array, bias: float | jax.Array = 0.0, eps: float = 1e-6
) -> jax.Array:
    """PolyNorm: ``sum_{i=1..r} weight[i-1] * rms(x^i) + bias`` with
    ``rms(z) = z / sqrt(mean(z^2, last axis) + eps)`` (no scale); float32 inside."""
    x32 = x.astype(jnp.float32)
    y = jnp.zeros_like(x32) + jnp.asarray(bias, jnp.float32)
    power = x32
    for i in range(weight.shape[0]):
        normed = power * jax.lax.rsqrt(jnp.mean(jnp.square(power), -1, keepdims=True) + eps)
        y = y + weight[i].astype(jnp.float32) * normed
        power = power * x32
    return y.astype(x.dtype)


def stochastic(
    x: jax.Array,
    key: jax.Array | None,
    *,
    p: float = 0.5,
    base: str = "relu",
    alt: str = "silu",
    eval_activation: str | None = None,
    per_element: bool = True,
    train: bool = True,
) -> jax.Array:
    """Stochastic activation: in training each element (or, with ``per_element=False``, the
    whole call) uses ``alt`` with probability ``p`` and ``base`` otherwise, drawn from ``key``
    (a Bernoulli mask); at eval it is the deterministic ``eval_activation`` (default ``base``:
    the paper trains with a SiLU/ReLU mix and runs ReLU at inference for sparse hidden units).
    """
    if not train:
        return get(eval_activation or base)(x)
    if key is None:
        raise ValueError("key must be a PRNG key when train=True; got None")
    shape = x.shape if per_element else ()
    use_alt = jax.random.bernoulli(key, p, shape)
    return jnp.where(use_alt, get(alt)(x), get(base)(x))


# --------------------------------------------------------------------------------------------
# Registered layers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ChannelConfig(core.LayerConfig):
    """``dim=None``: one scalar param shared by every channel; else one per channel ``[dim]``."""

    dim: int | None = None

    def __post_init__(self):
        if self.dim is not None and self.dim <= 0:
            raise ValueError(f"dim must be positive or None (shared scalar); got dim={self.dim}")


def _channel_spec(cfg: _ChannelConfig, value: float) -> core.ParamSpec:
    init = core.initializers.constant(value)
    if cfg.dim is None:
        return core.ParamSpec((), init, ())
    return core.ParamSpec((cfg.dim,), init, ("embed",))


def _prepare(params, x, cfg, dim: int | None):
    """Check ``x``, cast it and the params to the compute dtype."""
    core.check_floating(x, "x")
    if dim is not None:
        if jnp.ndim(x) < 1:
            raise ValueError(f"x must have rank >= 1 ([..., dim={dim}]); got shape ()")
        core.check_dim(x, -1, dim, "x", "dim")
    dtype = core.compute_dtype(cfg, x)
    return core.cast_floating(params, dtype), x.astype(dtype)


def _per_channel(p: jax.Array, x: jax.Array) -> jax.Array:
    """A scalar as is; a ``[dim]`` param reshaped to broadcast over ``x``'s leading axes."""
    return p if p.ndim == 0 else p.reshape((1,) * (x.ndim - 1) + p.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SwishConfig(_ChannelConfig):
    """Swish with learnable ``beta`` (init ``beta_init``; 1.0 starts as SiLU)."""

    beta_init: float = 1.0


def swish_param_specs(cfg: SwishConfig) -> dict[str, core.ParamSpec]:
    return {"beta": _channel_spec(cfg, cfg.beta_init)}


def swish_apply(params: core.Params, x: jax.Array, cfg: SwishConfig) -> jax.Array:
    """``x * sigmoid(beta * x)``, ``x: [..., dim]``."""
    p, x = _prepare(params, x, cfg, cfg.dim)
    return swish(x, _per_channel(p["beta"], x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PReLUConfig(_ChannelConfig):
    """PReLU with learnable negative slope (init 0.25 as in the paper)."""

    slope_init: float = 0.25


def prelu_param_specs(cfg: PReLUConfig) -> dict[str, core.ParamSpec]:
    return {"slope": _channel_spec(cfg, cfg.slope_init)}


def prelu_apply(params: core.Params, x: jax.Array, cfg: PReLUConfig) -> jax.Array:
    p, x = _prepare(params, x, cfg, cfg.dim)
    return prelu(x, _per_channel(p["slope"], x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpandedGatingConfig(_ChannelConfig):
    """xATLU / xGELU / xSiLU (``gate="atan" | "gelu" | "silu"``).

    The paper learns one ``alpha`` per MLP block (``dim=None``, the default) initialised at 0,
    so training starts from the plain unit.
    """

    gate: str = "atan"
    alpha_init: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        core.check_choice(self.gate, tuple(GATES), "gate")


def expanded_gating_param_specs(cfg: ExpandedGatingConfig) -> dict[str, core.ParamSpec]:
    return {"alpha": _channel_spec(cfg, cfg.alpha_init)}


def expanded_gating_apply(
    params: core.Params, x: jax.Array, cfg: ExpandedGatingConfig
) -> jax.Array:
    p, x = _prepare(params, x, cfg, cfg.dim)
    return expanded_gate(x, _per_channel(p["alpha"], x), cfg.gate)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeLUConfig(core.LayerConfig):
    """VeLU hyper-parameters (see :func:`velu`); the learnable ``scale`` starts at 1."""

    alpha: float = 1.0
    beta1: float = 1.0
    beta2: float = 0.5
    gamma: float = 0.1
    mu: float = 0.5
    eps: float = 1e-3


def velu_param_specs(cfg: VeLUConfig) -> dict[str, core.ParamSpec]:
    return {"scale": core.ParamSpec((), core.initializers.ones, ())}


def velu_apply(params: core.Params, x: jax.Array, cfg: VeLUConfig) -> jax.Array:
    p, x = _prepare(params, x, cfg, None)
    if jnp.ndim(x) < 1:
        raise ValueError("x must have rank >= 1 ([..., features]); got shape ()")
    hyper = dict(alpha=cfg.alpha, beta1=cfg.beta1, beta2=cfg.beta2, gamma=cfg.gamma, mu=cfg.mu)
    return velu(x, p["scale"], eps=cfg.eps, **hyper)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolyReLUConfig(core.LayerConfig):
    """PolyReLU of ``order`` r: weights ``[r]`` start at ``1/r``, the bias at 0."""

    order: int = 3

    def __post_init__(self):
        if self.order < 1:
            raise ValueError(f"order must be >= 1; got order={self.order}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolyNormConfig(PolyReLUConfig):
    """PolyNorm of ``order`` r (weights ``[r]`` start at ``1/r``); ``eps`` of the RMS step."""

    eps: float = 1e-6


def poly_param_specs(cfg: PolyReLUConfig) -> dict[str, core.ParamSpec]:
    return {
        "weight": core.ParamSpec(
            (cfg.order,), core.initializers.constant(1.0 / cfg.order), (None,)
        ),
        "bias": core.ParamSpec((), core.initializers.zeros, ()),
    }


def poly_relu_apply(params: core.Params, x: jax.Array, cfg: PolyReLUConfig) -> jax.Array:
    p, x = _prepare(params, x, cfg, None)
    return poly_relu(x, p["weight"], p["bias"])


def poly_norm_apply(params: core.Params, x: jax.Array, cfg: PolyNormConfig) -> jax.Array:
    p, x = _prepare(params, x, cfg, None)
    if jnp.ndim(x) < 1:
        raise ValueError("x must have rank >= 1 ([..., features]); got shape ()")
    return poly_norm(x, p["weight"], p["bias"], cfg.eps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StochasticConfig(core.LayerConfig):
    """Stochastic activation (see :func:`stochastic`); no params."""

    p: float = 0.5
    base: str = "relu"
    alt: str = "silu"
    eval_activation: str | None = None
    per_element: bool = True

    def __post_init__(self):
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1]; got p={self.p}")
        for name in (self.base, self.alt, self.eval_activation or self.base):
            get(name)


def stochastic_param_specs(cfg: StochasticConfig) -> dict[str, core.ParamSpec]:
    return {}


def stochastic_apply(
    params: core.Params,
    x: jax.Array,
    cfg: StochasticConfig,
    *,
    key: jax.Array | None = None,
    train: bool = False,
) -> jax.Array:
    """Eval (``train=False``, the default) is deterministic; training needs ``key``."""
    _, x = _prepare(params, x, cfg, None)
    return stochastic(
        x,
        key,
        p=cfg.p,
        base=cfg.base,
        alt=cfg.alt,
        eval_activation=cfg.eval_activation,
        per_element=cfg.per_element,
        train=train,
    )


def _example(cfg, **kwargs) -> core.Example:
    return core.Example(config=cfg, input_shape=(2, 8, 16), **kwargs)


for _name, _cfg_cls, _specs, _apply, _ex in [
    ("swish", SwishConfig, swish_param_specs, swish_apply, SwishConfig(dim=16, beta_init=1.2)),
    ("prelu", PReLUConfig, prelu_param_specs, prelu_apply, PReLUConfig(dim=16)),
    (
        "expanded_gating",
        ExpandedGatingConfig,
        expanded_gating_param_specs,
        expanded_gating_apply,
        ExpandedGatingConfig(gate="atan", alpha_init=0.1),
    ),
    ("velu", VeLUConfig, velu_param_specs, velu_apply, VeLUConfig()),
    ("poly_relu", PolyReLUConfig, poly_param_specs, poly_relu_apply, PolyReLUConfig()),
    ("poly_norm", PolyNormConfig, poly_param_specs, poly_norm_apply, PolyNormConfig()),
    (
        "stochastic_activation",
        StochasticConfig,
        stochastic_param_specs,
        stochastic_apply,
        StochasticConfig(),
    ),
]:
    core.register_layer(
        _name,
        _cfg_cls,
        param_specs=_specs,
        apply=_apply,
        example=_example(_ex),
        kind="activation",
    )

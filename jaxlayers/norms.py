"""RMSNorm and LayerNorm over the last axis.

    rms_norm:   y = x / sqrt(mean(x^2) + eps) * scale
    layer_norm: y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias

``x: [..., dim] -> [..., dim]``. Papers: "Root Mean Square Layer Normalization"; "Layer
Normalization". Statistics, the normalisation and the affine part are computed in float32 and
the result is rounded once to the compute dtype (``cfg.dtype``, else the input's dtype). The
variance is the biased two-pass estimate ``mean((x - mean(x))^2)``, which stays accurate for
inputs with a large mean. ``eps`` sits inside the square root. Params: ``"scale"`` (ones) and
``"bias"`` (zeros), both ``[dim]`` with logical axis ``("embed",)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlayers import core

__all__ = [
    "RMSNormConfig",
    "LayerNormConfig",
    "rms_norm",
    "layer_norm",
    "rms_norm_param_specs",
    "layer_norm_param_specs",
    "param_specs",
    "init",
    "apply",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMSNormConfig(core.LayerConfig):
    dim: int
    eps: float = 1e-6
    use_scale: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerNormConfig(core.LayerConfig):
    dim: int
    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True


def rms_norm_param_specs(cfg: RMSNormConfig) -> dict[str, core.ParamSpec]:
    if not cfg.use_scale:
        return {}
    return {"scale": core.ParamSpec((cfg.dim,), core.initializers.ones, ("embed",))}


def layer_norm_param_specs(cfg: LayerNormConfig) -> dict[str, core.ParamSpec]:
    specs = {}
    if cfg.use_scale:
        specs["scale"] = core.ParamSpec((cfg.dim,), core.initializers.ones, ("embed",))
    if cfg.use_bias:
        specs["bias"] = core.ParamSpec((cfg.dim,), core.initializers.zeros, ("embed",))
    return specs


def _check(x, cfg) -> jnp.dtype:
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., dim={cfg.dim}]); got shape ()")
    core.check_dim(x, -1, cfg.dim, "x", "dim")
    return core.compute_dtype(cfg, x)


def _param_f32(params, name, dtype, ndim):
    # Cast to the compute dtype first (the policy), then widen for the float32 arithmetic.
    p = params[name].astype(dtype).astype(jnp.float32)
    return p.reshape((1,) * (ndim - 1) + p.shape)


def rms_norm(params: core.Params, x: jax.Array, cfg: RMSNormConfig) -> jax.Array:
    """RMSNorm of ``x: [..., dim]``."""
    dtype = _check(x, cfg)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.eps)
    if cfg.use_scale:
        y = y * _param_f32(params, "scale", dtype, y.ndim)
    return y.astype(dtype)


def layer_norm(params: core.Params, x: jax.Array, cfg: LayerNormConfig) -> jax.Array:
    """LayerNorm of ``x: [..., dim]``."""
    dtype = _check(x, cfg)
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + cfg.eps)
    if cfg.use_scale:
        y = y * _param_f32(params, "scale", dtype, y.ndim)
    if cfg.use_bias:
        y = y + _param_f32(params, "bias", dtype, y.ndim)
    return y.astype(dtype)


def param_specs(cfg: RMSNormConfig | LayerNormConfig) -> dict[str, core.ParamSpec]:
    if isinstance(cfg, RMSNormConfig):
        return rms_norm_param_specs(cfg)
    return layer_norm_param_specs(cfg)


def init(key: jax.Array, cfg: RMSNormConfig | LayerNormConfig) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def apply(params: core.Params, x: jax.Array, cfg: RMSNormConfig | LayerNormConfig) -> jax.Array:
    if isinstance(cfg, RMSNormConfig):
        return rms_norm(params, x, cfg)
    return layer_norm(params, x, cfg)


core.register_layer(
    "rms_norm",
    RMSNormConfig,
    param_specs=rms_norm_param_specs,
    apply=rms_norm,
    example=core.Example(config=RMSNormConfig(dim=16), input_shape=(2, 8, 16)),
    kind="norm",
)
core.register_layer(
    "layer_norm",
    LayerNormConfig,
    param_specs=layer_norm_param_specs,
    apply=layer_norm,
    example=core.Example(config=LayerNormConfig(dim=16), input_shape=(2, 8, 16)),
    kind="norm",
)

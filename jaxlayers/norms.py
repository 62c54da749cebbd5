"""RMSNorm and LayerNorm over the last axis; BatchNorm over every other axis.

    rms_norm:   y = x / sqrt(mean(x^2) + eps) * scale
    layer_norm: y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias
    batch_norm: y = (x - mu_c) / sqrt(var_c + eps) * scale + bias      (per channel c)

``x: [..., dim] -> [..., dim]``. Papers: "Root Mean Square Layer Normalization"; "Layer
Normalization"; "Batch Normalization: Accelerating Deep Network Training by Reducing Internal
Covariate Shift". Statistics, the normalisation and the affine part are computed in float32 and
the result is rounded once to the compute dtype (``cfg.dtype``, else the input's dtype). The
variance is the biased two-pass estimate ``mean((x - mean(x))^2)``, which stays accurate for
inputs with a large mean. ``eps`` sits inside the square root. Params: ``"scale"`` (ones) and
``"bias"`` (zeros), both ``[dim]`` with logical axis ``("embed",)``.

BatchNorm threads non-trainable running statistics ``stats = {"mean": [dim], "var": [dim]}``
(float32, from :func:`init_batch_stats`) through a pure state and is registered with
``stateful=True``. In training (``train=True``) ``mu_c, var_c`` are the biased moments over
*every* axis but the last (for ``[b, t, c]`` sequences: over batch and time together, so a
token's output depends on the other tokens of the batch, as in any BatchNorm), and the running
statistics move by ``stats <- (1 - momentum) stats + momentum * batch``, the variance entering
with Bessel's correction ``n / (n - 1)`` (PyTorch's convention, the one the SLAB paper's code
runs). ``apply`` then returns ``(y, new_stats)``. At eval it uses the running statistics and is
the affine map ``y = x * a + c`` of :func:`batch_norm_affine`, which can be folded into an
adjacent Dense.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlayers import core

__all__ = [
    "RMSNormConfig",
    "LayerNormConfig",
    "BatchNormConfig",
    "rms_norm",
    "layer_norm",
    "batch_norm",
    "rms_norm_param_specs",
    "layer_norm_param_specs",
    "batch_norm_param_specs",
    "init_batch_stats",
    "batch_moments",
    "update_batch_stats",
    "batch_norm_affine",
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchNormConfig(core.LayerConfig):
    """BatchNorm over every axis but the last; ``momentum`` weights the newest batch."""

    dim: int
    eps: float = 1e-5
    momentum: float = 0.1
    use_scale: bool = True
    use_bias: bool = True

    def __post_init__(self):
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1]; got momentum={self.momentum}")


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


def batch_norm_param_specs(cfg: BatchNormConfig) -> dict[str, core.ParamSpec]:
    return layer_norm_param_specs(cfg)  # same "scale" / "bias" [dim]


def init_batch_stats(cfg: BatchNormConfig) -> dict[str, jax.Array]:
    """Fresh running statistics: mean 0, variance 1 (float32 ``[dim]``)."""
    return {
        "mean": jnp.zeros((cfg.dim,), jnp.float32),
        "var": jnp.ones((cfg.dim,), jnp.float32),
    }


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 per-channel mean and biased variance of ``x: [..., c]`` over all leading axes."""
    x32 = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    mean = jnp.mean(x32, axis=0)
    var = jnp.mean(jnp.square(x32 - mean[None, :]), axis=0)
    return mean, var


def update_batch_stats(
    stats: dict[str, jax.Array], mean: jax.Array, var: jax.Array, count: int, momentum: float
) -> dict[str, jax.Array]:
    """Exponential moving average; ``var`` (biased, over ``count`` rows) gets ``n / (n - 1)``."""
    unbiased = var * (count / max(count - 1, 1))
    new = dict(stats)
    new["mean"] = (1.0 - momentum) * stats["mean"] + momentum * mean
    new["var"] = (1.0 - momentum) * stats["var"] + momentum * unbiased
    return new


def batch_norm_affine(
    params: core.Params, stats: dict[str, jax.Array], cfg: BatchNormConfig
) -> tuple[jax.Array, jax.Array]:
    """Eval-time BatchNorm as ``y = x * a + c``: float32 ``a, c: [dim]``."""
    inv = jax.lax.rsqrt(stats["var"].astype(jnp.float32) + cfg.eps)
    scale = params["scale"].astype(jnp.float32) if cfg.use_scale else 1.0
    a = inv * scale
    c = -stats["mean"].astype(jnp.float32) * a
    if cfg.use_bias:
        c = c + params["bias"].astype(jnp.float32)
    return a, c


def _batch_check(x, cfg, stats, train):
    dtype = _check(x, cfg)
    if stats is None and not train:
        raise ValueError(
            "stats must be the running statistics ({'mean', 'var'} from init_batch_stats) when "
            "train=False; got None"
        )
    return dtype


def batch_norm(
    params: core.Params,
    x: jax.Array,
    cfg: BatchNormConfig,
    *,
    stats: dict[str, jax.Array] | None = None,
    train: bool = False,
):
    """BatchNorm of ``x: [..., dim]``: ``y`` at eval, ``(y, new_stats)`` with ``train=True``.

    ``stats=None`` in training starts from :func:`init_batch_stats`.
    """
    dtype = _batch_check(x, cfg, stats, train)
    if not train:
        shape = (1,) * (x.ndim - 1) + (cfg.dim,)
        p = core.cast_floating(params, dtype)  # the compute-dtype policy, as in the norms above
        a, c = batch_norm_affine(p, stats, cfg)
        return (x.astype(jnp.float32) * a.reshape(shape) + c.reshape(shape)).astype(dtype)
    stats = init_batch_stats(cfg) if stats is None else stats
    mean, var = batch_moments(x)
    shape = (1,) * (x.ndim - 1) + (cfg.dim,)
    y = (x.astype(jnp.float32) - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + cfg.eps)
    if cfg.use_scale:
        y = y * _param_f32(params, "scale", dtype, y.ndim)
    if cfg.use_bias:
        y = y + _param_f32(params, "bias", dtype, y.ndim)
    count = x.size // cfg.dim
    new_stats = update_batch_stats(stats, mean, var, count, cfg.momentum)
    return y.astype(dtype), new_stats


NormConfig = RMSNormConfig | LayerNormConfig | BatchNormConfig


def param_specs(cfg: NormConfig) -> dict[str, core.ParamSpec]:
    if isinstance(cfg, RMSNormConfig):
        return rms_norm_param_specs(cfg)
    return layer_norm_param_specs(cfg)


def init(key: jax.Array, cfg: NormConfig) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def apply(params: core.Params, x: jax.Array, cfg: NormConfig, **kwargs):
    """Dispatch on the config; ``kwargs`` (``stats``, ``train``) only for BatchNorm."""
    if isinstance(cfg, RMSNormConfig):
        return rms_norm(params, x, cfg)
    if isinstance(cfg, BatchNormConfig):
        return batch_norm(params, x, cfg, **kwargs)
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
core.register_layer(
    "batch_norm",
    BatchNormConfig,
    param_specs=batch_norm_param_specs,
    apply=batch_norm,
    stateful=True,
    example=core.Example(
        config=BatchNormConfig(dim=16), input_shape=(2, 8, 16), apply_kwargs=(("train", True),)
    ),
    kind="norm",
)

"""EvoNorm-B0 and EvoNorm-S0: normalisation and activation fused into one layer.

From "Evolving Normalization-Activation Layers". For ``x: [b, *spatial, c]`` (images
``[b, h, w, c]``; sequences ``[b, t, c]``, where time plays the role of the spatial axes):

    B0:  y = x / max(sqrt(s2_batch(x) + eps), v * x + sqrt(s2_instance(x) + eps)) * gamma + beta
    S0:  y = x * sigmoid(v * x) / sqrt(s2_group(x) + eps) * gamma + beta

with per-channel params ``v`` (init 1), ``gamma`` ("scale", init 1) and ``beta`` ("bias", init 0),
all ``[c]``, and the variances (biased, float32):

    s2_batch     per channel, over the batch and every spatial/time position   (B0, training)
    s2_instance  per sample and channel, over the spatial/time positions        (B0)
    s2_group     per sample and group of c/groups channels, over the spatial/time positions
                 and the group's channels                                        (S0)

Sequence data ``[b, t, c]``: every statistic above that runs over "spatial" axes runs over the
whole time axis, so a token's output depends on later tokens — fine for encoders and vision, not
for causal decoders. ``EvoNormS0Config(causal=True)`` takes the group variance per token over the
group's channels only (a per-token GroupNorm denominator), which keeps S0 causal. B0 has no
causal form: its instance variance over a single token would be zero.

B0 is a batch-dependent layer: in training it uses the batch variance and updates a running
variance ``stats = {"var": [c]}`` (``var <- (1 - momentum) var + momentum * n/(n-1) s2_batch``);
at eval the running variance replaces ``s2_batch``. It is registered with ``stateful=True``;
``apply(..., train=True)`` returns ``(y, new_stats)``. S0 is stateless.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlayers import core

__all__ = [
    "EvoNormB0Config",
    "EvoNormS0Config",
    "param_specs",
    "init",
    "init_stats",
    "b0_apply",
    "s0_apply",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvoNormB0Config(core.LayerConfig):
    """EvoNorm-B0 over channels ``dim``; ``momentum`` weights the newest batch variance."""

    dim: int
    eps: float = 1e-5
    momentum: float = 0.1

    def __post_init__(self):
        if self.dim <= 0:
            raise ValueError(f"dim must be positive; got dim={self.dim}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvoNormS0Config(core.LayerConfig):
    """EvoNorm-S0 over channels ``dim`` split into ``groups`` (32 in the paper)."""

    dim: int
    groups: int = 32
    eps: float = 1e-5
    causal: bool = False

    def __post_init__(self):
        if self.dim <= 0:
            raise ValueError(f"dim must be positive; got dim={self.dim}")
        core.check_divisible(self.dim, self.groups, "dim", "groups")


def param_specs(cfg: EvoNormB0Config | EvoNormS0Config) -> dict[str, core.ParamSpec]:
    one = core.initializers.ones
    return {
        "scale": core.ParamSpec((cfg.dim,), one, ("embed",)),
        "bias": core.ParamSpec((cfg.dim,), core.initializers.zeros, ("embed",)),
        "v": core.ParamSpec((cfg.dim,), one, ("embed",)),
    }


def init(key: jax.Array, cfg: EvoNormB0Config | EvoNormS0Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def init_stats(cfg: EvoNormB0Config) -> dict[str, jax.Array]:
    """B0's running batch variance, starting at 1."""
    return {"var": jnp.ones((cfg.dim,), jnp.float32)}


def _check(x, cfg, min_rank: int, layout: str):
    core.check_floating(x, "x")
    if jnp.ndim(x) < min_rank:
        raise ValueError(f"x must have rank >= {min_rank} ({layout}); got shape {jnp.shape(x)}")
    core.check_dim(x, -1, cfg.dim, "x", "dim")
    return core.compute_dtype(cfg, x)


def _params32(params, dtype, ndim):
    """Params cast to the compute dtype (the policy), widened to float32, broadcastable."""
    shape = (1,) * (ndim - 1) + (-1,)
    return {k: v.astype(dtype).astype(jnp.float32).reshape(shape) for k, v in params.items()}


def b0_apply(
    params: core.Params,
    x: jax.Array,
    cfg: EvoNormB0Config,
    *,
    stats: dict[str, jax.Array] | None = None,
    train: bool = False,
):
    """EvoNorm-B0 of ``x: [b, *spatial, c]``: ``y`` at eval, ``(y, new_stats)`` in training."""
    dtype = _check(x, cfg, 3, f"[batch, *spatial or time, channels={cfg.dim}]")
    if stats is None and not train:
        raise ValueError(
            "stats must be the running variance ({'var'} from init_stats) when train=False; "
            "got None"
        )
    p = _params32(params, dtype, x.ndim)
    x32 = x.astype(jnp.float32)
    spatial = tuple(range(1, x.ndim - 1))
    inst_var = jnp.var(x32, axis=spatial, keepdims=True)
    if train:
        stats = init_stats(cfg) if stats is None else stats
        batch_var = jnp.var(x32, axis=(0, *spatial))
        n = x.size // cfg.dim
        running = (1.0 - cfg.momentum) * stats["var"] + cfg.momentum * batch_var * (
            n / max(n - 1, 1)
        )
        new_stats = dict(stats, var=running)
    else:
        batch_var = stats["var"].astype(jnp.float32)
    batch_std = jnp.sqrt(batch_var.reshape((1,) * (x.ndim - 1) + (-1,)) + cfg.eps)
    denom = jnp.maximum(batch_std, p["v"] * x32 + jnp.sqrt(inst_var + cfg.eps))
    y = (x32 / denom * p["scale"] + p["bias"]).astype(dtype)
    return (y, new_stats) if train else y


def s0_apply(params: core.Params, x: jax.Array, cfg: EvoNormS0Config) -> jax.Array:
    """EvoNorm-S0 of ``x: [b, *spatial, c]`` (``[..., c]`` with ``causal=True``)."""
    layout = f"[batch, *spatial or time, channels={cfg.dim}]"
    dtype = _check(x, cfg, 2 if cfg.causal else 3, layout)
    p = _params32(params, dtype, x.ndim)
    x32 = x.astype(jnp.float32)
    grouped = x32.reshape(*x.shape[:-1], cfg.groups, cfg.dim // cfg.groups)
    # grouped axes: [b, *spatial, groups, c/groups]; reduce the group's channels (and space).
    axes = (-1,) if cfg.causal else (*range(1, x.ndim - 1), -1)
    group_var = jnp.var(grouped, axis=axes, keepdims=True)
    normed = (grouped * jax.lax.rsqrt(group_var + cfg.eps)).reshape(x.shape)
    y = jax.nn.sigmoid(p["v"] * x32) * normed * p["scale"] + p["bias"]
    return y.astype(dtype)


core.register_layer(
    "evonorm_b0",
    EvoNormB0Config,
    param_specs=param_specs,
    apply=b0_apply,
    stateful=True,
    example=core.Example(
        config=EvoNormB0Config(dim=16), input_shape=(2, 8, 16), apply_kwargs=(("train", True),)
    ),
    kind="norm",
)
core.register_layer(
    "evonorm_s0",
    EvoNormS0Config,
    param_specs=param_specs,
    apply=s0_apply,
    example=core.Example(config=EvoNormS0Config(dim=16, groups=4), input_shape=(2, 8, 16)),
    kind="norm",
)

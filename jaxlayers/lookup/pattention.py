"""TokenFormer Pattention: a projection whose weights are learnable parameter tokens.

From "TokenFormer: Rethinking Transformer Scaling with Tokenized Model Parameters".
Inputs attend to ``n`` key/value parameter tokens ``K_P [n, d_in]``, ``V_P [n, d_out]``::

    A      = x K_P^T                                    [..., n]
    Theta  = GeLU(A * tau / ||A||_2)                    (norm over the n tokens)
    y      = Theta V_P                                  [..., d_out]

with ``tau = sqrt(n)`` (the paper's modified softmax: L2 normalisation and GeLU instead of
exp-and-sum, so gradients stay stable as ``n`` grows).

Growth (:func:`grow`): appending ``m`` tokens with **zero keys** leaves ``||A||_2`` unchanged
and adds ``GeLU(0) V = 0``, so outputs are preserved exactly -- provided ``tau`` stays at its old
value. ``grow`` therefore freezes ``tau`` in the returned config (``scale=sqrt(n_old)``).
New value tokens are drawn at random (small normal): were they zero as well, the new keys
would get zero gradient (``dL/dK_new`` is proportional to ``V_new``).

Choices: exact (erf) GeLU; ``eps`` inside the norm (``A * rsqrt(sum A^2 + eps)``); no bias.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxlayers import core

__all__ = ["Config", "param_specs", "apply", "grow"]

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """Pattention ``[..., d_in] -> [..., d_out]`` over ``num_tokens`` parameter tokens.

    Attributes:
      d_in, d_out: features in / out.
      num_tokens: parameter tokens ``n``.
      scale: ``tau``; ``None`` means ``sqrt(num_tokens)``. :func:`grow` sets it explicitly.
      eps: added to the squared norm.
    """

    d_in: int
    d_out: int
    num_tokens: int
    scale: float | None = None
    eps: float = 1e-6

    def __post_init__(self):
        for name in ("d_in", "d_out", "num_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")

    @property
    def tau(self) -> float:
        return math.sqrt(self.num_tokens) if self.scale is None else float(self.scale)


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    return {
        "key_tokens": core.ParamSpec(
            (cfg.num_tokens, cfg.d_in), core.initializers.fan_in(1.0, in_axis=-1), ("mlp", "embed")
        ),
        "value_tokens": core.ParamSpec(
            (cfg.num_tokens, cfg.d_out), core.initializers.fan_in(1.0, in_axis=-2), ("mlp", None)
        ),
    }


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``GeLU(tau * A / ||A||) V_P`` with ``A = x K_P^T``; ``[..., d_in] -> [..., d_out]``."""
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_in={cfg.d_in}]); got shape ()")
    core.check_dim(x, -1, cfg.d_in, "x", "d_in")
    dtype = core.compute_dtype(cfg, x)
    p = core.cast_floating(params, dtype)
    a = jnp.einsum("...i,ni->...n", x.astype(dtype), p["key_tokens"], precision=_HI)
    a32 = a.astype(jnp.float32)
    inv = lax.rsqrt(jnp.sum(jnp.square(a32), axis=-1, keepdims=True) + cfg.eps)
    theta = jax.nn.gelu(a32 * inv * cfg.tau, approximate=False).astype(dtype)
    return jnp.einsum("...n,no->...o", theta, p["value_tokens"], precision=_HI)


def grow(
    key: jax.Array, params: core.Params, cfg: Config, new_tokens: int, value_std: float = 0.02
) -> tuple[core.Params, Config]:
    """Append ``new_tokens`` parameter tokens; the returned layer computes the same function.

    Keys of the new tokens are zero, values ``normal(value_std)``; ``scale`` is frozen to the
    old ``tau``. Returns ``(params, cfg)``.
    """
    if new_tokens <= 0:
        raise ValueError(f"new_tokens must be positive; got {new_tokens}")
    k_old, v_old = params["key_tokens"], params["value_tokens"]
    k_new = jnp.zeros((new_tokens, cfg.d_in), k_old.dtype)
    v_new = value_std * jax.random.normal(key, (new_tokens, cfg.d_out), jnp.float32)
    grown = {
        "key_tokens": jnp.concatenate([k_old, k_new], axis=0),
        "value_tokens": jnp.concatenate([v_old, v_new.astype(v_old.dtype)], axis=0),
    }
    return grown, cfg.replace(num_tokens=cfg.num_tokens + new_tokens, scale=cfg.tau)


core.register_layer(
    "pattention",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(config=Config(d_in=16, d_out=24, num_tokens=32), input_shape=(2, 8, 16)),
    kind="projection",
)

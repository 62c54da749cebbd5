"""Dense (fully connected) projection.

    y = x W + b          x: [..., i]   W: [i, o] ("kernel")   b: [o] ("bias")   y: [..., o]

The kernel is stored ``(in, out)`` with logical axes ``cfg.kernel_axes`` (``("embed", "mlp")`` by
default); the bias carries the output axis. The default kernel initializer is a truncated normal
with variance ``1 / d_in`` (LeCun / fan-in), the bias starts at zero.

Dtypes: params are stored in ``cfg.param_dtype`` and cast to the compute dtype (``cfg.dtype``,
else the input's dtype) inside :func:`apply`; the matmul then runs in the compute dtype, as in
``flax.nnx.Linear``. Integer inputs are rejected.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlayers import core

__all__ = ["Config", "param_specs", "init", "apply"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """Dense layer config.

    Attributes:
      d_in: input features ``i``.
      d_out: output features ``o``.
      use_bias: add a learned bias ``b``.
      kernel_axes: logical axis names of the ``(in, out)`` kernel; the bias gets ``(out,)``.
      kernel_init: initializer ``(key, shape, dtype) -> array``; ``None`` = fan-in truncated
        normal.
    """

    d_in: int
    d_out: int
    use_bias: bool = True
    kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")
    kernel_init: core.Initializer | None = None

    def __post_init__(self):
        if self.d_in <= 0 or self.d_out <= 0:
            raise ValueError(
                f"d_in and d_out must be positive; got d_in={self.d_in}, d_out={self.d_out}"
            )
        if len(self.kernel_axes) != 2:
            raise ValueError(
                f"kernel_axes must name the 2 kernel dims (in, out); got {self.kernel_axes}"
            )


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    kernel_init = cfg.kernel_init or core.initializers.fan_in(1.0)
    specs = {"kernel": core.ParamSpec((cfg.d_in, cfg.d_out), kernel_init, tuple(cfg.kernel_axes))}
    if cfg.use_bias:
        specs["bias"] = core.ParamSpec((cfg.d_out,), core.initializers.zeros, (cfg.kernel_axes[1],))
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``y = x W + b``; ``x: [..., d_in]`` (any number of leading dims) -> ``[..., d_out]``."""
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_in={cfg.d_in}]); got shape ()")
    core.check_dim(x, -1, cfg.d_in, "x", "d_in")
    dtype = core.compute_dtype(cfg, x)
    p = core.cast_floating(params, dtype)
    y = jnp.matmul(x.astype(dtype), p["kernel"])
    if cfg.use_bias:
        y = y + p["bias"].reshape((1,) * (y.ndim - 1) + (cfg.d_out,))
    return y


core.register_layer(
    "dense",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(config=Config(d_in=16, d_out=24), input_shape=(2, 8, 16)),
    kind="projection",
)

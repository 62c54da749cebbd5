"""Feed-forward block: plain MLP and the GLU family.

    variant "mlp":  y = act(x W_up + b_up) W_down + b_down
    variant "glu":  y = (act(x W_gate + b_gate) * (x W_up + b_up)) W_down + b_down

``x: [..., d_model] -> [..., d_model]``, hidden width ``f = d_hidden``. The GLU variants are
those of "GLU Variants Improve Transformer": SwiGLU (silu), GeGLU (gelu), ReGLU (relu) and
bilinear (identity). The paper leaves open which GELU GeGLU uses; :func:`geglu` uses the exact
(erf) form, pass ``activation="gelu_tanh"`` for the tanh approximation. The activation is applied
to the "gate" branch, the "up" branch stays linear.

Params: ``"up"`` and ``"gate"`` (glu only) ``{"kernel": [d_model, f], "bias": [f]}`` with axes
``("embed", "mlp")``; ``"down"`` ``{"kernel": [f, d_model], "bias": [d_model]}`` with axes
``("mlp", "embed")``. Biases only with ``use_bias=True``. Kernels use the Dense fan-in init.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlayers import activations, core, dense

__all__ = ["Config", "param_specs", "init", "apply", "swiglu", "geglu", "reglu", "bilinear"]

VARIANTS = ("mlp", "glu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """MLP config. ``activation`` is a name from :data:`jaxlayers.activations.NAMES`."""

    d_model: int
    d_hidden: int
    activation: str = "gelu"
    variant: str = "mlp"
    use_bias: bool = False

    def __post_init__(self):
        activations.get(self.activation)  # raises ValueError listing the names
        core.check_choice(self.variant, VARIANTS, "variant")
        if self.d_model <= 0 or self.d_hidden <= 0:
            raise ValueError(
                "d_model and d_hidden must be positive; "
                f"got d_model={self.d_model}, d_hidden={self.d_hidden}"
            )


def swiglu(d_model: int, d_hidden: int, **kwargs) -> Config:
    return Config(d_model=d_model, d_hidden=d_hidden, activation="silu", variant="glu", **kwargs)


def geglu(d_model: int, d_hidden: int, **kwargs) -> Config:
    return Config(d_model=d_model, d_hidden=d_hidden, activation="gelu", variant="glu", **kwargs)


def reglu(d_model: int, d_hidden: int, **kwargs) -> Config:
    return Config(d_model=d_model, d_hidden=d_hidden, activation="relu", variant="glu", **kwargs)


def bilinear(d_model: int, d_hidden: int, **kwargs) -> Config:
    return Config(
        d_model=d_model, d_hidden=d_hidden, activation="identity", variant="glu", **kwargs
    )


def _dense_cfgs(cfg: Config) -> dict[str, dense.Config]:
    common = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    into = dense.Config(
        d_in=cfg.d_model, d_out=cfg.d_hidden, kernel_axes=("embed", "mlp"), **common
    )
    out = dense.Config(d_in=cfg.d_hidden, d_out=cfg.d_model, kernel_axes=("mlp", "embed"), **common)
    cfgs = {"up": into, "down": out}
    if cfg.variant == "glu":
        cfgs["gate"] = into
    return cfgs


def param_specs(cfg: Config) -> dict[str, dict[str, core.ParamSpec]]:
    return {name: dense.param_specs(c) for name, c in _dense_cfgs(cfg).items()}


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``x: [..., d_model] -> [..., d_model]``."""
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_model={cfg.d_model}]); got shape ()")
    core.check_dim(x, -1, cfg.d_model, "x", "d_model")
    cfgs = _dense_cfgs(cfg)
    act = activations.get(cfg.activation)
    h = dense.apply(params["up"], x, cfgs["up"])
    if cfg.variant == "glu":
        h = act(dense.apply(params["gate"], x, cfgs["gate"])) * h
    else:
        h = act(h)
    return dense.apply(params["down"], h, cfgs["down"])


core.register_layer(
    "mlp",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(config=swiglu(16, 32), input_shape=(2, 8, 16)),
    kind="mlp",
)

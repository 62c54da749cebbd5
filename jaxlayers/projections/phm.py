"""PHM: parameterised hypercomplex multiplication layer, a Dense with ``1/n`` of the parameters.

From "Beyond Fully-Connected Layers with Quaternions: Parameterization of Hypercomplex
Multiplications with 1/n Parameters"::

    W = sum_{s=1}^{n} A_s (x) S_s        A_s: [n, n]   S_s: [i/n, o/n]   W: [i, o]
    y = x W + b

``(x)`` is the Kronecker product, so ``W[p*(i/n) + u, q*(o/n) + v] = sum_s A_s[p, q] S_s[u, v]``.
The "rules" ``A_s`` are learned (with ``n = 4`` and fixed signed permutations they would give
quaternion multiplication); the layer has ``n^3 + i*o/n`` weights instead of ``i*o``.

The kernel is stored ``(in, out)`` like :mod:`jaxlayers.dense` (the paper writes ``W x`` with
``W: [o, i]``; the transpose of a Kronecker sum is the Kronecker sum of the transposes, so the
family of layers is the same). ``apply`` builds ``W`` (``n * i * o`` multiply-adds, independent
of the batch) and runs one matmul.

Init (a choice the paper leaves open): ``A_s`` normal with variance ``1/n`` and ``S_s`` fan-in
truncated normal with variance ``1/i``, so each entry of ``W`` (a sum of ``n`` products) has
variance ``1/i``, the Dense (LeCun) scale. Bias 0. Params: ``"rules" [n, n, n]`` axes
``(None, None, None)``, ``"weights" [n, i/n, o/n]`` axes ``(None, "embed", "mlp")``,
``"bias" [o]``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxlayers import core

__all__ = ["Config", "param_specs", "init", "apply", "kronecker_weight"]

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """PHM layer ``[..., d_in] -> [..., d_out]`` with hypercomplex dimension ``n``.

    Attributes:
      d_in, d_out: features in / out; both divisible by ``n``.
      n: number of Kronecker terms and size of each rule matrix.
      use_bias: add ``b``.
    """

    d_in: int
    d_out: int
    n: int = 4
    use_bias: bool = True

    def __post_init__(self):
        if self.n <= 0:
            raise ValueError(f"n must be positive; got {self.n}")
        if self.d_in <= 0 or self.d_out <= 0:
            raise ValueError(
                f"d_in and d_out must be positive; got d_in={self.d_in}, d_out={self.d_out}"
            )
        core.check_divisible(self.d_in, self.n, "d_in", "n")
        core.check_divisible(self.d_out, self.n, "d_out", "n")


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    n = cfg.n
    specs = {
        "rules": core.ParamSpec(
            (n, n, n), core.initializers.normal(1.0 / math.sqrt(n)), (None, None, None)
        ),
        # fan-in over the whole input width: variance 1/d_in per entry of S_s.
        "weights": core.ParamSpec(
            (n, cfg.d_in // n, cfg.d_out // n),
            core.initializers.fan_in(1.0, in_axis=(0, 1)),
            (None, "embed", "mlp"),
        ),
    }
    if cfg.use_bias:
        specs["bias"] = core.ParamSpec((cfg.d_out,), core.initializers.zeros, ("mlp",))
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def kronecker_weight(rules: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_s kron(rules[s], weights[s])``: ``[n, n, n], [n, a, c] -> [n*a, n*c]``."""
    n, a, c = weights.shape
    w = jnp.einsum("spq,suv->puqv", rules, weights, precision=_HI)
    return w.reshape(n * a, n * c)


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``x (sum_s A_s (x) S_s) + b``; ``x: [..., d_in] -> [..., d_out]``."""
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_in={cfg.d_in}]); got shape ()")
    core.check_dim(x, -1, cfg.d_in, "x", "d_in")
    dtype = core.compute_dtype(cfg, x)
    p = core.cast_floating(params, dtype)
    w = kronecker_weight(p["rules"], p["weights"])
    y = jnp.einsum("...i,io->...o", x.astype(dtype), w, precision=_HI)
    if cfg.use_bias:
        y = y + p["bias"].reshape((1,) * (y.ndim - 1) + (cfg.d_out,))
    return y


core.register_layer(
    "phm",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(config=Config(d_in=16, d_out=24, n=4), input_shape=(2, 8, 16)),
    kind="projection",
)

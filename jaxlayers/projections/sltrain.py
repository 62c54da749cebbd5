"""SLTrain: a Dense whose weight is low-rank plus sparse on a fixed random support.

From "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining"::

    W = (alpha / r) A B + S        A: [i, r]   B: [r, o]   S: [i, o] with nnz(S) = delta i o
    y = x W + b

``S`` is nonzero only on a support ``Omega`` of ``nnz = round(delta * i * o)`` entries drawn
uniformly at random once and kept fixed; only its values ``V [nnz]`` are learned.

Initialisation follows the paper's released code: ``A`` (the factor next to the input) fan-in
truncated normal, ``B = 0`` (so training starts from ``W = S``), sparse values uniform in
``[-1/sqrt(i), 1/sqrt(i)]``, bias 0. ``cfg.zero_init_b=False`` draws ``B`` fan-in instead (used
by the registry example so that every parameter gets a gradient at init).

The support is **derived deterministically from the config**, not stored in the params:
``Omega = sorted(numpy.random.default_rng(cfg.support_seed).choice(i * o, nnz,
replace=False))`` as flat row-major indices into the ``(in, out)`` kernel (see
:func:`support_indices`). The params tree therefore holds only float arrays (``jax.grad`` and
optax work on it as is; an int32 index leaf would break both) and checkpoints need not carry
it. The paper draws an independent support per layer: give each layer its own
``support_seed`` (equal seeds and shapes give equal supports). The indices are a numpy constant
folded into the compiled program.

``apply`` composes the dense ``W`` (scatter-add of ``V`` into ``(alpha/r) A B``) and runs one
matmul, as the paper's kernel does; the memory saving is in the params and optimizer state.

Params: ``"lora_a" [i, r]`` axes ``("embed", None)``, ``"lora_b" [r, o]`` axes
``(None, "mlp")``, ``"sparse_values" [nnz]`` axes ``(None,)``, ``"bias" [o]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlayers import core

__all__ = ["Config", "param_specs", "init", "apply", "support_indices", "dense_weight"]

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """SLTrain layer ``[..., d_in] -> [..., d_out]``.

    Attributes:
      d_in, d_out: features in / out.
      rank: ``r`` of the low-rank factor.
      density: ``delta``, fraction of kernel entries in the sparse support (paper: 0.01-0.05).
      alpha: low-rank scale numerator (scale ``alpha / r``; the paper's scripts use 16 with
        ``r`` 128-512).
      support_seed: numpy seed of the support (see the module docstring).
      zero_init_b: start ``B`` at zero (paper); else fan-in normal.
      use_bias: add ``b``.
    """

    d_in: int
    d_out: int
    rank: int
    density: float = 0.03
    alpha: float = 1.0
    support_seed: int = 0
    zero_init_b: bool = True
    use_bias: bool = True

    def __post_init__(self):
        for name in ("d_in", "d_out", "rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1]; got {self.density}")
        if self.nnz < 1:
            raise ValueError(
                f"density={self.density} leaves no sparse entry in a {self.d_in}x{self.d_out} "
                "kernel; need density * d_in * d_out >= 0.5"
            )

    @property
    def nnz(self) -> int:
        return int(round(self.density * self.d_in * self.d_out))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@functools.lru_cache(maxsize=256)
def _support(d_in: int, d_out: int, nnz: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(d_in * d_out, size=nnz, replace=False)).astype(np.int32)
    idx.setflags(write=False)
    return idx


def support_indices(cfg: Config) -> np.ndarray:
    """Flat row-major indices ``[nnz]`` (int32, sorted) of ``S`` in the ``(in, out)`` kernel."""
    return _support(cfg.d_in, cfg.d_out, cfg.nnz, cfg.support_seed)


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    bound = 1.0 / math.sqrt(cfg.d_in)
    b_init = core.initializers.zeros if cfg.zero_init_b else core.initializers.fan_in(1.0)
    specs = {
        "lora_a": core.ParamSpec(
            (cfg.d_in, cfg.rank), core.initializers.fan_in(1.0), ("embed", None)
        ),
        "lora_b": core.ParamSpec((cfg.rank, cfg.d_out), b_init, (None, "mlp")),
        "sparse_values": core.ParamSpec(
            (cfg.nnz,), core.initializers.uniform_range(-bound, bound), (None,)
        ),
    }
    if cfg.use_bias:
        specs["bias"] = core.ParamSpec((cfg.d_out,), core.initializers.zeros, ("mlp",))
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def dense_weight(params: core.Params, cfg: Config, dtype=None) -> jax.Array:
    """The composed kernel ``(alpha/r) A B + S`` ``[d_in, d_out]`` (in ``dtype``, default the
    params' dtype)."""
    p = params if dtype is None else core.cast_floating(params, dtype)
    low = jnp.matmul(p["lora_a"], p["lora_b"], precision=_HI)
    low = low * jnp.asarray(cfg.scale, low.dtype)
    flat = low.reshape(-1).at[support_indices(cfg)].add(p["sparse_values"])
    return flat.reshape(cfg.d_in, cfg.d_out)


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``x ((alpha/r) A B + S) + b``; ``x: [..., d_in] -> [..., d_out]``."""
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_in={cfg.d_in}]); got shape ()")
    core.check_dim(x, -1, cfg.d_in, "x", "d_in")
    if params["sparse_values"].shape != (cfg.nnz,):
        raise ValueError(
            f"params['sparse_values'] must have shape ({cfg.nnz},) (density * d_in * d_out); "
            f"got {params['sparse_values'].shape}"
        )
    dtype = core.compute_dtype(cfg, x)
    w = dense_weight(params, cfg, dtype)
    y = jnp.einsum("...i,io->...o", x.astype(dtype), w, precision=_HI)
    if cfg.use_bias:
        y = y + params["bias"].astype(dtype).reshape((1,) * (y.ndim - 1) + (cfg.d_out,))
    return y


core.register_layer(
    "sltrain",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(
        config=Config(d_in=16, d_out=24, rank=4, density=0.1, alpha=4.0, zero_init_b=False),
        input_shape=(2, 8, 16),
    ),
    kind="projection",
)

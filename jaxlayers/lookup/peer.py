"""PEER: a mixture of many single-neuron experts retrieved by product keys.

From "Mixture of A Million Experts" (He, 2024). With ``E = n_sub^2`` experts, expert ``e`` is
``e(x) = act(<u_e, x>) v_e`` (``u_e`` in R^{d_in}, ``v_e`` in R^{d_out}). Per head ``h``::

    scores, ids = product-key top-k of the query q_h = x W_q[h]    (exact, see product_key.py)
    g           = softmax(scores)                                   [k]
    y           = sum_h sum_i g_i act(<u_{ids_i}, x>) v_{ids_i}

Heads share the experts. The down-projections ``<u_e, x>`` of the ``heads * k`` selected
experts are a plain gather + dot (``[n, heads*k, d_in]`` is materialised); the output sum is
one ``gather_sum`` over the shared table ``v [1, E, d_out]`` with weights ``g * act(.)``.
Choices: GELU (exact) activation by default, no query BatchNorm, no bias.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlayers import activations, core
from jaxlayers.lookup.product_key import product_key_topk
from pallas_kernels.lookup import gather_sum

__all__ = ["Config", "param_specs", "apply"]

_HI = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """PEER ``[..., d_in] -> [..., d_out]`` with ``n_sub ** 2`` experts.

    Attributes:
      d_in, d_out: features in / out (``d_in == d_out`` for an MLP drop-in).
      n_sub: sub-keys per half; ``k``: experts per head; ``heads``; ``d_key`` (even).
      activation: name from ``jaxlayers.activations``.
      implementation: passed to ``gather_sum``.
    """

    d_in: int
    d_out: int
    n_sub: int = 1024
    k: int = 16
    heads: int = 8
    d_key: int = 128
    activation: str = "gelu"
    implementation: str | None = None

    def __post_init__(self):
        for name in ("d_in", "d_out", "n_sub", "k", "heads", "d_key"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        core.check_divisible(self.d_key, 2, "d_key", "2 (two halves)")
        if self.k > self.n_sub:
            raise ValueError(f"k={self.k} must be <= n_sub={self.n_sub}")
        activations.get(self.activation)

    @property
    def num_experts(self) -> int:
        return self.n_sub**2


def param_specs(cfg: Config) -> dict:
    half = cfg.d_key // 2
    return {
        "query": {
            "kernel": core.ParamSpec(
                (cfg.d_in, cfg.heads * cfg.d_key), core.initializers.fan_in(1.0), ("embed", None)
            )
        },
        "sub_keys": core.ParamSpec(
            (cfg.heads, 2, cfg.n_sub, half), core.initializers.fan_in(1.0), (None, None, None, None)
        ),
        "down": core.ParamSpec(
            (cfg.num_experts, cfg.d_in),
            core.initializers.normal(1.0 / np.sqrt(cfg.d_in)),
            ("experts", None),
        ),
        "up": core.ParamSpec(
            (cfg.num_experts, cfg.d_out),
            core.initializers.normal(1.0 / np.sqrt(cfg.heads * cfg.k)),
            ("experts", None),
        ),
    }


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """PEER layer; ``x [..., d_in] -> [..., d_out]`` (module doc)."""
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_in={cfg.d_in}]); got shape ()")
    core.check_dim(x, -1, cfg.d_in, "x", "d_in")
    dtype = core.compute_dtype(cfg, x)
    p = core.cast_floating(params, dtype)
    lead = x.shape[:-1]
    xf = x.astype(dtype).reshape(-1, cfg.d_in)
    n, h, k = xf.shape[0], cfg.heads, cfg.k
    q = jnp.matmul(xf, p["query"]["kernel"], precision=_HI).astype(jnp.float32)
    q = q.reshape(n, h, 2, cfg.d_key // 2)
    s = jnp.einsum("nhtd,htsd->nhts", q, p["sub_keys"].astype(jnp.float32), precision=_HI)
    scores, ids = product_key_topk(s[:, :, 0], s[:, :, 1], k)  # [n, h, k]
    g = jax.nn.softmax(scores, axis=-1)
    ids = ids.reshape(n, h * k)
    u = p["down"][ids]  # [n, h*k, d_in]
    pre = jnp.einsum("nd,ned->ne", xf, u, precision=_HI).astype(jnp.float32)
    act = activations.get(cfg.activation)
    w = g.reshape(n, h * k) * act(pre)
    y = gather_sum(ids, w, p["up"][None], implementation=cfg.implementation, check_indices=False)
    return y.reshape(lead + (cfg.d_out,))


core.register_layer(
    "peer",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(
        config=Config(d_in=16, d_out=16, n_sub=8, k=4, heads=2, d_key=8),
        input_shape=(2, 8, 16),
        rtol_bf16=5e-2,
    ),
    kind="mlp",
)

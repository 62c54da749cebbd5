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

Row-sharded experts (``table_axis``): ``down`` and ``up`` are both split by expert rows over the
mesh axis ``table_axis`` of the mesh set with ``jax.set_mesh`` (expert ``e`` lives on one
device with both its ``u_e`` and ``v_e``). After the (replicated) routing, each device computes
``g_i act(<u_e, x>) v_e`` for the selected experts it owns -- the gather of ``u``, the dot and
the weighted sum of ``v`` are all shard-local -- and one all-reduce of ``y [tokens, d_out]``
adds the parts (:func:`pallas_kernels.lookup.sharded.row_sharded_sum`); the expert gradients
stay row-sharded. Their logical axes are then ``("table", None)`` instead of
``("experts", None)``: map ``"table"`` to the mesh axis named by ``table_axis``
(``train.sharding.DEFAULT_RULES`` maps it to ``"tensor"``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlayers import activations, core
from jaxlayers.lookup.memoryformer import ROW_AXIS, check_table_axes
from jaxlayers.lookup.product_key import product_key_topk
from pallas_kernels.lookup import gather_sum
from pallas_kernels.lookup.sharded import row_sharded_sum

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
      table_axis: None, or the mesh axis the experts (rows of ``down`` and ``up``) are split
        over (module doc); needs ``jax.set_mesh(mesh)`` around the call and ``n_sub**2``
        divisible by the axis size.
      table_token_axis: None, or the mesh axis (or tuple of axes) the tokens are split over in
        the sharded expert computation (e.g. the batch axis ``"data"``).
    """

    d_in: int
    d_out: int
    n_sub: int = 1024
    k: int = 16
    heads: int = 8
    d_key: int = 128
    activation: str = "gelu"
    implementation: str | None = None
    table_axis: str | None = None
    table_token_axis: str | tuple[str, ...] | None = None

    def __post_init__(self):
        check_table_axes(self)
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
    rows = "experts" if cfg.table_axis is None else ROW_AXIS
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
            (rows, None),
        ),
        "up": core.ParamSpec(
            (cfg.num_experts, cfg.d_out),
            core.initializers.normal(1.0 / np.sqrt(cfg.heads * cfg.k)),
            (rows, None),
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
    g = jax.nn.softmax(scores, axis=-1).reshape(n, h * k)
    ids = ids.reshape(n, h * k)
    act = activations.get(cfg.activation)

    def experts(first, ids, g, xf, down, up):
        """Sum of the selected experts among rows ``[first, first + E_local)`` of down / up."""
        local = ids - first
        owned = (local >= 0) & (local < down.shape[1])
        u = down[0][jnp.where(owned, local, 0)]  # [n, h*k, d_in]
        pre = jnp.einsum("nd,ned->ne", xf, u, precision=_HI).astype(jnp.float32)
        w = jnp.where(owned, g * act(pre), jnp.float32(0))
        return gather_sum(local, w, up, implementation=cfg.implementation, check_indices=False)

    tables = (p["down"][None], p["up"][None])
    if cfg.table_axis is None:
        y = experts(jnp.int32(0), ids, g, xf, *tables)
    else:
        y = row_sharded_sum(
            experts,
            (ids, g, xf),
            tables,
            axis_name=cfg.table_axis,
            token_axis=cfg.table_token_axis,
            rows=cfg.num_experts,
            axis_arg="table_axis",
            token_arg="table_token_axis",
            rows_desc=f"the n_sub**2 = {cfg.num_experts} experts",
        )
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

"""Product-key memory (PKM) and an UltraMem-style memory layer.

PKM, from "Large Memory Layers with Product Keys" (Lample et al.)::

    q      = x W_q                         per head h: q_h in R^{d_key}, halves q1, q2
    s1     = K1 q1, s2 = K2 q2             sub-key scores, K1, K2: [n_sub, d_key / 2]
    I1, I2 = top-k(s1), top-k(s2)          k candidates per half
    S      = {(a, b) in I1 x I2}: top-k of s1[a] + s2[b]          (exact top-k over all n_sub^2)
    w      = softmax over the k selected scores
    y      = sum_h sum_{(a,b)} w_ab V[a * n_sub + b]                 V: [n_sub^2, d_out]

The top-k over the ``k x k`` candidate grid equals the top-k over all ``n_sub^2`` sums (a pair
outside ``I1 x I2`` is beaten by ``k`` pairs inside it). The weighted sum is one
``gather_sum`` call with one shared table (``tables [1, n_sub^2, d_out]``), heads concatenated
along ``j``. Choices: no query BatchNorm (the paper's optional trick); heads share the values
and have their own sub-keys; the query projection has no bias.

UltraMem-style, after "Ultra-Sparse Memory Network" (Huang et al.): Tucker-decomposed
query-key retrieval (TDQKR) with rank ``r``::

    S_row[a, i] = <q1^(a), K1[a, i]>,  S_col[b, j] = <q2^(b), K2[b, j]>      a, b < r
    score(i, j) = sum_{a,b} C[a, b] S_row[a, i] S_col[b, j]                  C: [r, r]

Candidates come from the rank-1 part of ``C = sigma u v^T + ...`` (leading singular vectors,
treated as constants): top-k of ``u^T S_row`` and of ``v^T S_col``; the exact Tucker score is
evaluated on the ``k x k`` candidate grid and the top-k of it is kept (this is an approximate
top-k, as in the paper). Values have width ``d_value`` and are mapped to ``d_out`` by one
linear ``value_proj`` (a single-projector version of the paper's implicit value expansion).
Not implemented: the multi-projector implicit value expansion, skip-layer placement, and the
paper's auxiliary losses / initialisation schedule.

Row-sharded values (``table_axis``, both layers): the ``n_sub^2`` value rows are split over the
mesh axis ``table_axis`` of the mesh set with ``jax.set_mesh``; the query, scores and top-k are
computed as usual, then each device gathers and sums the selected rows it owns and one
all-reduce of ``[tokens, d]`` adds the parts (``memoryformer.table_gather_sum``). The values'
logical axes are then ``("table", None)`` instead of ``("rows", None)``: map ``"table"`` to the
mesh axis named by ``table_axis`` (``train.sharding.DEFAULT_RULES`` maps it to ``"tensor"``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlayers import core
from jaxlayers.lookup.memoryformer import ROW_AXIS, check_table_axes, table_gather_sum

__all__ = [
    "Config",
    "UltraMemConfig",
    "product_key_topk",
    "param_specs",
    "apply",
    "ultramem_param_specs",
    "ultramem_apply",
]

_HI = lax.Precision.HIGHEST


def product_key_topk(s1: jax.Array, s2: jax.Array, k: int):
    """Top-k of ``s1[a] + s2[b]`` over all pairs: (scores [..., k], flat ids a*n2+b [..., k]).

    ``s1 [..., n1]``, ``s2 [..., n2]``; exact (see module doc); ids are int32.
    """
    n2 = s2.shape[-1]
    v1, i1 = lax.top_k(s1, k)
    v2, i2 = lax.top_k(s2, k)
    grid = v1[..., :, None] + v2[..., None, :]  # [..., k, k]
    scores, flat = lax.top_k(grid.reshape(grid.shape[:-2] + (k * k,)), k)
    a = jnp.take_along_axis(i1, flat // k, axis=-1)
    b = jnp.take_along_axis(i2, flat % k, axis=-1)
    return scores, (a * n2 + b).astype(jnp.int32)


def _check_x(x, d_in):
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_in={d_in}]); got shape ()")
    core.check_dim(x, -1, d_in, "x", "d_in")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """Product-key memory ``[..., d_in] -> [..., d_out]`` with ``n_sub^2`` value rows.

    Attributes:
      d_in, d_out: features in / out.
      n_sub: sub-keys per half (memory size ``n_sub ** 2``).
      k: rows retrieved per head (also the per-half candidate count).
      heads: query heads (sum of their reads).
      d_key: query / key width per head (even).
      implementation: passed to ``gather_sum``.
      table_axis: None, or the mesh axis the value rows are split over (module doc); needs
        ``jax.set_mesh(mesh)`` around the call and ``n_sub**2`` divisible by the axis size.
      table_token_axis: None, or the mesh axis (or tuple of axes) the tokens are split over in
        the sharded lookup (e.g. the batch axis ``"data"``); tokens must divide its size.
    """

    d_in: int
    d_out: int
    n_sub: int = 128
    k: int = 32
    heads: int = 4
    d_key: int = 128
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


def _rows_axes(cfg) -> tuple[str | None, None]:
    return ("rows" if cfg.table_axis is None else ROW_AXIS, None)


def _values_sum(cfg, ids, w, values) -> jax.Array:
    r = cfg.n_sub**2
    desc = f"the n_sub**2 = {r} value rows"
    return table_gather_sum(cfg, ids, w, values[None], rows=r, rows_desc=desc)


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
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
        "values": core.ParamSpec(
            (cfg.n_sub**2, cfg.d_out),
            core.initializers.normal(1.0 / np.sqrt(cfg.k * cfg.heads)),
            _rows_axes(cfg),
        ),
    }


def _queries(params, xf, heads, d_key):
    q = jnp.matmul(xf, params["query"]["kernel"], precision=_HI)
    return q.reshape(xf.shape[0], heads, 2, d_key // 2)


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """PKM read; ``x [..., d_in] -> [..., d_out]`` (module doc)."""
    _check_x(x, cfg.d_in)
    dtype = core.compute_dtype(cfg, x)
    p = core.cast_floating(params, dtype)
    lead = x.shape[:-1]
    xf = x.astype(dtype).reshape(-1, cfg.d_in)
    q = _queries(p, xf, cfg.heads, cfg.d_key).astype(jnp.float32)  # [n, h, 2, d/2]
    keys = p["sub_keys"].astype(jnp.float32)  # [h, 2, n_sub, d/2]
    s = jnp.einsum("nhtd,htsd->nhts", q, keys, precision=_HI)  # [n, h, 2, n_sub]
    scores, ids = product_key_topk(s[:, :, 0], s[:, :, 1], cfg.k)  # [n, h, k]
    w = jax.nn.softmax(scores, axis=-1)
    n = xf.shape[0]
    hk = cfg.heads * cfg.k
    y = _values_sum(cfg, ids.reshape(n, hk), w.reshape(n, hk), p["values"])
    return y.reshape(lead + (cfg.d_out,))


# --------------------------------------------------------------------------------------------
# UltraMem-style
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class UltraMemConfig(core.LayerConfig):
    """UltraMem-style memory ``[..., d_in] -> [..., d_out]`` (module doc).

    Attributes: as :class:`Config` (``table_axis`` included), plus ``rank`` (Tucker rank r) and
    ``d_value`` (value width before the output projection).
    """

    d_in: int
    d_out: int
    n_sub: int = 128
    k: int = 32
    heads: int = 2
    d_key: int = 64
    rank: int = 2
    d_value: int = 64
    implementation: str | None = None
    table_axis: str | None = None
    table_token_axis: str | tuple[str, ...] | None = None

    def __post_init__(self):
        check_table_axes(self)
        for name in ("d_in", "d_out", "n_sub", "k", "heads", "d_key", "rank", "d_value"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        core.check_divisible(self.d_key, 2, "d_key", "2 (two halves)")
        if self.k > self.n_sub:
            raise ValueError(f"k={self.k} must be <= n_sub={self.n_sub}")


def _core_init(key, shape, dtype=jnp.float32):
    """Tucker core: diag(1, ..., 0.5) plus small noise.

    Distinct diagonal values keep the leading singular pair well defined (an identity core would
    make it arbitrary, and the candidate choice unstable under rounding).
    """
    r = shape[-1]
    diag = jnp.diag(jnp.linspace(1.0, 0.5, r, dtype=dtype))
    return jnp.broadcast_to(diag, shape) + 0.01 * jax.random.normal(key, shape, dtype)


def ultramem_param_specs(cfg: UltraMemConfig) -> dict:
    half = cfg.d_key // 2
    r = cfg.rank
    return {
        "query": {
            "kernel": core.ParamSpec(
                (cfg.d_in, cfg.heads * 2 * r * half),
                core.initializers.fan_in(1.0),
                ("embed", None),
            )
        },
        "sub_keys": core.ParamSpec(
            (cfg.heads, 2, r, cfg.n_sub, half),
            core.initializers.fan_in(1.0),
            (None, None, None, None, None),
        ),
        "core": core.ParamSpec((cfg.heads, r, r), _core_init, (None, None, None)),
        "values": core.ParamSpec(
            (cfg.n_sub**2, cfg.d_value),
            core.initializers.normal(1.0 / np.sqrt(cfg.k * cfg.heads)),
            _rows_axes(cfg),
        ),
        "value_proj": {
            "kernel": core.ParamSpec(
                (cfg.d_value, cfg.d_out), core.initializers.fan_in(1.0), (None, "embed")
            )
        },
    }


def ultramem_apply(params: core.Params, x: jax.Array, cfg: UltraMemConfig) -> jax.Array:
    """UltraMem-style read; ``x [..., d_in] -> [..., d_out]`` (module doc)."""
    _check_x(x, cfg.d_in)
    dtype = core.compute_dtype(cfg, x)
    p = core.cast_floating(params, dtype)
    lead = x.shape[:-1]
    xf = x.astype(dtype).reshape(-1, cfg.d_in)
    n, h, r, k, ns = xf.shape[0], cfg.heads, cfg.rank, cfg.k, cfg.n_sub
    q = jnp.matmul(xf, p["query"]["kernel"], precision=_HI).astype(jnp.float32)
    q = q.reshape(n, h, 2, r, cfg.d_key // 2)
    keys = p["sub_keys"].astype(jnp.float32)  # [h, 2, r, n_sub, d/2]
    s = jnp.einsum("nhtad,htasd->nhtas", q, keys, precision=_HI)  # [n, h, 2, r, n_sub]
    s_row, s_col = s[:, :, 0], s[:, :, 1]  # [n, h, r, n_sub]
    c = params["core"].astype(jnp.float32)  # [h, r, r]; kept in float32 for the SVD
    u, _, vt = jnp.linalg.svd(lax.stop_gradient(c))
    u1 = lax.stop_gradient(u[:, :, 0])  # [h, r]
    v1 = lax.stop_gradient(vt[:, 0, :])
    # Make the leading singular pair point where the rank-1 score is largest for large
    # positive projections: flip both if their product has the wrong sign.
    sign = jnp.sign(jnp.einsum("ha,hab,hb->h", u1, c, v1, precision=_HI))
    sign = jnp.where(sign == 0, 1.0, sign)
    r1_row = jnp.einsum("ha,nhai->nhi", u1 * sign[:, None], s_row, precision=_HI)
    r1_col = jnp.einsum("hb,nhbj->nhj", v1, s_col, precision=_HI)
    _, i1 = lax.top_k(r1_row, k)  # [n, h, k]
    _, i2 = lax.top_k(r1_col, k)
    rows = jnp.take_along_axis(s_row, i1[:, :, None, :], axis=-1)  # [n, h, r, k]
    cols = jnp.take_along_axis(s_col, i2[:, :, None, :], axis=-1)
    grid = jnp.einsum("nhai,hab,nhbj->nhij", rows, c, cols, precision=_HI)  # [n, h, k, k]
    scores, flat = lax.top_k(grid.reshape(n, h, k * k), k)
    a = jnp.take_along_axis(i1, flat // k, axis=-1)
    b = jnp.take_along_axis(i2, flat % k, axis=-1)
    ids = (a * ns + b).astype(jnp.int32)
    w = jax.nn.softmax(scores, axis=-1)
    mem = _values_sum(cfg, ids.reshape(n, h * k), w.reshape(n, h * k), p["values"])
    y = jnp.matmul(mem, p["value_proj"]["kernel"], precision=_HI)
    return y.reshape(lead + (cfg.d_out,))


core.register_layer(
    "pkm",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(
        config=Config(d_in=16, d_out=16, n_sub=8, k=4, heads=2, d_key=8),
        input_shape=(2, 8, 16),
        rtol_bf16=5e-2,
    ),
    kind="projection",
)
core.register_layer(
    "ultramem",
    UltraMemConfig,
    param_specs=ultramem_param_specs,
    apply=ultramem_apply,
    example=core.Example(
        config=UltraMemConfig(
            d_in=16, d_out=16, n_sub=8, k=4, heads=2, d_key=8, rank=2, d_value=12
        ),
        input_shape=(2, 8, 16),
        # bf16 scores reorder a few Tucker-score candidates (another memory row is read).
        rtol_bf16=0.3,
    ),
    kind="projection",
)

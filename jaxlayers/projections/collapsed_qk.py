"""Collapsed-QK attention: one ``d x d`` matrix per head in place of ``W_Q W_K^T``.

From "Reducing the Transformer Architecture to a Minimum". Softmax attention only ever uses the
product of the query and key projections, ``q_t . k_s = x_t W_Q^h (W_K^h)^T x_s``, so one matrix
``M_h = W_Q^h (W_K^h)^T`` per head computes the same logits::

    logits_h[t, s] = scale * x_t^T M_h x_s                 M_h: [d, d]
    P_h = softmax_s(logits_h + causal mask)                 (float32)
    value_proj=True:   y = concat_h(P_h x W_V^h) W_O       W_V: [d, h*k]   W_O: [h*k, d]
    value_proj=False:  y = mean_h(P_h x)                    (V and O omitted)

``M_h`` is a ``d x d`` matrix of rank up to ``d`` (the factorised form has rank ``k``), i.e. the
same size as ``W_Q`` when ``h = 1`` and ``k = d``; with several heads it has more parameters
than the pair it replaces, as the paper notes. ``symmetric=True`` stores only the upper
triangle (``d(d+1)/2`` numbers per head) and uses ``M_h = M_h^T``, the paper's symmetric
similarity (a token is then compared with itself by ``x^T M x``). Without ``W_V``/``W_O`` the
paper keeps the output a convex combination of inputs; the mean over heads here is that choice
for several heads (a documented choice, the paper works mostly with one head).

``scale`` defaults to ``1/sqrt(k)`` with ``k = head_dim`` (default ``d / h``), which makes
:func:`from_attention` exact. ``M_h`` starts normal with std ``sqrt(k)/d`` -- the entry scale of
``W_Q W_K^T`` with fan-in-initialised factors -- so initial logits have the usual unit variance.

This layer has no decode ``step`` (no KV cache): it is registered with ``kind="other"``, not as
a sequence mixer. Params: ``"qk" [h, d, d]`` (or ``"qk_packed" [h, d(d+1)/2]``) with the heads
axis ``"heads"``; with ``value_proj`` also ``"v"``/``"o"`` ``{"kernel"}`` as in
:mod:`jaxlayers.attention`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlayers import attention, core, dense

__all__ = ["Config", "param_specs", "init", "apply", "qk_matrices", "from_attention"]

_HI = lax.Precision.HIGHEST
_MASK_VALUE = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """Collapsed-QK attention ``[b, t, d] -> [b, t, d]``.

    Attributes:
      d_model: width ``d``.
      num_heads: heads ``h``.
      head_dim: value width per head ``k`` (and the ``k`` of the default scale); ``None`` =
        ``d_model // num_heads``.
      symmetric: use a symmetric ``M_h`` stored as its upper triangle.
      value_proj: keep the value and output projections.
      causal: mask future keys.
      scale: logit scale; ``None`` = ``1/sqrt(head_dim)``.
    """

    d_model: int
    num_heads: int
    head_dim: int | None = None
    symmetric: bool = False
    value_proj: bool = True
    causal: bool = True
    scale: float | None = None

    def __post_init__(self):
        if self.d_model <= 0 or self.num_heads <= 0:
            raise ValueError(
                "d_model and num_heads must be positive; "
                f"got d_model={self.d_model}, num_heads={self.num_heads}"
            )
        if self.head_dim is None:
            core.check_divisible(self.d_model, self.num_heads, "d_model", "num_heads")
        elif self.head_dim <= 0:
            raise ValueError(f"head_dim must be positive; got {self.head_dim}")

    @property
    def key_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def logit_scale(self) -> float:
        return 1.0 / math.sqrt(self.key_dim) if self.scale is None else float(self.scale)


def _proj_cfgs(cfg: Config) -> dict[str, dense.Config]:
    common = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    width = cfg.num_heads * cfg.key_dim
    return {
        "v": dense.Config(d_in=cfg.d_model, d_out=width, kernel_axes=("embed", "heads"), **common),
        "o": dense.Config(d_in=width, d_out=cfg.d_model, kernel_axes=("heads", "embed"), **common),
    }


def param_specs(cfg: Config) -> dict:
    d, h = cfg.d_model, cfg.num_heads
    qk_init = core.initializers.normal(math.sqrt(cfg.key_dim) / d)
    if cfg.symmetric:
        specs: dict = {"qk_packed": core.ParamSpec((h, d * (d + 1) // 2), qk_init, ("heads", None))}
    else:
        specs = {"qk": core.ParamSpec((h, d, d), qk_init, ("heads", "embed", None))}
    if cfg.value_proj:
        specs.update({name: dense.param_specs(c) for name, c in _proj_cfgs(cfg).items()})
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def _unpack_symmetric(packed: jax.Array, d: int) -> jax.Array:
    """``[h, d(d+1)/2] -> [h, d, d]``, filling both triangles from the row-major upper one."""
    rows, cols = np.triu_indices(d)
    slot = np.zeros((d, d), np.int32)
    slot[rows, cols] = np.arange(rows.size)
    slot[cols, rows] = np.arange(rows.size)
    return packed[:, slot]


def qk_matrices(params: core.Params, cfg: Config) -> jax.Array:
    """The per-head ``M_h`` ``[h, d, d]`` (unpacked when ``symmetric``)."""
    if cfg.symmetric:
        return _unpack_symmetric(params["qk_packed"], cfg.d_model)
    return params["qk"]


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``x: [b, t, d_model] -> [b, t, d_model]``."""
    core.check_floating(x, "x")
    core.check_rank(x, 3, "x", f"[batch, time, d_model={cfg.d_model}]")
    core.check_dim(x, -1, cfg.d_model, "x", "d_model")
    dtype = core.compute_dtype(cfg, x)
    x = x.astype(dtype)
    m = qk_matrices(params, cfg).astype(dtype)
    xm = jnp.einsum("btd,hde->bthe", x, m, precision=_HI)
    logits = jnp.einsum("bthe,bse->bhts", xm, x, precision=_HI).astype(jnp.float32)
    logits = logits * cfg.logit_scale
    if cfg.causal:
        t = x.shape[1]
        allowed = np.tril(np.ones((t, t), bool)).reshape(1, 1, t, t)
        logits = jnp.where(allowed, logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    if not cfg.value_proj:
        mixed = jnp.einsum("bhts,bsd->bthd", probs, x, precision=_HI)
        return jnp.mean(mixed.astype(jnp.float32), axis=2).astype(dtype)
    cfgs = _proj_cfgs(cfg)
    v = dense.apply(params["v"], x, cfgs["v"])
    v = v.reshape(x.shape[:2] + (cfg.num_heads, cfg.key_dim))
    o = jnp.einsum("bhts,bshk->bthk", probs, v, precision=_HI)
    return dense.apply(params["o"], o.reshape(x.shape[:2] + (-1,)), cfgs["o"])


def from_attention(params: core.Params, cfg: attention.Config) -> tuple[core.Params, Config]:
    """Collapse a :mod:`jaxlayers.attention` layer: ``M_h = W_Q^h (W_K^h)^T``, same ``W_V``,
    ``W_O``. Needs ``use_rope=False``, ``qk_norm=False``, ``use_bias=False`` and
    ``num_kv_heads == num_heads`` (RoPE and norms act between the projections and the dot
    product, so they do not collapse). Returns ``(params, cfg)``."""
    if cfg.use_rope or cfg.qk_norm or cfg.use_bias or cfg.kv_heads != cfg.num_heads:
        raise ValueError(
            "from_attention needs an attention cfg with use_rope=False, qk_norm=False, "
            f"use_bias=False and num_kv_heads == num_heads; got use_rope={cfg.use_rope}, "
            f"qk_norm={cfg.qk_norm}, use_bias={cfg.use_bias}, num_kv_heads={cfg.kv_heads}, "
            f"num_heads={cfg.num_heads}"
        )
    d, h, k = cfg.d_model, cfg.num_heads, cfg.key_dim
    wq = params["q"]["kernel"].reshape(d, h, k)
    wk = params["k"]["kernel"].reshape(d, h, k)
    qk = jnp.einsum("dhk,ehk->hde", wq, wk, precision=_HI)
    new_cfg = Config(
        d_model=d,
        num_heads=h,
        head_dim=k,
        causal=cfg.causal,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )
    return {"qk": qk, "v": params["v"], "o": params["o"]}, new_cfg


core.register_layer(
    "collapsed_qk_attention",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(config=Config(d_model=16, num_heads=2), input_shape=(2, 8, 16)),
    kind="other",
)

"""Non-causal linear attention for vision / diffusion: SLAB and LiT.

Both are the normalised ReLU linear attention over all ``n`` tokens plus a depthwise
convolution (DWC) of the values added to the output, which restores the local detail (and the
rank) that a low-rank linear attention map lacks::

    q, k, v = x W_q, x W_k, x W_v                                   [b, n, h, k]
    o_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j) + eps) + DWC(v)_i
    y   = concat_heads(o) W_o                                       [b, n, d]

with ``phi = relu`` by default (any map of :mod:`~jaxlayers.linear_attention.feature_maps` can
be chosen; ``feature_map="focused"`` gives FLatten's focused linear attention).

* ``"slab_attention"`` (:class:`SLABConfig`): the "simplified linear attention" of "SLAB:
  Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch
  Normalization" (its PRepBN is a norm layer, see catalog D, not part of the mixer).
* ``"lit_attention"`` (:class:`LiTConfig`): the linear attention of "LiT: Delving into a
  Simplified Linear Diffusion Transformer for Image Generation": the same simple linear
  attention with a DWC, used with *few heads* (default ``num_heads=2``), which the paper finds
  a free improvement at equal cost (the state ``k x k`` per head grows as heads shrink).

The grid: ``x`` is ``[b, n, d]``. With ``grid=(H, W)`` (``H * W == n``, tokens in row-major
order) the DWC is 2-D with a ``conv_size x conv_size`` kernel, zero padding ("same"); with
``grid=None`` it is 1-D over the token order with ``conv_size`` taps, centred (non-causal).

Choices the papers leave open, made here:

* The DWC kernel is shared by all heads (``[K, K, k]`` or ``[K, k]``, one filter per channel of a
  head, plus a bias ``[k]``), as in the papers' public code; init uniform in
  ``+-1/sqrt(taps)`` (PyTorch's conv default bound), bias zero.
* The papers' code adds ``1e-6`` to every ReLU feature and averages rather than sums over
  tokens (``1e-6`` then sits in a mean-denominator); here ``phi = relu`` exactly and ``eps``
  is added to the summed denominator. The output is 0 for a query whose features all vanish.
* ``segment_ids [b, n]`` (packed token sequences, 1-D only): attention sums stay inside each
  sequence and DWC taps that would read another sequence read zero. They are computed with
  LION's two causal scans (:func:`jaxlayers.linear_attention.lion.two_scan_form`) on
  :func:`pallas_kernels.linear_attention.gated_linear_attention`; without segments the global
  sums are two einsums. With a 2-D ``grid`` segments raise.
* Dtypes: projections and the conv in the compute dtype with float32 accumulation; the
  denominator and division in float32.

These layers are non-causal: no ``step``; ``initial_state``/``return_state`` raise;
``positions`` is ignored. Params: ``"q"``, ``"k"``, ``"v"``, ``"o"`` projections, ``"dwc":
{"kernel", "bias"}``, and ``"feature_map"`` when the map has params.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxlayers import core
from jaxlayers.linear_attention import feature_maps as fmaps
from jaxlayers.linear_attention import linear_attn as la
from jaxlayers.linear_attention import lion

__all__ = [
    "SLABConfig",
    "LiTConfig",
    "param_specs",
    "init",
    "apply",
    "depthwise_conv",
    "global_linear_attention",
]

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class _NonCausalConfig(core.LayerConfig):
    """Fields shared by :class:`SLABConfig` and :class:`LiTConfig`.

    Attributes:
      d_model: model width ``d``.
      num_heads: heads ``h``.
      head_dim: per-head width ``k``; ``None`` = ``d_model // num_heads``.
      feature_map: a ``FeatureMap`` or its kind name (default "relu"; must be non-negative).
      conv_size: DWC kernel size ``K`` (odd).
      grid: ``(H, W)`` for a 2-D DWC over a row-major token grid, or None for a 1-D DWC.
      eps: added to the denominator.
      use_bias: biases on the q, k, v and o projections.
      implementation, chunk_size, interpret: passed to the op (used with ``segment_ids`` only).
    """

    d_model: int
    num_heads: int
    head_dim: int | None = None
    feature_map: fmaps.FeatureMap | str = "relu"
    conv_size: int = 5
    grid: tuple[int, int] | None = None
    eps: float = 1e-6
    use_bias: bool = False
    implementation: str | None = None
    chunk_size: int | None = None
    interpret: bool = False

    def __post_init__(self):
        object.__setattr__(self, "feature_map", fmaps.as_feature_map(self.feature_map))
        la.check_heads(self.num_heads, self.d_model, self.head_dim)
        la.check_op_options(self.implementation, self.chunk_size)
        if not self.feature_map.nonnegative:
            raise ValueError(
                "the normalised non-causal attention needs a non-negative feature map; got "
                f"feature_map={self.feature_map.kind!r}"
            )
        if self.conv_size < 1 or self.conv_size % 2 == 0:
            raise ValueError(f"conv_size must be a positive odd int; got {self.conv_size}")
        if self.grid is not None:
            grid = tuple(self.grid)
            if len(grid) != 2 or any(int(s) != s or s <= 0 for s in grid):
                raise ValueError(f"grid must be None or (height, width) > 0; got {self.grid}")
            object.__setattr__(self, "grid", (int(grid[0]), int(grid[1])))
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0; got eps={self.eps}")

    @property
    def key_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def feature_dim(self) -> int:
        return fmaps.output_dim(self.feature_map, self.key_dim)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SLABConfig(_NonCausalConfig):
    """SLAB simplified linear attention (see the module docstring for the fields)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LiTConfig(_NonCausalConfig):
    """LiT linear attention: as :class:`SLABConfig`, with few heads by default (2)."""

    num_heads: int = 2


def _conv_init(taps: int) -> core.Initializer:
    bound = 1.0 / math.sqrt(taps)
    return core.initializers.uniform_range(-bound, bound)


def param_specs(cfg: _NonCausalConfig) -> dict[str, Any]:
    specs = la.qkv_param_specs(cfg)
    fm_specs = fmaps.param_specs(cfg.feature_map, cfg.num_heads, cfg.key_dim)
    if fm_specs:
        specs["feature_map"] = fm_specs
    k, ks = cfg.key_dim, cfg.conv_size
    if cfg.grid is None:
        kernel = core.ParamSpec((ks, k), _conv_init(ks), (None, None))
    else:
        kernel = core.ParamSpec((ks, ks, k), _conv_init(ks * ks), (None, None, None))
    specs["dwc"] = {
        "kernel": kernel,
        "bias": core.ParamSpec((k,), core.initializers.zeros, (None,)),
    }
    return specs


def init(key: jax.Array, cfg: _NonCausalConfig) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def depthwise_conv(
    v: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    grid: tuple[int, int] | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Depthwise conv of ``v [b, n, h, k]`` with a head-shared ``kernel`` (``[K, k]`` 1-D or
    ``[K, K, k]`` 2-D over ``grid``) and ``bias [k]``; "same" zero padding. Returns float32.

    With ``segment_ids`` (1-D only) a tap reading a token of another sequence reads zero.
    """
    b, n, h, k = v.shape
    kernel = kernel.astype(v.dtype)
    if grid is None:
        taps = kernel.shape[0]
        half = taps // 2
        vp = jnp.pad(v, ((0, 0), (half, half), (0, 0), (0, 0)))
        if segment_ids is not None:
            runs = la.segment_runs(segment_ids, b, n)
            runs_p = jnp.pad(runs, ((0, 0), (half, half)), constant_values=-1)
        acc = jnp.zeros((b, n, h, k), jnp.float32)
        for j in range(taps):
            tap = vp[:, j : j + n].astype(jnp.float32)
            if segment_ids is not None:
                keep = runs_p[:, j : j + n] == runs
                tap = jnp.where(keep[:, :, None, None], tap, 0.0)
            acc = acc + tap * kernel[j].astype(jnp.float32)[None, None, None, :]
    else:
        gh, gw = grid
        rhs = jnp.tile(kernel, (1, 1, h))[:, :, None, :]  # [K, K, 1, h*k]
        acc = jax.lax.conv_general_dilated(
            v.reshape(b, gh, gw, h * k),
            rhs,
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=h * k,
            preferred_element_type=jnp.float32,
        ).reshape(b, n, h, k)
    return acc + bias.astype(v.dtype).astype(jnp.float32)[None, None, None, :]


def global_linear_attention(fq: jax.Array, fk: jax.Array, v: jax.Array, eps: float) -> jax.Array:
    """``phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j) + eps)`` over all
    tokens: ``fq, fk [b, n, h, f]``, ``v [b, n, h, k]`` -> float32 ``[b, n, h, k]``."""
    kv = jnp.einsum("bnhf,bnhv->bhfv", fk, v, preferred_element_type=jnp.float32)
    # Batch dims leading in the output: XLA:CPU has no bf16 x bf16 -> f32 dot for "bnhv".
    num = jnp.einsum("bnhf,bhfv->bhnv", fq, kv.astype(fq.dtype), preferred_element_type=jnp.float32)
    num = jnp.moveaxis(num, 1, 2)
    ksum = jnp.sum(fk.astype(jnp.float32), axis=1)  # [b, h, f]
    den = jnp.einsum("bnhf,bhf->bnh", fq.astype(jnp.float32), ksum, precision=_HI)
    return num / (den[..., None] + eps)


def apply(
    params: core.Params,
    x: jax.Array,
    cfg: _NonCausalConfig,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    initial_state: Any = None,
    return_state: bool = False,
) -> jax.Array:
    """Non-causal linear attention + DWC over ``x [b, n, d]`` -> ``y [b, n, d]``.

    Args:
      segment_ids: int ``[b, n]``; tokens attend (and convolve) only within their sequence.
        Not with a 2-D ``grid``.
      positions: ignored.
      initial_state, return_state: must be None / False (non-causal).
    """
    del positions
    name = "lit_attention" if isinstance(cfg, LiTConfig) else "slab_attention"
    lion.check_no_state(name, initial_state, return_state)
    la.check_x(x, cfg.d_model, 3, "x", "[batch, tokens, d_model]")
    b, n, _ = x.shape
    if cfg.grid is not None and n != cfg.grid[0] * cfg.grid[1]:
        raise ValueError(
            f"x.shape[1] (tokens) must be grid height * width = {cfg.grid[0] * cfg.grid[1]} "
            f"for grid={cfg.grid}; got {n}"
        )
    if segment_ids is not None:
        la.check_segment_ids(segment_ids, b, n)
        if cfg.grid is not None:
            raise ValueError(
                f"segment_ids need a 1-D token order; expected grid=None, got grid={cfg.grid}"
            )
    dtype = core.compute_dtype(cfg, x)
    x = x.astype(dtype)
    q, k, v = la.project_qkv(params, x, cfg)
    fm_params = params.get("feature_map")
    fq = fmaps.apply(cfg.feature_map, fm_params, q, "q").astype(dtype)
    fk = fmaps.apply(cfg.feature_map, fm_params, k, "k").astype(dtype)
    if segment_ids is None:
        o = global_linear_attention(fq, fk, v, cfg.eps)
    else:
        o = lion.two_scan_form(
            fq,
            fk,
            v,
            segment_ids=segment_ids,
            eps=cfg.eps,
            chunk_size=cfg.chunk_size,
            implementation=cfg.implementation,
            interpret=cfg.interpret,
        )
    dwc = params["dwc"]
    o = o + depthwise_conv(v, dwc["kernel"], dwc["bias"], cfg.grid, segment_ids)
    return la.project_out(params, o.astype(dtype), cfg)


core.register_layer(
    "slab_attention",
    SLABConfig,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(
        config=SLABConfig(d_model=32, num_heads=4, conv_size=3, grid=(4, 4)),
        input_shape=(2, 16, 32),
        decode=False,
    ),
    kind="mixer",
)

core.register_layer(
    "lit_attention",
    LiTConfig,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(
        config=LiTConfig(d_model=32, grid=(2, 8)),
        input_shape=(2, 16, 32),
        decode=False,
    ),
    kind="mixer",
)

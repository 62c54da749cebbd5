"""Causal linear attention with a configurable feature map, normaliser and output norm.

From "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention" (the
normalised form with ``phi = elu + 1``); the feature map is any of
:mod:`jaxlayers.linear_attention.feature_maps` (ReLU, Hedgehog, focused, norm-aware, ...).
Per head ``n`` (of ``h``), with ``f`` the feature width of ``phi``::

    q_t, k_t = x_t W_q, x_t W_k   [b, t, h, k]        v_t = x_t W_v   [b, t, h, k]
    S_t = S_{t-1} + phi(k_t) v_t^T                     [b, h, f, k]     (float32 state)
    z_t = z_{t-1} + phi(k_t)                           [b, h, f]        (with ``normalize``)
    o_t = scale phi(q_t)^T S_t / (scale phi(q_t) . z_t + eps)     (``normalize=True``)
    o_t = scale phi(q_t)^T S_t                                    (``normalize=False``)
    o_t = rms_norm(o_t) * g                            (each head, with ``output_norm``)
    y_t = concat_n(o_t) W_o                            [b, t, d]

The numerator runs on :func:`pallas_kernels.linear_attention.gated_linear_attention` (no decay;
``implementation``, ``chunk_size`` and ``interpret`` are passed through), so the Pallas kernels
serve it on GPU/TPU. The denominator ``phi(q_t) . z_t`` is computed beside the op, from a
cumulative sum of ``phi(k)`` over time (a segmented one with ``segment_ids``): O(t f) work, exact
in float32. We do not append a ones column to ``v`` (which gives the same numbers in one op call)
because ``value_dim + 1`` is not a size the kernels take (GPU: a power of two; TPU: a multiple of
16), so every normalised call would silently fall back to the ``xla`` path; a second op call
with a ones value would repeat the whole ``q k^T`` work for one column.

Choices the paper leaves open, made here:

* ``scale``: with ``normalize`` it cancels between numerator and denominator (up to ``eps``), so
  the default is 1; without it the default is ``f ** -0.5``.
* ``eps = 1e-6`` is added to the denominator (which is > 0 for elu+1, Hedgehog and focused maps
  but can be 0 for ReLU / norm-aware ones when every feature product vanishes: the output is
  then 0).
* The value width equals the key width ``k`` (``head_dim``).
* Dtypes: projections and the op run in the compute dtype (the op accumulates in float32);
  feature maps, the denominator, the division and the output norm run in float32. The features
  are rounded to the compute dtype once, and the denominator is formed from the same rounded
  features as the numerator.

Decode state (float32): ``{"kv": [b, h, f, k], "z": [b, h, f]}`` (``"z"`` only with
``normalize``). ``apply(..., return_state=True)`` returns it after the last token (with
``segment_ids``: the state of the last sequence of each row), ``initial_state=`` continues from
it (it reaches only the first sequence of each row), so prefill + :func:`step` == ``apply``.
``segment_ids [b, t]`` reset both sums wherever the id differs from the previous position's.
``positions`` is accepted and ignored (no positional encoding).

Params: ``"q"``, ``"k"``, ``"v"`` ``{"kernel": [d, h*k]}`` (axes ``("embed", "heads")``),
``"o"`` ``[h*k, d]`` (``("heads", "embed")``), biases with ``use_bias``; ``"feature_map"`` for
maps with params (Hedgehog: ``{"q"|"k": {"kernel": [h, k, f'], "bias": [h, f']}}``);
``"out_norm": {"scale": [k]}`` with ``output_norm``.

The module also holds helpers shared by the other mixers of this package:
:func:`qkv_param_specs`, :func:`project_qkv`, :func:`head_rms_norm`, :func:`linear_scan`,
:func:`check_segment_ids`, :func:`segment_resets`, :func:`segment_runs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxlayers import core, dense
from jaxlayers.linear_attention import feature_maps as fmaps
from pallas_kernels import linear_attention as la_ops
from pallas_kernels.linear_attention.block_sizes import check_chunk_size

__all__ = [
    "Config",
    "param_specs",
    "init",
    "apply",
    "init_state",
    "step",
    "IMPLEMENTATIONS",
    "qkv_param_specs",
    "project_qkv",
    "head_rms_norm",
    "linear_scan",
    "check_segment_ids",
    "segment_resets",
    "segment_runs",
]

IMPLEMENTATIONS = (None, "pallas", "xla", "reference")
_HI = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Helpers shared by the mixers of this package
# --------------------------------------------------------------------------------------------


def check_heads(num_heads: int, d_model: int, head_dim: int | None) -> int:
    """Validate the head layout; returns the resolved head dim."""
    if d_model <= 0:
        raise ValueError(f"d_model must be positive; got d_model={d_model}")
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive; got num_heads={num_heads}")
    if head_dim is None:
        core.check_divisible(d_model, num_heads, "d_model", "num_heads")
        return d_model // num_heads
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive or None; got head_dim={head_dim}")
    return head_dim


def check_op_options(implementation, chunk_size) -> None:
    core.check_choice(implementation, IMPLEMENTATIONS, "implementation")
    if chunk_size is not None:
        check_chunk_size(chunk_size)


def _dense_cfgs(cfg: Any) -> dict[str, dense.Config]:
    common = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d, w = cfg.d_model, cfg.num_heads * cfg.key_dim
    into = ("embed", "heads")
    return {
        "q": dense.Config(d_in=d, d_out=w, kernel_axes=into, **common),
        "k": dense.Config(d_in=d, d_out=w, kernel_axes=into, **common),
        "v": dense.Config(d_in=d, d_out=w, kernel_axes=into, **common),
        "o": dense.Config(d_in=w, d_out=d, kernel_axes=("heads", "embed"), **common),
    }


def qkv_param_specs(cfg: Any) -> dict[str, Any]:
    """Specs of the q, k, v and o projections of a config with ``d_model``, ``num_heads``,
    ``key_dim``, ``use_bias``, ``dtype`` and ``param_dtype``."""
    return {name: dense.param_specs(c) for name, c in _dense_cfgs(cfg).items()}


def project_qkv(params: core.Params, x: jax.Array, cfg: Any):
    """``x [b, t, d]`` -> ``q, k, v [b, t, h, k]`` in the compute dtype."""
    pc = _dense_cfgs(cfg)
    b, t, _ = x.shape
    shape = (b, t, cfg.num_heads, cfg.key_dim)
    return tuple(dense.apply(params[n], x, pc[n]).reshape(shape) for n in ("q", "k", "v"))


def project_out(params: core.Params, o: jax.Array, cfg: Any) -> jax.Array:
    """``o [b, t, h, k]`` -> ``y [b, t, d]``."""
    b, t = o.shape[:2]
    return dense.apply(params["o"], o.reshape(b, t, -1), _dense_cfgs(cfg)["o"])


def head_rms_norm(scale: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis of ``x [..., k]`` with a learned ``scale [k]``; float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return y * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + scale.shape)


def check_x(x, d_model: int, rank: int, name: str, layout: str) -> None:
    core.check_floating(x, name)
    core.check_rank(x, rank, name, layout)
    core.check_dim(x, -1, d_model, name, "d_model")


def check_segment_ids(segment_ids, batch: int, time: int) -> None:
    """Raise unless ``segment_ids`` is an integer array of shape ``[batch, time]``."""
    if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
        raise TypeError(
            f"segment_ids must have an integer dtype (int32); got {jnp.result_type(segment_ids)}"
        )
    if tuple(jnp.shape(segment_ids)) != (batch, time):
        raise ValueError(
            f"segment_ids must have shape [batch, time] = {(batch, time)}; "
            f"got {jnp.shape(segment_ids)}"
        )


def segment_resets(segment_ids: jax.Array | None) -> jax.Array | None:
    """``[b, t]`` bool: True where a new sequence starts (never at position 0)."""
    if segment_ids is None:
        return None
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def segment_runs(segment_ids: jax.Array | None, batch: int, time: int) -> jax.Array:
    """``[b, t]`` int32 sequence index: 0 for the first run, +1 wherever the id changes."""
    resets = segment_resets(segment_ids)
    if resets is None:
        return jnp.zeros((batch, time), jnp.int32)
    return jnp.cumsum(resets.astype(jnp.int32), axis=1)


def linear_scan(
    x: jax.Array,
    *,
    decay: jax.Array | None = None,
    resets: jax.Array | None = None,
    initial: jax.Array | None = None,
) -> jax.Array:
    """``y_t = a_t y_{t-1} + x_t`` along axis 1 of ``x [b, t, h, f]`` (float32), all ``t``.

    ``a_t = decay[:, t] [b, t, h]`` (1 when None), replaced by 0 where ``resets [b, t]`` is True
    (a new sequence); ``y_{-1} = initial [b, h, f]`` (zero when None). Without decay and resets
    this is ``cumsum``; otherwise a parallel ``lax.associative_scan`` (no cancellation, unlike a
    difference of cumulative sums).
    """
    x = x.astype(jnp.float32)
    b, t, h, _ = x.shape
    if decay is None and resets is None:
        a = None
    else:
        a = jnp.ones((b, t, h), jnp.float32) if decay is None else decay.astype(jnp.float32)
        if resets is not None:
            a = jnp.where(resets[:, :, None], 0.0, a)
        a = a[..., None]
    if initial is not None:
        a0 = 1.0 if a is None else a[:, 0]
        x = x.at[:, 0].add(a0 * initial.astype(jnp.float32))
    if a is None:
        return jnp.cumsum(x, axis=1)

    def combine(left, right):
        a1, x1 = left
        a2, x2 = right
        return a1 * a2, a2 * x1 + x2

    return jax.lax.associative_scan(combine, (a, x), axis=1)[1]


# --------------------------------------------------------------------------------------------
# Config and params
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """Causal linear attention config.

    Attributes:
      d_model: model width ``d``.
      num_heads: heads ``h``.
      head_dim: per-head width ``k`` (keys and values); ``None`` = ``d_model // num_heads``.
      feature_map: a :class:`~jaxlayers.linear_attention.feature_maps.FeatureMap` or its kind
        name ("elu", "relu", "hedgehog", "focused", "norm_aware", "identity").
      normalize: divide by ``phi(q_t) . sum_{s<=t} phi(k_s)`` (needs a non-negative map).
      output_norm: RMSNorm (learned scale) over each head's output before ``W_o``.
      scale: multiplies ``phi(q)``; ``None`` = 1 with ``normalize``, else ``f ** -0.5``.
      eps: added to the denominator and inside the output RMSNorm.
      use_bias: biases on the q, k, v and o projections.
      implementation: the op's ``implementation`` (None, "pallas", "xla", "reference").
      chunk_size: the op's chunk size (None = its default; a power of two >= 16).
      interpret: run the Pallas kernels in interpret mode (CPU tests).
    """

    d_model: int
    num_heads: int
    head_dim: int | None = None
    feature_map: fmaps.FeatureMap | str = "elu"
    normalize: bool = True
    output_norm: bool = False
    scale: float | None = None
    eps: float = 1e-6
    use_bias: bool = False
    implementation: str | None = None
    chunk_size: int | None = None
    interpret: bool = False

    def __post_init__(self):
        object.__setattr__(self, "feature_map", fmaps.as_feature_map(self.feature_map))
        check_heads(self.num_heads, self.d_model, self.head_dim)
        check_op_options(self.implementation, self.chunk_size)
        if self.normalize and not self.feature_map.nonnegative:
            raise ValueError(
                f"normalize=True needs a non-negative feature map; got "
                f"feature_map={self.feature_map.kind!r} (use normalize=False)"
            )
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0; got eps={self.eps}")

    @property
    def key_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def feature_dim(self) -> int:
        return fmaps.output_dim(self.feature_map, self.key_dim)

    @property
    def op_scale(self) -> float:
        if self.scale is not None:
            return float(self.scale)
        return 1.0 if self.normalize else self.feature_dim**-0.5


def param_specs(cfg: Config) -> dict[str, Any]:
    specs = qkv_param_specs(cfg)
    fm_specs = fmaps.param_specs(cfg.feature_map, cfg.num_heads, cfg.key_dim)
    if fm_specs:
        specs["feature_map"] = fm_specs
    if cfg.output_norm:
        specs["out_norm"] = {
            "scale": core.ParamSpec((cfg.key_dim,), core.initializers.ones, (None,))
        }
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def init_state(cfg: Config, batch: int, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """Zero state ``{"kv": [batch, h, f, k], ("z": [batch, h, f])}``, float32 whatever
    ``dtype`` (accepted for the mixer contract: the op keeps float32 states)."""
    del dtype
    h, f, k = cfg.num_heads, cfg.feature_dim, cfg.key_dim
    state = {"kv": jnp.zeros((batch, h, f, k), jnp.float32)}
    if cfg.normalize:
        state["z"] = jnp.zeros((batch, h, f), jnp.float32)
    return state


def _check_state(state, cfg: Config, batch: int, name: str) -> None:
    want = jax.tree.map(jnp.shape, init_state(cfg, batch))
    if not isinstance(state, dict) or set(state) != set(want):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{name} must be a dict with keys {sorted(want)}; got {got}")
    for key, shape in want.items():
        core.check_floating(state[key], f"{name}[{key!r}]")
        if tuple(jnp.shape(state[key])) != shape:
            raise ValueError(
                f"{name}[{key!r}] must have shape {shape}; got {jnp.shape(state[key])}"
            )


# --------------------------------------------------------------------------------------------
# apply / step
# --------------------------------------------------------------------------------------------


def _features(params, q, k, cfg: Config, dtype):
    """phi(q), phi(k) rounded to the compute dtype."""
    fm_params = params.get("feature_map")
    fq = fmaps.apply(cfg.feature_map, fm_params, q, "q").astype(dtype)
    fk = fmaps.apply(cfg.feature_map, fm_params, k, "k").astype(dtype)
    return fq, fk


def _finish(params, num, den, cfg: Config, dtype):
    """Divide by the denominator, output norm, cast to the compute dtype."""
    o = num.astype(jnp.float32)
    if den is not None:
        o = o / (den[..., None] + cfg.eps)
    if cfg.output_norm:
        o = head_rms_norm(params["out_norm"]["scale"].astype(dtype), o, cfg.eps)
    return o.astype(dtype)


def apply(
    params: core.Params,
    x: jax.Array,
    cfg: Config,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    initial_state: dict[str, jax.Array] | None = None,
    return_state: bool = False,
):
    """Causal linear attention over ``x [b, t, d]`` -> ``y [b, t, d]`` (and the state).

    Args:
      segment_ids: int ``[b, t]``; the sums restart wherever the id changes (packed sequences).
      positions: ignored (accepted for the mixer contract).
      initial_state: a state from :func:`init_state` or a previous call.
      return_state: also return the state after the last token.
    """
    del positions
    check_x(x, cfg.d_model, 3, "x", "[batch, time, d_model]")
    b, t, _ = x.shape
    if segment_ids is not None:
        check_segment_ids(segment_ids, b, t)
    if initial_state is not None:
        _check_state(initial_state, cfg, b, "initial_state")
    dtype = core.compute_dtype(cfg, x)
    x = x.astype(dtype)
    q, k, v = project_qkv(params, x, cfg)
    fq, fk = _features(params, q, k, cfg, dtype)
    scale = cfg.op_scale

    num, kv = la_ops.gated_linear_attention(
        fq,
        fk,
        v,
        scale=scale,
        initial_state=None if initial_state is None else initial_state["kv"],
        return_final_state=True,
        segment_ids=segment_ids,
        chunk_size=cfg.chunk_size,
        implementation=cfg.implementation,
        interpret=cfg.interpret,
    )
    state = {"kv": kv}
    den = None
    if cfg.normalize:
        z = linear_scan(
            fk,
            resets=segment_resets(segment_ids),
            initial=None if initial_state is None else initial_state["z"],
        )  # [b, t, h, f]
        fq32 = fq.astype(jnp.float32)
        den = scale * jnp.einsum("bthf,bthf->bth", fq32, z, precision=_HI)
        state["z"] = z[:, -1]
    y = project_out(params, _finish(params, num, den, cfg, dtype), cfg)
    return (y, state) if return_state else y


def step(params: core.Params, state: dict[str, jax.Array], x_t: jax.Array, cfg: Config):
    """Decode one token: ``x_t [b, d]`` -> ``(y_t [b, d], state)``."""
    check_x(x_t, cfg.d_model, 2, "x_t", "[batch, d_model]")
    b = x_t.shape[0]
    _check_state(state, cfg, b, "state")
    dtype = core.compute_dtype(cfg, x_t)
    q, k, v = (a[:, 0] for a in project_qkv(params, x_t.astype(dtype)[:, None], cfg))
    fq, fk = _features(params, q, k, cfg, dtype)
    scale = cfg.op_scale
    num, kv = la_ops.gated_linear_attention_step(fq, fk, v, state=state["kv"], scale=scale)
    new_state = {"kv": kv}
    den = None
    if cfg.normalize:
        z = state["z"].astype(jnp.float32) + fk.astype(jnp.float32)
        den = scale * jnp.sum(fq.astype(jnp.float32) * z, axis=-1)
        new_state["z"] = z
    o = _finish(params, num, den, cfg, dtype)
    y = project_out(params, o[:, None], cfg)[:, 0]
    return y, new_state


core.register_layer(
    "linear_attention",
    Config,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    example=core.Example(
        config=Config(d_model=32, num_heads=4, feature_map="hedgehog", output_norm=True),
        input_shape=(2, 8, 32),
    ),
    kind="mixer",
)

"""Linear-attention mixers with a fixed per-head decay (RetNet, TransNormerLLM / Lightning
Attention-2) and LightNet's additive recurrence, plus the machinery shared with
:mod:`jaxlayers.linear_attention.gated`.

Every mixer here computes, per head, the recurrence of
``pallas_kernels.linear_attention.gated_linear_attention``::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S_t [k, v] (float32)
    o_t = S_t^T (scale q_t)                          o_t [v]

and differs only in how ``q, k, v, g`` are made from ``x`` and how ``o`` becomes ``y``.

**RetNet** ("Retentive Network: A Successor to Transformer for Large Language Models"),
multi-scale retention with one fixed decay per head ``gamma_n = 1 - 2^(-5-n)`` (n = 0..h-1)::

    q, k = rope(x W_q), rope(x W_k)   [b,t,h,k]     v = x W_v, G = x W_g   [b,t,h,v]
    S_t  = gamma_n S_{t-1} + k_t v_t^T;   o_t = S_t^T q_t / sqrt(k)
    y    = (swish(G) * GroupNorm_h(o)) W_o

Choices: value head dim ``2k`` by default (the paper's ``d_v = 2 d_k``); the position rotation
is the project's RoPE (rotate-half, ``use_rope``) instead of the paper's xPos rotation (xPos's
decay part is what ``gamma`` already does); GroupNorm = LayerNorm over each head's ``v`` dims
with a learned per-channel scale and bias. The paper's two extra normalisations (retention
scores divided by ``sqrt(sum decays)`` and by ``max(|row sum|, 1)``) scale each (head, token)
row by a constant, which the GroupNorm removes; they are left out (exact up to its ``eps``).

**Lightning attention** — the NormAttention layer of TransNormerLLM ("TransNormerLLM: A Faster
and Better Large Language Model with Improved TransNormer"), whose kernel is Lightning
Attention-2 ("Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in
Large Language Models"). NormAttention drops the softmax / linear-attention denominator and
normalises the output instead::

    q, k = silu(x W_q), silu(x W_k)   v = x W_v   U = x W_u
    S_t  = lambda_n S_{t-1} + k_t v_t^T;   o_t = S_t^T q_t            (no 1/sqrt(k) scale)
    y    = (SRMSNorm(o) * U) W_o,   SRMSNorm(z) = z / sqrt(mean(z^2) + eps) over all h*v dims

``lambda_n = exp(-s_n (1 - l / (L - 1) + 1e-5))`` with ``s_n`` the ALiBi slopes of ``h`` heads
(``2^(-8(n+1)/h)`` for a power of two) and ``l = layer_index`` of ``L = num_layers``: the
closed form of the public TransNormerLLM code (the paper states the same idea, geometric rates
over heads that shrink with depth, in a slightly different closed form). ``L = 1`` uses the
first-layer rate. TransNormerLLM's LRPE rotation (used in some of its layers) is left out.

**LightNet** ("You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet"),
the additive recurrence: per key channel ``i``, the state is a running average of values
weighted by ``exp(k)``::

    q = silu(x W_q), a = x W_k [b,t,h,k], v = x W_v,   Z_t = sum_{s<=t} exp(a_s)   (per channel)
    S_t = sum_{s<=t} diag(exp(a_s) / Z_t) 1 v_s^T
        = diag(Z_{t-1}/Z_t) S_{t-1} + (exp(a_t)/Z_t) v_t^T    i.e.  g_t = log Z_{t-1} - log Z_t,
                                                                     k_t = exp(a_t - log Z_t)
    o_t = S_t^T q_t / sqrt(k);   y = (RMSNorm(o) * swish(x W_1 W_2)) W_o

``log Z`` is a float32 running log-sum-exp kept in the decode state (``"log_z"``, ``-inf`` when
empty; the first token of a sequence uses ``g = 0`` on the zero state). The low-rank output gate
and the RMSNorm over all ``h*v`` dims follow the public flash-linear-attention layer; LightNet's
multi-dimensional positional encodings (MD-TPE / MD-LRPE) are for images and are left out.

None of the mixers includes the short causal convolution some of these papers put before
``q, k, v``; compose it separately (``jaxlayers.linear_attention.short_conv``).

Shapes: ``x [b, t, d] -> y [b, t, d]``; ``h`` heads of key dim ``k`` and value dim ``v``.
Decode state: a dict with ``"s": [b, h, k, v]`` float32 and the layer's extra entries (RetNet
``"index"`` int32 [], LightNet ``"log_z"`` [b, h, k] float32); it is float32 whatever the compute
dtype (the ``dtype`` argument of ``init_state`` is accepted for the mixer contract and unused).
Projections run in the compute dtype; gates, decays and norms in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayers import core, dense, position
from pallas_kernels.linear_attention import gated_linear_attention, gated_linear_attention_step
from pallas_kernels.linear_attention.block_sizes import check_chunk_size

__all__ = [
    "param_specs",
    "init",
    "apply",
    "step",
    "init_state",
    "LinearMixerConfig",
    "RetNetConfig",
    "LightningConfig",
    "LightNetConfig",
    "retnet_log_decays",
    "alibi_slopes",
    "lightning_log_decays",
    "retnet_apply",
    "retnet_step",
    "lightning_apply",
    "lightning_step",
    "lightnet_apply",
    "lightnet_step",
]

IMPLEMENTATIONS = (None, "pallas", "xla", "reference")
F32 = jnp.float32


# =============================================================================================
# Shared machinery (also used by gated.py)
# =============================================================================================


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearMixerConfig(core.LayerConfig):
    """Fields shared by the linear-attention mixers.

    Attributes:
      d_model: model width ``d``.
      num_heads: heads ``h``.
      key_dim: key / query dim per head ``k``; ``None`` = the layer's default.
      value_dim: value dim per head ``v``; ``None`` = the layer's default.
      implementation: passed to the op: None (auto), "pallas", "xla" or "reference".
      chunk_size: the op's chunk length (power of two >= 16); None = its default.
      interpret: run Pallas kernels in interpret mode (CPU tests).

    Resolved dims: :attr:`dk` and :attr:`dv`.
    """

    d_model: int
    num_heads: int
    key_dim: int | None = None
    value_dim: int | None = None
    implementation: str | None = None
    chunk_size: int | None = None
    interpret: bool = False

    def __post_init__(self):
        if self.d_model <= 0:
            raise ValueError(f"d_model must be positive; got d_model={self.d_model}")
        if self.num_heads <= 0:
            raise ValueError(f"num_heads must be positive; got num_heads={self.num_heads}")
        if self.key_dim is None or self.value_dim is None:
            core.check_divisible(self.d_model, self.num_heads, "d_model", "num_heads")
        for name in ("key_dim", "value_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None; got {name}={value}")
        if self.dk <= 0 or self.dv <= 0:
            raise ValueError(
                f"key_dim and value_dim must resolve to positive sizes; got {self.dk}, {self.dv} "
                f"(d_model={self.d_model}, num_heads={self.num_heads})"
            )
        core.check_choice(self.implementation, IMPLEMENTATIONS, "implementation")
        if self.chunk_size is not None:
            check_chunk_size(self.chunk_size)

    def default_key_dim(self) -> int:
        return self.d_model // self.num_heads

    def default_value_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def dk(self) -> int:
        return self.default_key_dim() if self.key_dim is None else self.key_dim

    @property
    def dv(self) -> int:
        return self.default_value_dim() if self.value_dim is None else self.value_dim


class Features(NamedTuple):
    """What a mixer's input stage hands to the op.

    ``q, k [b, t, h, k]`` and ``v [b, t, h, v]`` in the compute dtype; ``log_decay`` float32
    ``[b, t, h]`` / ``[b, t, h, k]`` or None; ``carry`` the decode-state entries other than
    ``"s"`` after these tokens; ``aux`` whatever the output stage needs.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    log_decay: jax.Array | None
    carry: dict[str, jax.Array]
    aux: Any


# features(params, x [b,t,d] compute dtype, cfg, prev_state or None, segment_ids, positions)
FeatureFn = Callable[..., Features]
# output(params, o [b,t,h,v], aux, cfg) -> y [b,t,d]
OutputFn = Callable[..., jax.Array]


def projection(cfg: LinearMixerConfig, d_in: int, d_out: int, *, into: bool = True, **kw):
    """A bias-free (unless ``use_bias=True``) Dense config in the mixer's dtypes."""
    axes = ("embed", "heads") if into else ("heads", "embed")
    kw.setdefault("use_bias", False)
    return dense.Config(
        d_in=d_in,
        d_out=d_out,
        kernel_axes=kw.pop("kernel_axes", axes),
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        **kw,
    )


def vector_spec(size: int, init=core.initializers.ones, axis: str | None = "heads"):
    return core.ParamSpec((size,), init, (axis,))


def param_f32(p: jax.Array, dtype) -> jax.Array:
    """A parameter rounded to the compute dtype (the dtype policy), then widened to float32."""
    return p.astype(dtype).astype(F32)


def heads(a: jax.Array, h: int) -> jax.Array:
    """``[b, t, h*e] -> [b, t, h, e]``."""
    return a.reshape(*a.shape[:-1], h, a.shape[-1] // h)


def swish(a: jax.Array) -> jax.Array:
    a = a.astype(F32)
    return a * jax.nn.sigmoid(a)


def norm(o: jax.Array, *, per_head: bool, centered: bool, eps: float, scale=None, bias=None):
    """RMSNorm (``centered=False``) or LayerNorm of ``o [b, t, h, v]`` over each head's ``v`` dims
    (``per_head``) or over all ``h*v`` dims; float32 ``[b, t, h*v]``; optional affine."""
    b, t, h, v = o.shape
    z = o.astype(F32)
    if not per_head:
        z = z.reshape(b, t, 1, h * v)
    if centered:
        z = z - jnp.mean(z, axis=-1, keepdims=True)
    z = z * jax.lax.rsqrt(jnp.mean(jnp.square(z), axis=-1, keepdims=True) + eps)
    z = z.reshape(b, t, h * v)
    if scale is not None:
        z = z * scale[None, None, :]
    if bias is not None:
        z = z + bias[None, None, :]
    return z


def segmented_scan(a, segment_ids, init, combine):
    """Inclusive scan of ``a [b, t, ...]`` over time with ``combine`` (associative, e.g.
    ``jnp.logaddexp``), restarting wherever ``segment_ids`` changes; ``init [b, ...]`` or None is
    combined into the first segment. Returns ``(cum, prev)``: ``prev[:, i]`` is the value before
    token ``i`` of its sequence (``cum[:, i-1]``, ``init`` or ``-inf`` at a fresh start)."""
    b, t = a.shape[:2]
    bcast = (b, t) + (1,) * (a.ndim - 2)
    if segment_ids is None:
        reset = jnp.zeros(bcast, bool)
    else:
        change = segment_ids[:, 1:] != segment_ids[:, :-1]
        reset = jnp.concatenate([jnp.zeros((b, 1), bool), change], axis=1).reshape(bcast)
    if init is not None:
        a = jnp.concatenate([combine(init[:, None], a[:, :1]), a[:, 1:]], axis=1)

    def op(left, right):
        (fl, vl), (fr, vr) = left, right
        return fl | fr, jnp.where(fr, vr, combine(vl, vr))

    _, cum = jax.lax.associative_scan(op, (jnp.broadcast_to(reset, a.shape), a), axis=1)
    first = jnp.full_like(a[:, :1], -jnp.inf) if init is None else init[:, None]
    prev = jnp.concatenate([first, cum[:, :-1]], axis=1)
    prev = jnp.where(reset, -jnp.inf, prev)
    return cum, prev


def log_ratio(prev, cur):
    """``prev - cur`` (a log decay <= 0), and 0 where ``prev`` is ``-inf`` (fresh sequence)."""
    return jnp.minimum(jnp.where(jnp.isneginf(prev), 0.0, prev - cur), 0.0)


def _check_int_bt(a, name: str, b: int, t: int) -> None:
    if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
        raise TypeError(f"{name} must have an integer dtype (int32); got {jnp.result_type(a)}")
    if tuple(jnp.shape(a)) != (b, t):
        raise ValueError(f"{name} must have shape (batch, time) = {(b, t)}; got {jnp.shape(a)}")


def check_state(state: Any, name: str, want: Mapping[str, Any]) -> None:
    """``state`` must be a dict with the keys and shapes of ``init_state`` (``want``)."""
    if not isinstance(state, Mapping) or set(state) != set(want):
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"{name} must be a dict with keys {sorted(want)} (see init_state); got {got}"
        )
    for key, w in want.items():
        if tuple(jnp.shape(state[key])) != tuple(w.shape):
            raise ValueError(
                f"{name}[{key!r}] must have shape {tuple(w.shape)}; got {jnp.shape(state[key])}"
            )


def run_mixer(
    features: FeatureFn,
    output: OutputFn,
    state_fn: Callable[..., dict[str, jax.Array]],
    scale: float,
    params: core.Params,
    x: jax.Array,
    cfg: LinearMixerConfig,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    initial_state: dict[str, jax.Array] | None = None,
    return_state: bool = False,
):
    """The mixer contract's ``apply`` around one layer's ``features`` and ``output`` stages."""
    core.check_floating(x, "x")
    core.check_rank(x, 3, "x", "[batch, time, d_model]")
    core.check_dim(x, -1, cfg.d_model, "x", "d_model")
    b, t, _ = x.shape
    if segment_ids is not None:
        _check_int_bt(segment_ids, "segment_ids", b, t)
    if positions is not None:
        _check_int_bt(positions, "positions", b, t)
    if initial_state is not None:
        check_state(initial_state, "initial_state", jax.eval_shape(lambda: state_fn(cfg, b)))
    dtype = core.compute_dtype(cfg, x)
    f = features(params, x.astype(dtype), cfg, initial_state, segment_ids, positions)
    out = gated_linear_attention(
        f.q,
        f.k,
        f.v,
        f.log_decay,
        scale=scale,
        initial_state=None if initial_state is None else initial_state["s"],
        return_final_state=return_state,
        segment_ids=segment_ids,
        chunk_size=cfg.chunk_size,
        implementation=cfg.implementation,
        interpret=cfg.interpret,
    )
    o, s = out if return_state else (out, None)
    y = output(params, o, f.aux, cfg).astype(dtype)
    return (y, {"s": s, **f.carry}) if return_state else y


def step_mixer(features, output, state_fn, scale, params, state, x_t, cfg):
    """The mixer contract's ``step``: ``x_t [b, d] -> (y_t [b, d], state)``."""
    core.check_floating(x_t, "x_t")
    core.check_rank(x_t, 2, "x_t", "[batch, d_model]")
    core.check_dim(x_t, -1, cfg.d_model, "x_t", "d_model")
    b = x_t.shape[0]
    check_state(state, "state", jax.eval_shape(lambda: state_fn(cfg, b)))
    dtype = core.compute_dtype(cfg, x_t)
    f = features(params, x_t[:, None].astype(dtype), cfg, state, None, None)
    g = None if f.log_decay is None else f.log_decay[:, 0]
    o, s = gated_linear_attention_step(
        f.q[:, 0], f.k[:, 0], f.v[:, 0], g, state=state["s"], scale=scale
    )
    y = output(params, o[:, None], f.aux, cfg)[:, 0].astype(dtype)
    return y, {"s": s, **f.carry}


def mixer_fns(features: FeatureFn, output: OutputFn, scale: Callable, state_fn: Callable, doc: str):
    """``(apply, step)`` of one mixer from its stages; ``scale(cfg)`` is the op's ``scale``."""

    def apply(params, x, cfg, **kwargs):
        return run_mixer(features, output, state_fn, scale(cfg), params, x, cfg, **kwargs)

    def step(params, state, x_t, cfg):
        return step_mixer(features, output, state_fn, scale(cfg), params, state, x_t, cfg)

    apply.__doc__ = doc + "\n\nThe mixer contract's ``apply`` (see the module docstring)."
    step.__doc__ = "One decoding step: ``x_t [b, d] -> (y_t [b, d], state)``."
    return apply, step


def inv_sqrt_key_dim(cfg: LinearMixerConfig) -> float:
    return cfg.dk**-0.5


def proj(params, name: str, x: jax.Array, cfg: LinearMixerConfig, d_out: int, **kw):
    """``dense.apply`` of ``params[name]`` (a :func:`projection`) to ``x [..., d_in]``."""
    return dense.apply(params[name], x, projection(cfg, x.shape[-1], d_out, **kw))


def project_out(params, y: jax.Array, cfg: LinearMixerConfig) -> jax.Array:
    """The output projection ``params["o"]``: ``[b, t, h*v] -> [b, t, d]``."""
    return proj(params, "o", y, cfg, cfg.d_model, into=False)


def init_state(cfg: LinearMixerConfig, batch: int, dtype: Any = F32) -> dict[str, jax.Array]:
    """The empty decode state of any mixer in this module (``dtype`` unused: states are float32)."""
    del dtype
    state = {"s": jnp.zeros((batch, cfg.num_heads, cfg.dk, cfg.dv), F32)}
    if isinstance(cfg, RetNetConfig):
        state["index"] = jnp.zeros((), jnp.int32)
    elif isinstance(cfg, LightNetConfig):
        state["log_z"] = jnp.full((batch, cfg.num_heads, cfg.dk), -jnp.inf, F32)
    return state


# param_specs / init / apply / step of whichever registered mixer a config configures.
param_specs, init, apply, step = core.param_specs, core.init, core.apply, core.step


def _broadcast_decay(log_decay: np.ndarray, b: int, t: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(log_decay, F32)[None, None, :], (b, t, log_decay.size))


# =============================================================================================
# RetNet
# =============================================================================================


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetNetConfig(LinearMixerConfig):
    """RetNet multi-scale retention. ``key_dim`` defaults to ``d_model // num_heads`` and
    ``value_dim`` to twice that.

    Attributes:
      use_rope: rotate q and k (RoPE, rotate-half) by position; needs an even ``key_dim``.
      rope_theta: RoPE base.
      norm_eps: GroupNorm epsilon.
    """

    use_rope: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if self.use_rope and self.dk % 2:
            raise ValueError(f"key_dim must be even with use_rope=True; got {self.dk}")

    def default_value_dim(self) -> int:
        return 2 * (self.d_model // self.num_heads)


def retnet_log_decays(num_heads: int) -> np.ndarray:
    """``log(1 - 2^(-5-n))`` for n = 0..h-1 (float64)."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads, dtype=np.float64))))


def _retnet_specs(cfg: RetNetConfig) -> dict[str, Any]:
    d, hk, hv = cfg.d_model, cfg.num_heads * cfg.dk, cfg.num_heads * cfg.dv
    return {
        "q": dense.param_specs(projection(cfg, d, hk)),
        "k": dense.param_specs(projection(cfg, d, hk)),
        "v": dense.param_specs(projection(cfg, d, hv)),
        "g": dense.param_specs(projection(cfg, d, hv)),
        "o": dense.param_specs(projection(cfg, hv, d, into=False)),
        "norm": {"scale": vector_spec(hv), "bias": vector_spec(hv, core.initializers.zeros)},
    }


def _retnet_features(params, x, cfg: RetNetConfig, prev, segment_ids, positions) -> Features:
    del segment_ids
    b, t, d = x.shape
    h = cfg.num_heads
    q = heads(proj(params, "q", x, cfg, h * cfg.dk), h)
    k = heads(proj(params, "k", x, cfg, h * cfg.dk), h)
    v = heads(proj(params, "v", x, cfg, h * cfg.dv), h)
    gate = proj(params, "g", x, cfg, h * cfg.dv)
    index = jnp.zeros((), jnp.int32) if prev is None else prev["index"].astype(jnp.int32)
    if cfg.use_rope:
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        q = position.apply_rope(q, positions, cfg.rope_theta)
        k = position.apply_rope(k, positions, cfg.rope_theta)
    log_decay = _broadcast_decay(retnet_log_decays(h), b, t)
    return Features(q, k, v, log_decay, {"index": index + t}, gate)


def _retnet_output(params, o, gate, cfg: RetNetConfig):
    dtype = gate.dtype
    p = params["norm"]
    y = norm(
        o,
        per_head=True,
        centered=True,
        eps=cfg.norm_eps,
        scale=param_f32(p["scale"], dtype),
        bias=param_f32(p["bias"], dtype),
    )
    y = (swish(gate) * y).astype(dtype)
    return project_out(params, y, cfg)


retnet_apply, retnet_step = mixer_fns(
    _retnet_features,
    _retnet_output,
    inv_sqrt_key_dim,
    init_state,
    """RetNet retention over ``x [b, t, d]``.

    ``positions [b, t]`` (int) override the RoPE positions (default ``index + arange(t)`` with
    ``index`` the number of tokens already in ``initial_state``); with ``segment_ids`` positions
    need not restart (RoPE makes scores depend on position differences only).""",
)


# =============================================================================================
# TransNormerLLM NormAttention / Lightning Attention-2
# =============================================================================================


@dataclasses.dataclass(frozen=True, kw_only=True)
class LightningConfig(LinearMixerConfig):
    """TransNormerLLM NormAttention with Lightning Attention-2's fixed per-head decay.

    Attributes:
      layer_index: ``l``, this layer's index in the stack (sets the decay schedule).
      num_layers: ``L``, layers in the stack.
      norm_eps: SRMSNorm epsilon.
    """

    layer_index: int = 0
    num_layers: int = 1
    norm_eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if self.num_layers <= 0 or not 0 <= self.layer_index < self.num_layers:
            raise ValueError(
                f"layer_index must be in [0, num_layers={self.num_layers}); "
                f"got layer_index={self.layer_index}"
            )


def alibi_slopes(n: int) -> np.ndarray:
    """ALiBi head slopes: ``2^(-8(i+1)/n)`` for a power of two ``n``; otherwise those of the
    nearest lower power of two followed by every other slope of the next power (float64)."""

    def pow2(m: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / m) for i in range(m)]

    p = 2 ** int(math.floor(math.log2(n)))
    slopes = pow2(p) if p == n else pow2(p) + pow2(2 * p)[0::2][: n - p]
    return np.asarray(slopes, np.float64)


def lightning_log_decays(num_heads: int, layer_index: int = 0, num_layers: int = 1) -> np.ndarray:
    """``log lambda_n = -s_n (1 - l/(L-1) + 1e-5)`` (``L = 1``: the first-layer rate)."""
    depth = layer_index / (num_layers - 1) if num_layers > 1 else 0.0
    return -alibi_slopes(num_heads) * (1.0 - depth + 1e-5)


def _lightning_specs(cfg: LightningConfig) -> dict[str, Any]:
    d, hk, hv = cfg.d_model, cfg.num_heads * cfg.dk, cfg.num_heads * cfg.dv
    return {
        "q": dense.param_specs(projection(cfg, d, hk)),
        "k": dense.param_specs(projection(cfg, d, hk)),
        "v": dense.param_specs(projection(cfg, d, hv)),
        "u": dense.param_specs(projection(cfg, d, hv)),
        "o": dense.param_specs(projection(cfg, hv, d, into=False)),
    }


def _lightning_features(params, x, cfg: LightningConfig, prev, segment_ids, positions):
    del prev, segment_ids, positions
    b, t, d = x.shape
    h = cfg.num_heads
    q = swish(proj(params, "q", x, cfg, h * cfg.dk)).astype(x.dtype)
    k = swish(proj(params, "k", x, cfg, h * cfg.dk)).astype(x.dtype)
    v = proj(params, "v", x, cfg, h * cfg.dv)
    u = proj(params, "u", x, cfg, h * cfg.dv)
    log_decay = _broadcast_decay(lightning_log_decays(h, cfg.layer_index, cfg.num_layers), b, t)
    return Features(heads(q, h), heads(k, h), heads(v, h), log_decay, {}, u)


def _lightning_output(params, o, u, cfg: LightningConfig):
    y = norm(o, per_head=False, centered=False, eps=cfg.norm_eps) * u.astype(F32)
    y = y.astype(u.dtype)
    return project_out(params, y, cfg)


lightning_apply, lightning_step = mixer_fns(
    _lightning_features,
    _lightning_output,
    lambda cfg: 1.0,
    init_state,
    "TransNormerLLM NormAttention over ``x [b, t, d]``; ``positions`` are ignored.",
)


# =============================================================================================
# LightNet
# =============================================================================================


@dataclasses.dataclass(frozen=True, kw_only=True)
class LightNetConfig(LinearMixerConfig):
    """LightNet additive recurrence.

    Attributes:
      gate_low_rank: rank ``r`` of the output gate ``swish(x W_1 W_2)``.
      norm_eps: RMSNorm epsilon.
    """

    gate_low_rank: int = 128
    norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if self.gate_low_rank <= 0:
            raise ValueError(f"gate_low_rank must be positive; got {self.gate_low_rank}")


def _lightnet_specs(cfg: LightNetConfig) -> dict[str, Any]:
    d, hk, hv, r = cfg.d_model, cfg.num_heads * cfg.dk, cfg.num_heads * cfg.dv, cfg.gate_low_rank
    return {
        "q": dense.param_specs(projection(cfg, d, hk)),
        "k": dense.param_specs(projection(cfg, d, hk)),
        "v": dense.param_specs(projection(cfg, d, hv)),
        "gate_down": dense.param_specs(projection(cfg, d, r, kernel_axes=("embed", None))),
        "gate_up": dense.param_specs(projection(cfg, r, hv, kernel_axes=(None, "heads"))),
        "norm": {"scale": vector_spec(hv)},
        "o": dense.param_specs(projection(cfg, hv, d, into=False)),
    }


def _lightnet_features(params, x, cfg: LightNetConfig, prev, segment_ids, positions):
    del positions
    h, r = cfg.num_heads, cfg.gate_low_rank
    q = swish(proj(params, "q", x, cfg, h * cfg.dk)).astype(x.dtype)
    a = heads(proj(params, "k", x, cfg, h * cfg.dk), h).astype(F32)
    v = proj(params, "v", x, cfg, h * cfg.dv)
    log_z, prev_z = segmented_scan(
        a, segment_ids, None if prev is None else prev["log_z"], jnp.logaddexp
    )
    k = jnp.exp(a - log_z).astype(x.dtype)
    low = proj(params, "gate_down", x, cfg, r, kernel_axes=("embed", None))
    gate = proj(params, "gate_up", low, cfg, h * cfg.dv)
    return Features(
        heads(q, h), k, heads(v, h), log_ratio(prev_z, log_z), {"log_z": log_z[:, -1]}, gate
    )


def _lightnet_output(params, o, gate, cfg: LightNetConfig):
    scale = param_f32(params["norm"]["scale"], gate.dtype)
    y = norm(o, per_head=False, centered=False, eps=cfg.norm_eps, scale=scale) * swish(gate)
    y = y.astype(gate.dtype)
    return project_out(params, y, cfg)


lightnet_apply, lightnet_step = mixer_fns(
    _lightnet_features,
    _lightnet_output,
    inv_sqrt_key_dim,
    init_state,
    "LightNet over ``x [b, t, d]``; ``positions`` are ignored.",
)


# =============================================================================================
# Registration
# =============================================================================================

_EXAMPLE = dict(d_model=16, num_heads=2, chunk_size=16)
_LAYERS = (
    ("retnet", RetNetConfig(**_EXAMPLE), _retnet_specs, retnet_apply, retnet_step),
    (
        "lightning_attention",
        LightningConfig(layer_index=1, num_layers=4, **_EXAMPLE),
        _lightning_specs,
        lightning_apply,
        lightning_step,
    ),
    (
        "lightnet",
        LightNetConfig(gate_low_rank=4, **_EXAMPLE),
        _lightnet_specs,
        lightnet_apply,
        lightnet_step,
    ),
)
for _name, _cfg, _specs, _apply, _step in _LAYERS:
    core.register_layer(
        _name,
        type(_cfg),
        param_specs=_specs,
        apply=_apply,
        init_state=init_state,
        step=_step,
        example=core.Example(config=_cfg, input_shape=(2, 8, 16)),
        kind="mixer",
    )

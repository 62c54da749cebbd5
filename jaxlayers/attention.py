"""Multi-head softmax attention with grouped-query heads, RoPE and a KV cache.

From "Attention Is All You Need" (scaled dot-product attention), "GQA: Training Generalized
Multi-Query Transformer Models from Multi-Head Checkpoints" (``num_kv_heads < num_heads``) and
"RoFormer" (rotary positions). Query head ``n`` (of ``h``) reads KV head ``j = n // (h / g)``:

    q = x W_q   [b, t, h, k]        k = x W_k, v = x W_v   [b, t, g, k]
    q, k = rope(qk_norm(q)), rope(qk_norm(k))                    (each optional)
    o_n  = softmax(q_n k_j^T / sqrt(k) + mask) v_j                 [b, t, h, k]
    y    = concat_n(o_n) W_o                                       [b, t, d]

The mask allows key ``s`` for query ``t`` when ``s <= t`` (``causal``) and, with ``segment_ids``,
when both lie in the same segment (packed sequences). Logits and softmax are float32; the
projections run in the compute dtype.

Params (each ``{"kernel": ..., "bias": ...}``, bias only with ``use_bias``):
``"q"`` ``[d, h*k]``, ``"k"``/``"v"`` ``[d, g*k]`` with axes ``("embed", "heads")``; ``"o"``
``[h*k, d]`` with axes ``("heads", "embed")``; with ``qk_norm`` also ``"q_norm"``/``"k_norm"``
``{"scale": [k]}`` (an RMSNorm over each head, applied before RoPE as in OLMo-2 / Qwen-3).

Implementations (``cfg.implementation``), all computing the same function:
  "xla"        ``jax.nn.dot_product_attention(..., implementation="xla")``. Under
               ``jax_numpy_dtype_promotion="strict"`` its bf16 *backward* fails to lower in
               JAX 0.10.2 (a float32 x bf16 dot in its transpose); differentiate bf16 under
               ``jax.numpy_dtype_promotion("standard")``. Forward and float32 are unaffected.
  "reference"  an explicit einsum / float32 softmax / einsum, the ground truth in tests.
  "cudnn"      ``jax.nn.dot_product_attention(..., implementation="cudnn")`` — GPU only, bf16 or
               f16 compute dtype; raises ``NotImplementedError`` on other backends. Steps that
               read a KV cache use the "xla" path (one query row gains nothing from cuDNN).

Positions: by default token ``i`` of a call sits at position ``i`` (or ``index + i`` when
continuing from a cache). With ``segment_ids`` the positions are *not* restarted per segment:
RoPE makes logits depend only on position differences, and attention never crosses a segment,
so the result is the same up to rounding. Pass ``positions=`` to override.

The sequence-mixer contract (followed by the decoder LM and every mixer in
``jaxlayers.linear_attention``):

    y = apply(params, x [b, t, d], cfg, *, segment_ids=None, positions=None,
              initial_state=None, return_state=False)          -> y or (y, state)
    state = init_state(cfg, batch, dtype)                      -> the empty decode state
    y_t, state = step(params, state, x_t [b, d], cfg)          -> one token

``apply(..., return_state=True)`` returns the state after the last token, and ``initial_state=``
continues from one, so ``apply`` on a prompt followed by ``step`` per token equals ``apply`` on
the whole sequence. Mixers without positions accept ``positions=`` and ignore it; mixers that
cannot honour ``segment_ids`` raise. For softmax attention the state is the KV cache
``{"k": [b, max_decode_len, g, k], "v": [b, max_decode_len, g, k], "index": int32 []}``, where
``index`` is the number of filled slots (shared by the batch). Writes past ``max_decode_len``
are clamped by ``lax.dynamic_update_slice`` and silently overwrite the last slots; keep
``prompt + generated <= max_decode_len``. ``segment_ids`` cannot be combined with a cache.

Sequence parallelism: inside a ``jax.shard_map`` body traced under
``pallas_kernels.linear_attention.sequence_context.sequence_parallel_axis(axis)``, ``x`` is this
shard's block ``[s T_loc, (s + 1) T_loc)`` of a sequence split along time over the mesh axis
``axis``. The layer then all-gathers the (rotated) keys and values, and the segment ids, over
``axis`` (``[b, n T_loc, g, k]`` per device), keeps its local queries, and masks with global
positions: query ``i`` sits at ``s T_loc + i`` (also the default RoPE position), key ``j`` at
``j``; with the context's ``length`` keys at ``j >= length`` (end padding) are masked too. The
result equals the slice of the unsharded layer's output. Causal shards compute the full
``T_loc x n T_loc`` logits (about half of them masked; ring attention would skip those blocks at
the cost of ``n - 1`` sequential exchanges). The backward of the all-gather is a
reduce-scatter of the key/value gradients. A KV cache (``initial_state`` / ``return_state``) is
not supported there (``NotImplementedError``): decoding is not sequence-parallel.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxlayers import core, dense, position
from pallas_kernels.linear_attention import sequence_context

__all__ = ["Config", "param_specs", "init", "apply", "init_state", "step", "attention_weights"]

IMPLEMENTATIONS = ("xla", "reference", "cudnn")
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """Attention config.

    Attributes:
      d_model: model width ``d``.
      num_heads: query heads ``h``.
      num_kv_heads: key/value heads ``g`` (GQA; ``h % g == 0``); ``None`` = ``num_heads``.
      head_dim: per-head width ``k``; ``None`` = ``d_model // num_heads``.
      use_rope: rotate q and k with RoPE (rotate-half convention, see ``position``).
      rope_theta: RoPE base.
      causal: mask future keys.
      implementation: "xla", "reference" or "cudnn" (see the module docstring).
      max_decode_len: KV-cache length for ``init_state`` / ``return_state``.
      qk_norm: RMSNorm (with a learned scale) on every q and k head before RoPE.
      use_bias: biases on the q, k, v and o projections.

    Resolved values: :attr:`kv_heads` and :attr:`key_dim`.
    """

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    use_rope: bool = True
    rope_theta: float = 10000.0
    causal: bool = True
    implementation: str = "xla"
    max_decode_len: int = 2048
    qk_norm: bool = False
    use_bias: bool = False

    def __post_init__(self):
        if self.num_heads <= 0:
            raise ValueError(f"num_heads must be positive; got num_heads={self.num_heads}")
        if self.head_dim is None:
            core.check_divisible(self.d_model, self.num_heads, "d_model", "num_heads")
        core.check_divisible(self.num_heads, self.kv_heads, "num_heads", "num_kv_heads")
        core.check_choice(self.implementation, IMPLEMENTATIONS, "implementation")
        if self.use_rope and self.key_dim % 2:
            raise ValueError(f"head_dim must be even with use_rope=True; got {self.key_dim}")
        if self.max_decode_len <= 0:
            raise ValueError(f"max_decode_len must be positive; got {self.max_decode_len}")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def key_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim


def _proj_cfgs(cfg: Config) -> dict[str, dense.Config]:
    common = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d, qw, kw = cfg.d_model, cfg.num_heads * cfg.key_dim, cfg.kv_heads * cfg.key_dim
    into = ("embed", "heads")
    return {
        "q": dense.Config(d_in=d, d_out=qw, kernel_axes=into, **common),
        "k": dense.Config(d_in=d, d_out=kw, kernel_axes=into, **common),
        "v": dense.Config(d_in=d, d_out=kw, kernel_axes=into, **common),
        "o": dense.Config(d_in=qw, d_out=d, kernel_axes=("heads", "embed"), **common),
    }


def param_specs(cfg: Config) -> dict[str, dict[str, core.ParamSpec]]:
    specs = {name: dense.param_specs(c) for name, c in _proj_cfgs(cfg).items()}
    if cfg.qk_norm:
        for name in ("q_norm", "k_norm"):
            specs[name] = {"scale": core.ParamSpec((cfg.key_dim,), core.initializers.ones, (None,))}
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def init_state(cfg: Config, batch: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Empty KV cache: ``{"k", "v": [batch, max_decode_len, g, k], "index": int32 0}``."""
    shape = (batch, cfg.max_decode_len, cfg.kv_heads, cfg.key_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "index": jnp.zeros((), jnp.int32),
    }


# ------------------------------------------------------------------------------------------
# Attention cores: q [b, t, h, k], k/v [b, s, g, k], mask None or bool [b|1, 1, t, s]
# ------------------------------------------------------------------------------------------


def attention_weights(q, k, mask, causal: bool) -> jax.Array:
    """Float32 softmax weights ``[b, g, h/g, t, s]`` of the reference path."""
    b, t, h, dk = q.shape
    g = k.shape[2]
    qg = q.reshape(b, t, g, h // g, dk)
    logits = jnp.einsum("btgrk,bsgk->bgrts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1.0 / math.sqrt(dk))
    s = k.shape[1]
    allowed = jnp.ones((1, 1, 1, t, s), bool)
    if causal:
        allowed = allowed & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None, None, None]
    if mask is not None:
        allowed = allowed & mask[:, :, None]  # [b|1, 1, 1, t, s]
    logits = jnp.where(allowed, logits, _MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1)


def _reference(q, k, v, mask, causal):
    b, t, h, dk = q.shape
    probs = attention_weights(q, k, mask, causal).astype(v.dtype)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs, v)
    return out.reshape(b, t, h, dk)


def _attend(q, k, v, mask, causal, implementation):
    if implementation == "reference":
        return _reference(q, k, v, mask, causal)
    # jax.nn.dot_product_attention promotes bf16 with float32 internally, which the strict
    # promotion mode (used in our tests, and by some users) rejects; the promotion is intended.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=causal, implementation=implementation
        )


def _check_cudnn(dtype) -> None:
    from pallas_kernels import _platform

    if _platform.backend() != "gpu":
        raise NotImplementedError(
            "implementation='cudnn' needs a GPU backend; got backend "
            f"{jax.default_backend()!r} (use implementation='xla' or 'reference')"
        )
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(
            "implementation='cudnn' needs compute dtype bfloat16 or float16 (cfg.dtype); "
            f"got {jnp.dtype(dtype)}"
        )


def _check_int_bt(a, name: str, b: int, t: int) -> None:
    if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
        raise TypeError(f"{name} must have an integer dtype (int32); got {jnp.result_type(a)}")
    if tuple(jnp.shape(a)) != (b, t):
        raise ValueError(f"{name} must have shape (batch, time) = {(b, t)}; got {jnp.shape(a)}")


# ------------------------------------------------------------------------------------------
# apply / step
# ------------------------------------------------------------------------------------------


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
    """Attention over ``x: [b, t, d_model]`` -> ``[b, t, d_model]`` (and the cache).

    Args:
      segment_ids: int ``[b, t]``; tokens attend only within their segment.
      positions: int ``[b, t]`` RoPE positions (default ``arange(t)``, offset by the cache index).
      initial_state: a KV cache from :func:`init_state` / a previous call; the new keys are
        written at ``index`` and the queries attend to every filled slot.
      return_state: also return the cache after this call.
    """
    core.check_floating(x, "x")
    core.check_rank(x, 3, "x", "[batch, time, d_model]")
    core.check_dim(x, -1, cfg.d_model, "x", "d_model")
    b, t, _ = x.shape
    dtype = core.compute_dtype(cfg, x)
    if cfg.implementation == "cudnn":
        _check_cudnn(dtype)
    if segment_ids is not None:
        _check_int_bt(segment_ids, "segment_ids", b, t)
        if initial_state is not None or return_state:
            raise ValueError(
                "segment_ids cannot be combined with a KV cache (initial_state / return_state); "
                "expected segment_ids=None when decoding"
            )
    if positions is not None:
        _check_int_bt(positions, "positions", b, t)
    if initial_state is None and return_state and t > cfg.max_decode_len:
        raise ValueError(
            f"x.shape[1] (time) must be <= max_decode_len={cfg.max_decode_len} to return a KV "
            f"cache; got {t}"
        )

    shard = sequence_context.current()
    if shard is not None and (initial_state is not None or return_state):
        raise NotImplementedError(
            "attention: a KV cache (initial_state / return_state) is not supported under "
            f"sequence_parallel_axis({shard.axis_name!r}); decode without sequence parallelism"
        )

    x = x.astype(dtype)
    pcfg = _proj_cfgs(cfg)
    h, g, dk = cfg.num_heads, cfg.kv_heads, cfg.key_dim
    q = dense.apply(params["q"], x, pcfg["q"]).reshape(b, t, h, dk)
    k = dense.apply(params["k"], x, pcfg["k"]).reshape(b, t, g, dk)
    v = dense.apply(params["v"], x, pcfg["v"]).reshape(b, t, g, dk)

    if cfg.qk_norm:
        q, k = _head_rms_norm(params["q_norm"], q), _head_rms_norm(params["k_norm"], k)

    index = None if initial_state is None else initial_state["index"].astype(jnp.int32)
    if cfg.use_rope:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
            if index is not None:
                positions = positions + index
            elif shard is not None:  # global positions of this shard's tokens
                positions = positions + sequence_context.time_offset(t, shard)
        q = position.apply_rope(q, positions, cfg.rope_theta)
        k = position.apply_rope(k, positions, cfg.rope_theta)

    if shard is not None:
        out = _attend_sequence_shard(q, k, v, segment_ids, cfg, shard)
        state = None
    elif initial_state is None:
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [b,1,t,t]
        out = _attend(q, k, v, mask, cfg.causal, cfg.implementation)
        state = None
        if return_state:
            state = init_state(cfg, b, dtype)
            state = {
                "k": jax.lax.dynamic_update_slice(state["k"], k, (0, 0, 0, 0)),
                "v": jax.lax.dynamic_update_slice(state["v"], v, (0, 0, 0, 0)),
                "index": jnp.asarray(t, jnp.int32),
            }
    else:
        cache_k, cache_v = initial_state["k"], initial_state["v"]
        zero = jnp.zeros((), jnp.int32)
        start = (zero, index, zero, zero)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
        s = cache_k.shape[1]
        q_pos = index + jnp.arange(t, dtype=jnp.int32)
        kv_pos = jnp.arange(s, dtype=jnp.int32)
        if cfg.causal:
            mask = kv_pos[None, :] <= q_pos[:, None]
        else:
            mask = jnp.broadcast_to(kv_pos[None, :] < index + t, (t, s))
        impl = "reference" if cfg.implementation == "reference" else "xla"
        out = _attend(
            q, cache_k.astype(dtype), cache_v.astype(dtype), mask[None, None], False, impl
        )
        state = {"k": cache_k, "v": cache_v, "index": index + t}

    y = dense.apply(params["o"], out.reshape(b, t, h * dk), pcfg["o"])
    return (y, state) if return_state else y


def _attend_sequence_shard(q, k, v, segment_ids, cfg: Config, shard) -> jax.Array:
    """Local queries against the keys / values all-gathered over the sequence axis."""
    axis, t = shard.axis_name, q.shape[1]
    k_all = jax.lax.all_gather(k, axis, axis=1, tiled=True)  # [b, n t, g, k]
    v_all = jax.lax.all_gather(v, axis, axis=1, tiled=True)
    s = k_all.shape[1]
    q_pos = sequence_context.time_offset(t, shard) + jnp.arange(t, dtype=jnp.int32)
    kv_pos = jnp.arange(s, dtype=jnp.int32)
    allowed = jnp.ones((t, s), bool)
    if cfg.causal:
        allowed = kv_pos[None, :] <= q_pos[:, None]
    if shard.length is not None and shard.length < s:
        allowed = allowed & (kv_pos < shard.length)[None, :]
    mask = allowed[None, None]  # [1, 1, t, s]
    if segment_ids is not None:
        seg_all = jax.lax.all_gather(segment_ids, axis, axis=1, tiled=True)  # [b, s]
        mask = mask & (segment_ids[:, :, None] == seg_all[:, None, :])[:, None]
    return _attend(q, k_all, v_all, mask, False, cfg.implementation)


def _head_rms_norm(params, x, eps: float = 1e-6):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    scale = params["scale"].astype(x.dtype).astype(jnp.float32)
    return (y * scale[None, None, None, :]).astype(x.dtype)


def step(params: core.Params, state: dict[str, jax.Array], x_t: jax.Array, cfg: Config):
    """Decode one token: ``x_t: [b, d_model]`` -> ``(y_t [b, d_model], state)``."""
    core.check_rank(x_t, 2, "x_t", "[batch, d_model]")
    y, state = apply(params, x_t[:, None, :], cfg, initial_state=state, return_state=True)
    return y[:, 0], state


core.register_layer(
    "attention",
    Config,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    example=core.Example(
        config=Config(d_model=32, num_heads=4, num_kv_heads=2, max_decode_len=16),
        input_shape=(2, 8, 32),
    ),
    kind="mixer",
)

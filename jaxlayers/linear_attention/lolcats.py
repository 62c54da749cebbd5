"""LoLCATs attention: sliding-window softmax + linear attention under one normaliser.

From "LoLCATs: On Low-Rank Linearizing of Large Language Models" (Zhang et al.). Each query
``i`` attends with softmax weights to the ``w`` most recent tokens (itself included) and with
linear-attention weights (a Hedgehog feature map ``φ``) to every older token; both share one
normaliser:

    a_ij = exp(q_i·k_j / sqrt(k) - m_i)              for i - w < j <= i   (the window)
    m_i  = max_{i - w < j <= i} q_i·k_j / sqrt(k)
    y_i  = [ f Σ_win a_ij v_j + (1 - f) Σ_{j <= i-w} φ_q(q_i)·φ_k(k_j) v_j ]
           / [ f Σ_win a_ij     + (1 - f) Σ_{j <= i-w} φ_q(q_i)·φ_k(k_j)     ]

with ``f = sigmoid(γ_h)`` a learned per-head mix factor, then ``out = y θ_O``. With ``w >= T`` no
token is outside the window and ``y`` is exactly softmax attention (``f`` cancels).

Choices (documented; the paper leaves them open or they follow the authors' code):
  * ``m_i`` (the window's max logit) is part of the function, not only a numerical device: the
    linear terms are not multiplied by ``exp(-m_i)`` (as in the authors' implementation), so
    the window terms are on a ``[0, 1]`` scale.
  * the mix factor weights the window by ``f`` and the linear part by ``1 - f``; ``γ`` starts at
    0 (``f = 1/2``).
  * Hedgehog feature maps, separate for queries and keys, one ``[k, f_dim]`` matrix per head:
    ``φ(x) = [softmax(x W), softmax(-x W)]`` over the ``f_dim`` features (dim ``2 f_dim``);
    ``W`` starts at the identity (``eye(k, f_dim)``).
  * no positional encoding (the linearised model's RoPE is not reproduced); ``positions=`` is
    accepted and ignored. The q/k/v/o params have the names and shapes of
    :mod:`jaxlayers.attention` (no bias), so a softmax layer's weights load directly
    (:func:`teacher_config` gives the matching softmax attention config).

Computation: the window part is blocked (query blocks of ``min(w, T)`` tokens against their
``block + w`` keys), ``O(T w k)``; the linear part is
:func:`pallas_kernels.linear_attention.gated_linear_attention` on the keys shifted by ``w``
(key ``i - w`` enters at step ``i``), with a column of ones appended to ``v`` for the normaliser.
Softmax and the linear part run in float32.

:func:`attention_transfer_loss` is the paper's first stage (attention transfer): the MSE between
this layer's output and a teacher softmax attention's output on the same input (train only the
feature maps and ``γ``; the q/k/v/o weights come from the teacher).

Params: ``"q"``, ``"k"``, ``"v"`` ``{"kernel": [d, h*k]}``, ``"o"`` ``{"kernel": [h*k, d]}``,
``"feature_map_q"``/``"feature_map_k"`` ``{"kernel": [h, k, f_dim]}``, ``"window_factor"``
``{"logit": [h]}``.

Decode state::

    {"k", "v":  [b, w, h, k]         # the last w tokens' keys/values, oldest first
     "s":       [b, h, 2 f_dim, k+1] # float32 Σ φ_k(k_j) [v_j, 1] over tokens left of the window
     "index":   int32 []}            # tokens seen

``segment_ids`` (packed sequences; a change of id starts a new sequence) is supported without
a state; combining it with ``initial_state`` / ``return_state`` raises ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxlayers import attention, core, dense
from pallas_kernels.linear_attention import gated_linear_attention

__all__ = [
    "Config",
    "param_specs",
    "init",
    "apply",
    "init_state",
    "step",
    "feature_map",
    "teacher_config",
    "teacher_apply",
    "attention_transfer_loss",
]

_NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """LoLCATs attention config.

    Attributes:
      d_model: model width ``d``.
      num_heads: heads ``h``; head dim ``k = d_model // num_heads``.
      window: softmax window ``w`` (tokens, the query included); 64 in the paper.
      feature_dim: ``f_dim`` of the Hedgehog map (the features are ``2 f_dim``); None = ``k``.
    """

    d_model: int
    num_heads: int
    window: int = 64
    feature_dim: int | None = None

    def __post_init__(self):
        if self.num_heads <= 0:
            raise ValueError(f"num_heads must be positive; got num_heads={self.num_heads}")
        core.check_divisible(self.d_model, self.num_heads, "d_model", "num_heads")
        if self.window < 1:
            raise ValueError(f"window must be >= 1; got {self.window}")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1 or None; got {self.feature_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def f_dim(self) -> int:
        return self.head_dim if self.feature_dim is None else self.feature_dim


def _proj_cfgs(cfg: Config) -> dict[str, dense.Config]:
    common = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d = cfg.d_model
    into = ("embed", "heads")
    return {
        "q": dense.Config(d_in=d, d_out=d, kernel_axes=into, **common),
        "k": dense.Config(d_in=d, d_out=d, kernel_axes=into, **common),
        "v": dense.Config(d_in=d, d_out=d, kernel_axes=into, **common),
        "o": dense.Config(d_in=d, d_out=d, kernel_axes=("heads", "embed"), **common),
    }


def _eye_init(key, shape, dtype=jnp.float32):
    del key
    h, k, f = shape
    return jnp.broadcast_to(jnp.eye(k, f, dtype=dtype)[None], shape)


def param_specs(cfg: Config) -> dict[str, dict[str, core.ParamSpec]]:
    specs = {name: dense.param_specs(c) for name, c in _proj_cfgs(cfg).items()}
    fmap = (cfg.num_heads, cfg.head_dim, cfg.f_dim)
    for name in ("feature_map_q", "feature_map_k"):
        specs[name] = {"kernel": core.ParamSpec(fmap, _eye_init, ("heads", None, None))}
    specs["window_factor"] = {
        "logit": core.ParamSpec((cfg.num_heads,), core.initializers.zeros, ("heads",))
    }
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def init_state(cfg: Config, batch: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Empty window cache (``dtype``) and linear state (float32) at index 0."""
    h, k, w = cfg.num_heads, cfg.head_dim, cfg.window
    return {
        "k": jnp.zeros((batch, w, h, k), dtype),
        "v": jnp.zeros((batch, w, h, k), dtype),
        "s": jnp.zeros((batch, h, 2 * cfg.f_dim, k + 1), jnp.float32),
        "index": jnp.zeros((), jnp.int32),
    }


# ------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------


def feature_map(kernel: jax.Array, x: jax.Array) -> jax.Array:
    """Hedgehog map ``[softmax(x W), softmax(-x W)]``: ``x [..., h, k]``, ``W [h, k, f]`` ->
    ``[..., h, 2f]`` (float32)."""
    z = jnp.einsum("...hk,hkf->...hf", x.astype(jnp.float32), kernel.astype(jnp.float32))
    return jnp.concatenate([jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1)], axis=-1)


def _mix(params) -> jax.Array:
    return jax.nn.sigmoid(params["window_factor"]["logit"].astype(jnp.float32))  # [h]


def _combine(mix, win_num, win_den, lin_num, lin_den):
    """``[..., h, k]`` numerators and ``[..., h]`` denominators -> ``y [..., h, k]``."""
    f = mix.reshape((1,) * (win_den.ndim - 1) + mix.shape)
    num = f[..., None] * win_num + (1.0 - f[..., None]) * lin_num
    den = f * win_den + (1.0 - f) * lin_den
    return num / den[..., None]


def _runs(segment_ids):
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    change = jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)
    return jnp.cumsum(change.astype(jnp.int32), axis=1)


def _window(q, ext_k, ext_v, ext_ok, run_q, run_ext, w: int):
    """Window part. ``q [b, t, h, k]`` (float32, pre-scaled); ``ext_* [b, w + t, ...]`` with
    ``ext[e]`` the token at ``e - w`` relative to the first query; ``ext_ok [b, w + t]``.
    Returns ``(num [b, t, h, k], den [b, t, h])``."""
    b, t, h, dk = q.shape
    B = min(w, t)
    n = -(-t // B)
    tp = n * B
    pad = tp - t
    q = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, n, B, h, dk)
    ext_k = jnp.pad(ext_k, [(0, 0), (0, pad), (0, 0), (0, 0)])
    ext_v = jnp.pad(ext_v, [(0, 0), (0, pad), (0, 0), (0, 0)])
    ext_ok = jnp.pad(ext_ok, [(0, 0), (0, pad)], constant_values=True)
    idx = jnp.arange(n)[:, None] * B + jnp.arange(B + w)[None, :]  # [n, B + w]
    keys, vals, ok = ext_k[:, idx], ext_v[:, idx], ext_ok[:, idx]  # [b, n, B + w, ...]
    r = jnp.arange(B)[:, None]
    c = jnp.arange(B + w)[None, :]
    allowed = ((c >= r + 1) & (c <= r + w))[None, None] & ok[:, :, None, :]  # [b, n, B, B+w]
    if run_q is not None:
        run_q = jnp.pad(run_q, [(0, 0), (0, pad)]).reshape(b, n, B)
        run_k = jnp.pad(run_ext, [(0, 0), (0, pad)])[:, idx]
        allowed = allowed & (run_q[:, :, :, None] == run_k[:, :, None, :])
    logits = jnp.einsum("bnrhk,bnchk->bnhrc", q, keys)
    allowed = allowed[:, :, None]
    m = jnp.max(jnp.where(allowed, logits, _NEG), axis=-1, keepdims=True)
    a = jnp.where(allowed, jnp.exp(jnp.where(allowed, logits - m, 0.0)), 0.0)
    num = jnp.einsum("bnhrc,bnchk->bnrhk", a, vals).reshape(b, tp, h, dk)[:, :t]
    den = jnp.moveaxis(jnp.sum(a, axis=-1), 2, 3).reshape(b, tp, h)[:, :t]
    return num, den


def _project(params, x, cfg: Config):
    pc = _proj_cfgs(cfg)
    lead = x.shape[:-1]
    h, dk = cfg.num_heads, cfg.head_dim
    return tuple(dense.apply(params[n], x, pc[n]).reshape(lead + (h, dk)) for n in ("q", "k", "v"))


def _check_x(x, cfg: Config, name: str, rank: int, layout: str):
    core.check_floating(x, name)
    core.check_rank(x, rank, name, layout)
    core.check_dim(x, -1, cfg.d_model, name, "d_model")


def _check_state(state, cfg: Config, batch: int):
    keys = {"k", "v", "s", "index"}
    if not isinstance(state, dict) or set(state) != keys:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            "state must be a dict with keys ['index', 'k', 's', 'v'] (from init_state or "
            f"apply(..., return_state=True)); got {got}"
        )
    want = (batch, cfg.window, cfg.num_heads, cfg.head_dim)
    for name in ("k", "v"):
        if tuple(state[name].shape) != want:
            raise ValueError(
                f"state['{name}'] must have shape [batch, window, heads, head_dim] = {want}; "
                f"got {tuple(state[name].shape)}"
            )


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
    """LoLCATs attention over ``x: [b, t, d_model]`` -> ``[b, t, d_model]`` (and the state)."""
    del positions
    _check_x(x, cfg, "x", 3, "[batch, time, d_model]")
    b, t, _ = x.shape
    w, h, dk = cfg.window, cfg.num_heads, cfg.head_dim
    runs = None
    if segment_ids is not None:
        if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise TypeError(
                f"segment_ids must have an integer dtype (int32); got {segment_ids.dtype}"
            )
        if tuple(segment_ids.shape) != (b, t):
            raise ValueError(
                f"segment_ids must have shape (batch, time) = {(b, t)}; got {segment_ids.shape}"
            )
        if initial_state is not None or return_state:
            raise ValueError(
                "segment_ids cannot be combined with initial_state / return_state; expected "
                "segment_ids=None when decoding"
            )
        runs = _runs(segment_ids)
    if initial_state is not None:
        _check_state(initial_state, cfg, b)
    dtype = core.compute_dtype(cfg, x)
    q, k, v = _project(params, x.astype(dtype), cfg)

    if initial_state is None:
        cache_k = jnp.zeros((b, w, h, dk), dtype)
        cache_v = jnp.zeros((b, w, h, dk), dtype)
        s0 = None
        n0 = jnp.zeros((), jnp.int32)
    else:
        cache_k = initial_state["k"].astype(dtype)
        cache_v = initial_state["v"].astype(dtype)
        s0 = initial_state["s"].astype(jnp.float32)
        n0 = initial_state["index"].astype(jnp.int32)
    ext_k = jnp.concatenate([cache_k, k], axis=1)  # [b, w + t, h, k]: token at n0 - w + e
    ext_v = jnp.concatenate([cache_v, v], axis=1)
    ext_ok = n0 - w + jnp.arange(w + t) >= 0
    ext_ok = jnp.broadcast_to(ext_ok[None], (b, w + t))
    run_ext = None if runs is None else jnp.pad(runs, [(0, 0), (w, 0)], constant_values=-1)

    # Window part.
    q32 = q.astype(jnp.float32) * jnp.float32(1.0 / math.sqrt(dk))
    win_num, win_den = _window(
        q32,
        ext_k.astype(jnp.float32),
        ext_v.astype(jnp.float32),
        ext_ok,
        runs,
        run_ext,
        w,
    )

    # Linear part: at step i the key of ext[i] (token i - w) enters the state.
    fq = feature_map(params["feature_map_q"]["kernel"], q)
    fk = feature_map(params["feature_map_k"]["kernel"], ext_k[:, :t])
    fk = jnp.where(ext_ok[:, :t, None, None], fk, 0.0)
    if runs is not None:
        same = run_ext[:, :t] == runs
        fk = jnp.where(same[:, :, None, None], fk, 0.0)
    lin_v = ext_v[:, :t].astype(jnp.float32)
    lin_v = jnp.concatenate([lin_v, jnp.ones((b, t, h, 1), jnp.float32)], axis=-1)
    lin, s_final = gated_linear_attention(
        fq,
        fk,
        lin_v,
        scale=1.0,
        initial_state=s0,
        return_final_state=True,
        segment_ids=segment_ids,
    )
    y = _combine(_mix(params), win_num, win_den, lin[..., :dk], lin[..., dk])
    y = dense.apply(params["o"], y.astype(dtype).reshape(b, t, cfg.d_model), _proj_cfgs(cfg)["o"])
    if not return_state:
        return y
    state = {
        "k": ext_k[:, t:],
        "v": ext_v[:, t:],
        "s": s_final,
        "index": n0 + t,
    }
    return y, state


def step(params: core.Params, state: dict[str, jax.Array], x_t: jax.Array, cfg: Config):
    """One token: ``x_t [b, d_model]`` -> ``(y_t [b, d_model], state)``."""
    _check_x(x_t, cfg, "x_t", 2, "[batch, d_model]")
    b = x_t.shape[0]
    _check_state(state, cfg, b)
    w, dk = cfg.window, cfg.head_dim
    dtype = core.compute_dtype(cfg, x_t)
    q, k, v = _project(params, x_t.astype(dtype), cfg)  # [b, h, k]
    n = state["index"].astype(jnp.int32)
    cache_k, cache_v = state["k"].astype(dtype), state["v"].astype(dtype)
    # The oldest cached token (position n - w) leaves the window for the linear state.
    leaving = feature_map(params["feature_map_k"]["kernel"], cache_k[:, 0])  # [b, h, 2f]
    leaving = jnp.where(n - w >= 0, leaving, 0.0)
    v_old = cache_v[:, 0].astype(jnp.float32)
    v_old = jnp.concatenate([v_old, jnp.ones(v_old.shape[:-1] + (1,), jnp.float32)], axis=-1)
    s = state["s"].astype(jnp.float32) + jnp.einsum("bhf,bhv->bhfv", leaving, v_old)
    cache_k = jnp.concatenate([cache_k[:, 1:], k[:, None]], axis=1)
    cache_v = jnp.concatenate([cache_v[:, 1:], v[:, None]], axis=1)
    ok = n - w + 1 + jnp.arange(w) >= 0  # [w]
    q32 = q.astype(jnp.float32) * jnp.float32(1.0 / math.sqrt(dk))
    logits = jnp.einsum("bhk,bwhk->bhw", q32, cache_k.astype(jnp.float32))
    okb = ok[None, None, :]
    m = jnp.max(jnp.where(okb, logits, _NEG), axis=-1, keepdims=True)
    a = jnp.where(okb, jnp.exp(jnp.where(okb, logits - m, 0.0)), 0.0)
    win_num = jnp.einsum("bhw,bwhk->bhk", a, cache_v.astype(jnp.float32))
    win_den = jnp.sum(a, axis=-1)
    lin = jnp.einsum("bhf,bhfv->bhv", feature_map(params["feature_map_q"]["kernel"], q), s)
    y = _combine(_mix(params), win_num, win_den, lin[..., :dk], lin[..., dk])
    y = dense.apply(params["o"], y.astype(dtype).reshape(x_t.shape), _proj_cfgs(cfg)["o"])
    return y, {"k": cache_k, "v": cache_v, "s": s, "index": n + 1}


# ------------------------------------------------------------------------------------------
# Attention transfer
# ------------------------------------------------------------------------------------------


def teacher_config(cfg: Config) -> attention.Config:
    """The softmax attention whose q/k/v/o params are those of ``cfg`` (no RoPE, causal)."""
    return attention.Config(
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        use_rope=False,
        implementation="reference",
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )


def teacher_apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """Softmax attention with this layer's q/k/v/o weights: the attention-transfer teacher."""
    teacher = {name: params[name] for name in ("q", "k", "v", "o")}
    return attention.apply(teacher, x, teacher_config(cfg))


def attention_transfer_loss(
    params: core.Params, x: jax.Array, cfg: Config, teacher_out: jax.Array
) -> jax.Array:
    """``mean((apply(params, x) - teacher_out)^2)`` in float32 (stage 1 of LoLCATs).

    ``teacher_out [b, t, d_model]`` is the teacher softmax attention's output on ``x`` (e.g.
    :func:`teacher_apply`, under ``jax.lax.stop_gradient``)."""
    core.check_rank(teacher_out, 3, "teacher_out", "[batch, time, d_model]")
    if tuple(teacher_out.shape) != tuple(x.shape):
        raise ValueError(
            f"teacher_out must have the shape of x {tuple(x.shape)}; got {tuple(teacher_out.shape)}"
        )
    y = apply(params, x, cfg).astype(jnp.float32)
    return jnp.mean(jnp.square(y - teacher_out.astype(jnp.float32)))


core.register_layer(
    "lolcats",
    Config,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    example=core.Example(config=Config(d_model=16, num_heads=2, window=4), input_shape=(2, 11, 16)),
    kind="mixer",
)

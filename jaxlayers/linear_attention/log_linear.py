"""Log-linear attention: a Fenwick-tree partition of the prefix with one state per level.

From "Log-Linear Attention" (Guo, Yang, et al.). Linear attention compresses the whole prefix
into one state; log-linear attention keeps ``O(log T)`` states, one per bucket of a Fenwick-tree
partition of the prefix, and lets each query weight the buckets with data-dependent
``λ_t^(l) >= 0``. This module implements the log-linear version of **gated linear attention with
one scalar decay per head and step** (the paper's log-linear Mamba-2); ``gated=False`` gives the
log-linear version of plain (ungated, unnormalised) linear attention:

    o_t = scale · Σ_{s <= t} λ_t^(ℓ(t, s)) · exp(G_t - G_s) · (q_t · k_s) v_s,   G_t = Σ_{r<=t} g_r

The level of key ``s`` for query ``t`` (0-indexed positions) is

    ℓ(t, s) = min(msb(t XOR s) + 1, L - 1),    msb(0) = -1 (so ℓ(t, t) = 0)

which is the Fenwick decomposition of the prefix ``[0, t]``: level 0 is the token itself and,
for every set bit ``j`` of ``t``, level ``j + 1`` is the aligned block of ``2^j`` tokens
``[(t >> (j+1)) << (j+1), ... + 2^j)``. ``L = num_levels`` bounds the number of states: keys whose
level would be ``>= L - 1`` share the top level (for ``T <= 2^(L-2)`` the clamp never acts;
beyond it the top bucket holds all of the far past, like plain linear attention).

Parametrisation (choices the paper leaves open):
  * ``λ_t = softplus(x_t θ_λ + b_λ)``, ``[b, t, h, L]``; ``b_λ`` starts at ``log(e - 1)`` so that
    ``λ ≈ 1`` (plain gated linear attention) for small inputs.
  * ``g_t = log σ(x_t θ_g + b_g) <= 0``, ``[b, t, h]`` (``gated=True``); ``b_g`` starts uniform in
    [2, 5] (decays 0.88 .. 0.993, several time scales across heads). No feature map on q/k and no
    normaliser (Mamba-2 style), ``scale = head_dim ** -0.5``; the output is ``o θ_O``.
  * The Fenwick partition counts tokens from the start of the sequence (the state's ``index``);
    ``positions=`` is accepted and ignored.

Implementations (``cfg.implementation``, the same function):
  "chunked"  ``lax.scan`` over chunks of ``chunk_size`` tokens carrying the ``L - 1`` level states
             (relative to the next query). Per chunk: the old states enter query ``t`` at level
             ``max(l, ℓ(t, p))`` (``p`` = the chunk's first position; derivation: for
             ``s < p <= t``, ``msb(t^s) = max(msb(p^s), msb(t^p))``), the keys of the chunk enter
             through a dense ``[C, C]`` block with the hierarchical weights, and at the end the
             old states merge (level ``l`` moves to ``max(l, ℓ(p', p))``, ``p'`` the next
             chunk's start) and the chunk's keys are added at ``ℓ(p', s)``. Cost per token
             ``O(C (k + v + L) + L k v)``; chunks need no alignment, so any ``initial_state`` offset
             works. ``step`` is the same code with one-token chunks.
  "naive"    the ``[T, T]`` masked matrix ``M_ts = λ_t^(ℓ(t,s)) exp(G_t - G_s)`` (``O(T^2)``).

Params: ``"q"``, ``"k"``, ``"v"`` ``{"kernel": [d, h*k]}``, ``"o"`` ``{"kernel": [h*k, d]}``,
``"lam"`` ``{"kernel": [d, h*L], "bias": [h*L]}``, and with ``gated`` ``"gate"`` ``{"kernel":
[d, h], "bias": [h]}``.

Decode state (float32 whatever ``dtype`` is asked)::

    {"levels": [b, h, L-1, k, k],  # bucket states of levels 1..L-1 for the next query
     "index":  int32 []}           # tokens seen (the next query's position)

Not supported: ``segment_ids`` (raises ``NotImplementedError``: the partition would need
per-row positions).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxlayers import core, dense

__all__ = [
    "Config",
    "param_specs",
    "init",
    "apply",
    "init_state",
    "step",
    "project",
    "levels",
    "log_linear_attention",
]

IMPLEMENTATIONS = ("chunked", "naive")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """Log-linear attention config.

    Attributes:
      d_model: model width ``d``.
      num_heads: heads ``h``; head dim ``k = d_model // num_heads`` (keys and values).
      num_levels: ``L`` (level 0 = the token itself); exact Fenwick buckets for ``T <= 2^(L-2)``.
      gated: per-head scalar decay (log-linear Mamba-2) or none (log-linear linear attention).
      chunk_size: tokens per chunk of the "chunked" implementation (any positive int).
      implementation: "chunked" or "naive".
    """

    d_model: int
    num_heads: int
    num_levels: int = 16
    gated: bool = True
    chunk_size: int = 64
    implementation: str = "chunked"

    def __post_init__(self):
        if self.num_heads <= 0:
            raise ValueError(f"num_heads must be positive; got num_heads={self.num_heads}")
        core.check_divisible(self.d_model, self.num_heads, "d_model", "num_heads")
        if not 2 <= self.num_levels <= 32:
            raise ValueError(f"num_levels must be in [2, 32]; got {self.num_levels}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {self.chunk_size}")
        core.check_choice(self.implementation, IMPLEMENTATIONS, "implementation")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _proj_cfgs(cfg: Config) -> dict[str, dense.Config]:
    common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d, h, L = cfg.d_model, cfg.num_heads, cfg.num_levels
    into = ("embed", "heads")
    cfgs = {
        "q": dense.Config(d_in=d, d_out=d, use_bias=False, kernel_axes=into, **common),
        "k": dense.Config(d_in=d, d_out=d, use_bias=False, kernel_axes=into, **common),
        "v": dense.Config(d_in=d, d_out=d, use_bias=False, kernel_axes=into, **common),
        "o": dense.Config(
            d_in=d, d_out=d, use_bias=False, kernel_axes=("heads", "embed"), **common
        ),
        "lam": dense.Config(d_in=d, d_out=h * L, kernel_axes=into, **common),
    }
    if cfg.gated:
        cfgs["gate"] = dense.Config(d_in=d, d_out=h, kernel_axes=into, **common)
    return cfgs


def param_specs(cfg: Config) -> dict[str, dict[str, core.ParamSpec]]:
    specs = {name: dense.param_specs(c) for name, c in _proj_cfgs(cfg).items()}
    lam_bias = math.log(math.e - 1.0)  # softplus(lam_bias) == 1
    specs["lam"]["bias"] = dataclasses.replace(
        specs["lam"]["bias"], init=core.initializers.constant(lam_bias)
    )
    if cfg.gated:
        specs["gate"]["bias"] = dataclasses.replace(
            specs["gate"]["bias"], init=core.initializers.uniform_range(2.0, 5.0)
        )
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def init_state(cfg: Config, batch: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Empty level states (float32; ``dtype`` is accepted for the contract) at index 0."""
    del dtype
    k = cfg.head_dim
    return {
        "levels": jnp.zeros((batch, cfg.num_heads, cfg.num_levels - 1, k, k), jnp.float32),
        "index": jnp.zeros((), jnp.int32),
    }


# ------------------------------------------------------------------------------------------
# The Fenwick levels
# ------------------------------------------------------------------------------------------


def levels(t_pos, s_pos, num_levels: int):
    """``ℓ(t, s) = min(msb(t XOR s) + 1, L - 1)`` for int32 positions (broadcasting); 0 at t=s."""
    x = jnp.bitwise_xor(jnp.asarray(t_pos, jnp.int32), jnp.asarray(s_pos, jnp.int32))
    msb = 31 - jax.lax.clz(x)  # clz(0) = 32 -> msb = -1
    return jnp.minimum(msb + 1, num_levels - 1)


def _old_weights(lam, pos, p, num_levels: int):
    """Weights ``λ_t^(max(l, ℓ(t, p)))`` of the old level states ``l = 1..L-1`` for queries at
    ``pos [C]``: ``lam [b, C, h, L]`` -> ``[b, C, h, L-1]``."""
    lvl = jnp.arange(1, num_levels, dtype=jnp.int32)
    eff = jnp.maximum(lvl[None, :], levels(pos, p, num_levels)[:, None])  # [C, L-1]
    onehot = jax.nn.one_hot(eff, num_levels, dtype=jnp.float32)  # [C, L-1, L]
    return jnp.einsum("bchl,cml->bchm", lam, onehot)


def _merge(states, p_old, p_new, num_levels: int):
    """Move the level states from query ``p_old`` to query ``p_new > p_old``: level ``l`` goes to
    ``max(l, ℓ(p_new, p_old))``. ``states [b, h, L-1, k, v]``."""
    m = levels(p_new, p_old, num_levels)  # >= 1
    lvl = jnp.arange(1, num_levels, dtype=jnp.int32)[None, None, :, None, None]
    below = jnp.cumsum(states, axis=2)
    at_m = jax.lax.dynamic_index_in_dim(below, m - 1, axis=2, keepdims=True)
    return jnp.where(lvl < m, 0.0, jnp.where(lvl == m, at_m, states))


def _chunk(states, p, n_real, q, k, v, g, lam, *, scale, num_levels: int):
    """One chunk starting at absolute position ``p`` with ``n_real`` real tokens (the rest pad).

    ``states [b, h, L-1, k, v]`` (for query ``p``); ``q, k [b, C, h, k]``, ``v [b, C, h, v]``,
    ``g [b, C, h]``, ``lam [b, C, h, L]`` (float32). Returns ``(o [b, C, h, v], states for query
    p + n_real)``.
    """
    C = q.shape[1]
    L = num_levels
    pos = p + jnp.arange(C, dtype=jnp.int32)
    gc = jnp.cumsum(g, axis=1)  # [b, C, h]
    # Old states.
    w_old = _old_weights(lam, pos, p, L) * jnp.exp(gc)[..., None]  # [b, C, h, L-1]
    o = jnp.einsum("bchk,bhlkv,bchl->bchv", q, states, w_old)
    # Keys of this chunk.
    lev = levels(pos[:, None], pos[None, :], L)  # [C(t), C(s)]
    causal = jnp.tril(jnp.ones((C, C), bool))
    lam_ts = jnp.einsum("bthl,tsl->bhts", lam, jax.nn.one_hot(lev, L, dtype=jnp.float32))
    diff = jnp.moveaxis(gc, 1, 2)[:, :, :, None] - jnp.moveaxis(gc, 1, 2)[:, :, None, :]
    diff = jnp.where(causal[None, None], diff, 0.0)
    decay = jnp.where(causal[None, None], jnp.exp(diff), 0.0)  # [b, h, t, s]
    scores = jnp.einsum("bthk,bshk->bhts", q, k) * decay * lam_ts
    o = (o + jnp.einsum("bhts,bshv->bthv", scores, v)) * scale
    # Next states (for query p + n_real); pad keys are zero and pad decays are 1.
    p_new = p + n_real
    total = gc[:, -1]  # [b, h]
    states = _merge(states, p, p_new, L) * jnp.exp(total)[:, :, None, None, None]
    real = jnp.arange(C) < n_real
    lev_new = levels(p_new, pos, L)  # [C], >= 1 for real keys
    onehot = jax.nn.one_hot(lev_new - 1, L - 1, dtype=jnp.float32)
    onehot = jnp.where(real[:, None], onehot, 0.0)  # [C, L-1]
    w_new = jnp.exp(total[:, None, :] - gc)  # [b, C, h]
    states = states + jnp.einsum("bshk,bshv,bsh,sl->bhlkv", k, v, w_new, onehot)
    return o, states


def _naive(q, k, v, g, lam, states, p0, *, scale, num_levels: int):
    """The ``[T, T]`` masked form (plus the old states' contribution and the final states)."""
    T = q.shape[1]
    L = num_levels
    pos = p0 + jnp.arange(T, dtype=jnp.int32)
    G = jnp.cumsum(g, axis=1)  # [b, T, h]
    lev = levels(pos[:, None], pos[None, :], L)
    causal = jnp.tril(jnp.ones((T, T), bool))
    lam_ts = jnp.einsum("bthl,tsl->bhts", lam, jax.nn.one_hot(lev, L, dtype=jnp.float32))
    Gh = jnp.moveaxis(G, 1, 2)  # [b, h, T]
    diff = jnp.where(causal[None, None], Gh[:, :, :, None] - Gh[:, :, None, :], 0.0)
    mask = jnp.where(causal[None, None], jnp.exp(diff), 0.0) * lam_ts
    o = jnp.einsum("bhts,bthk,bshk,bshv->bthv", mask, q, k, v)
    w_old = _old_weights(lam, pos, p0, L) * jnp.exp(G)[..., None]
    o = (o + jnp.einsum("bthk,bhlkv,bthl->bthv", q, states, w_old)) * scale
    p_new = p0 + T
    total = G[:, -1]
    final = _merge(states, p0, p_new, L) * jnp.exp(total)[:, :, None, None, None]
    onehot = jax.nn.one_hot(levels(p_new, pos, L) - 1, L - 1, dtype=jnp.float32)
    final = final + jnp.einsum(
        "bshk,bshv,bsh,sl->bhlkv", k, v, jnp.exp(total[:, None, :] - G), onehot
    )
    return o, final


def log_linear_attention(
    q,
    k,
    v,
    log_decay,
    lam,
    *,
    num_levels: int,
    scale: float | None = None,
    initial_state: dict[str, jax.Array] | None = None,
    chunk_size: int = 64,
    implementation: str = "chunked",
):
    """The log-linear attention core (no projections), float32.

    Args:
      q, k: ``[b, t, h, k]``; v: ``[b, t, h, v]``; log_decay: ``[b, t, h]`` (<= 0) or None;
      lam: ``[b, t, h, L]`` level weights; initial_state: ``{"levels", "index"}`` or None.
    Returns:
      ``(o [b, t, h, v] float32, state)``.
    """
    core.check_choice(implementation, IMPLEMENTATIONS, "implementation")
    q, k, v, lam = (jnp.asarray(a, jnp.float32) for a in (q, k, v, lam))
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    L = num_levels
    scale = dk**-0.5 if scale is None else scale
    g = jnp.zeros((b, t, h), jnp.float32) if log_decay is None else log_decay
    g = jnp.asarray(g, jnp.float32)
    if initial_state is None:
        states = jnp.zeros((b, h, L - 1, dk, dv), jnp.float32)
        p0 = jnp.zeros((), jnp.int32)
    else:
        states = initial_state["levels"].astype(jnp.float32)
        p0 = initial_state["index"].astype(jnp.int32)
    if implementation == "naive":
        o, states = _naive(q, k, v, g, lam, states, p0, scale=scale, num_levels=L)
        return o, {"levels": states, "index": p0 + t}
    C = min(chunk_size, t)
    n = -(-t // C)
    pad = n * C - t

    def chunks(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((b, n, C) + a.shape[2:]), 1, 0)

    def body(s, inp):
        i, qc, kc, vc, gc, lc = inp
        n_real = jnp.minimum(t - i * C, C).astype(jnp.int32)
        o, s = _chunk(s, p0 + i * C, n_real, qc, kc, vc, gc, lc, scale=scale, num_levels=L)
        return s, o

    xs = (jnp.arange(n, dtype=jnp.int32),) + tuple(chunks(a) for a in (q, k, v, g, lam))
    states, o = jax.lax.scan(body, states, xs)
    o = jnp.moveaxis(o, 0, 1).reshape(b, n * C, h, dv)[:, :t]
    return o, {"levels": states, "index": p0 + t}


# ------------------------------------------------------------------------------------------
# apply / step
# ------------------------------------------------------------------------------------------


def project(params: core.Params, x: jax.Array, cfg: Config):
    """``q, k, v [..., h, k]`` (compute dtype), ``log_decay [..., h]`` (float32 or None) and
    ``λ [..., h, L]`` (float32) from ``x [..., d]``."""
    pc = _proj_cfgs(cfg)
    lead = x.shape[:-1]
    h, dk, L = cfg.num_heads, cfg.head_dim, cfg.num_levels
    q, k, v = (dense.apply(params[n], x, pc[n]).reshape(lead + (h, dk)) for n in ("q", "k", "v"))
    lam = jax.nn.softplus(dense.apply(params["lam"], x, pc["lam"]).astype(jnp.float32))
    lam = lam.reshape(lead + (h, L))
    g = None
    if cfg.gated:
        g = jax.nn.log_sigmoid(dense.apply(params["gate"], x, pc["gate"]).astype(jnp.float32))
    return q, k, v, g, lam


def _check_x(x, cfg: Config, name: str, rank: int, layout: str):
    core.check_floating(x, name)
    core.check_rank(x, rank, name, layout)
    core.check_dim(x, -1, cfg.d_model, name, "d_model")


def _check_state(state, cfg: Config, batch: int):
    if not isinstance(state, dict) or set(state) != {"levels", "index"}:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            "state must be a dict with keys ['index', 'levels'] (from init_state or "
            f"apply(..., return_state=True)); got {got}"
        )
    k = cfg.head_dim
    want = (batch, cfg.num_heads, cfg.num_levels - 1, k, k)
    if tuple(state["levels"].shape) != want:
        raise ValueError(
            "state['levels'] must have shape [batch, heads, num_levels-1, head_dim, head_dim] = "
            f"{want}; got {tuple(state['levels'].shape)}"
        )


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
    """Log-linear attention over ``x: [b, t, d_model]`` -> ``[b, t, d_model]`` (and the state)."""
    del positions
    _check_x(x, cfg, "x", 3, "[batch, time, d_model]")
    if segment_ids is not None:
        raise NotImplementedError(
            "log_linear_attention does not support segment_ids (packed sequences); expected "
            "segment_ids=None (the Fenwick partition would need per-row positions)"
        )
    b, t, _ = x.shape
    if initial_state is not None:
        _check_state(initial_state, cfg, b)
    dtype = core.compute_dtype(cfg, x)
    x = x.astype(dtype)
    q, k, v, g, lam = project(params, x, cfg)
    o, state = log_linear_attention(
        q,
        k,
        v,
        g,
        lam,
        num_levels=cfg.num_levels,
        initial_state=initial_state,
        chunk_size=cfg.chunk_size,
        implementation=cfg.implementation,
    )
    y = dense.apply(params["o"], o.astype(dtype).reshape(b, t, cfg.d_model), _proj_cfgs(cfg)["o"])
    return (y, state) if return_state else y


def step(params: core.Params, state: dict[str, jax.Array], x_t: jax.Array, cfg: Config):
    """One token: ``x_t [b, d_model]`` -> ``(y_t [b, d_model], state)`` (O(L k v) work)."""
    _check_x(x_t, cfg, "x_t", 2, "[batch, d_model]")
    _check_state(state, cfg, x_t.shape[0])
    dtype = core.compute_dtype(cfg, x_t)
    q, k, v, g, lam = project(params, x_t.astype(dtype)[:, None], cfg)
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    g = jnp.zeros(q.shape[:3], jnp.float32) if g is None else g
    p = state["index"].astype(jnp.int32)
    o, levels_ = _chunk(
        state["levels"].astype(jnp.float32),
        p,
        jnp.ones((), jnp.int32),
        q,
        k,
        v,
        g,
        lam,
        scale=cfg.head_dim**-0.5,
        num_levels=cfg.num_levels,
    )
    y = dense.apply(params["o"], o[:, 0].astype(dtype).reshape(x_t.shape), _proj_cfgs(cfg)["o"])
    return y, {"levels": levels_, "index": p + 1}


core.register_layer(
    "log_linear_attention",
    Config,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    example=core.Example(
        config=Config(d_model=16, num_heads=2, num_levels=4, chunk_size=4),
        input_shape=(2, 13, 16),
    ),
    kind="mixer",
)

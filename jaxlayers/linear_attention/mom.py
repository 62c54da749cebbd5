"""Mixture-of-Memories (MoM), on the chunked ops of ``pallas_kernels.linear_attention``.

From "MoM: Linear Sequence Modeling with Mixture-of-Memories". ``M`` memories (recurrent states
``S^m [k, v]`` per head) each have their own key/value projections; a router sends every token
to its top-``top_k`` memories, and only those memories take the token in. The query is shared;
the output reads the memories and mixes the reads with the router weights::

    p_t       = softmax(x_t W_r)                         [M]   (float32)
    I_t       = top_k(p_t)          w_t^m = p_t^m / sum_{n in I_t} p_t^n  for m in I_t, else 0
    q_t       = SiLU(conv(x W_q))_t                      k_t^m, v_t^m = SiLU(conv(x W_k^m)), ...
    S_t^m     = update(S_{t-1}^m; k_t^m, v_t^m)   if m in I_t,   S_t^m = S_{t-1}^m otherwise
    o_t       = sum_m w_t^m (S_t^m)^T (scale q_t)  [+ (S_t^shared)^T (scale q_t)]
    y_t       = concat_heads( RMSNorm(o_t) [* SiLU(x_t W_g)] ) W_o

The optional shared memory (``use_shared_memory``) is always written and read, with weight 1
(on top of the routed weights, which sum to 1). ``update`` is one of (``update_rule``):

    "gated_delta"  S = exp(g_t) (I - beta_t k k^T) S + beta_t k v^T    (default; Gated DeltaNet)
    "delta"        S = (I - beta_t k k^T) S + beta_t k v^T             (DeltaNet)
    "gated_linear" S = exp(g_t) S + k v^T                               (scalar decay per head)
    "linear"       S = S + k v^T                                        (linear attention)

with ``beta_t^m = sigmoid(x_t W_beta^m)`` and ``g_t^m = -exp(A_log) softplus(x_t W_a^m + dt_bias)``
per memory (``A_log`` and ``dt_bias`` shared; as in :mod:`jaxlayers.linear_attention.deltanet`);
the delta rules L2-normalise q and k.

How routing is computed: every memory is an extra group of heads of *one* call of the chunked
op (``delta_rule`` or ``gated_linear_attention``) over ``(M [+1]) * h`` heads. For a token not
routed to memory ``m``, that memory's write is switched off and its decay is 1: the delta rules
get ``beta = 0`` and ``g = 0`` (so ``S = 1 * (I - 0) S + 0 = S``); the linear rules get ``k = 0``
and ``g = 0``. The op then reads every memory at every token and the reads of unrouted memories
are multiplied by ``w = 0``. This costs ``M (+1)`` times one memory's work (there is no gather of
the routed tokens, which a sparse implementation would do), but it is exact, runs the same
kernels, keeps ``segment_ids``, chunking and ``initial_state`` semantics unchanged, and keeps the
state a fixed-shape array for decoding.

Choices the paper leaves open, made here:

* The query is shared by the memories; keys, values, beta and the decay projection are per
  memory (as in the authors' code). The routed weights are the top-k softmax probabilities
  renormalised to sum to 1; ties are broken towards the lower memory index (``lax.top_k``).
  Gradients reach the router through the weights (the selection itself is discrete).
* The short convs run over the whole token sequence (before routing), on q and on every
  memory's k and v channels, so a memory's conv also sees the tokens routed elsewhere. (The
  authors' code gathers each memory's routed tokens first and convolves that subsequence, which
  also gives every memory its own conv'd query; that needs per-memory caches of routed tokens and
  is not done here.)
* Output norm, gate, ``scale`` and init as in DeltaNet (``deltanet`` module docstring).
* :func:`load_balancing_loss` (the Switch-Transformer auxiliary loss over memories) is a separate
  function; ``apply`` returns only ``y``.
* ``positions`` is accepted (mixer contract) and ignored.

Shapes: ``x [b, t, d] -> y [b, t, d]``; memory slots ``s = M + use_shared_memory`` (the shared
memory is the last slot). Params (no biases)::

    "q": [d, h*k]   "k": [d, s*h*k]   "v": [d, s*h*v]     axes ("embed", "heads"); column
                    index of "k" = (slot * h + head) * k + i, likewise "v"
    "router": {"kernel": [d, M]}                          axes ("embed", "experts")
    "beta": [d, s*h]                                      (delta rules)
    "decay": {"kernel": [d, s*h], "a_log": [h], "dt_bias": [h]}   (gated rules)
    "q_conv", "k_conv", "v_conv": {"kernel": [K, channels]}     (use_short_conv)
    "o_norm": {"scale": [v]}   "g": [d, h*v] (use_output_gate)   "o": [h*v, d]

Decode state: ``{"conv_q": [b, K-1, h*k], "conv_k": [b, K-1, s*h*k], "conv_v": [b, K-1, s*h*v]``
(with short convs) ``, "recurrent": [b, s*h, k, v] float32}`` (slot-major heads).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxlayers import core, dense
from jaxlayers.linear_attention import deltanet as dn
from jaxlayers.linear_attention import short_conv
from pallas_kernels.linear_attention import api

__all__ = [
    "UPDATE_RULES",
    "Config",
    "param_specs",
    "init",
    "apply",
    "init_state",
    "step",
    "route",
    "load_balancing_loss",
]

UPDATE_RULES = ("gated_delta", "delta", "gated_linear", "linear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """Mixture-of-Memories config.

    Attributes:
      d_model: model width ``d``.
      num_heads: heads ``h`` (every memory has ``h`` heads).
      head_dim: key/query dim per head ``k``; None = ``d_model // num_heads``.
      value_dim: value dim per head ``v``; None = ``head_dim``.
      num_memories: routed memories ``M``.
      top_k: memories each token is routed to (``1 <= top_k <= M``).
      use_shared_memory: add a memory every token writes and reads (weight 1).
      update_rule: "gated_delta", "delta", "gated_linear" or "linear" (module docstring).
      use_short_conv, conv_size, conv_bias, use_output_gate, norm_eps, scale, implementation,
      chunk_size, interpret: as in :class:`deltanet.DeltaNetConfig`.
      a_init_range, dt_min, dt_max, dt_init_floor: decay init (gated rules), as in
        :class:`deltanet.GatedDeltaNetConfig`.
    """

    d_model: int
    num_heads: int
    head_dim: int | None = None
    value_dim: int | None = None
    num_memories: int = 4
    top_k: int = 2
    use_shared_memory: bool = True
    update_rule: str = "gated_delta"
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = False
    use_output_gate: bool = True
    norm_eps: float = 1e-5
    scale: float | None = None
    implementation: str | None = None
    chunk_size: int | None = None
    interpret: bool = False
    a_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4

    def __post_init__(self):
        dn.check_mixer_fields(self)
        dn.check_decay_fields(self)
        core.check_choice(self.update_rule, UPDATE_RULES, "update_rule")
        if self.num_memories < 1:
            raise ValueError(f"num_memories must be >= 1; got num_memories={self.num_memories}")
        if not 1 <= self.top_k <= self.num_memories:
            raise ValueError(
                f"top_k must be in [1, num_memories={self.num_memories}]; got top_k={self.top_k}"
            )

    @property
    def key_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def val_dim(self) -> int:
        return self.key_dim if self.value_dim is None else self.value_dim

    @property
    def num_slots(self) -> int:
        """Memory slots ``s``: the routed memories plus the shared one."""
        return self.num_memories + int(self.use_shared_memory)

    @property
    def is_delta(self) -> bool:
        return self.update_rule in ("gated_delta", "delta")

    @property
    def is_gated(self) -> bool:
        return self.update_rule in ("gated_delta", "gated_linear")


# --------------------------------------------------------------------------------------------
# Params and state
# --------------------------------------------------------------------------------------------


def _proj_cfgs(cfg: Config) -> dict[str, dense.Config]:
    d, h, dk, dv, s = cfg.d_model, cfg.num_heads, cfg.key_dim, cfg.val_dim, cfg.num_slots
    cfgs = {
        "q": dn.dense_cfg(cfg, d, h * dk),
        "k": dn.dense_cfg(cfg, d, s * h * dk),
        "v": dn.dense_cfg(cfg, d, s * h * dv),
        "router": dn.dense_cfg(cfg, d, cfg.num_memories, ("embed", "experts")),
        "o": dn.dense_cfg(cfg, h * dv, d, ("heads", "embed")),
    }
    if cfg.is_delta:
        cfgs["beta"] = dn.dense_cfg(cfg, d, s * h)
    if cfg.use_output_gate:
        cfgs["g"] = dn.dense_cfg(cfg, d, h * dv)
    return cfgs


def _conv_channels(cfg: Config) -> dict[str, int]:
    h, s = cfg.num_heads, cfg.num_slots
    return {"q": h * cfg.key_dim, "k": s * h * cfg.key_dim, "v": s * h * cfg.val_dim}


def param_specs(cfg: Config) -> dict[str, Any]:
    specs: dict[str, Any] = {name: dense.param_specs(c) for name, c in _proj_cfgs(cfg).items()}
    if cfg.use_short_conv:
        for name, c in _conv_channels(cfg).items():
            specs[f"{name}_conv"] = short_conv.conv_param_specs(c, cfg.conv_size, cfg.conv_bias)
    specs["o_norm"] = {"scale": core.ParamSpec((cfg.val_dim,), core.initializers.ones, (None,))}
    if cfg.is_gated:
        specs["decay"] = dn.decay_param_specs(cfg, groups=cfg.num_slots)
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def _state_shapes(cfg: Config, batch: int) -> dict[str, tuple[int, ...]]:
    return dn.state_shapes(cfg, batch, _conv_channels(cfg), cfg.num_slots * cfg.num_heads)


def init_state(cfg: Config, batch: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Zero state: conv caches in ``dtype``, ``"recurrent"`` ``[b, s*h, k, v]`` in float32."""
    return {
        name: jnp.zeros(shape, jnp.float32 if name == "recurrent" else dtype)
        for name, shape in _state_shapes(cfg, batch).items()
    }


# --------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------


def route(params: core.Params, x: jax.Array, cfg: Config):
    """Router of ``x [..., d]``: ``(weights, selected, probs)``, each ``[..., M]`` float32.

    ``probs`` = softmax of the router logits; ``selected`` is 1 for the top-k memories of each
    token, else 0; ``weights`` = the selected probs renormalised to sum to 1 (0 elsewhere).
    """
    logits = dense.apply(params["router"], x, _proj_cfgs(cfg)["router"]).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, cfg.top_k)
    onehot = jax.nn.one_hot(top_i, cfg.num_memories, dtype=jnp.float32)  # [..., top_k, M]
    top_w = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    selected = jnp.sum(onehot, axis=-2)
    weights = jnp.sum(onehot * top_w[..., None], axis=-2)
    return weights, selected, probs


def load_balancing_loss(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """Auxiliary load-balancing loss ``M * sum_m f_m P_m`` over the tokens of ``x [b, t, d]``.

    ``f_m`` is the fraction of routing slots (tokens x top_k) that went to memory ``m`` and
    ``P_m`` the mean router probability of ``m`` ("Switch Transformers"); it is 1 for a perfectly
    balanced router. Float32 scalar; add it to the training loss with a small weight.
    """
    dn.check_input(x, cfg.d_model, 3, "x", "[batch, time, d_model]")
    x = x.astype(core.compute_dtype(cfg, x))
    _, selected, probs = route(params, x, cfg)
    frac = jnp.mean(selected, axis=(0, 1)) / cfg.top_k
    return cfg.num_memories * jnp.sum(frac * jnp.mean(probs, axis=(0, 1)))


# --------------------------------------------------------------------------------------------
# apply / step
# --------------------------------------------------------------------------------------------


def _features(params, x, cfg: Config):
    """Projections of ``x [..., d]`` (before the convs), beta, log decay, gate and the router."""
    pc = _proj_cfgs(cfg)
    feats = {name: dense.apply(params[name], x, pc[name]) for name in ("q", "k", "v")}
    beta = None
    if cfg.is_delta:
        beta = jax.nn.sigmoid(dense.apply(params["beta"], x, pc["beta"]).astype(jnp.float32))
    g = dn.log_decay(params["decay"], x) if cfg.is_gated else None
    gate = dense.apply(params["g"], x, pc["g"]) if cfg.use_output_gate else None
    weights, selected, _ = route(params, x, cfg)
    if cfg.use_shared_memory:
        ones = jnp.ones(weights.shape[:-1] + (1,), jnp.float32)
        weights = jnp.concatenate([weights, ones], axis=-1)
        selected = jnp.concatenate([selected, ones], axis=-1)
    return feats, beta, g, gate, weights, selected


def _op_inputs(feats, beta, g, selected, cfg: Config):
    """Memory-major heads for the op: q/k/v ``[..., s*h, dim]``, beta/g ``[..., s*h]``.

    ``beta`` and ``g`` come in as ``[..., s*h]`` (slot-major), ``selected`` as ``[..., s]``.
    """
    lead = feats["q"].shape[:-1]
    h, dk, dv, s = cfg.num_heads, cfg.key_dim, cfg.val_dim, cfg.num_slots
    q = feats["q"].reshape(*lead, 1, h, dk)
    k = feats["k"].reshape(*lead, s, h, dk)
    v = feats["v"].reshape(*lead, s, h, dv)
    if cfg.is_delta:
        q, k = dn.l2_normalize(q), dn.l2_normalize(k)
    q = jnp.broadcast_to(q, (*lead, s, h, dk)).reshape(*lead, s * h, dk)
    v = v.reshape(*lead, s * h, dv)
    on = selected[..., :, None]  # [..., s, 1]: 1 where the token is routed to the slot
    if cfg.is_delta:
        k = k.reshape(*lead, s * h, dk)
        beta = (beta.reshape(*lead, s, h) * on).reshape(*lead, s * h)
    else:
        k = (k * on[..., None].astype(k.dtype)).reshape(*lead, s * h, dk)
    if g is not None:
        g = (g.reshape(*lead, s, h) * on).reshape(*lead, s * h)
    return q, k, v, beta, g


def _output(params, o, weights, gate, cfg: Config):
    lead = o.shape[:-2]
    h, dv, s = cfg.num_heads, cfg.val_dim, cfg.num_slots
    o32 = o.reshape(*lead, s, h, dv).astype(jnp.float32)
    mixed = jnp.sum(o32 * weights[..., None, None], axis=-3).astype(o.dtype)  # [..., h, dv]
    if gate is not None:
        gate = gate.reshape(*lead, h, dv)
    y = dn.head_rms_norm(params["o_norm"]["scale"], mixed, gate, cfg.norm_eps)
    return dense.apply(params["o"], y.reshape(*lead, h * dv), _proj_cfgs(cfg)["o"])


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
    """MoM over ``x [b, t, d]`` -> ``[b, t, d]`` (and the decode state with ``return_state``).

    ``segment_ids`` (int ``[b, t]``) restart every memory and conv where it changes;
    ``positions`` is ignored; ``initial_state`` continues from :func:`init_state` or a previous
    call (with ``segment_ids`` it reaches only the first packed sequence of each row, and the
    returned state is that of the last one).
    """
    del positions
    dn.check_input(x, cfg.d_model, 3, "x", "[batch, time, d_model]")
    b, t, _ = x.shape
    if segment_ids is not None:
        short_conv.check_segment_ids(segment_ids, b, t)
    if initial_state is not None:
        dn.check_state(initial_state, _state_shapes(cfg, b), "initial_state")
    x = x.astype(core.compute_dtype(cfg, x))

    feats, beta, g, gate, weights, selected = _features(params, x, cfg)
    feats, caches = dn.conv_features(
        params, feats, cfg, segment_ids=segment_ids, initial_state=initial_state
    )
    q, k, v, beta, g = _op_inputs(feats, beta, g, selected, cfg)
    common = dict(
        scale=cfg.scale,
        initial_state=None if initial_state is None else initial_state["recurrent"],
        return_final_state=return_state,
        segment_ids=segment_ids,
        chunk_size=cfg.chunk_size,
        implementation=cfg.implementation,
        interpret=cfg.interpret,
    )
    if cfg.is_delta:
        res = api.delta_rule(q, k, v, beta, g, **common)
    else:
        res = api.gated_linear_attention(q, k, v, g, **common)
    o, final = res if return_state else (res, None)
    y = _output(params, o, weights, gate, cfg)
    if not return_state:
        return y
    return y, {**caches, "recurrent": final}


def step(params: core.Params, state: dict[str, jax.Array], x_t: jax.Array, cfg: Config):
    """Decode one token: ``x_t [b, d]`` -> ``(y_t [b, d], state)``."""
    dn.check_input(x_t, cfg.d_model, 2, "x_t", "[batch, d_model]")
    dn.check_state(state, _state_shapes(cfg, x_t.shape[0]), "state")
    x_t = x_t.astype(core.compute_dtype(cfg, x_t))
    feats, beta, g, gate, weights, selected = _features(params, x_t, cfg)
    feats, caches = dn.conv_features_step(params, feats, cfg, state)
    q, k, v, beta, g = _op_inputs(feats, beta, g, selected, cfg)
    rec = state["recurrent"]
    if cfg.is_delta:
        o, rec = api.delta_rule_step(q, k, v, beta, g, state=rec, scale=cfg.scale)
    else:
        o, rec = api.gated_linear_attention_step(q, k, v, g, state=rec, scale=cfg.scale)
    return _output(params, o, weights, gate, cfg), {**caches, "recurrent": rec}


core.register_layer(
    "mom",
    Config,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    example=core.Example(
        config=Config(d_model=16, num_heads=2, head_dim=8, num_memories=4, top_k=2),
        input_shape=(2, 8, 16),
        rtol_bf16=3e-2,
    ),
    kind="mixer",
)

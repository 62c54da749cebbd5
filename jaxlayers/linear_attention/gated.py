"""Linear-attention mixers with data-dependent decays: GLA, HGRN-2, ReGLA and a Mamba-2-style
scalar gate.

All of them compute, per head, the recurrence of
``pallas_kernels.linear_attention.gated_linear_attention`` (state ``S_t [k, v]`` in float32)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,     o_t = S_t^T (scale q_t)

with ``g_t [k]`` per key dim (GLA, HGRN-2, ReGLA) or one scalar per head (Mamba-2).

**GLA** ("Gated Linear Attention Transformers with Hardware-Efficient Training")::

    q, k = x W_q, x W_k  [b,t,h,k]   v = x W_v  [b,t,h,v]
    alpha_t = sigmoid(x W_1 W_2 + b)^(1/tau)   ->  g_t = logsigmoid(x W_1 W_2 + b) / tau
    o_t = S_t^T q_t / sqrt(k);   y = (RMSNorm_head(o) * swish(x W_r + b_r)) W_o

Low-rank gate ``W_1 [d, r]``, ``W_2 [r, h*k]`` (r = 16), gate normaliser ``tau = 16``; key dim
``d / (2h)`` and value dim ``d / h`` by default (the paper's expand ratios 0.5 and 1). The
per-head norm is an RMSNorm over each head's ``v`` dims with a per-channel scale (the paper
writes LayerNorm; RMSNorm follows its public code).

**HGRN-2** ("HGRN2: Gated Linear RNNs with State Expansion"): the forget gate with a lower bound
``beta`` is the decay and its complement the key (state expansion: the key is the ``k``-dim
forget gate, not a projection)::

    f_t = beta + (1 - beta) sigmoid(x W_f)   [b,t,h,k];   g_t = log f_t;   k_t = 1 - f_t
    q_t = silu(x W_q),  v_t = x W_i;   o_t = S_t^T q_t / sqrt(k);   y = RMSNorm(o) W_o

``beta = cfg.lower_bound`` is a fixed number per layer. In the paper the bound is learned across
the stack (``cumsum(softmax(Gamma))`` over layers, zero for the first); a pure layer does not
see its neighbours, so the model builder chooses each layer's value. The RMSNorm runs over all
``h*v`` dims; no extra output gate (the paper's output gate became the query).

**ReGLA** ("ReGLA: Refining Gated Linear Attention"). Equations implemented::

    phi_q(q_t) = exp(q_t - max_i q_{t,i})                    (per head)
    phi_k(k_t) = exp(k_t - m_t),  m_t = max(m_{t-1}, max_i k_{t,i})   (running max, per head)
    g = sigmoid(x W_g + b_g),  r = sigmoid(x W_r + b_r)      [b,t,h,k]
    F_t = (1 - r) g^2 + r (1 - (1 - g)^2)                    (the refining gate)
    S_t = diag(F_t) exp(m_{t-1} - m_t) S_{t-1} + phi_k(k_t) v_t^T
    o_t = alpha S_t^T phi_q(q_t),  alpha = 1 / (e sqrt(k (e^2 - 1)))   (variance reduction)
    y   = LayerNorm_head(o) W_o

The paper subtracts one maximum over *all* positions and dims from the keys. That constant
scales every ``o_t`` of a head equally, which the output LayerNorm removes; it needs the whole
sequence, so it is not causal. The running maximum ``m_t`` (kept in the decode state as
``"key_max"``; the rescaling ``exp(m_{t-1} - m_t) <= 1`` folds into the decay) gives bounded
features, causal decoding and the same output up to the LayerNorm's ``eps``. ``m`` and the
query maximum carry no gradient (stabilisers whose effect the LayerNorm removes). ``log F`` is
``logsigmoid(a) + log(g + 2 r (1 - g))``, formed with a log-sum-exp. Forget-gate bias: uniform gate
initialisation (``b_g = logit(u)``, ``u ~ U(1/16, 15/16)``, "Improving the Gating Mechanism of
Recurrent Neural Networks", where the refine gate comes from); refine bias zero. No output gate.

**Mamba-2** scalar gate (the SSD layer of "Transformers are SSMs: Generalized Models and
Efficient Algorithms Through Structured State Space Duality")::

    z = x W_z,  u = silu(x W_x) [b,t,h,v],  B = silu(x W_B), C = silu(x W_C) [b,t,n_groups,k]
    dt = softplus(x W_dt + dt_bias) [b,t,h],   A = -exp(A_log) [h]
    S_t = exp(dt_t A) S_{t-1} + (dt_t B_t) u_t^T;   o_t = S_t^T C_t + D u_t    (scale 1)
    y = RMSNorm(o * silu(z)) W_o

Heads share ``B, C`` within a group (head ``n`` reads group ``n // (h / n_groups)``). Defaults:
state dim ``k = 64``, head dim ``v = 2 d / h`` (expand 2); ``A_log = log U(1, 16)``,
``dt_bias = softplus^-1(dt)`` with ``dt`` log-uniform in ``[0.001, 0.1]`` (floor 1e-4), ``D = 1``;
the gated RMSNorm normalises over all ``h*v`` dims after the gate, as in Mamba-2.

None of these layers includes the short causal convolution the papers place before ``q, k, v``
(Mamba-2 applies its SiLU after that convolution; here it is applied to the projections). Compose
it separately (``jaxlayers.linear_attention.short_conv``).

Shapes: ``x [b, t, d] -> y [b, t, d]``. Decode state: ``{"s": [b, h, k, v]}`` float32, plus
``"key_max": [b, h]`` (``-inf`` when empty) for ReGLA. The mixer contract (``segment_ids``
resets, ``initial_state`` / ``return_state``, ``step``) is that of
:mod:`jaxlayers.linear_attention.decayed`; ``positions`` are accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxlayers import core, dense
from jaxlayers.linear_attention.decayed import (
    F32,
    Features,
    LinearMixerConfig,
    apply,
    heads,
    init,
    inv_sqrt_key_dim,
    log_ratio,
    mixer_fns,
    norm,
    param_f32,
    param_specs,
    proj,
    project_out,
    projection,
    segmented_scan,
    step,
    swish,
    vector_spec,
)

__all__ = [
    "param_specs",
    "init",
    "apply",
    "step",
    "init_state",
    "GLAConfig",
    "HGRN2Config",
    "ReGLAConfig",
    "Mamba2Config",
    "gla_apply",
    "gla_step",
    "hgrn2_apply",
    "hgrn2_step",
    "regla_apply",
    "regla_step",
    "refined_log_forget",
    "regla_variance_scale",
    "mamba2_apply",
    "mamba2_step",
]


def init_state(cfg: LinearMixerConfig, batch: int, dtype: Any = F32) -> dict[str, jax.Array]:
    """The empty decode state (``dtype`` unused: states are float32)."""
    del dtype
    state = {"s": jnp.zeros((batch, cfg.num_heads, cfg.dk, cfg.dv), F32)}
    if isinstance(cfg, ReGLAConfig):
        state["key_max"] = jnp.full((batch, cfg.num_heads), -jnp.inf, F32)
    return state


# =============================================================================================
# GLA
# =============================================================================================


@dataclasses.dataclass(frozen=True, kw_only=True)
class GLAConfig(LinearMixerConfig):
    """GLA. ``key_dim`` defaults to ``d_model // (2 num_heads)``, ``value_dim`` to
    ``d_model // num_heads``.

    Attributes:
      gate_low_rank: rank ``r`` of the decay projection ``W_1 W_2``.
      gate_normalizer: ``tau``; ``g = logsigmoid(.) / tau``.
      norm_eps: per-head RMSNorm epsilon.
    """

    gate_low_rank: int = 16
    gate_normalizer: float = 16.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if self.gate_low_rank <= 0:
            raise ValueError(f"gate_low_rank must be positive; got {self.gate_low_rank}")
        if not self.gate_normalizer > 0:
            raise ValueError(f"gate_normalizer must be > 0; got {self.gate_normalizer}")

    def default_key_dim(self) -> int:
        return max(1, self.d_model // (2 * self.num_heads))


def _gla_specs(cfg: GLAConfig) -> dict[str, Any]:
    d, hk, hv, r = cfg.d_model, cfg.num_heads * cfg.dk, cfg.num_heads * cfg.dv, cfg.gate_low_rank
    return {
        "q": dense.param_specs(projection(cfg, d, hk)),
        "k": dense.param_specs(projection(cfg, d, hk)),
        "v": dense.param_specs(projection(cfg, d, hv)),
        "decay_down": dense.param_specs(projection(cfg, d, r, kernel_axes=("embed", None))),
        "decay_up": dense.param_specs(
            projection(cfg, r, hk, kernel_axes=(None, "heads"), use_bias=True)
        ),
        "gate": dense.param_specs(projection(cfg, d, hv, use_bias=True)),
        "norm": {"scale": vector_spec(hv)},
        "o": dense.param_specs(projection(cfg, hv, d, into=False)),
    }


def _gla_features(params, x, cfg: GLAConfig, prev, segment_ids, positions) -> Features:
    del prev, segment_ids, positions
    h, hk, hv = cfg.num_heads, cfg.num_heads * cfg.dk, cfg.num_heads * cfg.dv
    q = heads(proj(params, "q", x, cfg, hk), h)
    k = heads(proj(params, "k", x, cfg, hk), h)
    v = heads(proj(params, "v", x, cfg, hv), h)
    low = proj(params, "decay_down", x, cfg, cfg.gate_low_rank, kernel_axes=("embed", None))
    logits = proj(params, "decay_up", low, cfg, hk, use_bias=True).astype(F32)
    log_decay = heads(jax.nn.log_sigmoid(logits) / cfg.gate_normalizer, h)
    gate = proj(params, "gate", x, cfg, hv, use_bias=True)
    return Features(q, k, v, log_decay, {}, gate)


def _gla_output(params, o, gate, cfg: GLAConfig):
    scale = param_f32(params["norm"]["scale"], gate.dtype)
    y = norm(o, per_head=True, centered=False, eps=cfg.norm_eps, scale=scale) * swish(gate)
    return project_out(params, y.astype(gate.dtype), cfg)


gla_apply, gla_step = mixer_fns(
    _gla_features,
    _gla_output,
    inv_sqrt_key_dim,
    init_state,
    "GLA over ``x [b, t, d]``; ``positions`` are ignored.",
)


# =============================================================================================
# HGRN-2
# =============================================================================================


@dataclasses.dataclass(frozen=True, kw_only=True)
class HGRN2Config(LinearMixerConfig):
    """HGRN-2; ``key_dim`` (the state expansion) and ``value_dim`` default to ``d_model //
    num_heads``.

    Attributes:
      lower_bound: ``beta`` in [0, 1): the forget gate's lower bound for this layer.
      norm_eps: RMSNorm epsilon.
    """

    lower_bound: float = 0.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.lower_bound < 1.0:
            raise ValueError(f"lower_bound must be in [0, 1); got {self.lower_bound}")


def _hgrn2_specs(cfg: HGRN2Config) -> dict[str, Any]:
    d, hk, hv = cfg.d_model, cfg.num_heads * cfg.dk, cfg.num_heads * cfg.dv
    return {
        "q": dense.param_specs(projection(cfg, d, hk)),
        "forget": dense.param_specs(projection(cfg, d, hk)),
        "input": dense.param_specs(projection(cfg, d, hv)),
        "norm": {"scale": vector_spec(hv)},
        "o": dense.param_specs(projection(cfg, hv, d, into=False)),
    }


def _hgrn2_features(params, x, cfg: HGRN2Config, prev, segment_ids, positions) -> Features:
    del prev, segment_ids, positions
    h, hk, hv = cfg.num_heads, cfg.num_heads * cfg.dk, cfg.num_heads * cfg.dv
    q = swish(proj(params, "q", x, cfg, hk)).astype(x.dtype)
    a = proj(params, "forget", x, cfg, hk).astype(F32)
    beta = cfg.lower_bound
    log_f = jax.nn.log_sigmoid(a)
    if beta > 0.0:  # log(beta + (1 - beta) sigmoid(a))
        log_f = jnp.logaddexp(math.log(beta), math.log1p(-beta) + log_f)
    k = ((1.0 - beta) * jax.nn.sigmoid(-a)).astype(x.dtype)  # 1 - f, without cancellation
    v = proj(params, "input", x, cfg, hv)
    return Features(heads(q, h), heads(k, h), heads(v, h), heads(log_f, h), {}, x.dtype)


def _hgrn2_output(params, o, dtype, cfg: HGRN2Config):
    scale = param_f32(params["norm"]["scale"], dtype)
    y = norm(o, per_head=False, centered=False, eps=cfg.norm_eps, scale=scale)
    return project_out(params, y.astype(dtype), cfg)


hgrn2_apply, hgrn2_step = mixer_fns(
    _hgrn2_features,
    _hgrn2_output,
    inv_sqrt_key_dim,
    init_state,
    "HGRN-2 over ``x [b, t, d]``; ``positions`` are ignored.",
)


# =============================================================================================
# ReGLA
# =============================================================================================


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReGLAConfig(LinearMixerConfig):
    """ReGLA; ``key_dim`` and ``value_dim`` default to ``d_model // num_heads``.

    Attributes:
      norm_eps: per-head LayerNorm epsilon.
    """

    norm_eps: float = 1e-5


def _uniform_gate_bias(key, shape, dtype=F32):
    u = jax.random.uniform(key, shape, F32, 1.0 / 16.0, 15.0 / 16.0)
    return (jnp.log(u) - jnp.log1p(-u)).astype(dtype)


def regla_variance_scale(key_dim: int) -> float:
    """``1 / (e sqrt(k (e^2 - 1)))``."""
    return 1.0 / (math.e * math.sqrt(key_dim * (math.e**2 - 1.0)))


def _regla_specs(cfg: ReGLAConfig) -> dict[str, Any]:
    d, hk, hv = cfg.d_model, cfg.num_heads * cfg.dk, cfg.num_heads * cfg.dv
    forget = dense.param_specs(projection(cfg, d, hk, use_bias=True))
    forget["bias"] = dataclasses.replace(forget["bias"], init=_uniform_gate_bias)
    return {
        "q": dense.param_specs(projection(cfg, d, hk)),
        "k": dense.param_specs(projection(cfg, d, hk)),
        "v": dense.param_specs(projection(cfg, d, hv)),
        "forget": forget,
        "refine": dense.param_specs(projection(cfg, d, hk, use_bias=True)),
        "norm": {"scale": vector_spec(hv), "bias": vector_spec(hv, core.initializers.zeros)},
        "o": dense.param_specs(projection(cfg, hv, d, into=False)),
    }


def refined_log_forget(a: jax.Array, c: jax.Array) -> jax.Array:
    """``log F`` for ``F = (1 - r) g^2 + r (1 - (1 - g)^2)``, ``g = sigmoid(a)``,
    ``r = sigmoid(c)``; uses ``F = g (g + 2 r (1 - g))``. Float32, <= 0."""
    a, c = a.astype(F32), c.astype(F32)
    log_g = jax.nn.log_sigmoid(a)
    inner = jnp.logaddexp(log_g, math.log(2.0) + jax.nn.log_sigmoid(c) + jax.nn.log_sigmoid(-a))
    return jnp.minimum(log_g + inner, 0.0)


def _regla_features(params, x, cfg: ReGLAConfig, prev, segment_ids, positions) -> Features:
    del positions
    h, hk, hv = cfg.num_heads, cfg.num_heads * cfg.dk, cfg.num_heads * cfg.dv
    q = heads(proj(params, "q", x, cfg, hk), h).astype(F32)
    q = jnp.exp(q - jax.lax.stop_gradient(jnp.max(q, axis=-1, keepdims=True)))
    k = heads(proj(params, "k", x, cfg, hk), h).astype(F32)
    init_max = None if prev is None else prev["key_max"]
    m, prev_m = segmented_scan(
        jax.lax.stop_gradient(jnp.max(k, axis=-1)), segment_ids, init_max, jnp.maximum
    )
    k = jnp.exp(k - m[..., None])
    log_f = refined_log_forget(
        proj(params, "forget", x, cfg, hk, use_bias=True),
        proj(params, "refine", x, cfg, hk, use_bias=True),
    )
    log_decay = jnp.minimum(heads(log_f, h) + log_ratio(prev_m, m)[..., None], 0.0)
    v = heads(proj(params, "v", x, cfg, hv), h)
    return Features(
        q.astype(x.dtype), k.astype(x.dtype), v, log_decay, {"key_max": m[:, -1]}, x.dtype
    )


def _regla_output(params, o, dtype, cfg: ReGLAConfig):
    p = params["norm"]
    y = norm(
        o,
        per_head=True,
        centered=True,
        eps=cfg.norm_eps,
        scale=param_f32(p["scale"], dtype),
        bias=param_f32(p["bias"], dtype),
    )
    return project_out(params, y.astype(dtype), cfg)


regla_apply, regla_step = mixer_fns(
    _regla_features,
    _regla_output,
    lambda cfg: regla_variance_scale(cfg.dk),
    init_state,
    "ReGLA over ``x [b, t, d]``; ``positions`` are ignored.",
)


# =============================================================================================
# Mamba-2 (SSD) scalar gate
# =============================================================================================


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config(LinearMixerConfig):
    """Mamba-2 SSD mixer. ``key_dim`` is the SSM state size (default 64); ``value_dim`` the
    head dim (default ``2 d_model // num_heads``).

    Attributes:
      num_groups: groups of heads sharing ``B`` and ``C`` (divides ``num_heads``).
      dt_min, dt_max, dt_init_floor: range of the initial step size ``dt``.
      a_init_range: range of the initial ``-A = exp(A_log)``.
      norm_eps: gated RMSNorm epsilon.
    """

    num_groups: int = 1
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    a_init_range: tuple[float, float] = (1.0, 16.0)
    norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        core.check_divisible(self.num_heads, self.num_groups, "num_heads", "num_groups")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; got {self.dt_min}, "
                f"{self.dt_max}"
            )
        lo, hi = self.a_init_range
        if not 0.0 < lo <= hi:
            raise ValueError(f"a_init_range must satisfy 0 < lo <= hi; got {self.a_init_range}")

    def default_key_dim(self) -> int:
        return 64

    def default_value_dim(self) -> int:
        return 2 * self.d_model // self.num_heads


def _dt_bias_init(cfg: Mamba2Config):
    lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)

    def init(key, shape, dtype=F32):
        dt = jnp.exp(jax.random.uniform(key, shape, F32, lo, hi))
        dt = jnp.maximum(dt, cfg.dt_init_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus^-1(dt)

    return init


def _a_log_init(cfg: Mamba2Config):
    lo, hi = cfg.a_init_range

    def init(key, shape, dtype=F32):
        return jnp.log(jax.random.uniform(key, shape, F32, lo, hi)).astype(dtype)

    return init


def _mamba2_specs(cfg: Mamba2Config) -> dict[str, Any]:
    d, h, hv, gk = cfg.d_model, cfg.num_heads, cfg.num_heads * cfg.dv, cfg.num_groups * cfg.dk
    return {
        "z": dense.param_specs(projection(cfg, d, hv)),
        "x": dense.param_specs(projection(cfg, d, hv)),
        "b": dense.param_specs(projection(cfg, d, gk, kernel_axes=("embed", None))),
        "c": dense.param_specs(projection(cfg, d, gk, kernel_axes=("embed", None))),
        "dt": dense.param_specs(projection(cfg, d, h)),
        "dt_bias": vector_spec(h, _dt_bias_init(cfg)),
        "a_log": vector_spec(h, _a_log_init(cfg)),
        "d_skip": vector_spec(h),
        "norm": {"scale": vector_spec(hv)},
        "o": dense.param_specs(projection(cfg, hv, d, into=False)),
    }


def _to_heads(a: jax.Array, cfg: Mamba2Config) -> jax.Array:
    """``[b, t, n_groups*k] -> [b, t, h, k]`` (each group repeated for its heads)."""
    a = heads(a, cfg.num_groups)
    return jnp.repeat(a, cfg.num_heads // cfg.num_groups, axis=2)


def _mamba2_features(params, x, cfg: Mamba2Config, prev, segment_ids, positions) -> Features:
    del prev, segment_ids, positions
    dtype, h, hv, gk = x.dtype, cfg.num_heads, cfg.num_heads * cfg.dv, cfg.num_groups * cfg.dk
    z = proj(params, "z", x, cfg, hv)
    u = heads(swish(proj(params, "x", x, cfg, hv)).astype(dtype), h)
    bk = _to_heads(swish(proj(params, "b", x, cfg, gk, kernel_axes=("embed", None))), cfg)
    ck = _to_heads(swish(proj(params, "c", x, cfg, gk, kernel_axes=("embed", None))), cfg)
    dt_raw = proj(params, "dt", x, cfg, h).astype(F32)
    dt = jax.nn.softplus(dt_raw + param_f32(params["dt_bias"], dtype)[None, None, :])
    a = -jnp.exp(param_f32(params["a_log"], dtype))
    log_decay = dt * a[None, None, :]
    k = (bk * dt[..., None]).astype(dtype)
    return Features(ck.astype(dtype), k, u, log_decay, {}, (z, u))


def _mamba2_output(params, o, aux, cfg: Mamba2Config):
    z, u = aux
    dtype = z.dtype
    skip = param_f32(params["d_skip"], dtype)[None, None, :, None]
    y = o.astype(F32) + skip * u.astype(F32)
    y = heads(y.reshape(*y.shape[:2], -1) * swish(z), cfg.num_heads)
    scale = param_f32(params["norm"]["scale"], dtype)
    y = norm(y, per_head=False, centered=False, eps=cfg.norm_eps, scale=scale)
    return project_out(params, y.astype(dtype), cfg)


mamba2_apply, mamba2_step = mixer_fns(
    _mamba2_features,
    _mamba2_output,
    lambda cfg: 1.0,
    init_state,
    "Mamba-2 SSD over ``x [b, t, d]``; ``positions`` are ignored.",
)


# =============================================================================================
# Registration
# =============================================================================================

_EXAMPLE = dict(d_model=16, num_heads=2, chunk_size=16)
_SHAPE = (2, 8, 16)
_LAYERS = (
    ("gla", GLAConfig(gate_low_rank=4, **_EXAMPLE), _gla_specs, gla_apply, gla_step),
    ("hgrn2", HGRN2Config(lower_bound=0.5, **_EXAMPLE), _hgrn2_specs, hgrn2_apply, hgrn2_step),
    ("regla", ReGLAConfig(**_EXAMPLE), _regla_specs, regla_apply, regla_step),
    ("mamba2", Mamba2Config(key_dim=8, **_EXAMPLE), _mamba2_specs, mamba2_apply, mamba2_step),
)
for _name, _cfg, _specs, _apply, _step in _LAYERS:
    core.register_layer(
        _name,
        type(_cfg),
        param_specs=_specs,
        apply=_apply,
        init_state=init_state,
        step=_step,
        example=core.Example(config=_cfg, input_shape=_SHAPE),
        kind="mixer",
    )

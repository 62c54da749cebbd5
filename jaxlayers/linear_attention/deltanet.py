"""DeltaNet and Gated DeltaNet token mixers, on ``pallas_kernels.linear_attention.delta_rule``.

DeltaNet ("Parallelizing Linear Transformers with the Delta Rule over Sequence Length"), per
head, with state ``S [k, v]``::

    q_t, k_t, v_t = SiLU(conv(x W_q))_t, SiLU(conv(x W_k))_t, SiLU(conv(x W_v))_t   (short convs)
    q_t, k_t      = q_t / ||q_t||, k_t / ||k_t||                                     (L2 norm)
    beta_t        = sigmoid(x_t W_beta)                                              (in (0, 1))
    S_t           = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t           = S_t^T (scale q_t)
    y_t           = concat_heads( RMSNorm(o_t) [* SiLU(x_t W_g)] ) W_o

Gated DeltaNet ("Gated Delta Networks: Improving Mamba2 with Delta Rule") multiplies the state by
a data-dependent scalar decay per head and step, ``alpha_t = exp(g_t) in (0, 1]``::

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    g_t = -exp(A_log) * softplus(x_t W_a + dt_bias)                       (= -A dt_t, Mamba-2)

i.e. Mamba-2's discretisation ``alpha = exp(dt A)`` with ``A = -exp(A_log) < 0`` per head and a
step ``dt_t = softplus(x_t W_a + dt_bias) > 0``. Gated DeltaNet has the output gate by default
(``use_output_gate=True``, as in the paper); DeltaNet has it off by default.
``A`` starts uniform in ``a_init_range`` (1, 16), Mamba-2's range (a lower end of 0, as in some
public code, would allow ``A_log = -inf``), and ``dt_bias`` so that ``softplus(dt_bias)`` is
log-uniform in ``[dt_min, dt_max]`` (floored at ``dt_init_floor``), as in Mamba-2.

Shapes: ``x [b, t, d] -> y [b, t, d]``; ``h`` heads, key dim ``k`` (``head_dim``), value dim
``v`` (``value_dim``; the Gated DeltaNet paper uses ``v = 2k``); ``scale`` defaults to
``k ** -0.5``.

Choices the papers leave open, made here:

* The short convs (kernel ``conv_size`` = 4, no bias) run over the projected q, k and v
  channels, each followed by SiLU; with ``use_short_conv=False`` the SiLU is applied directly.
* L2 norm: ``x * rsqrt(sum(x^2) + 1e-6)`` in float32.
* The output norm is an RMSNorm over each head's ``v`` features with one learned scale ``[v]``
  shared by the heads (``eps = norm_eps``); the optional gate (``use_output_gate``) multiplies
  after the norm.
* Decays are computed in float32; the recurrent state is float32 whatever the compute dtype.
* ``positions`` is accepted (mixer contract) and ignored.

Special case: a Gated DeltaNet whose decay is 1 (``g = 0``, e.g. ``A_log = -1e4`` so that
``exp(A_log)`` underflows to 0) is exactly a DeltaNet with ``use_output_gate=True`` and the same
params minus ``"decay"``: the two configs share every field and every other param name.

Params (``dense`` projections ``{"kernel": [in, out]}``, no biases)::

    "q": [d, h*k]  "k": [d, h*k]  "v": [d, h*v]  "beta": [d, h]          axes ("embed", "heads")
    "q_conv", "k_conv", "v_conv": {"kernel": [K, channels]}              (use_short_conv)
    "o_norm": {"scale": [v]}
    "g": [d, h*v]                                                        (use_output_gate)
    "o": [h*v, d]                                                        axes ("heads", "embed")
    "decay": {"kernel": [d, h], "a_log": [h], "dt_bias": [h]}            (Gated DeltaNet only)

Decode state: ``{"conv_q", "conv_k": [b, K-1, h*k], "conv_v": [b, K-1, h*v]`` (conv caches,
only with short convs, in the requested dtype) ``, "recurrent": [b, h, k, v] float32}``.
``apply(..., return_state=True)`` returns it after the last token (of the last packed sequence
with ``segment_ids``), so prefill + :func:`step` per token equals ``apply``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxlayers import core, dense
from jaxlayers.linear_attention import short_conv
from pallas_kernels import _platform
from pallas_kernels.linear_attention import api
from pallas_kernels.linear_attention.block_sizes import check_chunk_size

__all__ = [
    "DeltaNetConfig",
    "GatedDeltaNetConfig",
    "Config",
    "param_specs",
    "init",
    "apply",
    "init_state",
    "step",
    "l2_normalize",
    "head_rms_norm",
    "decay_param_specs",
    "log_decay",
    "check_state",
    "check_input",
    "check_mixer_fields",
    "check_decay_fields",
    "state_shapes",
    "dense_cfg",
    "conv_features",
    "conv_features_step",
]

L2_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def check_mixer_fields(cfg: Any) -> None:
    """Validation shared by the delta-rule mixers (DeltaNet, Gated DeltaNet, MoM)."""
    if cfg.d_model <= 0 or cfg.num_heads <= 0:
        raise ValueError(
            "d_model and num_heads must be positive; "
            f"got d_model={cfg.d_model}, num_heads={cfg.num_heads}"
        )
    if cfg.head_dim is None:
        core.check_divisible(cfg.d_model, cfg.num_heads, "d_model", "num_heads")
    if cfg.key_dim <= 0 or cfg.val_dim <= 0:
        raise ValueError(
            f"head_dim and value_dim must be positive; got {cfg.head_dim}, {cfg.value_dim}"
        )
    if cfg.conv_size < 1:
        raise ValueError(f"conv_size must be >= 1; got conv_size={cfg.conv_size}")
    _platform.check_implementation(cfg.implementation)
    if cfg.chunk_size is not None:
        check_chunk_size(cfg.chunk_size)
    if cfg.norm_eps <= 0:
        raise ValueError(f"norm_eps must be positive; got norm_eps={cfg.norm_eps}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeltaNetConfig(core.LayerConfig):
    """DeltaNet config.

    Attributes:
      d_model: model width ``d``.
      num_heads: heads ``h``.
      head_dim: key/query dim per head ``k``; None = ``d_model // num_heads``.
      value_dim: value dim per head ``v``; None = ``head_dim``.
      use_short_conv: causal depthwise convs (+ SiLU) on q, k and v.
      conv_size: taps of the short convs.
      conv_bias: biases on the short convs.
      use_output_gate: multiply the normed output by ``SiLU(x W_g)``.
      norm_eps: epsilon of the output RMSNorm.
      scale: query scale; None = ``head_dim ** -0.5``.
      implementation: of the delta-rule op: None (auto), "pallas", "xla" or "reference".
      chunk_size: chunk of the op (power of two >= 16); None = its default.
      interpret: run the Pallas kernels in interpret mode (CPU tests).

    Resolved values: :attr:`key_dim`, :attr:`val_dim`.
    """

    d_model: int
    num_heads: int
    head_dim: int | None = None
    value_dim: int | None = None
    use_short_conv: bool = True
    conv_size: int = 4
    conv_bias: bool = False
    use_output_gate: bool = False
    norm_eps: float = 1e-5
    scale: float | None = None
    implementation: str | None = None
    chunk_size: int | None = None
    interpret: bool = False

    def __post_init__(self):
        check_mixer_fields(self)

    @property
    def key_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def val_dim(self) -> int:
        return self.key_dim if self.value_dim is None else self.value_dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedDeltaNetConfig(DeltaNetConfig):
    """Gated DeltaNet config: the DeltaNet fields (output gate on by default) plus the decay.

    Attributes:
      a_init_range: ``A`` is initialised uniform in this range (``A_log = log A``).
      dt_min, dt_max: ``softplus(dt_bias)`` is initialised log-uniform in ``[dt_min, dt_max]``.
      dt_init_floor: lower bound on that initial ``dt``.
    """

    use_output_gate: bool = True
    a_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        check_decay_fields(self)


Config = DeltaNetConfig


def check_decay_fields(cfg: Any) -> None:
    lo, hi = cfg.a_init_range
    if not 0 < lo <= hi:
        raise ValueError(f"a_init_range must satisfy 0 < lo <= hi; got {cfg.a_init_range}")
    if not 0 < cfg.dt_min <= cfg.dt_max:
        raise ValueError(
            f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; "
            f"got dt_min={cfg.dt_min}, dt_max={cfg.dt_max}"
        )


def _gated(cfg: DeltaNetConfig) -> bool:
    return isinstance(cfg, GatedDeltaNetConfig)


# --------------------------------------------------------------------------------------------
# Building blocks shared with the other delta-rule mixers (MoM)
# --------------------------------------------------------------------------------------------


def l2_normalize(x: jax.Array, eps: float = L2_EPS) -> jax.Array:
    """``x * rsqrt(sum(x^2, -1) + eps)`` in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype)


def head_rms_norm(scale: jax.Array, o: jax.Array, gate: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm over the last axis of ``o [..., v]`` times ``scale [v]`` (times ``SiLU(gate)``).

    Float32 arithmetic, result in o's dtype; ``scale`` is cast to o's dtype first.
    """
    o32 = o.astype(jnp.float32)
    y = o32 * jax.lax.rsqrt(jnp.mean(jnp.square(o32), axis=-1, keepdims=True) + eps)
    y = y * scale.astype(o.dtype).astype(jnp.float32).reshape((1,) * (o.ndim - 1) + (-1,))
    if gate is not None:
        y = y * jax.nn.silu(gate.astype(jnp.float32))
    return y.astype(o.dtype)


def _a_log_init(lo: float, hi: float) -> core.Initializer:
    def init(key, shape, dtype=jnp.float32):
        a = jax.random.uniform(key, shape, jnp.float32, lo, hi)
        return jnp.log(a).astype(dtype)

    return init


def _dt_bias_init(dt_min: float, dt_max: float, floor: float) -> core.Initializer:
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus^-1(dt)

    return init


def decay_param_specs(cfg: Any, groups: int = 1) -> dict[str, core.ParamSpec]:
    """``{"kernel": [d, groups*h], "a_log": [h], "dt_bias": [h]}`` of the Mamba-2 style decay.

    ``groups > 1`` gives every group of ``h`` heads (MoM's memories) its own projection; ``A``
    and ``dt_bias`` are shared by the groups.
    """
    h = cfg.num_heads
    return {
        "kernel": core.ParamSpec(
            (cfg.d_model, groups * h), core.initializers.fan_in(1.0), ("embed", "heads")
        ),
        "a_log": core.ParamSpec((h,), _a_log_init(*cfg.a_init_range), ("heads",)),
        "dt_bias": core.ParamSpec(
            (h,), _dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor), ("heads",)
        ),
    }


def log_decay(params: core.Params, x: jax.Array) -> jax.Array:
    """``g = -exp(a_log) * softplus(x W_a + dt_bias)``: ``x [..., d] -> [..., groups*h]``
    float32 (group-major; see :func:`decay_param_specs`)."""
    p = core.cast_floating(params, x.dtype)
    h = p["a_log"].shape[0]
    a = jnp.matmul(x, p["kernel"]).astype(jnp.float32)
    a = a.reshape(*a.shape[:-1], a.shape[-1] // h, h)
    bcast = (1,) * (a.ndim - 1) + (h,)
    dt = jax.nn.softplus(a + p["dt_bias"].astype(jnp.float32).reshape(bcast))
    g = -jnp.exp(p["a_log"].astype(jnp.float32)).reshape(bcast) * dt
    return g.reshape(*g.shape[:-2], -1)


def state_shapes(cfg: Any, batch: int, conv_channels: dict[str, int], heads: int):
    """Expected shapes of a decode state: conv caches (if any) and ``"recurrent"``."""
    shapes = {}
    if cfg.use_short_conv:
        for name, c in conv_channels.items():
            shapes[f"conv_{name}"] = (batch, cfg.conv_size - 1, c)
    shapes["recurrent"] = (batch, heads, cfg.key_dim, cfg.val_dim)
    return shapes


def check_state(state: Any, shapes: dict[str, tuple[int, ...]], name: str) -> None:
    """Raise unless ``state`` is a dict with exactly the keys and shapes of ``shapes``."""
    if not isinstance(state, dict) or set(state) != set(shapes):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{name} must be a dict with keys {sorted(shapes)}; got {got}")
    for key, want in shapes.items():
        core.check_floating(state[key], f"{name}[{key!r}]")
        if tuple(jnp.shape(state[key])) != want:
            raise ValueError(f"{name}[{key!r}] must have shape {want}; got {jnp.shape(state[key])}")


def check_input(x: jax.Array, d_model: int, rank: int, name: str, layout: str) -> None:
    core.check_floating(x, name)
    core.check_rank(x, rank, name, layout)
    core.check_dim(x, -1, d_model, name, "d_model")


def dense_cfg(cfg: Any, d_in: int, d_out: int, axes=("embed", "heads")) -> dense.Config:
    return dense.Config(
        d_in=d_in,
        d_out=d_out,
        use_bias=False,
        kernel_axes=axes,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )


def conv_features(
    params: core.Params,
    feats: dict[str, jax.Array],
    cfg: Any,
    *,
    segment_ids=None,
    initial_state=None,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Short conv + SiLU (or SiLU alone) on each ``feats[name] [b, t, c]``.

    Returns the features and the conv caches ``{"conv_<name>": [b, K-1, c]}`` (empty without
    short convs).
    """
    out, caches = {}, {}
    for name, f in feats.items():
        if not cfg.use_short_conv:
            out[name] = jax.nn.silu(f)
            continue
        p = params[f"{name}_conv"]
        init = None if initial_state is None else initial_state[f"conv_{name}"]
        out[name], caches[f"conv_{name}"] = short_conv.causal_conv(
            f,
            p["kernel"],
            p.get("bias"),
            activation="silu",
            segment_ids=segment_ids,
            initial_state=init,
        )
    return out, caches


def conv_features_step(
    params: core.Params, feats: dict[str, jax.Array], cfg: Any, state: dict[str, jax.Array]
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """One token of :func:`conv_features`: ``feats[name] [b, c]``."""
    out, caches = {}, {}
    for name, f in feats.items():
        if not cfg.use_short_conv:
            out[name] = jax.nn.silu(f)
            continue
        p = params[f"{name}_conv"]
        out[name], caches[f"conv_{name}"] = short_conv.causal_conv_step(
            f, p["kernel"], p.get("bias"), state=state[f"conv_{name}"], activation="silu"
        )
    return out, caches


# --------------------------------------------------------------------------------------------
# Params and state
# --------------------------------------------------------------------------------------------


def _proj_cfgs(cfg: DeltaNetConfig) -> dict[str, dense.Config]:
    d, h, dk, dv = cfg.d_model, cfg.num_heads, cfg.key_dim, cfg.val_dim
    cfgs = {
        "q": dense_cfg(cfg, d, h * dk),
        "k": dense_cfg(cfg, d, h * dk),
        "v": dense_cfg(cfg, d, h * dv),
        "beta": dense_cfg(cfg, d, h),
        "o": dense_cfg(cfg, h * dv, d, ("heads", "embed")),
    }
    if cfg.use_output_gate:
        cfgs["g"] = dense_cfg(cfg, d, h * dv)
    return cfgs


def _conv_channels(cfg: DeltaNetConfig) -> dict[str, int]:
    h = cfg.num_heads
    return {"q": h * cfg.key_dim, "k": h * cfg.key_dim, "v": h * cfg.val_dim}


def param_specs(cfg: DeltaNetConfig) -> dict[str, Any]:
    specs: dict[str, Any] = {name: dense.param_specs(c) for name, c in _proj_cfgs(cfg).items()}
    if cfg.use_short_conv:
        for name, c in _conv_channels(cfg).items():
            specs[f"{name}_conv"] = short_conv.conv_param_specs(c, cfg.conv_size, cfg.conv_bias)
    specs["o_norm"] = {"scale": core.ParamSpec((cfg.val_dim,), core.initializers.ones, (None,))}
    if _gated(cfg):
        specs["decay"] = decay_param_specs(cfg)
    return specs


def init(key: jax.Array, cfg: DeltaNetConfig) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def _state_shapes(cfg: DeltaNetConfig, batch: int) -> dict[str, tuple[int, ...]]:
    return state_shapes(cfg, batch, _conv_channels(cfg), cfg.num_heads)


def init_state(cfg: DeltaNetConfig, batch: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Zero state: conv caches in ``dtype``, ``"recurrent"`` ``[b, h, k, v]`` in float32."""
    return {
        name: jnp.zeros(shape, jnp.float32 if name == "recurrent" else dtype)
        for name, shape in _state_shapes(cfg, batch).items()
    }


# --------------------------------------------------------------------------------------------
# apply / step
# --------------------------------------------------------------------------------------------


def _project(params, x, cfg: DeltaNetConfig):
    """Projections of ``x [..., d]``: (q/k/v features, beta, log decay or None, gate or None)."""
    pc = _proj_cfgs(cfg)
    feats = {name: dense.apply(params[name], x, pc[name]) for name in ("q", "k", "v")}
    beta = jax.nn.sigmoid(dense.apply(params["beta"], x, pc["beta"]).astype(jnp.float32))
    g = log_decay(params["decay"], x) if _gated(cfg) else None
    gate = dense.apply(params["g"], x, pc["g"]) if cfg.use_output_gate else None
    return feats, beta, g, gate


def _heads(feats, cfg: DeltaNetConfig):
    lead = feats["q"].shape[:-1]
    h, dk, dv = cfg.num_heads, cfg.key_dim, cfg.val_dim
    q = l2_normalize(feats["q"].reshape(*lead, h, dk))
    k = l2_normalize(feats["k"].reshape(*lead, h, dk))
    v = feats["v"].reshape(*lead, h, dv)
    return q, k, v


def _output(params, o, gate, cfg: DeltaNetConfig):
    lead = o.shape[:-2]
    h, dv = cfg.num_heads, cfg.val_dim
    if gate is not None:
        gate = gate.reshape(*lead, h, dv)
    o = head_rms_norm(params["o_norm"]["scale"], o, gate, cfg.norm_eps)
    return dense.apply(params["o"], o.reshape(*lead, h * dv), _proj_cfgs(cfg)["o"])


def apply(
    params: core.Params,
    x: jax.Array,
    cfg: DeltaNetConfig,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    initial_state: dict[str, jax.Array] | None = None,
    return_state: bool = False,
):
    """(Gated) DeltaNet over ``x [b, t, d]`` -> ``[b, t, d]`` (and the decode state).

    Args:
      segment_ids: int ``[b, t]``; the recurrence and the convs restart wherever it changes.
      positions: ignored.
      initial_state: a state from :func:`init_state` or a previous call; with ``segment_ids``
        it reaches only the first packed sequence of each row.
      return_state: also return the state after the last token (with ``segment_ids``, the
        state of the last packed sequence).
    """
    del positions
    check_input(x, cfg.d_model, 3, "x", "[batch, time, d_model]")
    b, t, _ = x.shape
    if segment_ids is not None:
        short_conv.check_segment_ids(segment_ids, b, t)
    if initial_state is not None:
        check_state(initial_state, _state_shapes(cfg, b), "initial_state")
    x = x.astype(core.compute_dtype(cfg, x))

    feats, beta, g, gate = _project(params, x, cfg)
    feats, caches = conv_features(
        params, feats, cfg, segment_ids=segment_ids, initial_state=initial_state
    )
    q, k, v = _heads(feats, cfg)
    res = api.delta_rule(
        q,
        k,
        v,
        beta,
        g,
        scale=cfg.scale,
        initial_state=None if initial_state is None else initial_state["recurrent"],
        return_final_state=return_state,
        segment_ids=segment_ids,
        chunk_size=cfg.chunk_size,
        implementation=cfg.implementation,
        interpret=cfg.interpret,
    )
    o, final = res if return_state else (res, None)
    y = _output(params, o, gate, cfg)
    if not return_state:
        return y
    return y, {**caches, "recurrent": final}


def step(params: core.Params, state: dict[str, jax.Array], x_t: jax.Array, cfg: DeltaNetConfig):
    """Decode one token: ``x_t [b, d]`` -> ``(y_t [b, d], state)``."""
    check_input(x_t, cfg.d_model, 2, "x_t", "[batch, d_model]")
    check_state(state, _state_shapes(cfg, x_t.shape[0]), "state")
    x_t = x_t.astype(core.compute_dtype(cfg, x_t))
    feats, beta, g, gate = _project(params, x_t, cfg)
    feats, caches = conv_features_step(params, feats, cfg, state)
    q, k, v = _heads(feats, cfg)
    o, rec = api.delta_rule_step(q, k, v, beta, g, state=state["recurrent"], scale=cfg.scale)
    return _output(params, o, gate, cfg), {**caches, "recurrent": rec}


_EXAMPLE = dict(d_model=16, num_heads=2, head_dim=8, value_dim=8)

core.register_layer(
    "deltanet",
    DeltaNetConfig,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    # bf16 rounds q, k, v and the norms' inputs: ~1.2e-2 relative error measured at this size.
    example=core.Example(config=DeltaNetConfig(**_EXAMPLE), input_shape=(2, 8, 16), rtol_bf16=3e-2),
    kind="mixer",
)
core.register_layer(
    "gated_deltanet",
    GatedDeltaNetConfig,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    example=core.Example(
        config=GatedDeltaNetConfig(**{**_EXAMPLE, "value_dim": 16}),
        input_shape=(2, 8, 16),
        rtol_bf16=3e-2,
    ),
    kind="mixer",
)

"""LION: bidirectional (non-causal) linear attention with an optional decay mask.

From "LION: Linear Attention for Efficient Bidirectional Sequence Modeling" (Afzal et al.).
Every token attends to every token of its sequence, through a mask ``M`` of decays::

    q, k, v = x W_q, x W_k, x W_v                          [b, t, h, k]
    A_ij = scale phi(q_i) . phi(k_j) * M_ij                [b, h, t, t]
    o_i  = sum_j A_ij v_j / (sum_j A_ij + eps)            (``normalize=True``; else no division)
    y    = concat_heads(o) W_o                             [b, t, d]

with, for per-token decays ``lambda_t in (0, 1]`` and ``L_t = sum_{s<=t} log lambda_s``::

    M_ij = prod_{s=min(i,j)+1}^{max(i,j)} lambda_s = exp(-|L_i - L_j|)     (M_ii = 1)

The three variants of the paper are the choices of ``lambda`` (``cfg.decay``):
``None`` — LION-LIT, ``M = 1`` (bidirectional "Transformers are RNNs" attention; default map
elu + 1); ``"fixed"`` — LION-D, one learned ``lambda_h`` per head (RetNet-style,
``M_ij = lambda_h^{|i - j|}``); ``"selective"`` — LION-S, ``lambda_t = sigmoid(x_t w_h + c_h)``
per token and head.

Two forms compute the same function (``cfg.form``):

* ``"full"`` (:func:`full_form`): the masked ``t x t`` matrix above, O(t^2) — the paper's
  parallel training form.
* ``"two_scan"`` (:func:`two_scan_form`, default): the bidirectional RNN. A forward recurrence
  ``S^F_i = lambda_i S^F_{i-1} + phi(k_i) v_i^T`` and a backward one
  ``S^B_i = lambda_{i+1} S^B_{i+1} + phi(k_i) v_i^T`` cover ``j <= i`` and ``j >= i``; the
  diagonal ``j = i`` is in both, so ``o_i = phi(q_i)^T (S^F_i + S^B_i) - phi(q_i).phi(k_i) v_i``
  (the paper splits the diagonal half to each direction; subtracting it once is the same sum).
  Both recurrences run on :func:`pallas_kernels.linear_attention.gated_linear_attention` (the
  backward one on the time-reversed inputs with the decays reversed and shifted by one), so the
  Pallas kernels serve them on GPU/TPU. The denominators use the same recurrence on
  ``phi(k)`` alone, run with :func:`~jaxlayers.linear_attention.linear_attn.linear_scan`.

Choices the paper leaves open, made here:

* The mask of LION-S is the symmetric one above: the decay between tokens ``i < j`` is the
  product of the ``lambda`` of tokens ``i+1 .. j`` in both directions.
* LION-D init: ``lambda_h = 1 - 2^{-5-h}`` (RetNet's schedule), stored as a logit ``[h]``;
  LION-S init: the bias ``c`` starts at the same logits and ``w`` small (fan-in, variance 0.01).
  ``log lambda = log_sigmoid(logit)`` keeps decays near 1 accurate in float32.
* ``scale``: 1 with ``normalize`` (it cancels), else ``f ** -0.5``; ``eps = 1e-6``.
* ``segment_ids [b, t]``: attention stays inside each sequence (a new one starts wherever the id
  differs from the previous position's); both forms honour them.
* Dtypes: projections and the scans run in the compute dtype (float32 accumulation); masks,
  denominators and the division in float32.

LION is non-causal: there is no ``step``; ``initial_state``/``return_state`` raise. Params:
``"q"``, ``"k"``, ``"v"``, ``"o"`` (as in :mod:`~jaxlayers.linear_attention.linear_attn`),
``"feature_map"`` when the map has params, and ``"decay"``: ``{"logit": [h]}`` (fixed) or
``{"kernel": [d, h], "bias": [h]}`` (selective).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayers import core
from jaxlayers.linear_attention import feature_maps as fmaps
from jaxlayers.linear_attention import linear_attn as la
from pallas_kernels import linear_attention as la_ops

__all__ = [
    "DECAYS",
    "FORMS",
    "Config",
    "param_specs",
    "init",
    "apply",
    "log_decay",
    "decay_mask",
    "full_form",
    "two_scan_form",
    "check_no_state",
]

DECAYS = (None, "fixed", "selective")
FORMS = ("two_scan", "full")
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """LION config.

    Attributes:
      d_model: model width ``d``.
      num_heads: heads ``h``.
      head_dim: per-head width ``k``; ``None`` = ``d_model // num_heads``.
      feature_map: a ``FeatureMap`` or its kind name (default "elu": elu + 1).
      decay: None (LION-LIT), "fixed" (LION-D) or "selective" (LION-S).
      normalize: divide by the row sums of ``A`` (needs a non-negative feature map).
      form: "two_scan" (default, linear time) or "full" (masked t x t matrix).
      scale: multiplies ``phi(q)``; ``None`` = 1 with ``normalize``, else ``f ** -0.5``.
      eps: added to the denominator.
      use_bias: biases on the q, k, v and o projections.
      implementation, chunk_size, interpret: passed to the op ("two_scan" only).
    """

    d_model: int
    num_heads: int
    head_dim: int | None = None
    feature_map: fmaps.FeatureMap | str = "elu"
    decay: str | None = None
    normalize: bool = True
    form: str = "two_scan"
    scale: float | None = None
    eps: float = 1e-6
    use_bias: bool = False
    implementation: str | None = None
    chunk_size: int | None = None
    interpret: bool = False

    def __post_init__(self):
        object.__setattr__(self, "feature_map", fmaps.as_feature_map(self.feature_map))
        la.check_heads(self.num_heads, self.d_model, self.head_dim)
        la.check_op_options(self.implementation, self.chunk_size)
        core.check_choice(self.decay, DECAYS, "decay")
        core.check_choice(self.form, FORMS, "form")
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


def _retnet_logits(n: int) -> np.ndarray:
    """logit(1 - 2^{-5-h}) for h = 0..n-1, in float64."""
    a = 5.0 + np.arange(n, dtype=np.float64)
    return a * np.log(2.0) + np.log1p(-(2.0**-a))


def _logit_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(_retnet_logits(shape[-1]), dtype)


def param_specs(cfg: Config) -> dict[str, Any]:
    specs = la.qkv_param_specs(cfg)
    fm_specs = fmaps.param_specs(cfg.feature_map, cfg.num_heads, cfg.key_dim)
    if fm_specs:
        specs["feature_map"] = fm_specs
    h = cfg.num_heads
    if cfg.decay == "fixed":
        specs["decay"] = {"logit": core.ParamSpec((h,), _logit_init, ("heads",))}
    elif cfg.decay == "selective":
        specs["decay"] = {
            "kernel": core.ParamSpec(
                (cfg.d_model, h), core.initializers.fan_in(0.01), ("embed", "heads")
            ),
            "bias": core.ParamSpec((h,), _logit_init, ("heads",)),
        }
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def log_decay(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array | None:
    """``log lambda [b, t, h]`` (float32, <= 0) for ``x [b, t, d]``, or None (LION-LIT)."""
    b, t, _ = x.shape
    if cfg.decay is None:
        return None
    p = params["decay"]
    if cfg.decay == "fixed":
        logit = p["logit"].astype(jnp.float32)
        return jnp.broadcast_to(jax.nn.log_sigmoid(logit)[None, None, :], (b, t, cfg.num_heads))
    w = p["kernel"].astype(x.dtype)
    logit = jnp.matmul(x, w, preferred_element_type=jnp.float32)
    return jax.nn.log_sigmoid(logit + p["bias"].astype(jnp.float32)[None, None, :])


# --------------------------------------------------------------------------------------------
# The two forms, on features: fq, fk [b, t, h, f], v [b, t, h, v], log_decay [b, t, h] | None
# --------------------------------------------------------------------------------------------


def decay_mask(
    log_lambda: jax.Array | None, segment_ids: jax.Array | None, b: int, t: int, h: int
) -> jax.Array:
    """``M [b, h, t, t]`` float32: ``exp(-|L_i - L_j|)``, zero across sequences."""
    if log_lambda is None:
        m = jnp.ones((b, h, t, t), jnp.float32)
    else:
        cum = jnp.cumsum(log_lambda.astype(jnp.float32), axis=1)  # [b, t, h]
        cum = jnp.moveaxis(cum, 1, 2)  # [b, h, t]
        m = jnp.exp(-jnp.abs(cum[:, :, :, None] - cum[:, :, None, :]))
    if segment_ids is not None:
        runs = la.segment_runs(segment_ids, b, t)
        same = runs[:, :, None] == runs[:, None, :]  # [b, t, t]
        m = jnp.where(same[:, None], m, 0.0)
    return m


def _divide(num, den, normalize: bool, eps: float) -> jax.Array:
    num = num.astype(jnp.float32)
    return num / (den[..., None] + eps) if normalize else num


def full_form(
    fq: jax.Array,
    fk: jax.Array,
    v: jax.Array,
    log_lambda: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    scale: float = 1.0,
    normalize: bool = True,
    eps: float = 1e-6,
) -> jax.Array:
    """LION's full (masked-matrix) form; returns ``o [b, t, h, v]`` float32."""
    b, t, h, _ = fq.shape
    scores = jnp.einsum("bihf,bjhf->bhij", fq, fk, preferred_element_type=jnp.float32)
    a = scale * scores * decay_mask(log_lambda, segment_ids, b, t, h)
    # Batch dims leading in the output: XLA:CPU has no bf16 x bf16 -> f32 dot for "bihv".
    num = jnp.einsum("bhij,bjhv->bhiv", a.astype(v.dtype), v, preferred_element_type=jnp.float32)
    num = jnp.moveaxis(num, 1, 2)
    den = jnp.moveaxis(jnp.sum(a, axis=-1), 1, 2) if normalize else None  # [b, t, h]
    return _divide(num, den, normalize, eps)


def _reverse_log_decay(g: jax.Array) -> jax.Array:
    """Decays for the backward recurrence run in reversed time.

    ``S^B_i = lambda_{i+1} S^B_{i+1} + ...``; at reversed position ``r`` (original ``T-1-r``) the
    factor is ``lambda_{T-r}``: the reversed decays shifted by one, with no decay at ``r = 0``
    (the state is zero there anyway).
    """
    flipped = g[:, ::-1]
    return jnp.concatenate([jnp.zeros_like(flipped[:, :1]), flipped[:, :-1]], axis=1)


def two_scan_form(
    fq: jax.Array,
    fk: jax.Array,
    v: jax.Array,
    log_lambda: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    scale: float = 1.0,
    normalize: bool = True,
    eps: float = 1e-6,
    chunk_size: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """LION's bidirectional-RNN form (forward + backward scan); returns ``o [b, t, h, v]``
    float32. ``fq, fk, v`` share one dtype (the op's requirement)."""
    op = dict(chunk_size=chunk_size, implementation=implementation, interpret=interpret)

    def rev(a):
        return None if a is None else a[:, ::-1]

    g_fwd = log_lambda
    g_bwd = None if log_lambda is None else _reverse_log_decay(log_lambda)
    num_f = la_ops.gated_linear_attention(
        fq, fk, v, g_fwd, scale=scale, segment_ids=segment_ids, **op
    )
    num_b = la_ops.gated_linear_attention(
        rev(fq), rev(fk), rev(v), g_bwd, scale=scale, segment_ids=rev(segment_ids), **op
    )[:, ::-1]
    fq32, fk32 = fq.astype(jnp.float32), fk.astype(jnp.float32)
    self_score = scale * jnp.sum(fq32 * fk32, axis=-1)  # [b, t, h]
    num = (
        num_f.astype(jnp.float32)
        + num_b.astype(jnp.float32)
        - self_score[..., None] * v.astype(jnp.float32)
    )
    den = None
    if normalize:
        decay_f = None if g_fwd is None else jnp.exp(g_fwd)
        decay_b = None if g_bwd is None else jnp.exp(g_bwd)
        resets_f, resets_b = la.segment_resets(segment_ids), la.segment_resets(rev(segment_ids))
        z_f = la.linear_scan(fk32, decay=decay_f, resets=resets_f)
        z_b = la.linear_scan(rev(fk32), decay=decay_b, resets=resets_b)[:, ::-1]
        den = scale * jnp.einsum("bthf,bthf->bth", fq32, z_f + z_b, precision=_HI) - self_score
    return _divide(num, den, normalize, eps)


# --------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------


def check_no_state(name: str, initial_state: Any, return_state: bool) -> None:
    """Non-causal mixers keep no decode state: reject ``initial_state`` / ``return_state``."""
    if initial_state is not None or return_state:
        raise ValueError(
            f"{name} is non-causal and has no decode state; expected initial_state=None and "
            f"return_state=False; got initial_state={type(initial_state).__name__}, "
            f"return_state={return_state}"
        )


def apply(
    params: core.Params,
    x: jax.Array,
    cfg: Config,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    initial_state: Any = None,
    return_state: bool = False,
) -> jax.Array:
    """LION over ``x [b, t, d]`` -> ``y [b, t, d]``.

    Args:
      segment_ids: int ``[b, t]``; tokens attend only within their sequence.
      positions: ignored (accepted for the mixer contract).
      initial_state, return_state: must be None / False (non-causal).
    """
    del positions
    check_no_state("lion", initial_state, return_state)
    la.check_x(x, cfg.d_model, 3, "x", "[batch, time, d_model]")
    b, t, _ = x.shape
    if segment_ids is not None:
        la.check_segment_ids(segment_ids, b, t)
    dtype = core.compute_dtype(cfg, x)
    x = x.astype(dtype)
    q, k, v = la.project_qkv(params, x, cfg)
    fm_params = params.get("feature_map")
    fq = fmaps.apply(cfg.feature_map, fm_params, q, "q").astype(dtype)
    fk = fmaps.apply(cfg.feature_map, fm_params, k, "k").astype(dtype)
    g = log_decay(params, x, cfg)
    common = dict(segment_ids=segment_ids, scale=cfg.op_scale, normalize=cfg.normalize, eps=cfg.eps)
    if cfg.form == "full":
        o = full_form(fq, fk, v, g, **common)
    else:
        o = two_scan_form(
            fq,
            fk,
            v,
            g,
            chunk_size=cfg.chunk_size,
            implementation=cfg.implementation,
            interpret=cfg.interpret,
            **common,
        )
    return la.project_out(params, o.astype(dtype), cfg)


core.register_layer(
    "lion",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(
        config=Config(d_model=32, num_heads=4, decay="selective"),
        input_shape=(2, 8, 32),
        decode=False,
    ),
    kind="mixer",
)

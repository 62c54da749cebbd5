"""Feature maps ``phi`` for linear attention: ``sim(q, k) = phi_q(q) . phi_k(k)``.

Linear attention replaces ``exp(q . k)`` by a product of features, so that
``sum_s sim(q_t, k_s) v_s = phi(q_t)^T (sum_s phi(k_s) v_s^T)`` can be computed as a running
state. Every map here acts on the last axis of a multi-head tensor ``x [..., h, k]`` and returns
``[..., h, f]`` with ``f = output_dim(fm, k)``:

=============  =======  =====================================================================
kind           f        map (``r = relu(x)``; norms over the last axis)
=============  =======  =====================================================================
"elu"          k        ``elu(x) + 1`` ("Transformers are RNNs: Fast Autoregressive
                        Transformers with Linear Attention")
"relu"         k        ``relu(x)`` (the kernel of SLAB and LiT)
"hedgehog"     2 f'     ``softmax([W x + b, -(W x + b)])``, ``W [h, k, f']`` learned per head
                        ("The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax
                        Mimicry")
"focused"      k        ``||r'|| / ||r'^p|| * r'^p`` with ``r' = relu(x) + eps`` and the power
                        ``p`` elementwise ("FLatten Transformer: Vision Transformer using Focused
                        Linear Attention")
"norm_aware"   2 k      queries ``[relu(u)^p(q), relu(-u)^p(q)]``, ``u = q / ||q||``,
                        ``p(q) = lambda (tau + tanh ||q||)``; keys ``[relu(k)^m, relu(-k)^m]``
                        ("NaLaFormer: Norm-Aware Linear Attention for Transformer Models")
"identity"     k        ``x`` (signed features: only for unnormalised linear attention)
=============  =======  =====================================================================

Choices the papers leave open, made here:

* Hedgehog: the paper's map is ``[exp(Wx + b), exp(-Wx - b)]``; like its released code we take a
  softmax for numerical stability, here one softmax over the whole ``2 f'``-vector (one
  normaliser per token, which cancels exactly from the attention weights of a query). ``W``
  starts at the identity (zero-padded when ``f' != k``) and ``b`` at zero, so at init the map is
  a smooth sign split of the input. Queries and keys have separate ``W, b``.
* Focused: FLatten adds a small constant to ``relu(x)`` in its code; we keep it (``eps``), which
  makes the norms and their gradients finite at ``x = 0``. FLatten's code also divides the input
  by a learned per-channel ``softplus`` scale before the power; since ``relu(x) / s = relu(x / s)``
  for ``s > 0`` that scale is a rescaling of the q/k projection columns and is not included.
* Norm-aware: the paper describes the map in words (a query-norm-controlled power on the
  direction, and a split into positive and negative parts so that entries of opposite sign give
  zero instead of a negative similarity — its "cosine inhibit"). We implement the form of the
  authors' public code: the query power is ``p(q) = lambda * (tau + tanh(||q||))`` with
  ``lambda = 3`` and ``tau = 0.5`` (``norm_power_scale``, ``norm_power_shift``), the key power a
  fixed ``m = 3`` (``power``). Their code also rotates the features with a 2-D RoPE in the
  numerator only; that is left out (it would break the non-negativity of the weights).
  ``||q||`` is computed as ``sqrt(sum q^2 + eps^2)`` and ``u^p`` as ``exp(p log u)`` on the
  positive entries, so value and gradients stay finite at ``q = 0`` and ``u = 0``.

All maps compute in float32 and return float32; the caller casts to its compute dtype.

API: :class:`FeatureMap` (a frozen config), :func:`output_dim`, :func:`param_specs`,
:func:`apply`, and the maps as plain functions (:func:`elu_plus_one`, :func:`relu`,
:func:`hedgehog`, :func:`focused`, :func:`norm_aware_query`, :func:`norm_aware_key`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxlayers import core

__all__ = [
    "KINDS",
    "ROLES",
    "FeatureMap",
    "as_feature_map",
    "output_dim",
    "param_specs",
    "apply",
    "elu_plus_one",
    "relu",
    "hedgehog",
    "focused",
    "norm_aware_query",
    "norm_aware_key",
]

KINDS = ("elu", "relu", "hedgehog", "focused", "norm_aware", "identity")
ROLES = ("q", "k")
# Maps whose features are >= 0 (what a normalised linear attention needs).
NONNEGATIVE = frozenset({"elu", "relu", "hedgehog", "focused", "norm_aware"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureMap:
    """Which feature map, and its constants.

    Attributes:
      kind: one of :data:`KINDS`.
      feature_dim: Hedgehog only: width ``f'`` of ``W x`` (the map returns ``2 f'``);
        ``None`` = the key dim.
      power: "focused": the focusing power ``p`` (FLatten uses 3); "norm_aware": the key power
        ``m`` (3). Must be >= 1 (the gradient at 0 is infinite below 1).
      norm_power_scale, norm_power_shift: "norm_aware": ``lambda > 0`` and ``tau >= 0`` of the
        query power ``p(q) = lambda (tau + tanh ||q||)``, which then lies in
        ``[lambda tau, lambda (tau + 1))``: larger query norms give spikier weights.
      eps: "focused": the constant added to ``relu(x)``; "norm_aware": the floor inside the norm.
    """

    kind: str = "elu"
    feature_dim: int | None = None
    power: float = 3.0
    norm_power_scale: float = 3.0
    norm_power_shift: float = 0.5
    eps: float = 1e-6

    def __post_init__(self):
        core.check_choice(self.kind, KINDS, "feature_map kind")
        if self.feature_dim is not None and self.feature_dim <= 0:
            raise ValueError(f"feature_dim must be positive or None; got {self.feature_dim}")
        if self.power < 1:
            raise ValueError(f"power must be >= 1; got power={self.power}")
        if not (self.norm_power_scale > 0 and self.norm_power_shift >= 0):
            raise ValueError(
                "norm_power_scale must be > 0 and norm_power_shift >= 0; got "
                f"norm_power_scale={self.norm_power_scale}, "
                f"norm_power_shift={self.norm_power_shift}"
            )
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0; got eps={self.eps}")

    @property
    def nonnegative(self) -> bool:
        return self.kind in NONNEGATIVE


def as_feature_map(value: FeatureMap | str) -> FeatureMap:
    """A :class:`FeatureMap` from itself or from a kind name (``"elu"`` -> ``FeatureMap()``)."""
    if isinstance(value, FeatureMap):
        return value
    if isinstance(value, str):
        return FeatureMap(kind=value)
    raise TypeError(f"feature_map must be a FeatureMap or one of {KINDS}; got {value!r}")


def output_dim(fm: FeatureMap, key_dim: int) -> int:
    """Width ``f`` of ``phi(x)`` for inputs of width ``key_dim``."""
    if fm.kind == "hedgehog":
        return 2 * (fm.feature_dim or key_dim)
    if fm.kind == "norm_aware":
        return 2 * key_dim
    return key_dim


def _eye_init(key, shape, dtype=jnp.float32):
    del key
    h, k, f = shape
    return jnp.broadcast_to(jnp.eye(k, f, dtype=dtype), (h, k, f))


def param_specs(fm: FeatureMap, num_heads: int, key_dim: int) -> dict[str, Any]:
    """``{}``, or for Hedgehog ``{"q"|"k": {"kernel": [h, k, f'], "bias": [h, f']}}``."""
    if fm.kind != "hedgehog":
        return {}
    f = fm.feature_dim or key_dim

    def one():
        return {
            "kernel": core.ParamSpec((num_heads, key_dim, f), _eye_init, ("heads", None, None)),
            "bias": core.ParamSpec((num_heads, f), core.initializers.zeros, ("heads", None)),
        }

    return {"q": one(), "k": one()}


# --------------------------------------------------------------------------------------------
# The maps
# --------------------------------------------------------------------------------------------


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def _pow(x, p: float):
    """``x ** p`` for a static ``p`` (exact repeated multiplication for integer ``p``)."""
    if float(p).is_integer():
        return jax.lax.integer_pow(x, int(p))
    return jnp.power(x, jnp.float32(p))


def elu_plus_one(x: jax.Array) -> jax.Array:
    """``elu(x) + 1`` (> 0 everywhere)."""
    return jax.nn.elu(_f32(x)) + 1.0


def relu(x: jax.Array) -> jax.Array:
    """``max(x, 0)``."""
    return jax.nn.relu(_f32(x))


def hedgehog(params: core.Params, x: jax.Array) -> jax.Array:
    """Hedgehog map of ``x [..., h, k]`` with ``params {"kernel": [h, k, f'], "bias": [h, f']}``.

    ``z = x W_h + b_h`` per head ``h``; returns ``softmax([z, -z])`` over its ``2 f'`` entries.
    """
    w, b = _f32(params["kernel"]), _f32(params["bias"])
    h = x.shape[-2]
    if w.ndim != 3 or w.shape[0] != h or w.shape[1] != x.shape[-1]:
        raise ValueError(
            f"hedgehog kernel must have shape [heads, key_dim, feature_dim] with [heads, "
            f"key_dim] = {tuple(x.shape[-2:])}; got {w.shape}"
        )
    z = jnp.einsum("...hk,hkf->...hf", _f32(x), w)
    z = z + b.reshape((1,) * (z.ndim - 2) + b.shape)
    return jax.nn.softmax(jnp.concatenate([z, -z], axis=-1), axis=-1)


def focused(x: jax.Array, power: float = 3.0, eps: float = 1e-6) -> jax.Array:
    """FLatten's focused map: ``r = relu(x) + eps``; ``||r|| / ||r^p|| * r^p``.

    The direction of ``r`` is sharpened toward its largest entries while its norm is kept.
    """
    r = jax.nn.relu(_f32(x)) + eps
    rp = _pow(r, power)
    ratio = jnp.linalg.norm(r, axis=-1, keepdims=True) / jnp.linalg.norm(rp, axis=-1, keepdims=True)
    return rp * ratio


def _safe_norm(x, eps: float):
    return jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps * eps)


def _pos_pow(u, p):
    """``u ** p`` for ``u >= 0`` and a traced ``p > 0``; 0 where ``u == 0``, finite gradients."""
    pos = u > 0
    safe = jnp.where(pos, u, 1.0)
    return jnp.where(pos, jnp.exp(p * jnp.log(safe)), 0.0)


def norm_aware_query(
    q: jax.Array, scale: float = 3.0, shift: float = 0.5, eps: float = 1e-6
) -> jax.Array:
    """NaLaFormer query map: ``u = q / ||q||``, ``p = scale (shift + tanh ||q||)``;
    returns ``[relu(u)^p, relu(-u)^p]`` (width ``2 k``)."""
    q = _f32(q)
    n = _safe_norm(q, eps)
    u = q / n
    p = scale * (shift + jnp.tanh(n))
    return jnp.concatenate([_pos_pow(jax.nn.relu(u), p), _pos_pow(jax.nn.relu(-u), p)], axis=-1)


def norm_aware_key(k: jax.Array, power: float = 3.0) -> jax.Array:
    """NaLaFormer key map: ``[relu(k)^m, relu(-k)^m]`` (width ``2 k``)."""
    k = _f32(k)
    return jnp.concatenate([_pow(jax.nn.relu(k), power), _pow(jax.nn.relu(-k), power)], axis=-1)


def apply(fm: FeatureMap, params: core.Params | None, x: jax.Array, role: str = "q") -> jax.Array:
    """``phi(x)`` for ``x [..., h, k]`` -> float32 ``[..., h, output_dim(fm, k)]``.

    Args:
      fm: the map.
      params: the layer's feature-map params (``param_specs(fm, ...)``; ``{}``/None when the
        map has none). The entry ``params[role]`` is used.
      role: "q" or "k" — Hedgehog has separate params and the norm-aware map separate formulas.
    """
    core.check_choice(role, ROLES, "role")
    if jnp.ndim(x) < 2:
        raise ValueError(f"x must have rank >= 2 [..., heads, key_dim]; got shape {jnp.shape(x)}")
    kind = fm.kind
    if kind == "elu":
        return elu_plus_one(x)
    if kind == "relu":
        return relu(x)
    if kind == "identity":
        return _f32(x)
    if kind == "focused":
        return focused(x, fm.power, fm.eps)
    if kind == "norm_aware":
        if role == "q":
            return norm_aware_query(x, fm.norm_power_scale, fm.norm_power_shift, fm.eps)
        return norm_aware_key(x, fm.power)
    if not params or role not in params:
        raise ValueError(
            f"feature map 'hedgehog' needs params[{role!r}] = {{'kernel', 'bias'}}; got "
            f"{None if params is None else sorted(params)}"
        )
    return hedgehog(params[role], x)

"""LoRA-family adapters: pure params transforms over any :mod:`jaxlayers.dense` params.

An adapter never changes the base params; it has its own small params tree and a config::

    adapter = init_adapter(key, base_params_or_cfg, adapter_cfg)
    y = apply_adapted(base_params, adapter, x, base_cfg, adapter_cfg)     # base + adapter
    merged = merge(base_params, adapter, base_cfg, adapter_cfg)           # plain Dense params
    dense.apply(merged, x, base_cfg) == y;  unmerge(merged, ...) == base_params

Base layer: ``y = x W + b`` with ``W: [i, o]`` (``"kernel"``), ``b: [o]`` (``"bias"``,
optional). Adapters (one config class each):

- :class:`LoRA` -- "LoRA: Low-Rank Adaptation of Large Language Models"::

      y = x W + b + (alpha / r) (x A) B        A: [i, r] fan-in normal, B: [r, o] = 0

  ``B = 0`` makes the adapted layer start equal to the base. Merge: ``W + (alpha/r) A B``.
  Dropout on the adapter input is left out (apply stays deterministic).
- :class:`Bone` -- "Bone: Block-Affine Adaptation of Large Language Models". ``W`` is cut into
  ``r x r`` blocks ``W_ji`` (input block ``j``, output block ``i``); the blocks of one output
  column share a trainable ``C_i [r, r]``::

      W'_ji = W_ji + C_i W_ji + C_i = (I + C_i) W_ji + C_i          C: [o/r, r, r] = 0 at init

  (the paper's block-affine ``W_ij B_i + B_i`` in its ``[out, in]`` layout, written for the
  ``(in, out)`` kernel with ``C_i = B_i^T``). Needs ``r | i`` and ``r | o``. Unmerge inverts
  ``I + C_i``.
- :class:`LoRAMixer` -- "LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention
  Routing": ``E`` LoRA experts behind a token router::

      g = softmax(x R)  (top-k kept and renormalised if top_k)      R: [i, E]
      y = x W + b + (alpha / r) sum_e g_e (x A_e) B_e               B_e = 0 at init

  Routing depends on the input, so it cannot be merged. The paper's auxiliary balance loss is
  not included; :func:`mixer_gates` exposes ``g`` for one.
- :class:`SSF` -- "Scaling & Shifting Your Features: A New Baseline for Efficient Model
  Tuning": ``y = gamma * (x W + b) + beta`` with ``gamma = 1``, ``beta = 0`` at init. Merge:
  ``W diag(gamma)``, ``gamma b + beta`` (needs a base bias to absorb ``beta``).
- :class:`MatryoshkaKV` -- "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal
  Projection", for the key or value projection of attention (``o = heads * head_dim``). Each
  head's output is projected onto the first ``r`` columns of an orthogonal ``U_h [k, k]``::

      y_h = (x W + b)_h U_h[:, :r] U_h[:, :r]^T

  The cache stores ``(x W + b)_h U_h[:, :r]`` (:func:`matryoshka_compress`, ``r`` numbers per
  head instead of ``k``); queries use ``q_h U_h[:, :r]`` and ``q . k`` is unchanged
  (``P = U_r U_r^T`` is a symmetric projector). With ``r = k``, ``U U^T = I``: the layer equals
  the uncompressed one. ``U_h = basis_h cayley(S_h - S_h^T)`` stays orthogonal while the skew
  generator ``S`` trains (``cayley(A) = (I - A)^{-1} (I + A)``); ``"basis"`` starts at the
  identity or at a PCA basis (:func:`pca_basis`, the paper's initialisation) and is meant to
  stay frozen (mask it out of the optimizer). Merge: ``W P``, ``b P`` (block-diagonal over
  heads); unmerge only for ``r = k``. As a Dense transform the projection acts before any RoPE;
  the paper projects the cached (rotated) keys of its LLaMA models -- use
  :func:`project_heads` on rotated keys/queries for that placement.

Adapter params carry no logical axes of their own beyond what :func:`adapter_param_specs`
returns (``init_adapter`` materialises those specs with path-derived keys, like layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxlayers import core, dense

__all__ = [
    "LoRA",
    "Bone",
    "LoRAMixer",
    "SSF",
    "MatryoshkaKV",
    "adapter_param_specs",
    "init_adapter",
    "apply_adapted",
    "merge",
    "unmerge",
    "mixer_gates",
    "matryoshka_basis",
    "matryoshka_compress",
    "project_heads",
    "pca_basis",
]

_HI = lax.Precision.HIGHEST


def _positive(**values: int) -> None:
    for name, v in values.items():
        if v <= 0:
            raise ValueError(f"{name} must be positive; got {v}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA:
    """Low-rank update ``(alpha / rank) A B``."""

    rank: int
    alpha: float = 1.0

    def __post_init__(self):
        _positive(rank=self.rank)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bone:
    """Block-affine update with ``block x block`` blocks."""

    block: int

    def __post_init__(self):
        _positive(block=self.block)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAMixer:
    """``num_experts`` routed LoRA experts of rank ``rank``; ``top_k=None`` keeps all."""

    num_experts: int
    rank: int
    alpha: float = 1.0
    top_k: int | None = None

    def __post_init__(self):
        _positive(num_experts=self.num_experts, rank=self.rank)
        if self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}] or None; got {self.top_k}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class SSF:
    """Per-output-channel scale and shift."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatryoshkaKV:
    """Orthogonal per-head projection of a K or V projection, truncated to ``rank`` columns."""

    num_heads: int
    rank: int

    def __post_init__(self):
        _positive(num_heads=self.num_heads, rank=self.rank)


AdapterConfig = LoRA | Bone | LoRAMixer | SSF | MatryoshkaKV
_KINDS = (LoRA, Bone, LoRAMixer, SSF, MatryoshkaKV)


def _check_kind(adapter_cfg: Any) -> None:
    if not isinstance(adapter_cfg, _KINDS):
        names = ", ".join(k.__name__ for k in _KINDS)
        raise TypeError(f"adapter_cfg must be one of {names}; got {type(adapter_cfg).__name__}")


def _base_cfg(base_params_or_cfg: Any) -> dense.Config:
    if isinstance(base_params_or_cfg, dense.Config):
        return base_params_or_cfg
    if isinstance(base_params_or_cfg, dict) and "kernel" in base_params_or_cfg:
        d_in, d_out = base_params_or_cfg["kernel"].shape
        return dense.Config(d_in=d_in, d_out=d_out, use_bias="bias" in base_params_or_cfg)
    raise TypeError(
        "base_params_or_cfg must be a jaxlayers.dense.Config or Dense params "
        f"{{'kernel': [i, o], 'bias': [o]}}; got {type(base_params_or_cfg).__name__}"
    )


def _check_compatible(base: dense.Config, adapter_cfg: Any) -> None:
    if isinstance(adapter_cfg, Bone):
        core.check_divisible(base.d_in, adapter_cfg.block, "d_in", "block")
        core.check_divisible(base.d_out, adapter_cfg.block, "d_out", "block")
    if isinstance(adapter_cfg, MatryoshkaKV):
        core.check_divisible(base.d_out, adapter_cfg.num_heads, "d_out", "num_heads")
        head_dim = base.d_out // adapter_cfg.num_heads
        if adapter_cfg.rank > head_dim:
            raise ValueError(
                f"MatryoshkaKV rank must be <= head_dim = d_out / num_heads = {head_dim}; "
                f"got rank={adapter_cfg.rank}"
            )


def _eye_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)


def adapter_param_specs(base_cfg: dense.Config, adapter_cfg: Any) -> dict[str, core.ParamSpec]:
    """The adapter's params as a :class:`core.ParamSpec` tree (shapes, inits, logical axes)."""
    _check_kind(adapter_cfg)
    _check_compatible(base_cfg, adapter_cfg)
    i, o = base_cfg.d_in, base_cfg.d_out
    ax_in, ax_out = base_cfg.kernel_axes
    zeros, fan_in = core.initializers.zeros, core.initializers.fan_in
    if isinstance(adapter_cfg, LoRA):
        r = adapter_cfg.rank
        return {
            "lora_a": core.ParamSpec((i, r), fan_in(1.0), (ax_in, None)),
            "lora_b": core.ParamSpec((r, o), zeros, (None, ax_out)),
        }
    if isinstance(adapter_cfg, Bone):
        r = adapter_cfg.block
        return {"bone": core.ParamSpec((o // r, r, r), zeros, (None, None, None))}
    if isinstance(adapter_cfg, LoRAMixer):
        e, r = adapter_cfg.num_experts, adapter_cfg.rank
        return {
            "router": core.ParamSpec((i, e), fan_in(1.0), (ax_in, None)),
            "lora_a": core.ParamSpec((e, i, r), fan_in(1.0, in_axis=-2), (None, ax_in, None)),
            "lora_b": core.ParamSpec((e, r, o), zeros, (None, None, ax_out)),
        }
    if isinstance(adapter_cfg, SSF):
        return {
            "scale": core.ParamSpec((o,), core.initializers.ones, (ax_out,)),
            "shift": core.ParamSpec((o,), zeros, (ax_out,)),
        }
    h = adapter_cfg.num_heads  # MatryoshkaKV
    k = o // h
    return {
        "basis": core.ParamSpec((h, k, k), _eye_init, (None, None, None)),
        "skew": core.ParamSpec((h, k, k), zeros, (None, None, None)),
    }


def init_adapter(key: jax.Array, base_params_or_cfg: Any, adapter_cfg: Any) -> core.Params:
    """Initial adapter params for a Dense given by its params or its ``dense.Config``. Every
    adapter starts as the identity transform (the adapted layer equals the base)."""
    base = _base_cfg(base_params_or_cfg)
    return core.init_params(key, adapter_param_specs(base, adapter_cfg), base.param_dtype)


# ---------------------------------------------------------------------------------------------
# Weight transforms
# ---------------------------------------------------------------------------------------------


def _bone_kernel(kernel: jax.Array, bone: jax.Array, inverse: bool = False) -> jax.Array:
    """``(I + C_i) W_ji + C_i`` on every ``r x r`` block (or its inverse)."""
    i, o = kernel.shape
    r = bone.shape[-1]
    blocks = kernel.reshape(i // r, r, o // r, r)  # [j, a, i, b]: block (j, i), rows a, cols b
    c = bone[None, :, :, :]  # [1, i, r, r]
    w = jnp.transpose(blocks, (0, 2, 1, 3))  # [j, i, r, r]
    if inverse:
        eye = jnp.eye(r, dtype=jnp.float32)[None]
        lhs = jnp.broadcast_to((eye + bone.astype(jnp.float32))[None], w.shape)
        w = jnp.linalg.solve(lhs, (w - c).astype(jnp.float32)).astype(kernel.dtype)
    else:
        w = w + jnp.matmul(c, w, precision=_HI) + c
    return jnp.transpose(w, (0, 2, 1, 3)).reshape(i, o)


def _cayley(skew: jax.Array) -> jax.Array:
    a = (skew - jnp.swapaxes(skew, -1, -2)).astype(jnp.float32)
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=jnp.float32), a.shape)
    return jnp.linalg.solve(eye - a, eye + a)


def matryoshka_basis(adapter_params: core.Params, adapter_cfg: MatryoshkaKV) -> jax.Array:
    """The truncated orthogonal bases ``U_h[:, :r]`` ``[h, k, r]`` (float32)."""
    u = jnp.matmul(
        adapter_params["basis"].astype(jnp.float32), _cayley(adapter_params["skew"]), precision=_HI
    )
    return u[..., : adapter_cfg.rank]


def _projector(adapter_params: core.Params, adapter_cfg: MatryoshkaKV) -> jax.Array:
    u = matryoshka_basis(adapter_params, adapter_cfg)
    return jnp.einsum("hkr,hlr->hkl", u, u, precision=_HI)  # [h, k, k]


def project_heads(y: jax.Array, adapter_params: core.Params, adapter_cfg: MatryoshkaKV):
    """``y_h U_h[:, :r] U_h[:, :r]^T`` for every head of ``y [..., h*k]``. Use it on keys or
    values after RoPE to project where the paper's LLaMA models do (the Dense transform of
    :func:`apply_adapted` / :func:`merge` projects before any rotation)."""
    return _project_heads(y, _projector(adapter_params, adapter_cfg))


def _project_heads(y: jax.Array, proj: jax.Array) -> jax.Array:
    h, k, _ = proj.shape
    yh = y.reshape(y.shape[:-1] + (h, k))
    out = jnp.einsum("...hk,hkl->...hl", yh, proj.astype(y.dtype), precision=_HI)
    return out.reshape(y.shape)


def merge(
    base_params: core.Params, adapter_params: core.Params, base_cfg: dense.Config, adapter_cfg: Any
) -> core.Params:
    """Dense params computing the adapted layer (``dense.apply(merged, x, base_cfg)``)."""
    _check_kind(adapter_cfg)
    _check_compatible(base_cfg, adapter_cfg)
    kernel = base_params["kernel"]
    out = dict(base_params)
    a = core.cast_floating(adapter_params, kernel.dtype)
    if isinstance(adapter_cfg, LoRA):
        delta = jnp.matmul(a["lora_a"], a["lora_b"], precision=_HI)
        out["kernel"] = kernel + adapter_cfg.scale * delta
    elif isinstance(adapter_cfg, Bone):
        out["kernel"] = _bone_kernel(kernel, a["bone"])
    elif isinstance(adapter_cfg, LoRAMixer):
        raise ValueError(
            "LoRAMixer routes every token to its own mix of experts; it cannot be merged into "
            "one Dense (use apply_adapted)"
        )
    elif isinstance(adapter_cfg, SSF):
        if not base_cfg.use_bias:
            raise ValueError(
                "merging SSF needs a base bias to absorb the shift: base_cfg.use_bias must be "
                "True (add a zero bias first)"
            )
        out["kernel"] = kernel * a["scale"][None, :]
        out["bias"] = base_params["bias"] * a["scale"] + a["shift"]
    else:  # MatryoshkaKV
        proj = _projector(adapter_params, adapter_cfg)
        out["kernel"] = _project_heads(kernel, proj)
        if base_cfg.use_bias:
            out["bias"] = _project_heads(base_params["bias"], proj)
    return out


def unmerge(
    merged_params: core.Params,
    adapter_params: core.Params,
    base_cfg: dense.Config,
    adapter_cfg: Any,
) -> core.Params:
    """The base params back from :func:`merge`'s output (up to rounding)."""
    _check_kind(adapter_cfg)
    _check_compatible(base_cfg, adapter_cfg)
    kernel = merged_params["kernel"]
    out = dict(merged_params)
    a = core.cast_floating(adapter_params, kernel.dtype)
    if isinstance(adapter_cfg, LoRA):
        delta = jnp.matmul(a["lora_a"], a["lora_b"], precision=_HI)
        out["kernel"] = kernel - adapter_cfg.scale * delta
    elif isinstance(adapter_cfg, Bone):
        out["kernel"] = _bone_kernel(kernel, a["bone"], inverse=True)
    elif isinstance(adapter_cfg, LoRAMixer):
        raise ValueError("LoRAMixer cannot be merged, so there is nothing to unmerge")
    elif isinstance(adapter_cfg, SSF):
        if not base_cfg.use_bias:
            raise ValueError("unmerging SSF needs base_cfg.use_bias=True (as merge does)")
        out["kernel"] = kernel / a["scale"][None, :]
        out["bias"] = (merged_params["bias"] - a["shift"]) / a["scale"]
    else:  # MatryoshkaKV
        head_dim = base_cfg.d_out // adapter_cfg.num_heads
        if adapter_cfg.rank < head_dim:
            raise ValueError(
                f"MatryoshkaKV with rank={adapter_cfg.rank} < head_dim={head_dim} projects "
                "away part of each head; it can only be unmerged with rank == head_dim"
            )
        # P = U U^T = I (up to rounding): the merged params are the base params.
    return out


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


def mixer_gates(adapter_params: core.Params, x: jax.Array, adapter_cfg: LoRAMixer) -> jax.Array:
    """Router weights ``g [..., E]`` (float32; zero outside the top-k when ``top_k`` is set)."""
    logits = jnp.einsum(
        "...i,ie->...e", x, adapter_params["router"].astype(x.dtype), precision=_HI
    ).astype(jnp.float32)
    gates = jax.nn.softmax(logits, axis=-1)
    if adapter_cfg.top_k is not None and adapter_cfg.top_k < adapter_cfg.num_experts:
        kth = lax.top_k(gates, adapter_cfg.top_k)[0][..., -1:]
        gates = jnp.where(gates >= kth, gates, 0.0)
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return gates


def apply_adapted(
    base_params: core.Params,
    adapter_params: core.Params,
    x: jax.Array,
    base_cfg: dense.Config,
    adapter_cfg: Any,
) -> jax.Array:
    """The adapted Dense: ``x: [..., d_in] -> [..., d_out]`` in the base's compute dtype."""
    _check_kind(adapter_cfg)
    _check_compatible(base_cfg, adapter_cfg)
    if isinstance(adapter_cfg, Bone):
        return dense.apply(merge(base_params, adapter_params, base_cfg, adapter_cfg), x, base_cfg)
    y = dense.apply(base_params, x, base_cfg)  # validates x
    dtype = y.dtype
    xd = x.astype(dtype)
    a = core.cast_floating(adapter_params, dtype)
    if isinstance(adapter_cfg, LoRA):
        low = jnp.einsum("...i,ir->...r", xd, a["lora_a"], precision=_HI)
        up = jnp.einsum("...r,ro->...o", low, a["lora_b"], precision=_HI)
        return y + jnp.asarray(adapter_cfg.scale, dtype) * up
    if isinstance(adapter_cfg, LoRAMixer):
        gates = mixer_gates(a, xd, adapter_cfg).astype(dtype)
        low = jnp.einsum("...i,eir->...er", xd, a["lora_a"], precision=_HI)
        low = low * gates[..., None]
        up = jnp.einsum("...er,ero->...o", low, a["lora_b"], precision=_HI)
        return y + jnp.asarray(adapter_cfg.scale, dtype) * up
    if isinstance(adapter_cfg, SSF):
        lead = (1,) * (y.ndim - 1)
        return y * a["scale"].reshape(lead + (-1,)) + a["shift"].reshape(lead + (-1,))
    return _project_heads(y, _projector(adapter_params, adapter_cfg))  # MatryoshkaKV


def matryoshka_compress(
    base_params: core.Params,
    adapter_params: core.Params,
    x: jax.Array,
    base_cfg: dense.Config,
    adapter_cfg: MatryoshkaKV,
) -> jax.Array:
    """The compressed cache entries ``(x W + b)_h U_h[:, :r]``: ``[..., d_in] -> [..., h, r]``.
    Multiply queries by the same basis (``q_h U_h[:, :r]``) to score against them."""
    _check_compatible(base_cfg, adapter_cfg)
    y = dense.apply(base_params, x, base_cfg)
    h = adapter_cfg.num_heads
    yh = y.reshape(y.shape[:-1] + (h, base_cfg.d_out // h))
    u = matryoshka_basis(adapter_params, adapter_cfg).astype(y.dtype)
    return jnp.einsum("...hk,hkr->...hr", yh, u, precision=_HI)


def pca_basis(samples: jax.Array) -> jax.Array:
    """Per-head principal directions of ``samples [n, h, k]`` (e.g. keys on calibration data),
    ``[h, k, k]``, columns by decreasing variance (uncentred second moment, as the cache stores
    raw keys). Use as ``adapter_params["basis"]`` for the paper's PCA initialisation."""
    core.check_rank(samples, 3, "samples", "[num_samples, heads, head_dim]")
    s = samples.astype(jnp.float32)
    cov = jnp.einsum("nhk,nhl->hkl", s, s, precision=_HI)
    _, vecs = jnp.linalg.eigh(cov)  # ascending eigenvalues
    return vecs[..., ::-1]

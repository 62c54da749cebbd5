"""Fourier Position Embedding (FoPE), applied to queries and keys like RoPE.

From "Fourier Position Embedding: Enhancing Attention's Periodic Extension for Length
Generalization". RoPE gives rotated pair ``j`` (dims ``j`` and ``j + r/2``, rotate-half as in
:mod:`jaxlayers.position`) the single frequency ``w_j = theta^(-2j/r)``. FoPE instead makes each
pair's cosine and sine a *Fourier series* over all the frequencies of the head, and zeroes the
frequencies too low to complete a period within the training length:

    kept_i    = [w_i >= 2 pi / train_length]                  (all kept if train_length=None)
    C_j(p)    = sum_{i kept} cos(w_i p) A[i, j] / sum_{i kept} A[i, j]
    S_j(p)    = sum_{i kept} sin(w_i p) B[i, j] / sum_{i kept} B[i, j]
    y[j]       = x[j] C_j(p) - x[j + r/2] S_j(p)              for kept j
    y[j + r/2] = x[j + r/2] C_j(p) + x[j] S_j(p)
    y[j], y[j + r/2] = x[j], x[j + r/2]                        for clipped j (frequency 0)

``A`` ("cos_coef") and ``B`` ("sin_coef") are ``[r/2, r/2]`` per head (``separate_heads=True``,
shape ``[h, r/2, r/2]``) or shared (``[1, r/2, r/2]``), initialised as ``I + N(0, s^2)`` with the
Xavier-normal ``s = sigma * sqrt(2 / r)`` (``sigma = 0.3`` in the authors' runs). The column
normalisation keeps ``C_j(0) = 1``, ``S_j(0) = 0``: position 0 is the identity, as in RoPE.

**Reduction to RoPE**: with ``sigma = 0`` (``A = B = I``) and ``train_length=None``,
``C_j = cos(w_j p)``, ``S_j = sin(w_j p)`` and FoPE *is* RoPE.

Apply the same params to q and k: ``q = apply(params, q, cfg, positions=pos)`` and likewise for
``k``. Unlike RoPE, the map is not a rotation, so the q·k score depends on positions only
approximately through ``p - s`` (exactly when ``sigma = 0``).

Choices the authors' code makes differently, made here: square ``[r/2, r/2]`` coefficient
matrices (their code can use fewer output frequencies); clipped pairs pass through unchanged (a
zero frequency: cos 1, sin 0) rather than being dropped. The paper keeps ``A, B`` fixed after
initialisation; they are ordinary params here, so mask them out of the optimizer (e.g.
``optax.masked``) to reproduce that, or train them (the authors' learnable variant).

Shapes: ``x: [b, t, h, k]``, ``positions: int [b, t]`` (default ``arange(t)``). Partial rotation
(``fraction < 1``) rotates the first ``r = 2 floor(k * fraction / 2)`` dims, as in RoPE. All
trigonometry in float32; the output has the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayers import core, position

__all__ = ["Config", "param_specs", "init", "apply", "kept_frequencies", "fourier_cos_sin"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """FoPE config.

    Attributes:
      num_heads: heads ``h`` of the q (or k) tensor it is applied to.
      head_dim: per-head width ``k``.
      theta: RoPE base.
      fraction: fraction of ``head_dim`` rotated (partial rotary).
      train_length: training context length; frequencies with period longer than it are
        clipped to 0. ``None`` keeps every frequency.
      sigma: Xavier gain of the random off-identity part of the coefficients (0 = RoPE).
      separate_heads: one coefficient matrix per head (else one shared by all heads).
    """

    num_heads: int
    head_dim: int
    theta: float = 10000.0
    fraction: float = 1.0
    train_length: int | None = None
    sigma: float = 0.3
    separate_heads: bool = True

    def __post_init__(self):
        if self.num_heads <= 0:
            raise ValueError(f"num_heads must be positive; got num_heads={self.num_heads}")
        if position.rotary_dim(self.head_dim, self.fraction) < 2:
            raise ValueError(
                "head_dim * fraction must give at least one rotated pair; got "
                f"head_dim={self.head_dim}, fraction={self.fraction}"
            )
        if self.train_length is not None and self.train_length <= 0:
            raise ValueError(f"train_length must be positive or None; got {self.train_length}")

    @property
    def rotary_dim(self) -> int:
        return position.rotary_dim(self.head_dim, self.fraction)


def kept_frequencies(cfg: Config) -> np.ndarray:
    """bool ``[r/2]``: the frequencies that complete a period within ``train_length``."""
    half = cfg.rotary_dim // 2
    if cfg.train_length is None:
        return np.ones((half,), bool)
    inv = float(cfg.theta) ** (-np.arange(0, cfg.rotary_dim, 2, dtype=np.float64) / cfg.rotary_dim)
    return inv >= 2.0 * math.pi / cfg.train_length


def _coef_init(sigma: float):
    def init(key, shape, dtype=jnp.float32):
        fan = shape[-1] + shape[-2]
        noise = jax.random.normal(key, shape, jnp.float32) * (sigma * math.sqrt(2.0 / fan))
        eye = jnp.broadcast_to(jnp.eye(shape[-1], dtype=jnp.float32), shape)
        return (noise + eye).astype(dtype)

    return init


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    half = cfg.rotary_dim // 2
    heads = cfg.num_heads if cfg.separate_heads else 1
    axes = ("heads" if cfg.separate_heads else None, None, None)
    spec = core.ParamSpec((heads, half, half), _coef_init(cfg.sigma), axes)
    return {"cos_coef": spec, "sin_coef": spec}


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def fourier_cos_sin(
    params: core.Params, positions: jax.Array, cfg: Config, dtype=jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """``C, S: [b, t, h or 1, r/2]`` (float32) for ``positions: [b, t]``."""
    kept = kept_frequencies(cfg)
    inv_freq = position.rope_frequencies(cfg.rotary_dim, cfg.theta) * jnp.asarray(kept, jnp.float32)
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [b, t, r/2]
    mask = jnp.asarray(kept[:, None] & kept[None, :], jnp.float32)  # [in, out]
    hi = jax.lax.Precision.HIGHEST

    def mix(basis, coef):
        a = coef.astype(dtype).astype(jnp.float32) * mask[None]
        a = a / jnp.where(kept[None, None, :], jnp.sum(a, axis=1, keepdims=True), 1.0)
        return jnp.einsum("bti,hij->bthj", basis, a, precision=hi)

    keep = jnp.asarray(kept)[None, None, None, :]
    cos = jnp.where(keep, mix(jnp.cos(angles), params["cos_coef"]), 1.0)
    sin = jnp.where(keep, mix(jnp.sin(angles), params["sin_coef"]), 0.0)
    return cos, sin


def apply(
    params: core.Params, x: jax.Array, cfg: Config, *, positions: jax.Array | None = None
) -> jax.Array:
    """FoPE of ``x: [b, t, h, k]`` at ``positions: int [b, t]`` (default ``arange(t)``)."""
    core.check_floating(x, "x")
    core.check_rank(x, 4, "x", "[batch, time, heads, head_dim]")
    core.check_dim(x, 2, cfg.num_heads, "x", "num_heads")
    core.check_dim(x, 3, cfg.head_dim, "x", "head_dim")
    b, t = x.shape[:2]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
    core.check_rank(positions, 2, "positions", "[batch, time]")
    if tuple(positions.shape) != (b, t):
        raise ValueError(
            f"positions must have shape (batch, time) = {(b, t)}; got shape {positions.shape}"
        )
    dtype = core.compute_dtype(cfg, x)
    r = cfg.rotary_dim
    cos, sin = fourier_cos_sin(params, positions, cfg, dtype)
    x32 = x.astype(dtype).astype(jnp.float32)
    x1, x2 = x32[..., : r // 2], x32[..., r // 2 : r]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if r < cfg.head_dim:
        out = jnp.concatenate([out, x32[..., r:]], axis=-1)
    return out.astype(dtype)


core.register_layer(
    "fope",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(
        config=Config(num_heads=2, head_dim=8, train_length=64), input_shape=(2, 8, 2, 8)
    ),
    kind="other",
)

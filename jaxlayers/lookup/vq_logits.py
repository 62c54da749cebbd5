"""VQ-Logits output head: logits over a small codebook, scattered to the vocabulary.

From "VQ-Logits: Compressing the Output Bottleneck of Large Language Models via Vector
Quantization". Every vocabulary entry ``v`` is assigned to one of ``K`` codebook vectors
``C [K, d]``; the head computes ``K`` logits and copies each to the tokens assigned to it::

    code_logits = x C^T                          [..., K]
    logits[v]   = code_logits[assign[v]] (+ b_v) [..., vocab]

Cost per token ``2 d K`` instead of ``2 d vocab``. The assignment is static (it has no
gradient) and lives in the config, not in the params, so that every param stays a float array
that optimisers and ``jax.grad`` accept: ``Config.assignment`` is a tuple of ``vocab`` ints, or
``None`` for ``v mod K`` (round robin). The paper builds it by clustering the rows of a trained
output embedding: :func:`assignment_from_embeddings` (k-means with a fixed number of Lloyd
steps) returns it ready for ``Config(assignment=...)`` (hashing a 32K-entry tuple when a jitted
function looks up its cache costs well under a millisecond). Choices: an optional per-token
bias (on by default) lets tokens that share a code differ by a constant.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlayers import core

__all__ = ["Config", "param_specs", "apply", "assignment_from_embeddings"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """VQ-Logits head ``[..., d_model] -> [..., vocab_size]`` through ``codebook_size`` codes."""

    d_model: int
    vocab_size: int
    codebook_size: int
    use_bias: bool = True
    assignment: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        for name in ("d_model", "vocab_size", "codebook_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.codebook_size > self.vocab_size:
            raise ValueError(
                f"codebook_size={self.codebook_size} must be <= vocab_size={self.vocab_size}"
            )
        if self.assignment is not None:
            a = np.asarray(self.assignment)
            if a.shape != (self.vocab_size,) or not np.issubdtype(a.dtype, np.integer):
                raise ValueError(
                    f"assignment must be a tuple of vocab_size={self.vocab_size} ints; "
                    f"got shape {a.shape}, dtype {a.dtype}"
                )
            if a.min() < 0 or a.max() >= self.codebook_size:
                raise ValueError(
                    f"assignment entries must lie in [0, codebook_size={self.codebook_size}); "
                    f"got min {a.min()}, max {a.max()}"
                )

    def assignment_array(self) -> np.ndarray:
        if self.assignment is None:
            return np.arange(self.vocab_size, dtype=np.int32) % self.codebook_size
        return np.asarray(self.assignment, np.int32)


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    specs = {
        "codebook": core.ParamSpec(
            (cfg.codebook_size, cfg.d_model),
            core.initializers.fan_in(1.0, in_axis=-1),
            (None, "embed"),
        ),
    }
    if cfg.use_bias:
        specs["bias"] = core.ParamSpec((cfg.vocab_size,), core.initializers.zeros, ("vocab",))
    return specs


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``logits[..., v] = <x, C[assign[v]]> + b_v``; ``[..., d_model] -> [..., vocab]``."""
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_model={cfg.d_model}]); got shape ()")
    core.check_dim(x, -1, cfg.d_model, "x", "d_model")
    assign = jnp.asarray(cfg.assignment_array())
    dtype = core.compute_dtype(cfg, x)
    p = core.cast_floating(params, dtype)
    code_logits = jnp.einsum(
        "...d,kd->...k", x.astype(dtype), p["codebook"], precision=lax.Precision.HIGHEST
    )
    logits = jnp.take(code_logits, assign, axis=-1, mode="clip")
    if cfg.use_bias:
        logits = logits + p["bias"].reshape((1,) * (logits.ndim - 1) + (cfg.vocab_size,))
    return logits


def assignment_from_embeddings(
    key: jax.Array, embeddings: jax.Array, codebook_size: int, steps: int = 20
) -> tuple[jax.Array, jax.Array]:
    """k-means of ``embeddings [vocab, d]``: ``(assignment tuple of ints, centres [K, d])``.

    Initial centres are ``codebook_size`` distinct random rows; ``steps`` Lloyd iterations; an
    empty cluster keeps its previous centre.
    """
    e = jnp.asarray(embeddings, jnp.float32)
    v = e.shape[0]
    centres = e[jax.random.choice(key, v, (codebook_size,), replace=False)]

    def assign_to(c):
        d2 = (
            jnp.sum(e * e, axis=1, keepdims=True)
            - 2.0 * jnp.matmul(e, c.T, precision=lax.Precision.HIGHEST)
            + jnp.sum(c * c, axis=1)[None, :]
        )
        return jnp.argmin(d2, axis=1).astype(jnp.int32)

    def step(c, _):
        a = assign_to(c)
        sums = jnp.zeros_like(c).at[a].add(e)
        counts = jnp.zeros((codebook_size,), jnp.float32).at[a].add(1.0)
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)
        return new, None

    centres, _ = lax.scan(step, centres, None, length=steps)
    return tuple(int(a) for a in np.asarray(assign_to(centres))), centres


core.register_layer(
    "vq_logits",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(
        config=Config(d_model=16, vocab_size=40, codebook_size=8), input_shape=(2, 8, 16)
    ),
    kind="head",
)

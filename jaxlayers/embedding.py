"""Token embedding with a tied unembedding.

    apply:   y[b, t] = E[tokens[b, t]]        tokens: int [b, t] -> y: [b, t, d]
    attend:  logits = x E^T                   x: [..., d]        -> logits: [..., vocab]

``E`` ("embedding") is ``[vocab, d]`` with logical axes ``("vocab", "embed")``, initialised
normal with standard deviation ``1/sqrt(d)`` so that tied logits ``x E^T`` of a unit-RMS ``x``
start at unit scale (the choice of "Using the Output Embedding to Improve Language Models" leaves
the scale open; this matches Flax's ``Embed`` default).

Compute dtype: ``cfg.dtype`` if set; otherwise ``cfg.param_dtype`` for :func:`apply` (the tokens
have no float dtype to follow) and the input's dtype for :func:`attend`. Token ids are not
range-checked (that needs their values, unknown at trace time): ids ``>= vocab_size`` give NaN
rows (``jnp.take``'s ``fill`` mode), negative ids wrap around as in Python indexing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlayers import core

__all__ = ["Config", "param_specs", "init", "apply", "attend"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """Embedding config: ``vocab_size`` rows of width ``d_model``."""

    vocab_size: int
    d_model: int

    def __post_init__(self):
        if self.vocab_size <= 0 or self.d_model <= 0:
            raise ValueError(
                "vocab_size and d_model must be positive; "
                f"got vocab_size={self.vocab_size}, d_model={self.d_model}"
            )


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-1, out_axis=-2)
    return {"embedding": core.ParamSpec((cfg.vocab_size, cfg.d_model), init, ("vocab", "embed"))}


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def _check_tokens(tokens) -> None:
    dt = jnp.result_type(tokens)
    if not jnp.issubdtype(dt, jnp.integer):
        raise TypeError(f"tokens must have an integer dtype (int32, ...); got {dt}")


def apply(params: core.Params, tokens: jax.Array, cfg: Config) -> jax.Array:
    """Look up rows: ``tokens: int [b, t]`` (any shape) -> ``[b, t, d_model]``."""
    _check_tokens(tokens)
    dtype = jnp.dtype(cfg.dtype) if cfg.dtype is not None else jnp.dtype(cfg.param_dtype)
    table = params["embedding"].astype(dtype)
    return jnp.take(table, tokens, axis=0)


def attend(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """Tied unembedding ``logits = x E^T``: ``x: [..., d_model]`` -> ``[..., vocab_size]``."""
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_model={cfg.d_model}]); got shape ()")
    core.check_dim(x, -1, cfg.d_model, "x", "d_model")
    dtype = core.compute_dtype(cfg, x)
    table = params["embedding"].astype(dtype)
    return jnp.einsum("...d,vd->...v", x.astype(dtype), table)


core.register_layer(
    "embedding",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(
        config=Config(vocab_size=64, d_model=16),
        input_shape=(2, 8),
        input_kind="tokens",
        input_vocab=64,
    ),
    kind="embedding",
)

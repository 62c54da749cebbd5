"""Losses of the training tasks, all with the signature of ``jaxlayers.models.lm.loss``:
``loss_fn(params, batch, cfg) -> (mean loss, {"loss", "accuracy", "num_tokens"})``.

:func:`lm_loss` is ``lm.loss`` (every position, weighted by ``mask``).

:func:`query_loss` scores only the positions listed in ``batch["query_pos"]`` (``[b, K]`` int32,
the MQAR query positions): it runs the model's trunk on all ``T`` tokens, gathers the ``K``
hidden states and unembeds only those, so the ``[b, T, vocab]`` logits tensor (the dominant cost
at vocab 8192 and T=128: ``T/K = 8x`` more work) is never built. Its value equals ``lm_loss`` on
the same batch (targets and mask are read at the same positions).

Under sequence parallelism (``--mesh.sequence``; ``jaxlayers.models.sequence_parallel``) each
shard holds a block of ``T/n`` tokens and the global ``query_pos``: it shifts them by its
``time_offset`` and counts only the queries that fall in its block (the others get weight 0),
so the shards' sums add up to the unsharded loss.

It needs the trunk of the LM separately from its head; ``jaxlayers.models.lm`` exposes these as
``_hidden`` / ``_logits`` (private), or as ``hidden`` / ``logits`` if it makes them public.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import sequence_context

__all__ = ["lm_loss", "query_loss"]


def lm_loss(params: Any, batch: dict, cfg: Any):
    from jaxlayers.models import lm

    return lm.loss(params, batch, cfg)


def _trunk_and_head():
    from jaxlayers.models import lm

    hidden = getattr(lm, "hidden", None)
    logits = getattr(lm, "logits", None)
    if hidden is not None and logits is not None:
        return (lambda p, t, c, s, pos: hidden(p, t, c, segment_ids=s, positions=pos)), logits
    return (lambda p, t, c, s, pos: lm._hidden(p, t, c, s, pos, None, False)[0]), lm._logits


def query_loss(params: Any, batch: dict, cfg: Any):
    """Mean cross-entropy over ``query_pos`` (weighted by ``mask`` there); see the module doc."""
    hidden_fn, logits_fn = _trunk_and_head()
    pos = batch["query_pos"].astype(jnp.int32)  # [b, K]
    x = hidden_fn(
        params, batch["tokens"], cfg, batch.get("segment_ids"), batch.get("positions")
    )  # [b, t, d]
    inside = None
    if sequence_context.current() is not None:  # x holds one block of T/n tokens
        t = x.shape[1]
        pos = pos - sequence_context.time_offset(t)
        inside = (pos >= 0) & (pos < t)
        pos = jnp.clip(pos, 0, t - 1)
    xq = jnp.take_along_axis(x, pos[..., None], axis=1)  # [b, K, d]
    logits = logits_fn(params, xq, cfg)  # [b, K, vocab] float32
    targets = jnp.take_along_axis(batch["targets"], pos, axis=1)
    weights = jnp.take_along_axis(batch["mask"], pos, axis=1).astype(jnp.float32)
    if inside is not None:
        weights = weights * inside.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    count = jnp.sum(weights)
    denom = jnp.maximum(count, 1.0)
    mean = jnp.sum(nll * weights) / denom
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return mean, {"loss": mean, "accuracy": jnp.sum(correct * weights) / denom, "num_tokens": count}

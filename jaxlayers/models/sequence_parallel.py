"""The decoder LM with its sequence (time) axis sharded over a mesh axis (context parallelism).

:func:`loss` (and :func:`make_loss` for any loss with the signature of
:func:`jaxlayers.models.lm.loss`) and :func:`apply` run the model inside one ``jax.shard_map``:
batch rows are split over ``batch_axes`` (default ``("data",)``) and the tokens of every row over
``sequence_axis`` (default ``"sequence"``); shard ``s`` of ``n`` holds tokens
``[s T/n, (s + 1) T/n)``. The body is traced under
:func:`pallas_kernels.linear_attention.sequence_context.sequence_parallel_axis`, which makes
the layers exchange what crosses a shard boundary:

* linear-attention mixers built on ``pallas_kernels.linear_attention`` (``gated_linear_attention``
  / ``delta_rule``): LASP-2 style state passing, one all-gather of the per-shard states
  (``[n, b, h, k, v + 1]`` or ``[n, b, h, k, v + k]``, independent of ``T``);
* softmax attention: all-gather of the rotated keys / values and segment ids, local queries
  with global causal positions (``jaxlayers.attention``);
* short causal convolutions (``short_conv.causal_conv``, also inside DeltaNet-style mixers):
  a halo of ``K - 1`` tokens from the previous shard (one ``ppermute``).

Norms, MLPs, embeddings and heads act token by token and need nothing. The result is the
loss / logits of the unsharded model (up to float rounding), and so are the gradients: the
transposes of the collectives (reduce-scatter for all-gather, the reverse ``ppermute``) are
what autodiff of the shard_map produces, and the params (in_spec ``P()``) get their gradient
summed over every shard.

Data conventions, so that every shard can compute its part of the loss alone:

* When ``batch`` has no ``targets``, they are built *before* sharding with the convention of
  ``lm.loss`` (``targets[:, i] = tokens[:, i + 1]``, weight 0 on the last position and before
  every segment start, times ``mask``); the shifted pair would otherwise cross shard boundaries.
* When ``batch`` has no ``positions``, the global ``0 .. T-1`` are passed to the mixers (the
  default of every mixer on the unsharded sequence).
* ``T`` is padded at the end to a multiple of ``n`` (tokens 0, weight 0, the last segment id and
  position repeated); causal layers never read later tokens, so padding changes nothing, and
  non-causal attention masks it with the context's ``length``.
* The per-shard loss sums (``mean * count``), correct counts and token counts are returned per
  shard and added outside the shard_map; the mean is their ratio, as in ``lm.loss``.

Entries of ``batch`` named in ``time_keys`` (``[b, T]``) are split over time; every other entry
(e.g. MQAR ``query_pos [b, K]``) only over the batch axes: a loss that indexes time with such
entries must translate global positions with ``sequence_context.time_offset`` (as
``train.losses.query_loss`` does) and count each position on one shard only.

Mixers: only layers that are known to be correct under the context may run (the rest raise
``NotImplementedError`` naming the layer): those listed in :data:`SEQUENCE_PARALLEL_MIXERS`
(each verified against the unsharded layer in ``tests/jaxlayers/models``) or added with
:func:`register_sequence_parallel`. Mesh axes other than ``batch_axes`` and ``sequence_axis``
(e.g. ``fsdp`` / ``tensor``) see the computation replicated: inside the shard_map every device
holds the full params (a parameter sharded over such an axis is gathered once per step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlayers import core
from jaxlayers.models import lm
from pallas_kernels.linear_attention.sequence_context import sequence_parallel_axis

__all__ = [
    "SEQUENCE_PARALLEL_MIXERS",
    "TIME_KEYS",
    "register_sequence_parallel",
    "check_supported",
    "explicit_targets",
    "make_loss",
    "loss",
    "apply",
]

TIME_KEYS = ("tokens", "targets", "mask", "segment_ids", "positions")


def _always(cfg: Any) -> str | None:
    return None


def _linear_attention(cfg: Any) -> str | None:
    if getattr(cfg, "normalize", False):
        return "normalize=True (its normalizer is a running sum outside the ops)"
    return None


# Registry name -> check(cfg) returning None when the config is supported, else the reason.
# Each was checked against the unsharded layer (tests/jaxlayers/models). Not listed, because
# some cross-token computation runs outside the context-aware pieces: lightnet and regla
# (running logsumexp / max scans), log_linear_attention, ttt_linear, lssl, lolcats (sliding
# window), the non-causal lion / lit_attention / slab_attention.
SEQUENCE_PARALLEL_MIXERS: dict[str, Callable[[Any], str | None]] = {
    "attention": _always,
    "deltanet": _always,
    "gated_deltanet": _always,
    "gla": _always,
    "hgrn2": _always,
    "lightning_attention": _always,
    "linear_attention": _linear_attention,
    "mamba2": _always,
    "mom": _always,
    "retnet": _always,  # its RoPE needs global positions: passed by loss / apply here
    "short_conv": _always,
}


def register_sequence_parallel(name: str, check: Callable[[Any], str | None] = _always) -> None:
    """Declare the registered mixer ``name`` correct under sequence parallelism.

    ``check(cfg)`` returns None for a supported config, else a reason (shown in the error).
    Do this only for layers whose every cross-token interaction goes through the
    context-aware pieces (the linear-attention ops, attention, ``short_conv.causal_conv``).
    """
    core.layer_fns(name)  # registered?
    SEQUENCE_PARALLEL_MIXERS[name] = check


def check_supported(cfg: lm.LMConfig) -> None:
    """Raise ``NotImplementedError`` naming the first block whose mixer cannot run sharded."""
    for i, block in enumerate(cfg.blocks):
        fns = core.layer_fns(block.mixer)
        check = SEQUENCE_PARALLEL_MIXERS.get(fns.name)
        reason = "it is not declared sequence-parallel" if check is None else check(block.mixer)
        if reason is not None:
            raise NotImplementedError(
                f"mixer {fns.name!r} ({type(block.mixer).__module__}) of block {i} cannot run "
                f"with the sequence axis sharded: {reason}. Supported mixers: "
                f"{sorted(SEQUENCE_PARALLEL_MIXERS)} (see register_sequence_parallel)"
            )


# --------------------------------------------------------------------------------------------
# Batch preparation (global arrays, before sharding)
# --------------------------------------------------------------------------------------------


def explicit_targets(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``batch`` with ``targets`` and ``mask`` made explicit (the convention of ``lm.loss``).

    Without ``targets``: ``targets[:, i] = tokens[:, i + 1]``; ``mask`` becomes 0 at the last
    position and (with ``segment_ids``) wherever the next token starts another segment, times
    the given ``mask``. ``lm.loss`` of the result equals ``lm.loss`` of ``batch``.
    """
    out = dict(batch)
    if "targets" in out:
        return out
    tokens = out["tokens"]
    b, t = tokens.shape
    out["targets"] = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    weights = jnp.broadcast_to(jnp.arange(t) < t - 1, (b, t)).astype(jnp.float32)
    seg = out.get("segment_ids")
    if seg is not None:
        same = jnp.concatenate([seg[:, 1:] == seg[:, :-1], jnp.zeros((b, 1), bool)], axis=1)
        weights = weights * same.astype(jnp.float32)
    if "mask" in out:
        weights = weights * out["mask"].astype(jnp.float32)
    out["mask"] = weights
    return out


def _pad_time(x: jax.Array, tp: int, edge: bool) -> jax.Array:
    t = x.shape[1]
    if t == tp:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, tp - t)
    return jnp.pad(x, widths, mode="edge" if edge else "constant")


def _prepare(batch, n: int, time_keys: Iterable[str]) -> tuple[dict, int, int, set]:
    tokens = batch["tokens"]
    core.check_rank(tokens, 2, "tokens", "[batch, time]")
    b, t = tokens.shape
    batch = dict(batch)
    if "positions" not in batch:
        batch["positions"] = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    tp = -(-t // n) * n
    timed = {k for k in time_keys if k in batch}
    for k in timed:
        if tuple(jnp.shape(batch[k]))[:2] != (b, t):
            raise ValueError(
                f"batch[{k!r}] must have shape [batch, time] = {(b, t)}; got {jnp.shape(batch[k])}"
            )
        batch[k] = _pad_time(jnp.asarray(batch[k]), tp, edge=k in ("segment_ids", "positions"))
    return batch, t, tp, timed


def _axes(mesh, sequence_axis: str, batch_axes: tuple[str, ...]) -> int:
    names = tuple(mesh.axis_names)
    if sequence_axis not in names:
        raise ValueError(
            f"sequence_axis must be one of the mesh axes {names}; got {sequence_axis!r}"
        )
    for a in batch_axes:
        if a not in names or a == sequence_axis:
            raise ValueError(
                f"batch_axes must name mesh axes {names} other than sequence_axis="
                f"{sequence_axis!r}; got {batch_axes}"
            )
    return mesh.shape[sequence_axis]


def _specs(batch, timed, sequence_axis, batch_axes):
    bspec = batch_axes if batch_axes else None
    return {
        k: P(bspec, sequence_axis) if k in timed else P(bspec, *([None] * (jnp.ndim(v) - 1)))
        for k, v in batch.items()
    }


# --------------------------------------------------------------------------------------------
# Loss and logits
# --------------------------------------------------------------------------------------------


def make_loss(
    mesh: jax.sharding.Mesh,
    *,
    loss_fn: Callable | None = None,
    sequence_axis: str = "sequence",
    batch_axes: tuple[str, ...] = ("data",),
    time_keys: Iterable[str] = TIME_KEYS,
) -> Callable:
    """``loss_fn`` (default ``lm.loss``) with the sequence sharded; same signature and value.

    ``loss_fn(params, batch, cfg) -> (mean, {"loss", "accuracy", "num_tokens", ...})`` runs on
    each shard's block of the batch; the returned function combines the shards' token-weighted
    sums (see the module docstring). Only ``loss``, ``accuracy`` and ``num_tokens`` are returned.
    """
    batch_axes = tuple(batch_axes)
    time_keys = tuple(time_keys)
    inner = lm.loss if loss_fn is None else loss_fn

    def sharded_loss(params, batch, cfg):
        check_supported(cfg)
        n = _axes(mesh, sequence_axis, batch_axes)
        batch, t, _, timed = _prepare(explicit_targets(batch), n, time_keys)

        def body(p, local):
            with sequence_parallel_axis(sequence_axis, length=t):
                mean, m = inner(p, local, cfg)
            count = m["num_tokens"].astype(jnp.float32)
            denom = jnp.maximum(count, 1.0)
            sums = jnp.stack([mean * denom, m["accuracy"] * denom, count])
            return sums[None, None]  # [1, 1, 3]: this (batch, sequence) shard

        fn = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), _specs(batch, timed, sequence_axis, batch_axes)),
            out_specs=P(batch_axes if batch_axes else None, sequence_axis),
            check_vma=False,  # the local linear-attention ops start scans from constant carries
        )
        totals = jnp.sum(fn(params, batch), axis=(0, 1))
        count = totals[2]
        denom = jnp.maximum(count, 1.0)
        mean = totals[0] / denom
        return mean, {"loss": mean, "accuracy": totals[1] / denom, "num_tokens": count}

    return sharded_loss


def loss(
    params: core.Params,
    batch: Mapping[str, jax.Array],
    cfg: lm.LMConfig,
    *,
    mesh: jax.sharding.Mesh,
    sequence_axis: str = "sequence",
    batch_axes: tuple[str, ...] = ("data",),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``lm.loss(params, batch, cfg)`` with the sequence sharded over ``mesh[sequence_axis]``."""
    fn = make_loss(mesh, sequence_axis=sequence_axis, batch_axes=batch_axes)
    return fn(params, batch, cfg)


def apply(
    params: core.Params,
    tokens: jax.Array,
    cfg: lm.LMConfig,
    *,
    mesh: jax.sharding.Mesh,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    sequence_axis: str = "sequence",
    batch_axes: tuple[str, ...] = ("data",),
) -> jax.Array:
    """``lm.apply`` (logits ``[b, T, vocab]`` float32) with the sequence sharded."""
    check_supported(cfg)
    batch_axes = tuple(batch_axes)
    n = _axes(mesh, sequence_axis, batch_axes)
    batch = {"tokens": tokens}
    if segment_ids is not None:
        batch["segment_ids"] = segment_ids
    if positions is not None:
        batch["positions"] = positions
    batch, t, _, timed = _prepare(batch, n, TIME_KEYS)

    def body(p, local):
        with sequence_parallel_axis(sequence_axis, length=t):
            return lm.apply(
                p,
                local["tokens"],
                cfg,
                segment_ids=local.get("segment_ids"),
                positions=local["positions"],
            )

    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), _specs(batch, timed, sequence_axis, batch_axes)),
        out_specs=P(batch_axes if batch_axes else None, sequence_axis),
        check_vma=False,
    )
    return fn(params, batch)[:, :t]

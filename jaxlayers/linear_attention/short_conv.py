"""ShortConvolution: a causal depthwise 1-D convolution over time, with a decode cache.

Every channel ``c`` is filtered on its own by a kernel of ``K`` taps (``K = kernel_size``,
default 4) that sees the current token and the ``K - 1`` before it::

    y_t[c] = act( sum_{j=0}^{K-1} w[j, c] x_{t-K+1+j}[c] + b[c] )     x: [b, t, c] -> y: [b, t, c]

``w`` is stored ``[K, c]`` ("kernel"); tap ``j = K - 1`` multiplies the current token, tap
``j = 0`` the oldest one. ``act`` is SiLU (``activation="silu"``, the default) or the identity
(``activation=None``); the bias ``b`` is optional (``use_bias``, off by default).

Linear-attention mixers put this in front of their recurrences (H3, Mamba, "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length" for DeltaNet, "Gated Delta
Networks", MoM) to give q, k and v some local context; the name follows the
flash-linear-attention library. The causal conv is also a mixer on its own (registered as
``"short_conv"``, ``d -> d``).

Choices the papers leave open, made here:

* Tokens before the start (``t - K + 1 + j < 0``) come from the cache ``initial_state``
  ``[b, K - 1, c]`` (the last ``K - 1`` *inputs* of the previous call, oldest first) or are zero.
* Packed sequences: with ``segment_ids [b, t]`` a new sequence starts wherever the id differs
  from the previous position's (the convention of ``pallas_kernels.linear_attention``). A tap that
  would read a token of an earlier sequence reads zero instead; the cache reaches only the first
  sequence of each row. The returned cache holds the last ``K - 1`` inputs of the *last* sequence
  (zeros where that sequence is shorter), so it equals the cache of running that sequence alone.
* Sequence parallelism: under
  ``pallas_kernels.linear_attention.sequence_context.sequence_parallel_axis`` (inside a
  ``shard_map`` splitting time), :func:`causal_conv` takes the previous shard's last ``K - 1``
  inputs as its cache (``sequence_context.halo_exchange``: one ``ppermute``; each shard must hold
  at least ``K - 1`` tokens) and returns the last shard's cache on every shard.
* Arithmetic: products and sums in float32, the result rounded once to the compute dtype. The
  cache is kept in the dtype of ``initial_state`` when one is given, else the compute dtype.
* Init: kernel uniform in ``[-1/sqrt(K), 1/sqrt(K)]`` (the fan-in bound of a depthwise conv, as
  in PyTorch's ``Conv1d`` default), bias zero.

Params: ``{"kernel": [K, c], "bias": [c]}`` (bias only with ``use_bias``); logical axes
``(None, channel_axis)``.

Two levels of API:

* plain functions for use inside other mixers: :func:`conv_param_specs`, :func:`causal_conv`
  (full sequence, returns the output and the cache), :func:`causal_conv_step` (one token);
* the registered mixer: :class:`Config`, :func:`param_specs`, :func:`init`, :func:`apply`,
  :func:`init_state`, :func:`step` (contract of :mod:`jaxlayers.attention`; ``positions`` is
  accepted and ignored). Its state is the cache ``[b, K - 1, d]``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxlayers import core
from pallas_kernels.linear_attention import sequence_context

__all__ = [
    "ACTIVATIONS",
    "Config",
    "param_specs",
    "init",
    "apply",
    "init_state",
    "step",
    "conv_param_specs",
    "causal_conv",
    "causal_conv_step",
    "check_segment_ids",
    "segment_runs",
]

ACTIVATIONS = (None, "silu")


# --------------------------------------------------------------------------------------------
# Plain functions
# --------------------------------------------------------------------------------------------


def _kernel_init(kernel_size: int) -> core.Initializer:
    bound = 1.0 / math.sqrt(kernel_size)
    return core.initializers.uniform_range(-bound, bound)


def conv_param_specs(
    channels: int, kernel_size: int, use_bias: bool = False, channel_axis: str | None = "heads"
) -> dict[str, core.ParamSpec]:
    """Specs of one depthwise causal conv: ``{"kernel": [K, c], ("bias": [c])}``."""
    specs = {
        "kernel": core.ParamSpec(
            (kernel_size, channels), _kernel_init(kernel_size), (None, channel_axis)
        )
    }
    if use_bias:
        specs["bias"] = core.ParamSpec((channels,), core.initializers.zeros, (channel_axis,))
    return specs


def check_segment_ids(segment_ids, batch: int, time: int) -> None:
    """Raise unless ``segment_ids`` is an integer array of shape ``[batch, time]``."""
    if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
        raise TypeError(
            f"segment_ids must have an integer dtype (int32); got {jnp.result_type(segment_ids)}"
        )
    if tuple(jnp.shape(segment_ids)) != (batch, time):
        raise ValueError(
            f"segment_ids must have shape [batch, time] = {(batch, time)}; "
            f"got {jnp.shape(segment_ids)}"
        )


def segment_runs(segment_ids: jax.Array) -> jax.Array:
    """``[b, t]`` int32 sequence index: 0 for the first run, +1 wherever the id changes."""
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate(
        [jnp.zeros((segment_ids.shape[0], 1), jnp.int32), jnp.cumsum(change, axis=1)], axis=1
    )


def _activate(y: jax.Array, activation: str | None) -> jax.Array:
    return jax.nn.silu(y) if activation == "silu" else y


def _check_kernel(kernel, bias, channels: int, name: str) -> int:
    core.check_rank(kernel, 2, "kernel", "[kernel_size, channels]")
    core.check_dim(kernel, 1, channels, "kernel", f"channels of {name}")
    if bias is not None:
        core.check_rank(bias, 1, "bias", "[channels]")
        core.check_dim(bias, 0, channels, "bias", f"channels of {name}")
    return int(kernel.shape[0])


def _check_cache(state, batch: int, width: int, channels: int, name: str) -> None:
    core.check_floating(state, name)
    want = (batch, width, channels)
    if tuple(jnp.shape(state)) != want:
        raise ValueError(
            f"{name} must have shape [batch, kernel_size - 1, channels] = {want}; "
            f"got {jnp.shape(state)}"
        )


def causal_conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    activation: str | None = None,
    segment_ids: jax.Array | None = None,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Causal depthwise conv of ``x [b, t, c]`` with ``kernel [K, c]`` (and ``bias [c]``).

    Returns ``(y [b, t, c] in x's dtype, cache [b, K - 1, c])``: the output and the last
    ``K - 1`` inputs of the last sequence (see the module docstring for ``segment_ids`` and the
    cache's dtype). ``kernel``/``bias`` are cast to x's dtype first (the compute-dtype policy).
    """
    core.check_floating(x, "x")
    core.check_rank(x, 3, "x", "[batch, time, channels]")
    b, t, c = x.shape
    ksize = _check_kernel(kernel, bias, c, "x")
    width = ksize - 1
    if initial_state is None:
        cache = jnp.zeros((b, width, c), x.dtype)
    else:
        _check_cache(initial_state, b, width, c, "initial_state")
        cache = initial_state
    core.check_choice(activation, ACTIVATIONS, "activation")
    if segment_ids is not None:
        check_segment_ids(segment_ids, b, t)
    if sequence_context.current() is not None:  # time split over a mesh axis: halo exchange
        halo = sequence_context.halo_exchange(x, width, initial=cache, segment_ids=segment_ids)
        with sequence_context.suspended():
            y, final = causal_conv(
                x, kernel, bias, activation=activation, segment_ids=segment_ids, initial_state=halo
            )
        return y, sequence_context.from_last_shard(final)

    xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [b, K - 1 + t, c]
    xp32 = xp.astype(jnp.float32)
    w32 = kernel.astype(x.dtype).astype(jnp.float32)
    if segment_ids is not None:
        runs = segment_runs(segment_ids)
        # Cache slots belong to the first sequence (run 0).
        runs_p = jnp.concatenate([jnp.zeros((b, width), jnp.int32), runs], axis=1)
    acc = jnp.zeros((b, t, c), jnp.float32)
    for j in range(ksize):
        tap = xp32[:, j : j + t]
        if segment_ids is not None:
            keep = runs_p[:, j : j + t] == runs
            tap = jnp.where(keep[:, :, None], tap, 0.0)
        acc = acc + tap * w32[j][None, None, :]
    if bias is not None:
        acc = acc + bias.astype(x.dtype).astype(jnp.float32)[None, None, :]
    y = _activate(acc, activation).astype(x.dtype)

    out_dtype = cache.dtype
    final = xp[:, t:]  # the last K - 1 inputs
    if segment_ids is not None:
        last = runs_p[:, t:] == runs[:, -1:]
        final = jnp.where(last[:, :, None], final, jnp.zeros((), final.dtype))
    return y, final.astype(out_dtype)


def causal_conv_step(
    x_t: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    state: jax.Array,
    activation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One token of :func:`causal_conv`: ``x_t [b, c]``, ``state [b, K - 1, c]``.

    Returns ``(y_t [b, c] in x_t's dtype, new state in the state's dtype)``.
    """
    core.check_floating(x_t, "x_t")
    core.check_rank(x_t, 2, "x_t", "[batch, channels]")
    b, c = x_t.shape
    ksize = _check_kernel(kernel, bias, c, "x_t")
    _check_cache(state, b, ksize - 1, c, "state")
    core.check_choice(activation, ACTIVATIONS, "activation")
    window = jnp.concatenate([state.astype(x_t.dtype), x_t[:, None, :]], axis=1)  # [b, K, c]
    w32 = kernel.astype(x_t.dtype).astype(jnp.float32)
    acc = jnp.sum(window.astype(jnp.float32) * w32[None], axis=1)
    if bias is not None:
        acc = acc + bias.astype(x_t.dtype).astype(jnp.float32)[None, :]
    y = _activate(acc, activation).astype(x_t.dtype)
    return y, window[:, 1:].astype(state.dtype)


# --------------------------------------------------------------------------------------------
# The registered mixer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """ShortConvolution config.

    Attributes:
      d_model: channels ``d`` (input and output width).
      kernel_size: taps ``K`` (>= 1); the cache holds ``K - 1`` tokens.
      activation: "silu" (default) or None (identity).
      use_bias: add a learned per-channel bias.
      channel_axis: logical axis name of the channel dim (for sharding).
    """

    d_model: int
    kernel_size: int = 4
    activation: str | None = "silu"
    use_bias: bool = False
    channel_axis: str | None = "heads"

    def __post_init__(self):
        if self.d_model <= 0:
            raise ValueError(f"d_model must be positive; got d_model={self.d_model}")
        if self.kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1; got kernel_size={self.kernel_size}")
        core.check_choice(self.activation, ACTIVATIONS, "activation")


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    return conv_param_specs(cfg.d_model, cfg.kernel_size, cfg.use_bias, cfg.channel_axis)


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def init_state(cfg: Config, batch: int, dtype=jnp.float32) -> jax.Array:
    """Empty cache ``[batch, kernel_size - 1, d_model]`` of zeros."""
    return jnp.zeros((batch, cfg.kernel_size - 1, cfg.d_model), dtype)


def _check_x(x, cfg: Config, rank: int, name: str, layout: str):
    core.check_floating(x, name)
    core.check_rank(x, rank, name, layout)
    core.check_dim(x, -1, cfg.d_model, name, "d_model")


def apply(
    params: core.Params,
    x: jax.Array,
    cfg: Config,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    return_state: bool = False,
):
    """``x [b, t, d] -> y [b, t, d]`` (and the cache ``[b, K - 1, d]`` with ``return_state``).

    ``positions`` is accepted for the mixer contract and ignored.
    """
    del positions
    _check_x(x, cfg, 3, "x", "[batch, time, d_model]")
    x = x.astype(core.compute_dtype(cfg, x))
    y, cache = causal_conv(
        x,
        params["kernel"],
        params.get("bias"),
        activation=cfg.activation,
        segment_ids=segment_ids,
        initial_state=initial_state,
    )
    return (y, cache) if return_state else y


def step(params: core.Params, state: jax.Array, x_t: jax.Array, cfg: Config):
    """One token: ``x_t [b, d]`` -> ``(y_t [b, d], cache [b, K - 1, d])``."""
    _check_x(x_t, cfg, 2, "x_t", "[batch, d_model]")
    x_t = x_t.astype(core.compute_dtype(cfg, x_t))
    return causal_conv_step(
        x_t, params["kernel"], params.get("bias"), state=state, activation=cfg.activation
    )


core.register_layer(
    "short_conv",
    Config,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    example=core.Example(config=Config(d_model=16, use_bias=True), input_shape=(2, 8, 16)),
    kind="mixer",
)

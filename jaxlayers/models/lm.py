"""A decoder-only language model assembled from residual blocks.

    x_0   = Embed(tokens)                                   tokens: [b, t] int
    x_l   = Block_l(x_{l-1})         l = 1..L               (any mixer / MLP per layer)
    logits = Unembed(FinalNorm(x_L))                        [b, t, vocab] float32

``Unembed`` is the transposed embedding table when ``tie_embeddings`` (``x E^T``), else a separate
``[d, vocab]`` kernel (params ``"unembed"``). Each block names its own sequence mixer and MLP, so
hybrid stacks (e.g. 3 linear-attention : 1 softmax-attention layers) are plain configs:
:meth:`LMConfig.hybrid` builds them from a pattern string.

Params::

    {"embed": {...}, "blocks": {"0": {...}, "1": {...}, ...}, "final_norm": {...},
     ["unembed": {"kernel": [d, vocab]}], ["head": {...}]}

With ``scan_layers=True`` (every block identical) ``"blocks"`` is instead *one* block's tree whose
leaves carry a leading ``[layers]`` axis (logical name ``"layers"``), and the stack runs under
``lax.scan`` (one compiled block for any depth).

Decoding: :func:`init_state` / :func:`step` run one token at a time through every block's mixer
state; :func:`prefill` runs a prompt with ``apply(..., return_state=True)``; :func:`generate`
samples (greedy, temperature, top-k) with ``step`` under ``lax.scan``.

Choices the Peri-LN paper leaves open: ``embed_norm=True`` adds a norm on the embedding output
(off by default); the final norm is kept for both placements.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxlayers import core, dense, embedding, norms
from jaxlayers.models import block as block_lib
from jaxlayers.models.block import BlockConfig

__all__ = [
    "LMConfig",
    "Config",
    "param_specs",
    "init",
    "apply",
    "loss",
    "init_state",
    "step",
    "prefill",
    "generate",
    "segment_positions",
]

FINAL_NORMS = ("rms", "layer", None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig(core.LayerConfig):
    """Decoder LM config.

    Attributes:
      vocab_size: number of token ids.
      d_model: residual width ``d`` (every block's ``d_model`` must match).
      blocks: one :class:`BlockConfig` per layer, bottom to top.
      tie_embeddings: compute logits with the embedding table (``x E^T``); else a separate
        ``"unembed"`` kernel ``[d, vocab]``.
      head: any registered layer ``[..., d] -> [..., vocab]`` used as the output head instead of
        the (tied or separate) unembedding, e.g. a VQ-Logits head (params ``"head"``); needs
        ``tie_embeddings=False``.
      final_norm: "rms", "layer" or None: the norm before the unembedding.
      embed_norm: normalize the embedding output (an option some Peri-LN models use).
      norm_eps: epsilon of the final and embedding norms.
      scan_layers: store the blocks stacked (leading ``layers`` axis) and run them with
        ``lax.scan``; needs identical blocks.
      remat: recompute each block's activations in the backward pass (``jax.checkpoint``).
      dtype: compute dtype of the embedding output (hence of the residual stream), the final
        norm and the unembedding; logits are always returned in float32.
    """

    vocab_size: int
    d_model: int
    blocks: tuple[BlockConfig, ...]
    tie_embeddings: bool = True
    head: Any = None
    final_norm: str | None = "rms"
    embed_norm: bool = False
    norm_eps: float = 1e-6
    scan_layers: bool = False
    remat: bool = False

    def __post_init__(self):
        if not isinstance(self.blocks, tuple):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.vocab_size <= 0 or self.d_model <= 0:
            raise ValueError(
                f"vocab_size and d_model must be positive; got vocab_size={self.vocab_size}, "
                f"d_model={self.d_model}"
            )
        if not self.blocks:
            raise ValueError("blocks must hold at least one BlockConfig; got ()")
        for i, b in enumerate(self.blocks):
            if not isinstance(b, BlockConfig):
                raise TypeError(f"blocks[{i}] must be a BlockConfig; got {type(b).__name__}")
            if b.d_model != self.d_model:
                raise ValueError(
                    f"blocks[{i}].d_model must equal d_model={self.d_model}; got {b.d_model}"
                )
        core.check_choice(self.final_norm, FINAL_NORMS, "final_norm")
        if self.head is not None:
            core.layer_fns(self.head)  # registered?
            if self.tie_embeddings:
                raise ValueError("head replaces the unembedding: set tie_embeddings=False")
            for field, want in (("d_model", self.d_model), ("vocab_size", self.vocab_size)):
                got = getattr(self.head, field, want)
                if got != want:
                    raise ValueError(f"head.{field} must equal {field}={want}; got {got}")
        if self.scan_layers and any(b != self.blocks[0] for b in self.blocks):
            raise ValueError("scan_layers=True needs identical blocks; got a mixed stack")

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def embed_config(self) -> embedding.Config:
        return embedding.Config(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    @property
    def unembed_config(self) -> dense.Config:
        return dense.Config(
            d_in=self.d_model,
            d_out=self.vocab_size,
            use_bias=False,
            kernel_axes=("embed", "vocab"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def norm_config(self, kind: str) -> core.LayerConfig:
        cls = norms.RMSNormConfig if kind == "rms" else norms.LayerNormConfig
        return cls(
            dim=self.d_model, eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype
        )

    # ---- builders -------------------------------------------------------------------------

    @classmethod
    def uniform(
        cls,
        *,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        mixer: Any,
        mlp: Any = None,
        norm: str = "rms",
        placement: str = "pre",
        norm_eps: float = 1e-6,
        **kwargs: Any,
    ) -> LMConfig:
        """``num_layers`` identical blocks of ``mixer`` + ``mlp``."""
        return cls.hybrid(
            vocab_size=vocab_size,
            d_model=d_model,
            pattern="X",
            mixers={"X": mixer},
            mlp=mlp,
            num_layers=num_layers,
            norm=norm,
            placement=placement,
            norm_eps=norm_eps,
            **kwargs,
        )

    @classmethod
    def hybrid(
        cls,
        *,
        vocab_size: int,
        d_model: int,
        pattern: str,
        mixers: Mapping[str, Any],
        mlp: Any = None,
        num_layers: int | None = None,
        norm: str = "rms",
        placement: str = "pre",
        norm_eps: float = 1e-6,
        **kwargs: Any,
    ) -> LMConfig:
        """A stack whose layer ``i`` uses ``mixers[pattern[i % len(pattern)]]``.

        ``pattern="LLLA", mixers={"L": linear_cfg, "A": softmax_cfg}, num_layers=8`` gives
        L L L A L L L A. ``num_layers`` defaults to ``len(pattern)``. ``mlp`` is one config for
        every layer, or a mapping from pattern letter to config (None = no MLP).
        ``kwargs`` go to :class:`LMConfig` (``dtype``/``param_dtype`` also reach the blocks).
        """
        if not pattern:
            raise ValueError("pattern must be a non-empty string such as 'LLLA'; got ''")
        missing = sorted(set(pattern) - set(mixers))
        if missing:
            raise ValueError(
                f"mixers must have a config for every letter of pattern "
                f"{pattern!r}; missing {missing}"
            )
        n = len(pattern) if num_layers is None else num_layers
        if n <= 0:
            raise ValueError(f"num_layers must be positive; got {n}")
        block_dtypes = {k: kwargs[k] for k in ("dtype", "param_dtype") if k in kwargs}
        blocks = []
        for i in range(n):
            letter = pattern[i % len(pattern)]
            layer_mlp = mlp.get(letter) if isinstance(mlp, Mapping) else mlp
            blocks.append(
                BlockConfig(
                    d_model=d_model,
                    mixer=mixers[letter],
                    mlp=layer_mlp,
                    norm=norm,
                    placement=placement,
                    norm_eps=norm_eps,
                    **block_dtypes,
                )
            )
        final_norm = kwargs.pop("final_norm", norm)
        return cls(
            vocab_size=vocab_size,
            d_model=d_model,
            blocks=tuple(blocks),
            final_norm=final_norm,
            norm_eps=norm_eps,
            **kwargs,
        )


Config = LMConfig


# --------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------


def _stacked(spec: core.ParamSpec, n: int) -> core.ParamSpec:
    def init(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, n)
        return jax.vmap(lambda k: spec.init(k, shape[1:], dtype))(keys)

    return core.ParamSpec((n, *spec.shape), init, ("layers", *spec.axes), spec.dtype)


def param_specs(cfg: LMConfig) -> dict[str, Any]:
    specs: dict[str, Any] = {"embed": dict(core.param_specs(cfg.embed_config))}
    if cfg.embed_norm:
        specs["embed_norm"] = dict(core.param_specs(cfg.norm_config("rms")))
    if cfg.scan_layers:
        one = block_lib.param_specs(cfg.blocks[0])
        specs["blocks"] = jax.tree.map(
            lambda s: _stacked(s, cfg.num_layers),
            one,
            is_leaf=lambda s: isinstance(s, core.ParamSpec),
        )
    else:
        specs["blocks"] = {str(i): block_lib.param_specs(b) for i, b in enumerate(cfg.blocks)}
    if cfg.final_norm is not None:
        specs["final_norm"] = dict(core.param_specs(cfg.norm_config(cfg.final_norm)))
    if cfg.head is not None:
        specs["head"] = dict(core.param_specs(cfg.head))
    elif not cfg.tie_embeddings:
        specs["unembed"] = dict(core.param_specs(cfg.unembed_config))
    return specs


def init(key: jax.Array, cfg: LMConfig) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of every token inside its segment: ``[b, t] -> [b, t]`` int32.

    A segment starts wherever the id differs from the previous token's id.
    """
    t = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    first = jnp.ones(segment_ids.shape[:-1] + (1,), bool)
    starts_here = jnp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], -1)
    starts = lax.cummax(jnp.where(starts_here, idx, 0), axis=segment_ids.ndim - 1)
    return idx - starts


def _check_tokens(tokens: jax.Array, rank: int, layout: str) -> None:
    core.check_rank(tokens, rank, "tokens", layout)
    dt = jnp.result_type(tokens)
    if not jnp.issubdtype(dt, jnp.integer):
        raise TypeError(f"tokens must have an integer dtype (int32); got {dt}")


def _embed(params: core.Params, tokens: jax.Array, cfg: LMConfig) -> jax.Array:
    x = core.apply(params["embed"], tokens, cfg.embed_config)
    if cfg.dtype is not None:
        x = x.astype(cfg.dtype)
    if cfg.embed_norm:
        x = core.apply(params["embed_norm"], x, cfg.norm_config("rms")).astype(x.dtype)
    return x


def _logits(params: core.Params, x: jax.Array, cfg: LMConfig) -> jax.Array:
    if cfg.final_norm is not None:
        x = core.apply(params["final_norm"], x, cfg.norm_config(cfg.final_norm))
    if cfg.head is not None:
        logits = core.apply(params["head"], x, cfg.head)
    elif cfg.tie_embeddings:
        logits = embedding.attend(params["embed"], x, cfg.embed_config)
    else:
        logits = core.apply(params["unembed"], x, cfg.unembed_config)
    return logits.astype(jnp.float32)


def _block_fn(bcfg: BlockConfig, remat: bool, **kwargs: Any):
    fn = functools.partial(block_lib.apply, cfg=bcfg, **kwargs)

    def run(p, x, s):
        return fn(p, x, initial_state=s) if s is not None else fn(p, x)

    return jax.checkpoint(run) if remat else run


def _hidden(
    params: core.Params,
    tokens: jax.Array,
    cfg: LMConfig,
    segment_ids: jax.Array | None,
    positions: jax.Array | None,
    initial_state: Any,
    return_state: bool,
) -> tuple[jax.Array, Any]:
    _check_tokens(tokens, 2, "[batch, time]")
    if segment_ids is not None:
        core.check_rank(segment_ids, 2, "segment_ids", "[batch, time]")
        if segment_ids.shape != tokens.shape:
            raise ValueError(
                f"segment_ids must have the shape of tokens {tokens.shape}; got {segment_ids.shape}"
            )
    kwargs: dict[str, Any] = {"segment_ids": segment_ids, "positions": positions}
    if return_state:
        kwargs["return_state"] = True
    x = _embed(params, tokens, cfg)

    if cfg.scan_layers:
        run = _block_fn(cfg.blocks[0], cfg.remat, **kwargs)

        def body(h, xs):
            p, s = xs
            out = run(p, h, s)
            return out if return_state else (out, None)

        x, states = lax.scan(body, x, (params["blocks"], initial_state))
        return x, states

    states = {}
    for i, bcfg in enumerate(cfg.blocks):
        name = str(i)
        s0 = None if initial_state is None else initial_state[name]
        out = _block_fn(bcfg, cfg.remat, **kwargs)(params["blocks"][name], x, s0)
        x, states[name] = out if return_state else (out, None)
    return x, (states if return_state else None)


def apply(
    params: core.Params,
    tokens: jax.Array,
    cfg: LMConfig,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    initial_state: Any = None,
    return_state: bool = False,
) -> jax.Array | tuple[jax.Array, Any]:
    """Logits for every position: ``tokens [b, t] -> [b, t, vocab]`` float32.

    ``segment_ids [b, t]`` marks packed documents (mixers reset at boundaries); ``positions``
    (e.g. :func:`segment_positions`) are passed to the mixers when given, else each mixer uses
    its own default (``0..t-1``, offset by ``initial_state`` when continuing). With
    ``return_state=True`` also returns the decode state after the last token (for :func:`step`).
    """
    x, state = _hidden(params, tokens, cfg, segment_ids, positions, initial_state, return_state)
    logits = _logits(params, x, cfg)
    return (logits, state) if return_state else logits


def loss(
    params: core.Params, batch: Mapping[str, jax.Array], cfg: LMConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy and metrics.

    ``batch`` holds ``tokens [b, t]`` and optionally ``targets``, ``mask``, ``segment_ids``,
    ``positions`` (all ``[b, t]``).

    Shift convention: the logits at position ``i`` predict ``targets[:, i]``. When ``targets`` is
    given it is used as is (the data pipeline has already shifted it: ``targets[:, i] =
    next token after tokens[:, i]``). When it is absent, targets are ``tokens`` shifted left by
    one: position ``i`` predicts ``tokens[:, i + 1]``; the last position, and (with
    ``segment_ids``) every position whose next token starts another segment, get weight 0.
    ``mask`` (1 = count, 0 = ignore) is aligned with the targets / logits positions and
    multiplies those weights.

    Returns ``(loss, {"loss", "accuracy", "num_tokens"})``; the loss is the weighted mean over
    all counted tokens (0 when none are counted).
    """
    tokens = batch["tokens"]
    segment_ids = batch.get("segment_ids")
    logits = apply(params, tokens, cfg, segment_ids=segment_ids, positions=batch.get("positions"))
    if "targets" in batch:
        targets = batch["targets"]
        weights = jnp.ones(targets.shape, jnp.float32)
    else:
        targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
        valid = jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1
        weights = jnp.broadcast_to(valid, tokens.shape).astype(jnp.float32)
        if segment_ids is not None:
            last = jnp.zeros((segment_ids.shape[0], 1), bool)
            same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], last], 1)
            weights = weights * same.astype(jnp.float32)
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must have shape {logits.shape[:2]}; got {targets.shape}")
    if "mask" in batch:
        weights = weights * batch["mask"].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    count = jnp.sum(weights)
    denom = jnp.maximum(count, 1.0)
    mean = jnp.sum(nll * weights) / denom
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {"loss": mean, "accuracy": jnp.sum(correct * weights) / denom, "num_tokens": count}
    return mean, metrics


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def init_state(cfg: LMConfig, batch: int, dtype: Any = jnp.float32) -> Any:
    """Empty decode state: ``{"0": block-0 state, ...}`` (stacked for ``scan_layers``).

    ``dtype`` is the activation dtype (``cfg.dtype`` when set).
    """
    dtype = cfg.dtype if cfg.dtype is not None else dtype
    if cfg.scan_layers:
        one = block_lib.init_state(cfg.blocks[0], batch, dtype)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.num_layers, *a.shape)), one)
    return {str(i): block_lib.init_state(b, batch, dtype) for i, b in enumerate(cfg.blocks)}


def step(
    params: core.Params, state: Any, token_t: jax.Array, cfg: LMConfig
) -> tuple[jax.Array, Any]:
    """One decoding step: ``token_t [b] -> (logits_t [b, vocab] float32, state)``."""
    _check_tokens(token_t, 1, "[batch]")
    x = _embed(params, token_t[:, None], cfg)[:, 0]
    if cfg.scan_layers:
        bcfg = cfg.blocks[0]

        def body(h, xs):
            p, s = xs
            return block_lib.step(p, s, h, bcfg)

        x, state = lax.scan(body, x, (params["blocks"], state))
    else:
        new_state = {}
        for i, bcfg in enumerate(cfg.blocks):
            name = str(i)
            x, new_state[name] = block_lib.step(params["blocks"][name], state[name], x, bcfg)
        state = new_state
    return _logits(params, x, cfg), state


def prefill(params: core.Params, prompt: jax.Array, cfg: LMConfig) -> tuple[jax.Array, Any]:
    """Run a prompt ``[b, t0]``; returns ``(logits of its last position [b, vocab], state)``."""
    x, state = _hidden(params, prompt, cfg, None, None, None, True)
    return _logits(params, x[:, -1], cfg), state


def _sample(key: jax.Array, logits: jax.Array, temperature: float, top_k: int | None):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.float32(temperature)
    if top_k is not None:
        kth = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    params: core.Params,
    prompt: jax.Array,
    cfg: LMConfig,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> jax.Array:
    """Sample ``max_new_tokens`` tokens after ``prompt [b, t0]``; returns them, ``[b, n]`` int32.

    ``temperature=0`` is greedy (argmax; ``key`` unused); otherwise tokens are drawn from
    ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely when given.
    Built on :func:`prefill` and :func:`step` under ``lax.scan``; jit it with
    ``static_argnames=("cfg", "max_new_tokens", "temperature", "top_k")``. Attention mixers
    must have room for ``t0 + max_new_tokens - 1`` positions in their cache.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive; got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k is not None and not 0 < top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={cfg.vocab_size}]; got {top_k}")
    logits, state = prefill(params, prompt, cfg)
    keys = jax.random.split(key, max_new_tokens)
    first = _sample(keys[0], logits, temperature, top_k)

    def body(carry, k):
        tok, st = carry
        logits_t, st = step(params, st, tok, cfg)
        return (_sample(k, logits_t, temperature, top_k), st), tok

    (last, _), toks = lax.scan(body, (first, state), keys[1:])
    return jnp.concatenate([toks.T, last[:, None]], axis=1)


def _example() -> core.Example:
    from jaxlayers import attention, mlp

    d, vocab = 16, 32
    cfg = LMConfig.uniform(
        vocab_size=vocab,
        d_model=d,
        num_layers=2,
        mixer=attention.Config(d_model=d, num_heads=4, num_kv_heads=2, max_decode_len=8),
        mlp=mlp.Config(d_model=d, d_hidden=32, activation="silu", variant="glu"),
        tie_embeddings=False,
    )
    return core.Example(
        config=cfg, input_shape=(2, 8), input_kind="tokens", input_vocab=vocab, rtol_bf16=3e-2
    )


core.register_layer(
    "lm",
    LMConfig,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    example=_example(),
    kind="model",
)

"""A residual block: a sequence mixer and an optional MLP, each wrapped in normalization.

Two placements of the normalization layers:

``placement="pre"`` (Pre-LN)::

    h = x + mixer(norm_1(x))
    y = h + mlp(norm_2(h))

``placement="peri"`` (Peri-LN, from "Peri-LN: Revisiting Layer Normalization in the Transformer
Architecture")::

    h = x + norm_1_out(mixer(norm_1(x)))
    y = h + norm_2_out(mlp(norm_2(h)))

Peri-LN normalizes both the input and the output of every sublayer, but (unlike Post-LN) never the
residual stream itself, which keeps the variance of the stream growing about linearly with depth.
The output norms are separate layers with their own learned scale (initialised to one, as in the
paper); nothing else differs.

The mixer and the MLP are *any* registered layers: the mixer any config whose layer follows the
sequence-mixer contract (``apply(params, x [b, t, d], cfg, *, segment_ids, positions,
initial_state, return_state)``, ``init_state``, ``step``), the MLP any layer mapping
``[..., d] -> [..., d]`` (an MLP / GLU, a Dense-like projection, a lookup memory). ``mlp=None``
gives a mixer-only block (as in Mamba-style stacks).

Shapes: ``x: [b, t, d] -> [b, t, d]``; decoding ``x_t: [b, d] -> [b, d]``.

Dtypes: the residual stream keeps the dtype of ``x``; each sublayer's output is cast to it before
the residual add. ``cfg.dtype`` is the compute dtype of the norms; the mixer and MLP follow their
own configs (``dtype=None`` there means "the dtype of their input", i.e. of the norm's output).

Params::

    {"mixer_norm": ..., "mixer": ..., ["mixer_out_norm": ...],
     "mlp_norm": ...,   "mlp": ...,   ["mlp_out_norm": ...]}     # *_out_norm only for "peri"
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxlayers import core, norms

__all__ = ["BlockConfig", "Config", "param_specs", "init", "apply", "init_state", "step"]

NORMS = ("rms", "layer")
PLACEMENTS = ("pre", "peri")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig(core.LayerConfig):
    """Residual block config.

    Attributes:
      d_model: width ``d`` of the residual stream.
      mixer: config of the sequence mixer (any registered mixer: softmax attention, a linear
        attention family, ...).
      mlp: config of the channel mixer (any registered ``[..., d] -> [..., d]`` layer), or None.
      norm: "rms" (RMSNorm) or "layer" (LayerNorm).
      placement: "pre" (Pre-LN) or "peri" (Peri-LN: normalize sublayer inputs and outputs).
      norm_eps: epsilon of every norm in the block.
    """

    d_model: int
    mixer: Any
    mlp: Any = None
    norm: str = "rms"
    placement: str = "pre"
    norm_eps: float = 1e-6

    def __post_init__(self):
        core.check_choice(self.norm, NORMS, "norm")
        core.check_choice(self.placement, PLACEMENTS, "placement")
        if self.d_model <= 0:
            raise ValueError(f"d_model must be positive; got {self.d_model}")
        # Fail early, at config time, on a sublayer nobody registered.
        core.layer_fns(self.mixer)
        if self.mlp is not None:
            core.layer_fns(self.mlp)

    @property
    def norm_config(self) -> core.LayerConfig:
        cls = norms.RMSNormConfig if self.norm == "rms" else norms.LayerNormConfig
        return cls(
            dim=self.d_model, eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype
        )


Config = BlockConfig


def _norm_names(cfg: BlockConfig) -> list[str]:
    names = ["mixer_norm"]
    if cfg.placement == "peri":
        names.append("mixer_out_norm")
    if cfg.mlp is not None:
        names.append("mlp_norm")
        if cfg.placement == "peri":
            names.append("mlp_out_norm")
    return names


def param_specs(cfg: BlockConfig) -> dict[str, Any]:
    norm_specs = core.param_specs(cfg.norm_config)
    specs: dict[str, Any] = {name: dict(norm_specs) for name in _norm_names(cfg)}
    specs["mixer"] = dict(core.param_specs(cfg.mixer))
    if cfg.mlp is not None:
        specs["mlp"] = dict(core.param_specs(cfg.mlp))
    return specs


def init(key: jax.Array, cfg: BlockConfig) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def _norm(params: core.Params, x: jax.Array, cfg: BlockConfig) -> jax.Array:
    return core.apply(params, x, cfg.norm_config)


def _check_input(x: jax.Array, cfg: BlockConfig, rank: int, layout: str) -> None:
    core.check_floating(x, "x")
    core.check_rank(x, rank, "x", layout)
    core.check_dim(x, -1, cfg.d_model, "x", "d_model")


def _mlp_sublayer(params: core.Params, h: jax.Array, cfg: BlockConfig) -> jax.Array:
    if cfg.mlp is None:
        return h
    u = core.apply(params["mlp"], _norm(params["mlp_norm"], h, cfg), cfg.mlp)
    if cfg.placement == "peri":
        u = _norm(params["mlp_out_norm"], u, cfg)
    return h + u.astype(h.dtype)


def _mixer_out(params: core.Params, u: jax.Array, x: jax.Array, cfg: BlockConfig) -> jax.Array:
    if cfg.placement == "peri":
        u = _norm(params["mixer_out_norm"], u, cfg)
    return x + u.astype(x.dtype)


def apply(
    params: core.Params,
    x: jax.Array,
    cfg: BlockConfig,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    initial_state: Any = None,
    return_state: bool = False,
) -> jax.Array | tuple[jax.Array, Any]:
    """Run the block on ``x: [b, t, d]``.

    ``segment_ids``, ``positions``, ``initial_state`` and ``return_state`` are passed to the mixer
    (only when given, so mixers that ignore positions need not accept them). With
    ``return_state=True`` returns ``(y, mixer_state)``.
    """
    _check_input(x, cfg, 3, "[batch, time, d_model]")
    kwargs: dict[str, Any] = {}
    if segment_ids is not None:
        kwargs["segment_ids"] = segment_ids
    if positions is not None:
        kwargs["positions"] = positions
    if initial_state is not None:
        kwargs["initial_state"] = initial_state
    if return_state:
        kwargs["return_state"] = True
    out = core.apply(params["mixer"], _norm(params["mixer_norm"], x, cfg), cfg.mixer, **kwargs)
    u, state = out if return_state else (out, None)
    h = _mixer_out(params, u, x, cfg)
    y = _mlp_sublayer(params, h, cfg)
    return (y, state) if return_state else y


def init_state(cfg: BlockConfig, batch: int, dtype: Any = jnp.float32) -> Any:
    """The mixer's decode state (the block adds none of its own)."""
    return core.init_state(cfg.mixer, batch, dtype)


def step(params: core.Params, state: Any, x_t: jax.Array, cfg: BlockConfig) -> tuple:
    """One decoding step: ``x_t: [b, d] -> (y_t [b, d], state)``."""
    _check_input(x_t, cfg, 2, "[batch, d_model]")
    u, state = core.step(params["mixer"], state, _norm(params["mixer_norm"], x_t, cfg), cfg.mixer)
    h = _mixer_out(params, u, x_t, cfg)
    return _mlp_sublayer(params, h, cfg), state


def _example() -> core.Example:
    from jaxlayers import attention, mlp

    d = 16
    cfg = BlockConfig(
        d_model=d,
        mixer=attention.Config(d_model=d, num_heads=4, num_kv_heads=2, max_decode_len=8),
        mlp=mlp.Config(d_model=d, d_hidden=32, activation="silu", variant="glu"),
        norm="rms",
        placement="peri",
    )
    return core.Example(config=cfg, input_shape=(2, 8, d), rtol_bf16=2e-2)


core.register_layer(
    "block",
    BlockConfig,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    example=_example(),
    kind="block",
)

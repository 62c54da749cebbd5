"""Training configuration: frozen dataclasses, presets, and the model they describe.

A run is one :class:`TrainConfig`. ``python -m train --preset NAME [overrides]`` starts from a
preset (:func:`get_preset`) and applies command-line overrides with tyro, e.g.
``--steps 500 --optim.learning-rate 3e-3 --data.num-kv-pairs 32 --mesh.fsdp 2`` (or
``--mesh.sequence 2`` to split every sequence over 2 devices).

Presets:
  ``tiny``              MQAR, T=32, 4 pairs, vocab 64, 2-layer softmax attention (d_model 32):
                        about a minute on 2 CPU cores (the README's default main command).
  ``mqar-<mixer>``      MQAR at T=128, 16 key-value pairs, vocab 8192, 2 layers, d_model 128,
                        for any registered sequence mixer (``attention``, and every linear mixer
                        by its registry name, e.g. ``mqar-gated_deltanet``).
  ``text-<mixer>``      byte-level LM on the embedded corpus (or ``--data.text-files``),
                        T=256, batch 16, 4 layers, d_model 128.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, Literal

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "MeshConfig",
    "CheckpointConfig",
    "DistributedConfig",
    "TrainConfig",
    "PRESETS",
    "get_preset",
    "preset_names",
    "build_model_config",
    "registered_mixers",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The decoder LM (``jaxlayers.models.lm``).

    ``mixer`` is a registered sequence-mixer name. ``pattern`` builds a hybrid stack: each letter
    is a layer, ``A`` = softmax attention and any other letter = ``mixer`` (``"LLLA"``: 3 linear
    : 1 softmax), repeated up to ``num_layers``; empty = every layer uses ``mixer``.
    ``mixer_options`` is a JSON object of extra fields for the mixer config
    (e.g. ``'{"num_kv_heads": 2}'``). ``mlp_hidden=0`` means no MLP (mixer-only blocks).
    """

    mixer: str = "attention"
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_hidden: int = 256
    mlp_activation: str = "silu"
    mlp_variant: Literal["mlp", "glu"] = "glu"
    pattern: str = ""
    norm: Literal["rms", "layer"] = "rms"
    placement: Literal["pre", "peri"] = "pre"
    tie_embeddings: bool = True
    embed_norm: bool = False
    scan_layers: bool = False
    remat: bool = False
    mixer_options: str = "{}"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Task and data. ``task="mqar"`` uses the MQAR knobs; ``task="text"`` the text ones.

    ``num_train_examples=0`` draws fresh MQAR examples forever (no example is seen twice);
    a positive value cycles over that many (shuffled every epoch), as in Zoology.
    ``text_files`` empty = the embedded corpus ``train/data/corpus.txt``.
    """

    task: Literal["mqar", "text"] = "mqar"
    seq_len: int = 128
    seed: int = 0
    # MQAR
    vocab_size: int = 8192
    num_kv_pairs: int = 16
    power_a: float = 0.01
    num_train_examples: int = 0
    num_eval_examples: int = 1024
    # text
    text_files: tuple[str, ...] = ()
    val_fraction: float = 0.05
    # grain read threads per process
    num_threads: int = 2


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup + cosine decay (to ``min_lr_ratio·lr``) and global-norm clipping.

    Weight decay applies to matrices only (params with rank >= 2), not to norms and biases.
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes for the axes (data, fsdp, tensor, sequence); ``-1`` = all remaining
    devices.

    Batch rows are split over data x fsdp; params over fsdp and tensor (see ``train.sharding``).
    ``sequence > 1`` also splits the tokens of every row along time over that many devices
    (sequence / context parallelism, ``jaxlayers.models.sequence_parallel``); every mixer of the
    model must support it.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """orbax checkpoints under ``<run_dir>/checkpoints``: every ``every`` steps and at the end.

    ``restore_step`` picks the step ``--resume`` restores (default: the latest).
    ``every=0`` saves only at the end.
    """

    every: int = 500
    keep: int = 3
    async_save: bool = True
    restore_step: int | None = None


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process launch (``jax.distributed.initialize``).

    Unset fields fall back to the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; with none of them set the run is a single
    process. On managed clusters (TPU pods, SLURM) ``auto=True`` lets JAX detect everything.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    ``batch_size`` is the *global* batch (all processes, all accumulation micro-steps);
    ``grad_accum`` splits it into that many micro-batches whose gradients are summed.
    ``compute_dtype`` is the activation/matmul dtype; params and optimizer state stay float32.
    ``run_dir`` defaults to ``runs/<preset>``; a run dir that already holds checkpoints needs
    ``resume`` (continue them) or ``overwrite`` (delete them and start over). ``stop_after``
    ends this invocation after that many steps (the schedule still spans ``steps``; continue
    with ``--resume``). ``stop_at_accuracy`` ends the run (with a checkpoint) at the first
    evaluation whose accuracy reaches it, e.g. ``0.99`` for MQAR. ``xla_options`` is a JSON
    object of XLA compiler options for every compiled function, e.g.
    ``'{"xla_backend_optimization_level": 0}'`` (CPU programs compile about 3x faster and run
    somewhat slower; the tests use it).
    """

    preset: str = "custom"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    seed: int = 0
    eval_every: int = 250
    log_every: int = 10
    run_dir: str = ""
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    stop_at_accuracy: float | None = None
    progress: bool = True
    xla_options: str = "{}"

    def __post_init__(self):
        positive = {"steps": self.steps, "batch_size": self.batch_size}
        positive |= {"grad_accum": self.grad_accum, "log_every": self.log_every}
        positive |= {"data.seq_len": self.data.seq_len, "model.d_model": self.model.d_model}
        positive |= {"model.num_layers": self.model.num_layers}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive; got {value}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}"
            )
        if self.eval_every < 0 or self.checkpoint.every < 0:
            raise ValueError("eval_every and checkpoint.every must be >= 0 (0 = only at the end)")
        if self.checkpoint.keep <= 0:
            raise ValueError(f"checkpoint.keep must be positive; got {self.checkpoint.keep}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other; pass only one")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ValueError(f"stop_after must be positive; got {self.stop_after}")
        if self.stop_at_accuracy is not None and not 0.0 <= self.stop_at_accuracy <= 1.0:
            raise ValueError(f"stop_at_accuracy must be in [0, 1]; got {self.stop_at_accuracy}")
        try:
            xla = json.loads(self.xla_options)
        except json.JSONDecodeError as e:
            raise ValueError(f"xla_options must be a JSON object; got {self.xla_options!r} ({e})")
        if not isinstance(xla, dict):
            raise ValueError(f"xla_options must be a JSON object; got {xla!r}")
        try:
            options = json.loads(self.model.mixer_options)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"model.mixer_options must be a JSON object; got {self.model.mixer_options!r} ({e})"
            ) from None
        if not isinstance(options, dict):
            raise ValueError(f"model.mixer_options must be a JSON object; got {options!r}")

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.preset}"

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _tiny() -> TrainConfig:
    # Small enough that 2 CPU cores finish in about a minute, hard enough to need recall: the
    # loss plateaus near ln(4) (the model knows a value is one of the 4 in context) until the
    # induction circuit forms, around step 200-250, then accuracy jumps to ~100%.
    return TrainConfig(
        preset="tiny",
        model=ModelConfig(d_model=32, num_layers=2, num_heads=2, mlp_hidden=64, embed_norm=True),
        data=DataConfig(
            task="mqar", seq_len=32, vocab_size=64, num_kv_pairs=4, num_eval_examples=512
        ),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=30, weight_decay=0.0, min_lr_ratio=1.0),
        steps=400,
        batch_size=64,
        eval_every=100,
        checkpoint=CheckpointConfig(every=200, keep=2),
    )


def _mqar(mixer: str) -> TrainConfig:
    # No weight decay: with vocab 8192 each key/value row of the (tied) embedding is seen rarely,
    # and decaying it every step slows recall. d_model 128: at 64 the big-vocab task learns far
    # more slowly (measured on a T=32 proxy). Mixer-only blocks (no MLP): recall needs only the
    # sequence mixers, and dropping the MLP cuts the step time ~25% on CPU. lr 5e-3 (2e-3 was
    # slower, 1e-2 stalled for attention). Measured results: benchmarks/RESULTS.md "Training".
    # Softmax attention: one 128-wide head with q/k/v/o biases. With 4 heads and no biases it sat
    # on the 1/16-accuracy plateau (copies *a* value, not the right one) for 1300+ steps; this
    # setting left it at step ~1000. Linear mixers keep 4 heads (Gated DeltaNet: 99.6% at 1000).
    heads, options = (1, '{"use_bias": true}') if mixer == "attention" else (4, "{}")
    return TrainConfig(
        preset=f"mqar-{mixer}",
        model=ModelConfig(
            mixer=mixer,
            d_model=128,
            num_layers=2,
            num_heads=heads,
            mlp_hidden=0,
            embed_norm=True,
            mixer_options=options,
        ),
        data=DataConfig(task="mqar", seq_len=128, vocab_size=8192, num_kv_pairs=16),
        optim=OptimConfig(learning_rate=5e-3, warmup_steps=100, weight_decay=0.0),
        steps=3000,
        batch_size=64,
        eval_every=250,
        stop_at_accuracy=0.99,
        checkpoint=CheckpointConfig(every=250, keep=2),
    )


def _text(mixer: str) -> TrainConfig:
    # The embedded corpus is ~11 KB: this preset demonstrates the pipeline (and overfits it);
    # pass --data.text-files for real language modelling.
    return TrainConfig(
        preset=f"text-{mixer}",
        model=ModelConfig(
            mixer=mixer, d_model=128, num_layers=4, num_heads=4, mlp_hidden=384, embed_norm=True
        ),
        data=DataConfig(task="text", seq_len=256, val_fraction=0.1),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=50, weight_decay=0.1),
        steps=500,
        batch_size=16,
        eval_every=100,
        checkpoint=CheckpointConfig(every=250, keep=2),
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {"tiny": _tiny}
_FAMILIES: dict[str, Callable[[str], TrainConfig]] = {"mqar": _mqar, "text": _text}


def _is_mixer(fns: Any) -> bool:
    return fns.kind == "mixer" or (fns.is_mixer and fns.kind not in ("block", "model"))


def registered_mixers() -> list[str]:
    """Names of the registered sequence mixers (imports every jaxlayers layer module)."""
    from jaxlayers import core, registry

    registry.import_all()
    return sorted(name for name, fns in core.registered_layers().items() if _is_mixer(fns))


def _known_mixer(name: str) -> bool:
    from jaxlayers import attention, core  # noqa: F401  (attention registers itself)

    fns = core.registered_layers().get(name)
    if fns is None:
        # Only now import every layer module (a mixer may live in a module not yet imported).
        fns = core.registered_layers()[name] if name in registered_mixers() else None
    return fns is not None and _is_mixer(fns)


def preset_names() -> list[str]:
    names = list(PRESETS)
    for family in _FAMILIES:
        names += [f"{family}-{m}" for m in registered_mixers()]
    return names


def get_preset(name: str) -> TrainConfig:
    """The :class:`TrainConfig` of preset ``name`` (raises ``ValueError`` listing the presets)."""
    if name in PRESETS:
        return PRESETS[name]()
    family, _, mixer = name.partition("-")
    if family in _FAMILIES and mixer and _known_mixer(mixer):
        return _FAMILIES[family](mixer)
    raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(preset_names())}")


# --------------------------------------------------------------------------------------------
# The LM config a TrainConfig describes
# --------------------------------------------------------------------------------------------


def _mixer_config(name: str, cfg: TrainConfig, dtype: Any, with_options: bool = True) -> Any:
    from jaxlayers import core

    if not _known_mixer(name):
        raise ValueError(
            f"model.mixer={name!r} is not a registered sequence mixer; "
            f"registered: {registered_mixers()}"
        )
    cls = core.layer_fns(name).config
    fields = {f.name for f in dataclasses.fields(cls)}
    m = cfg.model
    wanted = {"d_model": m.d_model, "num_heads": m.num_heads, "dtype": dtype}
    if "max_decode_len" in fields:
        wanted["max_decode_len"] = cfg.data.seq_len
    kwargs = {k: v for k, v in wanted.items() if k in fields}
    options = json.loads(m.mixer_options) if with_options else {}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"model.mixer_options has fields {unknown} that {cls.__qualname__} of mixer {name!r} "
            f"does not have; its fields: {sorted(fields)}"
        )
    kwargs |= options
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(
            f"cannot build the config of mixer {name!r} ({cls.__qualname__}) from {kwargs}: {e}; "
            f"give the missing fields with --model.mixer-options '{{\"field\": value}}'"
        ) from None


def build_model_config(cfg: TrainConfig, vocab_size: int) -> Any:
    """The ``jaxlayers.models.lm.LMConfig`` of a run (compute dtype from ``compute_dtype``)."""
    import jax.numpy as jnp

    from jaxlayers import mlp
    from jaxlayers.models import lm

    dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
    m = cfg.model
    mlp_cfg = None
    if m.mlp_hidden > 0:
        mlp_cfg = mlp.Config(
            d_model=m.d_model,
            d_hidden=m.mlp_hidden,
            activation=m.mlp_activation,
            variant=m.mlp_variant,
            dtype=dtype,
        )
    mixers = {"X": _mixer_config(m.mixer, cfg, dtype)}
    pattern = m.pattern or "X"
    if m.pattern:
        mixers = {c: mixers["X"] for c in set(pattern) if c != "A"}
        if "A" in pattern:
            mixers["A"] = _mixer_config("attention", cfg, dtype, with_options=False)
    return lm.LMConfig.hybrid(
        vocab_size=vocab_size,
        d_model=m.d_model,
        pattern=pattern,
        mixers=mixers,
        mlp=mlp_cfg,
        num_layers=m.num_layers,
        norm=m.norm,
        placement=m.placement,
        tie_embeddings=m.tie_embeddings,
        embed_norm=m.embed_norm,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=dtype,
    )

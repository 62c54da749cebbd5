"""Small configs shared by the train tests."""

from __future__ import annotations

import dataclasses

from train.config import (
    CheckpointConfig,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


def micro_config(run_dir, **changes) -> TrainConfig:
    """A 2-layer d_model=16 attention LM on MQAR T=16: compiles and runs in seconds."""
    cfg = TrainConfig(
        preset="micro",
        model=ModelConfig(d_model=16, num_layers=2, num_heads=2, mlp_hidden=32),
        data=DataConfig(
            task="mqar",
            seq_len=16,
            vocab_size=32,
            num_kv_pairs=2,
            num_eval_examples=16,
            num_threads=1,
        ),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        checkpoint=CheckpointConfig(every=3, keep=3, async_save=True),
        steps=6,
        batch_size=8,
        compute_dtype="float32",
        eval_every=0,
        log_every=1,
        run_dir=str(run_dir),
        progress=False,
        # ~3x faster CPU compiles; the programs are tiny, so their run time does not matter.
        xla_options='{"xla_backend_optimization_level": 0}',
    )
    return dataclasses.replace(cfg, **changes)

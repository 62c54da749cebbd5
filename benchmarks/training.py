"""Training suite: tokens/s of the decoder LM per sequence mixer, through the training stack.

For every registered sequence mixer (:func:`train.config.registered_mixers`) it builds the run
the way ``python -m train`` does: a :class:`train.config.TrainConfig` (``ModelConfig(mixer=...)``,
text task, byte vocabulary), the model config from :func:`train.config.build_model_config`,
the optimizer from :func:`train.step.make_optimizer` and the step from
:func:`train.step.make_train_step` with the LM loss. The step is compiled ahead of time
(``compile_s``, and ``MiB`` = argument + output + temporary bytes from ``memory_analysis``),
then timed with :func:`benchmarks.harness.time_fn` on one fixed random batch (the same state
every call: no donation, so each timed call does the same work; the loss of the first step is
recorded to show it is finite).

``tokens_per_s = batch * T / median step time``; ``ratio`` = tokens/s over softmax attention's.
Default model: d_model 128, 2 layers, 4 heads, GLU MLP 256, T = 512, batch 8. Compute dtype
(``TrainConfig.compute_dtype``): float32 on CPU (bf16 matmuls are slow there), bfloat16 on
GPU/TPU. Nothing here is sharded: one device. Non-causal mixers (``Example.decode`` False: 2-D or
bidirectional layers) are listed as skipped, since a decoder LM cannot use them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import time_fn
from benchmarks.layers import MIB, memory_bytes

__all__ = ["training"]


def _row_for(
    mixer: str,
    *,
    d_model: int,
    num_layers: int,
    num_heads: int,
    mlp_hidden: int,
    T: int,
    batch: int,
    steps: int,
    compute_dtype: str,
    compiler_options: dict | None,
) -> dict[str, Any]:
    from jaxlayers import core
    from jaxlayers.models import lm
    from train import config as tc
    from train import data as data_lib
    from train import losses
    from train import step as step_lib

    cfg = tc.TrainConfig(
        preset=f"bench-{mixer}",
        model=tc.ModelConfig(
            mixer=mixer,
            d_model=d_model,
            num_layers=num_layers,
            num_heads=num_heads,
            mlp_hidden=mlp_hidden,
        ),
        data=tc.DataConfig(task="text", seq_len=T),
        batch_size=batch,
        compute_dtype=compute_dtype,
        steps=1000,
    )
    vocab = data_lib.BYTE_VOCAB
    model_cfg = tc.build_model_config(cfg, vocab)
    tx, schedule = step_lib.make_optimizer(cfg)
    step_fn = step_lib.make_train_step(model_cfg, tx, schedule, 1, losses.lm_loss)

    params = lm.init(jax.random.key(0), model_cfg)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(1)),
    }
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (batch, T + 1), dtype=np.int32)
    batch_arrays = {
        "tokens": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "mask": jnp.ones((batch, T), jnp.float32),
    }
    t0 = time.perf_counter()
    compiled = jax.jit(step_fn).lower(state, batch_arrays).compile(compiler_options)
    compile_s = time.perf_counter() - t0
    mem = memory_bytes(compiled)
    _, metrics = compiled(state, batch_arrays)
    loss = float(metrics["loss"])
    t = time_fn(compiled, state, batch_arrays, warmup=0, repeats=steps)
    return {
        "suite": "training",
        "mixer": mixer,
        "params": core.count_params(params),
        "shape": f"{batch}x{T} d={d_model} L={num_layers}",
        "dtype": compute_dtype,
        "step_ms": t.median_ms,
        "spread_ms": t.max_ms - t.min_ms,
        "tokens_per_s": batch * T / (t.median_ms * 1e-3),
        "compile_s": compile_s,
        "MiB": None if mem is None else mem / MIB,
        "first_loss": loss,
    }


def training(
    *,
    d_model: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    mlp_hidden: int = 256,
    T: int = 512,
    batch: int = 8,
    steps: int = 5,
    compute_dtype: str | None = None,
    names: Sequence[str] | None = None,
    compiler_options: dict | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per registered mixer (restricted to ``names`` plus "attention" if given)."""
    from train.config import registered_mixers

    if compute_dtype is None:
        compute_dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    from jaxlayers import core

    mixers = registered_mixers()
    if names:
        mixers = [m for m in mixers if m in names or m == "attention"]
    rows = []
    for mixer in mixers:
        example = core.layer_fns(mixer).example
        if example is not None and not example.decode:
            rows.append(
                {
                    "suite": "training",
                    "mixer": mixer,
                    "note": "skipped: non-causal (Example.decode False)",
                }
            )
            log(str(rows[-1]))
            continue
        try:
            row = _row_for(
                mixer,
                d_model=d_model,
                num_layers=num_layers,
                num_heads=num_heads,
                mlp_hidden=mlp_hidden,
                T=T,
                batch=batch,
                steps=steps,
                compute_dtype=compute_dtype,
                compiler_options=compiler_options,
            )
        except Exception as e:  # noqa: BLE001 - report the mixer, keep going
            row = {
                "suite": "training",
                "mixer": mixer,
                "note": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
            }
        rows.append(row)
        log(str(row))
    base = next((r.get("tokens_per_s") for r in rows if r["mixer"] == "attention"), None)
    for r in rows:
        v = r.get("tokens_per_s")
        r["ratio"] = (v / base) if (v and base) else None
    return rows

"""The training loop: sharded, jitted, compiled ahead of time, checkpointed, resumable.

One optimizer step on a global batch ``B`` (``[B, T]`` tokens) with gradient accumulation
``A``::

    micro-batches  b_a = rows {a, a + A, a + 2A, ...} of the batch          a = 0 .. A-1
    g      = Σ_a ∇_θ (n_a · L(θ; b_a)) / Σ_a n_a       n_a = counted target tokens of b_a
    g      = g · min(1, clip / ‖g‖₂)                    (global-norm clipping)
    θ      = AdamW(θ, g; lr_t, β₁, β₂, ε, wd)          (weight decay on matrices only)
    lr_t   = linear warmup to lr over ``warmup_steps``, then cosine decay to min_lr_ratio·lr

so the update equals the one of a single batch of ``B`` rows whatever ``A`` is (micro-batches
are strided, so every device keeps an equal share of each). Params and the optimizer state are
float32 ("master" weights); the model computes in ``compute_dtype`` (bf16 by default) through the
layer configs' ``dtype``, and its logits and loss are float32.

The step is ``jax.jit`` with explicit in/out shardings (params per ``train.sharding`` rules,
batch rows over (data, fsdp), metrics replicated), donates the state, and is compiled ahead of
time once (``.lower(...).compile()``), printing ``memory_analysis()`` (per device; repeated with
the step time in the final summary).

With ``mesh.sequence > 1`` the loss runs under ``jaxlayers.models.sequence_parallel.make_loss``:
inside one ``shard_map`` every row's tokens are split over the ``sequence`` mesh axis (batch
rows over data x fsdp). The batch arrays enter the step sharded by rows only (replicated over
``sequence``; they are small int arrays) and each device slices its block of tokens, so the
data pipeline is unchanged; the activations are what is split.

A non-finite loss or gradient norm stops the run with :class:`NonFiniteLossError`. Metrics are
checked before every checkpoint, so a checkpoint never holds a state reached through a
non-finite step; the last good one is named in the message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import distributed as dist_lib
from train import losses as losses_lib
from train import metrics as metrics_lib
from train import sharding as shard_lib
from train import step as step_lib
from train.config import TrainConfig, build_model_config

__all__ = ["fit", "FitResult", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN or Inf."""


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` did. ``losses[i]`` is the train loss of step ``first_step + i + 1``."""

    config: TrainConfig
    first_step: int
    final_step: int
    losses: list[float]
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    run_dir: Path
    checkpoint_dir: Path
    metrics_path: Path
    wall_time_s: float
    compile_time_s: float
    num_params: int
    summary: str
    state: Any = None


@dataclasses.dataclass
class _Data:
    train: data_lib.ProcessBatches
    eval: list[dict[str, np.ndarray]]
    vocab_size: int
    description: str
    eval_kind: str  # "mqar" or "text"


def _build_data(cfg: TrainConfig, rows: tuple[int, int], eval_batch: int, eval_rows) -> _Data:
    d = cfg.data
    if d.task == "mqar":
        spec = data_lib.MQARSpec(
            seq_len=d.seq_len,
            vocab_size=d.vocab_size,
            num_kv_pairs=d.num_kv_pairs,
            power_a=d.power_a,
            seed=d.seed,
        )
        if d.num_train_examples > 0:
            train_ds = data_lib.mqar_dataset(spec, d.num_train_examples)
            train_ds = train_ds.shuffle(seed=cfg.seed).repeat()
            size = f"{d.num_train_examples} examples"
        else:
            train_ds = data_lib.mqar_dataset(spec, None)
            size = "fresh examples every step"
        eval_ds = data_lib.mqar_dataset(spec, d.num_eval_examples, split=data_lib._EVAL)
        desc = (
            f"MQAR: seq_len {d.seq_len}, {d.num_kv_pairs} key-value pairs, vocab {d.vocab_size}, "
            f"power_a {d.power_a}; train: {size}; eval: {d.num_eval_examples} held-out examples"
        )
        vocab = d.vocab_size
    else:
        train_ds, eval_ds, info = data_lib.text_datasets(
            d.text_files, d.seq_len, d.val_fraction, cfg.seed
        )
        train_ds = train_ds.shuffle(seed=cfg.seed).repeat()
        source = ", ".join(d.text_files) if d.text_files else "embedded corpus (CC0)"
        desc = (
            f"byte-level text from {source}: {info['documents']} documents, "
            f"{info['train_bytes']} train / {info['val_bytes']} val bytes, rows of {d.seq_len}"
        )
        vocab = data_lib.BYTE_VOCAB
    train = data_lib.ProcessBatches(train_ds, cfg.batch_size, rows, d.num_threads)
    evals = data_lib.eval_batches(eval_ds, eval_batch, eval_rows)
    return _Data(train, evals, vocab, desc, d.task)


def _memory_lines(compiled) -> list[str]:
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - some backends do not implement it
        return [f"memory_analysis unavailable: {e}"]
    if m is None:
        return ["memory_analysis unavailable on this backend"]
    mb = lambda b: f"{b / 2**20:.2f} MiB"
    fields = [
        ("arguments", "argument_size_in_bytes"),
        ("outputs", "output_size_in_bytes"),
        ("aliased (donated)", "alias_size_in_bytes"),
        ("temporaries", "temp_size_in_bytes"),
        ("generated code", "generated_code_size_in_bytes"),
    ]
    parts = [f"{label} {mb(getattr(m, attr))}" for label, attr in fields if hasattr(m, attr)]
    return ["compiled step memory per device: " + ", ".join(parts)]


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------


def _config_sections(cfg: TrainConfig) -> dict[str, Any]:
    d = json.loads(json.dumps(cfg.to_dict()))
    return {k: d[k] for k in ("model", "data", "seed", "batch_size", "steps", "optim")}


# Fields that may change between a checkpoint and its resumption (they change neither the params'
# shapes nor the training data stream).
_RESUME_FREE = {"model": ("remat",), "data": ("num_threads", "num_eval_examples")}


def _resume_view(section: str, values: Any) -> Any:
    if not isinstance(values, dict):
        return values
    return {k: v for k, v in values.items() if k not in _RESUME_FREE.get(section, ())}


def fit(
    cfg: TrainConfig,
    *,
    devices: list | None = None,
    loss_fn: Callable | None = None,
    keep_state: bool = False,
    print_fn: Callable[[str], None] | None = None,
) -> FitResult:
    """Train (or resume) the run described by ``cfg``; returns a :class:`FitResult`.

    ``devices`` restricts the mesh (default: every device of every process). ``loss_fn``
    replaces the task's loss (``train.losses``: ``query_loss`` for MQAR, ``lm_loss`` for
    text; same signature as ``jaxlayers.models.lm.loss``).
    ``keep_state`` returns the final train state in the result.
    """
    t_start = time.time()
    xla_options = json.loads(cfg.xla_options) or None
    dist_lib.initialize_distributed(cfg.distributed)
    if loss_fn is None:
        loss_fn = losses_lib.query_loss if cfg.data.task == "mqar" else losses_lib.lm_loss
    lead = jax.process_index() == 0
    say = print_fn or (lambda s: print(s, flush=True))
    log = (lambda s: say(s)) if lead else (lambda s: None)

    run_dir = Path(cfg.resolved_run_dir).absolute()
    ckpt_dir = run_dir / "checkpoints"
    old = checkpointer_steps(ckpt_dir)
    if old and not cfg.resume:
        if not cfg.overwrite:
            raise FileExistsError(
                f"run dir {run_dir} already holds checkpoints (steps {old}); pass --resume to "
                f"continue them, --overwrite to delete them and start over, or another --run-dir"
            )
        if lead:
            log(f"--overwrite: removing the previous checkpoints in {ckpt_dir}")
            shutil.rmtree(ckpt_dir)
    dist_lib.sync("fresh-start")

    # ---- mesh, data, model ------------------------------------------------------------------
    mesh = shard_lib.make_mesh(
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices, sequence=cfg.mesh.sequence
    )
    seq_shards = shard_lib.sequence_shards(mesh)
    row_split = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // cfg.grad_accum
    if micro % row_split:
        raise ValueError(
            f"batch_size / grad_accum = {micro} must be divisible by mesh data*fsdp = {row_split} "
            f"(each micro-batch is split over those devices)"
        )
    batch_sh = shard_lib.batch_sharding(mesh)
    rows = dist_lib.local_rows(batch_sh, cfg.batch_size)
    data = _build_data(cfg, rows, cfg.batch_size, rows)
    model_cfg = build_model_config(cfg, data.vocab_size)

    from jaxlayers import core
    from jaxlayers.models import lm

    if seq_shards > 1:
        from jaxlayers.models import sequence_parallel as sp_lib

        sp_lib.check_supported(model_cfg)
        loss_fn = sp_lib.make_loss(
            mesh,
            loss_fn=loss_fn,
            sequence_axis=shard_lib.SEQUENCE_AXIS,
            batch_axes=shard_lib.BATCH_AXES,
        )

    specs = lm.param_specs(model_cfg)
    logical = core.logical_axes(specs)
    abstract_params = core.abstract_params(specs, model_cfg.param_dtype)
    param_sh = shard_lib.param_shardings(logical, abstract_params, mesh)
    unmapped = shard_lib.unmapped_axes(logical)
    num_params = core.count_params(abstract_params)

    tx, schedule = step_lib.make_optimizer(cfg)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    repl = shard_lib.replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: repl
    )
    state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh, "rng": repl}

    def init_state(seed):
        key = jax.random.key(seed)
        params = lm.init(jax.random.fold_in(key, 0), model_cfg)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
        }

    abstract_state = jax.eval_shape(init_state, cfg.seed)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh
    )

    # ---- checkpoint / resume ---------------------------------------------------------------
    with contextlib.ExitStack() as cleanup:
        checkpointer = ckpt_lib.Checkpointer(
            ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        cleanup.callback(checkpointer.close)  # waits for the last async save, even on errors
        restored = None
        if cfg.resume:
            if checkpointer.steps():
                step_to_restore, meta = checkpointer.read_meta(cfg.checkpoint.restore_step)
                saved, now = meta.get("config", {}), _config_sections(cfg)
                # These decide the params' shapes and the data stream; a change would make the
                # restored arrays or the iterator position mean something else.
                diff = sorted(
                    k
                    for k in ("model", "data", "batch_size", "seed")
                    if _resume_view(k, saved.get(k)) != _resume_view(k, now[k])
                )
                if diff:
                    raise ckpt_lib.CheckpointError(
                        f"cannot resume: the {' and '.join(diff)} config differs from the "
                        f"checkpoint's ({ckpt_dir}, step {step_to_restore}); saved {diff[0]}: "
                        f"{saved.get(diff[0])}"
                    )
                restored = checkpointer.restore(abstract_state, step_to_restore)
            else:
                log(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
        if restored is not None:
            state, data_state, meta = restored
            data.train.set_state(data_state)
            first_step = int(meta["step"])
            newer = [s for s in checkpointer.steps() if s > first_step]
            if newer:
                log(f"removing checkpoints {newer}, newer than the resumed step {first_step}")
                for s in newer:
                    checkpointer.delete(s)  # collective: every process calls it
            log(f"resumed from step {first_step} of {ckpt_dir}")
        else:
            state = jax.jit(
                init_state,
                static_argnums=0,
                out_shardings=state_sh,
                compiler_options=xla_options,
            )(cfg.seed)
            first_step = 0
        last_saved = first_step if restored is not None else None

        # ---- compile ----------------------------------------------------------------------------
        step_fn = step_lib.make_train_step(model_cfg, tx, schedule, cfg.grad_accum, loss_fn)
        metric_sh = {k: repl for k in ("loss", "accuracy", "grad_norm", "lr", "num_tokens")}
        t, T = cfg.batch_size, cfg.data.seq_len
        abstract_batch = {
            "tokens": jax.ShapeDtypeStruct((t, T), jnp.int32, sharding=batch_sh),
            "targets": jax.ShapeDtypeStruct((t, T), jnp.int32, sharding=batch_sh),
            "mask": jax.ShapeDtypeStruct((t, T), jnp.float32, sharding=batch_sh),
        }
        if cfg.data.task == "text":
            abstract_batch["segment_ids"] = jax.ShapeDtypeStruct(
                (t, T), jnp.int32, sharding=batch_sh
            )
        else:
            abstract_batch["query_pos"] = jax.ShapeDtypeStruct(
                (t, cfg.data.num_kv_pairs), jnp.int32, sharding=batch_sh
            )
        batch_shardings = {k: batch_sh for k in abstract_batch}
        t0 = time.time()
        jitted = jax.jit(
            step_fn,
            in_shardings=(state_sh, batch_shardings),
            out_shardings=(state_sh, metric_sh),
            donate_argnums=(0,),
        )
        # Traced under the mesh so layers that need it (row-sharded memory tables:
        # ``table_axis`` in jaxlayers.lookup) can read it with ``jax.sharding.get_abstract_mesh``.
        with jax.set_mesh(mesh):
            compiled = jitted.lower(abstract_state, abstract_batch).compile(xla_options)
            eval_compiled = (
                jax.jit(
                    step_lib.make_eval_step(model_cfg, loss_fn),
                    in_shardings=(param_sh, batch_shardings),
                    out_shardings={k: repl for k in ("loss_sum", "correct", "count")},
                )
                .lower(abstract_state["params"], abstract_batch)
                .compile(xla_options)
            )
        compile_s = time.time() - t0

        # ---- describe --------------------------------------------------------------------------
        end_step = (
            cfg.steps if cfg.stop_after is None else min(cfg.steps, first_step + cfg.stop_after)
        )
        mixers = sorted({core.layer_fns(b.mixer).name for b in model_cfg.blocks})
        m = cfg.model
        mlp_desc = f"{m.mlp_variant} {m.mlp_hidden}" if m.mlp_hidden else "none"
        model_desc = (
            f"decoder LM: {model_cfg.num_layers} layers ({m.pattern or m.mixer}; "
            f"mixers {', '.join(mixers)}), d_model {m.d_model}, {m.num_heads} heads, "
            f"MLP {mlp_desc}, vocab {data.vocab_size}, "
            f"{num_params / 1e6:.3f}M params"
        )
        dev = mesh.devices.flat[0]
        log(f"== train {cfg.preset}: {model_desc}")
        log(f"   data: {data.description}")
        log(
            f"   mesh: data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} "
            f"tensor={mesh.shape['tensor']} sequence={seq_shards} over {mesh.devices.size} "
            f"{dev.platform} devices, "
            f"{jax.process_count()} process(es); batch {cfg.batch_size} x {T} tokens"
            f"{f' in {cfg.grad_accum} micro-batches' if cfg.grad_accum > 1 else ''}; "
            f"compute {cfg.compute_dtype}, params float32; steps {first_step} -> {end_step} of "
            f"{cfg.steps}"
        )
        if unmapped:
            log(f"   logical axes with no sharding rule (replicated): {sorted(unmapped)}")
        for line in _memory_lines(compiled):
            log(f"   {line} (compile {compile_s:.1f}s)")
        if seq_shards > 1:
            log(
                f"   sequence parallel: {T} tokens per row over {seq_shards} devices "
                f"({-(-T // seq_shards)} per shard); batch arrays are replicated over the "
                f"sequence axis and sliced inside the step"
            )

        writer = metrics_lib.MetricsWriter(
            run_dir,
            total_steps=cfg.steps,
            start_step=first_step,
            enabled=lead,
            progress=cfg.progress,
            resume=restored is not None,
            print_fn=say,
        )
        cleanup.callback(writer.close)
        if lead:
            (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

        # ---- loop -------------------------------------------------------------------------------
        losses: list[float] = []
        pending: list[tuple[int, dict]] = []
        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        tokens_per_step = cfg.batch_size * T
        t_flush = time.time()

        def flush(step_now: int) -> None:
            nonlocal t_flush, pending, last_train
            if not pending:
                return
            fetched = jax.device_get([m for _, m in pending])
            steps_done = len(pending)
            for (s, _), m in zip(pending, fetched, strict=True):
                loss, gnorm = float(m["loss"]), float(m["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(gnorm)):
                    writer.write(s, "train", {"loss": loss, "grad_norm": gnorm})
                    good = (
                        f"the last good checkpoint is step {last_saved} in {ckpt_dir} "
                        f"(continue from it with --resume, e.g. with a lower --optim.learning-rate)"
                        if last_saved is not None
                        else f"no checkpoint was saved before it (checkpoint.every="
                        f"{cfg.checkpoint.every})"
                    )
                    raise NonFiniteLossError(
                        f"training stopped: the loss is {loss} (gradient norm {gnorm}) at step "
                        f"{s}; {good}"
                    )
                losses.append(loss)
            dt = max(time.time() - t_flush, 1e-9)
            t_flush = time.time()
            s, m = pending[-1][0], fetched[-1]
            last_train = {
                "loss": float(m["loss"]),
                "accuracy": float(m["accuracy"]),
                "lr": float(m["lr"]),
                "grad_norm": float(m["grad_norm"]),
                "tokens_per_s": tokens_per_step * steps_done / dt,
            }
            writer.write(s, "train", last_train)
            writer.advance(
                steps_done,
                {
                    "loss": last_train["loss"],
                    "acc": last_train["accuracy"],
                    "tok/s": f"{last_train['tokens_per_s']:.3g}",
                },
            )
            pending = []

        def evaluate(step_now: int) -> dict[str, float]:
            sums = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
            for b in data.eval:
                out = jax.device_get(
                    eval_compiled(state["params"], dist_lib.to_global(b, batch_sh, t))
                )
                for k in sums:
                    sums[k] += float(out[k])
            n = max(sums["count"], 1.0)
            result = {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}
            if data.eval_kind == "text":
                result["bits_per_byte"] = metrics_lib.bits_per_byte(result["loss"])
            writer.write(step_now, "eval", result)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
            writer.message(f"step {step_now}: eval {shown}")
            return result

        def save(step_now: int) -> None:
            nonlocal last_saved
            meta = {"step": step_now, "config": _config_sections(cfg), "preset": cfg.preset}
            checkpointer.save(step_now, state, data.train.get_state(), meta, force=True)
            last_saved = step_now

        t_loop = time.time()
        step = first_step
        while step < end_step:
            local = next(data.train)
            state, m = compiled(state, dist_lib.to_global(local, batch_sh, t))
            step += 1
            pending.append((step, m))
            if step % cfg.log_every == 0 or step == end_step:
                flush(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != end_step:
                flush(step)
                last_eval = evaluate(step)
                t_flush = time.time()  # tokens/s counts training time only
                target = cfg.stop_at_accuracy
                if target is not None and last_eval["accuracy"] >= target:
                    writer.message(
                        f"step {step}: eval accuracy {last_eval['accuracy']:.4f} >= "
                        f"stop_at_accuracy {target}; stopping"
                    )
                    break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != end_step:
                flush(step)
                save(step)
                t_flush = time.time()
        flush(step)
        stopped_early = cfg.stop_at_accuracy is not None and step < end_step
        if (step > first_step or not last_eval) and not stopped_early:
            last_eval = evaluate(step)
        if step > first_step:
            save(step)
        checkpointer.wait()
    loop_s = time.time() - t_loop
    wall = time.time() - t_start

    rows_out = [
        ("preset", cfg.preset),
        ("model", model_desc),
        ("data", data.description),
        ("steps", f"{first_step} -> {step} (of {cfg.steps})"),
        ("tokens seen this run", f"{(step - first_step) * tokens_per_step:,}"),
        ("final train loss", last_train.get("loss", "- (no step this run)")),
        ("final train accuracy", last_train.get("accuracy", "-")),
    ]
    rows_out += [(f"eval {k}", v) for k, v in last_eval.items()]
    rows_out += [
        ("wall time", f"{wall:.1f}s (compile {compile_s:.1f}s, loop {loop_s:.1f}s)"),
        ("step time", _step_time(loop_s, step - first_step, last_train, tokens_per_step)),
        ("memory", "; ".join(_memory_lines(compiled))),
        ("checkpoints", f"{ckpt_dir} (steps {checkpointer_steps(ckpt_dir)})"),
        ("metrics", str(writer.path)),
        ("config", str(run_dir / "config.json")),
    ]
    if writer.tensorboard_dir is not None:
        rows_out.append(("tensorboard", str(writer.tensorboard_dir)))
    summary = metrics_lib.summary_table(rows_out, f"{cfg.preset} done")
    log(summary)
    return FitResult(
        config=cfg,
        first_step=first_step,
        final_step=step,
        losses=losses,
        train_metrics=last_train,
        eval_metrics=last_eval,
        run_dir=run_dir,
        checkpoint_dir=ckpt_dir,
        metrics_path=writer.path,
        wall_time_s=wall,
        compile_time_s=compile_s,
        num_params=num_params,
        summary=summary,
        state=state if keep_state else None,
    )


def _step_time(loop_s: float, steps: int, last_train: dict, tokens_per_step: int) -> str:
    """Step time of the last logging window (training only) and the loop's mean."""
    if steps <= 0:
        return "- (no step this run)"
    mean = f"mean {1e3 * loop_s / steps:.1f} ms over {steps} steps incl. eval/checkpoints"
    rate = last_train.get("tokens_per_s")
    if not rate:
        return mean
    return f"{1e3 * tokens_per_step / rate:.1f} ms/step (last log window); {mean}"


def checkpointer_steps(directory: Path) -> list[int]:
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())

"""The train and eval step functions and the optimizer (see :mod:`train.loop` for the math).

``make_train_step`` returns ``step(state, batch) -> (state, metrics)`` over a *global* batch;
gradient accumulation runs the micro-batches under ``lax.scan`` and sums token-weighted gradients,
so any ``grad_accum`` gives the update of one full batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from train.config import TrainConfig

__all__ = ["make_optimizer", "make_train_step", "make_eval_step"]


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, Callable]:
    """(AdamW + warmup-cosine + global-norm clipping, the learning-rate schedule)."""
    o = cfg.optim
    warmup = min(o.warmup_steps, max(cfg.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=o.learning_rate * o.min_lr_ratio,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(
            schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
        ),
    )
    return tx, schedule


def make_train_step(model_cfg, tx, schedule, grad_accum: int, loss_fn: Callable):
    def summed_loss(params, batch):
        loss, m = loss_fn(params, batch, model_cfg)
        n = m["num_tokens"]
        return loss * n, (n, m["accuracy"] * n)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def step_fn(state, batch):
        params = state["params"]
        if grad_accum == 1:
            (loss_sum, (count, correct)), grads = grad_fn(params, batch)
        else:

            def split(x):
                x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
                return jnp.swapaxes(x, 0, 1)

            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                g_acc, l_acc, n_acc, c_acc = carry
                (l, (n, c)), g = grad_fn(params, mb)
                g_acc = jax.tree.map(jnp.add, g_acc, g)
                return (g_acc, l_acc + l, n_acc + n, c_acc + c), None

            zero = jnp.zeros((), jnp.float32)
            init = (jax.tree.map(jnp.zeros_like, params), zero, zero, zero)
            (grads, loss_sum, count, correct), _ = jax.lax.scan(body, init, micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        # optax mixes Python floats with int32 step counts, which strict promotion rejects.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            lr = schedule(state["step"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "rng": jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0]),
        }
        metrics = {
            "loss": loss_sum / denom,
            "accuracy": correct / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": lr,
            "num_tokens": count,
        }
        return new_state, metrics

    return step_fn


def make_eval_step(model_cfg, loss_fn: Callable):
    def eval_fn(params, batch):
        loss, m = loss_fn(params, batch, model_cfg)
        n = m["num_tokens"]
        return {"loss_sum": loss * n, "correct": m["accuracy"] * n, "count": n}

    return eval_fn

"""The training loop: sharding invariance, gradient accumulation, exact resume, NaN stop."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers.models import lm
from tests.train._helpers import micro_config
from train import checkpoint as ckpt_lib
from train import fit
from train.config import CheckpointConfig, MeshConfig
from train.loop import NonFiniteLossError


def _one_device():
    return jax.devices()[:1]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """6 uninterrupted steps on one device (shared by several tests)."""
    run = tmp_path_factory.mktemp("baseline")
    return fit(micro_config(run), devices=_one_device(), print_fn=lambda s: None)


def test_run_writes_metrics_checkpoints_and_summary(baseline):
    assert baseline.final_step == 6 and len(baseline.losses) == 6
    assert all(np.isfinite(baseline.losses))
    lines = [json.loads(x) for x in baseline.metrics_path.read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert any(x["kind"] == "eval" for x in lines)
    assert set(ckpt_lib.Checkpointer(baseline.checkpoint_dir).steps()) == {3, 6}
    assert (
        "final train loss" in baseline.summary and str(baseline.checkpoint_dir) in baseline.summary
    )
    assert "eval accuracy" in baseline.summary


def test_2x2x2_mesh_matches_one_device(baseline, tmp_path):
    cfg = micro_config(tmp_path, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = fit(cfg, print_fn=lambda s: None)
    np.testing.assert_allclose(sharded.losses, baseline.losses, rtol=2e-5, atol=2e-6)
    assert sharded.eval_metrics["loss"] == pytest.approx(baseline.eval_metrics["loss"], rel=2e-5)


def test_gradient_accumulation_matches_one_big_batch(baseline, tmp_path):
    cfg = micro_config(tmp_path, grad_accum=2)
    accum = fit(cfg, devices=_one_device(), print_fn=lambda s: None)
    np.testing.assert_allclose(accum.losses, baseline.losses, rtol=2e-5, atol=2e-6)


def test_kill_and_resume_gives_identical_losses(baseline, tmp_path):
    cfg = micro_config(tmp_path, stop_after=3)
    first = fit(cfg, devices=_one_device(), print_fn=lambda s: None)
    assert first.final_step == 3
    meta = ckpt_lib.read_meta(first.checkpoint_dir, 3)
    assert meta["step"] == 3
    data_state = json.loads((first.checkpoint_dir / "3" / "data" / "metadata").read_text())
    assert data_state == {"next_index": 3}
    second = fit(
        dataclasses.replace(cfg, stop_after=None, resume=True),
        devices=_one_device(),
        print_fn=lambda s: None,
    )
    assert second.first_step == 3 and second.final_step == 6
    np.testing.assert_array_equal(first.losses + second.losses, baseline.losses)
    # The metrics file holds each step once.
    steps = [
        json.loads(x)["step"]
        for x in second.metrics_path.read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_existing_checkpoints_need_resume_or_overwrite(baseline, tmp_path):
    cfg = micro_config(tmp_path, stop_after=2, checkpoint=CheckpointConfig(every=0))
    fit(cfg, devices=_one_device(), print_fn=lambda s: None)
    with pytest.raises(FileExistsError, match="already holds checkpoints .*--resume.*--overwrite"):
        fit(cfg, devices=_one_device(), print_fn=lambda s: None)
    again = fit(
        dataclasses.replace(cfg, overwrite=True), devices=_one_device(), print_fn=lambda s: None
    )
    assert again.first_step == 0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def exploding_loss(params, batch, cfg):
        loss, metrics = lm.loss(params, batch, cfg)
        blown = jnp.max(jnp.abs(params["embed"]["embedding"])) > 1e3
        return jnp.where(blown, jnp.float32(jnp.nan), loss), metrics

    cfg = micro_config(tmp_path, checkpoint=CheckpointConfig(every=1, keep=5))
    cfg = dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, learning_rate=1e5, warmup_steps=0)
    )
    with pytest.raises(
        NonFiniteLossError, match="loss is nan .* at step 2; the last good checkpoint is step 1"
    ):
        fit(cfg, devices=_one_device(), loss_fn=exploding_loss, print_fn=lambda s: None)
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.steps() == [1]
    ckpt.close()


def test_mesh_not_dividing_device_count(tmp_path):
    cfg = micro_config(tmp_path, mesh=MeshConfig(data=3, fsdp=1, tensor=1))
    with pytest.raises(ValueError, match="must equal the number of devices, 8"):
        fit(cfg, print_fn=lambda s: None)


def test_batch_not_divisible_by_data_times_fsdp(tmp_path):
    cfg = micro_config(tmp_path, mesh=MeshConfig(data=-1, fsdp=1, tensor=1), batch_size=12)
    with pytest.raises(ValueError, match="batch_size / grad_accum = 12 must be divisible by mesh"):
        fit(cfg, print_fn=lambda s: None)


def test_missing_data_file(tmp_path):
    cfg = micro_config(tmp_path)
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, task="text", text_files=(str(tmp_path / "x.txt"),))
    )
    with pytest.raises(FileNotFoundError, match="data.text_files: no such file"):
        fit(cfg, devices=_one_device(), print_fn=lambda s: None)


def test_query_loss_equals_full_lm_loss():
    from train import data as data_lib
    from train import losses
    from train.config import build_model_config

    cfg = micro_config("unused")
    model_cfg = build_model_config(cfg, 32)
    params = lm.init(jax.random.key(0), model_cfg)
    spec = data_lib.MQARSpec(seq_len=16, vocab_size=32, num_kv_pairs=2)
    rows = [data_lib.mqar_example(spec, i) for i in range(6)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in data_lib.MODEL_KEYS[:3]}
    batch["query_pos"] = jnp.asarray(np.stack([r["query_pos"] for r in rows]))
    full, m_full = jax.jit(losses.lm_loss, static_argnums=2)(params, batch, model_cfg)
    sparse, m_sparse = jax.jit(losses.query_loss, static_argnums=2)(params, batch, model_cfg)
    np.testing.assert_allclose(sparse, full, rtol=1e-6)
    assert float(m_sparse["num_tokens"]) == float(m_full["num_tokens"]) == 12
    assert float(m_sparse["accuracy"]) == pytest.approx(float(m_full["accuracy"]))


def test_text_task_trains_and_reports_bits_per_byte(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"paragraph {i}: the quick brown fox." for i in range(30)))
    cfg = micro_config(tmp_path / "run", steps=3, checkpoint=CheckpointConfig(every=0))
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, task="text", text_files=(str(text),), val_fraction=0.2),
    )
    result = fit(cfg, devices=_one_device(), print_fn=lambda s: None)
    assert result.final_step == 3 and all(np.isfinite(result.losses))
    bpb = result.eval_metrics["bits_per_byte"]
    assert bpb == pytest.approx(result.eval_metrics["loss"] / np.log(2.0))
    assert "byte-level text" in result.summary


def test_incomplete_distributed_config(monkeypatch):
    from train.config import DistributedConfig
    from train.distributed import initialize_distributed

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed(DistributedConfig()) is False
    with pytest.raises(ValueError, match="a multi-process launch needs all of"):
        initialize_distributed(DistributedConfig(coordinator_address="localhost:1234"))


def test_stop_at_accuracy_ends_at_the_first_eval_that_reaches_it(tmp_path):
    cfg = micro_config(tmp_path, eval_every=2, stop_at_accuracy=0.0)
    res = fit(cfg, devices=_one_device(), print_fn=lambda s: None)
    assert res.final_step == 2 and len(res.losses) == 2
    assert "accuracy" in res.eval_metrics
    assert ckpt_lib.Checkpointer(res.checkpoint_dir).steps()[-1] == 2


def test_stop_at_accuracy_out_of_range(tmp_path):
    with pytest.raises(ValueError, match=r"stop_at_accuracy must be in \[0, 1\]; got 1.5"):
        micro_config(tmp_path, stop_at_accuracy=1.5)

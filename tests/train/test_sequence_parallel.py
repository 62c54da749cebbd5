"""``--mesh.sequence``: the tokens of every row split over a mesh axis give the same training."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from tests.train._helpers import micro_config
from train import __main__ as cli
from train import fit, sharding
from train.config import MeshConfig, ModelConfig


def test_cli_flag_and_mesh_axis():
    cfg = cli.parse(["--preset", "tiny", "--mesh.sequence", "2"])
    assert cfg.mesh.sequence == 2
    mesh = sharding.make_mesh(-1, 1, 1, sequence=2)
    assert mesh.axis_names == (*sharding.AXES, "sequence")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 1, "sequence": 2}
    assert sharding.sequence_shards(mesh) == 2
    assert sharding.sequence_shards(sharding.make_mesh(-1, 1, 1)) == 1


def test_error_mesh_with_sequence_not_equal_to_device_count():
    with pytest.raises(ValueError, match=r"data\*fsdp\*tensor\*sequence = 2\*1\*1\*2 = 4 must"):
        sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2], sequence=2)


def test_hybrid_mqar_run_matches_without_sequence_axis(tmp_path):
    """GLA + attention on MQAR (query_loss): 3 steps and the final eval, data=2 x sequence=2
    against data=2 alone."""
    base = micro_config(
        tmp_path / "base",
        model=ModelConfig(d_model=16, num_layers=2, num_heads=2, mlp_hidden=32, pattern="GA"),
        steps=3,
        mesh=MeshConfig(data=2, fsdp=1, tensor=1),
    )
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, mixer="gla"))
    ref = fit(base, devices=jax.devices()[:2], print_fn=lambda s: None)
    printed: list[str] = []
    cfg = dataclasses.replace(
        base, run_dir=str(tmp_path / "sp"), mesh=MeshConfig(data=2, fsdp=1, tensor=1, sequence=2)
    )
    got = fit(cfg, devices=jax.devices()[:4], print_fn=printed.append)
    np.testing.assert_allclose(got.losses, ref.losses, rtol=2e-5, atol=2e-6)
    assert got.eval_metrics["loss"] == pytest.approx(ref.eval_metrics["loss"], rel=2e-5)
    log = "\n".join(printed)
    assert "sequence=2" in log and "compiled step memory per device" in log
    assert "8 per shard" in log and "ms/step" in got.summary


def test_error_mixer_without_sequence_parallelism(tmp_path):
    cfg = micro_config(tmp_path, mesh=MeshConfig(data=1, fsdp=1, tensor=1, sequence=2))
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, mixer="lion", mixer_options="{}")
    )
    with pytest.raises(NotImplementedError, match="mixer 'lion'"):
        fit(cfg, devices=jax.devices()[:2], print_fn=lambda s: None)

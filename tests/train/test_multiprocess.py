"""Two processes on localhost (jax.distributed over CPU) train like one process.

Each run is a fresh ``python -m train`` subprocess: process ``i`` of 2 owns 2 CPU devices and
reads its own half of every global batch; the single-process run owns all 4 devices. Same global
batch, same mesh shape (data=4), so the losses must agree up to float32 reduction order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "--preset", "tiny", "--steps", "4", "--batch-size", "8",
    "--model.d-model", "16", "--model.num-heads", "2", "--model.mlp-hidden", "32",
    "--data.seq-len", "16", "--data.vocab-size", "32", "--data.num-kv-pairs", "2",
    "--data.num-eval-examples", "16", "--data.num-threads", "1",
    "--compute-dtype", "float32", "--no-progress", "--log-every", "1", "--eval-every", "0",
    "--checkpoint.every", "2", "--xla-options", '{"xla_backend_optimization_level": 0}',
]  # fmt: skip


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    env |= {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    }
    return env | extra


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["kind"] == "train"]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "train", *ARGS]
    procs = [
        subprocess.Popen(
            [*cmd, "--run-dir", str(tmp_path / "two")],
            env=_env(
                2,
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    single = subprocess.run(
        [*cmd, "--run-dir", str(tmp_path / "one")],
        env=_env(4),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    assert "2 process(es)" in outs[0] and "over 4 cpu devices" in outs[0]
    # Only process 0 writes metrics and prints the summary.
    assert "done ==" in outs[0] and "done ==" not in outs[1]
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two) == len(one) == 4
    np.testing.assert_allclose(two, one, rtol=2e-5, atol=2e-6)
    assert sorted(int(p.name) for p in (tmp_path / "two" / "checkpoints").iterdir()) == [2, 4]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    """Kill -9 a run after a checkpoint exists; ``--resume`` must finish with identical losses."""
    import signal
    import time

    args = [a if a != "4" else "12" for a in ARGS[:4]] + ARGS[4:]  # --steps 12
    cmd = [sys.executable, "-m", "train", *args]
    env = _env(1)
    full = subprocess.run(
        [*cmd, "--run-dir", str(tmp_path / "full")], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert full.returncode == 0, full.stderr[-2000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--run-dir", str(run_dir)], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ckpt = run_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [p for p in ckpt.glob("*") if p.name.isdigit() and (p / "meta").exists()]
        if any(int(p.name) >= 4 for p in done):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    resumed = subprocess.run(
        [*cmd, "--run-dir", str(run_dir), "--resume"], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout
    np.testing.assert_array_equal(_losses(run_dir), _losses(tmp_path / "full"))

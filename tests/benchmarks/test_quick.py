"""The benchmark harness must keep running: one --quick pass over every suite."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import __main__ as bench
from benchmarks import kernels
from benchmarks.harness import format_table, time_fn


def test_quick_all_suites(tmp_path):
    # Benchmarks run under the library's default config, not the strict test config.
    with jax.numpy_dtype_promotion("standard"):
        assert bench.main(["all", "--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "linear_attention.json").read_text())
    impls = {(r["op"], r["impl"]) for r in payload["rows"]}
    assert ("gla", "xla") in impls and ("softmax", "xla") in impls
    assert all(r["fwdbwd_ms"] > 0 for r in payload["rows"])
    assert (tmp_path / "lookup.json").exists()

    layers = json.loads((tmp_path / "layers.json").read_text())["rows"]
    timed = {(r["part"], r["layer"]) for r in layers if r.get("fwdbwd_ms")}
    assert ("mixer", "attention") in timed and ("projection", "dense") in timed
    assert all(r["ratio"] == 1.0 for r in layers if r["layer"] in ("attention", "dense"))
    # Plots need matplotlib (the `bench` extra), which the test install does not include.
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "layers.png").exists() == has_mpl

    training = json.loads((tmp_path / "training.json").read_text())["rows"]
    assert any(r["mixer"] == "attention" and r["tokens_per_s"] > 0 for r in training)

    peers = json.loads((tmp_path / "peers.json").read_text())
    if peers["skipped"] is None:  # torch installed: every peer and ours agree
        assert all(r["rel_err"] < 1e-4 for r in peers["rows"]), peers["rows"]
    else:
        assert peers["rows"] == [] and "install" in peers["skipped"]

    if importlib.util.find_spec("benchmarks.scaleout") is not None:
        assert (tmp_path / "scaleout.json").exists()


def test_slope_and_crossover_helpers():
    rows = [{"op": "gla", "impl": "xla", "T": t, "fwdbwd_ms": 0.01 * t} for t in (256, 512, 1024)]
    rows += [
        {"op": "softmax", "impl": "xla", "T": t, "fwdbwd_ms": 1e-5 * t * t}
        for t in (256, 512, 1024)
    ]
    s = kernels.slopes(rows)
    assert s["gla/xla"] == pytest.approx(1.0)
    assert s["softmax/xla"] == pytest.approx(2.0)
    # gla: 2.56, 5.12, 10.24 ms; softmax: 0.655, 2.62, 10.49 ms -> gla wins from T=1024
    assert kernels.crossover(rows) == 1024


def test_time_fn_and_table():
    t = time_fn(lambda: jnp.ones(3) * 2, repeats=3, warmup=1)
    assert t.median_ms > 0 and t.repeats >= 3 and t.min_ms <= t.median_ms <= t.max_ms
    table = format_table([{"a": 1.0, "b": None}], ["a", "b"])
    assert "1.000" in table and "-" in table

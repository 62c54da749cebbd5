"""python -m benchmarks <suite> [--quick] [--out DIR] [--layers NAMES]

Suites:
  ``linear_attention``  chunked ops vs reference vs softmax attention over T (log-log plot);
  ``lookup``            MemoryFormer / gather_sum vs Dense;
  ``layers``            every registered sequence mixer at d_model 512 for T in {1k, 4k, 16k}
                        (fwd, fwd+bwd, compiled memory; vs softmax attention; log-log plot) and
                        every projection / MLP-like layer at 512 -> 512 on 8192 tokens vs Dense;
  ``training``          tokens/s of the decoder LM per mixer through the ``train`` step;
  ``peers``             agreement and time vs flash-linear-attention's PyTorch references
                        (needs ``pip install torch==2.13.0 fla-core``; skipped without torch);
  ``scaleout``          communication volume of sequence-parallel linear attention
                        (``benchmarks/scaleout.py``; run in a subprocess with 8 fake CPU devices
                        when JAX sees only one device);
  ``all``               every suite in that order.

``--quick`` runs tiny shapes and, for the per-layer suites, a few layers (``--layers all`` for
every one); the whole ``all --quick`` is exercised by a test so the harness cannot rot. Each
suite prints a table and writes ``<suite>.json`` (rows + machine info) and PNG plots under
``--out``. Nothing asserts a speed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import time

from benchmarks import kernels
from benchmarks.harness import format_table, machine_info, save_json

COLUMNS = ["shape", "op", "impl", "fwd_ms", "fwdbwd_ms", "ratio", "tokens_per_s", "compile_s"]
LOOKUP_COLUMNS = ["shape", "impl", "fwd_ms", "ratio", "flops", "param_bytes", "GBps", "error"]
MIXER_COLUMNS = [
    "layer",
    "T",
    "num_heads",
    "fwd_ms",
    "fwdbwd_ms",
    "ratio",
    "fwd_MiB",
    "fwdbwd_MiB",
    "mem_ratio",
    "compile_s",
    "note",
]
PROJ_COLUMNS = [
    "layer",
    "kind",
    "shape",
    "params",
    "fwd_ms",
    "fwdbwd_ms",
    "ratio",
    "fwdbwd_MiB",
    "mem_ratio",
    "compile_s",
    "note",
]
TRAIN_COLUMNS = [
    "mixer",
    "shape",
    "dtype",
    "params",
    "step_ms",
    "tokens_per_s",
    "ratio",
    "MiB",
    "compile_s",
    "first_loss",
    "note",
]
PEER_COLUMNS = [
    "variant",
    "T",
    "impl",
    "fwd_ms",
    "ratio",
    "rel_err",
    "state_rel_err",
    "max_abs_err",
    "peer_source",
    "note",
]

# --quick runs these layers (the ones registered), unless --layers says otherwise.
QUICK_MIXERS = ("attention", "gla")
QUICK_PROJECTIONS = ("dense", "mlp")
QUICK_TRAIN = ("attention", "gla")
# XLA CPU compiles ~3x faster at level 0; --quick only checks that the suites run.
QUICK_XLA = {"xla_backend_optimization_level": 0}


def _plot_la(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(f"{r['op']}/{r['impl']}", []).append((r["T"], r["fwdbwd_ms"]))
    for name, pts in sorted(groups.items()):
        pts.sort()
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("forward+backward time (ms)")
    ax.set_title(f"chunked linear attention vs softmax ({machine_info()['device_kind']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _names(args, quick_default):
    """Layer names for the per-layer suites: --layers, else the quick sample, else all."""
    if args.layers == "all":
        return None
    if args.layers:
        return [n.strip() for n in args.layers.split(",") if n.strip()]
    return list(quick_default) if args.quick else None


def run_linear_attention(args):
    if args.quick:
        rows = kernels.linear_attention(
            Ts=(128, 256), B=1, H=2, D=32, variants=("gla", "delta"), reference_max_T=128, repeats=2
        )
    else:
        rows = kernels.linear_attention()
    print(format_table(rows, COLUMNS))
    sl = kernels.slopes(rows)
    cross = kernels.crossover(rows)
    print("log-log slope of fwd+bwd time vs T:", {k: round(v, 2) for k, v in sl.items()})
    print("crossover T (gla/xla faster than softmax from):", cross)
    out = os.path.join(args.out, "linear_attention")
    save_json(
        out + ".json", {"machine": machine_info(), "rows": rows, "slopes": sl, "crossover_T": cross}
    )
    _plot_la(rows, os.path.join(args.out, "linear_attention.png"))
    return rows


def run_lookup(args):
    if args.quick:
        rows = kernels.lookup(shapes=((256, 64, 64, 4),), repeats=2)
    else:
        rows = kernels.lookup()
    print(format_table(rows, LOOKUP_COLUMNS))
    save_json(os.path.join(args.out, "lookup.json"), {"machine": machine_info(), "rows": rows})
    return rows


def run_layers(args):
    from benchmarks import layers

    def progress(line: str) -> None:  # one line per layer and size, on stderr
        print(line, file=sys.stderr, flush=True)

    if args.quick:
        settings = dict(
            Ts=(64, 128),
            d_model=64,
            head_dim=16,
            repeats=2,
            budget_s=10.0,
            compiler_options=QUICK_XLA,
        )
        proj = dict(N=256, d=64, repeats=2, budget_s=10.0, compiler_options=QUICK_XLA)
    else:
        mem = int(args.mem_budget_gib * 2**30)
        settings = dict(budget_s=args.budget, mem_budget_bytes=mem)
        proj = dict(budget_s=args.budget, mem_budget_bytes=mem)
    mixer_rows, proj_rows = [], []
    if args.part in ("all", "mixers"):
        mixer_rows = layers.mixers(names=_names(args, QUICK_MIXERS), log=progress, **settings)
        print(format_table(mixer_rows, MIXER_COLUMNS))
    if args.part in ("all", "projections"):
        proj_rows = layers.projections(names=_names(args, QUICK_PROJECTIONS), log=progress, **proj)
        print(format_table(proj_rows, PROJ_COLUMNS))
    rows = mixer_rows + proj_rows
    save_json(
        os.path.join(args.out, "layers.json" if args.part == "all" else f"layers_{args.part}.json"),
        {
            "machine": machine_info(),
            "settings": {k: str(v) for k, v in settings.items()},
            "rows": rows,
        },
    )
    if mixer_rows:
        d = settings.get("d_model", 512)
        layers.plot(
            mixer_rows,
            os.path.join(args.out, "layers.png"),
            f"sequence mixers, d_model {d}, batch 1 ({machine_info()['device_kind']})",
        )
    return rows


def run_training(args):
    from benchmarks import training

    if args.quick:
        settings = dict(
            d_model=32,
            num_layers=1,
            num_heads=2,
            mlp_hidden=64,
            T=64,
            batch=2,
            steps=2,
            compiler_options=QUICK_XLA,
        )
    else:
        settings = {}

    # One progress line per mixer on stderr: the full suite takes minutes on 2 CPU cores.
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows = training.training(names=_names(args, QUICK_TRAIN), log=progress, **settings)
    print(format_table(rows, TRAIN_COLUMNS))
    save_json(
        os.path.join(args.out, "training.json"),
        {
            "machine": machine_info(),
            "settings": {k: str(v) for k, v in settings.items()},
            "rows": rows,
        },
    )
    return rows


def _sci(rows, keys):
    out = []
    for r in rows:
        r = dict(r)
        for k in keys:
            if isinstance(r.get(k), float):
                r[k] = f"{r[k]:.1e}"
        out.append(r)
    return out


def run_peers(args):
    from benchmarks import peers

    if args.quick:
        rows = peers.peers(Ts=(64,), H=2, K=16, V=16, repeats=1, log=lambda s: None)
    else:
        rows = peers.peers(log=lambda s: None)
    skipped = None if rows else f"skipped: torch is not installed ({peers.INSTALL_HINT})"
    if skipped:
        print(skipped)
    else:
        print(format_table(_sci(rows, ("rel_err", "state_rel_err", "max_abs_err")), PEER_COLUMNS))
    save_json(
        os.path.join(args.out, "peers.json"),
        {"machine": machine_info(), "rows": rows, "skipped": skipped},
    )
    return rows


def run_scaleout(args):
    if importlib.util.find_spec("benchmarks.scaleout") is None:
        print("scaleout: not available (benchmarks/scaleout.py is missing)")
        return []
    argv = (["--quick"] if args.quick else []) + ["--out", args.out]
    import jax

    if jax.device_count() >= 2:
        return importlib.import_module("benchmarks.scaleout").main(argv)
    # Fake CPU devices must be set before JAX starts: run the suite in its own process.
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "--xla_force_host_platform_device_count" not in flags:
        env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.scaleout", *argv], env=env, check=False
    ).returncode


SUITES = {
    "linear_attention": run_linear_attention,
    "lookup": run_lookup,
    "layers": run_layers,
    "training": run_training,
    "peers": run_peers,
    "scaleout": run_scaleout,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=[*SUITES, "all"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, well under a minute")
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument(
        "--layers",
        default="",
        help="comma-separated layer names for the layers/training suites, or 'all' "
        "(default: all; with --quick a small sample)",
    )
    p.add_argument(
        "--part",
        choices=("all", "mixers", "projections"),
        default="all",
        help="layers suite: run only the sequence mixers or only the projections",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="layers suite: seconds of timing allowed per layer and size (estimated "
        "from the smaller sizes; larger ones are skipped and reported)",
    )
    p.add_argument(
        "--mem-budget-gib",
        type=float,
        default=8.0,
        help="layers suite: skip a compiled program needing more memory than this",
    )
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(machine_info())
    for name in SUITES if args.suite == "all" else [args.suite]:
        print(f"== {name}", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        SUITES[name](args)
        print(
            f"== {name}: {time.perf_counter() - t0:.1f} s wall, "
            f"{time.process_time() - c0:.1f} s CPU",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

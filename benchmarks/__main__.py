"""python -m benchmarks <suite> [--quick] [--out DIR]

Suites: ``linear_attention`` (chunked ops vs reference vs softmax attention over T; log-log
plot), ``lookup`` (MemoryFormer / gather_sum vs Dense), ``all``. ``--quick`` runs tiny shapes in
well under a minute (exercised by a test so the harness cannot rot). Prints a table, writes
``<suite>.json`` (rows + machine info) and PNG plots under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks import kernels
from benchmarks.harness import format_table, machine_info, save_json

COLUMNS = ["shape", "op", "impl", "fwd_ms", "fwdbwd_ms", "ratio", "tokens_per_s", "compile_s"]
LOOKUP_COLUMNS = ["shape", "impl", "fwd_ms", "ratio", "flops", "param_bytes", "GBps", "error"]


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


def run_linear_attention(args):
    if args.quick:
        rows = kernels.linear_attention(Ts=(128, 256, 512), B=1, H=2, D=32,
                                        variants=("gla", "delta"), reference_max_T=512,
                                        repeats=2)
    else:
        rows = kernels.linear_attention()
    print(format_table(rows, COLUMNS))
    sl = kernels.slopes(rows)
    cross = kernels.crossover(rows)
    print("log-log slope of fwd+bwd time vs T:", {k: round(v, 2) for k, v in sl.items()})
    print("crossover T (gla/xla faster than softmax from):", cross)
    out = os.path.join(args.out, "linear_attention")
    save_json(out + ".json", {"machine": machine_info(), "rows": rows, "slopes": sl,
                              "crossover_T": cross})
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


SUITES = {"linear_attention": run_linear_attention, "lookup": run_lookup}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=[*SUITES, "all"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, well under a minute")
    p.add_argument("--out", default="benchmarks/out")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(machine_info())
    for name in SUITES if args.suite == "all" else [args.suite]:
        print(f"== {name}")
        SUITES[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

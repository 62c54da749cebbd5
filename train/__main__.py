"""``python -m train --preset NAME [overrides]``.

``--preset`` picks a :class:`train.config.TrainConfig` (``tiny``, ``mqar-<mixer>``,
``text-<mixer>``); every field can then be overridden with tyro flags, e.g.::

    python -m train --preset tiny
    python -m train --preset mqar-attention --steps 3000 --optim.learning-rate 1e-3
    python -m train --preset text-attention --data.text-files a.txt b.txt --mesh.fsdp 2
    python -m train --preset tiny --resume              # continue the run in runs/tiny
    python -m train --preset tiny --mesh.sequence 2     # split every sequence over 2 devices

Several processes (one per host): set ``--distributed.coordinator-address HOST:PORT
--distributed.num-processes N --distributed.process-id I`` (or the ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` variables) in every process.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "parse"]


def _preset_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", add_help=False)
    p.add_argument("--preset", default=None)
    p.add_argument("-h", "--help", action="store_true")
    return p


def parse(argv: list[str] | None = None):
    """Parse ``argv`` into a TrainConfig (``SystemExit`` with a message on bad input)."""
    import tyro

    from train.config import get_preset, preset_names

    argv = list(sys.argv[1:] if argv is None else argv)
    known, rest = _preset_parser().parse_known_args(argv)
    if known.preset is None:
        if known.help:
            print(__doc__)
            print("presets:", ", ".join(preset_names()))
            raise SystemExit(0)
        print(
            "python -m train: error: --preset is required; presets: " + ", ".join(preset_names()),
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        default = get_preset(known.preset)
    except ValueError as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if known.help:
        rest = [*rest, "--help"]
    try:
        return tyro.cli(
            type(default),
            default=default,
            args=rest,
            prog=f"python -m train --preset {known.preset}",
            description=f"Train with preset {known.preset!r}; flags override its fields.",
        )
    except ValueError as e:  # a config that parsed but is invalid (TrainConfig.__post_init__)
        print(f"python -m train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    from train.loop import NonFiniteLossError, fit

    try:
        fit(cfg)
    except (NonFiniteLossError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"python -m train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

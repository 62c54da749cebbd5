"""The golden parameter-tree file: names, shapes and dtypes of every registered example's params.

It protects checkpoint compatibility: renaming a parameter, changing a shape or a dtype makes
``tests/jaxlayers/test_suites.py::test_golden_param_tree`` fail. When the change is intended (or a
new layer was added), regenerate the file and commit it with the change:

    python -m tests.jaxlayers.regen_golden          # rewrite from the current registry
    python -m tests.jaxlayers.regen_golden --check  # exit 1 if the file is out of date
    JAXLAYERS_REGEN_GOLDEN=1 pytest tests/jaxlayers/test_suites.py -k golden

The tree is computed from ``param_specs`` (abstractly: nothing is initialised), one entry per
registered layer with an ``Example``, one line per parameter (``"path/to/leaf": [shape, dtype]``)
so diffs stay readable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax

GOLDEN_PATH = Path(__file__).parent / "golden" / "params_tree.json"
REGEN_ENV = "JAXLAYERS_REGEN_GOLDEN"


def layer_tree(cfg: Any) -> dict[str, list]:
    """``{"q/kernel": [[16, 24], "float32"], ...}`` for one config (sorted by path)."""
    from jaxlayers import core

    abstract = core.abstract_params(core.param_specs(cfg), cfg.param_dtype)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        out[name] = [list(leaf.shape), str(leaf.dtype)]
    return dict(sorted(out.items()))


def golden_tree() -> dict[str, dict[str, list]]:
    """The tree of every registered layer that has an example, by layer name."""
    from jaxlayers import registry

    return {name: layer_tree(ex.config) for name, ex in sorted(registry.examples().items())}


def dumps(tree: dict[str, dict[str, list]]) -> str:
    lines = ["{"]
    layers = list(tree.items())
    for i, (name, leaves) in enumerate(layers):
        lines.append(f"  {json.dumps(name)}: {{")
        items = list(leaves.items())
        for j, (path, entry) in enumerate(items):
            comma = "," if j < len(items) - 1 else ""
            lines.append(f"    {json.dumps(path)}: {json.dumps(entry)}{comma}")
        lines.append("  }" + ("," if i < len(layers) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def load() -> dict[str, dict[str, list]]:
    if not GOLDEN_PATH.exists():
        return {}
    return json.loads(GOLDEN_PATH.read_text())


def write(tree: dict[str, dict[str, list]] | None = None) -> Path:
    tree = golden_tree() if tree is None else tree
    GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_PATH.write_text(dumps(tree))
    return GOLDEN_PATH


def regen_requested() -> bool:
    return os.environ.get(REGEN_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report differences")
    args = parser.parse_args(argv)
    new, old = golden_tree(), load()
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(n for n in set(new) & set(old) if new[n] != old[n])
    for label, names in (("added", added), ("removed", removed), ("changed", changed)):
        if names:
            print(f"{label}: {', '.join(names)}")
    if args.check:
        return 1 if added or removed or changed else 0
    path = write(new)
    print(f"wrote {path} ({len(new)} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

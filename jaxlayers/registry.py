"""The complete layer registry: importing this module imports every layer module of jaxlayers.

Layers register themselves (``core.register_layer``) when their module is imported. This module
walks the ``jaxlayers`` package and imports every submodule, so new layer modules are picked up
without editing a list here. The Flax wrappers, the shared test suites, the golden parameter-tree
file and the benchmarks all start from :func:`all_layers` / :func:`examples`.
"""

from __future__ import annotations

import importlib
import pkgutil

import jaxlayers
from jaxlayers import core

__all__ = ["import_all", "all_layers", "examples", "class_name"]

# Modules that register no layers and import Flax (or this module).
_SKIP = frozenset({"jaxlayers.registry", "jaxlayers.nnx", "jaxlayers.linen"})


def import_all() -> list[str]:
    """Import every ``jaxlayers`` submodule (idempotent); returns their names."""
    names = []
    for info in pkgutil.walk_packages(jaxlayers.__path__, prefix="jaxlayers."):
        if info.name in _SKIP or any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        importlib.import_module(info.name)
        names.append(info.name)
    return names


def all_layers() -> dict[str, core.LayerFns]:
    """Every registered layer, by name (sorted)."""
    import_all()
    layers = core.registered_layers()
    return {name: layers[name] for name in sorted(layers)}


def examples() -> dict[str, core.Example]:
    """The :class:`core.Example` of every registered layer that has one, by layer name."""
    return {name: fns.example for name, fns in all_layers().items() if fns.example is not None}


# Words spelled in capitals (or a fixed mix) in class names: "rms_norm" -> "RMSNorm".
_WORDS = {
    "lm": "LM",
    "mlp": "MLP",
    "rms": "RMS",
    "glu": "GLU",
    "gla": "GLA",
    "hgrn": "HGRN",
    "hgrn2": "HGRN2",
    "ttt": "TTT",
    "peer": "PEER",
    "lightnet": "LightNet",
    "regla": "ReGLA",
    "sltrain": "SLTrain",
    "qk": "QK",
    "lolcats": "LoLCATs",
    "slab": "SLAB",
    "lit": "LiT",
    "prelu": "PReLU",
    "velu": "VeLU",
    "evonorm": "EvoNorm",
    "pkm": "PKM",
    "vq": "VQ",
    "simvq": "SimVQ",
    "kan": "KAN",
    "lora": "LoRA",
    "rope": "RoPE",
    "fope": "FoPE",
    "fft": "FFT",
    "fnet": "FNet",
    "ssm": "SSM",
    "lssl": "LSSL",
    "gsa": "GSA",
    "nha": "NHA",
    "prepbn": "PRepBN",
    "retnet": "RetNet",
    "deltanet": "DeltaNet",
    "mom": "MoM",
    "phm": "PHM",
    "sea": "SEA",
    "lion": "LION",
    "gelu": "GELU",
    "relu": "ReLU",
    "silu": "SiLU",
}


def class_name(layer_name: str) -> str:
    """The Flax wrapper class name of a registered layer: ``"rms_norm"`` -> ``"RMSNorm"``."""
    return "".join(_WORDS.get(w, w[:1].upper() + w[1:]) for w in layer_name.split("_") if w)


import_all()

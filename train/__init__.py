"""Training stack for jaxlayers models: ``python -m train --preset NAME`` or ``train.fit(cfg)``.

Modules: :mod:`train.config` (dataclass configs and presets), :mod:`train.data` (MQAR, byte-level
text, the grain pipeline), :mod:`train.sharding` (mesh and logical-axis rules),
:mod:`train.loop` (the jitted step and :func:`fit`), :mod:`train.checkpoint` (orbax),
:mod:`train.metrics` (progress bar, JSONL, summary).
"""

from train.config import TrainConfig, get_preset, preset_names
from train.loop import FitResult, NonFiniteLossError, fit

__all__ = ["TrainConfig", "fit", "FitResult", "NonFiniteLossError", "get_preset", "preset_names"]

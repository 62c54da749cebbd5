"""Residual blocks and the decoder-only LM, assembled from any registered mixer and MLP."""

from jaxlayers.models import block, lm
from jaxlayers.models.block import BlockConfig
from jaxlayers.models.lm import LMConfig

__all__ = ["block", "lm", "BlockConfig", "LMConfig"]

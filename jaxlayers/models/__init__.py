"""Residual blocks and the decoder-only LM, assembled from any registered mixer and MLP;
``sequence_parallel`` runs the LM with its time axis sharded over a mesh axis."""

from jaxlayers.models import block, lm, sequence_parallel
from jaxlayers.models.block import BlockConfig
from jaxlayers.models.lm import LMConfig

__all__ = ["block", "lm", "sequence_parallel", "BlockConfig", "LMConfig"]

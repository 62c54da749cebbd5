"""Lookup-table projections: ``gather_sum`` (an embedding bag over ``j`` tables).

``y[n] = sum_j weights[n, j] * tables[j, indices[n, j]]``, with reference (dense one-hot),
``xla`` (take + scatter-add backward) and Pallas (Triton GPU, Mosaic TPU) implementations.
"""

from .api import gather_sum
from .block_sizes import BlockSizes, default_block_sizes

__all__ = ["gather_sum", "BlockSizes", "default_block_sizes"]

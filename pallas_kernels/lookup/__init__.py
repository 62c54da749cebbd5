"""Lookup-table projections: ``gather_sum`` (an embedding bag over ``j`` tables).

``y[n] = sum_j weights[n, j] * tables[j, indices[n, j]]``, with reference (dense one-hot),
``xla`` (take + scatter-add backward) and Pallas (Triton GPU, Mosaic TPU) implementations.
:func:`gather_sum_sharded` runs it with the tables' rows sharded over a mesh axis (shard-local
gather, one reduction).
"""

from .api import gather_sum
from .block_sizes import BlockSizes, default_block_sizes
from .sharded import gather_sum_sharded

__all__ = ["gather_sum", "gather_sum_sharded", "BlockSizes", "default_block_sizes"]

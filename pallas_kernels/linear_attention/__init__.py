"""Chunked linear attention family: gated linear attention and the (gated) delta rule.

Public ops (layout ``[batch, time, heads, dim]``, state ``[batch, heads, key_dim, value_dim]``):
:func:`gated_linear_attention`, :func:`delta_rule` and their one-token decoding steps
:func:`gated_linear_attention_step`, :func:`delta_rule_step`. Modules: ``reference`` (token
scan, ground truth), ``xla`` (chunked jnp), ``api`` (validation + dispatch), ``block_sizes``;
the Pallas kernels live in ``gla_*`` / ``delta_*``. Sequence (context) parallel versions over a
mesh axis: :func:`gated_linear_attention_sp`, :func:`delta_rule_sp` (``sequence_parallel``), or
the unchanged ops inside a ``shard_map`` body traced under :func:`sequence_parallel_axis`
(``sequence_context``).
"""

from .api import delta_rule, delta_rule_step, gated_linear_attention, gated_linear_attention_step
from .block_sizes import BlockSizes
from .sequence_context import sequence_parallel_axis
from .sequence_parallel import delta_rule_sp, gated_linear_attention_sp

__all__ = [
    "BlockSizes",
    "delta_rule",
    "delta_rule_sp",
    "delta_rule_step",
    "gated_linear_attention",
    "gated_linear_attention_sp",
    "gated_linear_attention_step",
    "sequence_parallel_axis",
]

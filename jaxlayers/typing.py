"""Shape notation and array type aliases used across jaxlayers.

Legend (one letter per axis, used in docstrings and jaxtyping annotations):

    b  batch                 t  time (sequence)         d  model width (d_model)
    h  query heads           g  key/value heads (GQA)   k  key / query head dim
    v  value head dim        f  hidden (MLP) width      n  tokens (flattened b*t)
    j  lookup tables         r  rows per table          c  chunk length
    i  input features        o  output features         s  state slots

Activations are ``[b, t, d]``; multi-head tensors ``[b, t, h, k]``; recurrent states
``[b, h, k, v]``. Runtime shape checking with jaxtyping is switched on in the tests only
(``jaxtyping.install_import_hook`` is not used in the library, so there is no cost at import).
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

__all__ = [
    "Array",
    "Float",
    "Int",
    "PRNGKeyArray",
    "PyTree",
    "Key",
    "BTD",
    "BTHK",
    "BTHV",
    "BHKV",
    "Tokens",
    "Segments",
]

Key = PRNGKeyArray | jax.Array
BTD = Float[Array, "b t d"]
BTHK = Float[Array, "b t h k"]
BTHV = Float[Array, "b t h v"]
BHKV = Float[Array, "b h k v"]
Tokens = Int[Array, "b t"]
Segments = Int[Array, "b t"]

"""Adam with 8-bit block-wise quantised moments.

From "8-bit Optimizers via Block-wise Quantization". Each moment tensor is flattened, split into
blocks of ``block_size`` elements (the last block zero-padded) and stored as one uint8 code per
element plus one float32 absolute maximum per block:

    quantise:    N_b = max_i |x_i| over block b,   code_i = argmin_k |Q[k] - x_i / N_b|
    dequantise:  x_i ~ Q[code_i] * N_b

Each step dequantises ``m, v`` to float32, runs the ordinary Adam update with them, and
re-quantises the new moments (the update itself uses the float32 moments). The first moment
uses a signed map, the second (non-negative) an unsigned one, so it spends no bit on a sign.

Block size: **256 by default** (the paper uses 2048; smaller blocks isolate outliers better at
4/256 = 1.6% extra bytes for the absmax). Leaves with fewer than ``min_size`` elements keep
float32 moments (the paper keeps small tensors in 32 bits too; default 4096).

Quantisation maps ``Q`` (sorted, in ``[-1, 1]`` or ``[0, 1]``):

  "dynamic"  the paper's dynamic tree quantisation, built here as: a value with ``e`` leading
             zero bits (its decimal exponent ``10^-e``) has the remaining bits for a linear
             fraction in ``(0.1, 1]``. Unsigned: ``{0} + {10^-e (0.1 + 0.9 k / 2^(7-e)) :
             e = 0..7, k = 1..2^(7-e)}`` (256 values, max 1). Signed: ``{0} + {+-10^-e (0.1 +
             0.9 k / 2^(6-e)) : e = 0..6}`` (255 values; one code unused). Relative precision
             is high near each block's maximum and the range spans 7 decades below it.
  "linear"   256 evenly spaced values (``linspace(-1, 1)`` / ``linspace(0, 1)``).

Rounding is to the nearest map value (no stochastic rounding). Memory per quantised element:
2 bytes for ``m`` and ``v`` (float32 Adam: 8), plus ``8 / block_size`` bytes of absmax.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayers.optim import _optax

__all__ = [
    "QuantizedTensor",
    "Adam8bitState",
    "quantization_map",
    "quantize_blockwise",
    "dequantize_blockwise",
    "scale_by_adam_8bit",
    "adam_8bit",
    "state_nbytes",
]

MAPS = ("dynamic", "linear")


class QuantizedTensor(NamedTuple):
    codes: jax.Array  # uint8 [num_blocks, block_size]
    absmax: jax.Array  # float32 [num_blocks]


class Adam8bitState(NamedTuple):
    count: jax.Array  # int32 []
    mu: Any  # per leaf: QuantizedTensor (signed map) or float32 leaf-shaped array
    nu: Any  # per leaf: QuantizedTensor (unsigned map) or float32 leaf-shaped array


def quantization_map(kind: str = "dynamic", signed: bool = True) -> np.ndarray:
    """The sorted float32 code book (see the module docstring)."""
    if kind not in MAPS:
        raise ValueError(f"kind must be one of {MAPS}; got {kind!r}")
    if kind == "linear":
        return np.linspace(-1.0 if signed else 0.0, 1.0, 256, dtype=np.float32)
    bits = 6 if signed else 7
    mags = [
        10.0**-e * (0.1 + 0.9 * np.arange(1, 2 ** (bits - e) + 1) / 2 ** (bits - e))
        for e in range(bits + 1)
    ]
    pos = np.concatenate(mags)
    values = np.concatenate([-pos, [0.0], pos]) if signed else np.concatenate([[0.0], pos])
    return np.sort(values).astype(np.float32)


def quantize_blockwise(x: jax.Array, qmap: jax.Array, block_size: int) -> QuantizedTensor:
    """Block-wise absmax quantisation of ``x`` (any shape) to uint8 codes of ``qmap``."""
    flat = x.reshape(-1).astype(jnp.float32)
    nb = -(-flat.shape[0] // block_size)
    flat = jnp.pad(flat, (0, nb * block_size - flat.shape[0]))
    blocks = flat.reshape(nb, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    boundaries = (qmap[1:] + qmap[:-1]) * 0.5
    codes = jnp.searchsorted(boundaries, normed.reshape(-1)).reshape(nb, block_size)
    return QuantizedTensor(codes.astype(jnp.uint8), absmax)


def dequantize_blockwise(q: QuantizedTensor, qmap: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 array of ``shape`` from :func:`quantize_blockwise`'s output."""
    values = jnp.take(qmap, q.codes.astype(jnp.int32)) * q.absmax[:, None]
    size = int(np.prod(shape))
    return values.reshape(-1)[:size].reshape(shape)


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int = 256,
    min_size: int = 4096,
    qmap: str = "dynamic",
) -> Any:
    """Adam's scaling (no learning rate) with 8-bit block-wise moments; see module docstring."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got block_size={block_size}")
    signed = jnp.asarray(quantization_map(qmap, signed=True))
    unsigned = jnp.asarray(quantization_map(qmap, signed=False))

    def quantised(p) -> bool:
        return int(np.prod(jnp.shape(p))) >= min_size

    def init_fn(params):
        def moments(p):
            z = jnp.zeros(jnp.shape(p), jnp.float32)
            if not quantised(p):
                return z, z
            return quantize_blockwise(z, signed, block_size), quantize_blockwise(
                z, unsigned, block_size
            )

        leaves, treedef = jax.tree.flatten(params)
        pairs = [moments(p) for p in leaves]
        mu = jax.tree.unflatten(treedef, [m for m, _ in pairs])
        nu = jax.tree.unflatten(treedef, [v for _, v in pairs])
        return Adam8bitState(jnp.zeros((), jnp.int32), mu, nu)

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        t = count.astype(jnp.float32)
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        leaves, treedef = jax.tree.flatten(updates)
        outs = []
        for g, mu, nu in zip(
            leaves,
            treedef.flatten_up_to(state.mu),
            treedef.flatten_up_to(state.nu),
            strict=True,
        ):
            g32 = g.astype(jnp.float32)
            is_q = isinstance(mu, QuantizedTensor)
            m = dequantize_blockwise(mu, signed, g.shape) if is_q else mu
            v = dequantize_blockwise(nu, unsigned, g.shape) if is_q else nu
            m = b1 * m + (1 - b1) * g32
            v = b2 * v + (1 - b2) * jnp.square(g32)
            u = (m / c1) / (jnp.sqrt(v / c2) + eps)
            if is_q:
                m = quantize_blockwise(m, signed, block_size)
                v = quantize_blockwise(v, unsigned, block_size)
            outs.append((u.astype(g.dtype), m, v))
        unflat = lambda i: jax.tree.unflatten(treedef, [o[i] for o in outs])  # noqa: E731
        return unflat(0), Adam8bitState(count, unflat(1), unflat(2))

    return _optax.transformation(init_fn, update_fn)


def adam_8bit(learning_rate: Any, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, **kw):
    """:func:`scale_by_adam_8bit` followed by ``-learning_rate`` (float or optax schedule)."""
    return _optax.with_learning_rate(scale_by_adam_8bit(b1, b2, eps, **kw), learning_rate)


def state_nbytes(tree: Any) -> int:
    """Bytes held by the arrays (or ``ShapeDtypeStruct``s) of a pytree, e.g. an optimizer state."""
    return int(
        sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
    )

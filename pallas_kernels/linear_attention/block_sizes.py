"""Block sizes for the chunked linear attention ops: a frozen, validated ``BlockSizes``.

``chunk_size`` is the number of tokens processed together (intra-chunk matmuls; one state
update per chunk). ``block_k`` / ``block_v`` optionally tile the key / value dims of the
``[k, v]`` state in the kernels (None: the whole dim in one block). Defaults depend on the
backend and head dims; tuned values, once measured on a device, go in ``TUNED`` keyed by a
device-kind prefix (``jax.devices()[0].device_kind``, e.g. ``"NVIDIA H100"``, ``"TPU v5"``) and
``(k_dim, v_dim, dtype name)``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

__all__ = ["BlockSizes", "TUNED", "DEFAULT_CHUNK_SIZE", "MIN_CHUNK_SIZE"]

DEFAULT_CHUNK_SIZE = 64
# Triton's dot needs every dim >= 16; the chunk is one of the dims of the intra-chunk matmuls.
MIN_CHUNK_SIZE = 16


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_chunk_size(chunk_size) -> None:
    """Raise ValueError unless ``chunk_size`` is an int power of two >= MIN_CHUNK_SIZE."""
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or chunk_size < MIN_CHUNK_SIZE
        or not _is_pow2(chunk_size)
    ):
        raise ValueError(
            f"chunk_size must be a power of two >= {MIN_CHUNK_SIZE} (e.g. 16, 32, 64, 128); "
            f"got {chunk_size!r}"
        )


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the chunked linear attention kernels (hashable: static under jit).

    Attributes:
      chunk_size: tokens per chunk; a power of two >= 16.
      block_k: key-dim tile of the state, a power of two >= 16, or None for the whole dim.
      block_v: value-dim tile of the state, a power of two >= 16, or None for the whole dim.
    """

    chunk_size: int = DEFAULT_CHUNK_SIZE
    block_k: int | None = None
    block_v: int | None = None

    def __post_init__(self):
        check_chunk_size(self.chunk_size)
        for name in ("block_k", "block_v"):
            b = getattr(self, name)
            if b is not None and (
                isinstance(b, bool) or not isinstance(b, int) or b < 16 or not _is_pow2(b)
            ):
                raise ValueError(f"{name} must be None or a power of two >= 16; got {b!r}")

    @classmethod
    def get(
        cls,
        backend: str,
        k_dim: int,
        v_dim: int,
        dtype,
        device_kind: str | None = None,
        per_key_gate: bool = False,
    ) -> BlockSizes:
        """Block sizes for one problem: a tuned entry if one matches, else the default.

        Args:
          backend: "cpu", "gpu" or "tpu".
          k_dim, v_dim: head dims of keys and values.
          dtype: input dtype of q/k/v.
          device_kind: ``jax.Device.device_kind`` for tuned lookups (optional).
          per_key_gate: the problem has a ``[b, t, h, k]`` log decay. On CPU the chunked jnp
            path then uses chunks of 32: forward+backward runs as fast as with 64 (T=4096, 2-core
            CPU), and a chunk takes the one-matmul intra-chunk form (:mod:`.xla_gate`) while its
            total decay per key dim is <= 60, i.e. up to an average decay of ~1.9 per step at 32
            against ~0.9 at 64; beyond that it takes the slower exact tree form.
        """
        if backend not in ("cpu", "gpu", "tpu"):
            raise ValueError(f"backend must be 'cpu', 'gpu' or 'tpu'; got {backend!r}")
        if device_kind is not None:
            key = (k_dim, v_dim, jnp.dtype(dtype).name)
            for prefix, table in TUNED.items():
                if device_kind.startswith(prefix) and key in table:
                    return table[key]
        if backend == "cpu":
            return cls(32 if per_key_gate else DEFAULT_CHUNK_SIZE)
        if backend == "gpu":
            # Triton: state tiles of at most 64 x 64 keep register pressure manageable.
            return cls(DEFAULT_CHUNK_SIZE, _tile(k_dim, 64), _tile(v_dim, 64))
        # TPU: lane dim multiples of 128, else the whole dim.
        return cls(DEFAULT_CHUNK_SIZE, None, _tile(v_dim, 128) if v_dim % 128 == 0 else None)


def _tile(dim: int, cap: int) -> int | None:
    """The largest power of two <= cap dividing dim (>= 16), or None (whole dim)."""
    b = cap
    while b >= 16:
        if dim % b == 0:
            return b if b < dim else None
        b //= 2
    return None


# device-kind prefix -> {(k_dim, v_dim, dtype name): BlockSizes}. Empty until measured.
TUNED: dict[str, dict[tuple[int, int, str], BlockSizes]] = {}

"""Block sizes for the gather_sum Pallas kernels, with shape-dependent defaults.

One frozen :class:`BlockSizes` serves both kernel families; each kernel reads the fields it
uses:

* GPU (Triton): ``block_n`` tokens x ``block_d`` features per program for the forward, the
  d_weights and the entry loop of d_tables (``block_e`` sorted entries per step); ``num_warps``
  and ``num_stages`` go to ``triton.CompilerParams``. Triton needs power-of-2 blocks.
* TPU (Mosaic): ``block_n`` tokens per grid step (multiple of 8; the kernel gathers
  ``block_n`` rows per table with one DMA each), ``block_d`` features per step (multiple of 128
  or the whole feature dim), ``block_e`` sorted entries per step of the d_tables kernel.

Defaults: the gather is memory bound, so the GPU blocks aim for wide contiguous row segments
(``block_d`` up to 256 elements = 512 B in bf16, 1 KiB in f32) and enough rows in flight per
program (``block_n`` = 32..64) to hide the latency of the dependent index -> row load.
``tuned`` is the place for per-device tables (keyed by ``jax.devices()[0].device_kind``);
it is empty until the kernels are measured on real hardware.
"""

from __future__ import annotations

import dataclasses

__all__ = ["BlockSizes", "default_block_sizes", "next_pow2"]


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    block_n: int
    block_d: int
    block_e: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_n", "block_d", "block_e", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive int; got {v!r}")

    def validate_for(self, platform: str, d: int) -> None:
        """Raise ValueError if these blocks cannot be used by ``platform``'s kernels."""
        if platform == "gpu":
            for name in ("block_n", "block_d", "block_e"):
                v = getattr(self, name)
                if v & (v - 1):
                    raise ValueError(
                        f"BlockSizes.{name} must be a power of 2 for the Triton kernels; got {v}"
                    )
        elif platform == "tpu":
            if self.block_n % 8:
                raise ValueError(
                    f"BlockSizes.block_n must be a multiple of 8 on TPU; got {self.block_n}"
                )
            if self.block_d != d and (self.block_d % 128 or d % self.block_d):
                raise ValueError(
                    "BlockSizes.block_d must equal the feature dim "
                    f"(tables.shape[2]={d}) or be a multiple of 128 dividing it; "
                    f"got {self.block_d}"
                )
        else:
            raise ValueError(f"platform must be 'gpu' or 'tpu'; got {platform!r}")


# Per-device tuned tables: {(device_kind, platform): BlockSizes}. Filled from measurements.
tuned: dict[tuple[str, str], BlockSizes] = {}


def default_block_sizes(platform: str, *, n: int, d: int, itemsize: int) -> BlockSizes:
    """Shape-dependent defaults for ``platform`` ("gpu" or "tpu")."""
    if platform == "gpu":
        # Up to 1 KiB of contiguous bytes per gathered row segment.
        block_d = min(next_pow2(d), max(32, 1024 // itemsize), 256)
        block_n = 64 if block_d <= 128 else 32
        block_n = min(block_n, max(16, next_pow2(n)))
        return BlockSizes(block_n=block_n, block_d=block_d, block_e=16, num_warps=4, num_stages=3)
    if platform == "tpu":
        if d % 128 == 0:
            block_d = 512 if d % 512 == 0 else (256 if d % 256 == 0 else 128)
        else:
            block_d = d
        return BlockSizes(block_n=8, block_d=block_d, block_e=128)
    raise ValueError(f"platform must be 'gpu' or 'tpu'; got {platform!r}")

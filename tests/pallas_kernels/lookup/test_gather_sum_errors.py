"""gather_sum bad input: one test per error message."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from pallas_kernels.lookup import BlockSizes, gather_sum

IDX = jnp.zeros((4, 2), jnp.int32)
W = jnp.ones((4, 2), jnp.float32)
TAB = jnp.ones((2, 3, 8), jnp.float32)


def test_indices_rank():
    with pytest.raises(ValueError, match=r"indices must have rank 2 \[n, j\]"):
        gather_sum(IDX[0], W, TAB)


def test_weights_rank():
    with pytest.raises(ValueError, match=r"weights must have rank 2 \[n, j\]"):
        gather_sum(IDX, W[None], TAB)


def test_tables_rank():
    with pytest.raises(ValueError, match=r"tables must have rank 3 \[j, r, d\]"):
        gather_sum(IDX, W, TAB[0])


def test_weights_shape_must_match_indices():
    with pytest.raises(ValueError, match=r"weights must have the shape of indices \(4, 2\)"):
        gather_sum(IDX, W[:3], TAB)


def test_number_of_tables_must_match():
    with pytest.raises(ValueError, match=r"indices.shape\[1\].*must equal tables.shape\[0\]=3"):
        gather_sum(IDX, W, jnp.ones((3, 3, 8), jnp.float32))


def test_empty_tables():
    with pytest.raises(ValueError, match="at least one table and one row"):
        gather_sum(IDX, W, jnp.ones((2, 0, 8), jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.int16, jnp.uint32, jnp.float32], ids=str)
def test_index_dtype(dtype):
    with pytest.raises(TypeError, match="indices must have dtype int32; got"):
        gather_sum(IDX.astype(dtype), W, TAB)


def test_weights_must_be_floating():
    with pytest.raises(TypeError, match="weights must have a floating dtype"):
        gather_sum(IDX, W.astype(jnp.int32), TAB)


def test_tables_must_be_floating():
    with pytest.raises(TypeError, match="tables must have a floating dtype"):
        gather_sum(IDX, W, TAB.astype(jnp.int32))


def test_out_of_range_concrete_indices():
    idx = IDX.at[2, 1].set(3)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\).*got 3 at \[2, 1\]"):
        gather_sum(idx, W, TAB)


def test_negative_concrete_indices():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\).*got -1 at \[0, 0\]"):
        gather_sum(IDX.at[0, 0].set(-1), W, TAB)


def test_check_indices_mode():
    with pytest.raises(ValueError, match="check_indices must be one of"):
        gather_sum(IDX, W, TAB, check_indices="always")


def test_implementation_name():
    with pytest.raises(ValueError, match="implementation must be one of"):
        gather_sum(IDX, W, TAB, implementation="cuda")


def test_kernel_platform_name():
    with pytest.raises(ValueError, match="kernel_platform must be None, 'gpu' or 'tpu'"):
        gather_sum(IDX, W, TAB, implementation="pallas", interpret=True, kernel_platform="x")


def test_pallas_on_cpu_needs_interpret():
    with pytest.raises(NotImplementedError, match="Pallas on CPU needs interpret=True"):
        gather_sum(IDX, W, TAB, implementation="pallas")


def test_gpu_blocks_power_of_two():
    bs = BlockSizes(block_n=24, block_d=32, block_e=8)
    with pytest.raises(ValueError, match="block_n must be a power of 2"):
        gather_sum(IDX, W, TAB, implementation="pallas", interpret=True, block_sizes=bs)


def test_tpu_block_n_multiple_of_8():
    bs = BlockSizes(block_n=4, block_d=8, block_e=8)
    with pytest.raises(ValueError, match="block_n must be a multiple of 8 on TPU"):
        gather_sum(
            IDX,
            W,
            TAB,
            implementation="pallas",
            interpret=True,
            block_sizes=bs,
            kernel_platform="tpu",
        )


def test_tpu_block_d():
    bs = BlockSizes(block_n=8, block_d=4, block_e=8)
    with pytest.raises(ValueError, match=r"block_d must equal the feature dim \(tables.shape"):
        gather_sum(
            IDX,
            W,
            TAB,
            implementation="pallas",
            interpret=True,
            block_sizes=bs,
            kernel_platform="tpu",
        )


def test_block_sizes_positive():
    with pytest.raises(ValueError, match="BlockSizes.block_e must be a positive int"):
        BlockSizes(block_n=8, block_d=8, block_e=0)

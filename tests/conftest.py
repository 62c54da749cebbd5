"""Strict JAX config, 8 fake CPU devices and a seeded key fixture for every test."""

import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Matmuls at full float32 precision so that float32 tolerances mean what they say.
jax.config.update("jax_default_matmul_precision", "highest")


_SEED = int(os.environ.get("JAXLAYERS_TEST_SEED", "0"))


@pytest.fixture
def key(request):
    """A PRNG key that differs per test (seed + test name) and is printed on failure."""
    import zlib

    seed = (_SEED * 1_000_003 + zlib.crc32(request.node.nodeid.encode())) & 0x7FFFFFFF
    print(f"[key fixture] seed={seed} (JAXLAYERS_TEST_SEED={_SEED})")
    return jax.random.key(seed)

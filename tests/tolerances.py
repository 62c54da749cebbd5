"""Per-dtype relative-error tolerances, in one place.

Errors are measured as ``||out - ref|| / ||ref||`` (Frobenius norm over the whole tree leaf)
against a float32 reference computed at ``highest`` matmul precision.
"""

import jax.numpy as jnp

# Forward outputs and final states.
FORWARD = {
    jnp.dtype(jnp.float32): 1e-5,
    jnp.dtype(jnp.bfloat16): 1e-2,
    jnp.dtype(jnp.float16): 5e-3,
}

# Gradients accumulate more rounding (longer chains, reductions over time).
GRAD = {
    jnp.dtype(jnp.float32): 5e-5,
    jnp.dtype(jnp.bfloat16): 2e-2,
    jnp.dtype(jnp.float16): 1e-2,
}

# Long recurrences (reference lax.scan vs chunked) accumulate in a different order; float32
# forward stays well below this.
RECURRENT_FORWARD = {
    jnp.dtype(jnp.float32): 2e-5,
    jnp.dtype(jnp.bfloat16): 1e-2,
}


def forward(dtype) -> float:
    return FORWARD[jnp.dtype(dtype)]


def grad(dtype) -> float:
    return GRAD[jnp.dtype(dtype)]

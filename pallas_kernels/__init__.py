"""Pallas kernels (TPU via Mosaic, GPU via Triton) with plain-jnp references.

Sub-packages: ``linear_attention`` (chunked linear attention family) and ``lookup``
(gather-sum over lookup tables). This package knows nothing of layers or training.
"""

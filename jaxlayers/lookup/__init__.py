"""Lookup / memory / parameter-token layers, built on ``pallas_kernels.lookup.gather_sum``.

Each is a drop-in ``apply(params, x [..., d_in], cfg) -> [..., d_out]``:

- :mod:`.memoryformer` -- MemoryFormer hashing projection (Dense) and memory block (FFN)
- :mod:`.product_key` -- product-key memory (PKM) and an UltraMem-style memory
- :mod:`.peer` -- PEER, a mixture of single-neuron experts (MLP)
- :mod:`.pattention` -- TokenFormer Pattention with output-preserving growth (Dense)
- :mod:`.vq_logits` -- VQ-Logits output head (LM head)
"""

from . import memoryformer, pattention, peer, product_key, vq_logits

__all__ = ["memoryformer", "pattention", "peer", "product_key", "vq_logits"]

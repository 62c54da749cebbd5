"""Sequence mixers of the linear-attention family (catalog A), built on
``pallas_kernels.linear_attention``.

Every mixer follows the sequence-mixer contract of :mod:`jaxlayers.models.block`:
``apply(params, x [b, t, d], cfg, *, segment_ids=None, positions=None, initial_state=None,
return_state=False)``, ``init_state(cfg, batch, dtype)`` and ``step(params, state, x_t, cfg)``.
Modules are imported by :mod:`jaxlayers.registry`.
"""

"""Linear-layer replacements and re-parameterisations (catalog section C).

Each module is a pure registered layer (``Config`` / ``param_specs`` / ``init`` / ``apply``):

- :mod:`.tversky` -- Tversky projection: similarities to learned prototypes through a learned
  feature bank ("Tversky Neural Networks")
- :mod:`.kat` -- Group-Rational KAN (KAT) and the Padé activation unit (rational activations)
- :mod:`.sltrain` -- SLTrain sparse plus low-rank weight ``W = (alpha/r) A B + S``
- :mod:`.fourier_head` -- Fourier head: a categorical head from a Fourier-series density
- :mod:`.phm` -- parameterised hypercomplex multiplication ``W = sum_i A_i (x) S_i``
- :mod:`.collapsed_qk` -- attention with one matrix per head for ``W_Q W_K^T``

LoRA-style adapters over Dense params live in :mod:`jaxlayers.adapters`.
"""

"""Training techniques as optax ``GradientTransformation``s and pure params transforms.

    lowrank_dct     Adam with SVD-free low-rank (DCT basis) gradient projection
    adam8bit        Adam with 8-bit block-wise quantised moments
    lipschitz       spectral-norm cap on every 2-D weight after each update
    lines           LiNeS depth-scaled merge of a fine-tuning update
    sigma_reparam   sigma-Reparam, W_hat = gamma / sigma(W) W with power-iteration state

``import jaxlayers`` does not import this package, and importing this package does not import
optax: the factories import it when they build a transformation (``jaxlayers.registry`` walks
every submodule, and must stay free of training dependencies).
"""

from jaxlayers.optim import adam8bit, lines, lipschitz, lowrank_dct, sigma_reparam
from jaxlayers.optim.adam8bit import adam_8bit, scale_by_adam_8bit, state_nbytes
from jaxlayers.optim.lines import lines_apply, lines_merge, lines_scales
from jaxlayers.optim.lipschitz import spectral_norm_cap
from jaxlayers.optim.lowrank_dct import dct_adam, scale_by_dct_adam

__all__ = [
    "adam8bit",
    "lowrank_dct",
    "lines",
    "lipschitz",
    "sigma_reparam",
    "adam_8bit",
    "scale_by_adam_8bit",
    "state_nbytes",
    "dct_adam",
    "scale_by_dct_adam",
    "lines_apply",
    "lines_merge",
    "lines_scales",
    "spectral_norm_cap",
]

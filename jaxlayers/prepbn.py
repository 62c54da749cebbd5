"""PRepBN: progressive replacement of LayerNorm by a re-parameterisable BatchNorm.

From "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive
Re-parameterized Batch Normalization":

    RepBN(x)  = BN(x) + eta * x                                   eta: learnable scalar (init 1)
    PRepBN(x) = gamma(step) * LN(x) + (1 - gamma(step)) * RepBN(x)          in training
    PRepBN(x) = RepBN(x)  with BN's running statistics                       at eval

``gamma`` decays from 1 to 0 as training proceeds (the paper's linear schedule):

    gamma(step) = 1                                              step < warmup_steps
                = max(0, 1 - (step - warmup_steps) / decay_steps)  afterwards

so the network starts as a LayerNorm transformer and ends as a BatchNorm one. At eval the layer
is the per-channel affine map ``x * a + c`` (``a = scale_bn / sqrt(var + eps) + eta``,
``c = bias_bn - mean * scale_bn / sqrt(var + eps)``), which :func:`fold_into_dense` merges into
the Dense that follows it (the q/k/v or MLP-up projection of a pre-norm block), so inference
computes no normalisation statistics at all.

Shapes: ``x: [..., dim] -> [..., dim]`` (``[b, t, d]`` for sequences). BatchNorm statistics are
taken per channel over every other axis (batch and time together) — see :mod:`jaxlayers.norms`.
The LayerNorm branch is :func:`jaxlayers.norms.layer_norm` (or RMSNorm with ``norm="rms"``).

State: ``stats = {"mean": [dim], "var": [dim], "step": int32 []}`` (float32 running statistics
and the number of training calls so far; :func:`init_stats`). The layer is registered with
``stateful=True``: ``apply(params, x, cfg, stats=..., train=True)`` returns ``(y, new_stats)``
with ``new_stats["step"] = stats["step"] + 1``; ``step=`` overrides the schedule's step.

Params: ``{"norm": {"scale", "bias"}, "bn": {"scale", "bias"}, "eta": []}``.

Choices the paper leaves open, made here: ``gamma`` is evaluated at the step count *before*
the call; eval always uses the pure RepBN branch (the paper's inference graph, ``gamma = 0``),
even if training stopped before ``gamma`` reached 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlayers import core, norms

__all__ = [
    "Config",
    "param_specs",
    "init",
    "init_stats",
    "gamma",
    "apply",
    "eval_affine",
    "fold_into_dense",
]

NORMS = ("layer", "rms")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """PRepBN config.

    Attributes:
      dim: channels ``d``.
      norm: the branch being replaced, ``"layer"`` (LayerNorm, as in the paper) or ``"rms"``.
      warmup_steps: steps with ``gamma = 1`` (LayerNorm only) before the decay starts.
      decay_steps: length of the linear decay of ``gamma`` from 1 to 0.
      eps: epsilon of both norms.
      momentum: weight of the newest batch in BatchNorm's running statistics.
      eta_init: initial value of RepBN's learnable ``eta``.
    """

    dim: int
    norm: str = "layer"
    warmup_steps: int = 0
    decay_steps: int = 100_000
    eps: float = 1e-5
    momentum: float = 0.1
    eta_init: float = 1.0

    def __post_init__(self):
        core.check_choice(self.norm, NORMS, "norm")
        if self.dim <= 0:
            raise ValueError(f"dim must be positive; got dim={self.dim}")
        if self.decay_steps <= 0 or self.warmup_steps < 0:
            raise ValueError(
                "decay_steps must be positive and warmup_steps >= 0; got "
                f"decay_steps={self.decay_steps}, warmup_steps={self.warmup_steps}"
            )

    def bn_config(self) -> norms.BatchNormConfig:
        return norms.BatchNormConfig(
            dim=self.dim, eps=self.eps, momentum=self.momentum, dtype=self.dtype
        )

    def norm_config(self) -> norms.LayerNormConfig | norms.RMSNormConfig:
        if self.norm == "rms":
            return norms.RMSNormConfig(dim=self.dim, eps=self.eps, dtype=self.dtype)
        return norms.LayerNormConfig(dim=self.dim, eps=self.eps, dtype=self.dtype)


def param_specs(cfg: Config) -> dict:
    return {
        "norm": norms.param_specs(cfg.norm_config()),
        "bn": norms.batch_norm_param_specs(cfg.bn_config()),
        "eta": core.ParamSpec((), core.initializers.constant(cfg.eta_init), ()),
    }


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def init_stats(cfg: Config) -> dict[str, jax.Array]:
    """Running mean 0, variance 1, step 0."""
    stats = norms.init_batch_stats(cfg.bn_config())
    stats["step"] = jnp.zeros((), jnp.int32)
    return stats


def gamma(step: jax.Array | int, cfg: Config) -> jax.Array:
    """The LayerNorm weight at ``step`` (float32 scalar): 1 during warmup, then linear to 0."""
    s = jnp.asarray(step, jnp.float32)
    progress = (s - cfg.warmup_steps) / cfg.decay_steps
    return jnp.clip(1.0 - progress, 0.0, 1.0)


def eval_affine(
    params: core.Params, stats: dict[str, jax.Array], cfg: Config
) -> tuple[jax.Array, jax.Array]:
    """The eval-time layer as ``y = x * a + c`` (float32 ``a, c: [dim]``)."""
    a, c = norms.batch_norm_affine(params["bn"], stats, cfg.bn_config())
    return a + params["eta"].astype(jnp.float32), c


def apply(
    params: core.Params,
    x: jax.Array,
    cfg: Config,
    *,
    stats: dict[str, jax.Array] | None = None,
    train: bool = False,
    step: jax.Array | int | None = None,
):
    """PRepBN of ``x: [..., dim]``.

    Training (``train=True``): returns ``(y, new_stats)``; ``stats=None`` starts from
    :func:`init_stats`; ``step`` (default ``stats["step"]``) sets ``gamma``.
    Eval: returns ``y = RepBN(x)`` from the running statistics (``stats`` required).
    """
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., dim={cfg.dim}]); got shape ()")
    core.check_dim(x, -1, cfg.dim, "x", "dim")
    dtype = core.compute_dtype(cfg, x)
    eta = params["eta"].astype(dtype).astype(jnp.float32)
    if not train:
        if stats is None:
            raise ValueError(
                "stats must be the running statistics (from init_stats or training) when "
                "train=False; got None"
            )
        y = norms.batch_norm(params["bn"], x, cfg.bn_config(), stats=stats, train=False)
        return (y.astype(jnp.float32) + eta * x.astype(dtype).astype(jnp.float32)).astype(dtype)
    stats = init_stats(cfg) if stats is None else stats
    bn_y, bn_stats = norms.batch_norm(
        params["bn"],
        x,
        cfg.bn_config(),
        stats={"mean": stats["mean"], "var": stats["var"]},
        train=True,
    )
    x32 = x.astype(dtype).astype(jnp.float32)
    rep = bn_y.astype(jnp.float32) + eta * x32
    ln = norms.apply(params["norm"], x, cfg.norm_config()).astype(jnp.float32)
    g = gamma(stats["step"] if step is None else step, cfg)
    y = g * ln + (1.0 - g) * rep
    new_stats = dict(bn_stats, step=stats["step"] + 1)
    return y.astype(dtype), new_stats


def fold_into_dense(
    params: core.Params, stats: dict[str, jax.Array], cfg: Config, dense_params: core.Params
) -> core.Params:
    """Merge the eval-time PRepBN into the Dense that follows it.

    With ``PRepBN(x) = x * a + c`` and ``Dense(z) = z W + b``:
    ``Dense(PRepBN(x)) = x (diag(a) W) + (c W + b)``. Returns ``{"kernel", "bias"}`` in the
    Dense's param dtype (use it with ``dense.Config(..., use_bias=True)`` even when the original
    Dense had no bias). ``dense_params["kernel"]: [dim, d_out]``.
    """
    kernel = dense_params["kernel"]
    if kernel.ndim != 2 or kernel.shape[0] != cfg.dim:
        raise ValueError(
            f"dense_params['kernel'] must have shape (dim={cfg.dim}, d_out); got {kernel.shape}"
        )
    a, c = eval_affine(params, stats, cfg)
    k32 = kernel.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    bias = jnp.matmul(c, k32, precision=hi)
    if "bias" in dense_params:
        bias = bias + dense_params["bias"].astype(jnp.float32)
    return {"kernel": (a[:, None] * k32).astype(kernel.dtype), "bias": bias.astype(kernel.dtype)}


core.register_layer(
    "prepbn",
    Config,
    param_specs=param_specs,
    apply=apply,
    stateful=True,
    example=core.Example(
        config=Config(dim=16, decay_steps=10),
        input_shape=(2, 8, 16),
        apply_kwargs=(("train", True), ("step", 4)),
    ),
    kind="norm",
)

"""TTT-Linear: a recurrent layer whose hidden state is a linear model trained at test time.

From "Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (Sun et al.). Per
head, the hidden state is the weight ``W [k, k]`` of an inner model

    f(x; W) = x + LN(x W)          (``inner_residual`` and ``inner_layer_norm``; either can be off)

trained on a self-supervised reconstruction loss of each token's "training view" ``k_t`` towards
its "label view" ``v_t``:

    l_t(W) = 1/2 || f(k_t; W) - v_t ||^2,      k_t = x_t θ_K,  v_t = x_t θ_V,  q_t = x_t θ_Q.

Mini-batch gradient descent (mini-batch size ``b = mini_batch_size``): the sequence is cut into
mini-batches of ``b`` tokens; every gradient inside a mini-batch is taken at the mini-batch's
*starting* weight ``W_0'``, and the weight seen by token ``t`` sums the steps so far

    G_s = ∇_W l_s(W_0')                    (s in the current mini-batch, s <= t)
    W_t = W_0' - Σ_s η_s G_s,              z_t = f(q_t; W_t)                        [b, t, h, k]

and the next mini-batch starts from ``W`` after its last token. The output is ``y = z θ_O``.

**Dual form** (the paper's §2.6, ``implementation="dual"``): with ``Z = K W_0'`` and ``∂l/∂Z`` the
row gradients ``D [b, k]``, ``G_s = k_sᵀ D_s``, so for the whole mini-batch at once

    Z̄ = Q W_0' - (tril(Q Kᵀ) ⊙ η_row) D,    W_end = W_0' - (η ⊙ K)ᵀ D

(``tril`` keeps ``s <= t``; ``η_row[t, s] = η_s``); only matmuls, no per-token ``[k, k]`` weight.
**Primal form** (``implementation="primal"``): a ``lax.scan`` over mini-batches with an inner scan
over tokens that forms every ``G_s`` explicitly with ``jax.grad`` and updates ``W`` token by token
— the reference the dual form is tested against.

Learnable inner learning rate (the paper's ``η(x) = η_base σ(θ_lr · x)``), one per token and head:

    η_t = base_lr / k · sigmoid(x_t θ_lr + b_lr)                                       [b, t, h]

The ``1/k`` (head dim) keeps the step ``η ||k_t||^2`` of order ``base_lr`` for unit-variance keys
(the authors' code divides by the head dim too). Gradients within a mini-batch are *summed* as in
the paper's equations (no ``1/position`` averaging).

``LN`` is a per-head LayerNorm with learned scale ``γ`` and bias ``β`` (``[h, k]``), and ``W_0``
(the initial weight, ``[h, k, k]``) is learned in the outer loop, as in the paper. The loss gradient
through the LayerNorm is written out in closed form (the standard LayerNorm backward), so the
dual form needs no nested autodiff.

Special case: ``mini_batch_size=1`` is online gradient descent. With ``inner_layer_norm=False``
and ``inner_residual=False`` the loss is ``1/2 ||k_t W - v_t||^2`` whose gradient is
``k_tᵀ (k_t W - v_t)``, so ``W_t = (I - η_t k_t k_tᵀ) W_{t-1} + η_t k_t v_tᵀ`` and
``z_t = q_t W_t``: exactly the delta rule (DeltaNet) with ``β_t = η_t``, state ``S = W`` and
``scale = 1``. With the LayerNorm the gradient is not linear in ``W`` and there is no such
reduction. Larger mini-batches are *not* the delta rule either (all gradients of a mini-batch
use ``W_0'``).

Simplifications relative to the paper / the authors' code (documented choices):
  * no bias in the inner linear model (``f(x) = x + LN(x W)``);
  * no RoPE, no short convolution on q/k, no output gate and no post-norm around the layer — the
    layer is ``y = TTT(q, k, v) θ_O``; add those in the surrounding block if wanted;
  * ``q, k, v`` all have the head dim ``k = d_model / num_heads`` (the residual needs ``k = v``).

Compute: projections run in the compute dtype; the inner model (states, gradients, LayerNorm) in
float32; the result is cast back before ``θ_O``.

Params: ``"q"``, ``"k"``, ``"v"`` ``{"kernel": [d, h*k]}`` (axes ``("embed", "heads")``), ``"o"``
``{"kernel": [h*k, d]}``, ``"lr"`` ``{"kernel": [d, h], "bias": [h]}``, ``"inner"`` ``{"w": [h, k,
k]}`` plus, with ``inner_layer_norm``, ``"ln_scale"``/``"ln_bias"`` ``[h, k]``.

Decode state (float32 whatever ``dtype`` is asked, like the kernels' states). It stores the inner
weights *relative to the learned* ``W_0`` so that :func:`init_state` (which has no params) can
return zeros::

    {"dw_start": [b, h, k, k],  # W - W_0 at the start of the current mini-batch (gradients here)
     "dw":       [b, h, k, k],  # W - W_0 after the last token
     "pos":      int32 []}      # tokens already in the current mini-batch (0 .. b-1)

``apply(..., initial_state=...)`` may start in the middle of a mini-batch (``pos > 0``); mini-batch
boundaries stay at absolute positions, so prefill + step == apply for any split.
Not supported: ``segment_ids`` (raises ``NotImplementedError``: a reset inside a mini-batch would
need per-row mini-batch boundaries). ``positions`` is accepted and ignored (no positional
encoding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlayers import core, dense

__all__ = [
    "Config",
    "param_specs",
    "init",
    "apply",
    "init_state",
    "step",
    "project",
    "inner_loop",
]

IMPLEMENTATIONS = ("dual", "primal")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """TTT-Linear config.

    Attributes:
      d_model: model width ``d``.
      num_heads: heads ``h``; the head dim is ``k = d_model // num_heads``.
      mini_batch_size: inner-loop mini-batch ``b`` (16 in the paper); 1 = online GD.
      base_lr: ``η_base`` of the inner learning rate.
      inner_layer_norm: LayerNorm inside the inner model (the paper's choice).
      inner_residual: residual ``x + ...`` inside the inner model (the paper's choice).
      ln_eps: epsilon of the inner LayerNorm.
      implementation: "dual" (mini-batch matmuls) or "primal" (token scan with jax.grad).
    """

    d_model: int
    num_heads: int
    mini_batch_size: int = 16
    base_lr: float = 1.0
    inner_layer_norm: bool = True
    inner_residual: bool = True
    ln_eps: float = 1e-6
    implementation: str = "dual"

    def __post_init__(self):
        if self.num_heads <= 0:
            raise ValueError(f"num_heads must be positive; got num_heads={self.num_heads}")
        core.check_divisible(self.d_model, self.num_heads, "d_model", "num_heads")
        if self.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1; got {self.mini_batch_size}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be positive; got {self.base_lr}")
        core.check_choice(self.implementation, IMPLEMENTATIONS, "implementation")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _proj_cfgs(cfg: Config) -> dict[str, dense.Config]:
    common = dict(use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d, hk = cfg.d_model, cfg.d_model
    return {
        "q": dense.Config(d_in=d, d_out=hk, kernel_axes=("embed", "heads"), **common),
        "k": dense.Config(d_in=d, d_out=hk, kernel_axes=("embed", "heads"), **common),
        "v": dense.Config(d_in=d, d_out=hk, kernel_axes=("embed", "heads"), **common),
        "o": dense.Config(d_in=hk, d_out=d, kernel_axes=("heads", "embed"), **common),
    }


def _lr_cfg(cfg: Config) -> dense.Config:
    return dense.Config(
        d_in=cfg.d_model,
        d_out=cfg.num_heads,
        use_bias=True,
        kernel_axes=("embed", "heads"),
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )


def param_specs(cfg: Config) -> dict[str, dict[str, core.ParamSpec]]:
    h, k = cfg.num_heads, cfg.head_dim
    specs = {name: dense.param_specs(c) for name, c in _proj_cfgs(cfg).items()}
    specs["lr"] = dense.param_specs(_lr_cfg(cfg))
    inner = {"w": core.ParamSpec((h, k, k), core.initializers.normal(0.02), ("heads", None, None))}
    if cfg.inner_layer_norm:
        inner["ln_scale"] = core.ParamSpec((h, k), core.initializers.ones, ("heads", None))
        inner["ln_bias"] = core.ParamSpec((h, k), core.initializers.zeros, ("heads", None))
    specs["inner"] = inner
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def init_state(cfg: Config, batch: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """The state of a fresh sequence: ``W = W_0`` (zero offsets) at a mini-batch boundary.

    ``dtype`` is accepted for the contract; the state is float32."""
    del dtype
    h, k = cfg.num_heads, cfg.head_dim
    dw = jnp.zeros((batch, h, k, k), jnp.float32)
    return {"dw_start": dw, "dw": dw, "pos": jnp.zeros((), jnp.int32)}


# ------------------------------------------------------------------------------------------
# The inner model: forward, loss gradient w.r.t. its pre-norm activation
# ------------------------------------------------------------------------------------------


def _ln(z, scale, bias, eps):
    """Per-head LayerNorm of ``z [..., h, m, k]`` (or ``[..., h, k]``); returns (y, zhat, rstd)."""
    mu = jnp.mean(z, axis=-1, keepdims=True)
    zc = z - mu
    rstd = jax.lax.rsqrt(jnp.mean(zc * zc, axis=-1, keepdims=True) + eps)
    zhat = zc * rstd
    return zhat * scale + bias, zhat, rstd


def _norm_params(inner, cfg: Config, ndim: int):
    """``γ, β`` shaped ``[h, 1, k]`` (mini-batch layout, ndim=4) or ``[h, k]`` (token layout)."""
    if not cfg.inner_layer_norm:
        return None, None
    g = inner["ln_scale"].astype(jnp.float32)
    b = inner["ln_bias"].astype(jnp.float32)
    if ndim == 4:
        g, b = g[:, None, :], b[:, None, :]
    return g[None], b[None]


def _head(z, x, gamma, beta, cfg: Config):
    """The inner model's output from its pre-norm activation ``z = x W``."""
    out = _ln(z, gamma, beta, cfg.ln_eps)[0] if cfg.inner_layer_norm else z
    return x + out if cfg.inner_residual else out


def _grad_z(z, k, v, gamma, beta, cfg: Config):
    """``∂l/∂z`` of ``l = 1/2 ||f(k) - v||^2`` at ``z = k W`` (closed form)."""
    target = v - k if cfg.inner_residual else v
    if not cfg.inner_layer_norm:
        return z - target
    y, zhat, rstd = _ln(z, gamma, beta, cfg.ln_eps)
    gx = (y - target) * gamma
    mean_g = jnp.mean(gx, axis=-1, keepdims=True)
    mean_gz = jnp.mean(gx * zhat, axis=-1, keepdims=True)
    return (gx - mean_g - zhat * mean_gz) * rstd


def _inner_loss(w, k, v, gamma, beta, cfg: Config):
    """``Σ_{b,h} l(W_bh)``, one token per (batch, head): ``k, v [b, h, k]``, ``w [b, h, k, k]``."""
    f = _head(jnp.einsum("bhi,bhij->bhj", k, w), k, gamma, beta, cfg)
    return 0.5 * jnp.sum(jnp.square(f - v))


# ------------------------------------------------------------------------------------------
# One mini-batch: dual and primal forms. Layout [b, h, m, k]; eta [b, h, m].
# carry (w_grad, w_out): gradients are taken at w_grad, outputs start from w_out.
# ------------------------------------------------------------------------------------------


def _mini_batch_dual(w_grad, w_out, q, k, v, eta, inner, cfg: Config):
    gamma, beta = _norm_params(inner, cfg, 4)
    m = q.shape[2]
    dz = _grad_z(jnp.einsum("bhmi,bhij->bhmj", k, w_grad), k, v, gamma, beta, cfg)
    causal = jnp.tril(jnp.ones((m, m), bool))
    attn = jnp.einsum("bhti,bhsi->bhts", q, k) * eta[:, :, None, :]
    attn = jnp.where(causal[None, None], attn, 0.0)
    zbar = jnp.einsum("bhti,bhij->bhtj", q, w_out) - jnp.einsum("bhts,bhsj->bhtj", attn, dz)
    w_end = w_out - jnp.einsum("bhsi,bhs,bhsj->bhij", k, eta, dz)
    return _head(zbar, q, gamma, beta, cfg), w_end


def _mini_batch_primal(w_grad, w_out, q, k, v, eta, inner, cfg: Config):
    gamma, beta = _norm_params(inner, cfg, 3)
    grad_fn = jax.grad(_inner_loss)

    def token(w, xs):
        q_t, k_t, v_t, eta_t = xs
        w = w - eta_t[:, :, None, None] * grad_fn(w_grad, k_t, v_t, gamma, beta, cfg)
        z_t = _head(jnp.einsum("bhi,bhij->bhj", q_t, w), q_t, gamma, beta, cfg)
        return w, z_t

    xs = tuple(jnp.moveaxis(a, 2, 0) for a in (q, k, v, eta))
    w_end, z = jax.lax.scan(token, w_out, xs)
    return jnp.moveaxis(z, 0, 2), w_end


def inner_loop(q, k, v, eta, inner, cfg: Config, *, initial_state=None):
    """Run the TTT inner loop over a sequence (no projections).

    Args:
      q, k, v: ``[b, t, h, k]`` test / training / label views (cast to float32).
      eta: ``[b, t, h]`` inner learning rates.
      inner: the ``"inner"`` params (``w [h, k, k]``, optional ``ln_scale``/``ln_bias``).
      initial_state: ``{"dw_start", "dw", "pos"}`` (see the module docstring) or None (start
        from ``W_0`` at a mini-batch boundary).
    Returns:
      ``(z [b, t, h, k] float32, state)``.
    """
    q, k, v, eta = (jnp.asarray(a, jnp.float32) for a in (q, k, v, eta))
    b, t, h, dk = q.shape
    mb = cfg.mini_batch_size
    w0 = jnp.broadcast_to(inner["w"].astype(jnp.float32)[None], (b, h, dk, dk))
    if initial_state is None:
        w_start, w, pos0 = w0, w0, 0
        t_pad = -(-t // mb) * mb
    else:
        w_start = w0 + initial_state["dw_start"].astype(jnp.float32)
        w = w0 + initial_state["dw"].astype(jnp.float32)
        pos0 = initial_state["pos"].astype(jnp.int32)
        t_pad = -(-(t + mb - 1) // mb) * mb
    n = t_pad // mb

    def place(a):
        buf = jnp.zeros((b, t_pad) + a.shape[2:], a.dtype)
        start = (0, pos0) + (0,) * (a.ndim - 2)
        buf = jax.lax.dynamic_update_slice(buf, a, start)
        # [b, n, mb, h, ...] -> [n, b, h, mb, ...]
        buf = buf.reshape((b, n, mb) + a.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(buf, 1, 0), 2, 3)

    xs = tuple(place(a) for a in (q, k, v, eta))
    block = _mini_batch_dual if cfg.implementation == "dual" else _mini_batch_primal
    end = pos0 + t

    def body(carry, inp):
        w_grad, w_out = carry
        i, qi, ki, vi, ei = inp
        z, w_end = block(w_grad, w_out, qi, ki, vi, ei, inner, cfg)
        closes = (i + 1) * mb <= end  # the mini-batch's last slot holds a real token
        return (jnp.where(closes, w_end, w_grad), w_end), z

    (w_start, w), z = jax.lax.scan(body, (w_start, w), (jnp.arange(n),) + xs)
    z = jnp.moveaxis(z, 0, 1)  # [b, n, h, mb, k]
    z = jnp.moveaxis(z, 3, 2).reshape(b, t_pad, h, dk)
    z = jax.lax.dynamic_slice(z, (0, pos0, 0, 0), (b, t, h, dk))
    state = {"dw_start": w_start - w0, "dw": w - w0, "pos": jnp.asarray(end % mb, jnp.int32)}
    return z, state


# ------------------------------------------------------------------------------------------
# apply / step
# ------------------------------------------------------------------------------------------


def project(params: core.Params, x: jax.Array, cfg: Config):
    """``q, k, v [..., h, k]`` (compute dtype) and ``η [..., h]`` (float32) from ``x [..., d]``."""
    pc = _proj_cfgs(cfg)
    lead = x.shape[:-1]
    h, dk = cfg.num_heads, cfg.head_dim
    q, k, v = (dense.apply(params[n], x, pc[n]).reshape(lead + (h, dk)) for n in ("q", "k", "v"))
    logits = dense.apply(params["lr"], x, _lr_cfg(cfg)).astype(jnp.float32)
    eta = (cfg.base_lr / cfg.head_dim) * jax.nn.sigmoid(logits)
    return q, k, v, eta


def _check_x(x, cfg: Config, name: str, rank: int, layout: str):
    core.check_floating(x, name)
    core.check_rank(x, rank, name, layout)
    core.check_dim(x, -1, cfg.d_model, name, "d_model")


def _check_state(state, cfg: Config, batch: int):
    want = (batch, cfg.num_heads, cfg.head_dim, cfg.head_dim)
    if not isinstance(state, dict) or set(state) != {"dw_start", "dw", "pos"}:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            "state must be a dict with keys ['dw', 'dw_start', 'pos'] (from init_state or "
            f"apply(..., return_state=True)); got {got}"
        )
    for name in ("dw_start", "dw"):
        if tuple(state[name].shape) != want:
            raise ValueError(
                f"state['{name}'] must have shape [batch, heads, head_dim, head_dim] = "
                f"{want}; got {tuple(state[name].shape)}"
            )


def apply(
    params: core.Params,
    x: jax.Array,
    cfg: Config,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    initial_state: dict[str, jax.Array] | None = None,
    return_state: bool = False,
):
    """TTT-Linear over ``x: [b, t, d_model]`` -> ``[b, t, d_model]`` (and the state).

    ``positions`` is ignored; ``segment_ids`` raises ``NotImplementedError``.
    """
    del positions
    _check_x(x, cfg, "x", 3, "[batch, time, d_model]")
    if segment_ids is not None:
        raise NotImplementedError(
            "ttt_linear does not support segment_ids (packed sequences); expected "
            "segment_ids=None (split the batch into one sequence per row instead)"
        )
    b, t, _ = x.shape
    if initial_state is not None:
        _check_state(initial_state, cfg, b)
    dtype = core.compute_dtype(cfg, x)
    x = x.astype(dtype)
    q, k, v, eta = project(params, x, cfg)
    inner = core.cast_floating(params["inner"], jnp.float32)
    z, state = inner_loop(q, k, v, eta, inner, cfg, initial_state=initial_state)
    y = dense.apply(params["o"], z.astype(dtype).reshape(b, t, cfg.d_model), _proj_cfgs(cfg)["o"])
    return (y, state) if return_state else y


def step(params: core.Params, state: dict[str, jax.Array], x_t: jax.Array, cfg: Config):
    """One token: ``x_t [b, d_model]`` -> ``(y_t [b, d_model], state)`` (the primal update)."""
    _check_x(x_t, cfg, "x_t", 2, "[batch, d_model]")
    _check_state(state, cfg, x_t.shape[0])
    dtype = core.compute_dtype(cfg, x_t)
    x_t = x_t.astype(dtype)
    q, k, v, eta = project(params, x_t, cfg)
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    inner = core.cast_floating(params["inner"], jnp.float32)
    gamma, beta = _norm_params(inner, cfg, 3)
    w0 = inner["w"][None]
    dw_start, dw = state["dw_start"].astype(jnp.float32), state["dw"].astype(jnp.float32)
    dz = _grad_z(jnp.einsum("bhi,bhij->bhj", k, w0 + dw_start), k, v, gamma, beta, cfg)
    dw = dw - jnp.einsum("bhi,bh,bhj->bhij", k, eta, dz)
    z = _head(jnp.einsum("bhi,bhij->bhj", q, w0 + dw), q, gamma, beta, cfg)
    pos = state["pos"] + 1
    closes = pos == cfg.mini_batch_size
    new_state = {
        "dw_start": jnp.where(closes, dw, dw_start),
        "dw": dw,
        "pos": jnp.where(closes, 0, pos).astype(jnp.int32),
    }
    y = dense.apply(params["o"], z.astype(dtype).reshape(x_t.shape), _proj_cfgs(cfg)["o"])
    return y, new_state


core.register_layer(
    "ttt_linear",
    Config,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    example=core.Example(
        config=Config(d_model=16, num_heads=2, mini_batch_size=4), input_shape=(2, 10, 16)
    ),
    kind="mixer",
)

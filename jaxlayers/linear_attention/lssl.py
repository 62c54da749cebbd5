"""LSSL: the linear state-space layer with a HiPPO-LegS state matrix.

From "Combining Recurrent, Convolutional, and Continuous-time Models with Linear State-Space
Layers" (Gu et al.). Every one of the ``d`` channels ``u`` of the input runs its own
continuous-time linear system with an ``N``-dimensional state

    x'(τ) = A x(τ) + B u(τ),      y(τ) = C x(τ) + D u(τ)

with the fixed HiPPO-LegS matrices ("HiPPO: Recurrent Memory with Optimal Polynomial
Projections")

    A_nm = -sqrt(2n+1) sqrt(2m+1)  (n > m),   -(n+1)  (n = m),   0  (n < m);   B_n = sqrt(2n+1)

and learned ``C [d, N]``, ``D [d]`` and step ``Δt [d]`` (one per channel, ``Δt = exp(log_dt)``,
initialised log-uniform in ``[dt_min, dt_max]``). The bilinear (Tustin, the paper's GBT with
``α = 1/2``) discretisation gives

    Ā = (I - Δt/2 A)^-1 (I + Δt/2 A),   B̄ = (I - Δt/2 A)^-1 Δt B          [d, N, N], [d, N]

and the two equivalent views of the layer:

  * recurrent (``mode="recurrent"``): ``x_t = Ā x_{t-1} + B̄ u_t``, ``y_t = C x_t + D u_t``
    (a ``lax.scan``);
  * convolutional (``mode="conv"``, the default): ``y = K * u + D u`` with the kernel
    ``K_l = C Ā^l B̄`` (``l = 0 .. T-1``) computed from powers of ``Ā``: the Krylov vectors
    ``Ā^i B̄`` of one block of 256 lags are built by doubling (``[V, Ā^m V]``, ``m = 1, 2, 4,
    ...``: ``log2`` batched matmuls) and a scan over lag blocks multiplies them by
    ``Ā^(256 j)`` (memory ``O(d N 256)``, not ``O(d N T)``); the causal convolution is an FFT
    of length ``>= 2T``. An incoming state adds ``C Ā^(t+1) x_0`` (the left Krylov rows
    ``C Ā^l``, built the same way); the final state is ``Ā^T x_0 + Σ_s Ā^(T-1-s) B̄ u_s``.

The layer output is ``(y) θ_O + b_O`` (a position-wise linear map mixing the channels; the
paper's LSSL stacks add their non-linearities and copies ``M`` outside the SSM — here ``M = 1``).
A and B are fixed (the paper's main "LSSL-fixed"); only ``Δt``, ``C``, ``D`` and ``θ_O`` learn.
The SSM runs in float32 whatever the compute dtype.

Params: ``"ssm"`` ``{"log_dt": [d], "c": [d, N], "d": [d]}`` and ``"o"`` ``{"kernel": [d, d],
"bias": [d]}``.

Decode state: ``{"x": [b, d, N]}`` float32. ``step`` re-discretises (``O(d N^3)`` per call, a
batched triangular solve); :func:`discretize` is public for callers that want to cache ``Ā, B̄``.

``segment_ids`` (state reset where the id changes) works with ``mode="recurrent"`` only; the
FFT convolution cannot reset and raises ``NotImplementedError``. ``positions`` is ignored.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayers import core, dense

__all__ = [
    "Config",
    "param_specs",
    "init",
    "apply",
    "init_state",
    "step",
    "hippo_legs",
    "discretize",
    "conv_kernel",
]

MODES = ("conv", "recurrent")
# Lags per block when building the convolution kernel (bounds the Krylov memory to d·N·_BLOCK).
_BLOCK = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """LSSL config.

    Attributes:
      d_model: channels ``d`` (each runs its own SSM).
      state_size: ``N``, the HiPPO order.
      dt_min, dt_max: range of the log-uniform initial ``Δt``.
      mode: "conv" (FFT convolution) or "recurrent" (scan).
    """

    d_model: int
    state_size: int = 64
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    mode: str = "conv"

    def __post_init__(self):
        if self.d_model <= 0:
            raise ValueError(f"d_model must be positive; got {self.d_model}")
        if self.state_size <= 0:
            raise ValueError(f"state_size must be positive; got {self.state_size}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; got {self.dt_min}, "
                f"{self.dt_max}"
            )
        core.check_choice(self.mode, MODES, "mode")


def hippo_legs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The HiPPO-LegS ``(A [n, n], B [n])`` in float64 (see the module docstring)."""
    r = np.sqrt(2.0 * np.arange(n) + 1.0)
    a = -np.tril(np.outer(r, r), -1) - np.diag(np.arange(n) + 1.0)
    return a, r.copy()


def _log_dt_init(dt_min: float, dt_max: float):
    return core.initializers.uniform_range(math.log(dt_min), math.log(dt_max))


def _out_cfg(cfg: Config) -> dense.Config:
    return dense.Config(
        d_in=cfg.d_model,
        d_out=cfg.d_model,
        kernel_axes=(None, "embed"),
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )


def param_specs(cfg: Config) -> dict[str, dict[str, core.ParamSpec]]:
    d, n = cfg.d_model, cfg.state_size
    ssm = {
        "log_dt": core.ParamSpec((d,), _log_dt_init(cfg.dt_min, cfg.dt_max), ("embed",)),
        # Unit variance per output: C x sums N state entries of roughly unit size.
        "c": core.ParamSpec((d, n), core.initializers.normal(n**-0.5), ("embed", None)),
        "d": core.ParamSpec((d,), core.initializers.ones, ("embed",)),
    }
    return {"ssm": ssm, "o": dense.param_specs(_out_cfg(cfg))}


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def init_state(cfg: Config, batch: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Zero SSM state ``{"x": [batch, d, N]}`` (float32; ``dtype`` is accepted for the contract)."""
    del dtype
    return {"x": jnp.zeros((batch, cfg.d_model, cfg.state_size), jnp.float32)}


# ------------------------------------------------------------------------------------------
# Discretisation and the convolution kernel
# ------------------------------------------------------------------------------------------


def discretize(ssm: core.Params, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Bilinear ``(Ā [d, N, N], B̄ [d, N])`` (float32) from the ``"ssm"`` params."""
    a, b = hippo_legs(cfg.state_size)
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    dt = jnp.exp(ssm["log_dt"].astype(jnp.float32))[:, None, None]  # [d, 1, 1]
    eye = jnp.eye(cfg.state_size, dtype=jnp.float32)[None]
    lhs = eye - 0.5 * dt * a[None]
    rhs = jnp.concatenate([eye + 0.5 * dt * a[None], dt * b[None, :, None]], axis=-1)
    # lhs is lower triangular (A is), so a triangular solve is exact and needs no LU. It also
    # avoids an intermittent hang measured with jax/jaxlib 0.10.2 on CPU when one jitted program
    # holds two batched ``jnp.linalg.solve`` calls (two lssl layers in one LM step).
    sol = jax.lax.linalg.triangular_solve(lhs, rhs, left_side=True, lower=True)  # [d, N, N + 1]
    return sol[..., :-1], sol[..., -1]


def _krylov(a_bar, vec, length: int):
    """``[d, N, length]`` with column ``l`` = ``Ā^l vec`` (doubling: log2(length) matmuls)."""
    v = vec[..., None]
    p = a_bar
    while v.shape[-1] < length:
        v = jnp.concatenate([v, jnp.einsum("dnm,dml->dnl", p, v)], axis=-1)
        p = jnp.einsum("dnm,dmk->dnk", p, p)
    return v[..., :length]


def _left_krylov(a_bar, row, length: int):
    """``[d, length, N]`` with row ``l`` = ``row Ā^(l+1)`` (doubling)."""
    w = jnp.einsum("dn,dnm->dm", row, a_bar)[:, None, :]
    p = a_bar
    while w.shape[1] < length:
        w = jnp.concatenate([w, jnp.einsum("dln,dnm->dlm", w, p)], axis=1)
        p = jnp.einsum("dnm,dmk->dnk", p, p)
    return w[:, :length]


def _conv_terms(a_bar, b_bar, c, length: int, u=None, x0=None):
    """The convolution kernel and, optionally, the state terms, in blocks of ``_BLOCK`` lags.

    Lag block ``j`` uses ``P_j = Ā^(j·blk)``: kernel ``K_(j·blk+i) = C P_j Ā^i B̄``; with ``u``
    (``[b, t, d]``) the input part of the final state ``Σ_l Ā^l B̄ u_(t-1-l)``; with ``x0``
    (``[b, d, N]``) the output part of the incoming state ``C Ā^(l+1) x0``. Memory is
    ``O(d N blk)`` instead of ``O(d N t)``. Returns ``(K [d, t], x_in [b, d, N] | None,
    y0 [b, t, d] | None)``.
    """
    blk = min(length, _BLOCK)
    n = -(-length // blk)
    v_blk = _krylov(a_bar, b_bar, blk)  # [d, N, blk]
    a_blk = jnp.linalg.matrix_power(a_bar, blk)
    d, big_n = b_bar.shape
    xs = jnp.zeros((n, 0), jnp.float32)
    if u is not None:
        b = u.shape[0]
        u_rev = jnp.pad(u[:, ::-1], [(0, 0), (0, n * blk - length), (0, 0)])
        xs = jnp.moveaxis(u_rev.reshape(b, n, blk, d), 1, 0)  # [n, b, blk, d]

    def body(carry, u_r):
        p, x_in = carry
        v = jnp.einsum("dnm,dmi->dni", p, v_blk)
        k_blk = jnp.einsum("dn,dni->di", c, v)
        if u is not None:
            x_in = x_in + jnp.einsum("dni,bid->bdn", v, u_r)
        y0 = None
        if x0 is not None:
            rows = _left_krylov(a_bar, jnp.einsum("dn,dnm->dm", c, p), blk)  # [d, blk, N]
            y0 = jnp.einsum("din,bdn->bid", rows, x0)
        return (jnp.einsum("dnm,dmk->dnk", p, a_blk), x_in), (k_blk, y0)

    eye = jnp.broadcast_to(jnp.eye(big_n, dtype=jnp.float32)[None], a_bar.shape)
    x_in = jnp.zeros((u.shape[0], d, big_n), jnp.float32) if u is not None else None
    (_, x_in), (k_blocks, y0) = jax.lax.scan(body, (eye, x_in), xs)
    kernel = jnp.moveaxis(k_blocks, 0, 1).reshape(d, n * blk)[:, :length]
    if y0 is not None:
        y0 = jnp.moveaxis(y0, 0, 1).reshape(y0.shape[1], n * blk, d)[:, :length]
    return kernel, x_in, y0


def conv_kernel(ssm: core.Params, cfg: Config, length: int) -> jax.Array:
    """The SSM convolution kernel ``K [d, length]``, ``K_l = C Ā^l B̄`` (float32)."""
    a_bar, b_bar = discretize(ssm, cfg)
    return _conv_terms(a_bar, b_bar, ssm["c"].astype(jnp.float32), length)[0]


def _causal_conv(u, kernel):
    """``y_t = Σ_{s<=t} K_{t-s} u_s`` by FFT: ``u [b, t, d]``, ``kernel [d, t]``."""
    t = u.shape[1]
    nfft = 1 << (2 * t - 1).bit_length()
    uf = jnp.fft.rfft(u, n=nfft, axis=1)
    kf = jnp.fft.rfft(kernel.T, n=nfft, axis=0)[None]
    return jnp.fft.irfft(uf * kf, n=nfft, axis=1)[:, :t]


def _ssm_conv(ssm, u, cfg: Config, x0, want_state: bool):
    t = u.shape[1]
    a_bar, b_bar = discretize(ssm, cfg)
    c = ssm["c"].astype(jnp.float32)
    kernel, x_t, y0 = _conv_terms(a_bar, b_bar, c, t, u if want_state else None, x0)
    y = _causal_conv(u, kernel)
    if y0 is not None:
        y = y + y0
    if want_state and x0 is not None:
        x_t = x_t + jnp.einsum("dnm,bdm->bdn", jnp.linalg.matrix_power(a_bar, t), x0)
    return y, x_t


def _ssm_scan(ssm, u, cfg: Config, x0, seg):
    b, t, d = u.shape
    a_bar, b_bar = discretize(ssm, cfg)
    c = ssm["c"].astype(jnp.float32)
    x = jnp.zeros((b, d, cfg.state_size), jnp.float32) if x0 is None else x0
    reset = jnp.zeros((t, b), bool)
    if seg is not None:
        reset = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], 1).T

    def body(x, inp):
        u_t, r_t = inp
        x = jnp.where(r_t[:, None, None], 0.0, x)
        x = jnp.einsum("dnm,bdm->bdn", a_bar, x) + b_bar[None] * u_t[:, :, None]
        return x, jnp.einsum("bdn,dn->bd", x, c)

    x, y = jax.lax.scan(body, x, (jnp.moveaxis(u, 1, 0), reset))
    return jnp.moveaxis(y, 0, 1), x


# ------------------------------------------------------------------------------------------
# apply / step
# ------------------------------------------------------------------------------------------


def _check_x(x, cfg: Config, name: str, rank: int, layout: str):
    core.check_floating(x, name)
    core.check_rank(x, rank, name, layout)
    core.check_dim(x, -1, cfg.d_model, name, "d_model")


def _check_state(state, cfg: Config, batch: int):
    if not isinstance(state, dict) or set(state) != {"x"}:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            "state must be a dict with keys ['x'] (from init_state or apply(..., "
            f"return_state=True)); got {got}"
        )
    want = (batch, cfg.d_model, cfg.state_size)
    if tuple(state["x"].shape) != want:
        raise ValueError(
            f"state['x'] must have shape [batch, d_model, state_size] = {want}; "
            f"got {tuple(state['x'].shape)}"
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
    """LSSL over ``x: [b, t, d_model]`` -> ``[b, t, d_model]`` (and the state)."""
    del positions
    _check_x(x, cfg, "x", 3, "[batch, time, d_model]")
    b, t, _ = x.shape
    if segment_ids is not None:
        if cfg.mode == "conv":
            raise NotImplementedError(
                "lssl mode='conv' does not support segment_ids (an FFT convolution cannot reset "
                "its state); expected segment_ids=None or mode='recurrent'"
            )
        if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise TypeError(
                f"segment_ids must have an integer dtype (int32); got {segment_ids.dtype}"
            )
        if tuple(segment_ids.shape) != (b, t):
            raise ValueError(
                f"segment_ids must have shape (batch, time) = {(b, t)}; got {segment_ids.shape}"
            )
    x0 = None
    if initial_state is not None:
        _check_state(initial_state, cfg, b)
        x0 = initial_state["x"].astype(jnp.float32)
    dtype = core.compute_dtype(cfg, x)
    ssm = params["ssm"]
    u = x.astype(dtype).astype(jnp.float32)
    if cfg.mode == "conv":
        y, x_t = _ssm_conv(ssm, u, cfg, x0, return_state)
    else:
        y, x_t = _ssm_scan(ssm, u, cfg, x0, segment_ids)
    y = y + ssm["d"].astype(jnp.float32)[None, None] * u
    out = dense.apply(params["o"], y.astype(dtype), _out_cfg(cfg))
    return (out, {"x": x_t}) if return_state else out


def step(params: core.Params, state: dict[str, jax.Array], x_t: jax.Array, cfg: Config):
    """One token: ``x_t [b, d_model]`` -> ``(y_t [b, d_model], state)``."""
    _check_x(x_t, cfg, "x_t", 2, "[batch, d_model]")
    _check_state(state, cfg, x_t.shape[0])
    dtype = core.compute_dtype(cfg, x_t)
    ssm = params["ssm"]
    a_bar, b_bar = discretize(ssm, cfg)
    u = x_t.astype(dtype).astype(jnp.float32)
    x = state["x"].astype(jnp.float32)
    x = jnp.einsum("dnm,bdm->bdn", a_bar, x) + b_bar[None] * u[:, :, None]
    y = jnp.einsum("bdn,dn->bd", x, ssm["c"].astype(jnp.float32))
    y = y + ssm["d"].astype(jnp.float32)[None] * u
    return dense.apply(params["o"], y.astype(dtype), _out_cfg(cfg)), {"x": x}


core.register_layer(
    "lssl",
    Config,
    param_specs=param_specs,
    apply=apply,
    init_state=init_state,
    step=step,
    example=core.Example(config=Config(d_model=8, state_size=8), input_shape=(2, 12, 8)),
    kind="mixer",
)

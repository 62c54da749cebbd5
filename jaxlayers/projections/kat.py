"""Rational activations: Group-Rational KAN (KAT) and the Padé activation unit (PAU).

A rational function of degrees ``(m, n)``::

    F(x) = P(x) / Q(x),   P(x) = a_0 + a_1 x + ... + a_m x^m
    Q(x) = 1 + |b_1 x + b_2 x^2 + ... + b_n x^n|          denominator="abs_sum"  (KAT)
    Q(x) = 1 + |b_1| |x| + |b_2| |x|^2 + ... + |b_n| |x|^n  denominator="sum_abs"  (safe PAU)

Both keep ``Q >= 1``, so ``F`` has no poles.

**Group-Rational KAN** ("Kolmogorov-Arnold Transformer") replaces the per-edge learnable
functions of a KAN layer by one rational function per *group* of input channels, followed by a
linear map::

    GR-KAN(x) = F_g(x) W + b       x: [..., i], channel c uses group g = c // (i / G)

so ``y_o = sum_c w_co F_{g(c)}(x_c) + b_o`` (a KAN layer whose edge functions are
``w_co F_g``). Params: ``"numerator" [G, m+1]``, ``"denominator" [G, n]``, ``"kernel" [i, o]``
(axes ``("embed", "mlp")``), ``"bias" [o]``. Both coefficient sets are per group, as the paper
describes; KAT's released code shares one numerator across groups (per-group denominators
only) -- tie the rows of ``"numerator"`` to reproduce that.

**Padé activation unit** ("Padé Activation Units: End-to-end Learning of Flexible Activation
Functions in Deep Networks") is one learnable rational ``F`` applied elementwise
(``"numerator" [m+1]``, ``"denominator" [n]``); its "safe PAU" denominator sums absolute
values term by term ("sum_abs", the default of :class:`PadeConfig`; we read the paper's safe
form this way, the KAT form is one flag away).

Initialisation (both layers): ``init="identity"`` starts at ``F(x) = x`` exactly
(``a_1 = 1``, all else 0); ``init="gelu"`` / ``"silu"`` start at a least-squares fit of that
activation. The fits are constants computed once with :func:`fit_rational` (2001 uniform points
on ``[-4, 4]``, Levenberg-Marquardt from the linearised least-squares solution; KAT's released
fits use ``[-3, 3]``) and stored in :data:`FITTED` for ``(m, n) = (5, 4)``; other degrees are
fitted on first use (cached). Max error of the stored GELU fit: 1.4e-3 on ``[-3, 3]``, 2.5e-3 on
``[-4, 4]`` ("abs_sum"); 3.0e-3 / 3.4e-3 ("sum_abs"); SiLU fits are within 1.3e-5. Outside the
fit range a ``(5, 4)`` rational grows linearly with one slope ``a_5 / |b_4|`` in both tails, so
it cannot follow GELU far out; inputs are expected to be normalised.

Variance-preserving init (KAT): with ``x ~ N(0, 1)`` and ``W`` i.i.d. with variance
``gain / i``, ``Var[y] = i Var[w] E[F(x)^2]``; choosing ``gain = 1 / E[F(x)^2]`` keeps unit
variance. ``E[F(x)^2]`` is computed for the initial coefficients by 96-point Gauss-Hermite
quadrature (``gain = 1`` for identity, ~2.35 for the GELU fit). The bias starts at 0.

The rational is evaluated in float32 (``x^5`` in bf16 loses too much) and cast back to the
compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlayers import core

__all__ = [
    "Config",
    "PadeConfig",
    "param_specs",
    "pade_param_specs",
    "init",
    "apply",
    "pade_apply",
    "rational",
    "fit_rational",
    "initial_coefficients",
    "variance_gain",
    "FITTED",
    "DENOMINATORS",
    "INITS",
]

DENOMINATORS = ("abs_sum", "sum_abs")
INITS = ("identity", "gelu", "silu")
_HI = lax.Precision.HIGHEST

# Least-squares fits (see the module docstring) for degrees (5, 4):
# (denominator, activation) -> ((a_0, ..., a_5), (b_1, ..., b_4)). Regenerate with fit_rational.
FITTED: dict[tuple[str, str], tuple[tuple[float, ...], tuple[float, ...]]] = {
    ("abs_sum", "gelu"): (
        (
            -1.3554327367e-03,
            4.9999999978e-01,
            4.0836670584e-01,
            1.0132037531e-01,
            4.3051030581e-03,
            -8.3881290165e-04,
        ),
        (3.0599184627e-08, 2.0264072488e-01, 7.2150991449e-09, -1.6776264777e-03),
    ),
    ("abs_sum", "silu"): (
        (
            3.4747407873e-06,
            4.9999999998e-01,
            2.4998150036e-01,
            5.3009877077e-02,
            5.6867822329e-03,
            2.6025220052e-04,
        ),
        (-1.3685914962e-08, 1.0601976095e-01, -1.2848876849e-09, 5.2050449213e-04),
    ),
    ("sum_abs", "gelu"): (
        (
            -1.3055684603e-03,
            5.0334382061e-01,
            4.1257249895e-01,
            1.1130190942e-01,
            9.8956002965e-03,
            1.1462314362e-05,
        ),
        (9.6678006754e-03, 2.1834822143e-01, -6.5801211700e-04, -1.4226499094e-10),
    ),
    ("sum_abs", "silu"): (
        (
            3.1384894228e-06,
            5.0000866733e-01,
            2.4998670677e-01,
            5.3014253797e-02,
            5.6882298105e-03,
            2.6040441242e-04,
        ),
        (3.6333607568e-05, 1.0600344943e-01, 7.0206718542e-06, 5.2011822869e-04),
    ),
}


def _np_activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    from scipy.special import erf, expit

    if name == "gelu":
        return lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    if name == "silu":
        return lambda x: x * expit(x)
    raise ValueError(f"init must be one of {INITS}; got {name!r}")


def _np_rational(theta: np.ndarray, x: np.ndarray, m: int, n: int, denominator: str):
    a, b = theta[: m + 1], theta[m + 1 :]
    p = np.polyval(a[::-1], x)
    if denominator == "abs_sum":
        q = 1.0 + np.abs(x * np.polyval(b[::-1], x))
    else:
        q = 1.0 + sum(abs(b[k]) * np.abs(x) ** (k + 1) for k in range(n))
    return p / q


def fit_rational(
    target: str | Callable[[np.ndarray], np.ndarray],
    num_degree: int = 5,
    den_degree: int = 4,
    denominator: str = "abs_sum",
    x_max: float = 4.0,
    points: int = 2001,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit of ``P/Q`` to ``target`` on ``points`` uniform samples of
    ``[-x_max, x_max]``; returns float64 ``(a [m+1], b [n])``.

    Starts from the linearised problem ``P(x) - y (Q(x) - 1) = y`` (solved by ``lstsq``) and
    refines with Levenberg-Marquardt (``scipy.optimize.least_squares``; scipy ships with jax).
    """
    from scipy.optimize import least_squares

    core.check_choice(denominator, DENOMINATORS, "denominator")
    fn = _np_activation(target) if isinstance(target, str) else target
    m, n = num_degree, den_degree
    x = np.linspace(-x_max, x_max, points)
    y = fn(x)
    basis = np.abs(x) if denominator == "sum_abs" else x
    design = np.stack([x**j for j in range(m + 1)] + [-y * basis**k for k in range(1, n + 1)], 1)
    theta0 = np.linalg.lstsq(design, y, rcond=None)[0]
    fit = least_squares(
        lambda t: _np_rational(t, x, m, n, denominator) - y,
        theta0,
        method="lm",
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=20000,
    )
    return fit.x[: m + 1], fit.x[m + 1 :]


@functools.cache
def initial_coefficients(
    init: str, num_degree: int, den_degree: int, denominator: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(a, b)`` that make ``F`` start at ``init`` (identity exactly, else the stored fit)."""
    core.check_choice(init, INITS, "init")
    m, n = num_degree, den_degree
    if init == "identity":
        return (0.0, 1.0) + (0.0,) * (m - 1), (0.0,) * n
    if (m, n) == (5, 4):
        return FITTED[(denominator, init)]
    a, b = fit_rational(init, m, n, denominator)
    return tuple(float(v) for v in a), tuple(float(v) for v in b)


@functools.cache
def variance_gain(init: str, num_degree: int, den_degree: int, denominator: str) -> float:
    """``1 / E[F(x)^2]`` for ``x ~ N(0, 1)`` at the initial coefficients (Gauss-Hermite)."""
    a, b = initial_coefficients(init, num_degree, den_degree, denominator)
    nodes, weights = np.polynomial.hermite_e.hermegauss(96)
    weights = weights / math.sqrt(2.0 * math.pi)
    theta = np.asarray(a + b, np.float64)
    f = _np_rational(theta, nodes, num_degree, den_degree, denominator)
    return float(1.0 / np.sum(weights * f * f))


def rational(x: jax.Array, a: jax.Array, b: jax.Array, denominator: str = "abs_sum") -> jax.Array:
    """``P(x) / Q(x)`` elementwise, computed in float32.

    ``a [m+1, ...]`` and ``b [n, ...]`` hold the coefficients along their first axis; the rest
    of their shape has the rank of ``x`` and broadcasts against it (size-1 dims), so
    ``a[j]`` is the ``x^j`` coefficient for every element.
    """
    x32 = x.astype(jnp.float32)
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    p = jnp.broadcast_to(a32[-1], x32.shape)
    for j in range(a32.shape[0] - 2, -1, -1):  # Horner
        p = p * x32 + a32[j]
    if denominator == "abs_sum":
        q = jnp.broadcast_to(b32[-1], x32.shape)
        for k in range(b32.shape[0] - 2, -1, -1):
            q = q * x32 + b32[k]
        q = 1.0 + jnp.abs(q * x32)
    else:
        ax = jnp.abs(x32)
        q = jnp.broadcast_to(jnp.abs(b32[-1]), x32.shape)
        for k in range(b32.shape[0] - 2, -1, -1):
            q = q * ax + jnp.abs(b32[k])
        q = 1.0 + q * ax
    return p / q


def _coef_init(values: tuple[float, ...], groups: int | None):
    def _init(key, shape, dtype=jnp.float32):
        del key
        row = jnp.asarray(values, dtype)
        return row if groups is None else jnp.broadcast_to(row, shape)

    return _init


def _check_degrees(num_degree: int, den_degree: int) -> None:
    if num_degree < 1 or den_degree < 1:
        raise ValueError(
            f"num_degree and den_degree must be >= 1; got num_degree={num_degree}, "
            f"den_degree={den_degree}"
        )


# ---------------------------------------------------------------------------------------------
# Group-Rational KAN layer
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """GR-KAN ``[..., d_in] -> [..., d_out]``.

    Attributes:
      d_in, d_out: features in / out.
      num_groups: ``G``; channels ``[g*i/G, (g+1)*i/G)`` share rational ``F_g``.
      num_degree, den_degree: ``(m, n)``; KAT uses ``(5, 4)``.
      init: "identity", "gelu" or "silu" (KAT: identity in the first, GELU in the second layer
        of its KAN block).
      denominator: "abs_sum" (KAT) or "sum_abs" (safe PAU).
      use_bias: add ``b``.
    """

    d_in: int
    d_out: int
    num_groups: int = 8
    num_degree: int = 5
    den_degree: int = 4
    init: str = "gelu"
    denominator: str = "abs_sum"
    use_bias: bool = True

    def __post_init__(self):
        if self.d_in <= 0 or self.d_out <= 0:
            raise ValueError(
                f"d_in and d_out must be positive; got d_in={self.d_in}, d_out={self.d_out}"
            )
        core.check_divisible(self.d_in, self.num_groups, "d_in", "num_groups")
        _check_degrees(self.num_degree, self.den_degree)
        core.check_choice(self.init, INITS, "init")
        core.check_choice(self.denominator, DENOMINATORS, "denominator")


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    a, b = initial_coefficients(cfg.init, cfg.num_degree, cfg.den_degree, cfg.denominator)
    gain = variance_gain(cfg.init, cfg.num_degree, cfg.den_degree, cfg.denominator)
    g = cfg.num_groups
    specs = {
        "numerator": core.ParamSpec((g, cfg.num_degree + 1), _coef_init(a, g), (None, None)),
        "denominator": core.ParamSpec((g, cfg.den_degree), _coef_init(b, g), (None, None)),
        "kernel": core.ParamSpec(
            (cfg.d_in, cfg.d_out), core.initializers.fan_in(gain), ("embed", "mlp")
        ),
    }
    if cfg.use_bias:
        specs["bias"] = core.ParamSpec((cfg.d_out,), core.initializers.zeros, ("mlp",))
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def group_rational(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``F_{g(c)}(x_c)`` for every channel ``c``: ``[..., d_in] -> [..., d_in]`` (float32)."""
    g = cfg.num_groups
    xg = x.reshape(x.shape[:-1] + (g, cfg.d_in // g))
    lead = (1,) * (x.ndim - 1)
    a = params["numerator"].T.reshape((cfg.num_degree + 1,) + lead + (g, 1))
    b = params["denominator"].T.reshape((cfg.den_degree,) + lead + (g, 1))
    return rational(xg, a, b, cfg.denominator).reshape(x.shape)


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``F_g(x) W + b``; ``x: [..., d_in] -> [..., d_out]``."""
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_in={cfg.d_in}]); got shape ()")
    core.check_dim(x, -1, cfg.d_in, "x", "d_in")
    dtype = core.compute_dtype(cfg, x)
    h = group_rational(params, x.astype(dtype), cfg).astype(dtype)
    kernel = params["kernel"].astype(dtype)
    y = jnp.einsum("...i,io->...o", h, kernel, precision=_HI)
    if cfg.use_bias:
        y = y + params["bias"].astype(dtype).reshape((1,) * (y.ndim - 1) + (cfg.d_out,))
    return y


# ---------------------------------------------------------------------------------------------
# Padé activation unit
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class PadeConfig(core.LayerConfig):
    """Padé activation unit: one learnable rational applied elementwise (any input shape).

    Attributes:
      num_degree, den_degree: ``(m, n)``; the PAU paper uses ``(5, 4)``.
      init: "identity", "gelu" or "silu".
      denominator: "sum_abs" (safe PAU, default) or "abs_sum" (KAT).
    """

    num_degree: int = 5
    den_degree: int = 4
    init: str = "gelu"
    denominator: str = "sum_abs"

    def __post_init__(self):
        _check_degrees(self.num_degree, self.den_degree)
        core.check_choice(self.init, INITS, "init")
        core.check_choice(self.denominator, DENOMINATORS, "denominator")


def pade_param_specs(cfg: PadeConfig) -> dict[str, core.ParamSpec]:
    a, b = initial_coefficients(cfg.init, cfg.num_degree, cfg.den_degree, cfg.denominator)
    return {
        "numerator": core.ParamSpec((cfg.num_degree + 1,), _coef_init(a, None), (None,)),
        "denominator": core.ParamSpec((cfg.den_degree,), _coef_init(b, None), (None,)),
    }


def pade_apply(params: core.Params, x: jax.Array, cfg: PadeConfig) -> jax.Array:
    """``P(x) / Q(x)`` elementwise; same shape as ``x``, in the compute dtype."""
    core.check_floating(x, "x")
    dtype = core.compute_dtype(cfg, x)
    lead = (1,) * jnp.ndim(x)
    a = params["numerator"].reshape((cfg.num_degree + 1,) + lead)
    b = params["denominator"].reshape((cfg.den_degree,) + lead)
    return rational(x, a, b, cfg.denominator).astype(dtype)


core.register_layer(
    "group_rational_kan",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(config=Config(d_in=16, d_out=24, num_groups=4), input_shape=(2, 8, 16)),
    kind="projection",
)

core.register_layer(
    "pade_activation",
    PadeConfig,
    param_specs=pade_param_specs,
    apply=pade_apply,
    example=core.Example(config=PadeConfig(), input_shape=(2, 8, 16)),
    kind="activation",
)

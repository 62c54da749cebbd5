"""MemoryFormer hashing projection and memory block (Dense / FFN replacements by table lookups).

From "MemoryFormer: Minimize Transformer Computation by Removing Fully-Connected Layers".

Projection (replaces ``Dense(d_in -> d_out)``)::

    z_j   = x[j*tau : (j+1)*tau]                        j = 0 .. J-1,  J = d_in / tau
    c_j   = sum_i [z_j,i >= 0] 2^i                      (sign bits, bit i = coordinate i)
    p(z)  = prod_i exp(|z_i|/t) / (2 cosh(z_i/t))       = prod_i sigmoid(2 |z_i| / t)
    y     = sum_j w(z_j) * T_j[c_j]  (+ b)              T: [J, 2^tau, d_out]

``p(z_j)`` is the probability of the selected bucket ``sign(z_j)`` under a softmax over all
``2^tau`` sign codes ``s`` with logits ``<s, z_j> / t`` (the closed form factorises per bit).
The code ``c_j`` is piecewise constant, so gradients reach ``x`` only through ``w(z_j)``.
The sum is one ``pallas_kernels.lookup.gather_sum`` call.

Choices the paper leaves open (or where its public code differs), and what is done here:

* ``weight="prob"`` (default, the paper's equation): ``w = p(z)``. ``weight="l1_prob"``: the
  public code's ``w = ||z||_1 * p(z)`` (output scales with the input like a linear map).
  ``weight="ones"``: a hard lookup ``w = 1`` (no gradient to ``x``; used to check that filled
  tables reproduce ``sign(x) W``).
* No input projection: ``x`` is split directly into chunks (as in the public code).
* Zero counts as positive (bit 1); bit ``i`` of the code is coordinate ``i`` of the chunk.
* Temperature ``t`` (``temperature``) defaults to 1.
* Tables start as a normal with std ``1 / sqrt(J)`` (each output sums ``J`` weighted rows); the
  bias starts at zero. :func:`tables_from_dense` fills tables from a Dense kernel instead.

Memory block (replaces the FFN), following the public code: projection ``d -> J (tau + 2)``
with ``tau``-bit codes, LayerNorm, projection ``J (tau + 2) -> d`` with ``(tau + 2)``-bit
codes (so both projections have ``J = d / tau`` tables).

FLOPs per token: ``J * tau`` for the codes and weights plus ``J * d_out`` multiply-adds for the
weighted sum, against ``d_in * d_out`` for Dense: about ``tau`` times fewer. Table memory is
``J * 2^tau * d_out`` entries; ``max_table_bytes`` guards against an accidental huge ``tau``.

Row-sharded tables (``table_axis``): the ``2^tau`` rows of every table are split over the mesh
axis ``table_axis`` of the mesh set with ``jax.set_mesh``; each device gathers and sums its own
rows and one all-reduce of ``y [tokens, d_out]`` adds the parts
(:func:`pallas_kernels.lookup.sharded.row_sharded_sum`). The tables' gradient stays row-sharded.
The tables' logical axes are then ``(None, "table", None)``: map the logical name ``"table"``
to the same mesh axis as ``table_axis`` (``train.sharding.DEFAULT_RULES`` maps it to
``"tensor"``, so use ``table_axis="tensor"``); a mismatch is still correct but reshards the
tables on every call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayers import core, norms
from pallas_kernels.lookup import gather_sum
from pallas_kernels.lookup.sharded import check_axis_args, row_sharded_sum

__all__ = [
    "Config",
    "BlockConfig",
    "WEIGHTS",
    "param_specs",
    "init",
    "apply",
    "block_param_specs",
    "block_apply",
    "hash_codes",
    "bucket_weights",
    "tables_from_dense",
    "flops",
    "ROW_AXIS",
    "check_table_axes",
    "table_gather_sum",
]

WEIGHTS = ("prob", "l1_prob", "ones")
_MAX_TAU = 30  # codes are int32 row indices
ROW_AXIS = "table"  # logical name of the row dim of row-sharded tables (``table_axis`` set)


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(core.LayerConfig):
    """MemoryFormer hashing projection ``[..., d_in] -> [..., d_out]``.

    Attributes:
      d_in, d_out: input / output features; ``d_in`` must be divisible by ``tau``.
      tau: bits per code (rows per table ``2^tau``).
      temperature: ``t`` in ``p(z)``.
      weight: "prob" (paper), "l1_prob" (public code) or "ones" (hard lookup); see module doc.
      use_bias: add a learned bias.
      max_table_bytes: refuse configs whose tables exceed this many bytes (param dtype).
      implementation: passed to ``gather_sum`` (None: Pallas on TPU/GPU, xla on CPU).
      table_axes: logical axes of the ``[J, 2^tau, d_out]`` tables; None: ``("tables", None,
        "mlp")``, or ``(None, "table", None)`` when ``table_axis`` is set.
      table_axis: None, or the mesh axis the tables' rows are split over (module doc); needs
        ``jax.set_mesh(mesh)`` around the call and ``2^tau`` divisible by the axis size.
      table_token_axis: None, or the mesh axis (or tuple of axes) the tokens are split over in
        the sharded lookup (e.g. the batch axis ``"data"``); tokens must divide its size.
    """

    d_in: int
    d_out: int
    tau: int = 8
    temperature: float = 1.0
    weight: str = "prob"
    use_bias: bool = True
    max_table_bytes: int = 4 << 30
    implementation: str | None = None
    table_axes: tuple[str | None, str | None, str | None] | None = None
    table_axis: str | None = None
    table_token_axis: str | tuple[str, ...] | None = None

    def __post_init__(self):
        check_table_axes(self)
        if self.d_in <= 0 or self.d_out <= 0:
            raise ValueError(
                f"d_in and d_out must be positive; got d_in={self.d_in}, d_out={self.d_out}"
            )
        if not 1 <= self.tau <= _MAX_TAU:
            raise ValueError(f"tau must be in [1, {_MAX_TAU}]; got {self.tau}")
        core.check_divisible(self.d_in, self.tau, "d_in", "tau")
        core.check_choice(self.weight, WEIGHTS, "weight")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        need = self.table_bytes
        if need > self.max_table_bytes:
            raise ValueError(
                f"tau={self.tau} is too large for the table budget: {self.num_tables} tables x "
                f"2^{self.tau} rows x d_out={self.d_out} x "
                f"{jnp.dtype(self.param_dtype).itemsize} B would need {_human(need)} "
                f"({need} bytes) > max_table_bytes={self.max_table_bytes} "
                f"({_human(self.max_table_bytes)}); lower tau or raise max_table_bytes"
            )

    @property
    def logical_table_axes(self) -> tuple[str | None, str | None, str | None]:
        if self.table_axes is not None:
            return tuple(self.table_axes)
        return ("tables", None, "mlp") if self.table_axis is None else (None, ROW_AXIS, None)

    @property
    def num_tables(self) -> int:
        return self.d_in // self.tau

    @property
    def table_bytes(self) -> int:
        return self.num_tables * (2**self.tau) * self.d_out * jnp.dtype(self.param_dtype).itemsize


def check_table_axes(cfg) -> None:
    """Validate the ``table_axis`` / ``table_token_axis`` fields of a memory-layer config."""
    if cfg.table_axis is None:
        if cfg.table_token_axis is not None:
            raise ValueError(
                f"table_token_axis={cfg.table_token_axis!r} needs table_axis (the mesh axis the "
                f"table rows are split over); got table_axis=None"
            )
        return
    check_axis_args(
        cfg.table_axis, cfg.table_token_axis, axis_arg="table_axis", token_arg="table_token_axis"
    )


def table_gather_sum(cfg, indices, weights, tables, *, rows: int, rows_desc: str) -> jax.Array:
    """``gather_sum`` of a memory layer: plain, or row-sharded over ``cfg.table_axis``.

    ``rows`` is the global row count of ``tables [j, r, d]`` (inside a shard_map that binds
    ``table_axis`` the tables may hold all ``rows`` rows or this shard's ``rows / m``; see
    ``pallas_kernels.lookup.sharded.row_sharded_sum``); ``rows_desc`` names them in errors.
    """
    if cfg.table_axis is None:
        return gather_sum(
            indices, weights, tables, implementation=cfg.implementation, check_indices=False
        )

    def local(first, idx, w, tab):
        return gather_sum(
            idx - first, w, tab, implementation=cfg.implementation, check_indices=False
        )

    return row_sharded_sum(
        local,
        (indices, weights),
        (tables,),
        axis_name=cfg.table_axis,
        token_axis=cfg.table_token_axis,
        rows=rows,
        axis_arg="table_axis",
        token_arg="table_token_axis",
        rows_desc=rows_desc,
    )


def param_specs(cfg: Config) -> dict[str, core.ParamSpec]:
    j = cfg.num_tables
    axes = cfg.logical_table_axes
    specs = {
        "tables": core.ParamSpec(
            (j, 2**cfg.tau, cfg.d_out), core.initializers.normal(1.0 / np.sqrt(j)), axes
        )
    }
    if cfg.use_bias:
        specs["bias"] = core.ParamSpec((cfg.d_out,), core.initializers.zeros, (axes[2],))
    return specs


def init(key: jax.Array, cfg: Config) -> core.Params:
    return core.init_params(key, param_specs(cfg), cfg.param_dtype)


def hash_codes(x: jax.Array, tau: int) -> jax.Array:
    """Sign-bit codes of ``x [..., d_in]`` chunked by ``tau``: int32 ``[..., d_in / tau]``."""
    z = x.reshape(x.shape[:-1] + (x.shape[-1] // tau, tau))
    bits = jnp.left_shift(jnp.int32(1), jnp.arange(tau, dtype=jnp.int32))
    bits = bits.reshape((1,) * (z.ndim - 1) + (tau,))
    return jnp.sum(jnp.where(z >= 0, bits, jnp.int32(0)), axis=-1, dtype=jnp.int32)


def bucket_weights(x: jax.Array, tau: int, temperature: float = 1.0, weight: str = "prob"):
    """float32 ``[..., d_in / tau]``: the weight of each chunk's selected row (module doc)."""
    core.check_choice(weight, WEIGHTS, "weight")
    z = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // tau, tau))
    if weight == "ones":
        return jnp.ones(z.shape[:-1], jnp.float32)
    # log p = sum_i log sigmoid(2|z_i|/t) = -sum_i softplus(-2|z_i|/t): stable for any |z|.
    log_p = -jnp.sum(jax.nn.softplus(-2.0 * jnp.abs(z) / temperature), axis=-1)
    w = jnp.exp(log_p)
    if weight == "l1_prob":
        w = w * jnp.sum(jnp.abs(z), axis=-1)
    return w


def apply(params: core.Params, x: jax.Array, cfg: Config) -> jax.Array:
    """``y = sum_j w(z_j) T_j[code(z_j)] + b``; ``x [..., d_in] -> [..., d_out]``."""
    core.check_floating(x, "x")
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have rank >= 1 ([..., d_in={cfg.d_in}]); got shape ()")
    core.check_dim(x, -1, cfg.d_in, "x", "d_in")
    dtype = core.compute_dtype(cfg, x)
    lead = x.shape[:-1]
    xf = x.astype(dtype).reshape(-1, cfg.d_in)
    codes = hash_codes(xf, cfg.tau)
    w = bucket_weights(xf, cfg.tau, cfg.temperature, cfg.weight)
    p = core.cast_floating(params, dtype)
    r = 2**cfg.tau
    y = table_gather_sum(
        cfg, codes, w, p["tables"], rows=r, rows_desc=f"the 2^tau = {r} table rows"
    )
    if cfg.use_bias:
        y = y + p["bias"][None, :]
    return y.reshape(lead + (cfg.d_out,))


def tables_from_dense(kernel: jax.Array, tau: int) -> jax.Array:
    """Tables ``T_j[c] = s_c^T W_j`` for every sign code ``c`` (``s_c`` in {-1, +1}^tau).

    With these tables and ``weight="ones"`` the layer computes ``sign(x) W`` (zero as +1):
    ``kernel [d_in, d_out] -> tables [d_in / tau, 2^tau, d_out]`` (float32).
    """
    d_in, d_out = kernel.shape
    codes = np.arange(2**tau)[:, None]
    signs = np.where((codes >> np.arange(tau)[None, :]) & 1, 1.0, -1.0).astype(np.float32)
    w = jnp.asarray(kernel, jnp.float32).reshape(d_in // tau, tau, d_out)
    return jnp.einsum("ci,jio->jco", signs, w, precision=jax.lax.Precision.HIGHEST)


def flops(cfg: Config, tokens: int) -> dict[str, int]:
    """Analytic forward FLOPs of the projection and of the Dense layer it replaces."""
    j = cfg.num_tables
    return {
        "memoryformer": tokens * (j * cfg.tau * 4 + 2 * j * cfg.d_out),
        "dense": tokens * 2 * cfg.d_in * cfg.d_out,
    }


# --------------------------------------------------------------------------------------------
# Memory block: the FFN replacement
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockConfig(core.LayerConfig):
    """MemoryFormer memory block ``[..., d_model] -> [..., d_model]`` (FFN replacement).

    ``up``: projection d_model -> J (tau + 2) with tau-bit codes; LayerNorm; ``down``:
    projection J (tau + 2) -> d_model with (tau + 2)-bit codes. ``J = d_model / tau``.
    ``table_axis`` / ``table_token_axis`` apply to both projections (see :class:`Config`).
    """

    d_model: int
    tau: int = 8
    temperature: float = 1.0
    weight: str = "prob"
    eps: float = 1e-5
    max_table_bytes: int = 4 << 30
    implementation: str | None = None
    table_axis: str | None = None
    table_token_axis: str | tuple[str, ...] | None = None

    def __post_init__(self):
        self.sub_configs()  # validates

    @property
    def d_hidden(self) -> int:
        return (self.d_model // self.tau) * (self.tau + 2)

    def sub_configs(self) -> dict:
        common = dict(
            temperature=self.temperature,
            weight=self.weight,
            max_table_bytes=self.max_table_bytes,
            implementation=self.implementation,
            table_axis=self.table_axis,
            table_token_axis=self.table_token_axis,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        core.check_divisible(self.d_model, self.tau, "d_model", "tau")
        return {
            "up": Config(d_in=self.d_model, d_out=self.d_hidden, tau=self.tau, **common),
            "norm": norms.LayerNormConfig(
                dim=self.d_hidden, eps=self.eps, dtype=self.dtype, param_dtype=self.param_dtype
            ),
            "down": Config(d_in=self.d_hidden, d_out=self.d_model, tau=self.tau + 2, **common),
        }


def block_param_specs(cfg: BlockConfig) -> dict:
    subs = cfg.sub_configs()
    return {
        "up": param_specs(subs["up"]),
        "norm": norms.layer_norm_param_specs(subs["norm"]),
        "down": param_specs(subs["down"]),
    }


def block_apply(params: core.Params, x: jax.Array, cfg: BlockConfig) -> jax.Array:
    """``down(LayerNorm(up(x)))``; ``x [..., d_model] -> [..., d_model]``."""
    subs = cfg.sub_configs()
    h = apply(params["up"], x, subs["up"])
    h = norms.layer_norm(params["norm"], h, subs["norm"])
    return apply(params["down"], h, subs["down"])


core.register_layer(
    "memoryformer_projection",
    Config,
    param_specs=param_specs,
    apply=apply,
    example=core.Example(
        config=Config(d_in=16, d_out=24, tau=4), input_shape=(2, 8, 16), rtol_bf16=5e-2
    ),
    kind="projection",
)
core.register_layer(
    "memoryformer_block",
    BlockConfig,
    param_specs=block_param_specs,
    apply=block_apply,
    example=core.Example(
        config=BlockConfig(d_model=16, tau=4),
        input_shape=(2, 8, 16),
        # bf16 rounding of the hidden layer flips a few sign codes of the second projection
        # (a different table row for that chunk): a discrete change, not an accuracy bug.
        rtol_bf16=0.3,
    ),
    kind="mlp",
)

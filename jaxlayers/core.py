"""The layer protocol shared by every layer in jaxlayers.

A layer is a module-level triple of pure functions around a frozen config:

    cfg    = mylayer.Config(d_in=..., ...)            # frozen, hashable, static under jit
    params = mylayer.init(key, cfg)                   # plain nested dict of arrays
    y      = mylayer.apply(params, x, cfg, **kwargs)  # pure

Every layer describes its parameters once, as a tree of :class:`ParamSpec` returned by
``param_specs(cfg)``. From that one description come the initial values (:func:`init_params`),
the logical axis names used for sharding (:func:`logical_axes`) and the abstract shapes used for
checkpoint restore (:func:`abstract_params`). Keys for each parameter are derived from the
parameter's *path* (``"q/kernel"``), not from call order, so adding a parameter never changes
the initial value of another one.

Sequence mixers additionally provide ``init_state(cfg, batch, dtype)`` and
``step(params, state, x_t, cfg) -> (y_t, state)``; their ``apply`` accepts
``initial_state=`` and ``return_state=``.

Layers register themselves with :func:`register_layer` (keyed by their ``Config`` class), which
lets composite layers (blocks, the decoder LM) and the Flax wrappers dispatch on a config alone:
``core.apply(params, x, cfg)``.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]
Params = dict[str, Any]

__all__ = [
    "LayerConfig",
    "ParamSpec",
    "LayerFns",
    "Example",
    "register_layer",
    "layer_fns",
    "registered_layers",
    "init_params",
    "logical_axes",
    "abstract_params",
    "param_specs",
    "init",
    "apply",
    "init_state",
    "step",
    "count_params",
    "cast_floating",
    "compute_dtype",
    "check_rank",
    "check_dim",
    "check_floating",
    "check_divisible",
    "check_choice",
    "initializers",
]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerConfig:
    """Base of every layer config.

    Attributes:
      dtype: compute dtype. ``None`` means "the dtype of the input" (after promotion with
        float32 for integer inputs is never done: integer inputs are rejected by float layers).
      param_dtype: dtype the parameters are created and stored in (float32 by default; with bf16
        compute the params are cast inside ``apply``, so optimizers keep float32 masters).
    """

    dtype: Any = None
    param_dtype: Any = jnp.float32

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


def compute_dtype(cfg: LayerConfig, x: Array) -> Any:
    """The dtype a layer computes in: ``cfg.dtype`` if set, else the input's dtype."""
    return jnp.dtype(cfg.dtype) if cfg.dtype is not None else x.dtype


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast every floating leaf of ``tree`` to ``dtype`` (integer leaves are left alone)."""

    def _cast(a):
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(_cast, tree)


# --------------------------------------------------------------------------------------------
# Parameter specs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, initializer, logical axis names and (optionally) dtype.

    ``axes`` has one logical name (or None) per dimension, e.g. ``("embed", "mlp")``;
    ``train/sharding.py`` maps logical names to mesh axes. ``dtype=None`` means the layer's
    ``param_dtype``.
    """

    shape: tuple[int, ...]
    init: Initializer
    axes: tuple[str | None, ...]
    dtype: Any = None

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(
                f"ParamSpec axes {self.axes} must name every dimension of shape {self.shape}"
            )


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def _path_str(path) -> str:
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.DictKey):
            parts.append(str(p.key))
        elif isinstance(p, jax.tree_util.SequenceKey):
            parts.append(str(p.idx))
        else:
            parts.append(str(p))
    return "/".join(parts)


def init_params(key: Array, specs: Mapping[str, Any], param_dtype: Any = jnp.float32) -> Params:
    """Materialise a spec tree. Each leaf's key is ``fold_in(key, crc32(path))``."""

    def _one(path, spec: ParamSpec):
        leaf_key = jax.random.fold_in(key, zlib.crc32(_path_str(path).encode()) & 0x7FFFFFFF)
        dtype = spec.dtype if spec.dtype is not None else param_dtype
        return jnp.asarray(spec.init(leaf_key, spec.shape, dtype), dtype)

    return jax.tree_util.tree_map_with_path(_one, dict(specs), is_leaf=_is_spec)


def logical_axes(specs: Mapping[str, Any]) -> Any:
    """Tree of logical-axis tuples with the same structure as the params."""
    return jax.tree.map(lambda s: tuple(s.axes), dict(specs), is_leaf=_is_spec)


def abstract_params(specs: Mapping[str, Any], param_dtype: Any = jnp.float32) -> Any:
    """Tree of ``jax.ShapeDtypeStruct`` with the same structure as the params."""
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype if s.dtype is not None else param_dtype),
        dict(specs),
        is_leaf=_is_spec,
    )


def count_params(params: Any) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))


# --------------------------------------------------------------------------------------------
# Registry of layer functions, keyed by config class
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
    """A ready-to-run instance of a layer for the shared test suites and benchmarks.

    ``input_shape`` is the shape of ``x``; ``input_kind`` says how to draw it: "float" (normal),
    "tokens" (int32 in [0, vocab) with ``vocab`` taken from ``input_vocab``).
    ``apply_kwargs`` are extra keyword arguments for ``apply``. ``shardable`` marks layers whose
    params carry logical axes worth testing on a mesh; ``decode`` marks mixers whose step-by-step
    decode is expected to equal apply (causal mixers).
    """

    config: Any
    input_shape: tuple[int, ...]
    input_kind: str = "float"
    input_vocab: int = 0
    apply_kwargs: tuple[tuple[str, Any], ...] = ()
    decode: bool = True
    rtol_bf16: float | None = None


@dataclasses.dataclass(frozen=True)
class LayerFns:
    """The functions of one layer. ``init_state``/``step`` only for sequence mixers."""

    name: str
    config: type
    param_specs: Callable[[Any], Mapping[str, Any]]
    apply: Callable[..., Any]
    init_state: Callable[..., Any] | None = None
    step: Callable[..., Any] | None = None
    # Some layers (e.g. PRepBN) thread non-trainable state; they set this.
    stateful: bool = False
    # A small example (config + input shape) that drives the shared test suites and the
    # layer benchmarks. Every registered layer should give one.
    example: Example | None = None
    # "mixer" (sequence mixer), "projection" (Dense-like, d_in -> d_out), "mlp", "norm",
    # "activation", "head", "embedding", "block", "model", "other".
    kind: str = "other"

    def init(self, key: Array, cfg: Any) -> Params:
        return init_params(key, self.param_specs(cfg), cfg.param_dtype)

    @property
    def is_mixer(self) -> bool:
        return self.step is not None


_LAYERS: dict[type, LayerFns] = {}
_BY_NAME: dict[str, LayerFns] = {}


def register_layer(
    name: str,
    config: type,
    *,
    param_specs: Callable,
    apply: Callable,
    init_state: Callable | None = None,
    step: Callable | None = None,
    stateful: bool = False,
    example: Example | None = None,
    kind: str = "other",
) -> LayerFns:
    """Register a layer's functions under ``name`` and its config class; returns them."""
    fns = LayerFns(name, config, param_specs, apply, init_state, step, stateful, example, kind)
    if name in _BY_NAME and _BY_NAME[name].config is not config:
        raise ValueError(f"layer name {name!r} is already registered for {_BY_NAME[name].config}")
    _LAYERS[config] = fns
    _BY_NAME[name] = fns
    return fns


def layer_fns(cfg_or_name: Any) -> LayerFns:
    """The registered functions for a config instance, config class or layer name."""
    if isinstance(cfg_or_name, str):
        try:
            return _BY_NAME[cfg_or_name]
        except KeyError:
            raise KeyError(
                f"unknown layer {cfg_or_name!r}; registered: {sorted(_BY_NAME)}"
            ) from None
    cls = cfg_or_name if isinstance(cfg_or_name, type) else type(cfg_or_name)
    try:
        return _LAYERS[cls]
    except KeyError:
        raise KeyError(
            f"no layer registered for config class {cls.__qualname__}; did you import its module?"
        ) from None


def registered_layers() -> dict[str, LayerFns]:
    return dict(_BY_NAME)


def param_specs(cfg: Any) -> Mapping[str, Any]:
    return layer_fns(cfg).param_specs(cfg)


def init(key: Array, cfg: Any) -> Params:
    """Initialise the params of whatever layer ``cfg`` configures."""
    return layer_fns(cfg).init(key, cfg)


def apply(params: Params, x: Any, cfg: Any, **kwargs: Any) -> Any:
    return layer_fns(cfg).apply(params, x, cfg, **kwargs)


def init_state(cfg: Any, batch: int, dtype: Any = jnp.float32) -> Any:
    fns = layer_fns(cfg)
    if fns.init_state is None:
        raise TypeError(f"layer {fns.name!r} is not a sequence mixer: it has no decode state")
    return fns.init_state(cfg, batch, dtype)


def step(params: Params, state: Any, x_t: Any, cfg: Any, **kwargs: Any) -> Any:
    fns = layer_fns(cfg)
    if fns.step is None:
        raise TypeError(f"layer {fns.name!r} is not a sequence mixer: it has no step")
    return fns.step(params, state, x_t, cfg, **kwargs)


# --------------------------------------------------------------------------------------------
# Trace-time input checks. Each names the argument and the expected value.
# --------------------------------------------------------------------------------------------


def check_rank(x: Any, rank: int | tuple[int, ...], name: str, layout: str = "") -> None:
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    if jnp.ndim(x) not in ranks:
        want = " or ".join(str(r) for r in ranks)
        hint = f" ({layout})" if layout else ""
        raise ValueError(f"{name} must have rank {want}{hint}; got shape {jnp.shape(x)}")


def check_dim(x: Any, axis: int, expected: int, name: str, what: str = "") -> None:
    got = jnp.shape(x)[axis]
    if got != expected:
        label = f" ({what})" if what else ""
        raise ValueError(
            f"{name}.shape[{axis}]{label} must be {expected}; got {got} (shape {jnp.shape(x)})"
        )


def check_floating(x: Any, name: str) -> None:
    dt = jnp.result_type(x)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, ...); got {dt}")


def check_divisible(value: int, divisor: int, what: str, by: str) -> None:
    if divisor <= 0 or value % divisor:
        raise ValueError(f"{what}={value} must be divisible by {by}={divisor}")


def check_choice(value: Any, choices: tuple, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


# --------------------------------------------------------------------------------------------
# Initializers: jax.nn.initializers plus a few used across the catalog.
# --------------------------------------------------------------------------------------------


class initializers:  # noqa: N801 - a namespace, like jax.nn.initializers
    zeros = staticmethod(jax.nn.initializers.zeros)
    ones = staticmethod(jax.nn.initializers.ones)
    normal = staticmethod(jax.nn.initializers.normal)
    lecun_normal = staticmethod(jax.nn.initializers.lecun_normal)
    xavier_uniform = staticmethod(jax.nn.initializers.xavier_uniform)
    variance_scaling = staticmethod(jax.nn.initializers.variance_scaling)

    @staticmethod
    def truncated_normal(stddev: float = 0.02) -> Initializer:
        return jax.nn.initializers.truncated_normal(stddev)

    @staticmethod
    def fan_in(scale: float = 1.0, in_axis: int | tuple[int, ...] = -2) -> Initializer:
        """Truncated normal with variance ``scale / fan_in`` (fan-in over ``in_axis``)."""
        return jax.nn.initializers.variance_scaling(
            scale, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=-1
        )

    @staticmethod
    def constant(value: float) -> Initializer:
        return jax.nn.initializers.constant(value)

    @staticmethod
    def uniform_range(lo: float, hi: float) -> Initializer:
        def _init(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, lo, hi)

        return _init

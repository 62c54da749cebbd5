"""Flax linen modules generated from the pure layers.

``Layer(cfg)`` wraps any registered layer: ``setup`` declares one ``param`` per leaf of the pure
param tree (nested scopes mirror its nesting, so ``variables["params"]`` *is* the pure tree) and
``__call__`` runs the pure ``apply``::

    import jax
    from jaxlayers import dense, linen

    module = linen.Dense(dense.Config(d_in=16, d_out=32))
    variables = module.init(jax.random.key(0), x)
    y = module.apply(variables, x)       # == dense.apply(variables["params"], x, cfg)
    y = module.apply({"params": pure_params}, x)   # pure params load as they are

Every leaf is created through ``nn.with_logical_partitioning`` with the layer's logical axis
names, so ``nn.get_partition_spec(variables)`` and ``nn.logical_to_mesh_sharding`` work; call
``nn.unbox`` (or ``flax.core.meta.unbox``) on the ``init`` output to get plain arrays.

Initial values follow the scheme of :func:`jaxlayers.core.init_params`: leaf ``path`` is drawn
with ``fold_in(k, crc32(path))`` from one key ``k = self.make_rng("params")`` per module, so the
init equals ``core.init(k, cfg)`` for that ``k``.

Every registered layer gets a class named after it (``Dense``, ``RMSNorm``, ``Attention``,
``LM``, ...; see :func:`jaxlayers.registry.class_name`). Sequence mixers also have
``step(state, x_t)`` (``module.apply(variables, state, x_t, method="step")``); the ``LM`` class
adds ``loss`` and ``generate``.

Stateful layers (registered with ``stateful=True``: BatchNorm, PRepBN, EvoNorm-B0) keep their
running statistics in the ``"batch_stats"`` collection, one variable per leaf of the pure stats
tree (so ``variables["batch_stats"]`` *is* that tree; initial values from
:func:`jaxlayers.nnx.initial_stats`), following ``flax.linen.BatchNorm``'s convention. The call
keeps the pure keywords: with ``train=True`` it runs the pure
``apply(params, x, cfg, stats=variables["batch_stats"], train=True)``, returns ``y`` and writes
``new_stats`` back, which needs the collection to be mutable; ``init`` leaves the statistics at
their initial values. ``train=False`` (the default) uses the stored statistics. Other keywords
(e.g. PRepBN's ``step=``) pass through::

    module = linen.BatchNorm(norms.BatchNormConfig(dim=16))
    variables = module.init(jax.random.key(0), x)          # {"params": ..., "batch_stats": ...}
    y, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    y_eval = module.apply(variables, x)
"""

from __future__ import annotations

import zlib
from typing import Any

import flax.core.scope
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlayers import core, registry
from jaxlayers.models import lm as lm_lib
from jaxlayers.nnx import initial_stats

__all__ = ["Layer", "LM", "wrapper_class"]


def _leaf_init(spec: core.ParamSpec, path: str, dtype: Any, base_key):
    def init(rng):
        key = jax.random.fold_in(base_key(rng), zlib.crc32(path.encode()) & 0x7FFFFFFF)
        dt = spec.dtype if spec.dtype is not None else dtype
        return jnp.asarray(spec.init(key, spec.shape, dt), dt)

    return nn.with_logical_partitioning(init, tuple(spec.axes))


def _declare(module: nn.Module, scope, specs: Any, dtype: Any, prefix: str, base_key) -> dict:
    """Declare the params of ``specs`` in ``scope`` (nested dicts -> child scopes)."""
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        path = f"{prefix}{name}"
        if isinstance(spec, core.ParamSpec):
            init = _leaf_init(spec, path, dtype, base_key)
            if scope is module.scope:
                out[name] = module.param(name, init)
            else:
                out[name] = scope.param(name, init)
        else:
            child = scope.push(name, reuse=True)
            out[name] = _declare(module, child, spec, dtype, path + "/", base_key)
    return out


STATS = "batch_stats"


def _declare_stats(module: nn.Module, scope, stats: Any) -> dict:
    """One ``"batch_stats"`` variable per leaf of ``stats`` (nested dicts -> child scopes)."""
    out: dict[str, Any] = {}
    for name, value in stats.items():
        if isinstance(value, dict):
            out[name] = _declare_stats(module, scope.push(name, reuse=True), value)
        elif scope is module.scope:
            out[name] = module.variable(STATS, name, lambda v=value: v)
        else:
            out[name] = scope.variable(STATS, name, lambda v=value: v)
    return out


def _read_stats(tree: Any) -> Any:
    """The values of a (possibly frozen) nested mapping of variables, as plain dicts."""
    if isinstance(tree, flax.core.scope.Variable):
        return tree.value
    return {k: _read_stats(v) for k, v in tree.items()}


def _write_stats(tree: Any, values: Any) -> None:
    if isinstance(tree, flax.core.scope.Variable):
        tree.value = jnp.asarray(values, jnp.result_type(tree.value))
        return
    for k, v in tree.items():
        _write_stats(v, values[k])


class Layer(nn.Module):
    """A linen module around any registered layer config ``cfg``."""

    cfg: Any

    def setup(self):
        fns = core.layer_fns(self.cfg)
        cache: dict[str, jax.Array] = {}

        def base_key(rng: jax.Array) -> jax.Array:
            # One key per module, drawn only when a param is missing (i.e. during init). In
            # `apply`, linen evaluates the init's shape with a dummy rng and no "params" rng.
            if not self.has_rng("params"):
                return rng
            if "key" not in cache:
                cache["key"] = self.make_rng("params")
            return cache["key"]

        specs = fns.param_specs(self.cfg)
        self._tree = _declare(self, self.scope, specs, self.cfg.param_dtype, "", base_key)
        if fns.stateful:
            self._stats = _declare_stats(self, self.scope, initial_stats(self.cfg))

    def pure_params(self) -> Any:
        """The params as the pure layer's tree (plain arrays)."""
        return nn.unbox(self._tree)

    def pure_stats(self) -> Any:
        """Stateful layers: the running statistics as the pure stats tree."""
        fns = core.layer_fns(self.cfg)
        if not fns.stateful:
            raise TypeError(f"layer {fns.name!r} is not stateful: it has no statistics")
        return _read_stats(self._stats)

    def __call__(self, x: Any, **kwargs: Any) -> Any:
        fns = core.layer_fns(self.cfg)
        if not fns.stateful:
            return fns.apply(self.pure_params(), x, self.cfg, **kwargs)
        if "stats" in kwargs:
            raise TypeError(
                "stats must not be passed to a stateful module: it reads the running statistics "
                f"from the {STATS!r} collection"
            )
        out = fns.apply(self.pure_params(), x, self.cfg, stats=self.pure_stats(), **kwargs)
        if not kwargs.get("train", False):
            return out
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"stateful layer {fns.name!r} must return (y, new_stats) with train=True; got "
                f"{type(out).__name__}"
            )
        y, new_stats = out
        if self.is_initializing():
            return y
        if not self.is_mutable_collection(STATS):
            raise ValueError(
                f"train=True updates the running statistics: the {STATS!r} collection must be "
                f"mutable (apply(..., mutable=[{STATS!r}])); got it immutable"
            )
        _write_stats(self._stats, new_stats)
        return y

    def init_state(self, batch: int, dtype: Any = jnp.float32) -> Any:
        return core.init_state(self.cfg, batch, dtype)

    def step(self, state: Any, x_t: Any) -> tuple[Any, Any]:
        return core.step(self.pure_params(), state, x_t, self.cfg)


class LM(Layer):
    """The decoder LM (:mod:`jaxlayers.models.lm`) as a linen module."""

    cfg: lm_lib.LMConfig

    def loss(self, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        return lm_lib.loss(self.pure_params(), batch, self.cfg)

    def prefill(self, prompt: jax.Array) -> tuple[jax.Array, Any]:
        return lm_lib.prefill(self.pure_params(), prompt, self.cfg)

    def generate(self, prompt: jax.Array, **kwargs: Any) -> jax.Array:
        return lm_lib.generate(self.pure_params(), prompt, self.cfg, **kwargs)


_EXPLICIT: dict[str, type] = {"lm": LM}
_CACHE: dict[str, type] = {}


def wrapper_class(layer_name: str) -> type:
    """The linen class wrapping the registered layer ``layer_name`` (generated once, cached)."""
    if layer_name in _EXPLICIT:
        return _EXPLICIT[layer_name]
    if layer_name in _CACHE:
        return _CACHE[layer_name]
    fns = core.layer_fns(layer_name)
    cls_name = registry.class_name(layer_name)
    doc = (
        f"linen module for the ``{layer_name}`` layer: ``{cls_name}(cfg)`` with ``cfg`` a "
        f"``{fns.config.__module__}.{fns.config.__qualname__}``; see :class:`Layer`."
    )
    cls = type(
        cls_name,
        (Layer,),
        {
            "__doc__": doc,
            "__module__": __name__,
            "__qualname__": cls_name,
            "__annotations__": {"cfg": fns.config},
        },
    )
    _CACHE[layer_name] = cls
    return cls


def _classes() -> dict[str, str]:
    return {registry.class_name(n): n for n in core.registered_layers()}


def __getattr__(name: str) -> Any:
    layer = _classes().get(name)
    if layer is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return wrapper_class(layer)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_classes()))

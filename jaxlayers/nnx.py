"""Flax NNX modules generated from the pure layers.

``Layer(cfg, rngs=...)`` wraps any registered layer: its params become ``nnx.Param`` variables in
a nested dict that mirrors the pure param tree (``module.params["q"]["kernel"]``), and calling the
module runs the pure ``apply`` on them, so the numbers are those of the pure functions::

    from flax import nnx as fnnx
    import jaxlayers
    from jaxlayers import nnx

    layer = nnx.Dense(d_in=16, d_out=32, rngs=fnnx.Rngs(0))   # or nnx.Dense(cfg, rngs=...)
    y = layer(x)                          # == jaxlayers.dense.apply(layer.pure_params(), x, cfg)
    lm = nnx.LM(lm_cfg, rngs=fnnx.Rngs(0)); loss, metrics = lm.loss(batch)

Every registered layer gets a class named after it (:func:`jaxlayers.registry.class_name`:
``"rms_norm"`` -> ``RMSNorm``, ``"attention"`` -> ``Attention``), looked up on first access, so
layers registered later are wrapped too. Each ``nnx.Param`` carries the layer's logical axis
names as ``out_sharding`` metadata, so ``nnx.get_partition_spec(nnx.state(module))`` returns the
logical ``PartitionSpec`` tree (map it to mesh axes with ``nnx.logical_axis_rules`` /
``flax.linen.logical_to_mesh``). Variables are created unsharded (``eager_sharding=False``)
unless ``eager_sharding=True`` is passed, because logical names are not mesh axes.

``Layer(cfg, params=pure_params)`` builds the module around existing pure params (e.g. from a
checkpoint); ``module.pure_params()`` returns them. Sequence mixers also get
``init_state(batch, dtype)`` and ``step(state, x_t)``.

Stateful layers (registered with ``stateful=True``: BatchNorm, PRepBN, EvoNorm-B0) keep their
running statistics in ``nnx.BatchStat`` variables, a nested dict ``module.stats`` mirroring the
pure stats tree (initial values from :func:`initial_stats`, or ``Layer(cfg, stats=...)``). The
call keeps the pure keywords: ``module(x, train=True)`` runs the pure
``apply(params, x, cfg, stats=<stored>, train=True)``, stores the returned ``new_stats`` and
returns ``y`` only; ``module(x)`` / ``train=False`` uses the stored statistics and leaves them
as they are. Other keywords (e.g. PRepBN's ``step=``) pass through. Inside ``nnx.jit`` the update
propagates back to the module as for any NNX variable. ``module.pure_stats()`` returns the
statistics, ``module.load_stats(stats)`` overwrites them, and ``nnx.state(module, nnx.Param)``
selects the trainable params alone::

    bn = nnx.BatchNorm(dim=16, rngs=fnnx.Rngs(0))
    y = bn(x, train=True)                 # == batch_norm(params, x, cfg, stats=s0, train=True)[0]
    y_eval = bn(x)                        # uses the updated running statistics
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlayers import core, registry
from jaxlayers.models import lm as lm_lib

__all__ = ["Layer", "LM", "initial_stats", "wrapper_class"]


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _check_structure(params: Any, cfg: Any) -> None:
    want = core.abstract_params(core.param_specs(cfg), cfg.param_dtype)
    want_s, got_s = jax.tree.structure(want), jax.tree.structure(params)
    if want_s != got_s:
        raise ValueError(
            f"params must have the tree of {type(cfg).__qualname__}: {want_s}; got {got_s}"
        )
    for path, w, g in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]],
        jax.tree.leaves(want),
        jax.tree.leaves(params),
        strict=True,
    ):
        if tuple(g.shape) != tuple(w.shape):
            raise ValueError(f"params{path} must have shape {w.shape}; got {g.shape}")


def initial_stats(cfg: Any) -> Any:
    """The starting running statistics of a stateful layer (a pure tree of arrays).

    The registry has no hook for them yet, so this follows the layer modules' convention: the
    module defining the layer's ``apply`` exposes ``init_stats(cfg)`` (PRepBN, EvoNorm-B0) or
    ``init_batch_stats(cfg)`` (BatchNorm in :mod:`jaxlayers.norms`).
    """
    fns = core.layer_fns(cfg)
    if not fns.stateful:
        raise TypeError(f"layer {fns.name!r} is not stateful: it has no running statistics")
    module = sys.modules.get(getattr(fns.apply, "__module__", ""), None)
    for attr in ("init_stats", "init_batch_stats"):
        fn = getattr(module, attr, None)
        if callable(fn):
            return jax.tree.map(jnp.asarray, fn(cfg))
    raise TypeError(
        f"stateful layer {fns.name!r} must define init_stats(cfg) (or init_batch_stats(cfg)) "
        f"next to its apply in module {getattr(module, '__name__', module)!r}"
    )


def _check_stats(stats: Any, cfg: Any) -> None:
    want = jax.eval_shape(lambda: initial_stats(cfg))
    want_s, got_s = jax.tree.structure(want), jax.tree.structure(stats)
    if want_s != got_s:
        raise ValueError(f"stats must have the tree {want_s}; got {got_s}")
    for path, w, g in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]],
        jax.tree.leaves(want),
        jax.tree.leaves(stats),
        strict=True,
    ):
        if tuple(jnp.shape(g)) != tuple(w.shape):
            raise ValueError(f"stats{path} must have shape {w.shape}; got {jnp.shape(g)}")


def _split_train_output(out: Any, name: str) -> tuple[Any, Any]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"stateful layer {name!r} must return (y, new_stats) with train=True; got "
            f"{type(out).__name__}"
        )
    return out


def _check_no_stats_kwarg(kwargs: dict[str, Any]) -> None:
    if "stats" in kwargs:
        raise TypeError(
            "stats must not be passed to a stateful module: it holds the running statistics "
            "itself (load them with the stats= constructor argument or load_stats)"
        )


class Layer(nnx.Module):
    """An NNX module around any registered layer config.

    Args:
      cfg: the layer's config (any registered ``Config``).
      rngs: ``nnx.Rngs``; the ``params`` stream seeds the pure ``init``. Not needed with
        ``params``.
      params: existing pure params to wrap instead of initialising new ones.
      eager_sharding: passed to every ``nnx.Param`` (see the module docstring).
      stats: stateful layers only: existing running statistics (default
        :func:`initial_stats`).
    """

    def __init__(
        self,
        cfg: Any,
        *,
        rngs: nnx.Rngs | None = None,
        params: Any = None,
        eager_sharding: bool | None = False,
        stats: Any = None,
    ):
        fns = core.layer_fns(cfg)
        if stats is not None and not fns.stateful:
            raise ValueError(f"stats must be None for the stateless layer {fns.name!r}")
        self.cfg = cfg
        specs = fns.param_specs(cfg)
        if params is None:
            if rngs is None:
                raise ValueError("rngs must be given (an nnx.Rngs) when params is None")
            params = fns.init(rngs.params(), cfg)
        else:
            _check_structure(params, cfg)
        axes = core.logical_axes(specs)
        self.params = nnx.data(
            jax.tree.map(
                lambda a, ax: nnx.Param(
                    jnp.asarray(a), out_sharding=tuple(ax), eager_sharding=eager_sharding
                ),
                params,
                axes,
            )
        )
        if fns.stateful:
            if stats is None:
                stats = initial_stats(cfg)
            else:
                _check_stats(stats, cfg)
            self.stats = nnx.data(jax.tree.map(lambda a: nnx.BatchStat(jnp.asarray(a)), stats))

    @property
    def layer(self) -> core.LayerFns:
        return core.layer_fns(self.cfg)

    def pure_params(self) -> Any:
        """The current values as the pure layer's param tree (plain arrays)."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_var)

    def load_params(self, params: Any) -> None:
        """Overwrite every variable with the matching leaf of a pure param tree."""
        _check_structure(params, self.cfg)

        def _set(var, value):
            var[...] = jnp.asarray(value, var[...].dtype)

        jax.tree.map(_set, self.params, params, is_leaf=_is_var)

    def pure_stats(self) -> Any:
        """Stateful layers: the running statistics as the pure stats tree (plain arrays)."""
        if not self.layer.stateful:
            raise TypeError(f"layer {self.layer.name!r} is not stateful: it has no statistics")
        return jax.tree.map(lambda v: v[...], self.stats, is_leaf=_is_var)

    def load_stats(self, stats: Any) -> None:
        """Stateful layers: overwrite the running statistics with a pure stats tree."""
        if not self.layer.stateful:
            raise TypeError(f"layer {self.layer.name!r} is not stateful: it has no statistics")
        _check_stats(stats, self.cfg)
        self._write_stats(stats)

    def _write_stats(self, stats: Any) -> None:
        def _set(var, value):
            var[...] = jnp.asarray(value, var[...].dtype)

        jax.tree.map(_set, self.stats, stats, is_leaf=_is_var)

    def __call__(self, x: Any, **kwargs: Any) -> Any:
        fns = self.layer
        if not fns.stateful:
            return fns.apply(self.pure_params(), x, self.cfg, **kwargs)
        _check_no_stats_kwarg(kwargs)
        out = fns.apply(self.pure_params(), x, self.cfg, stats=self.pure_stats(), **kwargs)
        if not kwargs.get("train", False):
            return out
        y, new_stats = _split_train_output(out, fns.name)
        self._write_stats(new_stats)
        return y

    def init_state(self, batch: int, dtype: Any = jnp.float32) -> Any:
        return core.init_state(self.cfg, batch, dtype)

    def step(self, state: Any, x_t: Any) -> tuple[Any, Any]:
        return core.step(self.pure_params(), state, x_t, self.cfg)


class LM(Layer):
    """The decoder LM (:mod:`jaxlayers.models.lm`) as an NNX module, with ``loss``/``generate``."""

    def __init__(
        self,
        cfg: lm_lib.LMConfig | None = None,
        *,
        rngs=None,
        params=None,
        eager_sharding: bool | None = False,
        **config_kwargs: Any,
    ):
        cfg = _resolve_config(lm_lib.LMConfig, cfg, config_kwargs)
        super().__init__(cfg, rngs=rngs, params=params, eager_sharding=eager_sharding)

    def loss(self, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        return lm_lib.loss(self.pure_params(), batch, self.cfg)

    def prefill(self, prompt: jax.Array) -> tuple[jax.Array, Any]:
        return lm_lib.prefill(self.pure_params(), prompt, self.cfg)

    def generate(self, prompt: jax.Array, **kwargs: Any) -> jax.Array:
        return lm_lib.generate(self.pure_params(), prompt, self.cfg, **kwargs)


def _resolve_config(config_cls: type, cfg: Any, config_kwargs: dict[str, Any]) -> Any:
    if cfg is None:
        return config_cls(**config_kwargs)
    if config_kwargs:
        raise TypeError(
            f"pass either a config or config fields, not both; got cfg and {sorted(config_kwargs)}"
        )
    if not isinstance(cfg, config_cls):
        want = f"{config_cls.__module__}.{config_cls.__qualname__}"
        got = f"{type(cfg).__module__}.{type(cfg).__qualname__}"
        raise TypeError(f"cfg must be a {want}; got {got}")
    return cfg


_EXPLICIT: dict[str, type] = {"lm": LM}
_CACHE: dict[str, type] = {}


def wrapper_class(layer_name: str) -> type:
    """The NNX class wrapping the registered layer ``layer_name`` (generated once, cached)."""
    if layer_name in _EXPLICIT:
        return _EXPLICIT[layer_name]
    if layer_name in _CACHE:
        return _CACHE[layer_name]
    fns = core.layer_fns(layer_name)
    config_cls = fns.config
    cls_name = registry.class_name(layer_name)

    def __init__(
        self, cfg=None, *, rngs=None, params=None, eager_sharding=False, stats=None, **config_kwargs
    ):
        cfg = _resolve_config(config_cls, cfg, config_kwargs)
        Layer.__init__(
            self, cfg, rngs=rngs, params=params, eager_sharding=eager_sharding, stats=stats
        )

    doc = (
        f"NNX module for the ``{layer_name}`` layer ({config_cls.__module__}).\n\n"
        f"``{cls_name}(cfg, rngs=...)`` or ``{cls_name}(rngs=..., **config_fields)``; "
        "see :class:`Layer`."
    )
    cls = type(
        cls_name,
        (Layer,),
        {"__init__": __init__, "__doc__": doc, "__module__": __name__, "__qualname__": cls_name},
    )
    _CACHE[layer_name] = cls
    return cls


def _classes() -> dict[str, str]:
    """Class name -> layer name for every registered layer."""
    return {registry.class_name(n): n for n in core.registered_layers()}


def __getattr__(name: str) -> Any:
    layer = _classes().get(name)
    if layer is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return wrapper_class(layer)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_classes()))

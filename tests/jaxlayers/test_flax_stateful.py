"""The NNX and linen wrappers of stateful layers (running statistics) against the pure functions.

Every registered layer with ``stateful=True`` and an ``Example`` is covered: three consecutive
training calls (fresh inputs each time) must give the pure outputs *and* the pure updated
statistics, then an eval call must give the pure eval output from those statistics.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as fnnx

from jaxlayers import core, dense, evonorm, linen, nnx, prepbn, registry
from tests._asserts import assert_rel_close

STATEFUL = sorted(
    name for name, fns in registry.all_layers().items() if fns.stateful and fns.example is not None
)
TOL = 1e-6  # same function, same params: the wrappers only add bookkeeping
CALLS = 3


def _setup(name: str) -> tuple[Any, Any, dict[str, Any], list[jax.Array], jax.Array]:
    ex = core.layer_fns(name).example
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    xs = [jnp.asarray(rng.normal(size=ex.input_shape) + 0.5, jnp.float32) for _ in range(CALLS)]
    x_eval = jnp.asarray(rng.normal(size=ex.input_shape), jnp.float32)
    kwargs = {k: v for k, v in ex.apply_kwargs if k != "train"}
    params = core.init(jax.random.key(len(name)), ex.config)
    return ex.config, params, kwargs, xs, x_eval


def _pure_run(name, cfg, params, kwargs, xs, x_eval):
    """Outputs and stats after each training call, then the eval output (pure functions)."""
    apply = jax.jit(lambda p, s, x: core.apply(p, x, cfg, stats=s, train=True, **kwargs))
    stats, outs, all_stats = nnx.initial_stats(cfg), [], []
    for x in xs:
        y, stats = apply(params, stats, x)
        outs.append(y)
        all_stats.append(stats)
    y_eval = core.apply(params, x_eval, cfg, stats=stats, train=False, **kwargs)
    return outs, all_stats, y_eval


def test_stateful_layers_are_discovered():
    assert {"batch_norm", "prepbn", "evonorm_b0"} <= set(STATEFUL)


@pytest.mark.parametrize("name", STATEFUL)
def test_nnx_matches_pure_over_training_and_eval(name):
    cfg, params, kwargs, xs, x_eval = _setup(name)
    outs, all_stats, y_eval = _pure_run(name, cfg, params, kwargs, xs, x_eval)
    module = nnx.wrapper_class(name)(cfg, params=params)
    jax.tree.map(np.testing.assert_array_equal, module.pure_stats(), nnx.initial_stats(cfg))
    assert set(fnnx.state(module, fnnx.BatchStat)) == {"stats"}

    train = fnnx.jit(lambda m, x: m(x, train=True, **kwargs))
    for i, x in enumerate(xs):
        y = train(module, x)
        assert_rel_close(y, outs[i], TOL, name=f"{name}[nnx y{i}]")
        assert_rel_close(module.pure_stats(), all_stats[i], TOL, name=f"{name}[nnx stats{i}]")
    before = module.pure_stats()
    got = module(x_eval, train=False, **kwargs)
    assert_rel_close(got, y_eval, TOL, name=f"{name}[nnx eval]")
    # Eval leaves the statistics alone; the default (no train=) is eval.
    jax.tree.map(np.testing.assert_array_equal, module.pure_stats(), before)
    np.testing.assert_array_equal(module(x_eval, **kwargs), got)


@pytest.mark.parametrize("name", STATEFUL)
def test_linen_matches_pure_over_training_and_eval(name):
    cfg, params, kwargs, xs, x_eval = _setup(name)
    outs, all_stats, y_eval = _pure_run(name, cfg, params, kwargs, xs, x_eval)
    module = linen.wrapper_class(name)(cfg)

    # init (even with train=True) leaves the statistics at their initial values.
    variables = nn.unbox(module.init(jax.random.key(0), xs[0], train=True, **kwargs))
    jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], nnx.initial_stats(cfg))
    variables = {"params": params, "batch_stats": variables["batch_stats"]}

    train = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"], **kwargs))
    for i, x in enumerate(xs):
        y, updates = train(variables, x)
        variables = {**variables, **updates}
        assert_rel_close(y, outs[i], TOL, name=f"{name}[linen y{i}]")
        assert_rel_close(variables["batch_stats"], all_stats[i], TOL, name=f"{name}[stats{i}]")
    got = module.apply(variables, x_eval, **kwargs)
    assert_rel_close(got, y_eval, TOL, name=f"{name}[linen eval]")
    # Eval with a mutable collection still leaves the statistics alone.
    _, updates = module.apply(variables, x_eval, train=False, mutable=["batch_stats"], **kwargs)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


def test_nnx_prepbn_schedule_follows_stored_step():
    """Without step=, PRepBN's gamma comes from the step counter the module stores."""
    cfg = prepbn.Config(dim=8, warmup_steps=0, decay_steps=2)
    rng = np.random.default_rng(3)
    module = nnx.PRepBN(cfg, rngs=fnnx.Rngs(0))
    params, stats = module.pure_params(), prepbn.init_stats(cfg)
    for _ in range(3):
        x = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
        want, stats = prepbn.apply(params, x, cfg, stats=stats, train=True)
        assert_rel_close(module(x, train=True), want, TOL)
    assert int(module.pure_stats()["step"]) == 3


def test_nnx_stats_constructor_and_load_stats():
    cfg = prepbn.Config(dim=8)
    stats = dict(prepbn.init_stats(cfg), step=jnp.asarray(5, jnp.int32))
    module = nnx.PRepBN(cfg, rngs=fnnx.Rngs(0), stats=stats)
    assert int(module.pure_stats()["step"]) == 5
    module.load_stats(prepbn.init_stats(cfg))
    assert int(module.pure_stats()["step"]) == 0
    # split/merge keeps the statistics.
    again = fnnx.merge(*fnnx.split(module))
    jax.tree.map(np.testing.assert_array_equal, again.pure_stats(), module.pure_stats())


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_nnx_rejects_stats_keyword():
    module = nnx.EvoNormB0(dim=8, rngs=fnnx.Rngs(0))
    with pytest.raises(TypeError, match="stats must not be passed to a stateful module"):
        module(jnp.ones((2, 3, 8)), stats=nnx.initial_stats(module.cfg))


def test_linen_rejects_stats_keyword():
    module = linen.EvoNormB0(evonorm.EvoNormB0Config(dim=8))
    with pytest.raises(TypeError, match="stats must not be passed to a stateful module"):
        module.init(jax.random.key(0), jnp.ones((2, 3, 8)), stats={})


def test_linen_train_needs_mutable_batch_stats():
    cfg = prepbn.Config(dim=8)
    module = linen.PRepBN(cfg)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8)), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"the 'batch_stats' collection must be mutable"):
        module.apply(variables, x, train=True)


def test_nnx_rejects_stats_for_stateless_layer():
    with pytest.raises(ValueError, match="stats must be None for the stateless layer 'dense'"):
        nnx.Dense(d_in=4, d_out=4, rngs=fnnx.Rngs(0), stats={})


def test_nnx_stateless_layer_has_no_stats():
    module = nnx.Dense(d_in=4, d_out=4, rngs=fnnx.Rngs(0))
    with pytest.raises(TypeError, match="layer 'dense' is not stateful: it has no statistics"):
        module.pure_stats()


def test_initial_stats_of_stateless_layer():
    with pytest.raises(TypeError, match="is not stateful: it has no running statistics"):
        nnx.initial_stats(dense.Config(d_in=4, d_out=4))


def test_nnx_rejects_stats_of_wrong_structure():
    with pytest.raises(ValueError, match="stats must have the tree"):
        nnx.EvoNormB0(dim=8, rngs=fnnx.Rngs(0), stats={"mean": jnp.zeros(8)})


def test_nnx_rejects_stats_of_wrong_shape():
    with pytest.raises(ValueError, match=r"stats\['var'\] must have shape \(8,\)"):
        nnx.EvoNormB0(dim=8, rngs=fnnx.Rngs(0), stats={"var": jnp.ones(9)})


# A throwaway stateful layer, registered only for the duration of one test (monkeypatch).
@dataclasses.dataclass(frozen=True, kw_only=True)
class _FakeConfig(core.LayerConfig):
    dim: int = 4


def _fake_apply(params, x, cfg, *, stats=None, train=False):
    return x  # wrong: a stateful layer must return (y, new_stats) in training


def init_stats(cfg: _FakeConfig) -> dict[str, jax.Array]:
    return {"count": jnp.zeros((), jnp.int32)}


def _register_fake(monkeypatch, apply) -> None:
    fns = core.LayerFns("fake_stateful", _FakeConfig, lambda cfg: {}, apply, stateful=True)
    monkeypatch.setitem(core._LAYERS, _FakeConfig, fns)
    monkeypatch.setitem(core._BY_NAME, "fake_stateful", fns)


def test_initial_stats_needs_init_stats_function(monkeypatch):
    def apply(params, x, cfg, *, stats=None, train=False):
        return x

    apply.__module__ = "no_such_module"
    _register_fake(monkeypatch, apply)
    with pytest.raises(TypeError, match="must define init_stats"):
        nnx.initial_stats(_FakeConfig())


def test_stateful_apply_must_return_pair(monkeypatch):
    _register_fake(monkeypatch, _fake_apply)
    module = nnx.Layer(_FakeConfig(), params={})
    with pytest.raises(TypeError, match=r"must return \(y, new_stats\) with train=True"):
        module(jnp.ones((2, 4)), train=True)

"""Shared suites run on every registered layer that has an ``Example``.

The layers come from the registry (``jaxlayers.registry`` imports every layer module), so a new
layer is covered as soon as it registers an example; ids are the layer names
(``pytest tests/jaxlayers/test_suites.py -k attention``). Checks:

- init: shapes/dtypes match ``param_specs``; the golden parameter tree is unchanged
- jit == eager; gradients finite and nonzero for every float param
- bf16 compute close to float32 (``Example.rtol_bf16`` or ``tests/tolerances.py``)
- the NNX and linen wrappers give the pure functions' numbers on the same params
- mixers (``decode=True``): step-by-step decode == apply; prefill (``return_state``) + step ==
  apply
- sharded over a 2x4 ("data", "tensor") mesh == unsharded

Each layer is initialised once (cached) and each check compiles once; keep examples tiny.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlayers import core, registry
from tests import tolerances
from tests._asserts import assert_rel_close
from tests.jaxlayers import regen_golden

EXAMPLES: dict[str, core.Example] = registry.examples()
NAMES = sorted(EXAMPLES)
DECODE_NAMES = [n for n in NAMES if core.layer_fns(n).step is not None and EXAMPLES[n].decode]

F32 = tolerances.forward(jnp.float32)
# Same function, same params: the wrappers only add bookkeeping.
WRAPPER_TOL = 1e-6

# Logical axis -> mesh axis for the sharding suite; names not listed are replicated.
SHARDING_RULES: dict[str, str | None] = {
    "embed": None,
    "layers": None,
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "q_heads": "tensor",
    "vocab": "tensor",
    "experts": "tensor",
    "tables": "tensor",
    "rows": "tensor",
}


# ----------------------------------------------------------------------------------------------
# Cached per-layer fixtures
# ----------------------------------------------------------------------------------------------


def _seed(name: str, what: str) -> jax.Array:
    return jax.random.key(zlib.crc32(f"{name}/{what}".encode()) & 0x7FFFFFFF)


def _ex(name: str) -> core.Example:
    return EXAMPLES[name]


def _kwargs(name: str) -> dict[str, Any]:
    return dict(_ex(name).apply_kwargs)


@functools.cache
def _params(name: str) -> Any:
    # Eager: the initializers' kernels are compiled once and shared by every layer, which is
    # cheaper than compiling one init program per layer.
    return core.init(_seed(name, "params"), _ex(name).config)


@functools.cache
def _input(name: str) -> jax.Array:
    ex = _ex(name)
    key = _seed(name, "x")
    if ex.input_kind == "tokens":
        return jax.random.randint(key, ex.input_shape, 0, ex.input_vocab, jnp.int32)
    if ex.input_kind != "float":
        raise ValueError(f"unknown Example.input_kind {ex.input_kind!r} for layer {name!r}")
    return jax.random.normal(key, ex.input_shape, jnp.float32)


def _apply_fn(name: str, cfg: Any = None):
    cfg = _ex(name).config if cfg is None else cfg
    kwargs = _kwargs(name)
    return lambda p, x: core.apply(p, x, cfg, **kwargs)


@functools.cache
def _reference(name: str) -> Any:
    """The jitted float32 output: the value every other check compares with."""
    return jax.jit(_apply_fn(name))(_params(name), _input(name))


def _is_float(a: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.floating)


def _paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ----------------------------------------------------------------------------------------------
# Init and the golden tree
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_init_matches_param_specs(name):
    cfg = _ex(name).config
    specs = core.param_specs(cfg)
    want = core.abstract_params(specs, cfg.param_dtype)
    got = _params(name)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g, w in zip(_paths(want), jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape, f"{name}{path}: shape {g.shape} != spec {w.shape}"
        assert g.dtype == w.dtype, f"{name}{path}: dtype {g.dtype} != spec {w.dtype}"
        assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{name}{path}: non-finite init"
    axes = core.logical_axes(specs)
    for path, a, w in zip(
        _paths(want),
        jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
        jax.tree.leaves(want),
        strict=True,
    ):
        assert len(a) == len(w.shape), f"{name}{path}: axes {a} do not name shape {w.shape}"


@pytest.fixture(scope="module")
def golden():
    if regen_golden.regen_requested():
        regen_golden.write()
    return regen_golden.load()


_REGEN_HINT = (
    "if the change is intended, regenerate with `python -m tests.jaxlayers.regen_golden` "
    "(or JAXLAYERS_REGEN_GOLDEN=1 pytest ...) and commit tests/jaxlayers/golden/params_tree.json"
)


@pytest.mark.parametrize("name", NAMES)
def test_golden_param_tree(name, golden):
    assert name in golden, f"layer {name!r} has no golden param tree; {_REGEN_HINT}"
    got = regen_golden.layer_tree(_ex(name).config)
    want = golden[name]
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = {k: (want[k], got[k]) for k in sorted(set(got) & set(want)) if got[k] != want[k]}
    assert not (missing or extra or changed), (
        f"param tree of {name!r} changed: missing {missing}, new {extra}, "
        f"changed (golden, now) {changed}; {_REGEN_HINT}"
    )


def test_golden_has_no_stale_layers(golden):
    stale = sorted(set(golden) - set(NAMES))
    assert not stale, f"golden file lists layers no longer registered: {stale}; {_REGEN_HINT}"


# ----------------------------------------------------------------------------------------------
# jit, grad, bf16
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
    eager = _apply_fn(name)(_params(name), _input(name))
    assert_rel_close(_reference(name), eager, F32, name=name)


@pytest.mark.parametrize("name", NAMES)
def test_grad_finite_and_nonzero(name):
    params, x = _params(name), _input(name)
    ref = _reference(name)
    probes = [
        jax.random.normal(_seed(name, f"probe{i}"), jnp.shape(r), jnp.float32)
        for i, r in enumerate(jax.tree.leaves(ref))
    ]
    fn = _apply_fn(name)
    float_x = _is_float(x)

    def objective(p, xx):
        outs = jax.tree.leaves(fn(p, xx))
        return sum(jnp.sum(o.astype(jnp.float32) * r) for o, r in zip(outs, probes, strict=True))

    argnums = (0, 1) if float_x else 0
    grads = jax.jit(jax.grad(objective, argnums=argnums))(params, x)
    g_params = grads[0] if float_x else grads
    for path, g, p in zip(_paths(params), jax.tree.leaves(g_params), jax.tree.leaves(params)):
        if not _is_float(p):
            continue
        g = np.asarray(g, np.float32)
        assert np.all(np.isfinite(g)), f"{name}{path}: non-finite gradient"
        assert np.any(g != 0), f"{name}{path}: gradient is all zeros"
    if float_x:
        gx = np.asarray(grads[1], np.float32)
        assert np.all(np.isfinite(gx)) and np.any(gx != 0), f"{name}: bad input gradient"


@pytest.mark.parametrize("name", NAMES)
def test_bf16_close_to_f32(name):
    ex = _ex(name)
    cfg = ex.config.replace(dtype=jnp.bfloat16)
    x = _input(name)
    if _is_float(x):
        x = x.astype(jnp.bfloat16)
    out = jax.jit(_apply_fn(name, cfg))(_params(name), x)
    tol = ex.rtol_bf16 if ex.rtol_bf16 is not None else tolerances.forward(jnp.bfloat16)
    assert_rel_close(out, _reference(name), tol, name=f"{name}[bf16]")


# ----------------------------------------------------------------------------------------------
# Flax wrappers
# ----------------------------------------------------------------------------------------------


def _wrapper_reference(name: str) -> tuple[Any, Any]:
    """(output, updated stats) of the pure reference; stateless layers have stats None.

    A stateful layer's example trains (``train=True``) from ``stats=None``, i.e. from its
    initial statistics, which is where a fresh wrapper starts too; the wrappers return ``y``
    and keep ``new_stats`` (checked here against the pure ones). Several consecutive calls and
    eval are in test_flax_stateful.py.
    """
    ref = _reference(name)
    if core.layer_fns(name).stateful and dict(_kwargs(name)).get("train", False):
        return ref
    return ref, None


@pytest.mark.parametrize("name", NAMES)
def test_nnx_matches_pure(name):
    from flax import nnx as fnnx

    from jaxlayers import nnx

    cfg, params, x = _ex(name).config, _params(name), _input(name)
    cls = nnx.wrapper_class(name)

    fresh = cls(cfg, rngs=fnnx.Rngs(0))
    assert jax.tree.structure(fresh.pure_params()) == jax.tree.structure(params)
    specs = fnnx.get_partition_spec(fnnx.state(fresh, fnnx.Param))
    got_axes = [
        tuple(v.get_value())
        for v in jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, fnnx.Variable))
    ]
    want_axes = jax.tree.leaves(
        core.logical_axes(core.param_specs(cfg)), is_leaf=lambda a: isinstance(a, tuple)
    )
    assert got_axes == [tuple(a) for a in want_axes]

    module = cls(cfg, params=params)
    kwargs = _kwargs(name)
    out = fnnx.jit(lambda m, xx: m(xx, **kwargs))(module, x)
    ref, ref_stats = _wrapper_reference(name)
    assert_rel_close(out, ref, WRAPPER_TOL, name=f"{name}[nnx]")
    if ref_stats is not None:
        assert_rel_close(module.pure_stats(), ref_stats, WRAPPER_TOL, name=f"{name}[nnx stats]")

    # load_params round-trips into an existing module.
    fresh.load_params(params)
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), fresh.pure_params(), params)
    assert all(jax.tree.leaves(chex_equal))


@pytest.mark.parametrize("name", NAMES)
def test_linen_matches_pure(name):
    import flax.linen as nn

    from jaxlayers import linen

    cfg, params, x = _ex(name).config, _params(name), _input(name)
    module = linen.wrapper_class(name)(cfg)
    kwargs = _kwargs(name)

    boxed = jax.eval_shape(lambda k: module.init(k, x, **kwargs), jax.random.key(0))
    got_tree = boxed.get("params", {})
    want = core.abstract_params(core.param_specs(cfg), cfg.param_dtype)
    unboxed = nn.unbox(got_tree)
    assert jax.tree.structure(unboxed) == jax.tree.structure(want)
    for path, g, w in zip(
        _paths(want), jax.tree.leaves(unboxed), jax.tree.leaves(want), strict=True
    ):
        assert (g.shape, g.dtype) == (w.shape, w.dtype), f"{name}{path}"
    pspecs = nn.get_partition_spec(got_tree)
    got_axes = [
        tuple(s) for s in jax.tree.leaves(pspecs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    ]
    want_axes = jax.tree.leaves(
        core.logical_axes(core.param_specs(cfg)), is_leaf=lambda a: isinstance(a, tuple)
    )
    assert got_axes == [tuple(a) for a in want_axes]

    ref, ref_stats = _wrapper_reference(name)
    if ref_stats is None:
        out = jax.jit(lambda p, xx: module.apply({"params": p}, xx, **kwargs))(params, x)
    else:
        # Stateful: the statistics start at their initial values and come back updated.
        out, updates = jax.jit(
            lambda p, xx: module.apply({"params": p}, xx, mutable=["batch_stats"], **kwargs)
        )(params, x)
        stats = updates["batch_stats"]
        assert_rel_close(stats, ref_stats, WRAPPER_TOL, name=f"{name}[linen stats]")
    assert_rel_close(out, ref, WRAPPER_TOL, name=f"{name}[linen]")


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _state_dtype(x: jax.Array) -> Any:
    return x.dtype if _is_float(x) else jnp.float32


def _decode(name: str, params: Any, state: Any, xs: jax.Array) -> jax.Array:
    """Run ``step`` over ``xs [b, t, ...]`` with ``lax.scan``; returns ``[b, t, ...]``."""
    cfg = _ex(name).config

    def body(s, x_t):
        y_t, s = core.step(params, s, x_t, cfg)
        return s, y_t

    _, ys = jax.lax.scan(body, state, jnp.moveaxis(xs, 1, 0))
    return jnp.moveaxis(ys, 0, 1)


@pytest.mark.parametrize("name", DECODE_NAMES)
def test_step_decode_matches_apply(name):
    cfg, x = _ex(name).config, _input(name)

    @jax.jit
    def run(p, xx):
        return _decode(name, p, core.init_state(cfg, xx.shape[0], _state_dtype(xx)), xx)

    out = run(_params(name), x)
    tol = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]
    assert_rel_close(out, _reference(name), tol, name=f"{name}[step]")


@pytest.mark.parametrize("name", DECODE_NAMES)
def test_prefill_then_step_matches_apply(name):
    cfg, x = _ex(name).config, _input(name)
    t0 = max(1, x.shape[1] // 2)

    @jax.jit
    def run(p, xx):
        y0, state = core.apply(p, xx[:, :t0], cfg, return_state=True)
        return jnp.concatenate([y0, _decode(name, p, state, xx[:, t0:])], axis=1)

    out = run(_params(name), x)
    tol = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]
    assert_rel_close(out, _reference(name), tol, name=f"{name}[prefill+step]")


# ----------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------


@functools.cache
def _mesh() -> Mesh:
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    return Mesh(devices, ("data", "tensor"))


def _pspec(axes: tuple, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Map logical axes to mesh axes; a dim the mesh axis does not divide is replicated."""
    out, used = [], set()
    for name, dim in zip(axes, shape, strict=True):
        mesh_axis = SHARDING_RULES.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis in used or dim % mesh.shape[mesh_axis]:
            out.append(None)
        else:
            out.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*out)


@pytest.mark.parametrize("name", NAMES)
def test_sharded_matches_unsharded(name):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = _mesh()
    cfg, params, x = _ex(name).config, _params(name), _input(name)
    axes = core.logical_axes(core.param_specs(cfg))
    shardings = jax.tree.map(
        lambda a, p: NamedSharding(mesh, _pspec(tuple(a), p.shape, mesh)),
        axes,
        params,
        is_leaf=lambda a: isinstance(a, tuple),
    )
    p_sharded = jax.device_put(params, shardings)
    batch_axis = "data" if x.shape[0] % mesh.shape["data"] == 0 else None
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec(batch_axis)))
    out = jax.jit(_apply_fn(name))(p_sharded, x_sharded)
    assert_rel_close(out, _reference(name), F32, name=f"{name}[sharded]")


def test_registry_is_not_empty():
    # Guards against an import error silently leaving the suites with nothing to run.
    assert {"dense", "attention", "block", "lm"} <= set(NAMES), NAMES

"""Memory layers with row-sharded tables (``table_axis``) == the unsharded layers.

On a ("data"=2, "table"=4) mesh of fake CPU devices: outputs and gradients (tables and input),
the table gradient staying row-sharded, one all-reduce per lookup and no all-gather of a table,
the manual path inside a user shard_map, a small LM, and the error messages.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlayers import attention, core
from jaxlayers.lookup import memoryformer, peer, product_key
from jaxlayers.models import lm
from jaxlayers.models.lm import LMConfig
from tests import tolerances
from tests._asserts import assert_rel_close

F32 = jnp.float32
SHARDED = {"table_axis": "table", "table_token_axis": "data"}

# name -> (config without table_axis, apply, row-sharded param names)
LAYERS = {
    "memoryformer": (
        memoryformer.Config(d_in=16, d_out=24, tau=4),
        memoryformer.apply,
        ("tables",),
    ),
    "pkm": (
        product_key.Config(d_in=16, d_out=16, n_sub=8, k=4, heads=2, d_key=8),
        product_key.apply,
        ("values",),
    ),
    "ultramem": (
        product_key.UltraMemConfig(
            d_in=16, d_out=16, n_sub=8, k=4, heads=2, d_key=8, rank=2, d_value=12
        ),
        product_key.ultramem_apply,
        ("values",),
    ),
    "peer": (
        peer.Config(d_in=16, d_out=16, n_sub=8, k=4, heads=2, d_key=8),
        peer.apply,
        ("down", "up"),
    ),
}


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "table"))


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key), np.uint32).ravel().tolist())


def _setup(name, key, shape=(2, 8)):
    cfg, apply, _ = LAYERS[name]
    rng = _rng(key)
    params = core.init_params(jax.random.key(int(rng.integers(2**31))), core.param_specs(cfg))
    x = jnp.asarray(rng.standard_normal(shape + (cfg.d_in,)), F32)
    ct = jnp.asarray(rng.standard_normal(shape + (cfg.d_out,)), F32)
    return cfg, apply, params, x, ct


def _place(params, cfg, mesh):
    """Params on ``mesh``: logical "table" -> mesh axis "table", everything else replicated."""
    axes = core.logical_axes(core.param_specs(cfg))
    spec = lambda a: P(*("table" if n == memoryformer.ROW_AXIS else None for n in a))
    return jax.tree.map(
        lambda a, p: jax.device_put(p, NamedSharding(mesh, spec(a))),
        axes,
        params,
        is_leaf=lambda a: isinstance(a, tuple),
    )


def _loss_fn(apply, cfg):
    def f(params, x, ct):
        y = apply(params, x, cfg)
        return jnp.sum(y * ct), y

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _collectives(hlo: str) -> dict[str, list[str]]:
    """{op: [result shape of each instruction]} of the collectives in compiled HLO text (a
    combined collective has a tuple shape: its components are joined with ", ")."""
    pattern = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(_COLLECTIVES) + r")(?:-start)?\(")
    found = {op: [] for op in _COLLECTIVES}
    for shape, op in pattern.findall(hlo):
        found[op].append(re.sub(r"\{[^}]*\}", "", shape).strip("()"))
    return found


def _moved(collectives: dict[str, list[str]]) -> list[tuple[int, ...]]:
    """Every array shape moved by any collective (1-sized dims dropped)."""
    dims = re.findall(r"\w+\[([\d,]*)\]", " ".join(", ".join(v) for v in collectives.values()))
    return [tuple(int(d) for d in x.split(",") if d and int(d) != 1) for x in dims]


# UltraMem shares PKM's sharded path (product_key._values_sum) and compiles slowly.
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "ultramem" else n for n in sorted(LAYERS)],
)
def test_matches_unsharded(name, key, mesh):
    """Outputs and gradients (params and x) equal the unsharded layer; the table gradients
    come back row-sharded; no collective moves a whole table (forward + backward); the
    forward has exactly one all-reduce, of this device's ``y [8 tokens, d]``."""
    cfg, apply, params, x, ct = _setup(name, key)
    (_, y_ref), (g_ref, gx_ref) = _loss_fn(apply, cfg)(params, x, ct)

    cfg_s = cfg.replace(**SHARDED)
    p_s = _place(params, cfg_s, mesh)
    x_s = jax.device_put(x, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        step = _loss_fn(apply, cfg_s).lower(p_s, x_s, ct).compile()
        fwd = jax.jit(lambda p, x: apply(p, x, cfg_s)).lower(p_s, x_s).compile()
    (_, y), (g, gx) = step(p_s, x_s, ct)

    assert_rel_close(y, y_ref, tolerances.forward(F32), f"{name} y")
    assert_rel_close(gx, gx_ref, tolerances.grad(F32), f"{name} dx")
    assert_rel_close(g, g_ref, tolerances.grad(F32), f"{name} dparams")
    tables = LAYERS[name][2]
    for t in tables:
        want = NamedSharding(mesh, P(*p_s[t].sharding.spec))
        assert p_s[t].sharding.spec[-2] == "table"
        assert g[t].sharding.is_equivalent_to(want, g[t].ndim), (
            f"{name}: d{t} sharding {g[t].sharding} != {want}"
        )
    both = _collectives(step.as_text())
    full = [tuple(d for d in params[t].shape if d != 1) for t in tables]
    assert not any(t in _moved(both) for t in full), f"{name}: a whole table moved: {both}"
    # Only all-reduces are counted: XLA's partitioning of lax.top_k (the PKM / PEER routing,
    # before the lookup) all-gathers the data-split scores on CPU, with or without table_axis.
    d = params[tables[-1]].shape[-1]  # width of the summed rows (UltraMem: d_value)
    assert _collectives(fwd.as_text())["all-reduce"] == [f"f32[8,{d}]"]


@pytest.mark.parametrize("tables", ["local_rows", "replicated"])
def test_inside_shard_map(tables, key, mesh):
    """Inside a user shard_map that binds the table axis (e.g. the sequence-parallel LM, whose
    params enter replicated): this shard's row block (one psum) or the full replicated tables
    (no collective) both give the unsharded output and parameter gradients."""
    cfg, apply, params, x, ct = _setup("pkm", key)
    (_, y_ref), (g_ref, _) = _loss_fn(apply, cfg)(params, x, ct)
    cfg_s = cfg.replace(**SHARDED)
    p_spec = {k: P() for k in params}
    if tables == "local_rows":
        p_spec["values"] = P("table", None)
    inner = jax.shard_map(
        lambda p, x: apply(p, x, cfg_s),
        mesh=mesh,
        in_specs=(p_spec, P("data")),
        out_specs=P("data"),
        check_vma=False,
    )
    with jax.set_mesh(mesh):
        (_, y), (g, _) = _loss_fn(lambda p, x, c: inner(p, x), cfg)(params, x, ct)
    assert_rel_close(y, y_ref, tolerances.forward(F32), f"pkm[{tables}] y")
    assert_rel_close(g, g_ref, tolerances.grad(F32), f"pkm[{tables}] dparams")


@pytest.mark.slow
def test_memoryformer_block_explicit_mesh(key):
    """The FFN replacement (two sharded projections) on a ``jax.make_mesh`` (Explicit axes)."""
    cfg = memoryformer.BlockConfig(d_model=16, tau=4)
    rng = _rng(key)
    params = core.init_params(jax.random.key(1), memoryformer.block_param_specs(cfg))
    x = jnp.asarray(rng.standard_normal((2, 8, 16)), F32)
    f = lambda c: jax.jit(jax.grad(lambda p: jnp.sum(memoryformer.block_apply(p, x, c) ** 2)))
    g_ref = f(cfg)(params)
    mesh = jax.make_mesh((2, 4), ("data", "table"))
    with jax.set_mesh(mesh):
        g = f(cfg.replace(**SHARDED))(params)
    assert_rel_close(g, g_ref, tolerances.grad(F32), "block dparams")


def test_lm_with_sharded_pkm(key, mesh):
    """A one-block LM whose MLP is a PKM with row-sharded values: same loss and gradients."""
    d, v = 16, 32
    mlp = product_key.Config(d_in=d, d_out=d, n_sub=8, k=4, heads=2, d_key=8)
    mixer = attention.Config(d_model=d, num_heads=2)
    cfg = LMConfig.uniform(vocab_size=v, d_model=d, num_layers=1, mixer=mixer, mlp=mlp)
    cfg_s = LMConfig.uniform(
        vocab_size=v, d_model=d, num_layers=1, mixer=mixer, mlp=mlp.replace(**SHARDED)
    )
    params = lm.init(key, cfg)
    tokens = jnp.asarray(_rng(key).integers(0, v, (2, 8)), jnp.int32)
    grad = jax.value_and_grad(lambda p, c: lm.loss(p, {"tokens": tokens}, c)[0])
    step = jax.jit(grad, static_argnums=1)
    loss_ref, g_ref = step(params, cfg)
    p_s = _place(params, cfg_s, mesh)
    with jax.set_mesh(mesh):
        loss, g = step(p_s, cfg_s)
    assert_rel_close(loss, loss_ref, tolerances.forward(F32), "loss")
    assert_rel_close(g, g_ref, tolerances.grad(F32), "grads")
    values = g["blocks"]["0"]["mlp"]["values"]
    assert values.sharding.is_equivalent_to(NamedSharding(mesh, P("table", None)), 2)


def test_param_axes():
    """Row dims are named "table" when table_axis is set; unchanged otherwise."""
    for name, (cfg, _, tables) in LAYERS.items():
        plain = core.logical_axes(core.param_specs(cfg))
        sharded = core.logical_axes(core.param_specs(cfg.replace(**SHARDED)))
        for t in tables:
            assert memoryformer.ROW_AXIS not in plain[t], name
            assert tuple(sharded[t]).count(memoryformer.ROW_AXIS) == 1, name
            assert sharded[t][-2] == memoryformer.ROW_AXIS, name


# ---------------------------------------------------------------------------------------------
# Errors: one test per message.
# ---------------------------------------------------------------------------------------------


def _pkm(**kw):
    return product_key.Config(d_in=16, d_out=16, n_sub=8, k=4, heads=2, d_key=8, **kw)


def _run_pkm(cfg, tokens=(2, 8)):
    """Trace (no compile) a PKM apply: the checks run at trace time."""
    params = core.abstract_params(core.param_specs(cfg))
    x = jax.ShapeDtypeStruct(tokens + (16,), F32)
    return jax.eval_shape(lambda p, x: product_key.apply(p, x, cfg), params, x)


def test_error_no_mesh():
    with pytest.raises(ValueError, match=r"table_axis='table' .* no mesh is set: .*jax.set_mesh"):
        _run_pkm(_pkm(table_axis="table"))


def test_error_axis_not_in_mesh(mesh):
    with jax.set_mesh(mesh):
        with pytest.raises(
            ValueError, match=r"table_axis must be one of the mesh axes \('data', 'table'\)"
        ):
            _run_pkm(_pkm(table_axis="model"))


def test_error_rows_not_divisible(mesh):
    cfg = product_key.Config(d_in=16, d_out=16, n_sub=5, k=4, heads=2, d_key=8, table_axis="table")
    with jax.set_mesh(mesh):
        with pytest.raises(
            ValueError,
            match=r"the n_sub\*\*2 = 25 value rows must be divisible by the size 4 of mesh "
            r"axis table_axis='table'",
        ):
            _run_pkm(cfg)


def test_error_tokens_not_divisible(mesh):
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"\(tokens, 3\) must be divisible by the size 2 of"):
            _run_pkm(_pkm(**SHARDED), tokens=(3,))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"table_token_axis": "data"}, "table_token_axis='data' needs table_axis"),
        ({"table_axis": ""}, "table_axis must be a mesh axis name"),
        ({"table_axis": "t", "table_token_axis": "t"}, "table_token_axis must differ from"),
        ({"table_axis": "t", "table_token_axis": ("d", "d")}, "tuple of distinct names"),
    ],
    ids=["token-axis-alone", "empty-name", "same-axes", "repeated-token-axis"],
)
def test_error_config(kw, match):
    with pytest.raises(ValueError, match=match):
        _pkm(**kw)

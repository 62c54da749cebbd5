"""The NNX and linen wrappers (equality with the pure functions for every layer is in
test_suites.py; this file covers construction, naming, training and decoding through them)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as fnnx
from jax.sharding import PartitionSpec

from jaxlayers import attention, core, dense, linen, mlp, nnx, registry
from jaxlayers.models import lm
from jaxlayers.models.lm import LMConfig
from tests import tolerances
from tests._asserts import assert_rel_close

D, V = 16, 32


def _lm_cfg() -> LMConfig:
    return LMConfig.uniform(
        vocab_size=V,
        d_model=D,
        num_layers=2,
        mixer=attention.Config(d_model=D, num_heads=4, num_kv_heads=2, max_decode_len=16),
        mlp=mlp.swiglu(D, 32),
        placement="peri",
    )


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "cls_name"),
    [
        ("dense", "Dense"),
        ("rms_norm", "RMSNorm"),
        ("layer_norm", "LayerNorm"),
        ("attention", "Attention"),
        ("mlp", "MLP"),
        ("embedding", "Embedding"),
        ("block", "Block"),
        ("lm", "LM"),
    ],
)
def test_every_layer_has_named_wrappers(layer, cls_name):
    assert registry.class_name(layer) == cls_name
    assert getattr(nnx, cls_name) is nnx.wrapper_class(layer)
    assert getattr(linen, cls_name) is linen.wrapper_class(layer)
    assert issubclass(getattr(nnx, cls_name), nnx.Layer)
    assert issubclass(getattr(linen, cls_name), linen.Layer)


def test_all_registered_layers_are_wrapped():
    for name in registry.all_layers():
        cls_name = registry.class_name(name)
        assert cls_name in dir(nnx) and cls_name in dir(linen), name


def test_unknown_wrapper_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchLayer'"):
        nnx.NoSuchLayer  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchLayer'"):
        linen.NoSuchLayer  # noqa: B018


# ----------------------------------------------------------------------------------------------
# NNX
# ----------------------------------------------------------------------------------------------


def test_nnx_from_config_fields(key):
    layer = nnx.Dense(d_in=4, d_out=8, use_bias=False, rngs=fnnx.Rngs(0))
    assert layer.cfg == dense.Config(d_in=4, d_out=8, use_bias=False)
    assert set(layer.params) == {"kernel"}
    x = jax.random.normal(key, (3, 4))
    assert_rel_close(layer(x), x @ layer.params["kernel"][...], tolerances.forward(jnp.float32))


def test_nnx_init_is_the_pure_init():
    cfg = dense.Config(d_in=4, d_out=8)
    rngs = fnnx.Rngs(params=7)
    want = core.init(fnnx.Rngs(params=7).params(), cfg)
    got = nnx.Dense(cfg, rngs=rngs).pure_params()
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_nnx_rejects_config_and_fields():
    with pytest.raises(TypeError, match="pass either a config or config fields"):
        nnx.Dense(dense.Config(d_in=4, d_out=8), d_in=4, rngs=fnnx.Rngs(0))


def test_nnx_rejects_wrong_config_type():
    with pytest.raises(
        TypeError, match=r"cfg must be a jaxlayers\.dense\.Config; got jaxlayers\.mlp"
    ):
        nnx.Dense(mlp.swiglu(4, 8), rngs=fnnx.Rngs(0))


def test_nnx_requires_rngs_or_params():
    with pytest.raises(ValueError, match="rngs must be given"):
        nnx.Layer(dense.Config(d_in=4, d_out=8))


def test_nnx_rejects_params_of_wrong_shape():
    cfg = dense.Config(d_in=4, d_out=8)
    bad = {"kernel": jnp.zeros((4, 9)), "bias": jnp.zeros((8,))}
    with pytest.raises(ValueError, match=r"params\['kernel'\] must have shape \(4, 8\)"):
        nnx.Layer(cfg, params=bad)


def test_nnx_rejects_params_of_wrong_structure():
    cfg = dense.Config(d_in=4, d_out=8)
    with pytest.raises(ValueError, match="params must have the tree of Config"):
        nnx.Layer(cfg, params={"kernel": jnp.zeros((4, 8))})


def test_nnx_partition_specs_map_through_rules():
    cfg = _lm_cfg()
    model = nnx.LM(cfg, rngs=fnnx.Rngs(0))
    specs = fnnx.get_partition_spec(fnnx.state(model))
    q = specs["params"]["blocks"]["0"]["mixer"]["q"]["kernel"].get_value()
    assert q == PartitionSpec("embed", "heads")
    emb = specs["params"]["embed"]["embedding"].get_value()
    assert emb == PartitionSpec("vocab", "embed")
    rules = (("embed", None), ("heads", "tensor"), ("vocab", "tensor"), ("mlp", "tensor"))
    mesh_specs = nn.logical_to_mesh(
        jax.tree.map(
            lambda v: v.get_value(), specs, is_leaf=lambda v: isinstance(v, fnnx.Variable)
        ),
        rules,
    )
    assert mesh_specs["params"]["blocks"]["0"]["mixer"]["q"]["kernel"] == PartitionSpec(
        None, "tensor"
    )


def test_nnx_lm_trains_with_plain_sgd(key):
    cfg = _lm_cfg()
    model = nnx.LM(cfg, rngs=fnnx.Rngs(0))
    start = jax.random.randint(key, (8, 1), 0, V, jnp.int32)
    batch = {"tokens": (start + jnp.arange(12, dtype=jnp.int32)[None]) % V}

    @fnnx.jit
    def train_step(m, batch):
        loss, grads = fnnx.value_and_grad(lambda m: m.loss(batch)[0])(m)
        params = fnnx.state(m, fnnx.Param)
        fnnx.update(m, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads))
        return loss

    losses = [float(train_step(model, batch)) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses
    # The module's params are the pure params: the pure loss agrees.
    pure_loss = lm.loss(model.pure_params(), batch, cfg)[0]
    np.testing.assert_allclose(pure_loss, model.loss(batch)[0], rtol=1e-6)


def test_nnx_lm_decode_and_generate(key):
    cfg = _lm_cfg()
    model = nnx.LM(cfg, rngs=fnnx.Rngs(1))
    params = model.pure_params()
    prompt = jax.random.randint(key, (2, 4), 0, V, jnp.int32)
    state = model.init_state(2)
    logits, state = model.step(state, prompt[:, 0])
    want, _ = lm.step(params, lm.init_state(cfg, 2), prompt[:, 0], cfg)
    np.testing.assert_array_equal(logits, want)
    last, _ = model.prefill(prompt)
    np.testing.assert_array_equal(last, lm.prefill(params, prompt, cfg)[0])
    out = model.generate(prompt, key=key, max_new_tokens=3)
    np.testing.assert_array_equal(out, lm.generate(params, prompt, cfg, key=key, max_new_tokens=3))


def test_nnx_split_merge_round_trip(key):
    layer = nnx.MLP(d_model=D, d_hidden=32, activation="silu", variant="glu", rngs=fnnx.Rngs(0))
    graphdef, state = fnnx.split(layer)
    again = fnnx.merge(graphdef, state)
    x = jax.random.normal(key, (2, 3, D))
    np.testing.assert_array_equal(again(x), layer(x))


# ----------------------------------------------------------------------------------------------
# linen
# ----------------------------------------------------------------------------------------------


def test_linen_init_follows_pure_init_scheme(key):
    cfg = mlp.swiglu(D, 32)
    module = linen.MLP(cfg)
    x = jax.random.normal(key, (2, 3, D))
    variables = nn.unbox(module.init(jax.random.key(0), x))
    again = nn.unbox(module.init(jax.random.key(0), x))
    jax.tree.map(np.testing.assert_array_equal, variables, again)
    leaves = jax.tree.leaves(variables["params"])
    # Distinct leaves get distinct values (keys are folded by path, not shared).
    assert not np.array_equal(
        variables["params"]["up"]["kernel"], variables["params"]["gate"]["kernel"]
    )
    assert all(np.std(np.asarray(a)) > 0 for a in leaves)


def test_linen_lm_methods_match_pure(key):
    cfg = _lm_cfg()
    module = linen.LM(cfg)
    params = lm.init(key, cfg)
    variables = {"params": params}
    tokens = jax.random.randint(key, (2, 6), 0, V, jnp.int32)
    loss, _ = module.apply(variables, {"tokens": tokens}, method="loss")
    np.testing.assert_allclose(loss, lm.loss(params, {"tokens": tokens}, cfg)[0], rtol=1e-6)
    out = module.apply(variables, tokens[:, :3], key=key, max_new_tokens=3, method="generate")
    np.testing.assert_array_equal(
        out, lm.generate(params, tokens[:, :3], cfg, key=key, max_new_tokens=3)
    )
    state = module.init_state(2)
    logits, _ = module.apply(variables, state, tokens[:, 0], method="step")
    want, _ = lm.step(params, lm.init_state(cfg, 2), tokens[:, 0], cfg)
    np.testing.assert_array_equal(logits, want)


def test_linen_module_inside_a_linen_model(key):
    cfg = dense.Config(d_in=D, d_out=8)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return linen.Dense(cfg, name="proj")(jax.nn.relu(x))

    x = jax.random.normal(key, (2, D))
    variables = Model().init(jax.random.key(0), x)
    params = nn.unbox(variables)["params"]["proj"]
    assert jax.tree.map(jnp.shape, params) == {"kernel": (D, 8), "bias": (8,)}
    want = dense.apply(params, jax.nn.relu(x), cfg)
    np.testing.assert_array_equal(Model().apply(variables, x), want)

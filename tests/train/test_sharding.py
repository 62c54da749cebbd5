"""Mesh construction and logical-axis rules."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxlayers import core
from jaxlayers.models import lm
from train import config as config_lib
from train import sharding


@pytest.mark.parametrize(
    "sizes, want",
    [
        ((-1, 1, 1), (8, 1, 1)),
        ((2, 2, 2), (2, 2, 2)),
        ((1, -1, 2), (1, 4, 2)),
        ((1, 1, 8), (1, 1, 8)),
    ],
    ids=["data_fill", "2x2x2", "fsdp_fill", "tensor8"],
)
def test_mesh_shapes(sizes, want):
    mesh = sharding.make_mesh(*sizes)
    assert tuple(mesh.shape[a] for a in sharding.AXES) == want
    assert mesh.axis_names == sharding.AXES


def test_mesh_not_equal_to_device_count():
    with pytest.raises(
        ValueError, match=r"data\*fsdp\*tensor = 2\*2\*4 = 16 must equal the number"
    ):
        sharding.make_mesh(2, 2, 4)


def test_mesh_fill_not_dividing_device_count():
    with pytest.raises(ValueError, match="does not divide the 8 available devices"):
        sharding.make_mesh(-1, 3, 1)


def test_mesh_two_fills():
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(-1, -1, 1)


@pytest.mark.parametrize("preset", ["tiny", "mqar-attention", "text-attention"])
def test_every_param_axis_of_the_presets_has_a_rule(preset):
    cfg = config_lib.get_preset(preset)
    model = config_lib.build_model_config(
        cfg, 264 if cfg.data.task == "text" else cfg.data.vocab_size
    )
    logical = core.logical_axes(lm.param_specs(model))
    assert sharding.unmapped_axes(logical) == set()


def test_partition_specs_on_a_2x2x2_mesh():
    mesh = sharding.make_mesh(2, 2, 2)
    cfg = config_lib.get_preset("text-attention")  # the mqar presets have no MLP
    model = config_lib.build_model_config(cfg, 264)
    specs = lm.param_specs(model)
    out = sharding.param_partition_specs(
        core.logical_axes(specs), core.abstract_params(specs), mesh
    )
    assert out["embed"]["embedding"] == P("tensor", "fsdp")  # (vocab, embed)
    block = out["blocks"]["0"]
    assert block["mixer"]["q"]["kernel"] == P("fsdp", "tensor")  # (embed, heads)
    assert block["mixer"]["o"]["kernel"] == P("tensor", "fsdp")  # (heads, embed)
    assert block["mlp"]["down"]["kernel"] == P("tensor", "fsdp")  # (mlp, embed)
    assert block["mixer_norm"]["scale"] in (P(None), P("fsdp"))


def test_undivisible_dims_and_repeated_axes_are_replicated():
    mesh = sharding.make_mesh(2, 2, 2)
    logical = {"a": ("embed", "mlp"), "b": ("mlp", "heads"), "c": ("mystery", "embed")}
    shapes = {
        "a": jax.ShapeDtypeStruct((3, 8), "float32"),  # 3 not divisible by fsdp=2
        "b": jax.ShapeDtypeStruct((4, 4), "float32"),  # both map to tensor: first wins
        "c": jax.ShapeDtypeStruct((4, 4), "float32"),
    }
    out = sharding.param_partition_specs(logical, shapes, mesh)
    assert out == {"a": P(None, "tensor"), "b": P("tensor", None), "c": P(None, "fsdp")}
    assert sharding.unmapped_axes(logical) == {"mystery"}


def test_bad_rule_axis():
    mesh = sharding.make_mesh(-1, 1, 1)
    with pytest.raises(ValueError, match="mesh axis must be one of"):
        sharding.param_partition_specs(
            {"a": ("embed",)},
            {"a": jax.ShapeDtypeStruct((8,), "float32")},
            mesh,
            rules=(("embed", "model"),),
        )

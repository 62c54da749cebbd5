"""Device mesh and the mapping of logical parameter axes onto it.

The mesh has three axes (as in MaxText / levanter):

    data    pure data parallelism: params replicated, batch rows split
    fsdp    batch rows split *and* params split along their "embed" dimension (ZeRO-3 style:
            each device stores 1/fsdp of every matrix, gathered for the matmul)
    tensor  params split along heads / MLP hidden / vocab (Megatron-style tensor parallelism)

and, only when its size is above 1, a fourth axis

    sequence  the tokens of every row split along time (context parallelism): the loss runs in a
              ``shard_map`` over every axis (``jaxlayers.models.sequence_parallel``); params are
              replicated over it. A mesh without sequence parallelism keeps the three axes above.

Every parameter carries logical axis names (``jaxlayers.core.ParamSpec.axes``, e.g.
``("embed", "mlp")``). :data:`DEFAULT_RULES` maps each name to a mesh axis (or None =
replicated). :func:`param_partition_specs` applies them with two fallbacks that keep any model
shardable: a dimension that the mesh axis does not divide is replicated, and a mesh axis is used
at most once per parameter (the first dimension that asks for it wins). Logical names with no
rule are replicated and reported by :func:`unmapped_axes`.

The mesh uses ``jax.sharding.Mesh`` with the default (Auto) axis types, so the jitted step needs
no ``jax.set_mesh``: XLA's partitioner propagates shardings from the explicit in/out shardings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "AXES",
    "DEFAULT_RULES",
    "BATCH_AXES",
    "SEQUENCE_AXIS",
    "resolve_mesh_shape",
    "make_mesh",
    "sequence_shards",
    "param_partition_specs",
    "param_shardings",
    "unmapped_axes",
    "batch_sharding",
    "replicated",
    "describe",
]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXIS = "sequence"

# logical axis name -> mesh axis (or None: replicated).
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", None),  # activations only; the batch sharding is BATCH_AXES
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", "tensor"),
    ("q_heads", "tensor"),
    ("key", None),
    ("value", None),
    ("head_dim", None),
    ("state", None),
    ("conv", None),
    ("layers", None),
    ("experts", "tensor"),
    ("table", "tensor"),
    ("memory", "tensor"),
    ("rank", None),
    ("norm", None),
)


def resolve_mesh_shape(
    data: int, fsdp: int, tensor: int, num_devices: int, sequence: int = 1
) -> tuple[int, ...]:
    """Fill one ``-1`` entry and check that the sizes multiply to ``num_devices``.

    Returns ``(data, fsdp, tensor)``, plus ``sequence`` when it is not 1.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    if sequence != 1:
        sizes[SEQUENCE_AXIS] = sequence
    free = [k for k, v in sizes.items() if v == -1]
    bad = {k: v for k, v in sizes.items() if v != -1 and v <= 0}
    if bad or len(free) > 1:
        raise ValueError(f"mesh sizes must be positive, with at most one -1 (= fill); got {sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {sizes} does not divide the {num_devices} available devices: "
                f"the fixed axes multiply to {fixed}, which does not divide {num_devices}"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        names = "*".join(sizes)
        values = "*".join(str(v) for v in sizes.values())
        raise ValueError(
            f"mesh {names} = {values} = {fixed} must equal the number of devices, "
            f"{num_devices}; set one axis to -1 to fill it"
        )
    return tuple(sizes.values())


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[Any] | None = None,
    sequence: int = 1,
) -> Mesh:
    """A (data, fsdp, tensor[, sequence]) mesh over ``devices`` (default: every device).

    The ``sequence`` axis exists only when ``sequence != 1``. Devices are laid out with
    ``mesh_utils.create_device_mesh`` (topology-aware on TPU), falling back to the plain device
    order where it does not apply (CPU, uneven shapes).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices), sequence)
    names = AXES + ((SEQUENCE_AXIS,) if len(shape) > len(AXES) else ())
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - any topology complaint: use the plain order
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, names)


def sequence_shards(mesh: Mesh) -> int:
    """Size of the mesh's sequence axis (1 when it has none)."""
    return dict(mesh.shape).get(SEQUENCE_AXIS, 1)


def _rules_dict(rules: Sequence[tuple[str, str | None]]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, axis in rules:
        if axis is not None and axis not in AXES:
            raise ValueError(f"rule {name!r} -> {axis!r}: mesh axis must be one of {AXES} or None")
        out.setdefault(name, axis)
    return out


def _spec_for(
    axes: tuple[str | None, ...], shape: tuple[int, ...], rules: dict, mesh: Mesh
) -> PartitionSpec:
    used: set[str] = set()
    parts: list[str | None] = []
    for name, dim in zip(axes, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or dim % mesh.shape[axis]:
            parts.append(None)
            continue
        used.add(axis)
        parts.append(axis)
    return PartitionSpec(*parts)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x)


def param_partition_specs(
    logical: Any,
    shapes: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES,
) -> Any:
    """PartitionSpec tree for params with logical axes ``logical`` and ``shapes`` (same tree).

    ``logical`` is ``jaxlayers.core.logical_axes(param_specs)``; ``shapes`` any tree of arrays or
    ``ShapeDtypeStruct`` with the same structure.
    """
    table = _rules_dict(rules)
    flat_axes, treedef = jax.tree.flatten(logical, is_leaf=_is_axes)
    flat_shapes = treedef.flatten_up_to(shapes)
    specs = [
        _spec_for(tuple(a), tuple(s.shape), table, mesh)
        for a, s in zip(flat_axes, flat_shapes, strict=True)
    ]
    return jax.tree.unflatten(treedef, specs)


def param_shardings(logical: Any, shapes: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedSharding tree (see :func:`param_partition_specs`)."""
    specs = param_partition_specs(logical, shapes, mesh, rules)
    return jax.tree.map(
        lambda p: NamedSharding(mesh, p), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def unmapped_axes(logical: Any, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> set:
    """Logical axis names used by ``logical`` that have no rule (they are replicated)."""
    table = _rules_dict(rules)
    names = {a for axes in jax.tree.leaves(logical, is_leaf=_is_axes) for a in axes}
    return {a for a in names if a is not None and a not in table}


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows split over (data, fsdp); other dims replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def describe(logical: Any, shapes: Any, mesh: Mesh, rules=DEFAULT_RULES) -> list[str]:
    """One line per parameter: path, shape, logical axes -> PartitionSpec."""
    specs = param_partition_specs(logical, shapes, mesh, rules)
    lines = []
    flat_specs = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
    flat_axes = jax.tree.leaves(logical, is_leaf=_is_axes)
    flat_shapes = jax.tree.leaves(shapes)
    for (path, spec), axes, s in zip(flat_specs, flat_axes, flat_shapes, strict=True):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        lines.append(f"{name:40s} {str(tuple(s.shape)):16s} {str(axes):28s} -> {tuple(spec)}")
    return lines

"""The device mesh and the logical-axis rules that place params, optimizer state and batches on it.

The model names every parameter axis (`vocab`, `embed`, `heads`, `kv`, `mlp`) and constrains its
activations as (`batch`, `length`, `embed` | `mlp`); `config.logical_axis_rules` maps those names to the
mesh axes `data`, `fsdp` and `tensor`. Batches are split over (`data`, `fsdp`): `fsdp` is data
parallelism whose params and optimizer state are also sharded (ZeRO-3); `tensor` splits heads and the
MLP (Megatron).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from flax_gpt2.modeling import lora as lora_lib
from flax_gpt2.modeling.lora import LoRAConfig

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 to take what the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(mesh_config.data), int(mesh_config.fsdp), int(mesh_config.tensor)]
    described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh ({described}): sizes must be positive, with at most one -1")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if len(devices) % rest:
            raise ValueError(f"mesh ({described}) does not divide the {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // rest
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh ({described}) needs {math.prod(shape)} devices but there are {len(devices)}")
    # Auto axes: XLA propagates shardings between our explicit in/out shardings and the model's constraints.
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def place(tree, shardings):
    """Host arrays (the same on every process) -> global arrays with `shardings`."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x[i])),
                        tree, shardings)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a token batch `[A, B, T]` (A accumulated micro-batches of B rows)."""
    return NamedSharding(mesh, P(None, *nn.logical_to_mesh_axes(("batch", None), rules)))


def batch_shards(mesh: Mesh, rules) -> int:
    """How many ways the batch dimension is split."""
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def param_shardings(abstract_boxed_params, mesh: Mesh, rules) -> Any:
    """Shardings of the params from `jax.eval_shape(model.init, ...)["params"]` (still boxed with names).

    A mesh axis that does not divide a parameter dimension (e.g. GPT-2 XL's 25 heads over tensor=2) is
    dropped for that dimension, and said so, rather than failing: the parameter is replicated there.
    """
    return logical_shardings(nn.get_partition_spec(abstract_boxed_params), nn.unbox(abstract_boxed_params),
                             mesh, rules)


def logical_shardings(specs, shapes, mesh: Mesh, rules) -> Any:
    """Shardings from a tree of logical `PartitionSpec`s (e.g. `lora.logical_axes` of the adapters) and the
    matching tree of shapes, by the rules; axes that do not divide a dimension are dropped (`param_shardings`)."""

    def fit(path, spec: P, shape) -> NamedSharding:
        mesh_axes = nn.logical_to_mesh_axes(spec, rules) if spec else P()
        fitted = []
        for dim, axes in zip(shape.shape, tuple(mesh_axes) + (None,) * (len(shape.shape) - len(mesh_axes))):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            kept = tuple(a for a in names if dim % mesh.shape[a] == 0) if names else ()
            if kept != names:
                logging.warning("param %s: dimension %d of size %d is not split over mesh axes %s (not divisible)",
                                jax.tree_util.keystr(path), len(fitted), dim, sorted(set(names) - set(kept)))
            fitted.append(kept[0] if len(kept) == 1 else (kept or None))
        return NamedSharding(mesh, P(*fitted))

    return jax.tree_util.tree_map_with_path(fit, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, params_shardings, mesh: Mesh) -> Any:
    """Shardings of `tx.init(params)`: param-shaped trees (Adam's moments) follow the params, the rest
    (step counts, flags) is replicated. `optax.tree_utils.tree_map_params` finds the param-shaped trees."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, P())
    return optax.tree_utils.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_state, params_shardings,
        transform_non_params=lambda _: replicated)


def train_state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, rules,
                          seq_len: int, lora: LoRAConfig | None = None, base_dtype=None):
    """`(shardings, shapes)` of the train state (`step.TrainState` trees of `NamedSharding`s and of
    `jax.ShapeDtypeStruct`s) for `model` trained with `tx`, from the params' logical axis names.

    With `lora`, the trained params are the adapters (in the model's param_dtype, sharded by
    `lora.logical_axes` like the kernels they change) and `base` is the frozen model in `base_dtype`
    (default param_dtype), sharded as full training shards the params."""
    from .step import TrainState  # here, not at the top: step.py needs no mesh

    dummy = jax.ShapeDtypeStruct((1, seq_len), jax.numpy.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    params = param_shardings(boxed, mesh, rules)
    shapes = nn.unbox(boxed)
    replicated = NamedSharding(mesh, P())
    if lora is None:
        shardings = TrainState(step=replicated, params=params,
                               opt_state=opt_state_shardings(tx, shapes, params, mesh))
        state_shapes = TrainState(step=jax.ShapeDtypeStruct((), jax.numpy.int32), params=shapes,
                                  opt_state=jax.eval_shape(tx.init, shapes))
        return shardings, state_shapes
    base_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, base_dtype or x.dtype), shapes)
    adapters = jax.eval_shape(lambda: lora_lib.init_lora(jax.random.key(0), shapes, model.config, lora,
                                                         dtype=model.config.param_dtype))
    adapter_shardings = logical_shardings(lora_lib.logical_axes(adapters), adapters, mesh, rules)
    shardings = TrainState(step=replicated, params=adapter_shardings,
                           opt_state=opt_state_shardings(tx, adapters, adapter_shardings, mesh), base=params)
    state_shapes = TrainState(step=jax.ShapeDtypeStruct((), jax.numpy.int32), params=adapters,
                              opt_state=jax.eval_shape(tx.init, adapters), base=base_shapes)
    return shardings, state_shapes

"""Training's shardings on the device mesh: batches, the optimizer state and the train state.

The mesh, the logical-axis rules and the params' shardings are the library's (`flax_gpt2.modeling.sharding`,
shared with `serve --mesh`); this module adds what only training has. Batches are split over (`data`,
`fsdp`); `fsdp` also shards the optimizer state like the params (ZeRO-3).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_gpt2.modeling import lora as lora_lib
from flax_gpt2.modeling.lora import LoRAConfig
from flax_gpt2.modeling.sharding import MESH_AXES, logical_shardings, make_mesh, param_shardings, place

__all__ = ["MESH_AXES", "make_mesh", "place", "param_shardings", "logical_shardings", "batch_sharding",
           "batch_shards", "opt_state_shardings", "train_state_shardings"]


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a token batch `[A, B, T]` (A accumulated micro-batches of B rows)."""
    return NamedSharding(mesh, P(None, *nn.logical_to_mesh_axes(("batch", None), rules)))


def batch_shards(mesh: Mesh, rules) -> int:
    """How many ways the batch dimension is split."""
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


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

"""Per-layer and stacked parameter trees, converted both ways in one place.

Unrolled models (`scan_layers=False`) keep one subtree per block, `transformer/h_0 ... h_{L-1}`; scanned
models (`scan_layers=True`) keep one subtree `transformer/h` whose arrays have a leading `[L]` axis.
Everything that reads or writes weights (from_pretrained, save_pretrained, convert, init_from, training
checkpoints) goes through `to_layout`, so a checkpoint of either layout loads into a model of either.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

_LAYER = re.compile(r"h_(\d+)$")


def _blocks_parent(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The dict holding the blocks: `params["transformer"]` for the head models, `params` for GPT2Model."""
    return params["transformer"] if "transformer" in params else params


def is_stacked(params: Mapping[str, Any]) -> bool:
    """Whether `params` holds the blocks stacked (`h`) rather than one subtree per layer (`h_0`, ...)."""
    return "h" in _blocks_parent(params)


def _stack(arrays: list) -> Any:
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.stack(arrays)
    return jax.numpy.stack(arrays)


def stack_layers(params: Mapping[str, Any], stack=None) -> dict[str, Any]:
    """`h_0 ... h_{L-1}` -> `h` with a leading `[L]` axis on every array (already stacked: unchanged).

    `stack(list_of_leaves)` combines one leaf of every layer (default: numpy or jax stack).
    """
    if is_stacked(params):
        return dict(params)
    parent = _blocks_parent(params)
    layers = sorted((int(m.group(1)), k) for k in parent if (m := _LAYER.match(k)))
    if [i for i, _ in layers] != list(range(len(layers))) or not layers:
        raise ValueError(f"cannot stack the layers: expected h_0 ... h_N, found {[k for _, k in layers]}")
    stack = stack or _stack
    stacked = jax.tree.map(lambda *xs: stack(list(xs)), *[parent[k] for _, k in layers])
    new_parent = {k: v for k, v in parent.items() if not _LAYER.match(k)}
    new_parent["h"] = stacked
    return _replace_parent(params, new_parent)


def unstack_layers(params: Mapping[str, Any], take=None) -> dict[str, Any]:
    """`h` with a leading `[L]` axis -> `h_0 ... h_{L-1}` (already per layer: unchanged).

    `take(leaf, i)` is layer i of a stacked leaf (default: `leaf[i]`).
    """
    if not is_stacked(params):
        return dict(params)
    parent = _blocks_parent(params)
    stacked = parent["h"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    new_parent = {k: v for k, v in parent.items() if k != "h"}
    for i in range(n):
        new_parent[f"h_{i}"] = jax.tree.map(lambda x, i=i: take(x, i) if take else x[i], stacked)
    return _replace_parent(params, new_parent)


def to_layout(params: Mapping[str, Any], scan_layers: bool) -> dict[str, Any]:
    """`params` in the layout a model with `scan_layers` expects."""
    return stack_layers(params) if scan_layers else unstack_layers(params)


def convert_tree(tree: Any, scan_layers: bool, *, stack=None, take=None) -> Any:
    """`tree` with every params-shaped dict in it (the params themselves, an optimizer's `mu`/`nu`) put in
    the layout `scan_layers` asks for; everything else is kept as it is."""
    if isinstance(tree, Mapping):
        if "transformer" in tree or "h" in tree or "h_0" in tree:
            return stack_layers(tree, stack) if scan_layers else unstack_layers(tree, take)
        return type(tree)({k: convert_tree(v, scan_layers, stack=stack, take=take) for k, v in tree.items()}) \
            if isinstance(tree, dict) else tree
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # optax's NamedTuple states
        return type(tree)(*(convert_tree(v, scan_layers, stack=stack, take=take) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(convert_tree(v, scan_layers, stack=stack, take=take) for v in tree)
    return tree


def abstract_stack(leaves: list) -> Any:
    """Stacks `jax.ShapeDtypeStruct`s: a leading layers axis, never sharded."""

    x = leaves[0]
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(leaves), *x.shape), x.dtype, sharding=sharding)


def abstract_take(x: Any, i: int) -> Any:
    """Layer `i` of a stacked `jax.ShapeDtypeStruct`."""

    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def _replace_parent(params: Mapping[str, Any], new_parent: dict[str, Any]) -> dict[str, Any]:
    if "transformer" in params:
        return {**params, "transformer": new_parent}
    return new_parent

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


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """`h_0 ... h_{L-1}` -> `h` with a leading `[L]` axis on every array (already stacked: unchanged)."""
    if is_stacked(params):
        return dict(params)
    parent = _blocks_parent(params)
    layers = sorted((int(m.group(1)), k) for k in parent if (m := _LAYER.match(k)))
    if [i for i, _ in layers] != list(range(len(layers))) or not layers:
        raise ValueError(f"cannot stack the layers: expected h_0 ... h_N, found {[k for _, k in layers]}")
    stacked = jax.tree.map(lambda *xs: _stack(list(xs)), *[parent[k] for _, k in layers])
    new_parent = {k: v for k, v in parent.items() if not _LAYER.match(k)}
    new_parent["h"] = stacked
    return _replace_parent(params, new_parent)


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """`h` with a leading `[L]` axis -> `h_0 ... h_{L-1}` (already per layer: unchanged)."""
    if not is_stacked(params):
        return dict(params)
    parent = _blocks_parent(params)
    stacked = parent["h"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    new_parent = {k: v for k, v in parent.items() if k != "h"}
    for i in range(n):
        new_parent[f"h_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return _replace_parent(params, new_parent)


def to_layout(params: Mapping[str, Any], scan_layers: bool) -> dict[str, Any]:
    """`params` in the layout a model with `scan_layers` expects."""
    return stack_layers(params) if scan_layers else unstack_layers(params)


def _replace_parent(params: Mapping[str, Any], new_parent: dict[str, Any]) -> dict[str, Any]:
    if "transformer" in params:
        return {**params, "transformer": new_parent}
    return new_parent

"""The device mesh and the logical-axis rules that place the model's params (and a KV cache) on it.

The model names every parameter axis (`vocab`, `embed`, `heads`, `kv`, `mlp`) and constrains its
activations as (`batch`, `length`, `embed` | `mlp`); logical-axis rules map those names to the mesh axes
`data`, `fsdp` and `tensor`. Batches are split over (`data`, `fsdp`): `fsdp` is data parallelism whose
params (and, in training, optimizer state) are also sharded (ZeRO-3); `tensor` splits heads and the MLP
(Megatron). Training (`train/mesh.py`) and the server (`serve --mesh`) share this module.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from flax_gpt2.modeling.config import GPT2Config

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes, first match wins (configs/base.py's `logical_axis_rules` default). The
# vocabulary (50257 = 29 * 1733) divides by no mesh size, so the tied embedding is split on `embed`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("vocab", None),
    ("length", None),
)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all `devices` (default: all); one axis may be -1 to take what the
    others leave. `mesh_config` has `data`, `fsdp` and `tensor` (attributes or keys)."""
    devices = list(jax.devices() if devices is None else devices)
    get = mesh_config.get if isinstance(mesh_config, Mapping) else lambda a, d: getattr(mesh_config, a, d)
    shape = [int(get(a, 1)) for a in MESH_AXES]
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


def parse_mesh(text: str) -> dict[str, int]:
    """`"tensor=2"` or `"data=1,fsdp=2,tensor=4"` -> `{"data": 1, "fsdp": 2, "tensor": 4}` (an axis not named
    is 1). Raises ValueError naming what is wrong."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise ValueError(f"mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}")
        if name in seen:
            raise ValueError(f"mesh {text!r}: {name} is given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(f"mesh {text!r}: {name} must be a positive integer, got {value.strip()!r}")
        sizes[name] = size
        seen.add(name)
    if not seen:
        raise ValueError(f"mesh {text!r}: name at least one axis, e.g. tensor=2")
    return sizes


def place(tree, shardings):
    """Host arrays (the same on every process) -> global arrays with `shardings`."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x[i])),
                        tree, shardings)


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


def kv_cache_sharding(mesh: Mesh, config: GPT2Config, rows: int) -> NamedSharding:
    """Sharding of one layer's KV cache `[B, H, S, K]` of `rows` rows: heads over `tensor` (each device holds
    the keys and values of the heads its attention weights compute), or, when `tensor` does not divide the
    heads (GPT-2 XL's 25), the head dimension K; rows over `data` when it divides them."""
    tensor, data = mesh.shape["tensor"], mesh.shape["data"]
    heads = "tensor" if config.n_head % tensor == 0 else None
    head_dim = "tensor" if heads is None and config.head_dim % tensor == 0 and tensor > 1 else None
    return NamedSharding(mesh, P("data" if rows % data == 0 and data > 1 else None, heads, None, head_dim))

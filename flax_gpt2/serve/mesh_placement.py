"""Where a server's weights and decode slots live on a mesh of one host's devices (`serve --mesh tensor=N`).

The weights are sharded as training shards them (`modeling.sharding.DEFAULT_RULES`: heads and the MLP over
`tensor`, the embedding dimension over `fsdp`), so a model too large for one chip's memory is served from
several; the slots' KV cache is split by heads over `tensor` too (`kv_cache_sharding`: the head dimension
when the heads do not divide, as GPT-2 XL's 25 do not), each device holding the keys and values of the heads it
computes. The engine's programs are the single-device ones: XLA partitions them from these input shardings
(GSPMD), inserting the collectives. Rows (slots) are split over `data` when it divides them.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_gpt2.modeling import sharding
from flax_gpt2.modeling.model import GPT2LMHeadModel
from flax_gpt2.serve import slots as device


def serving_mesh(sizes: dict[str, int], devices: list[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh of `sizes` over the first of this host's devices (`jax.local_devices()`);
    ValueError naming the flag when the host has too few."""
    devices = list(jax.local_devices() if devices is None else devices)
    need = math.prod(sizes.values())
    described = ",".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "tensor=1"
    if need > len(devices):
        raise ValueError(f"--mesh {described} needs {need} devices but this host has {len(devices)} "
                         f"({devices[0].platform}); on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={need} "
                         "simulates them")
    return sharding.make_mesh(sizes, devices[:need])


def shard_params(model: GPT2LMHeadModel, params: Any, mesh: Mesh) -> Any:
    """`params` (the model's float tree, in its layer layout) placed on `mesh` by the default logical rules."""
    dummy = jax.ShapeDtypeStruct((1, 1), jax.numpy.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    shardings = sharding.param_shardings(boxed, mesh, sharding.DEFAULT_RULES)
    params = nn.unbox(params)  # (as `model.init` returns them, names and all)
    if jax.tree.structure(shardings) != jax.tree.structure(params):
        raise ValueError("--mesh needs the model's float weights (int8 weights are served on one device: drop "
                         "--quantize, or --mesh)")
    return jax.device_put(params, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """`tree` copied whole to every device of `mesh` (the LoRA adapter table: small)."""
    return None if tree is None else jax.device_put(tree, NamedSharding(mesh, P()))


def slot_shardings(model: GPT2LMHeadModel, rows: int, mesh: Mesh) -> device.Slots:
    """The shardings of `rows` slots: the KV cache by `kv_cache_sharding`, the per-row arrays by rows only."""
    kv = sharding.kv_cache_sharding(mesh, model.config, rows)
    by_row = NamedSharding(mesh, P(kv.spec[0]))
    layers = model.config.n_layer
    return device.Slots(keys=(kv,) * layers, values=(kv,) * layers, tokens=by_row, mask=by_row, lengths=by_row,
                        start=by_row, pos=by_row, logits=by_row)


def new_slots(model: GPT2LMHeadModel, rows: int, cache_len: int, vocab: int, mesh: Mesh | None,
              draft_model: GPT2LMHeadModel | None = None, scratch: int = 0) -> device.Slots:
    """`slots.init_slots`, created in place on `mesh` (never whole on one device first) when one is given
    (a draft model's cache only without a mesh: `serve` refuses `--draft_model` with `--mesh`)."""
    if mesh is None:
        # Committed to the device, as every later version of them is (a jitted step's output): jit compiles
        # uncommitted inputs separately, so warm-up would otherwise miss the programs that real slots run.
        return jax.device_put(device.init_slots(model, rows, cache_len, vocab, draft_model, scratch),
                              jax.local_devices()[0])
    return _sharded_init(model, rows, cache_len, vocab, slot_shardings(model, rows, mesh))()


@functools.lru_cache(maxsize=None)
def _sharded_init(model, rows, cache_len, vocab, shardings):
    return jax.jit(lambda: device.init_slots(model, rows, cache_len, vocab), out_shardings=shardings)


def place_slots(slots: device.Slots, model: GPT2LMHeadModel, mesh: Mesh | None) -> device.Slots:
    """`slots` on their shardings for their number of rows (a no-op where they are already; after a resize)."""
    if mesh is None:
        return slots
    return jax.device_put(slots, slot_shardings(model, slots.tokens.shape[0], mesh))

"""Several LoRA adapters in one batch: a table of adapters, and each row's low-rank branch picked by its index.

`lora.apply_lora` merges one adapter into the kernels, which serves one adapter per set of weights. To serve
many at once over one copy of the base, the adapters stay unmerged: every adapted module computes the base's
`x @ W + bias` once for the batch, and each row adds its own `(x @ A[i]) @ B[i]`, where `i` is that row's
adapter index (0: the base, no adapter). At dropout 0 this is the merged model's computation up to float
rounding: `x @ (W + scale * A @ B) = x @ W + (x @ A) @ (scale * B)`.

The table (`stack_adapters`) is the adapter tree's layout (`lora.init_lora`: `transformer/h_0/attn/c_attn/
{lora_a, lora_b}`, per layer) with a leading `[num_adapters + 1]` axis on every array, row 0 all zeros. Adapters
of different ranks are padded to the largest rank with zeros, a module that only some adapters target gets zeros
in the others, and each adapter's scale is folded into its B: zero rows and columns add exactly nothing, so one
table (one compiled program) serves any mix of adapters.

`row_adapters(table, index)` applies the table without touching the model's code: inside it, every call of an
adapted `Dense`/`DenseGeneral` (found by its module path, e.g. `("transformer", "h_0", "attn", "c_attn")`) gets
its row's branch added (flax's method interception). `index` is a scalar: the serving step `jax.vmap`s a batch-1
forward over the rows, so each row's trace sees its own index.

Two ways to compute a row's branch, the same numbers (zero terms add exactly nothing): gather that row's A and B
(`table[index]`), or run every adapter's A, zero all but the row's own rank columns (a one-hot mask) and contract
with all of B: under `vmap` the latter is two plain matmuls that read the table once for the whole batch, like one
LoRA of rank `rows x R`, where gathering copies an `[*in, R]` and an `[R, *out]` block per row. `batch_rows` (the
rows of the vmapped batch) picks: the mask while the table has no more rows than the batch, else the gather (a
lone prefill reads one adapter, not all).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.lora import LoRAConfig
from flax_gpt2.modeling.model import unwrap_params


def _modules(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Mapping]]:
    """`(module path, {"lora_a", "lora_b"})` for every adapted module of an adapter tree."""
    for key, value in tree.items():
        if "lora_a" in value:
            yield (*prefix, key), value
        else:
            yield from _modules(value, (*prefix, key))


def stack_adapters(adapters: Sequence[tuple[Mapping[str, Any], LoRAConfig]], *,
                   dtype: Any = jnp.float32) -> dict[str, Any]:
    """One table of `adapters` (`[(tree, lora), ...]`, as `load_peft_adapter` returns them, all for one base):
    adapter k is row k + 1, row 0 is zeros (the base). See the module docstring for the layout.

    Args:
      adapters: at least one; trees per layer or stacked (the table is per layer: the server's layout).
      dtype: the table's dtype (float32: as `apply_lora` computes the delta).

    Returns:
      The adapter-tree layout with `lora_a` `[N + 1, *in, R]` and `lora_b` `[N + 1, R, *out]` (scale folded
      in), R the largest rank, for every module that any adapter targets.
    """
    if not adapters:
        raise ValueError("stack_adapters needs at least one adapter")
    per_layer = [dict(_modules(layer_stacking.unstack_layers(unwrap_params(tree)))) for tree, _ in adapters]
    rank = max(lora.rank for _, lora in adapters)
    shapes = {}  # module path -> (in shape, out shape), from whichever adapter has it
    for modules in per_layer:
        for path, ab in modules.items():
            shape = (ab["lora_a"].shape[:-1], ab["lora_b"].shape[1:])
            if shapes.setdefault(path, shape) != shape:
                raise ValueError(f"adapters disagree on the shape of {'/'.join(path)} ({shapes[path]} and {shape}): "
                                 "they were made for different base models")
    table: dict[str, Any] = {}
    for path, (in_shape, out_shape) in sorted(shapes.items()):
        a_rows, b_rows = [jnp.zeros((*in_shape, rank), dtype)], [jnp.zeros((rank, *out_shape), dtype)]
        for modules, (_, lora) in zip(per_layer, adapters):
            pad = rank - lora.rank
            if path in modules:
                a = jnp.asarray(modules[path]["lora_a"], dtype)
                b = lora.scale * jnp.asarray(modules[path]["lora_b"], dtype)
                a_rows.append(jnp.pad(a, [(0, 0)] * len(in_shape) + [(0, pad)]))
                b_rows.append(jnp.pad(b, [(0, pad)] + [(0, 0)] * len(out_shape)))
            else:
                a_rows.append(a_rows[0])
                b_rows.append(b_rows[0])
        node = table
        for key in path:
            node = node.setdefault(key, {})
        node["lora_a"], node["lora_b"] = jnp.stack(a_rows), jnp.stack(b_rows)
    return table


def num_rows(table: Mapping[str, Any]) -> int:
    """Rows of a table: the number of adapters + 1 (the base)."""
    _, ab = next(_modules(table))
    return ab["lora_a"].shape[0]


# HIGHEST: a TPU's default matmul precision would round the branch to bfloat16, as lora_delta avoids too.
_PRECISION = jax.lax.Precision.HIGHEST


def row_branch(x: jax.Array, a: jax.Array, b: jax.Array, index: jax.Array, *, gather: bool = True) -> jax.Array:
    """`(x @ a[index]) @ b[index]` for the table's `a` `[M, *in, R]` and `b` (scale folded in) `[M, R, *out]`,
    contracting x's trailing input axes (`[..., *in]` -> `[..., *out]`), in float32. `gather=False` computes
    the same with a one-hot mask over all M adapters instead of indexing (module docstring: which is cheaper)."""
    x = x.astype(jnp.float32)
    if gather:
        low = jnp.tensordot(x, a[index].astype(jnp.float32), axes=a.ndim - 2, precision=_PRECISION)
        return jnp.tensordot(low, b[index].astype(jnp.float32), axes=1, precision=_PRECISION)
    m, n_in = a.shape[0], a.ndim - 2
    a_all = jnp.moveaxis(a.astype(jnp.float32), 0, -2)  # [*in, M, R]
    low = jnp.tensordot(x, a_all, axes=n_in, precision=_PRECISION)  # [..., M, R]
    low = low * (jnp.arange(m) == index)[:, None].astype(low.dtype)
    return jnp.tensordot(low, b.astype(jnp.float32), axes=2, precision=_PRECISION)


@contextlib.contextmanager
def row_adapters(table: Mapping[str, Any] | None, index: jax.Array, batch_rows: int = 1) -> Iterator[None]:
    """Inside this context, model calls add adapter `index`'s branch (a scalar; 0 = the base) from `table` to
    every adapted module's output. `batch_rows`: how many rows a `vmap` around the call runs (1 without), which
    picks how the branch is computed (module docstring). `table=None` (no adapters served) changes nothing."""
    if table is None:
        yield
        return
    modules = dict(_modules(table))
    gather = num_rows(table) > batch_rows

    def add_branch(call, args, kwargs, context):
        y = call(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(context.module, (nn.Dense, nn.DenseGeneral)):
            return y
        ab = modules.get(tuple(context.module.path))
        if ab is None:
            return y
        branch = row_branch(args[0], ab["lora_a"], ab["lora_b"], index, gather=gather)
        return (y.astype(jnp.float32) + branch).astype(y.dtype)

    with nn.intercept_methods(add_branch):
        yield

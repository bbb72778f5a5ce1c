"""int8 weight-only quantization: per-channel symmetric int8 weights, dequantized inside the matmul.

    model, params = flax_gpt2.from_pretrained("gpt2", quantize="int8")   # or quantize_params(params)
    logits = model.apply({"params": params}, input_ids).logits           # the same model class and API

What is quantized: the four block matrices (`attn/c_attn`, `attn/c_proj`, `mlp/c_fc`, `mlp/c_proj`) with one
float32 scale per output channel, and the token embedding `wte` (the tied LM head, read in full at every decode
step) with one scale per vocabulary row; an untied `lm_head` kernel gets one per vocabulary column. Position
embeddings, biases, LayerNorms and the multiple-choice head stay in `param_dtype`. For every GPT-2 preset the
parameters then take 0.25-0.27x the bytes of float32 (`parameter_bytes`).

A quantized weight is an `Int8Weight` (a pytree of `q` int8 and `scale` float32) stored where the float array
was (`.../c_fc/kernel`, `wte/embedding`), so the params tree keeps its paths and both layer layouts
(`layer_stacking` stacks and splits it like any other leaf). The model's modules take either: `nn.Dense` /
`nn.DenseGeneral` get `promote_dtype` and `dot_general` from here, `wte` is this module's `Embed`, and the
output projection (`model.output_logits`) multiplies by an `Int8Weight` head through `head_logits`. Generation,
the server and the pipeline therefore run unchanged on quantized params.

How the matmul dequantizes (why `x @ convert(q)` then `* scale`, not `x @ (q * scale)`): per output channel,
`x @ (q * s) == (x @ q) * s`, so the dot reads `q` converted to the activation dtype (exact: |q| <= 127 fits
bfloat16's 8-bit mantissa) and the scale multiplies the `[..., out]` result in float32. Compiled for a TPU
(v5e, libtpu 0.0.42.1, ahead of time on a CPU host) XLA folds the convert into the matmul, which takes the s8
operand as it is (`convolution(bf16[B,768], s8[768,3072])`): HBM reads one byte per weight, half of bfloat16's.
Scaling the weights first (`x @ (q * s)`) also fuses, but rounds every dequantized weight to bfloat16 in a
bfloat16 model and multiplies D times more elements at decode (B*T < D). On CPU, XLA converts the int8
weights to float in a separate pass before its library dot, so int8 decodes no faster there
(benchmarks/quantize.py measures it).

Quantized params are for inference: `save_pretrained` and LoRA's `apply_lora` refuse them (quantize after
merging, and save the float model), and `jax.grad` refuses their int8 leaves.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as flax_dtypes

from flax_gpt2.modeling import layer_stacking

Array = jax.Array

# The values `quantize=` accepts (None: float weights).
QUANTIZE_MODES = ("int8",)
# Leading kernel axes that are a block module's inputs (contracted in its matmul); the rest are output channels.
_INPUT_AXES = {("attn", "c_attn"): 1, ("attn", "c_proj"): 2, ("mlp", "c_fc"): 1, ("mlp", "c_proj"): 1}
_QMAX = 127  # symmetric: -127..127, so that -q is always representable


@flax.struct.dataclass
class Int8Weight:
    """A weight `w ≈ q * scale`: `q` int8 in the weight's shape, `scale` float32 of the same rank with size 1
    on the axes the weight's matmul contracts (one scale per output channel, or per row of an embedding).

    Array-like where decoding needs it: `.shape`, `.ndim`, `.T`, basic indexing (`w[..., :n]`) and
    `.devices()`. Its pytree leaves are `(q, scale)`, q first (Flax checks a stored param's first leaf
    against the shape the module declares).
    """

    q: Array
    scale: Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def T(self) -> "Int8Weight":  # noqa: N802 (numpy's name)
        return Int8Weight(self.q.T, self.scale.T)

    def devices(self):
        return self.q.devices()

    def __getitem__(self, index) -> "Int8Weight":
        """Basic indexing (ints, slices, `...`) of the weight; on the scale's size-1 axes a slice keeps the
        axis and an int takes its one entry."""
        index = index if isinstance(index, tuple) else (index,)
        ellipses = [k for k, i in enumerate(index) if i is Ellipsis]
        basic = all(i is Ellipsis or isinstance(i, (int, np.integer, slice)) for i in index)
        if not basic or len(ellipses) > 1 or len(index) - len(ellipses) > self.ndim:
            raise IndexError(f"Int8Weight takes basic indexing only (ints, slices, one ...) over its {self.ndim} "
                             f"axes, got {index!r}")
        if ellipses:
            k = ellipses[0]
            index = index[:k] + (slice(None),) * (self.ndim - len(index) + 1) + index[k + 1:]
        index = index + (slice(None),) * (self.ndim - len(index))
        scale_index = tuple(i if self.scale.shape[a] == self.q.shape[a] else (slice(None) if isinstance(i, slice)
                                                                               else 0)
                            for a, i in enumerate(index))
        return Int8Weight(self.q[index], self.scale[scale_index])

    def dequantize(self, dtype: Any = jnp.float32) -> Array:
        """The float weight `q * scale` (what the quantized model computes with), in `dtype`."""
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def check_quantize(quantize: Any) -> None:
    """ValueError unless `quantize` is None (float weights) or one of `QUANTIZE_MODES`."""
    if quantize is not None and (not isinstance(quantize, str) or quantize not in QUANTIZE_MODES):
        raise ValueError(f"quantize must be None (float weights) or one of {', '.join(map(repr, QUANTIZE_MODES))}, "
                         f"got {quantize!r}")


@functools.partial(jax.jit, static_argnames="input_axes")
def quantize_weight(w: Array, input_axes: tuple[int, ...]) -> Int8Weight:
    """`w` as an `Int8Weight` with one symmetric scale per slice over `input_axes`: `scale = max|w| / 127`
    (float32), `q = round(w / scale)`. An all-zero channel gets scale 0 and q 0; one holding inf or NaN a NaN
    scale."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=input_axes, keepdims=True) / _QMAX
    # A channel holding inf or NaN gets a NaN scale (which `quantize_params` refuses): XLA's CPU max reduction
    # does not always propagate NaN.
    scale = jnp.where(jnp.all(jnp.isfinite(w), axis=input_axes, keepdims=True), scale, jnp.nan)
    q = jnp.clip(jnp.round(w / jnp.where(scale > 0, scale, 1.0)), -_QMAX, _QMAX).astype(jnp.int8)
    return Int8Weight(q, scale)


def is_quantized(params: Any) -> bool:
    """Whether any weight in `params` is an `Int8Weight`."""
    return any(isinstance(x, Int8Weight) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight)))


def check_not_quantized(params: Any, what: str) -> None:
    """ValueError when `params` hold int8 weights, for operations that need float ones (`what` names it)."""
    if is_quantized(params):
        raise ValueError(f"{what} needs float weights, but these params are int8-quantized (inference only): use "
                         "the float params (load without quantize='int8'; quantize after merging or training)")


def quantize_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with the block matrices, `wte` and an untied `lm_head` as `Int8Weight`s (the module docstring
    says which and how); everything else unchanged. Per-layer or stacked params (`scan_layers`) alike;
    `{"params": ...}` is accepted and kept.

    Raises:
      ValueError: the params are already quantized, or a weight to quantize holds inf or NaN.
    """
    if isinstance(params, Mapping) and set(params) == {"params"}:
        return {"params": quantize_params(params["params"])}
    if is_quantized(params):
        raise ValueError("these params are already int8-quantized; quantize the float params once")
    lead = 1 if layer_stacking.is_stacked(params) else 0

    def input_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
        if path[-1] == "embedding" and path[-2:-1] == ("wte",):
            return (ndim - 1,)  # [V, D]: one scale per vocabulary row
        if path[-2:] == ("lm_head", "kernel"):
            return (0,)  # [D, V]: one per vocabulary column
        if path[-1] == "kernel" and len(path) >= 4 and (path[-4] == "h" or path[-4].startswith("h_")):
            n = _INPUT_AXES.get(tuple(path[-3:-1]))
            return None if n is None else tuple(range(lead, lead + n))
        return None

    def walk(tree, path):
        if isinstance(tree, Mapping):
            return {k: walk(v, path + (k,)) for k, v in tree.items()}
        axes = input_axes(path, np.ndim(tree))
        if axes is None:
            return tree
        if not jnp.issubdtype(jnp.asarray(tree).dtype, jnp.floating):
            raise ValueError(f"{'/'.join(path)} has dtype {jnp.asarray(tree).dtype}; only float weights quantize")
        return quantize_weight(tree, axes)

    out = walk(params, ())
    scales = [x.scale for x in jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, Int8Weight))
              if isinstance(x, Int8Weight)]
    if not scales:
        raise ValueError(f"no GPT-2 weights to quantize in params with keys {sorted(params)}")
    if not isinstance(scales[0], jax.core.Tracer) and not bool(jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(s)) for s in scales]))):
        raise ValueError("the weights hold inf or NaN, which int8 cannot represent; check the checkpoint")
    return out


def parameter_bytes(params: Any) -> int:
    """Bytes the arrays of `params` take (int8 values and their scales included); works on abstract
    params (`jax.eval_shape`) too."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


# --- the hooks the model's modules use -------------------------------------------------------------------------

def promote_dtype(*args, dtype: Any = None, inexact: bool = True) -> list:
    """Flax's `promote_dtype` for `nn.Dense`/`nn.DenseGeneral`, except that an `Int8Weight` kernel passes through
    unconverted (`dot_general` converts it inside the matmul)."""
    plain = [None if isinstance(a, Int8Weight) else a for a in args]
    if dtype is None and any(isinstance(a, Int8Weight) for a in args):
        dtype = jnp.result_type(*[a for a in plain if a is not None])
    promoted = flax_dtypes.promote_dtype(*plain, dtype=dtype, inexact=inexact)
    return [a if isinstance(a, Int8Weight) else p for a, p in zip(args, promoted)]


def dot_general(lhs: Array, rhs: Any, dimension_numbers, precision=None, preferred_element_type=None) -> Array:
    """`jax.lax.dot_general`, and for an `Int8Weight` `rhs` its dequantizing form (module docstring: why this
    one): `(lhs @ convert(q)) * scale` with a float32 result scaled, then cast to `lhs`'s dtype."""
    if not isinstance(rhs, Int8Weight):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    (_, rhs_contract), (_, rhs_batch) = dimension_numbers
    if rhs_batch:
        raise ValueError("an Int8Weight cannot be a batched dot_general operand")
    out = jax.lax.dot_general(lhs, rhs.q.astype(lhs.dtype), dimension_numbers, precision=precision,
                              preferred_element_type=jnp.float32)
    # The scale has size 1 on the contracted axes; the rest are the output's trailing axes, in order.
    return (out * jnp.squeeze(rhs.scale, axis=tuple(rhs_contract))).astype(preferred_element_type or lhs.dtype)


def head_logits(hidden: Array, head: Int8Weight, dtype: Any, *, vocab_major: bool) -> Array:
    """float32 logits from an int8 output projection: `head` is `[D, V]`, or `[V, D]` with `vocab_major`
    (the tied `wte`); the scale (one per vocabulary id) multiplies the float32 logits."""
    spec = "...D,VD->...V" if vocab_major else "...D,DV->...V"
    logits = jnp.einsum(spec, hidden.astype(dtype), head.q.astype(dtype), preferred_element_type=jnp.float32)
    return logits * jnp.squeeze(head.scale, axis=1 if vocab_major else 0)


class Embed(nn.Embed):
    """`nn.Embed` whose table may be an `Int8Weight` (one scale per row): the lookup gathers int8 rows and their
    scales, never the whole table in float."""

    def __call__(self, inputs: Array) -> Array:
        table = self.embedding
        if not isinstance(table, Int8Weight):
            return super().__call__(inputs)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        rows = jnp.take(table.q, inputs, axis=0).astype(jnp.float32) * jnp.take(table.scale, inputs, axis=0)
        return rows.astype(self.dtype or jnp.float32)

"""LoRA (low-rank adaptation) for GPT-2: the config, PEFT's initialisation, and the adapted weights.

An adapter adds `scale * A @ B` to a frozen kernel, with A `[in, r]`, B `[r, out]` and
`scale = alpha / r` (`alpha / sqrt(r)` with `use_rslora`), exactly as Hugging Face PEFT's LoRA on
GPT-2's `Conv1D` layers (`fan_in_fan_out=True`): PEFT's `lora_A.weight` `[r, in]` is A transposed and
its `lora_B.weight` `[out, r]` is B transposed (`flax_gpt2.checkpoints.peft_adapters` converts).

The adapter tree mirrors the params tree: for every targeted module, `{"lora_a", "lora_b"}` beside
the module's `kernel` path, e.g. `transformer/h_0/attn/c_attn/{lora_a, lora_b}`. Kernels here are
not always 2-D (`c_attn` is `[D, 3, H, K]`, `attn/c_proj` `[H, K, D]`, see `flax_gpt2.modeling.model`), so
A keeps the kernel's input axes and B its output axes:

    attn/c_attn   kernel [D, 3, H, K]   lora_a [D, r]      lora_b [r, 3, H, K]
    attn/c_proj   kernel [H, K, D]      lora_a [H, K, r]   lora_b [r, D]
    mlp/c_fc      kernel [D, F]         lora_a [D, r]      lora_b [r, F]
    mlp/c_proj    kernel [F, D]         lora_a [F, r]      lora_b [r, D]

With `scan_layers=True` every array has the leading `[L]` layers axis too, and
`flax_gpt2.modeling.layer_stacking.to_layout` converts an adapter tree between the layouts as it does params.

How the adapter is applied: `apply_lora` merges it into the kernels (`W + scale * A @ B`) and the
unchanged model runs on the result. For dropout 0 (and at inference) this is PEFT's computation up to
float rounding. PEFT's dropout acts on the LoRA branch's *input* activations, which no weight merge can
express; here dropout (training only) drops rows of A instead, i.e. input features of the LoRA branch,
with one mask per module and layer shared by every token of the step (the same expectation, coarser
noise). Cost of merging: the backward pass forms one kernel-sized gradient per targeted kernel (a
transient, not optimizer state).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.config import GPT2Config
from flax_gpt2.modeling.model import unwrap_params
from flax_gpt2.modeling.quantize import check_not_quantized

# The GPT-2 modules LoRA can adapt, as PEFT names them under `transformer.h.{i}`.
MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Target names PEFT's suffix matching (`name == t or name.endswith("." + t)`) resolves to these modules.
TARGET_NAMES = ("c_attn", "attn.c_attn", "c_proj", "attn.c_proj", "mlp.c_proj", "c_fc", "mlp.c_fc")
# Leading kernel axes that are the module's input features (HF Conv1D's first axis, split as the model stores it).
_INPUT_AXES = {"attn.c_attn": 1, "attn.c_proj": 2, "mlp.c_fc": 1, "mlp.c_proj": 1}


def modules_for(targets: tuple[str, ...]) -> tuple[str, ...]:
    """The modules (of `MODULES`) that PEFT's `target_modules=targets` adapts; ValueError on unknown names."""
    unknown = [t for t in targets if t not in TARGET_NAMES]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(map(repr, unknown))}; GPT-2's are "
                         f"{', '.join(TARGET_NAMES)} (c_proj is both attn.c_proj and mlp.c_proj)")
    return tuple(m for m in MODULES if any(m == t or m.endswith("." + t) for t in targets))


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how strongly.

    Attributes:
      rank: r, the inner dimension of every adapter (> 0).
      alpha: PEFT's `lora_alpha`; the update is scaled by `alpha / rank` (PEFT's default alpha, 8).
      dropout: PEFT's `lora_dropout` in [0, 1); used only in training (see the module docstring).
      targets: PEFT `target_modules` names: `c_attn` (PEFT's GPT-2 default), `c_proj` (attention and
        MLP output projections), `c_fc`, and `attn.c_proj` / `mlp.c_proj` for one of the two
        (`attn.c_attn`, `mlp.c_fc` are accepted too). A tuple or a comma-separated string.
      use_rslora: scale by `alpha / sqrt(rank)` (rank-stabilised LoRA), as PEFT's `use_rslora`.
    """

    rank: int
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("c_attn",)
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be an integer > 0, got {self.rank!r} (rank 0 means no adapter: "
                             "leave LoRA off instead)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r} (PEFT's default is 8)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
                0 <= self.dropout < 1):
            raise ValueError(f"LoRA dropout must be a number in [0, 1), got {self.dropout!r}")
        targets = self.targets
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(","))
        targets = tuple(targets)
        if not targets or any(not isinstance(t, str) or not t for t in targets):
            raise ValueError(f"LoRA targets must be non-empty module names (e.g. 'c_attn' or 'c_attn,c_proj'), "
                             f"got {self.targets!r}")
        modules_for(targets)  # raises on unknown names
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        """The factor on `A @ B`: `alpha / rank`, or `alpha / sqrt(rank)` with `use_rslora`."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def modules(self) -> tuple[str, ...]:
        """The adapted modules of each block, as `MODULES` spells them."""
        return modules_for(self.targets)


def _blocks(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    return tree["transformer"] if "transformer" in tree else tree


def _with_blocks(tree: Mapping[str, Any], blocks: dict[str, Any]) -> dict[str, Any]:
    return {**tree, "transformer": blocks} if "transformer" in tree else blocks


def layer_keys(params: Mapping[str, Any]) -> list[str]:
    """`["h"]` for stacked params, else `["h_0", ..., "h_{L-1}"]` in order."""
    if layer_stacking.is_stacked(params):
        return ["h"]
    blocks = _blocks(params)
    n = sum(1 for k in blocks if k.startswith("h_"))
    keys = [f"h_{i}" for i in range(n)]
    if not n or any(k not in blocks for k in keys):
        raise ValueError(f"params hold no GPT-2 blocks h_0 ... h_N (found {sorted(blocks)})")
    return keys


def kernel_of(params: Mapping[str, Any], layer: str, module: str):
    """The kernel of `module` (e.g. "attn.c_attn") in block `layer` ("h_3", or "h" when stacked)."""
    block, name = module.split(".")
    return _blocks(params)[layer][block][name]["kernel"]


def init_lora(rng: jax.Array, params: Mapping[str, Any], config: GPT2Config, lora: LoRAConfig, *,
              dtype: Any = jnp.float32) -> dict[str, Any]:
    """A fresh adapter tree for `params`, initialised as PEFT does, so the adapted model equals the base.

    A (PEFT's `lora_A.weight` `[r, in]`) gets `torch.nn.init.kaiming_uniform_(a=sqrt(5))`, i.e.
    uniform in `±1/sqrt(in)`; B is zero. Layer i of a stacked tree equals layer i of a per-layer tree
    made from the same `rng`, so both layouts start from the same adapter.

    Args:
      rng: a PRNG key.
      params: the base model's params, per-layer or stacked (`{"params": ...}` accepted).
      config: the base model's config (checked against the params' layout).
      lora: which modules, and the rank.
      dtype: the adapters' dtype (float32 by default, also over a bfloat16 base).

    Returns:
      `{"transformer": {"h_0": {"attn": {"c_attn": {"lora_a": ..., "lora_b": ...}}}, ...}}`, in the
      params' layout.
    """
    params = unwrap_params(params)
    stacked = layer_stacking.is_stacked(params)
    if stacked != config.scan_layers:
        raise ValueError(f"params are {'stacked' if stacked else 'per layer'} but config.scan_layers="
                         f"{config.scan_layers}; pass the config the params were made with")
    layers = layer_keys(params)
    n_layer = kernel_of(params, "h", MODULES[0]).shape[0] if stacked else len(layers)
    if n_layer != config.n_layer:
        raise ValueError(f"params have {n_layer} layers but config.n_layer={config.n_layer}")
    out: dict[str, Any] = {}
    for module in lora.modules:
        per_layer = []
        for i in range(n_layer):
            kernel = kernel_of(params, layers[i] if not stacked else "h", module)
            shape = kernel.shape[1:] if stacked else kernel.shape
            n_in = _INPUT_AXES[module]
            in_shape, out_shape = shape[:n_in], shape[n_in:]
            bound = 1 / math.sqrt(math.prod(in_shape))
            key = jax.random.fold_in(rng, i * len(MODULES) + MODULES.index(module))
            a = jax.random.uniform(key, (*in_shape, lora.rank), dtype, -bound, bound)
            per_layer.append({"lora_a": a, "lora_b": jnp.zeros((lora.rank, *out_shape), dtype)})
        block, name = module.split(".")
        if stacked:
            stacked_module = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
            out.setdefault("h", {}).setdefault(block, {})[name] = stacked_module
        else:
            for i, adapter in enumerate(per_layer):
                out.setdefault(f"h_{i}", {}).setdefault(block, {})[name] = adapter
    return {"transformer": out} if "transformer" in params else out


def lora_delta(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float,
               input_mask: jax.Array | None = None) -> jax.Array:
    """`scale * A @ B` in the kernel's shape and the adapter's dtype.

    Works for any kernel `[*lead, *in, *out]` with `a` `[*lead, *in, r]` and `b` `[*lead, r, *out]`
    (`lead` is the stacked layers axis, if any). `input_mask` `[*lead, *in, 1]` scales A's input rows
    (dropout). One einsum over the kernel's own axes, no reshapes: a kernel split over heads by tensor
    parallelism gets a delta split the same way.
    """
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    n_in = a.ndim - 1 - lead
    n_out = b.ndim - 1 - lead
    lead_axes, in_axes, out_axes = "l" * lead, "abcd"[:n_in], "efgh"[:n_out]
    if input_mask is not None:
        a = a * input_mask.astype(a.dtype)
    # HIGHEST: a TPU's default matmul precision would round A and B to bfloat16 here.
    delta = jnp.einsum(f"{lead_axes}{in_axes}r,{lead_axes}r{out_axes}->{lead_axes}{in_axes}{out_axes}", a, b,
                       precision=jax.lax.Precision.HIGHEST)
    return scale * delta


def apply_lora(params: Mapping[str, Any], adapters: Mapping[str, Any], lora: LoRAConfig, *,
               dropout_rng: jax.Array | None = None, deterministic: bool = True) -> dict[str, Any]:
    """`params` with every adapted kernel replaced by `kernel + scale * A @ B` (in the kernel's dtype).

    A pure function of arrays (jit it, or call it inside a jitted loss); gradients reach the adapters,
    and the base too unless it is wrapped in `jax.lax.stop_gradient` (see `frozen_base_loss`). The
    delta is computed in the adapters' dtype and added in the wider of the two dtypes, so a bfloat16
    base gets a float32-accurate update rounded once.

    Args:
      params: the base params (`{"params": ...}` accepted and kept), in the adapters' layout.
      adapters: from `init_lora`, `load_peft_adapter` or training.
      lora: the adapters' config (its `scale` and `dropout`).
      dropout_rng: a PRNG key; required when training (`deterministic=False`) with `lora.dropout > 0`.
      deterministic: False applies `lora.dropout` to rows of A (input features of the LoRA branch), one
        mask per module and layer (module docstring: why not per token as PEFT).
    """
    if set(params) == {"params"}:
        return {"params": apply_lora(params["params"], adapters, lora, dropout_rng=dropout_rng,
                                     deterministic=deterministic)}
    check_not_quantized(params, "apply_lora (merging an adapter into the kernels)")
    use_dropout = not deterministic and lora.dropout > 0
    if use_dropout and dropout_rng is None:
        raise ValueError(f"apply_lora(deterministic=False) with lora.dropout={lora.dropout} needs a dropout_rng")
    if layer_stacking.is_stacked(params) != layer_stacking.is_stacked(adapters):
        raise ValueError("params and adapters are in different layouts (one stacked for scan_layers, one per "
                         "layer); convert the adapters with flax_gpt2.modeling.layer_stacking.to_layout")
    blocks = dict(_blocks(params))
    adapter_blocks = _blocks(adapters)
    for layer in adapter_blocks:
        if layer not in blocks:
            raise ValueError(f"the adapters have block {layer!r}, which the params lack (another base model?)")
        block = {k: dict(v) for k, v in blocks[layer].items()}
        for block_name, modules in adapter_blocks[layer].items():
            for name, ab in modules.items():
                target = dict(block[block_name][name])
                kernel = target["kernel"]
                mask = None
                if use_dropout:
                    # One key per (layer, module); a stacked tree draws all layers' masks from one key.
                    layer_index = int(layer[2:]) if layer.startswith("h_") else 0
                    key = jax.random.fold_in(dropout_rng, layer_index * len(MODULES)
                                             + MODULES.index(f"{block_name}.{name}"))
                    keep = jax.random.bernoulli(key, 1 - lora.dropout, (*ab["lora_a"].shape[:-1], 1))
                    mask = keep / (1 - lora.dropout)
                delta = lora_delta(kernel, ab["lora_a"], ab["lora_b"], lora.scale, mask)
                wide = jnp.promote_types(kernel.dtype, delta.dtype)
                target["kernel"] = (kernel.astype(wide) + delta.astype(wide)).astype(kernel.dtype)
                block[block_name][name] = target
        blocks[layer] = block
    return _with_blocks(params, blocks)


# The kernels' logical axis names (as `flax_gpt2.modeling.model` declares them), for the adapters' shardings.
_KERNEL_AXES = {"attn.c_attn": ("embed", None, "heads", "kv"), "attn.c_proj": ("heads", "kv", "embed"),
                "mlp.c_fc": ("embed", "mlp"), "mlp.c_proj": ("mlp", "embed")}


def logical_axes(adapters: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter tree with each array replaced by its logical axis names (a `PartitionSpec` of
    logical names, as `flax.linen.get_partition_spec` gives for params): A takes its kernel's input
    axes, B its output axes, the rank axis is unnamed (replicated), and a stacked tree leads with
    `"layers"`; so `nn.logical_to_mesh_sharding` shards adapters like the kernels they change."""
    lead = ("layers",) if layer_stacking.is_stacked(adapters) else ()

    def axes(path, _):
        block, name, part = path[-3].key, path[-2].key, path[-1].key
        kernel_axes = _KERNEL_AXES[f"{block}.{name}"]
        n_in = _INPUT_AXES[f"{block}.{name}"]
        names = kernel_axes[:n_in] + (None,) if part == "lora_a" else (None,) + kernel_axes[n_in:]
        return jax.sharding.PartitionSpec(*lead, *names)

    return jax.tree_util.tree_map_with_path(axes, adapters)


def merge_adapter(params: Mapping[str, Any], adapters: Mapping[str, Any], lora: LoRAConfig) -> dict[str, Any]:
    """Plain params with the adapter folded into the kernels (no dropout): a model of the base's shape
    whose logits equal the base with the adapter; save it with `flax_gpt2.save_pretrained`."""
    return apply_lora(params, adapters, lora, deterministic=True)


def frozen_base_loss(loss_fn: Callable[..., Any], lora: LoRAConfig) -> Callable[..., Any]:
    """`loss_fn(params, *args, **kwargs)` as a function of the adapters, with the base frozen.

    Returns `f(adapters, params, *args, dropout_rng=None, **kwargs)`: differentiate it with respect
    to its first argument (`jax.grad(f)(adapters, params, batch)`) and build the optimizer state on the
    adapter tree alone (`optax.adamw(...).init(adapters)`). The base is wrapped in `stop_gradient`,
    so no gradient flows to it even when differentiating everything. Passing `dropout_rng` turns on
    the adapters' dropout (training); the model's own dropout is whatever `loss_fn` does.
    """

    def adapted_loss(adapters, params, *args, dropout_rng=None, **kwargs):
        merged = apply_lora(jax.lax.stop_gradient(params), adapters, lora, dropout_rng=dropout_rng,
                            deterministic=dropout_rng is None)
        return loss_fn(merged, *args, **kwargs)

    return adapted_loss

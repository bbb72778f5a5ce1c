"""Hugging Face PEFT's LoRA adapter folder, written and read for GPT-2.

A PEFT folder holds `adapter_config.json` (`peft_type: "LORA"`, `r`, `lora_alpha`, `target_modules`,
...) and `adapter_model.safetensors` with, per adapted module of block i,

    base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight   [r, in]
    base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight   [out, r]

in HF's flat `Conv1D` feature order (the order `flax_gpt2.checkpoints.hf_state_dict` reshapes into `[D, 3, H, K]` and
`[H, K, D]`). `peft.PeftModel.from_pretrained(GPT2LMHeadModel..., folder)` loads what `save_peft_adapter`
writes, and `load_peft_adapter` reads what PEFT's `save_pretrained` writes.

What identifies the base: `base_model_name_or_path` in the config, and a sha256 of the base weights in
the safetensors header's metadata (`flax_gpt2.base_weights_sha256`). It is kept out of
adapter_config.json because PEFT warns about every key it does not know there ("saved using a higher
version of the library"), which would mislead PEFT users; PEFT ignores the metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from flax_gpt2.checkpoints import formats
from flax_gpt2.checkpoints.formats.common import join_names
from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.config import GPT2Config
from flax_gpt2.modeling.lora import MODULES, TARGET_NAMES, LoRAConfig, kernel_of, layer_keys
from flax_gpt2.modeling.model import unwrap_params
from flax_gpt2.utils import file_io

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # older PEFT versions' (torch.save) format, read without torch
BASE_HASH_KEY = "flax_gpt2.base_weights_sha256"
_KEY = re.compile(r"base_model\.model\.(?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                  r"\.lora_([AB])\.weight")
# PEFT LoRA options that change what the adapter computes beyond `scale * B A` on every layer's targets.
# Each must hold its default ("off") value here; the message says what the option does.
_UNSUPPORTED = {
    "use_dora": (False, "DoRA (weight-decomposed LoRA) adds a magnitude vector per module"),
    "lora_bias": (False, "lora_bias adds a trained bias to lora_B"),
    "modules_to_save": (None, "modules_to_save stores fully trained copies of whole modules"),
    "layers_to_transform": (None, "layers_to_transform adapts only some layers"),
    "layers_pattern": (None, "layers_pattern adapts only some layers"),
    "rank_pattern": ({}, "rank_pattern gives modules different ranks"),
    "alpha_pattern": ({}, "alpha_pattern gives modules different alphas"),
    "layer_replication": (None, "layer_replication duplicates layers of the base"),
    "trainable_token_indices": (None, "trainable_token_indices trains embedding rows"),
    "target_parameters": (None, "target_parameters adapts raw parameters, not modules"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA) applies the adapter only after invocation tokens"),
    "use_qalora": (False, "QALoRA pools the input of quantized layers"),
    "use_bdlora": (None, "block-diagonal LoRA changes the adapter's shape"),
}
# Initialisations that rewrite the base weights: such an adapter is only valid over that modified base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def base_weights_sha256(params: Mapping[str, Any]) -> str:
    """A sha256 of the transformer's weights that does not depend on the layout (per-layer or stacked),
    the model class (LM head or not) or the storage dtype among float32 and bfloat16: every array is
    hashed rounded to bfloat16, in per-layer order, with its path and shape."""
    params = unwrap_params(params)
    blocks = params["transformer"] if "transformer" in params else params
    blocks = layer_stacking.unstack_layers(blocks)
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(blocks)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        value = np.asarray(jax.device_get(jnp.asarray(leaf).astype(jnp.bfloat16)))
        digest.update(f"{jax.tree_util.keystr(path)}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).view(np.uint16).tobytes())
    return digest.hexdigest()


def save_peft_adapter(folder: str | os.PathLike, adapters: Mapping[str, Any], lora: LoRAConfig, *,
                      base_model_name_or_path: str | None, base_params: Mapping[str, Any] | None = None,
                      base_sha256: str | None = None) -> str:
    """Writes `adapters` as a PEFT LoRA folder that `peft.PeftModel.from_pretrained` loads.

    Args:
      folder: the output folder (created; `adapter_config.json` and `adapter_model.safetensors` in it are
        replaced together, atomically, other files are left alone).
      adapters: per-layer or stacked adapter tree (`init_lora`).
      lora: its config (rank, alpha, dropout, targets, rslora).
      base_model_name_or_path: the hub id or path of the base, written for PEFT and for people.
      base_params: the base's params; when given, their `base_weights_sha256` goes in the weights
        file's metadata, and `load_peft_adapter` refuses another base.
      base_sha256: that hash when it is known without the params (a LoRA training run records it).

    Returns:
      The folder.
    """
    adapters = layer_stacking.unstack_layers(unwrap_params(adapters))
    blocks = adapters["transformer"] if "transformer" in adapters else adapters
    tensors: dict[str, np.ndarray] = {}
    for layer in layer_keys(adapters):
        found = tuple(f"{b}.{n}" for b, mods in blocks[layer].items() for n in mods)
        if sorted(found) != sorted(lora.modules):
            raise ValueError(f"block {layer} has adapters on {', '.join(sorted(found))} but the LoRAConfig targets "
                             f"{', '.join(lora.modules)}: pass the config the adapters were made with")
        for module in lora.modules:
            block, name = module.split(".")
            a, b = (_to_numpy(blocks[layer][block][name][k]) for k in ("lora_a", "lora_b"))
            if a.shape[-1] != lora.rank or b.shape[0] != lora.rank:
                raise ValueError(f"{layer}/{module} has rank {a.shape[-1]}, the LoRAConfig rank {lora.rank}")
            prefix = f"base_model.model.transformer.{layer.replace('_', '.')}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = a.reshape(-1, lora.rank).T
            tensors[f"{prefix}.lora_B.weight"] = b.reshape(lora.rank, -1).T
    metadata = {"format": "pt"}
    if base_params is not None and base_sha256 is not None:
        raise ValueError("pass base_params or base_sha256 (the hash of the same weights), not both")
    if base_params is not None:
        metadata[BASE_HASH_KEY] = base_weights_sha256(base_params)
    elif base_sha256 is not None:
        metadata[BASE_HASH_KEY] = base_sha256
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank, "lora_alpha": alpha, "lora_dropout": lora.dropout, "target_modules": list(lora.targets),
        "use_rslora": lora.use_rslora, "fan_in_fan_out": True, "bias": "none", "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "revision": None,
    }
    folder = os.fspath(folder)
    with file_io.staged_folder(folder) as staging:
        formats.write_safetensors(staging, tensors, filename=ADAPTER_WEIGHTS, metadata=metadata,
                                           progress=False)
        with open(os.path.join(staging, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    return folder


def _to_numpy(x: Any) -> np.ndarray:
    x = np.asarray(jax.device_get(x))
    return x if x.dtype in (np.float32, np.float16) else x.astype(np.float32)


def read_peft_config(folder: str | os.PathLike, params: Mapping[str, Any]) -> LoRAConfig:
    """The `LoRAConfig` of a PEFT folder, after checking that flax_gpt2 can apply the adapter exactly."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no adapter folder {folder}")
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG} (it holds "
                                f"{sorted(os.listdir(folder)) or 'nothing'})")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path}: peft_type is {peft_type!r}; flax_gpt2 loads only LoRA adapters (peft_type LORA)")
    for key, (default, what) in _UNSUPPORTED.items():
        value = raw.get(key, default)
        if not (value is None or value is False or value == {} or value == []):
            raise ValueError(f"{path}: {key}={value!r} is not supported ({what}); flax_gpt2 applies plain LoRA "
                             f"only: {key} must be {default!r}")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={raw['bias']!r} is not supported (it trains the base's biases, which the "
                         "adapter file then has to carry); flax_gpt2 loads bias='none' adapters only")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"{path}: init_lora_weights={init!r} rewrites the base weights, so the adapter fits only "
                         "that modified base; save it with PEFT's path_initial_model_for_weight_conversion to get "
                         "a plain LoRA adapter of the original base")
    rank = raw.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{path}: r={rank!r}; a LoRA adapter needs an integer rank r > 0")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        targets = _regex_targets(targets, params, path)
    elif not isinstance(targets, list) or not targets:
        raise ValueError(f"{path}: target_modules={targets!r}; expected a list of module names or a regex")
    try:
        return LoRAConfig(rank=rank, alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                          targets=tuple(targets), use_rslora=bool(raw.get("use_rslora", False)))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _regex_targets(pattern: str, params: Mapping[str, Any], path: str) -> tuple[str, ...]:
    """PEFT's `target_modules` as one regex (full match on module names such as `transformer.h.0.attn.c_attn`),
    as explicit module names: the same modules must match in every layer."""
    n_layer = len(layer_keys(layer_stacking.unstack_layers(unwrap_params(params))))
    per_layer = [tuple(m for m in MODULES if re.fullmatch(pattern, f"transformer.h.{i}.{m}")) for i in range(n_layer)]
    if len(set(per_layer)) != 1:
        raise ValueError(f"{path}: target_modules regex {pattern!r} adapts different modules in different layers; "
                         "flax_gpt2 adapts the same modules in every layer")
    if not per_layer[0]:
        raise ValueError(f"{path}: target_modules regex {pattern!r} matches none of GPT-2's modules "
                         f"({', '.join(TARGET_NAMES)})")
    return per_layer[0]


def load_peft_adapter(folder: str | os.PathLike, params: Mapping[str, Any], config: GPT2Config, *,
                      dtype: Any = jnp.float32, check_base: bool = True) -> tuple[dict[str, Any], LoRAConfig]:
    """Reads a PEFT LoRA adapter folder (written by PEFT or by `save_peft_adapter`) for the base `params`.

    Args:
      folder: holds `adapter_config.json` and `adapter_model.safetensors` (or an older `adapter_model.bin`).
      params: the base params the adapter is for (per-layer or stacked; the adapters come in that layout).
      config: the base's config.
      dtype: the adapters' dtype.
      check_base: compare the base-weights hash the folder carries (if any, see `save_peft_adapter`)
        with `params`; False skips that (an adapter deliberately used on another base of the same shape).

    Returns:
      `(adapters, lora)`: apply with `apply_lora(params, adapters, lora)`.

    Raises:
      FileNotFoundError: no folder, or no config or weights file in it.
      ValueError: naming the problem: not LoRA (IA3, ...), options flax_gpt2 cannot apply (DoRA, bias,
        per-module ranks, ...), unknown or missing module keys, a rank or shape for another base, a
        base-weights hash that differs.
    """
    params = unwrap_params(params)
    lora = read_peft_config(folder, params)
    folder = os.fspath(folder)
    tensors, metadata = _read_tensors(folder, config)
    per_layer = layer_stacking.unstack_layers(params)
    n_layer = len(layer_keys(per_layer))
    if n_layer != config.n_layer:
        raise ValueError(f"params have {n_layer} layers but config.n_layer={config.n_layer}")
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        if not m:
            unknown.append(key)
            continue
        found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value
    if unknown:
        raise ValueError(f"{folder}: {len(unknown)} adapter key(s) are not LoRA weights of GPT-2's modules "
                         f"({', '.join(MODULES)}): {join_names(sorted(unknown))}")
    deep = sorted({i for i, _ in found if i >= n_layer})
    if deep:
        raise ValueError(f"{folder}: the adapter has weights for layer {deep[-1]}, but this base has {n_layer} "
                         "layers: it was made for another base model")
    expected = {(i, m) for i in range(n_layer) for m in lora.modules}
    extra = sorted(set(found) - expected)
    missing = sorted(expected - set(found)) + sorted(k for k, v in found.items() if set(v) != {"A", "B"})
    if extra:
        raise ValueError(f"{folder}: the file adapts {', '.join(f'h.{i}.{m}' for i, m in extra[:6])}, which "
                         f"target_modules {list(lora.targets)} does not select")
    if missing:
        raise ValueError(f"{folder}: lora_A/lora_B weights are missing for "
                         f"{', '.join(f'h.{i}.{m}' for i, m in missing[:6])} (target_modules {list(lora.targets)})")

    blocks: dict[str, Any] = {}
    for (i, module), ab in sorted(found.items()):
        kernel = kernel_of(per_layer, f"h_{i}", module)
        n_in = {"attn.c_proj": 2}.get(module, 1)
        in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
        want = {"A": (lora.rank, int(np.prod(in_shape))), "B": (int(np.prod(out_shape)), lora.rank)}
        for part in "AB":
            if ab[part].shape != want[part]:
                raise ValueError(
                    f"{folder}: h.{i}.{module}.lora_{part}.weight has shape {list(ab[part].shape)}, but r={lora.rank} "
                    f"on this base (n_embd={config.n_embd}) needs {list(want[part])}: the adapter was made for "
                    "another base model, or its r does not match adapter_config.json")
        block, name = module.split(".")
        blocks.setdefault(f"h_{i}", {}).setdefault(block, {})[name] = {
            "lora_a": jnp.asarray(_float(ab["A"]).T.reshape(*in_shape, lora.rank), dtype),
            "lora_b": jnp.asarray(_float(ab["B"]).T.reshape(lora.rank, *out_shape), dtype)}
    stored_hash = metadata.get(BASE_HASH_KEY)
    if check_base and stored_hash is not None and stored_hash != base_weights_sha256(params):
        raise ValueError(f"{folder}: the adapter was saved for other base weights (their sha256 {stored_hash[:12]}... "
                         f"differs from these params'; base_model_name_or_path is "
                         f"{_base_name(folder)!r}); load that base (or, to apply it to these weights "
                         "anyway, call load_peft_adapter(..., check_base=False))")
    adapters = {"transformer": blocks} if "transformer" in params else blocks
    return layer_stacking.to_layout(adapters, layer_stacking.is_stacked(params)), lora


class AdapterError(ValueError):
    """An adapter folder that cannot be read or does not fit the base it is loaded onto: what
    `from_pretrained(adapter=...)` raises, so a loader tells it apart from a fault in the base's own files
    (`flax_gpt2.checkpoints.loading` converts a cached base again on the latter, never on the former)."""


def adapter_for_base(folder: str | os.PathLike, params: Mapping[str, Any],
                     config: GPT2Config) -> tuple[dict[str, Any], LoRAConfig]:
    """`load_peft_adapter(folder, params, config)` with its every error (a missing folder or file, an
    adapter for another base, options flax_gpt2 cannot apply) raised as an `AdapterError` with the same
    message, which names the folder."""
    folder = file_io.resolve_path(os.fspath(folder))
    try:
        return load_peft_adapter(folder, params, config)
    except (OSError, ValueError) as e:
        raise AdapterError(str(e) if folder in str(e) else f"adapter {folder}: {e}") from e


def _read_tensors(folder: str, config: GPT2Config) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    limit = 2 * len(MODULES) * config.n_layer + 16  # every module of every layer, A and B, and a little slack
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if os.path.isfile(path):
        return formats.read_safetensors(path, progress=False, max_tensors=limit)
    path = os.path.join(folder, ADAPTER_WEIGHTS_BIN)
    if os.path.isfile(path):
        return dict(formats.read_weights(path, progress=False, max_tensors=limit)), {}
    raise FileNotFoundError(f"{folder} has {ADAPTER_CONFIG} but no adapter weights ({ADAPTER_WEIGHTS} or "
                            f"{ADAPTER_WEIGHTS_BIN})")


def _float(x: np.ndarray) -> np.ndarray:
    """float32 from any float dtype a PEFT file holds (float16, bfloat16, float32)."""
    if x.dtype not in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16):
        raise ValueError(f"adapter weights must be floating point, got {x.dtype}")
    return np.asarray(x, np.float32)


def _base_name(folder: str) -> Any:
    with open(os.path.join(folder, ADAPTER_CONFIG), encoding="utf-8") as f:
        return json.load(f).get("base_model_name_or_path")

"""The one mapping from a training config (`config.model`, `config.init_from`) to the `GPT2Config` to train:
used by the train loop and by `compile_only`."""

from __future__ import annotations

import json
from typing import Any

from flax_gpt2.checkpoints.pretrained import from_pretrained
from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.config import PRESETS, GPT2Config
from flax_gpt2.modeling.lora import LoRAConfig
from flax_gpt2.utils import dtypes, file_io

from .config_checks import ConfigValueError


def _dtype(name: str, key: str):
    try:
        return dtypes.from_name(name, f"config.model.{key}")
    except ValueError as e:
        raise ConfigValueError(str(e)) from None


def model_config(config, resumed: dict[str, Any] | None = None, *, progress: bool = False) -> tuple[GPT2Config, Any]:
    """The `GPT2Config` to train, and the pretrained params (None when training from scratch).

    `resumed` is the Hugging Face config saved in the run's own checkpoints: a fine-tune that resumes takes
    its architecture from there and does not load `init_from` again (its checkpoint has newer weights, and
    `init_from` may no longer be reachable, e.g. a hub model on an offline pod).
    """
    jax_fields, sizes = model_fields(config)
    if config.init_from:
        if resumed is not None:
            return GPT2Config.from_hf_config(resumed).replace(**jax_fields), None
        # A LoRA base is read straight into its storage dtype (a bfloat16 base never exists in float32 here).
        model, params = from_pretrained(config.init_from, param_dtype=base_dtype(config) or jax_fields["param_dtype"],
                                                  progress=progress,
                                                  pass_folder_as="--config.init_from=DIR")
        return model.config.replace(**jax_fields), layer_stacking.to_layout(params, config.model.scan_layers)
    return GPT2Config.from_preset(config.model.preset, **sizes, **jax_fields), None


def lora_config(config) -> LoRAConfig | None:
    """The run's `LoRAConfig` (`config.lora.*`, checked by `config_checks.check_lora`); None when `lora.rank`
    is 0 (full training)."""
    lora = config.lora
    if not lora.rank:
        return None
    return LoRAConfig(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets)


def base_dtype(config):
    """The dtype a LoRA run keeps its frozen base in (`lora.base_dtype`, default `model.param_dtype`); None
    without LoRA."""
    if not config.lora.rank:
        return None
    if not config.lora.base_dtype:
        return _dtype(config.model.param_dtype, "param_dtype")
    try:
        return dtypes.from_name(config.lora.base_dtype, "config.lora.base_dtype")
    except ValueError as e:
        raise ConfigValueError(str(e)) from None


def model_fields(config) -> tuple[dict[str, Any], dict[str, int]]:
    """The config's JAX-side model fields (dtypes, remat, ...) and the sizes it sets, checked."""
    m = config.model
    jax_fields = dict(dtype=_dtype(m.dtype, "dtype"), param_dtype=_dtype(m.param_dtype, "param_dtype"),
                      remat=m.remat, scan_layers=m.scan_layers, attention=m.attention,
                      resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout)
    sizes = {k: m[k] for k in ("n_layer", "n_embd", "n_head", "n_positions") if m[k] is not None}
    if config.init_from and sizes:
        raise ConfigValueError(f"config.model sets {sorted(sizes)} but init_from={config.init_from!r} fixes the "
                               "architecture; drop them")
    return jax_fields, sizes


def architecture(config) -> GPT2Config:
    """`model_config(config)[0]` without loading pretrained weights: only the architecture (for compile_only).

    `init_from` must then be a preset name or a folder holding `config.json`.
    """
    if not config.init_from:
        return model_config(config)[0]
    fields = model_fields(config)[0]  # the run's own settings, checked and converted as a real run does
    if config.init_from in PRESETS:
        return GPT2Config.from_preset(config.init_from, **fields)
    hf_config = file_io.join(config.init_from, "config.json")
    if file_io.exists(hf_config):
        return GPT2Config.from_hf_config(json.loads(file_io.read_text(hf_config)), **fields)
    raise ConfigValueError(f"compile_only with init_from={config.init_from!r}: give a preset name "
                           f"({', '.join(sorted(PRESETS))}) or a folder with config.json")

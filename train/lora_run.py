"""What a LoRA run (`lora.rank > 0`) needs besides the train step: its frozen base, placed and identified.

The base is `init_from`'s weights (read in `lora.base_dtype` by `model_config.model_config`), or without
`init_from` the seed's random init (the weights full training would start from). Its identity is the
sha256 of its weights (`flax_gpt2.base_weights_sha256`: independent of layout and of float32/bfloat16
storage), which the train loop keeps with the config in every checkpoint: the checkpoints hold only the
adapters, and a resume on other base weights is refused (`run_guard.BASE`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from flax_gpt2.checkpoints import peft_adapters, run_folders

from . import mesh as mesh_lib, model_config as model_config_lib, step as step_lib


def frozen_base(config, lora, model, pretrained, shardings, rng, seq_len: int,
                flat_config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """`(base, flat_config)`: a LoRA run's frozen base as global arrays placed by `shardings` in
    `lora.base_dtype`, and the flattened config with the base's weights' sha256 added
    (`run_folders.LORA_BASE_SHA256`); `(None, flat_config)` unchanged without LoRA (`lora` None).

    Args:
      config: the training config.
      lora: its `LoRAConfig` (`model_config.lora_config`) or None.
      model: the `GPT2LMHeadModel` being trained (its config: the layout, the random init).
      pretrained: `init_from`'s params as host arrays (None without init_from).
      shardings: the base's shardings (`TrainState.base` of `mesh.train_state_shardings`).
      rng: the init key of the run (a random base is drawn from it as full training's init is).
      seq_len: the training sequence length (the init's dummy input).
      flat_config: the run's flattened config, as checkpoints keep it.
    """
    if lora is None:
        return None, flat_config
    dtype = model_config_lib.base_dtype(config)
    if pretrained is not None:
        host = jax.tree.map(lambda x: np.asarray(x, dtype), pretrained)
        base = mesh_lib.place(host, shardings)
    else:
        base = step_lib.init_base(model, shardings, rng, seq_len, dtype)
        # Every process hashes the whole base (a random base is a small experiment's: gathering it is cheap).
        host = multihost_utils.process_allgather(base, tiled=True) if jax.process_count() > 1 else base
    return base, {**flat_config, run_folders.LORA_BASE_SHA256: peft_adapters.base_weights_sha256(host)}

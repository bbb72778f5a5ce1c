"""Read the adapters of a LoRA training run (`python -m train --config.lora.rank=R`).

Such a run's checkpoints hold only the adapters (and their optimizer state) under `params`, with the
`LoRAConfig` in the saved training config (`lora.*`) and what identifies the base they fit: `init_from`
and the base weights' sha256 (`run_folders.LORA_BASE_SHA256`). `load_run_adapter` returns all three;
`flax_gpt2.save_peft_adapter` writes them for Hugging Face PEFT.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from flax_gpt2.checkpoints import run_folders
from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.lora import LoRAConfig


def load_run_adapter(path: str | os.PathLike, step: int | None = None) -> tuple[Any, LoRAConfig, dict[str, Any]]:
    """The adapters of a LoRA training run's checkpoint, their config, and what identifies their base.

    Args:
      path: the run's workdir (`python -m train --config.lora.rank=R`).
      step: which checkpoint; default the latest readable one.

    Returns:
      `(adapters, lora, base)`: the adapter tree with one subtree per layer (as `init_lora` makes it, on the
      default device, float32 as trained), its `LoRAConfig`, and `base = {"init_from": the run's init_from
      ("" for a random base), "weights_sha256": flax_gpt2.base_weights_sha256 of the base it was trained on,
      "model_config": the base's Hugging Face config}`. Apply with `apply_lora(base_params, adapters, lora)`
      or save for PEFT with `save_peft_adapter`.

    Raises:
      FileNotFoundError: `path` has no checkpoint (or not `step`).
      ValueError: the run trained the whole model (use `load_run`).
      RuntimeError: no checkpoint could be read.
    """
    if not run_folders.is_training_run(path):
        raise FileNotFoundError(f"{os.fspath(path)} is not a training run with a complete checkpoint "
                                f"(expected {run_folders.checkpoint_dir(path)}/<step>/)")
    manager = run_folders.reader(path)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def restore(s: int) -> tuple[Any, LoRAConfig, dict[str, Any]]:
        where = f"checkpoint {run_folders.checkpoint_dir(path)}/{s}"
        meta = run_folders.read_meta(manager, s, where)
        lora = run_folders.run_lora_config(meta.train_config)
        if lora is None:
            raise run_folders.LoRARunError(f"{os.fspath(path)} trained the whole model, not a LoRA adapter (its "
                                           "lora.rank is 0): read it with flax_gpt2.from_pretrained")
        saved = manager.item_metadata(s)["params"]
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                getattr(saved, "tree", saved))
        adapters = manager.restore(s, args=run_folders.orbax().args.Composite(
            params=run_folders.orbax().args.StandardRestore(abstract)))["params"]
        run_folders.verify(adapters, meta.checksums.get("params"), where)
        base = {"init_from": meta.train_config.get("init_from", ""),
                "weights_sha256": meta.train_config.get(run_folders.LORA_BASE_SHA256),
                "model_config": meta.model_config}
        return layer_stacking.unstack_layers(adapters), lora, base

    try:
        restored, errors = run_folders.restore_newest_intact(
            run_folders.steps_to_try(manager, path, step), restore, where=run_folders.checkpoint_dir(path),
            fatal=(run_folders.LoRARunError,))
    finally:
        manager.close()
    if restored is None:
        raise RuntimeError(f"no readable checkpoint in {run_folders.checkpoint_dir(path)}:\n" + "\n".join(errors))
    if errors:
        logging.warning("using the checkpoint at step %d instead", restored[0])
    return restored[1]

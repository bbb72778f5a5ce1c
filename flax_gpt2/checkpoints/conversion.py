"""`convert`: any GPT-2 checkpoint `from_pretrained` reads, checked and written as a Hugging Face folder
(safetensors, or transformers' old Flax msgpack), optionally with a LoRA adapter merged in; and
`export_adapter`: a LoRA adapter checked against its base and written as a PEFT folder. What
`python -m flax_gpt2.convert` runs."""

from __future__ import annotations

import os

from flax_gpt2.checkpoints.peft_adapters import adapter_for_base, save_peft_adapter
from flax_gpt2.checkpoints.run_adapters import load_run_adapter
from flax_gpt2.checkpoints.pretrained import (MODEL_CLASSES, SAVE_FORMATS, check_output_folder, check_save_format,
                                              from_pretrained, resolve, save_pretrained)
from flax_gpt2.modeling.config import GPT2Config, read_hf_json
from flax_gpt2.tokenizer.bpe_files import tokenizer_files
from flax_gpt2.utils.dtypes import DTYPES

FORMATS = SAVE_FORMATS
# The adapter-only output: a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).
ADAPTER_FORMAT = "peft"


def convert(model: str, out: str, *, format: str = "safetensors", revision: str | None = None,
            dtype: str = "float32", overwrite: bool = False, progress: bool = True,
            pass_folder_as: str = "convert('DIR', ...)", adapter: str | os.PathLike | None = None) -> str:
    """Reads a GPT-2 checkpoint from anywhere `from_pretrained` reads, checks it, and writes it to `out`.

    Args:
      model: hub id, Hugging Face folder (any weights format), flax_gpt2 training run, or gs://... path.
      out: output folder (must be empty or new unless `overwrite`).
      format: what is written: "safetensors" (a Hugging Face folder) or "msgpack" (the same folder with
        transformers' old Flax `flax_model.msgpack` as its weights; not for GPT2DoubleHeadsModel).
      revision: hub branch, tag or commit.
      dtype: "float32", "bfloat16" or "float16": the dtype the weights are stored in.
      overwrite: allow writing into a non-empty folder.
      progress: show progress bars.
      pass_folder_as: how the error for an unreachable hub says to pass a downloaded folder.
      adapter: a PEFT LoRA folder for `model`, merged into the written weights (`from_pretrained(adapter=)`):
        a plain model that transformers loads with the adapted model's logits.

    Returns:
      `out`.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_output_folder(os.fspath(out), overwrite)  # before anything is read
    folder = resolve(model, revision=revision, progress=progress, pass_folder_as=pass_folder_as)
    model_class = _saved_model_class(folder)
    check_save_format(format, model_class)  # before the weights are read
    loaded, params = from_pretrained(folder, model_class=model_class, param_dtype=DTYPES[dtype], progress=progress,
                                     adapter=adapter)
    has_tokenizer = tokenizer_files(folder) is not None  # vocab.json + merges.txt or encoder.json + vocab.bpe
    return save_pretrained(out, loaded, params, tokenizer=folder if has_tokenizer else True, dtype=DTYPES[dtype],
                           overwrite=overwrite, format=format, progress=progress)


def export_adapter(model: str, adapter: str | os.PathLike, out: str, *, revision: str | None = None,
                   overwrite: bool = False, progress: bool = True,
                   pass_folder_as: str = "export_adapter('DIR', ...)") -> str:
    """Reads the LoRA adapter `adapter` of the base `model`, checks it against that base, and writes it to
    `out` as a PEFT folder that `peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), out)`
    loads (`save_peft_adapter`), recording `model` as `base_model_name_or_path` and the base's weight hash.

    Args:
      model: the base: hub id, Hugging Face folder, training run or gs://... path.
      adapter: where the adapter is read from; today a PEFT LoRA folder (written by PEFT or by
        flax_gpt2), so this re-exports and validates it (see `read_adapter`).
      out: output folder (must be empty or new unless `overwrite`).
      revision, overwrite, progress, pass_folder_as: as `convert`'s.

    Returns:
      `out`.
    """
    check_output_folder(os.fspath(out), overwrite)  # before anything is read
    folder = resolve(model, revision=revision, progress=progress, pass_folder_as=pass_folder_as)
    loaded, params = from_pretrained(folder, progress=progress)
    adapters, lora = read_adapter(adapter, params, loaded.config)
    return save_peft_adapter(out, adapters, lora, base_model_name_or_path=os.fspath(model), base_params=params)


def read_adapter(source: str | os.PathLike, params, config: GPT2Config):
    """`(adapters, lora)` from a PEFT LoRA folder `source` for the base `params` (`adapter_for_base`: every
    error an `AdapterError` naming it). A LoRA training run's adapter: `export_run_adapter`."""
    return adapter_for_base(source, params, config)


def export_run_adapter(run: str | os.PathLike, out: str, *, overwrite: bool = False) -> str:
    """The newest adapter of a LoRA training run (`python -m train --config.lora.rank=R`) as a PEFT folder for
    the run's base (`init_from`, recorded as `base_model_name_or_path`, with the base weights' hash the run
    trained on), which `peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(init_from), out)` loads.

    Raises ValueError for a run that trained the whole model (convert it as a model instead) or a LoRA run
    on a random base (no `init_from`: there is no base model PEFT could load it onto)."""
    check_output_folder(os.fspath(out), overwrite)  # before anything is read
    adapters, lora, base = load_run_adapter(run)
    if not base["init_from"]:
        raise ValueError(f"{os.fspath(run)} trained LoRA on a random base (no init_from): no base model exists that "
                         "PEFT could load the adapter onto")
    return save_peft_adapter(out, adapters, lora, base_model_name_or_path=base["init_from"],
                             base_sha256=base["weights_sha256"])


def _saved_model_class(folder: str) -> type:
    """The model class named in the folder's config.json `architectures` (GPT2LMHeadModel if none).

    The whole config.json is checked first, so a field of the wrong JSON type is the config's one-line
    error naming the file and the field, before anything is read or written.
    """
    path = os.path.join(folder, "config.json")
    if os.path.isfile(path):
        GPT2Config.from_hf_config(path)
        for name in read_hf_json(path).get("architectures") or ():
            if name in MODEL_CLASSES:
                return MODEL_CLASSES[name]
    return MODEL_CLASSES["GPT2LMHeadModel"]

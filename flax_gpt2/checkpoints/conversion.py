"""`convert`: any GPT-2 checkpoint `from_pretrained` reads, checked and written as a Hugging Face folder
(safetensors, or transformers' old Flax msgpack): what `python -m flax_gpt2.convert` runs."""

from __future__ import annotations

import os

from flax_gpt2.checkpoints.pretrained import (MODEL_CLASSES, SAVE_FORMATS, check_output_folder, check_save_format,
                                              from_pretrained, resolve, save_pretrained)
from flax_gpt2.modeling.config import GPT2Config, read_hf_json
from flax_gpt2.tokenizer.bpe_files import tokenizer_files
from flax_gpt2.utils.dtypes import DTYPES

FORMATS = SAVE_FORMATS


def convert(model: str, out: str, *, format: str = "safetensors", revision: str | None = None,
            dtype: str = "float32", overwrite: bool = False, progress: bool = True,
            pass_folder_as: str = "convert('DIR', ...)") -> str:
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
    loaded, params = from_pretrained(folder, model_class=model_class, param_dtype=DTYPES[dtype], progress=progress)
    has_tokenizer = tokenizer_files(folder) is not None  # vocab.json + merges.txt or encoder.json + vocab.bpe
    return save_pretrained(out, loaded, params, tokenizer=folder if has_tokenizer else True, dtype=DTYPES[dtype],
                           overwrite=overwrite, format=format, progress=progress)


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

"""Reading and writing GPT-2 checkpoint files as `{key: numpy array}` dicts: one module per format
(`safetensors`, `torch_bin`, `msgpack`, `sharded` for `*.index.json`), `common` for what they share.

Formats read (first found wins, in this order, per `WEIGHT_FILES`):
  * `model.safetensors`, or shards listed in `model.safetensors.index.json` (Hugging Face).
  * `pytorch_model.bin` (or its `.index.json` shards): torch's zip format, read by a small pickle
    interpreter that only rebuilds tensors. Neither pickled code nor torch itself is ever run.
  * `flax_model.msgpack`: transformers' old Flax GPT-2 layout, returned under HF PyTorch key names.

Formats written: safetensors (`write_safetensors`, what transformers writes today) and the Flax msgpack
layout (`write_flax_msgpack`, for transformers <= 4.x's `FlaxGPT2*.from_pretrained`).

Every file is untrusted input. A file that cannot be read is a `CheckpointError` (a ValueError) or an
OSError whose message names the file and what is wrong with it, and reading never allocates much more
than the tensors the file really holds: `.bin` tensors are read-only views of the memory-mapped file,
so only the tensors a caller uses are ever read from disk.
"""

from __future__ import annotations

import os

from flax_gpt2.checkpoints.formats.common import (FLAX_MSGPACK, MAX_TENSORS, SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN,
                                                  TORCH_BIN_INDEX, WEIGHT_FILES, CheckpointError, StateDict,
                                                  UnsafePickleError, parse_size)
from flax_gpt2.checkpoints.formats.msgpack import read_flax_msgpack, write_flax_msgpack
from flax_gpt2.checkpoints.formats.safetensors import read_safetensors, read_safetensors_checked, write_safetensors
from flax_gpt2.checkpoints.formats.sharded import read_sharded
from flax_gpt2.checkpoints.formats.torch_bin import read_torch_bin

__all__ = ["FLAX_MSGPACK", "MAX_TENSORS", "SAFETENSORS", "SAFETENSORS_INDEX", "TORCH_BIN", "TORCH_BIN_INDEX",
           "WEIGHT_FILES", "CheckpointError", "StateDict", "UnsafePickleError", "find_weights", "parse_size",
           "read_flax_msgpack", "read_safetensors", "read_torch_bin", "read_weights", "write_flax_msgpack",
           "write_safetensors"]


def find_weights(folder: str | os.PathLike) -> str:
    """Path of the preferred weights file in `folder`; FileNotFoundError naming what was looked for."""
    folder = os.fspath(folder)
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise FileNotFoundError(f"no GPT-2 weights in {folder}: looked for {', '.join(WEIGHT_FILES)}; "
                            f"the folder holds {present or 'nothing'}")



def read_weights(path: str | os.PathLike, *, progress: bool = True, max_tensors: int | None = None) -> StateDict:
    """All tensors of any supported weights file (or shard index), under HF PyTorch key names.

    `max_tensors` (default `MAX_TENSORS`; `from_pretrained` passes a bound from the model's config) caps
    the entries a safetensors header, shard index or msgpack tree may list, checked before they are built.

    Raises:
      CheckpointError (a ValueError): the file is corrupt, truncated, inconsistent or unsafe.
      OSError: the file (or a shard) is missing, is a folder, or cannot be read.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    limit = MAX_TENSORS if max_tensors is None else max_tensors
    if name.endswith(".index.json"):
        return read_sharded(path, progress=progress, max_tensors=limit)
    if name.endswith(".safetensors"):
        tensors = read_safetensors_checked(path, progress=progress, max_tensors=limit)[0]
        return StateDict(path, tensors)
    if name.endswith(".bin"):
        return read_torch_bin(path, progress=progress)
    if name.endswith(".msgpack"):
        return read_flax_msgpack(path, max_tensors=limit)
    raise ValueError(f"unknown weights file format: {path} (expected one of {', '.join(WEIGHT_FILES)})")


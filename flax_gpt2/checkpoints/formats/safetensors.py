"""safetensors files: `model.safetensors` (what transformers writes today), read with its header checked before
any tensor is, and written in shards under `max_shard_size`."""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Mapping

import numpy as np

from flax_gpt2.checkpoints.formats.common import (MAX_TENSORS, SAFETENSORS, CheckpointError, StateDict,
                                                  load_manifest_json, manifest_bytes, parse_size, progress_bar, reading,
                                                  require_file)

# safetensors dtypes numpy can hold (the library names the rest, e.g. F8_E5M2, as numpy attributes that
# do not exist).
_SAFETENSORS_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16",
                                 "U8", "BOOL"})



def read_safetensors(path: str, *, progress: bool = True, max_tensors: int = MAX_TENSORS
                     ) -> tuple[StateDict, dict[str, str]]:
    """All tensors of one safetensors file, and its metadata.

    The header is checked first (at most `max_tensors` tensors, of dtypes numpy holds); the safetensors
    library then checks shapes and that the tensors tile the data exactly, so what is read is at most
    the file's size.
    """
    return read_safetensors_checked(path, progress=progress, max_tensors=max_tensors)



def read_safetensors_checked(path: str, *, progress: bool = True, max_tensors: int = MAX_TENSORS,
                      check_keys: Callable[[list[str]], None] | None = None) -> tuple[StateDict, dict[str, str]]:
    """`read_safetensors`, calling `check_keys(names)` after the header is read and before any data is."""
    from safetensors import safe_open

    require_file(path)
    _check_safetensors_header(path, max_tensors)
    out = StateDict(path)
    with reading(path, "safetensors"), safe_open(path, framework="numpy") as f:
        keys = list(f.keys())
        if check_keys is not None:
            check_keys(keys)
        with progress_bar(len(keys), f"Reading {os.path.basename(path)}", progress) as bar:
            for key in keys:
                out[key] = f.get_tensor(key)
                bar.update()
        return out, dict(f.metadata() or {})



def _check_safetensors_header(path: str, max_tensors: int) -> None:
    """CheckpointError unless the header is small, lists at most `max_tensors` tensors and only dtypes
    numpy can hold: checked in Python before the library builds anything from it."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return  # the library names a file too short to hold a header
        (length,) = struct.unpack("<Q", head)
        if length > manifest_bytes(max_tensors):
            raise CheckpointError(f"{path} has a {length}-byte safetensors header, more than the "
                                  f"{manifest_bytes(max_tensors)} bytes {max_tensors} tensors can need; it is not "
                                  "a GPT-2 checkpoint (or is corrupt)")
        raw = f.read(length)
    try:
        header = load_manifest_json(raw, path, max_tensors, "tensors in its safetensors header")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return  # not JSON: the library's own message says so
    if not isinstance(header, Mapping):
        return
    for key, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, Mapping) and key != "__metadata__" else None
        if isinstance(dtype, str) and dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has dtype {dtype}, which numpy cannot hold; save the "
                                  "checkpoint in F32, F16 or BF16")



def write_safetensors(folder: str | os.PathLike, tensors: Mapping[str, np.ndarray], *, filename: str = SAFETENSORS,
                      metadata: Mapping[str, str] | None = None, max_shard_size: int | str | None = None,
                      progress: bool = True) -> list[str]:
    """Writes `tensors` to `folder/filename`, or, when larger than `max_shard_size`, to shards
    `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json` as transformers does.

    Returns the names of the files written.
    """
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    metadata = dict(metadata or {})
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        if limit is not None and shards[-1] and size + value.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = np.ascontiguousarray(value)
        size += value.nbytes
    if len(shards) == 1:
        with progress_bar(1, f"Writing {filename}", progress, unit="file") as bar:
            save_file(shards[0], os.path.join(folder, filename), metadata=metadata)
            bar.update()
        return [filename]
    stem, ext = os.path.splitext(filename)
    names = [f"{stem.split('.')[0]}-{i + 1:05d}-of-{len(shards):05d}{ext}" for i in range(len(shards))]
    with progress_bar(len(shards), f"Writing {len(shards)} shards", progress, unit="shard") as bar:
        for name, shard in zip(names, shards):
            save_file(shard, os.path.join(folder, name), metadata=metadata)
            bar.update()
    index = {"metadata": {"total_parameters": int(sum(v.size for v in tensors.values())),
                          "total_size": int(sum(v.nbytes for v in tensors.values()))},
             "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
    index_name = filename + ".index.json"
    with open(os.path.join(folder, index_name), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    return names + [index_name]


"""Sharded checkpoints: `*.index.json` (a weight map from tensor names to shard files) and its shards, in
safetensors or torch `.bin` format, each shard checked against the index."""

from __future__ import annotations

import collections
import os
from typing import Mapping

from flax_gpt2.checkpoints.formats.common import (MAX_TENSORS, SAFETENSORS_INDEX, TORCH_BIN_INDEX, CheckpointError,
                                                  StateDict, join_names, load_manifest_json, manifest_bytes,
                                                  progress_bar, reading, require_file)
from flax_gpt2.checkpoints.formats.safetensors import read_safetensors_checked
from flax_gpt2.checkpoints.formats.torch_bin import read_torch_bin
from flax_gpt2.utils import file_io


def read_index(index_path: str, max_tensors: int = MAX_TENSORS) -> dict[str, str]:
    """The `weight_map` of a shard index, checked to be `{tensor name: shard file name}` (at most
    `max_tensors` of them)."""
    require_file(index_path)
    size = os.path.getsize(index_path)
    if size > manifest_bytes(max_tensors):
        raise CheckpointError(f"{index_path} is {size} bytes, more than the {manifest_bytes(max_tensors)} a shard "
                              f"index of {max_tensors} tensors can need; it is not a GPT-2 shard index")
    with reading(index_path, "shard index (JSON)"), open(index_path, encoding="utf-8") as f:
        index = load_manifest_json(f.read(), index_path, max_tensors, "JSON objects")
    if not isinstance(index, Mapping) or not isinstance(index.get("weight_map"), Mapping):
        raise CheckpointError(f"{index_path} has no weight_map object (the shard index maps each tensor name "
                              "to the shard file that holds it)")
    weight_map = index["weight_map"]
    if len(weight_map) > max_tensors:
        raise CheckpointError(f"{index_path} lists {len(weight_map)} tensors, more than the {max_tensors} a GPT-2 "
                              "checkpoint can have")
    bad = [f"{k!r}: {v!r}" for k, v in weight_map.items() if not (isinstance(v, str) and v)]
    if bad:
        raise CheckpointError(f"{index_path}: weight_map values must be shard file names, got {join_names(bad)}")
    return dict(weight_map)



def read_sharded(index_path: str, *, progress: bool = True, max_tensors: int = MAX_TENSORS) -> StateDict:
    """The tensors of every shard an index lists, checked against the index: each tensor must be in exactly
    the shard the index names (a tensor in two shards, or one the index does not list, is an error)."""
    # "model.safetensors.index.json" lists ".safetensors" shards, "pytorch_model.bin.index.json" ".bin" ones.
    extension = os.path.splitext(os.path.basename(index_path).removesuffix(".index.json"))[1]
    if extension not in (".safetensors", ".bin"):
        raise ValueError(f"unknown shard index {index_path}: expected {SAFETENSORS_INDEX} or {TORCH_BIN_INDEX}")
    weight_map = read_index(index_path, max_tensors)
    folder = os.path.dirname(index_path)
    listed: dict[str, set[str]] = collections.defaultdict(set)
    for key, shard in weight_map.items():
        listed[shard].add(key)
    paths = {}
    for shard, keys in listed.items():  # every name checked before any shard is opened
        paths[shard] = file_io.manifest_member(folder, shard, manifest=index_path,
                                               key=f"weight_map[{min(keys)!r}]")
        if not shard.endswith(extension):
            raise CheckpointError(f"{index_path} lists shard {shard!r}, which is not a {extension} file")
    for shard, shard_path in paths.items():
        if not os.path.isfile(shard_path):
            what = "a folder" if os.path.isdir(shard_path) else "not there"
            raise FileNotFoundError(f"{index_path} lists shard {shard}, which is {what} ({folder})")

    out = StateDict(index_path)
    with progress_bar(len(listed), f"Reading {len(listed)} shards", progress, unit="shard") as bar:
        for shard in sorted(listed):
            shard_path = paths[shard]
            if extension == ".safetensors":  # names checked from the header, before any data is read
                tensors = read_safetensors_checked(shard_path, progress=False, max_tensors=max_tensors,
                                            check_keys=lambda keys: _check_shard(index_path, weight_map, shard,
                                                                                 keys))[0]
            else:
                tensors = read_torch_bin(shard_path, progress=False)  # lazy views: nothing read yet
                _check_shard(index_path, weight_map, shard, list(tensors))
            out.update(tensors)
            out._files.update(dict.fromkeys(tensors, shard_path))
            bar.update()
    return out



def _check_shard(index_path: str, weight_map: Mapping[str, str], shard: str, keys: list[str]) -> None:
    """CheckpointError unless `shard` holds exactly the tensors `weight_map` assigns to it."""
    problems = []
    elsewhere = sorted(k for k in keys if k in weight_map and weight_map[k] != shard)
    if elsewhere:
        problems.append("also holds " + join_names(f"{k} (which the index puts in {weight_map[k]})" for k in elsewhere))
    unlisted = sorted(k for k in keys if k not in weight_map)
    if unlisted:
        problems.append("holds tensors the index does not list: " + join_names(unlisted))
    missing = sorted(set(k for k, s in weight_map.items() if s == shard) - set(keys))
    if missing:
        problems.append("lacks tensors the index puts there: " + join_names(missing))
    if problems:
        raise CheckpointError(f"shard {shard} does not match {index_path}: it " + "; it ".join(problems))


"""Reading and writing GPT-2 checkpoint files as `{key: numpy array}` dicts.

Formats read (first found wins, in this order, per `WEIGHT_FILES`):
  * `model.safetensors`, or shards listed in `model.safetensors.index.json` (Hugging Face).
  * `pytorch_model.bin` (or its `.index.json` shards): torch's zip format, read by a restricted
    unpickler that only rebuilds tensors. Neither pickled code nor torch itself is ever run.
  * `flax_model.msgpack`: transformers' old Flax GPT-2 layout, returned under HF's PyTorch key names.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import sys
import zipfile
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
# safetensors first: it is memory-mapped, safe by construction, and what transformers writes today.
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX, FLAX_MSGPACK)

StateDict = dict[str, np.ndarray]


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


def read_weights(path: str | os.PathLike, *, progress: bool = True) -> StateDict:
    """All tensors of any supported weights file (or shard index), under HF PyTorch key names."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if name.endswith(".index.json"):
        return _read_sharded(path, progress=progress)
    if name.endswith(".safetensors"):
        return read_safetensors(path, progress=progress)[0]
    if name.endswith(".bin"):
        return read_torch_bin(path, progress=progress)
    if name.endswith(".msgpack"):
        return read_flax_msgpack(path)
    raise ValueError(f"unknown weights file format: {path} (expected one of {', '.join(WEIGHT_FILES)})")


def _bar(total: int, desc: str, progress: bool, unit: str = "tensor"):
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)


# --- safetensors ---------------------------------------------------------------------------------------

def read_safetensors(path: str, *, progress: bool = True) -> tuple[StateDict, dict[str, str]]:
    """All tensors of one safetensors file, and its metadata."""
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="numpy") as f:
        keys = list(f.keys())
        with _bar(len(keys), f"Reading {os.path.basename(path)}", progress) as bar:
            for key in keys:
                out[key] = f.get_tensor(key)
                bar.update()
        return out, dict(f.metadata() or {})


def _read_sharded(index_path: str, *, progress: bool = True) -> StateDict:
    with open(index_path, encoding="utf-8") as f:
        weight_map: Mapping[str, str] = json.load(f)["weight_map"]
    folder = os.path.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    out: StateDict = {}
    with _bar(len(shards), f"Reading {len(shards)} shards", progress, unit="shard") as bar:
        for shard in shards:
            if os.path.basename(shard) != shard:
                raise ValueError(f"{index_path} names shard {shard!r} outside its folder")
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{index_path} lists shard {shard}, which is not in {folder}")
            tensors = (read_safetensors(shard_path, progress=False)[0] if shard.endswith(".safetensors")
                       else read_torch_bin(shard_path, progress=False))
            out.update(tensors)
            bar.update()
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise ValueError(f"{index_path} lists tensors that no shard holds: {missing}")
    return out


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like "5GB", "500MB", "2GiB" (decimal units as HF uses)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the size {size!r}; write e.g. 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


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
        with _bar(1, f"Writing {filename}", progress, unit="file") as bar:
            save_file(shards[0], os.path.join(folder, filename), metadata=metadata)
            bar.update()
        return [filename]
    stem, ext = os.path.splitext(filename)
    names = [f"{stem.split('.')[0]}-{i + 1:05d}-of-{len(shards):05d}{ext}" for i in range(len(shards))]
    with _bar(len(shards), f"Writing {len(shards)} shards", progress, unit="shard") as bar:
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


# --- PyTorch zip checkpoints, without torch and without running pickled code --------------------------

_TORCH_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


# Stands in for `torch.FloatStorage` & co. inside the pickle.
_StorageType = collections.namedtuple("_StorageType", "name dtype")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """numpy twin of `torch._utils._rebuild_tensor_v2`: a strided view of a storage, copied out."""
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError("tensor without a storage in the checkpoint")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise pickle.UnpicklingError(f"invalid tensor layout: offset {offset}, size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    # Bounds are checked before as_strided, which would otherwise read past the buffer.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise pickle.UnpicklingError(f"tensor of size {size} (offset {offset}, stride {stride}) overruns its "
                                     f"storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` of a torch zip checkpoint, allowing only what a state dict of tensors needs."""

    def __init__(self, file, load_storage, source: str):
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        if module in ("torch", "torch.storage") and name in _TORCH_STORAGES:
            return _StorageType(name, _TORCH_STORAGES[name])
        raise pickle.UnpicklingError(
            f"{self._source} references the global {module}.{name}, which is not allowed: only tensors and "
            "OrderedDicts are loaded from pickles (no pickled code is ever run). Convert the checkpoint to "
            "safetensors with a tool you trust if it really needs that global.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def read_torch_bin(path: str, *, progress: bool = True) -> StateDict:
    """The state dict in a `torch.save` zip file (PyTorch >= 1.6), read without torch.

    Supports float32/float16/bfloat16 (and integer/bool) storages, shared, offset and strided tensors.
    Any pickled global other than the tensor rebuilders, storage types and OrderedDict is an error
    naming it, raised before anything is called.
    """
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(512)
        kind = "tar archive (PyTorch < 0.4)" if head[257:262] == b"ustar" else "legacy pickle (PyTorch < 1.6)"
        raise ValueError(
            f"{path} is in torch's {kind} format, which cannot be read without running its pickled code. "
            "Re-save it in the zip format (`torch.save(torch.load(path, weights_only=True), path)` with a "
            "recent torch) or convert it to safetensors.")
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip file but not a torch checkpoint (no <archive>/data.pkl)")
        root = pickles[0][: -len("data.pkl")]
        byteorder = "little"  # torch writes this file since 1.x; older files are little-endian
        if root + "byteorder" in zf.namelist():
            byteorder = zf.read(root + "byteorder").decode().strip()
        storages: dict[str, np.ndarray] = {}
        bar = _bar(0, f"Reading {os.path.basename(path)}", progress, unit="storage")

        def load_storage(key: str, dtype, numel: int) -> np.ndarray:
            if key not in storages:
                dt = np.dtype(dtype)
                try:
                    raw = zf.read(f"{root}data/{key}")
                except KeyError:
                    raise ValueError(f"{path}: storage data/{key} is missing") from None
                if len(raw) < numel * dt.itemsize:
                    raise ValueError(f"{path}: storage data/{key} holds {len(raw)} bytes, "
                                     f"expected {numel * dt.itemsize}")
                array = np.frombuffer(raw, dt, count=numel)
                if byteorder != sys.byteorder:
                    array = array.byteswap()
                storages[key] = array
                bar.update()
            return storages[key]

        with bar, zf.open(pickles[0]) as f:
            state = _TorchUnpickler(f, load_storage, path).load()
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(state)


# --- transformers' old Flax layout ------------------------------------------------------------------------

def read_flax_msgpack(path: str) -> StateDict:
    """`flax_model.msgpack` of transformers' FlaxGPT2Model / FlaxGPT2LMHeadModel, under HF PyTorch key names.

    In that layout `FlaxConv1D.kernel` is `[out, in]` (the transpose of PyTorch `Conv1D.weight`) and
    `nn.Dense.kernel` (the untied lm_head) is `[in, out]` (the transpose of `nn.Linear.weight`): every
    `kernel` is transposed back. `embedding` and LayerNorm `scale` become `weight`; blocks are `h/0/...`.
    """
    from flax.serialization import msgpack_restore

    with open(path, "rb") as f:
        tree = msgpack_restore(f.read())
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path} does not hold a parameter tree")
    out = {}
    for key, value in _flat_items(tree):
        *parents, leaf = key
        if leaf == "kernel":
            value = np.asarray(value).T
        leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
        out[".".join([*parents, leaf])] = np.asarray(value)
    return out


def _flat_items(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat_items(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value

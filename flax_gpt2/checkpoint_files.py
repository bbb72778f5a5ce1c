"""Reading and writing GPT-2 checkpoint files as `{key: numpy array}` dicts.

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

import collections
import contextlib
import json
import math
import os
import pickle
import pickletools
import re
import struct
import sys
import zipfile
from typing import Any, Callable, Iterable, Iterator, Mapping, NoReturn

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from flax_gpt2.utils import file_io

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
# safetensors first: it is memory-mapped, safe by construction, and what transformers writes today.
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX, FLAX_MSGPACK)
# The most tensors a weights file (or shard index) may list when the model is not known. gpt2-xl has 580
# (677 with the causal-mask buffers older files carry); a file with far more is not a GPT-2 checkpoint,
# and its header alone could cost hundreds of MiB (600k empty tensors in a 61 MB header: 753 MiB).
MAX_TENSORS = 4096
# Bytes of a safetensors header or a shard index per tensor allowed (gpt2-xl's: ~115), plus slack for
# metadata. Parsing is refused past it, so even a header of one object with many keys stays ~20 MiB.
_MANIFEST_BYTES_PER_TENSOR = 256
_MANIFEST_SLACK_BYTES = 64 << 10
# safetensors dtypes numpy can hold (the library names the rest, e.g. F8_E5M2, as numpy attributes that
# do not exist).
_SAFETENSORS_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16",
                                 "U8", "BOOL"})


class CheckpointError(ValueError):
    """A weights file that is corrupt, truncated, inconsistent or unsafe to read; the message names the file."""


class UnsafePickleError(CheckpointError, pickle.UnpicklingError):
    """A `.bin` pickle that asks for something a state dict of tensors never needs (a global, an opcode, ...)."""


class StateDict(dict):
    """`{key: numpy array}` read from a checkpoint, remembering the file each tensor came from.

    `source` is the file that was read (for shards, the index); `file_of(key)` is the file holding `key`.
    """

    def __init__(self, source: str, tensors: Mapping[str, np.ndarray] | Iterable = (),
                 files: Mapping[str, str] | None = None):
        super().__init__(tensors)
        self.source = source
        self._files = dict(files or {})

    def file_of(self, key: str) -> str:
        return self._files.get(key, self.source)


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
        return _read_sharded(path, progress=progress, max_tensors=limit)
    if name.endswith(".safetensors"):
        tensors = _read_safetensors(path, progress=progress, max_tensors=limit)[0]
        return StateDict(path, tensors)
    if name.endswith(".bin"):
        return read_torch_bin(path, progress=progress)
    if name.endswith(".msgpack"):
        return read_flax_msgpack(path, max_tensors=limit)
    raise ValueError(f"unknown weights file format: {path} (expected one of {', '.join(WEIGHT_FILES)})")


def _bar(total: int, desc: str, progress: bool, unit: str = "tensor"):
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)


def _require_file(path: str) -> None:
    """OSError naming `path` unless it is a regular file (a folder where a file belongs is a common slip)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a weights file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")


def _parse_errors() -> tuple[type[BaseException], ...]:
    """What the parsers raise on malformed input (as opposed to OSErrors, which already name the path)."""
    errors: list[type[BaseException]] = [ValueError, TypeError, KeyError, IndexError, EOFError, struct.error,
                                         zipfile.BadZipFile, pickle.UnpicklingError, UnicodeDecodeError,
                                         OverflowError, RecursionError]
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    with contextlib.suppress(ImportError):
        import msgpack
        errors.append(msgpack.exceptions.UnpackException)
    return tuple(errors)


@contextlib.contextmanager
def _reading(path: str, what: str) -> Iterator[None]:
    """Re-raises a parser's error as a one-line CheckpointError naming `path` (ours pass through as they are)."""
    try:
        yield
    except CheckpointError:
        raise
    except _parse_errors() as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{path} is not a valid {what} file ({type(e).__name__}: {detail})") from e


# --- safetensors ---------------------------------------------------------------------------------------

def read_safetensors(path: str, *, progress: bool = True, max_tensors: int = MAX_TENSORS
                     ) -> tuple[StateDict, dict[str, str]]:
    """All tensors of one safetensors file, and its metadata.

    The header is checked first (at most `max_tensors` tensors, of dtypes numpy holds); the safetensors
    library then checks shapes and that the tensors tile the data exactly, so what is read is at most
    the file's size.
    """
    return _read_safetensors(path, progress=progress, max_tensors=max_tensors)


def _read_safetensors(path: str, *, progress: bool = True, max_tensors: int = MAX_TENSORS,
                      check_keys: Callable[[list[str]], None] | None = None) -> tuple[StateDict, dict[str, str]]:
    """`read_safetensors`, calling `check_keys(names)` after the header is read and before any data is."""
    from safetensors import safe_open

    _require_file(path)
    _check_safetensors_header(path, max_tensors)
    out = StateDict(path)
    with _reading(path, "safetensors"), safe_open(path, framework="numpy") as f:
        keys = list(f.keys())
        if check_keys is not None:
            check_keys(keys)
        with _bar(len(keys), f"Reading {os.path.basename(path)}", progress) as bar:
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
        if length > _manifest_bytes(max_tensors):
            raise CheckpointError(f"{path} has a {length}-byte safetensors header, more than the "
                                  f"{_manifest_bytes(max_tensors)} bytes {max_tensors} tensors can need; it is not "
                                  "a GPT-2 checkpoint (or is corrupt)")
        raw = f.read(length)
    try:
        header = _load_manifest_json(raw, path, max_tensors, "tensors in its safetensors header")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return  # not JSON: the library's own message says so
    if not isinstance(header, Mapping):
        return
    for key, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, Mapping) and key != "__metadata__" else None
        if isinstance(dtype, str) and dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has dtype {dtype}, which numpy cannot hold; save the "
                                  "checkpoint in F32, F16 or BF16")


def _manifest_bytes(max_tensors: int) -> int:
    return max_tensors * _MANIFEST_BYTES_PER_TENSOR + _MANIFEST_SLACK_BYTES


class _TooManyEntries(Exception):
    pass


def _load_manifest_json(raw: bytes | str, path: str, max_tensors: int, what: str) -> Any:
    """`json.loads(raw)`, stopping with a CheckpointError once it has built more than `max_tensors` + 2
    objects (a header is one object per tensor, plus itself and its metadata)."""
    built = 0

    def count(pairs):
        nonlocal built
        built += 1
        if built > max_tensors + 2:
            raise _TooManyEntries
        return dict(pairs)

    try:
        return json.loads(raw, object_pairs_hook=count)
    except _TooManyEntries:
        raise CheckpointError(f"{path} lists more than {max_tensors} {what}; a GPT-2 checkpoint has far fewer "
                              "(it is not one, or is corrupt)") from None


def _read_index(index_path: str, max_tensors: int = MAX_TENSORS) -> dict[str, str]:
    """The `weight_map` of a shard index, checked to be `{tensor name: shard file name}` (at most
    `max_tensors` of them)."""
    _require_file(index_path)
    size = os.path.getsize(index_path)
    if size > _manifest_bytes(max_tensors):
        raise CheckpointError(f"{index_path} is {size} bytes, more than the {_manifest_bytes(max_tensors)} a shard "
                              f"index of {max_tensors} tensors can need; it is not a GPT-2 shard index")
    with _reading(index_path, "shard index (JSON)"), open(index_path, encoding="utf-8") as f:
        index = _load_manifest_json(f.read(), index_path, max_tensors, "JSON objects")
    if not isinstance(index, Mapping) or not isinstance(index.get("weight_map"), Mapping):
        raise CheckpointError(f"{index_path} has no weight_map object (the shard index maps each tensor name "
                              "to the shard file that holds it)")
    weight_map = index["weight_map"]
    if len(weight_map) > max_tensors:
        raise CheckpointError(f"{index_path} lists {len(weight_map)} tensors, more than the {max_tensors} a GPT-2 "
                              "checkpoint can have")
    bad = [f"{k!r}: {v!r}" for k, v in weight_map.items() if not (isinstance(v, str) and v)]
    if bad:
        raise CheckpointError(f"{index_path}: weight_map values must be shard file names, got {_join(bad)}")
    return dict(weight_map)


def _read_sharded(index_path: str, *, progress: bool = True, max_tensors: int = MAX_TENSORS) -> StateDict:
    """The tensors of every shard an index lists, checked against the index: each tensor must be in exactly
    the shard the index names (a tensor in two shards, or one the index does not list, is an error)."""
    # "model.safetensors.index.json" lists ".safetensors" shards, "pytorch_model.bin.index.json" ".bin" ones.
    extension = os.path.splitext(os.path.basename(index_path).removesuffix(".index.json"))[1]
    if extension not in (".safetensors", ".bin"):
        raise ValueError(f"unknown shard index {index_path}: expected {SAFETENSORS_INDEX} or {TORCH_BIN_INDEX}")
    weight_map = _read_index(index_path, max_tensors)
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
    with _bar(len(listed), f"Reading {len(listed)} shards", progress, unit="shard") as bar:
        for shard in sorted(listed):
            shard_path = paths[shard]
            if extension == ".safetensors":  # names checked from the header, before any data is read
                tensors = _read_safetensors(shard_path, progress=False, max_tensors=max_tensors,
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
        problems.append("also holds " + _join(f"{k} (which the index puts in {weight_map[k]})" for k in elsewhere))
    unlisted = sorted(k for k in keys if k not in weight_map)
    if unlisted:
        problems.append("holds tensors the index does not list: " + _join(unlisted))
    missing = sorted(set(k for k, s in weight_map.items() if s == shard) - set(keys))
    if missing:
        problems.append("lacks tensors the index puts there: " + _join(missing))
    if problems:
        raise CheckpointError(f"shard {shard} does not match {index_path}: it " + "; it ".join(problems))


def _join(items: Iterable[str], limit: int = 12) -> str:
    items = list(items)
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


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
#
# A `torch.save` file is a zip archive holding `<root>/data.pkl` (a pickle of the state dict whose
# tensors point, by "persistent id", at storages), one uncompressed record `<root>/data/<key>` per
# storage, and `<root>/byteorder`. Everything in it is checked before it is used:
#   * data.pkl is run by `_run_pickle`, an interpreter of just the opcodes `torch.save` writes, whose
#     only callables are OrderedDict and the two tensor rebuilders below. No other global can be named,
#     BUILD cannot touch anything but a fresh OrderedDict, and the memo cannot be made to grow.
#   * a storage's record must be stored uncompressed (as torch writes it, so `torch.load(mmap=True)`
#     works) with exactly the size the pickle declares; it is memory-mapped, never read whole.
#   * a tensor is a view of its storage whose elements all lie inside it, and never has more elements
#     than the storage (a stride-0 view cannot blow 4 bytes up into gigabytes).

_TORCH_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
# data.pkl of a GPT-2 state dict is ~170 bytes per tensor (gpt2-xl's: 97 KB). The cap bounds what the
# pickle interpreter can build: at worst one empty dict (~72 bytes) per byte, ~36 MiB.
_MAX_PICKLE_BYTES = 512 << 10
_MAX_DIMS = 64  # numpy's limit


# Stands in for `torch.FloatStorage` & co. inside the pickle.
_StorageType = collections.namedtuple("_StorageType", "name dtype")


class _Storage:
    """A storage of a checkpoint: `array` is its flat, read-only data (a view of the memory-mapped file)."""

    __slots__ = ("key", "array")

    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


def _is_int(x: Any) -> bool:
    return type(x) is int  # not bool, not float


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """numpy twin of `torch._utils._rebuild_tensor_v2`: a read-only strided view of a storage.

    The layout is checked first: every element must lie inside the storage, and the view may not have more
    elements than the storage (overlapping views such as stride 0 would otherwise multiply memory).
    """
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("tensor without a storage in the checkpoint")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and all(map(_is_int, size + stride))
            and _is_int(storage_offset)):
        raise UnsafePickleError(f"invalid tensor layout: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    offset, n = storage_offset, storage.array.size
    if len(size) != len(stride) or len(size) > _MAX_DIMS or offset < 0 or any(s < 0 for s in size + stride):
        raise UnsafePickleError(f"invalid tensor layout: offset {offset}, size {size}, stride {stride}")
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(size, storage.array.dtype)
    last = offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= n:
        raise UnsafePickleError(f"tensor of size {size} (offset {offset}, stride {stride}) overruns its "
                                f"storage data/{storage.key} of {n} elements")
    if numel > n - offset:
        raise UnsafePickleError(f"tensor of size {size} (stride {stride}) has {numel} elements but its storage "
                                f"data/{storage.key} only {n - offset} from offset {offset}: overlapping "
                                "(e.g. stride-0) views are not supported")
    base = storage.array[offset:]
    return np.lib.stride_tricks.as_strided(base, shape=size, strides=tuple(s * base.itemsize for s in stride),
                                           writeable=False)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """numpy twin of `torch._utils._rebuild_parameter`: the parameter's tensor."""
    if not isinstance(data, np.ndarray):
        raise UnsafePickleError(f"parameter of type {type(data).__name__}, expected a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
_CALLABLES = tuple(_ALLOWED_GLOBALS.values())  # what REDUCE may call (storage types are not callable)

# Opcodes that push their decoded argument (pickletools decodes it); all else is handled in `_run_pickle`.
# Protocol 2 ones are what torch.save writes; the protocol 0 text forms are as harmless (plain data).
_CONSTANTS = {"BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINUNICODE",
              "BINUNICODE8", "INT", "LONG", "FLOAT", "UNICODE"}
_FIXED = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


def _find_global(module: str, name: str, source: str):
    if (module, name) in _ALLOWED_GLOBALS:
        return _ALLOWED_GLOBALS[module, name]
    if module in ("torch", "torch.storage") and name in _TORCH_STORAGES:
        return _StorageType(name, _TORCH_STORAGES[name])
    raise UnsafePickleError(
        f"{source} references the global {module}.{name}, which is not allowed: only tensors and "
        "OrderedDicts are loaded from pickles (no pickled code is ever run). Convert the checkpoint to "
        "safetensors with a tool you trust if it really needs that global.")


def _run_pickle(data: bytes, persistent_load: Callable[[Any], Any], source: str) -> Any:
    """Unpickles `data` with only the opcodes `torch.save` writes (pickle protocol 2, plus 4's framing).

    Unlike `pickle.Unpickler`, nothing can be called but the allowed globals; BUILD (which sets an
    object's attributes or calls its `__setstate__`) is accepted only on an OrderedDict, and its state
    is dropped; containers are only filled if they are plain lists and dicts; and memo slots must be
    numbered in order as `pickle.Pickler` numbers them (a huge index cannot make the memo allocate).
    """
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def fail(what: str, pos: int) -> NoReturn:
        raise UnsafePickleError(f"{source}: {what} (at byte {pos} of data.pkl)")

    def pop_mark(pos: int) -> list[Any]:
        nonlocal stack
        if not marks:
            fail("no MARK to pop to", pos)
        items, stack = stack, marks.pop()
        return items

    def top(kinds: tuple[type, ...], op: str, pos: int):
        """The top of the stack, which `op` is about to modify: it must be exactly one of `kinds`."""
        if not stack or type(stack[-1]) not in kinds:
            found = type(stack[-1]).__name__ if stack else "nothing"
            fail(f"{op} on {found}: a state dict's pickle applies it only to "
                 f"{' or '.join(k.__name__ for k in kinds)}", pos)
        return stack[-1]

    for op, arg, pos in pickletools.genops(data):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            if len(stack) != 1 or marks:
                fail("STOP with an unbalanced stack", pos)
            return stack[0]
        if name in _CONSTANTS:
            stack.append(arg)
        elif name in _FIXED:
            stack.append(_FIXED[name])
        elif name == "MARK":
            marks.append(stack)
            stack = []
        elif name == "POP":
            if not stack:
                fail("POP on an empty stack", pos)
            stack.pop()
        elif name == "POP_MARK":
            pop_mark(pos)
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "TUPLE":
            items = pop_mark(pos)  # first: pop_mark rebinds `stack`
            stack.append(tuple(items))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            k = int(name[-1])
            if len(stack) < k:
                fail(f"{name} on a stack of {len(stack)}", pos)
            stack[-k:] = [tuple(stack[-k:])]
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "APPEND":
            value = stack.pop() if stack else fail("APPEND on an empty stack", pos)
            top((list,), name, pos).append(value)
        elif name == "APPENDS":
            items = pop_mark(pos)
            top((list,), name, pos).extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            if name == "SETITEMS":
                items = pop_mark(pos)
            elif len(stack) >= 3:
                items = [stack.pop(-2), stack.pop()]
            else:
                fail("SETITEM on a short stack", pos)
            if len(items) % 2:
                fail(f"{name} with an odd number of items", pos)
            target = top((dict, collections.OrderedDict), name, pos)
            for key, value in zip(items[::2], items[1::2]):
                if not isinstance(key, (str, int)):
                    fail(f"{name} with a key of type {type(key).__name__}", pos)
                target[key] = value
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            stack.append(_find_global(module, attr, source))
        elif name == "STACK_GLOBAL":
            if len(stack) < 2 or not all(isinstance(x, str) for x in stack[-2:]):
                fail("STACK_GLOBAL without a module and a name", pos)
            attr, module = stack.pop(), stack.pop()
            stack.append(_find_global(module, attr, source))
        elif name == "REDUCE":
            if len(stack) < 2:
                fail("REDUCE on a short stack", pos)
            args, func = stack.pop(), stack.pop()
            if not any(func is f for f in _CALLABLES) or type(args) is not tuple:
                fail(f"REDUCE calls {func!r}, which is not a tensor rebuilder or OrderedDict", pos)
            try:
                stack.append(func(*args))
            except (UnsafePickleError, TypeError) as e:  # a bad layout, or the wrong number of arguments
                fail(str(e), pos)
        elif name == "BUILD":
            # torch pickles `state_dict._metadata` this way; we do not need it. On anything else BUILD
            # could set attributes (say, a function's __defaults__) or call a planted __setstate__.
            state = stack.pop() if stack else fail("BUILD on an empty stack", pos)
            top((collections.OrderedDict,), name, pos)
            if state is not None and type(state) is not dict:
                fail(f"BUILD with a state of type {type(state).__name__}", pos)
            for key in state or ():  # dropped anyway; a dunder here is an attack, not a torch pickle
                if not isinstance(key, str) or key.startswith("__"):
                    fail(f"BUILD sets {key!r}, which a state dict's attributes never are", pos)
        elif name == "BINPERSID":
            pid = stack.pop() if stack else fail("BINPERSID on an empty stack", pos)
            stack.append(persistent_load(pid))
        elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else arg
            if not stack or index > len(memo):
                fail(f"{name} {index} with {len(memo)} memo entries (pickle.Pickler numbers them in order)", pos)
            memo[index] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in memo:
                fail(f"{name} {arg} of a memo entry that was never set", pos)
            stack.append(memo[arg])
        else:
            fail(f"opcode {name} is not used by torch.save and is not allowed", pos)
    fail("no STOP", len(data))


class _TorchZip:
    """The records of one `torch.save` zip file, checked before use and mapped rather than read."""

    def __init__(self, path: str, zf: zipfile.ZipFile):
        self.path, self.zf = path, zf
        names = zf.namelist()
        self.infos = {info.filename: info for info in zf.infolist()}
        if len(names) != len(set(names)):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise CheckpointError(f"{path} holds more than one record named {_join(dupes)}")
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (no <archive>/data.pkl)")
        self.root = pickles[0][: -len("data.pkl")]
        self.size = os.path.getsize(path)
        self.byteorder = self._byteorder()
        self.storages: dict[str, _Storage] = {}
        self._file = np.asarray(np.memmap(path, np.uint8, mode="r"))  # mapped, not read

    def _small_record(self, name: str, limit: int) -> bytes:
        """A record's bytes, refusing before decompression if it declares more than `limit` bytes."""
        info = self.infos[name]
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: {name} declares {info.file_size} bytes, more than the "
                                  f"{limit} such a record can need")
        return self.zf.read(info)

    def _byteorder(self) -> str:
        name = self.root + "byteorder"
        if name not in self.infos:
            return "little"  # torch writes this record since 1.x; older files are little-endian
        raw = self._small_record(name, 16)
        value = raw.decode("ascii", errors="replace").strip()
        if value not in ("little", "big"):
            raise CheckpointError(f"{self.path}: {name} says {raw[:16]!r}; expected 'little' or 'big'")
        return value

    def pickle_bytes(self) -> bytes:
        return self._small_record(self.root + "data.pkl", _MAX_PICKLE_BYTES)

    def persistent_load(self, pid) -> _Storage:
        """The storage a tensor's persistent id names: ("storage", type, key, location, numel)."""
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and type(pid[1]) is _StorageType
                and type(pid[2]) is str and _is_int(pid[4]) and pid[4] >= 0):
            raise UnsafePickleError(f"{self.path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        dtype = np.dtype(storage_type.dtype)
        if key in self.storages:
            known = self.storages[key].array
            if known.dtype != dtype or known.size != numel:
                raise CheckpointError(f"{self.path}: storage data/{key} is declared as both {known.size} x "
                                      f"{known.dtype} and {numel} x {dtype}")
            return self.storages[key]
        self.storages[key] = _Storage(key, self._map(key, dtype, numel))
        return self.storages[key]

    def _map(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        """The record `data/<key>` as a flat read-only array, after checking its declared size and place."""
        name = f"{self.root}data/{key}"
        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: storage data/{key} is missing")
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes:
            raise CheckpointError(f"{self.path}: storage data/{key} declares {info.file_size} bytes, but the "
                                  f"pickle says {numel} x {dtype} = {nbytes} bytes")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise CheckpointError(f"{self.path}: storage data/{key} is compressed or encrypted; torch.save "
                                  "stores storages uncompressed. Re-save the checkpoint with torch.save.")
        start = self._data_offset(info)
        if start + nbytes > self.size:  # (start >= 0: see _data_offset)
            raise CheckpointError(f"{self.path}: storage data/{key} runs past the end of the file "
                                  "(truncated download?)")
        if nbytes == 0:
            return np.zeros(0, dtype)
        array = self._file[start:start + nbytes].view(dtype)
        if self.byteorder != sys.byteorder:  # rare (written on a big-endian machine): a swapped copy
            array = array.byteswap()
            array.flags.writeable = False
        return array

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a record's bytes start: after its local header, whose name and extra field may differ in
        length from the central directory's copy."""
        header = self._file[info.header_offset:info.header_offset + 30].tobytes() if info.header_offset >= 0 else b""
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: the local header of {info.filename} is corrupt")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len


def read_torch_bin(path: str, *, progress: bool = True) -> StateDict:
    """The state dict in a `torch.save` zip file (PyTorch >= 1.6), read without torch.

    Supports float32/float16/bfloat16 (and integer/bool) storages, shared, offset and strided tensors.
    The arrays are read-only views of the memory-mapped file: only what is used is ever read from disk
    (so `progress` has nothing to show; copy an array to keep it past rewriting the file). Any pickled
    global other than the tensor rebuilders, storage types and OrderedDict is an error naming it,
    raised before anything is called.
    """
    _require_file(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(_not_a_zip(path))
    with _reading(path, "PyTorch checkpoint"), zipfile.ZipFile(path) as zf:
        archive = _TorchZip(path, zf)
        state = _run_pickle(archive.pickle_bytes(), archive.persistent_load, path)
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return StateDict(path, state)


def _not_a_zip(path: str) -> str:
    """Why a `.bin` that is not a zip archive cannot be read, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return f"{path} is empty"
    if head.startswith(b"PK"):
        return f"{path} is a truncated or corrupt zip archive (an interrupted download?); fetch it again"
    if head[257:262] == b"ustar" or head.startswith(b"\x80"):
        kind = "tar archive (PyTorch < 0.4)" if head[257:262] == b"ustar" else "legacy pickle (PyTorch < 1.6)"
        return (f"{path} is in torch's {kind} format, which cannot be read without running its pickled code. "
                "Re-save it in the zip format (`torch.save(torch.load(path, weights_only=True), path)` with a "
                "recent torch) or convert it to safetensors.")
    return f"{path} is not a PyTorch checkpoint (not a zip archive)"


# --- transformers' old Flax layout ------------------------------------------------------------------------

def read_flax_msgpack(path: str, *, max_tensors: int = MAX_TENSORS) -> StateDict:
    """`flax_model.msgpack` of transformers' FlaxGPT2Model / FlaxGPT2LMHeadModel, under HF PyTorch key names.

    In that layout `FlaxConv1D.kernel` is `[out, in]` (the transpose of PyTorch `Conv1D.weight`) and
    `nn.Dense.kernel` (the untied lm_head) is `[in, out]` (the transpose of `nn.Linear.weight`): every
    `kernel` is transposed back. `embedding` and LayerNorm `scale` become `weight`; blocks are `h/0/...`.
    The file may hold at most `_MSGPACK_OBJECTS_PER_TENSOR * max_tensors` objects (counted before any
    is built: a 10 MB file of empty maps would otherwise build ~900 MiB of Python dicts).
    """
    from flax.serialization import msgpack_restore

    _require_file(path)
    with open(path, "rb") as f:
        data = f.read()
    _count_msgpack_objects(data, path, _MSGPACK_OBJECTS_PER_TENSOR * max_tensors)
    with _reading(path, "msgpack"):
        tree = msgpack_restore(data)
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{path} does not hold a parameter tree")
    out = StateDict(path)
    origin: dict[str, str] = {}
    for key, value in _flat_items(tree):
        where = "/".join(key)
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: {where} is a {type(value).__name__}, not an array")
        *parents, leaf = key
        if leaf == "kernel":
            value = value.T
        leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
        name = ".".join([*parents, leaf])
        if name in out:  # e.g. both `scale` and `weight`: one would silently win
            raise CheckpointError(f"{path}: {origin[name]} and {where} both become {name}")
        out[name], origin[name] = value, where
    return out


# A GPT-2 tree has a key and an ext per array and a key and a map per module (~3.5 objects per tensor);
# Flax splits arrays over MAX_CHUNK_SIZE into a few chunks. Twice that is allowed.
_MSGPACK_OBJECTS_PER_TENSOR = 8
# msgpack type byte -> (bytes of its length field or fixed payload, what the length counts):
# "raw" (str/bin: that many bytes follow), "ext" (a type byte plus that many bytes), "items"/"pairs"
# (that many objects / key-value pairs follow), or "fixed" (the payload itself).
_MSGPACK_TYPES = {
    0xC4: (1, "raw"), 0xC5: (2, "raw"), 0xC6: (4, "raw"), 0xD9: (1, "raw"), 0xDA: (2, "raw"), 0xDB: (4, "raw"),
    0xC7: (1, "ext"), 0xC8: (2, "ext"), 0xC9: (4, "ext"),
    0xDC: (2, "items"), 0xDD: (4, "items"), 0xDE: (2, "pairs"), 0xDF: (4, "pairs"),
    0xCA: (4, "fixed"), 0xCB: (8, "fixed"), 0xCC: (1, "fixed"), 0xCD: (2, "fixed"), 0xCE: (4, "fixed"),
    0xCF: (8, "fixed"), 0xD0: (1, "fixed"), 0xD1: (2, "fixed"), 0xD2: (4, "fixed"), 0xD3: (8, "fixed"),
    0xD4: (2, "fixed"), 0xD5: (3, "fixed"), 0xD6: (5, "fixed"), 0xD7: (9, "fixed"), 0xD8: (17, "fixed"),
    0xC0: (0, "fixed"), 0xC2: (0, "fixed"), 0xC3: (0, "fixed"),
}


def _count_msgpack_objects(data: bytes, path: str, limit: int) -> None:
    """CheckpointError if the msgpack `data` holds more than `limit` objects, found by walking the type
    bytes only (ext payloads, i.e. Flax's arrays, are skipped, not parsed). Malformed data just ends the
    walk: msgpack itself then names the problem."""
    pending, count, pos, end = 1, 0, 0, len(data)
    while pending and pos < end:
        b = data[pos]
        pos += 1
        pending -= 1
        count += 1
        if count > limit:
            raise CheckpointError(f"{path} holds more than {limit} msgpack objects; a GPT-2 parameter tree of at most "
                                  f"{limit // _MSGPACK_OBJECTS_PER_TENSOR} tensors has far fewer (it is not one, or "
                                  "is corrupt)")
        if b <= 0x7F or b >= 0xE0:  # fixint
            continue
        if b <= 0x8F:  # fixmap
            pending += 2 * (b & 0x0F)
        elif b <= 0x9F:  # fixarray
            pending += b & 0x0F
        elif b <= 0xBF:  # fixstr
            pos += b & 0x1F
        elif b in _MSGPACK_TYPES:
            size, kind = _MSGPACK_TYPES[b]
            if kind == "fixed":
                pos += size
                continue
            n = int.from_bytes(data[pos:pos + size], "big")
            pos += size
            if kind == "raw":
                pos += n
            elif kind == "ext":
                pos += 1 + n
            else:
                pending += n if kind == "items" else 2 * n
        else:  # 0xC1, never used
            return


def write_flax_msgpack(folder: str | os.PathLike, tensors: Mapping[str, np.ndarray], *,
                       filename: str = FLAX_MSGPACK, progress: bool = True) -> list[str]:
    """Writes an HF PyTorch-named GPT-2 state dict as transformers' Flax `flax_model.msgpack`; the inverse
    of `read_flax_msgpack`.

    The layout is what `FlaxGPT2Model` / `FlaxGPT2LMHeadModel.save_pretrained` wrote (transformers <= 4.x):
    the params tree without a `params` level, nested by the key's dots (blocks `h/0/...`), each 2-D
    `weight` a transposed `kernel` (`FlaxConv1D` keeps `[out, in]`, `nn.Dense` `[in, out]`), embeddings'
    `weight` an `embedding` and LayerNorms' (the only 1-D weights) a `scale`. One file, never sharded.

    Returns the names of the files written.
    """
    from flax.serialization import msgpack_serialize

    tree: dict[str, Any] = {}
    for key, value in tensors.items():
        *parents, leaf = key.split(".")
        if leaf == "weight":
            if parents and parents[-1] in _EMBEDDINGS:
                leaf = "embedding"
            elif np.ndim(value) == 1:
                leaf = "scale"
            else:
                leaf, value = "kernel", np.asarray(value).T
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        if leaf in node:
            raise ValueError(f"two tensors become {'/'.join([*parents, leaf])} in {filename}")
        node[leaf] = np.ascontiguousarray(value)
    with _bar(1, f"Writing {filename}", progress, unit="file") as bar:
        data = msgpack_serialize(tree)
        with open(os.path.join(os.fspath(folder), filename), "wb") as f:
            f.write(data)
        bar.update()
    return [filename]


# nn.Embed modules of transformers' Flax GPT-2: their `weight` is saved as `embedding`.
_EMBEDDINGS = ("wte", "wpe")


def _flat_items(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat_items(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value

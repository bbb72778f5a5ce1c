"""PyTorch `pytorch_model.bin` checkpoints, read without torch and without running pickled code.

A `torch.save` file is a zip archive holding `<root>/data.pkl` (a pickle of the state dict whose
tensors point, by "persistent id", at storages), one uncompressed record `<root>/data/<key>` per
storage, and `<root>/byteorder`. Everything in it is checked before it is used:
  * data.pkl is run by `_run_pickle`, an interpreter of just the opcodes `torch.save` writes, whose
    only callables are OrderedDict and the two tensor rebuilders below. No other global can be named,
    BUILD cannot touch anything but a fresh OrderedDict, and the memo cannot be made to grow.
  * a storage's record must be stored uncompressed (as torch writes it, so `torch.load(mmap=True)`
    works) with exactly the size the pickle declares; it is memory-mapped, never read whole.
  * a tensor is a view of its storage whose elements all lie inside it, and never has more elements
    than the storage (a stride-0 view cannot blow 4 bytes up into gigabytes).
"""

from __future__ import annotations

import collections
import math
import os
import pickletools
import struct
import sys
import zipfile
from typing import Any, Callable, Mapping, NoReturn

import ml_dtypes
import numpy as np

from flax_gpt2.checkpoints.formats.common import (CheckpointError, StateDict, UnsafePickleError, join_names, reading,
                                                  require_file)
from flax_gpt2.utils.validation import is_int

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




def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """numpy twin of `torch._utils._rebuild_tensor_v2`: a read-only strided view of a storage.

    The layout is checked first: every element must lie inside the storage, and the view may not have more
    elements than the storage (overlapping views such as stride 0 would otherwise multiply memory).
    """
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("tensor without a storage in the checkpoint")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and all(map(is_int, size + stride))
            and is_int(storage_offset)):
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
            raise CheckpointError(f"{path} holds more than one record named {join_names(dupes)}")
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
                and type(pid[2]) is str and is_int(pid[4]) and pid[4] >= 0):
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
    require_file(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(_not_a_zip(path))
    with reading(path, "PyTorch checkpoint"), zipfile.ZipFile(path) as zf:
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


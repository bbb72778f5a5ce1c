"""A corpus of bad checkpoint and config files, built by code (nothing binary is checked in).

Each `Case` writes one bad input into an empty folder and says how it must fail: which reader to call
on it, the exception type, a regex the message must match, the file the message must name, and whether
a malicious payload in it would create `folder/pwned` if it ever ran. `test_readers.py` runs every case
in-process (type, message, nothing executed) and again in fresh subprocesses to bound the memory each
one costs (the `memory` cases each in a process of its own).

Files are made without torch: a tiny random GPT-2 state dict, a ten-line pickle assembler that writes
what `torch.save` writes (protocol 2; `test_readers.py` checks torch loads its output), and zipfile.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

MARKER = "pwned"  # what a payload that ran would create in the case's folder
BOMB_BYTES = 256 << 20  # what a "bomb" expands to: 4x the 64 MiB a case may cost

# The tiny model every valid base file holds.
TINY = dict(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], "Path | tuple[Path, Path]"]  # -> target, or (target, file the error must name)
    call: str  # "read_weights" (target is a file), "from_pretrained" (a folder) or "config" (a folder)
    error: type[BaseException]
    match: str  # regex searched in the message
    marker: bool = False  # a payload would `touch folder/pwned`
    memory: bool = False  # a memory bomb (or the most memory a file may cost): measured alone, in its own process


CASES: list[Case] = []


def case(call: str, error: type[BaseException], match: str, marker: bool = False, memory: bool = False):
    def register(build):
        CASES.append(Case(build.__name__, build, call, error, match, marker, memory))
        return build
    return register


# --- valid pieces ------------------------------------------------------------------------------------------

def tiny_config_json(**raw) -> dict:
    """The tiny model's config.json, with `raw` values written as they are (valid or not)."""
    from flax_gpt2 import GPT2Config

    hf = GPT2Config(**TINY).to_hf_config()
    hf.update(raw)
    return hf


def tiny_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A random float32 HF state dict for the tiny model (keys with the `transformer.` prefix)."""
    from flax_gpt2 import GPT2Config
    from flax_gpt2.checkpoints import hf_state_dict as weights

    rng = np.random.default_rng(seed)
    return {"transformer." + e.hf: rng.normal(0, 0.02, e.hf_shape).astype(np.float32)
            for e in weights.entries(GPT2Config(**TINY))}


def write_config(folder: Path, **raw) -> Path:
    path = folder / "config.json"
    path.write_text(json.dumps(tiny_config_json(**raw)))
    return path


# A pickle assembler for what torch.save writes (pickle protocol 2).

def p_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def p_int(n: int) -> bytes:
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)  # BININT
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b  # LONG1


def p_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def p_tuple(items) -> bytes:
    return b"(" + b"".join(p_int(x) for x in items) + b"t"


def p_tensor(storage_type: str, key: str, numel: int, offset: int, size, stride) -> bytes:
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`."""
    storage = b"(" + p_str("storage") + p_global("torch", storage_type) + p_str(key) + p_str("cpu") + p_int(numel)
    return (p_global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + b"tQ" + p_int(offset) + p_tuple(size)
            + p_tuple(stride) + b"\x89" + p_global("collections", "OrderedDict") + b")R" + b"tR")


def p_state_dict(tensors: dict[str, bytes]) -> bytes:
    """A pickled OrderedDict of tensor ops, as `torch.save(state_dict)` writes it."""
    items = b"".join(p_str(k) + v for k, v in tensors.items())
    return b"\x80\x02" + p_global("collections", "OrderedDict") + b")R(" + items + b"u."


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, n = [], 1
    for d in reversed(shape):
        strides.append(n)
        n *= d
    return tuple(reversed(strides))


_STORAGE_TYPES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int32): "IntStorage",
                  np.dtype(np.float16): "HalfStorage"}


def torch_zip(path: Path, pkl: bytes, records: dict[str, bytes], *, byteorder: bytes | None = b"little",
              compress: frozenset[str] = frozenset()) -> Path:
    """A torch.save-style zip: archive/data.pkl, archive/data/<key> per record, byteorder, version."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        if byteorder is not None:
            zf.writestr("archive/byteorder", byteorder)
        for key, data in records.items():
            zf.writestr(f"archive/data/{key}", data,
                        compress_type=zipfile.ZIP_DEFLATED if key in compress else zipfile.ZIP_STORED)
        zf.writestr("archive/version", "3\n")
    return path


def torch_bin(path: Path, state: dict[str, np.ndarray], byteorder: str = "little") -> Path:
    """`state` as torch.save would write it: one storage per tensor."""
    tensors, records = {}, {}
    for i, (key, value) in enumerate(state.items()):
        value = np.ascontiguousarray(value)
        tensors[key] = p_tensor(_STORAGE_TYPES[value.dtype], str(i), value.size, 0, value.shape,
                                contiguous_strides(value.shape))
        records[str(i)] = value.astype(value.dtype.newbyteorder("<" if byteorder == "little" else ">")).tobytes()
    return torch_zip(path, p_state_dict(tensors), records, byteorder=byteorder.encode())


def zero_record(zf: zipfile.ZipFile, name: str, nbytes: int) -> None:
    """A deflated record of `nbytes` zeros: ~1000x smaller in the zip than it expands to."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    info._compresslevel = 9  # noqa: SLF001 (zipfile has no public per-entry level for open())
    chunk = bytes(16 << 20)
    with zf.open(info, "w", force_zip64=nbytes >= 2**31) as f:
        for start in range(0, nbytes, len(chunk)):
            f.write(chunk[:nbytes - start])


def one_float_bin(folder: Path, size, stride, offset: int = 0, numel: int = 4, **kw) -> Path:
    """A .bin with one tensor "w" of the given layout over a float32 storage of `numel` elements."""
    pkl = p_state_dict({"w": p_tensor("FloatStorage", "0", numel, offset, size, stride)})
    return torch_zip(folder / "pytorch_model.bin", pkl, {"0": np.arange(numel, dtype="<f4").tobytes()}, **kw)


def raw_pickle_bin(folder: Path, pkl: bytes) -> Path:
    return torch_zip(folder / "pytorch_model.bin", pkl, {})


def safetensors_file(path: Path, state: dict[str, np.ndarray]) -> Path:
    import safetensors.numpy

    safetensors.numpy.save_file(state, str(path), metadata={"format": "pt"})
    return path


def hf_flax_tree(state: dict[str, np.ndarray]) -> dict:
    """transformers' old Flax layout of a tiny state dict (kernels transposed, `h/0/...`)."""
    tree: dict = {}
    for key, value in state.items():
        *parents, leaf = key.removeprefix("transformer.").split(".")
        if leaf == "weight":
            leaf = {"wte": "embedding", "wpe": "embedding"}.get(parents[-1], "scale" if "ln" in parents[-1]
                                                                  else "kernel")
        if leaf == "kernel":
            value = value.T
        node = tree.setdefault("transformer", {})
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def msgpack_file(path: Path, tree) -> Path:
    from flax.serialization import msgpack_serialize

    path.write_bytes(msgpack_serialize(tree))
    return path


def sharded_safetensors(folder: Path, shards: dict[str, dict[str, np.ndarray]], weight_map: dict) -> Path:
    for name, tensors in shards.items():
        safetensors_file(folder / name, tensors)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


# --- .bin: memory ------------------------------------------------------------------------------------------

@case("read_weights", ValueError, r"has 268435456 elements but its storage data/0 only 1 .*stride-0", memory=True)
def bin_stride0_view(folder):
    """547 bytes: a 16384 x 16384 stride-0 view of one float (1 GiB if materialized)."""
    return one_float_bin(folder, (16384, 16384), (0, 0), numel=1)


@case("read_weights", ValueError, r"storage data/0 declares 268435456 bytes, but the pickle says 4 x float32",
      memory=True)
def bin_deflate_bomb_record(folder):
    """A ~250 KB deflated record that expands to 256 MiB, behind a tensor of 4 floats."""
    pkl = p_state_dict({"w": p_tensor("FloatStorage", "0", 4, 0, (4,), (1,))})
    path = folder / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zero_record(zf, "archive/data/0", BOMB_BYTES)
    return path


@case("read_weights", ValueError, r"storage data/0 is compressed", memory=True)
def bin_deflate_bomb_honest_numel(folder):
    """The same bomb with a storage that honestly declares its 64M floats, viewed as 4 of them."""
    pkl = p_state_dict({"w": p_tensor("FloatStorage", "0", BOMB_BYTES // 4, 0, (4,), (1,))})
    path = folder / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zero_record(zf, "archive/data/0", BOMB_BYTES)
    return path


@case("read_weights", ValueError, r"data\.pkl declares 268435456 bytes, more than", memory=True)
def bin_pickle_bomb(folder):
    """data.pkl itself deflated from 256 MiB."""
    path = folder / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zero_record(zf, "archive/data.pkl", BOMB_BYTES)
    return path


@case("read_weights", ValueError, r"byteorder declares 134217728 bytes, more than the 16", memory=True)
def bin_byteorder_bomb(folder):
    path = one_float_bin(folder, (4,), (1,), byteorder=None)
    with zipfile.ZipFile(path, "a") as zf:
        zero_record(zf, "archive/byteorder", BOMB_BYTES // 2)
    return path


@case("read_weights", ValueError, r"LONG_BINPUT 33554432 with 1 memo entries", memory=True)
def bin_memo_index(folder):
    """LONG_BINPUT 2**25: the C unpickler grows its memo array to that index (512 MiB)."""
    pkl = b"\x80\x02" + p_global("collections", "OrderedDict") + b"q\x00)Rr" + struct.pack("<I", 2**25) + b"."
    return raw_pickle_bin(folder, pkl)


@case("read_weights", ValueError, r"STOP with an unbalanced stack", memory=True)
def bin_pickle_of_empty_dicts(folder):
    """data.pkl as large as allowed, each byte a new empty dict (the most memory a pickle byte can make)."""
    from flax_gpt2.checkpoints.formats.torch_bin import _MAX_PICKLE_BYTES

    return raw_pickle_bin(folder, b"\x80\x02" + b"}" * (_MAX_PICKLE_BYTES - 3) + b".")


@case("read_weights", ValueError, r"storage data/0 declares 16 bytes, but the pickle says 268435456 x float32",
      memory=True)
def bin_storage_larger_than_record(folder):
    """A storage that claims 1 GiB over a 16-byte record."""
    pkl = p_state_dict({"w": p_tensor("FloatStorage", "0", 2**28, 0, (4,), (1,))})
    return torch_zip(folder / "pytorch_model.bin", pkl, {"0": bytes(16)})


# --- .bin: layouts ------------------------------------------------------------------------------------------

@case("read_weights", ValueError, r"overruns its storage data/0 of 4 elements")
def bin_view_overruns_storage(folder):
    return one_float_bin(folder, (100,), (1,))


@case("read_weights", ValueError, r"overruns its storage")
def bin_offset_past_storage(folder):
    return one_float_bin(folder, (2,), (1,), offset=3)


@case("read_weights", ValueError, r"invalid tensor layout")
def bin_negative_stride(folder):
    return one_float_bin(folder, (4,), (-1,), offset=3)


@case("read_weights", ValueError, r"invalid tensor layout")
def bin_size_stride_mismatch(folder):
    return one_float_bin(folder, (2, 2), (1,))


@case("read_weights", ValueError, r"storage data/1 is missing")
def bin_storage_missing(folder):
    pkl = p_state_dict({"w": p_tensor("FloatStorage", "1", 4, 0, (4,), (1,))})
    return torch_zip(folder / "pytorch_model.bin", pkl, {"0": bytes(16)})


@case("read_weights", ValueError, r"storage data/0 is declared as both 4 x float32 and 4 x int32")
def bin_storage_retyped(folder):
    pkl = p_state_dict({"a": p_tensor("FloatStorage", "0", 4, 0, (4,), (1,)),
                        "b": p_tensor("IntStorage", "0", 4, 0, (4,), (1,))})
    return torch_zip(folder / "pytorch_model.bin", pkl, {"0": bytes(16)})


@case("read_weights", ValueError, r"more than one record named archive/data/0")
def bin_duplicate_record(folder):
    path = one_float_bin(folder, (4,), (1,))
    with warnings.catch_warnings(), zipfile.ZipFile(path, "a") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name, which is the point
        zf.writestr("archive/data/0", bytes(16))
    return path


@case("read_weights", ValueError, r"byteorder says b'middle'; expected 'little' or 'big'")
def bin_byteorder_unknown(folder):
    """Read as big-endian before, which turned every weight into garbage (NaN logits)."""
    return one_float_bin(folder, (4,), (1,), byteorder=b"middle")


@case("read_weights", ValueError, r"truncated or corrupt zip archive")
def bin_truncated(folder):
    path = torch_bin(folder / "pytorch_model.bin", tiny_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@case("read_weights", ValueError, r"is empty")
def bin_empty(folder):
    path = folder / "pytorch_model.bin"
    path.write_bytes(b"")
    return path


@case("read_weights", ValueError, r"not a torch checkpoint \(no <archive>/data\.pkl\)")
def bin_zip_without_pickle(folder):
    path = folder / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data/0", bytes(16))
    return path


@case("read_weights", ValueError, r"does not hold a state dict of tensors")
def bin_not_a_state_dict(folder):
    return raw_pickle_bin(folder, b"\x80\x02]q\x00(K\x01K\x02e.")


@case("read_weights", ValueError, r"no STOP|not a valid PyTorch checkpoint")
def bin_pickle_truncated(folder):
    pkl = p_state_dict({"w": p_tensor("FloatStorage", "0", 4, 0, (4,), (1,))})
    return torch_zip(folder / "pytorch_model.bin", pkl[:-20], {"0": bytes(16)})


@case("from_pretrained", ValueError, r"pytorch_model\.bin does not fit .* not floating point: "
                                     r"transformer\.wte\.weight has dtype int32")
def bin_int_wte(folder):
    """An int32 wte used to load as int parameters."""
    write_config(folder)
    state = tiny_state()
    state["transformer.wte.weight"] = np.arange(state["transformer.wte.weight"].size, dtype=np.int32).reshape(
        state["transformer.wte.weight"].shape)
    return folder, torch_bin(folder / "pytorch_model.bin", state)


@case("from_pretrained", ValueError, r"pytorch_model\.bin does not fit GPT2LMHeadModel.*unexpected checkpoint "
                                     r"tensors: extra\.0 \[256, 1024\]", memory=True)
def bin_many_keys_on_one_storage(folder):
    """2000 keys viewing one 1 MiB storage: 2 GiB if each were copied out before the keys are checked."""
    write_config(folder)
    state = tiny_state()
    tensors, records = {}, {}
    for i, (key, value) in enumerate(state.items()):
        tensors[key] = p_tensor("FloatStorage", str(i), value.size, 0, value.shape, contiguous_strides(value.shape))
        records[str(i)] = value.tobytes()
    for j in range(2000):
        tensors[f"extra.{j}"] = p_tensor("FloatStorage", "big", 1 << 18, 0, (256, 1024), (1024, 1))
    records["big"] = bytes(1 << 20)
    return folder, torch_zip(folder / "pytorch_model.bin", p_state_dict(tensors), records)


# --- .bin: pickles that try to run something -----------------------------------------------------------------

def _touch(folder: Path) -> str:
    return f"touch {folder / MARKER}"


@case("read_weights", ValueError, r"references the global os\.system, which is not allowed",
      marker=True)
def pickle_os_system(folder):
    return raw_pickle_bin(folder, b"\x80\x02" + p_global("os", "system") + b"(" + p_str(_touch(folder)) + b"tR.")


@case("read_weights", ValueError, r"references the global builtins\.exec", marker=True)
def pickle_exec_inside_state_dict(folder):
    payload = p_global("builtins", "exec") + b"(" + p_str(f"import os; os.system({_touch(folder)!r})") + b"tR"
    pkl = (b"\x80\x02" + p_global("collections", "OrderedDict") + b")R(" + p_str("w")
           + p_tensor("FloatStorage", "0", 4, 0, (4,), (1,)) + p_str("x") + payload + b"u.")
    return torch_zip(folder / "pytorch_model.bin", pkl, {"0": bytes(16)})


@case("read_weights", ValueError, r"references the global posix\.system", marker=True)
def pickle_stack_global(folder):
    """Protocol 4's STACK_GLOBAL takes the module and name from the stack."""
    return raw_pickle_bin(folder, b"\x80\x04" + p_str("posix") + p_str("system") + b"\x93("
                          + p_str(_touch(folder)) + b"tR.")


@case("read_weights", ValueError, r"opcode INST is not used by torch\.save", marker=True)
def pickle_inst(folder):
    """Protocol 0's INST calls a global with the items above a MARK."""
    return raw_pickle_bin(folder, b"(" + p_str(_touch(folder)) + b"ios\nsystem\n.")


@case("read_weights", ValueError, r"opcode NEWOBJ is not used by torch\.save")
def pickle_newobj(folder):
    return raw_pickle_bin(folder, b"\x80\x02" + p_global("collections", "OrderedDict") + b")\x81.")


@case("read_weights", ValueError, r"opcode EXT1 is not used by torch\.save")
def pickle_ext(folder):
    return raw_pickle_bin(folder, b"\x80\x02\x82\x01.")


@case("read_weights", ValueError, r"opcode PERSID is not used by torch\.save")
def pickle_text_persid(folder):
    return raw_pickle_bin(folder, b"P0\n.")


@case("read_weights", ValueError, r"BUILD on function")
def pickle_build_sets_function_defaults(folder):
    """BUILD with slot state on an allowed function: `_rebuild_parameter.__defaults__ = ...` for the process."""
    state = b"(N}" + p_str("__defaults__") + b"(" + p_int(1) + p_int(2) + b"tst"  # (None, {"__defaults__": (1, 2)})
    return raw_pickle_bin(folder, b"\x80\x02" + p_global("torch._utils", "_rebuild_parameter") + state + b"b.")


@case("read_weights", ValueError, r"BUILD on type")
def pickle_build_on_a_class(folder):
    state = b"}" + p_str("fromkeys") + p_global("torch._utils", "_rebuild_parameter") + b"s"
    return raw_pickle_bin(folder, b"\x80\x02" + p_global("collections", "OrderedDict") + state + b"b.")


@case("read_weights", ValueError, r"BUILD sets '__setstate__'")
def pickle_planted_setstate(folder):
    """Plant `__setstate__ = _rebuild_tensor_v2` on a state dict, so that the next BUILD would call it."""
    plant = b"}" + p_str("__setstate__") + p_global("torch._utils", "_rebuild_tensor_v2") + b"sb"
    call = b"}" + p_str("storage") + p_int(0) + b"sb"
    return raw_pickle_bin(folder, b"\x80\x02" + p_global("collections", "OrderedDict") + b")R" + plant + call + b".")


@case("read_weights", ValueError, r"SETITEMS on function")
def pickle_setitems_on_function(folder):
    return raw_pickle_bin(folder, b"\x80\x02" + p_global("torch._utils", "_rebuild_parameter") + b"("
                          + p_str("__defaults__") + p_int(1) + b"u.")


@case("read_weights", ValueError, r"REDUCE calls .*not a tensor rebuilder")
def pickle_reduce_a_storage_type(folder):
    return raw_pickle_bin(folder, b"\x80\x02" + p_global("torch", "FloatStorage") + b")R.")


@case("read_weights", ValueError, r"unsupported persistent id")
def pickle_persistent_id_with_bad_numel(folder):
    pid = b"(" + p_str("storage") + p_global("torch", "FloatStorage") + p_str("0") + p_str("cpu") + b"\x88tQ"
    return raw_pickle_bin(folder, b"\x80\x02" + pid + b".")


# --- safetensors ----------------------------------------------------------------------------------------------

@case("read_weights", ValueError, r"is not a valid safetensors file")
def st_header_not_json(folder):
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 12) + b"not json at all")
    return path


@case("read_weights", ValueError, r"is not a valid safetensors file")
def st_header_longer_than_file(folder):
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    return path


def _raw_safetensors(folder, header: bytes, data: bytes = b"") -> Path:
    """`model.safetensors` written byte by byte: the 8-byte length, `header`, then `data`."""
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@case("read_weights", ValueError, r"is not a valid safetensors file", memory=True)
def st_shape_larger_than_data(folder):
    """A header that declares a 2**20 x 2**20 float32 tensor over 16 bytes."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}}).encode()
    return _raw_safetensors(folder, header, bytes(16))


def _empty_tensors_header(count: int) -> bytes:
    return json.dumps({f"t{i:06d}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                       for i in range(count)}).encode()


@case("read_weights", ValueError, r"has a \d+-byte safetensors header, more than the \d+ bytes 4096 tensors can "
                                  r"need", memory=True)
def st_header_of_600k_empty_tensors(folder):
    """A 61 MB header of 600k empty tensors: the library built them all (753 MiB) before."""
    header = _empty_tensors_header(600_000)
    return _raw_safetensors(folder, header)


@case("read_weights", ValueError, r"lists more than 4096 tensors in its safetensors header")
def st_header_of_5000_empty_tensors(folder):
    """Under the byte cap, over the tensor count."""
    header = _empty_tensors_header(5000)
    return _raw_safetensors(folder, header)


@case("read_weights", ValueError, r"tensor transformer\.wte\.weight has dtype F8_E5M2, which numpy cannot hold")
def st_float8_tensor(folder):
    """safetensors' numpy reader raised AttributeError (a traceback) for float8 dtypes."""
    header = json.dumps({"transformer.wte.weight": {"dtype": "F8_E5M2", "shape": [16, 8],
                                                    "data_offsets": [0, 128]}}).encode()
    return _raw_safetensors(folder, header, bytes(128))


@case("read_weights", ValueError, r"is not a valid safetensors file")
def st_truncated(folder):
    path = safetensors_file(folder / "model.safetensors", tiny_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return path


@case("read_weights", ValueError, r"is not a valid safetensors file")
def st_empty(folder):
    path = folder / "model.safetensors"
    path.write_bytes(b"")
    return path


@case("read_weights", IsADirectoryError, r"is a folder, not a weights file")
def st_directory(folder):
    path = folder / "model.safetensors"
    path.mkdir()
    return path


@case("from_pretrained", ValueError, r"model\.safetensors does not fit .* not floating point: "
                                     r"transformer\.wte\.weight has dtype int32")
def st_int_wte(folder):
    write_config(folder)
    state = tiny_state()
    state["transformer.wte.weight"] = state["transformer.wte.weight"].astype(np.int32)
    return folder, safetensors_file(folder / "model.safetensors", state)


@case("from_pretrained", ValueError, r"not floating point: transformer\.h\.0\.ln_1\.bias has dtype bool")
def st_bool_bias(folder):
    write_config(folder)
    state = tiny_state()
    state["transformer.h.0.ln_1.bias"] = state["transformer.h.0.ln_1.bias"] > 0
    return folder, safetensors_file(folder / "model.safetensors", state)


# --- shard indexes -------------------------------------------------------------------------------------------

def _two_shards() -> tuple[dict, dict, dict]:
    """The tiny state dict split in two shards (wte, last in key order, in the second), and its weight_map."""
    state = tiny_state()
    keys = sorted(state)
    first = {k: state[k] for k in keys[: len(keys) // 2]}
    second = {k: state[k] for k in keys[len(keys) // 2:]}
    weight_map = {**dict.fromkeys(first, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(second, "model-00002-of-00002.safetensors")}
    return first, second, weight_map


@case("read_weights", ValueError, r"shard model-00001-of-00002\.safetensors does not match .*: it also holds "
                                  r"transformer\.wte\.weight \(which the index puts in model-00002")
def index_tensor_in_two_shards(folder):
    """wte in both shards: the copy the index does not list used to win, silently."""
    first, second, weight_map = _two_shards()
    assert weight_map["transformer.wte.weight"] == "model-00002-of-00002.safetensors"
    first["transformer.wte.weight"] = np.zeros_like(second["transformer.wte.weight"])  # a stale copy
    return sharded_safetensors(folder, {"model-00001-of-00002.safetensors": first,
                                        "model-00002-of-00002.safetensors": second}, weight_map)


@case("read_weights", ValueError, r"holds tensors the index does not list: transformer\.extra")
def index_unlisted_tensor(folder):
    first, second, weight_map = _two_shards()
    first["transformer.extra"] = np.zeros(3, np.float32)
    return sharded_safetensors(folder, {"model-00001-of-00002.safetensors": first,
                                        "model-00002-of-00002.safetensors": second}, weight_map)


@case("read_weights", ValueError, r"lacks tensors the index puts there: transformer\.missing")
def index_lists_a_tensor_its_shard_lacks(folder):
    first, second, weight_map = _two_shards()
    weight_map["transformer.missing"] = "model-00002-of-00002.safetensors"
    return sharded_safetensors(folder, {"model-00001-of-00002.safetensors": first,
                                        "model-00002-of-00002.safetensors": second}, weight_map)


@case("read_weights", ValueError, r"is not a valid shard index \(JSON\) file")
def index_not_json(folder):
    path = folder / "model.safetensors.index.json"
    path.write_text('{"weight_map": {"a": ')
    return path


@case("read_weights", ValueError, r"has no weight_map object")
def index_without_weight_map(folder):
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}, "weights": {}}))
    return path


@case("read_weights", ValueError, r"weight_map values must be shard file names, got 'transformer\.wte\.weight': 5")
def index_weight_map_not_names(folder):
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"transformer.wte.weight": 5}}))
    return path


_LEAVES_FOLDER = r"a manifest may only name files inside its own folder"


@case("read_weights", ValueError, r"weight_map\['transformer\.wte\.weight'\] is '\.\./model\.safetensors', a path "
                                  r"that leaves its folder.*" + _LEAVES_FOLDER)
def index_shard_outside_folder(folder):
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "../model.safetensors"}}))
    return path


def _index_naming(folder: Path, shard: str, index: str = "model.safetensors.index.json") -> Path:
    path = folder / index
    path.write_text(json.dumps({"weight_map": {"transformer.wte.weight": shard}}))
    return path


@case("read_weights", ValueError, r"is '/etc/passwd\.safetensors', an absolute path.*" + _LEAVES_FOLDER)
def index_shard_absolute(folder):
    return _index_naming(folder, "/etc/passwd.safetensors")


@case("read_weights", ValueError, r"is 'model\\x00\.safetensors', a name with control characters")
def index_shard_nul_byte(folder):
    """Used to reach os.path.isfile, whose 'embedded null byte' named no file."""
    return _index_naming(folder, "model\x00.safetensors")


@case("read_weights", ValueError, r"is 'gs://bucket/model-00001-of-00001\.safetensors', a URL.*" + _LEAVES_FOLDER)
def index_shard_url(folder):
    return _index_naming(folder, "gs://bucket/model-00001-of-00001.safetensors")


@case("read_weights", ValueError, r"is 'shards/\.\./\.\./pytorch_model-00001-of-00001\.bin', a path that leaves its "
                                  r"folder")
def index_bin_shard_outside_folder(folder):
    return _index_naming(folder, "shards/../../pytorch_model-00001-of-00001.bin", "pytorch_model.bin.index.json")


@case("read_weights", ValueError, r"lists 5000 tensors, more than the 4096 a GPT-2 checkpoint can have")
def index_too_many_tensors(folder):
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {f"t{i}": "model-00001-of-00001.safetensors" for i in range(5000)}}))
    return path


@case("read_weights", ValueError, r"is \d+ bytes, more than the \d+ a shard index of 4096 tensors can need",
      memory=True)
def index_too_large(folder):
    """64 MiB of JSON: a list of empty objects would build ~1 GiB of dicts."""
    path = folder / "model.safetensors.index.json"
    body = b'{"weight_map": {}, "metadata": [' + b"{}," * ((64 << 20) // 3 - 12)
    path.write_bytes(body + b" " * ((64 << 20) - len(body) - 3) + b"{}]}")
    return path


@case("read_weights", ValueError, r"lists more than 4096 JSON objects")
def index_of_empty_objects(folder):
    """Under the size cap, but thousands of objects where a shard index has three."""
    path = folder / "model.safetensors.index.json"
    path.write_text('{"weight_map": {}, "metadata": [' + "{}," * 5000 + "{}]}")
    return path


@case("read_weights", FileNotFoundError, r"lists shard model-00001-of-00001\.safetensors, which is not there")
def index_shard_missing(folder):
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "model-00001-of-00001.safetensors"}}))
    return path


@case("read_weights", FileNotFoundError, r"lists shard model-00001-of-00001\.safetensors, which is a folder")
def index_shard_is_a_folder(folder):
    (folder / "model-00001-of-00001.safetensors").mkdir()
    return index_shard_missing(folder)


@case("read_weights", ValueError, r"lists shard 'pytorch_model-00001-of-00001\.bin', which is not a \.safetensors")
def index_shard_of_another_format(folder):
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "pytorch_model-00001-of-00001.bin"}}))
    return path


@case("read_weights", ValueError, r"shard pytorch_model-00001-of-00002\.bin does not match .*also holds "
                                  r"transformer\.wte\.weight")
def index_bin_tensor_in_two_shards(folder):
    first, second, weight_map = _two_shards()
    first["transformer.wte.weight"] = np.zeros_like(second["transformer.wte.weight"])  # a stale copy
    weight_map = {k: v.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
                  for k, v in weight_map.items()}
    torch_bin(folder / "pytorch_model-00001-of-00002.bin", first)
    torch_bin(folder / "pytorch_model-00002-of-00002.bin", second)
    path = folder / "pytorch_model.bin.index.json"
    path.write_text(json.dumps({"weight_map": weight_map}))
    return path


@case("from_pretrained", ValueError, r"not floating point: transformer\.wte\.weight \(in .*model-00002-of-00002"
                                     r"\.safetensors\) has dtype int32")
def index_int_tensor_in_a_shard(folder):
    """The error names the shard that holds the bad tensor, not just the index."""
    write_config(folder)
    first, second, weight_map = _two_shards()
    second["transformer.wte.weight"] = second["transformer.wte.weight"].astype(np.int32)
    sharded_safetensors(folder, {"model-00001-of-00002.safetensors": first,
                                 "model-00002-of-00002.safetensors": second}, weight_map)
    return folder, folder / "model-00002-of-00002.safetensors"


@case("read_weights", IsADirectoryError, r"pytorch_model\.bin is a folder, not a weights file")
def bin_directory(folder):
    path = folder / "pytorch_model.bin"
    path.mkdir()
    return path


@case("config", IsADirectoryError, r"config\.json is a folder, not a config\.json file")
def config_json_is_a_folder(folder):
    (folder / "config.json").mkdir()
    return folder, folder / "config.json"


# --- flax_model.msgpack ---------------------------------------------------------------------------------------

@case("read_weights", ValueError, r"is not a valid msgpack file")
def msgpack_truncated(folder):
    path = msgpack_file(folder / "flax_model.msgpack", hf_flax_tree(tiny_state()))
    path.write_bytes(path.read_bytes()[:-50])
    return path


@case("read_weights", ValueError, r"holds more than 32768 msgpack objects", memory=True)
def msgpack_of_empty_maps(folder):
    """10 MB of empty maps in one array: ~900 MiB of dicts when unpacked."""
    count = 10 << 20
    path = folder / "flax_model.msgpack"
    path.write_bytes(b"\x81\xa1a\xdd" + struct.pack(">I", count) + b"\x80" * count)
    return path


@case("read_weights", ValueError, r"does not hold a parameter tree")
def msgpack_not_a_tree(folder):
    return msgpack_file(folder / "flax_model.msgpack", [1, 2, 3])


@case("read_weights", ValueError, r"transformer/wte/embedding is a str, not an array")
def msgpack_string_leaf(folder):
    tree = hf_flax_tree(tiny_state())
    tree["transformer"]["wte"]["embedding"] = "weights"
    return msgpack_file(folder / "flax_model.msgpack", tree)


@case("read_weights", ValueError, r"transformer/ln_f/scale and transformer/ln_f/weight both become "
                                  r"transformer\.ln_f\.weight")
def msgpack_two_leaves_one_name(folder):
    tree = hf_flax_tree(tiny_state())
    tree["transformer"]["ln_f"]["weight"] = np.zeros(8, np.float32)
    return msgpack_file(folder / "flax_model.msgpack", tree)


@case("from_pretrained", ValueError, r"flax_model\.msgpack does not fit .* not floating point: "
                                     r"transformer\.wte\.weight has dtype int64")
def msgpack_int_wte(folder):
    write_config(folder)
    tree = hf_flax_tree(tiny_state())
    tree["transformer"]["wte"]["embedding"] = np.ones((16, 8), np.int64)
    return folder, msgpack_file(folder / "flax_model.msgpack", tree)


# --- config.json ----------------------------------------------------------------------------------------------

def _config_case(**raw):
    def build(folder):
        return folder, write_config(folder, **raw)
    return build


_CONFIG_CASES = {
    "config_epsilon_negative": (r"layer_norm_epsilon must be a finite number > 0, got -1", dict(layer_norm_epsilon=-1)),
    "config_epsilon_zero": (r"layer_norm_epsilon must be a finite number > 0, got 0", dict(layer_norm_epsilon=0)),
    "config_epsilon_nan": (r"layer_norm_epsilon must be a finite number > 0, got nan",
                           dict(layer_norm_epsilon=float("nan"))),
    "config_epsilon_string": (r"layer_norm_epsilon must be a finite number > 0, got '1e-5'",
                              dict(layer_norm_epsilon="1e-5")),
    "config_initializer_range_infinite": (r"initializer_range must be a finite number >= 0, got inf",
                                          dict(initializer_range=float("inf"))),
    "config_bool_as_string": (r"tie_word_embeddings must be true or false, got 'false'",
                              dict(tie_word_embeddings="false")),
    "config_bool_as_int": (r"scale_attn_weights must be true or false, got 1", dict(scale_attn_weights=1)),
    "config_int_as_bool": (r"n_head must be a positive integer, got True", dict(n_head=True)),
    "config_int_as_float": (r"n_embd must be a positive integer, got 8\.0", dict(n_embd=8.0)),
    "config_int_as_string": (r"n_layer must be a positive integer, got '1'", dict(n_layer="1")),
    "config_int_null": (r"n_positions must be a positive integer, got None", dict(n_positions=None)),
    "config_vocab_zero": (r"vocab_size must be a positive integer, got 0", dict(vocab_size=0)),
    "config_n_inner_string": (r"n_inner must be null \(4 \* n_embd\) or a positive integer, got '32'",
                              dict(n_inner="32")),
    "config_dropout_one": (r"resid_pdrop must be a probability in \[0, 1\), got 1", dict(resid_pdrop=1)),
    "config_dropout_negative": (r"attn_pdrop must be a probability in \[0, 1\), got -0\.1", dict(attn_pdrop=-0.1)),
    "config_dropout_bool": (r"embd_pdrop must be a probability in \[0, 1\), got False", dict(embd_pdrop=False)),
    "config_heads_do_not_divide": (r"n_embd \(8\) must be divisible by n_head \(3\)", dict(n_head=3)),
    "config_token_id_negative": (r"eos_token_id must be a token id \(an integer >= 0\), got -1", dict(eos_token_id=-1)),
    "config_token_id_empty_list": (r"bos_token_id is an empty list", dict(bos_token_id=[])),
    "config_activation_not_a_string": (r"activation_function=5 is not supported", dict(activation_function=5)),
    "config_summary_type_null": (r"summary_type=None is not supported", dict(summary_type=None)),
}
for _name, (_match, _raw) in _CONFIG_CASES.items():
    _build = _config_case(**_raw)
    _build.__name__ = _name
    case("config", ValueError, _match)(_build)


@case("config", ValueError, r"config\.json is not valid JSON")
def config_not_json(folder):
    path = folder / "config.json"
    path.write_text('{"n_embd": 8,')
    return folder, path


@case("config", ValueError, r"config\.json holds a JSON list, not an object")
def config_not_an_object(folder):
    path = folder / "config.json"
    path.write_text("[1, 2]")
    return folder, path


@case("from_pretrained", ValueError, r"config\.json: tie_word_embeddings must be true or false, got 'false'")
def config_bad_through_from_pretrained(folder):
    path = write_config(folder, tie_word_embeddings="false")
    safetensors_file(folder / "model.safetensors", tiny_state())
    return folder, path


def build(case: Case, folder: Path) -> tuple[Path, Path]:
    """Writes `case` into the empty `folder`; returns (what to pass to the reader, the file the error names)."""
    folder.mkdir(parents=True, exist_ok=True)
    built = case.build(folder)
    target, named = built if isinstance(built, tuple) else (built, built)
    return Path(target), Path(named)


def run(case: Case, target: Path):
    """Calls the reader `case` names on `target` (returns only if it did not raise)."""
    import flax_gpt2
    from flax_gpt2.checkpoints import formats as checkpoint_files

    if case.call == "read_weights":
        return checkpoint_files.read_weights(target, progress=False)
    if case.call == "from_pretrained":
        return flax_gpt2.from_pretrained(target, progress=False)
    if case.call == "config":
        return flax_gpt2.GPT2Config.from_hf_config(target)
    raise ValueError(f"unknown call {case.call!r}")


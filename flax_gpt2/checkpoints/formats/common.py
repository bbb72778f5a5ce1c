"""What every weights-file reader shares: the file names, the error types, the `StateDict` they return, and the
bounds on what an untrusted manifest (a safetensors header, a shard index) may make us build."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from tqdm.auto import tqdm

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



def progress_bar(total: int, desc: str, progress: bool, unit: str = "tensor"):
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)



def require_file(path: str) -> None:
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
def reading(path: str, what: str) -> Iterator[None]:
    """Re-raises a parser's error as a one-line CheckpointError naming `path` (ours pass through as they are)."""
    try:
        yield
    except CheckpointError:
        raise
    except _parse_errors() as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{path} is not a valid {what} file ({type(e).__name__}: {detail})") from e



def manifest_bytes(max_tensors: int) -> int:
    return max_tensors * _MANIFEST_BYTES_PER_TENSOR + _MANIFEST_SLACK_BYTES



class TooManyEntries(Exception):
    pass



def load_manifest_json(raw: bytes | str, path: str, max_tensors: int, what: str) -> Any:
    """`json.loads(raw)`, stopping with a CheckpointError once it has built more than `max_tensors` + 2
    objects (a header is one object per tensor, plus itself and its metadata)."""
    built = 0

    def count(pairs):
        nonlocal built
        built += 1
        if built > max_tensors + 2:
            raise TooManyEntries
        return dict(pairs)

    try:
        return json.loads(raw, object_pairs_hook=count)
    except TooManyEntries:
        raise CheckpointError(f"{path} lists more than {max_tensors} {what}; a GPT-2 checkpoint has far fewer "
                              "(it is not one, or is corrupt)") from None



def join_names(items: Iterable[str], limit: int = 12) -> str:
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


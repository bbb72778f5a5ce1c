"""`flax_model.msgpack`: transformers' old Flax GPT-2 layout, read under Hugging Face PyTorch key names and
written for transformers <= 4.x's `FlaxGPT2*.from_pretrained`."""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import numpy as np
from flax.serialization import msgpack_restore, msgpack_serialize

from flax_gpt2.checkpoints.formats.common import (FLAX_MSGPACK, MAX_TENSORS, CheckpointError, StateDict, progress_bar,
                                                  reading, require_file)


def read_flax_msgpack(path: str, *, max_tensors: int = MAX_TENSORS) -> StateDict:
    """`flax_model.msgpack` of transformers' FlaxGPT2Model / FlaxGPT2LMHeadModel, under HF PyTorch key names.

    In that layout `FlaxConv1D.kernel` is `[out, in]` (the transpose of PyTorch `Conv1D.weight`) and
    `nn.Dense.kernel` (the untied lm_head) is `[in, out]` (the transpose of `nn.Linear.weight`): every
    `kernel` is transposed back. `embedding` and LayerNorm `scale` become `weight`; blocks are `h/0/...`.
    The file may hold at most `_MSGPACK_OBJECTS_PER_TENSOR * max_tensors` objects (counted before any
    is built: a 10 MB file of empty maps would otherwise build ~900 MiB of Python dicts).
    """

    require_file(path)
    with open(path, "rb") as f:
        data = f.read()
    _count_msgpack_objects(data, path, _MSGPACK_OBJECTS_PER_TENSOR * max_tensors)
    with reading(path, "msgpack"):
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
    with progress_bar(1, f"Writing {filename}", progress, unit="file") as bar:
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


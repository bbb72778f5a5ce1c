"""Loading a model for use: a hub id, a Hugging Face folder or a training run, with its tokenizer, through a
cache of converted copies.

Models that need converting (PyTorch `.bin`, Flax msgpack, training runs) are converted once and cached as a
safetensors folder under `$FLAX_GPT2_CACHE/models` (default `~/.cache/flax_gpt2/models`), so the next start
is fast. A cached copy is published by renaming a complete folder into place; one that is incomplete or
unreadable (an earlier run killed mid-write) is converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Callable

from flax_gpt2.checkpoints import formats
from flax_gpt2.checkpoints.peft_adapters import AdapterError
from flax_gpt2.checkpoints.pretrained import from_pretrained, resolve, save_pretrained
from flax_gpt2.modeling.quantize import check_quantize
from flax_gpt2.tokenizer import bpe_files
from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer
from flax_gpt2.utils import cli, file_io
from flax_gpt2.utils.cache_root import cache_root
from flax_gpt2.utils.dtypes import DTYPES


def _needs_conversion(folder: str) -> bool:
    """safetensors folders load directly (memory-mapped, no conversion); everything else is worth caching."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return True  # a training run
    return not os.path.basename(formats.find_weights(folder)).startswith(formats.SAFETENSORS)


def _fingerprint(folder: str) -> str:
    """Names a folder's current contents: its path and every file's size and modification time."""
    digest = hashlib.sha256(os.path.abspath(folder).encode())
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


# Written last into a cache entry: the size of each of its files. An entry without it, or whose files
# differ, was left incomplete (by an older version, or a crash before the data reached the disk).
CACHE_MANIFEST = "flax_gpt2_cache.json"


def load_model(name_or_path: str, *, dtype: str = "float32", param_dtype: str | None = None,
               cache_dir: str | None = None, progress: bool = True, adapter: str | None = None,
               quantize: str | None = None, log: Callable[[str], None] = lambda msg: None):
    """`(model, params, tokenizer)` for a hub id, a Hugging Face folder or a training run.

    A model that needs converting (not safetensors) is converted once and cached as a safetensors folder
    under `cache_root(cache_dir)/models/`, keyed by the source folder's path and file dates; later loads
    read the cached copy. An incomplete or unreadable cached copy is converted again; when the cache
    cannot be written (a full disk, a read-only folder), the converted model is used without caching.
    `adapter` (a PEFT LoRA folder) is merged on load (`from_pretrained(adapter=)`); the cache holds the base.
    `quantize="int8"` quantizes the weights on load (`from_pretrained(quantize=)`); the cache holds float weights.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    param_dtype = param_dtype or dtype  # inference keeps the weights in the compute dtype unless told otherwise
    if param_dtype not in DTYPES:
        raise ValueError(f"param_dtype must be one of {sorted(DTYPES)}, got {param_dtype!r}")
    check_quantize(quantize)  # before any download or conversion
    kwargs = dict(dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype], progress=progress, adapter=adapter,
                  quantize=quantize)
    folder = resolve(name_or_path, progress=progress, pass_folder_as="--model DIR")
    tokenizer = model_tokenizer(folder, command_line=True)
    if _needs_conversion(folder):
        model, params = _load_through_cache(folder, cache_root(cache_dir), kwargs, tokenizer, log)
    else:
        log(f"Loading {folder}")
        model, params = from_pretrained(folder, **kwargs)
    if adapter is not None:
        log(f"Merged the LoRA adapter {adapter} into the weights")
    if quantize is not None:
        log(f"Quantized the weights to {quantize}")
    check_vocab(model.config, tokenizer, folder)
    return model, params, tokenizer


def _load_through_cache(folder: str, root: str, kwargs: dict, tokenizer, log: Callable[[str], None]):
    cached = os.path.join(root, "models", _fingerprint(folder))
    if cache_is_complete(cached):
        log(f"Loading {cached} (converted from {folder})")
        try:
            return from_pretrained(cached, **kwargs)
        except AdapterError:  # the adapter does not fit: converting the base again would not help
            raise
        except cli.user_errors() as e:
            log(f"The cached copy {cached} cannot be read ({cli.one_line(e)}); converting {folder} again")
    elif os.path.lexists(cached):
        log(f"The cached copy {cached} is incomplete (an earlier run was interrupted?); converting {folder} again")
    else:
        log(f"Converting {folder} (once; cached in {cached})")
    try:
        _convert_into_cache(folder, cached, tokenizer, progress=kwargs["progress"])
    except OSError as e:  # a full disk, a read-only cache: the model still loads, only slower next time
        log(f"Could not cache the converted model in {cached} ({cli.one_line(e)}); loading {folder} directly")
        return from_pretrained(folder, **kwargs)
    log(f"Loading {cached} (converted from {folder})")
    return from_pretrained(cached, **kwargs)


def _convert_into_cache(folder: str, cached: str, tokenizer, *, progress: bool) -> None:
    """Converts `folder` into a staging folder next to `cached`, then renames it into place when complete."""
    model, params = from_pretrained(folder, progress=progress)
    parent = os.path.dirname(cached)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".converting-")
    try:
        save_pretrained(staging, model, params, tokenizer=tokenizer, overwrite=True, progress=progress)
        sizes = {name: os.path.getsize(os.path.join(staging, name)) for name in sorted(os.listdir(staging))
                 if os.path.isfile(os.path.join(staging, name))}
        file_io.atomic_write(os.path.join(staging, CACHE_MANIFEST), json.dumps({"source": folder, "files": sizes}))
        if os.path.lexists(cached):  # incomplete or unreadable: why it is being converted again
            _discard(cached)
        try:
            os.replace(staging, cached)  # atomic: a half-written copy is never picked up
        except OSError:
            if not cache_is_complete(cached):  # else another process published its copy meanwhile
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cache_is_complete(cached: str) -> bool:
    """Whether the cache entry holds its manifest and every file at the size the manifest records."""
    try:
        with open(os.path.join(cached, CACHE_MANIFEST), encoding="utf-8") as f:
            sizes = json.load(f)["files"]
        return formats.SAFETENSORS in sizes and all(
            os.path.getsize(os.path.join(cached, name)) == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _discard(path: str) -> None:
    """Removes a cache entry: renamed aside first, so no reader ever sees it half deleted."""
    aside = os.path.join(os.path.dirname(path), f".discarded-{uuid.uuid4().hex[:12]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def check_vocab(config, tokenizer, model_name: str | None = None) -> None:
    """ValueError when the tokenizer has ids the model has no embedding for (they do not belong together).

    A model vocabulary larger than the tokenizer's (e.g. padded to a multiple of 64) is fine: generation
    passes `vocab_limit=tokenizer.vocab_size`, so the ids past the tokenizer's are never chosen.
    """
    if tokenizer.vocab_size > config.vocab_size:
        where = f"{model_name}: " if model_name else ""
        raise ValueError(f"{where}the model's vocab_size ({config.vocab_size}) is smaller than its tokenizer's "
                         f"({tokenizer.vocab_size} tokens): ids past {config.vocab_size - 1} would have no "
                         f"embedding. Use the tokenizer the model was trained with (vocab.json + merges.txt in "
                         f"the model folder)")


def model_tokenizer(folder: str | None, *, command_line: bool = False):
    """The tokenizer for a resolved model folder: its own files, else the standard GPT-2 tokenizer.

    With `command_line`, the error for a standard tokenizer that cannot be loaded offline says how to fix
    it from a command line (files in the model folder, or tiktoken's cache), not with `get_tokenizer`.
    """
    source = tokenizer_source(folder)
    try:
        return get_tokenizer(source)
    except OSError as e:
        if source is not None or not command_line:
            raise
        raise OSError(f"{folder} has no tokenizer files, and the standard GPT-2 tokenizer is neither cached nor "
                      f"downloadable here: copy GPT-2's vocab.json + merges.txt into {folder}, or set "
                      f"TIKTOKEN_CACHE_DIR to a folder holding tiktoken's GPT-2 files") from e


def tokenizer_source(folder: str | None) -> str | None:
    """The model folder when it holds tokenizer files (either naming), else None (the standard GPT-2 tokenizer)."""
    return folder if folder is not None and bpe_files.tokenizer_files(folder) is not None else None

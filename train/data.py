"""Deterministic, resumable batches of packed token windows, each host reading only its own rows.

Design (chosen over a Grain pipeline because it is simpler to make exact): the corpus is one stream of
GPT-2 tokens, documents separated by `<|endoftext|>`, stored once as memory-mapped uint16 shards (see
`tokenize_corpus`). The last `val_fraction` of the stream is held out. Training windows are the fixed
spans `[w*T, w*T + T + 1)` of the rest (T inputs and their T next-token targets); each epoch visits them
in a permutation seeded by `(seed, epoch)`, `batch_size` windows per step, dropping the remainder.

The iterator's whole state is therefore `(epoch, position)`, two integers saved in every checkpoint: a
resumed run draws exactly the batches an uninterrupted run would. The global batch does not depend on
the number of hosts either: `jax.make_array_from_callback` asks each process only for the rows its
devices hold, and only those rows are read from disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Iterator

import jax
import numpy as np

from flax_gpt2 import file_io
from flax_gpt2.train import tokenize_corpus as tc
from flax_gpt2.train.config_checks import ConfigValueError

# How an error that cannot load the tokenizer offline tells a training user to pass a folder.
TOKENIZER_FLAG = "--config.data.tokenizer=DIR"


class TokenStore:
    """A token stream in memory-mapped uint16 shards (a `tokenize_corpus` output folder)."""

    def __init__(self, folder: str):
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{folder!r} is not a tokenized corpus (no meta.json)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.folder = folder
        self.shards = [np.memmap(os.path.join(folder, s["file"]), dtype=np.uint16, mode="r", shape=(s["num_tokens"],))
                       for s in self.meta["shards"]]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)` of the stream as int32 (a span may cross shard boundaries)."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            shard, base = self.shards[first], int(self.offsets[first])
            take = min(stop, base + len(shard)) - start
            parts.append(shard[start - base:start - base + take])
            start += take
            first += 1
        return np.concatenate(parts).astype(np.int32)


def _cache_root(cache_dir: str) -> str:
    return cache_dir or os.path.join(_local_cache(), "tokens")


def _local_cache() -> str:
    return os.environ.get("FLAX_GPT2_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "flax_gpt2"))


def _file_stamp(path: str) -> list:
    """What identifies a source file's version: its path, size and modification time (local or remote)."""
    if file_io.is_url(path):
        stat = file_io.epath(path).stat()
        return [path, int(stat.length), float(stat.mtime)]
    return [os.path.abspath(path), os.path.getsize(path), os.path.getmtime(path)]


def _corpus_key(data_config) -> str:
    """Names a tokenized corpus by what went into it: the files (size, mtime) or the dataset, the fields
    read, and the tokenizer. A changed file gets a fresh cache entry."""
    files = _remote_files(data_config.source) if file_io.is_url(data_config.source) else tc.resolve_files(
        data_config.source)
    if files is None:
        what = ["datasets", data_config.source, data_config.dataset_config, data_config.split]
    else:
        what = [_file_stamp(f) for f in files]
    tokenizer = os.path.abspath(data_config.tokenizer) if data_config.tokenizer else "gpt2"
    blob = json.dumps([tc.FORMAT_VERSION, what, data_config.text_field, tokenizer, data_config.recipe])
    name = os.path.basename(data_config.source.rstrip("/")).replace("*", "_") or "corpus"
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def load_tokens(data_config, progress: bool = True) -> TokenStore:
    """The tokenized corpus for `data_config.source`, tokenizing it into the cache on first use.

    `source` may also be a `tokenize_corpus` output folder, used as is. Both `source` and `cache_dir` may
    be `gs://` URLs: shards are memory-mapped, so remote corpora are mirrored into the local cache
    (`$FLAX_GPT2_CACHE/remote/`) first, and a corpus tokenized for a remote cache is uploaded there by
    process 0 (its `meta.json` last, so that a partial upload is never taken for a corpus).
    """
    source = data_config.source
    if not source:
        raise ConfigValueError("config.data.source is empty: give --config.data.source=... (a text/jsonl file, a "
                               "folder, a tokenized corpus or a datasets name); the demo configs fill it in from "
                               "$FLAX_GPT2_SHARED when that names a folder with data/tinyshakespeare.txt")
    corpus = source if file_io.is_url(source) else os.path.expanduser(source)
    if file_io.exists(file_io.join(corpus, "meta.json")):  # a tokenize_corpus folder
        return TokenStore(_mirror(corpus) if file_io.is_url(corpus) else corpus)
    key = _corpus_key(data_config)
    cache = _cache_root(data_config.cache_dir)
    remote = file_io.is_url(cache)
    folder = os.path.join(_local_cache(), "remote", key) if remote else os.path.join(cache, key)
    if remote and file_io.exists(file_io.join(cache, key, "meta.json")):
        return TokenStore(_mirror(file_io.join(cache, key), folder))
    if not os.path.exists(os.path.join(folder, "meta.json")):
        local_source = _download_source(source, key) if file_io.is_url(source) else source
        logging.info("tokenizing %s into %s", source, folder)
        tc.tokenize_corpus(local_source, folder, text_field=data_config.text_field, recipe=data_config.recipe,
                           split=data_config.split,
                           dataset_config=data_config.dataset_config, tokenizer=data_config.tokenizer,
                           num_threads=data_config.num_threads, progress=progress,
                           pass_folder_as=TOKENIZER_FLAG)
    if remote and jax.process_index() == 0:
        _upload(folder, file_io.join(cache, key))
    return TokenStore(folder)


def _remote_files(source: str) -> list[str]:
    """The files a `gs://` source names: the object itself, or every text/jsonl object under the prefix."""
    path = file_io.epath(source)
    if path.is_file():
        return [source]
    suffixes = tc.TEXT_SUFFIXES + tc.JSONL_SUFFIXES
    files = sorted(str(p) for p in path.iterdir() if str(p).endswith(suffixes)) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"data source {source!r} has no .txt or .jsonl objects")
    return files


def _download_source(source: str, key: str) -> str:
    """A local copy of a remote text/jsonl source (a file or a folder of them), for the tokenizer."""
    target = os.path.join(_local_cache(), "remote-sources", key)
    os.makedirs(target, exist_ok=True)
    for url in _remote_files(source):
        local = os.path.join(target, os.path.basename(url))
        if not os.path.exists(local):
            file_io.atomic_write(local, file_io.read_bytes(url))
    return target  # a folder of the source's files, read in name order as a local folder would be


def _mirror(url: str, folder: str | None = None) -> str:
    """A local copy of a tokenized corpus at `url` (shards first, meta.json last: complete or absent)."""
    folder = folder or os.path.join(_local_cache(), "remote", hashlib.sha256(url.encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    meta = json.loads(file_io.read_text(file_io.join(url, "meta.json")))
    os.makedirs(folder, exist_ok=True)
    for shard in meta["shards"]:
        file_io.atomic_write(os.path.join(folder, shard["file"]), file_io.read_bytes(file_io.join(url, shard["file"])))
    file_io.atomic_write(os.path.join(folder, "meta.json"), json.dumps(meta, indent=1))
    return folder


def _upload(folder: str, url: str) -> None:
    """Copies a local tokenized corpus to `url` unless it is there already (meta.json last)."""
    if file_io.exists(file_io.join(url, "meta.json")):
        return
    meta = json.loads(open(os.path.join(folder, "meta.json")).read())
    for shard in meta["shards"]:
        with open(os.path.join(folder, shard["file"]), "rb") as f:
            file_io.atomic_write(file_io.join(url, shard["file"]), f.read())
    file_io.atomic_write(file_io.join(url, "meta.json"), json.dumps(meta, indent=1))


def split_point(store: TokenStore, val_fraction: float, seq_len: int) -> int:
    """Index of the first held-out token: the last `val_fraction` of the stream (at least one window)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return len(store)
    n_val = max(int(len(store) * val_fraction), seq_len + 1)
    return len(store) - n_val


@dataclasses.dataclass
class DataState:
    """Where the training iterator is: `position` windows into epoch `epoch`'s permutation."""

    epoch: int = 0
    position: int = 0


class Windows:
    """The fixed windows of `seq_len + 1` tokens in `[start, stop)` of a token store."""

    def __init__(self, store: TokenStore, start: int, stop: int, seq_len: int):
        self.store, self.start, self.seq_len = store, start, seq_len
        self.count = max(stop - start - 1, 0) // seq_len

    def read(self, window_ids: np.ndarray) -> np.ndarray:
        """`[..., seq_len + 1]` int32 tokens of the given windows."""
        flat = [self.store.read(self.start + w * self.seq_len, self.start + (w + 1) * self.seq_len + 1)
                for w in window_ids.reshape(-1)]
        out = np.stack(flat) if flat else np.zeros((0, self.seq_len + 1), np.int32)
        return out.reshape(*window_ids.shape, self.seq_len + 1)


def _global_array(window_ids: np.ndarray, windows: Windows, sharding: jax.sharding.Sharding) -> jax.Array:
    """A `[A, B, T+1]` global array of the windows `window_ids [A, B]`; this process reads only the rows
    its devices hold (the callback is called once per addressable device with that device's index)."""
    shape = (*window_ids.shape, windows.seq_len + 1)
    return jax.make_array_from_callback(shape, sharding, lambda index: windows.read(window_ids[index[:2]])[
        (slice(None), slice(None), index[2])])


class TrainBatches:
    """Shuffled training batches `[A, B, T+1]`: A accumulated micro-batches of B windows each."""

    def __init__(self, windows: Windows, batch_size: int, micro_batch_size: int, seed: int,
                 sharding: jax.sharding.Sharding, state: DataState | None = None):
        if windows.count < batch_size:
            raise ValueError(f"the training split has {windows.count} windows of {windows.seq_len + 1} tokens, "
                             f"fewer than one batch of {batch_size}: use more data or a smaller batch/seq_len")
        self.windows, self.batch_size, self.micro_batch_size = windows, batch_size, micro_batch_size
        self.seed, self.sharding = seed, sharding
        self.state = state or DataState()
        self._perm_epoch, self._perm = -1, None

    @property
    def batches_per_epoch(self) -> int:
        return self.windows.count // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows.count)
            self._perm_epoch = epoch
        return self._perm

    def next_window_ids(self) -> np.ndarray:
        """The next batch's window ids `[A, B]`, advancing the state."""
        epoch, position = self.state.epoch, self.state.position
        if position + self.batch_size > self.windows.count:  # drop the remainder: next epoch
            epoch, position = epoch + 1, 0
        ids = self._permutation(epoch)[position:position + self.batch_size]
        self.state = DataState(epoch, position + self.batch_size)
        return ids.reshape(self.batch_size // self.micro_batch_size, self.micro_batch_size)

    def __iter__(self) -> Iterator[jax.Array]:
        return self

    def __next__(self) -> jax.Array:
        return _global_array(self.next_window_ids(), self.windows, self.sharding)


def eval_batches(windows: Windows, batch_size: int, max_batches: int,
                 sharding: jax.sharding.Sharding) -> list[jax.Array]:
    """The held-out windows in order, as up to `max_batches` arrays `[1, batch_size, T+1]` (the same
    every eval, so eval losses are comparable across steps and runs)."""
    n = min(max_batches, windows.count // batch_size)
    if n == 0:
        logging.warning("the held-out split has %d windows, fewer than one eval batch of %d: no eval",
                        windows.count, batch_size)
    return [_global_array(np.arange(i * batch_size, (i + 1) * batch_size)[None], windows, sharding)
            for i in range(n)]

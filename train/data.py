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
import json
import logging
import os
from typing import Iterator

import jax
import numpy as np

from flax_gpt2.utils import file_io
from flax_gpt2.utils.cache_root import cache_root

from . import loss_mask, remote_source, tokenize_corpus as tc, tokenize_hosts as th
from .config_checks import ConfigValueError

# How an error that cannot load the tokenizer offline tells a training user to pass a folder.
TOKENIZER_FLAG = "--config.data.tokenizer=DIR"


class CorpusError(ValueError):
    """A tokenized corpus whose meta.json or shards are damaged or inconsistent; the message names the file
    and the fix."""


# How to repair a damaged corpus, by where it came from (`TokenStore(fix=...)`).
FIX_TOKENIZED = ("tokenize the source into it again (python -m flax_gpt2.train.tokenize_corpus SOURCE {folder} "
                 "--overwrite)")
FIX_CACHE = "delete the cache folder {folder}: the next run tokenizes the source again"
FIX_REMOTE = "tokenize the source again and upload the corpus to {url} (python -m flax_gpt2.train.tokenize_corpus)"
FIX_MIRROR = "delete the local copy {folder} of {url}: it is copied again on the next run"
_SCAN_TOKENS = 1 << 24  # token ids checked per read while scanning a shard (32 MiB)


class TokenStore:
    """A token stream in memory-mapped uint16 shards (a `tokenize_corpus` output folder).

    Opening one checks it whole before a token is used: `meta.json` is a corpus manifest whose shard names
    stay inside the folder (`file_io.manifest_member`), each shard's size is the token count meta.json
    gives it, the counts add up, and every token id is below the vocabulary size (an id past it would turn
    the loss into NaN many steps later). `fix` says how to repair a damaged corpus in the errors
    (`{folder}` is filled in). A corpus with a loss mask (`meta["loss_mask"]`, train/loss_mask.py) has its
    `mask_NNNNN.bin` checked the same way (one uint8 0/1 per token) in `masks`; otherwise `masks` is None.
    """

    def __init__(self, folder: str, fix: str = FIX_TOKENIZED):
        self.folder = folder
        fix = fix.format(folder=folder)
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{folder!r} is not a tokenized corpus (no meta.json)")
        self.meta = read_meta(meta_path, fix)
        self.shards = []
        for i, shard in enumerate(self.meta["shards"]):
            path = shard_path(folder, self.meta, i)
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != 2 * shard["num_tokens"]:
                held = "is missing" if size is None else f"is {size} bytes ({size // 2} tokens)"
                raise CorpusError(f"{path} {held} but {meta_path} says {shard['num_tokens']}: the corpus is damaged "
                                  f"(a truncated copy or an edited meta.json); {fix}")
            tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(shard["num_tokens"],))
            _check_ids(tokens, self.meta["vocab_size"], path, fix)
            self.shards.append(tokens)
        self.masks = [self._mask(i, fix) for i in range(len(self.shards))] if "loss_mask" in self.meta else None
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def _mask(self, i: int, fix: str) -> np.ndarray:
        path, count = shard_path(self.folder, self.meta, i, "mask_file"), self.meta["shards"][i]["num_tokens"]
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != count:
            held = "is missing" if size is None else f"is {size} bytes"
            raise CorpusError(f"{path} {held} but the loss mask needs one byte for each of the shard's {count} "
                              f"tokens: the corpus is damaged; {fix}")
        mask = np.memmap(path, dtype=np.uint8, mode="r", shape=(count,))
        for start in range(0, count, _SCAN_TOKENS):
            if int(mask[start:start + _SCAN_TOKENS].max()) > 1:
                at = start + int(np.argmax(mask[start:start + _SCAN_TOKENS] > 1))
                raise CorpusError(f"{path} holds {int(mask[at])} at position {at}; a loss mask holds only 0 (not "
                                  f"scored) and 1 (scored): the corpus is damaged; {fix}")
        return mask

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def identity(self) -> dict:
        """What the stream is: its length and the sha256 of its tokens (None for a corpus written before
        tokenize_corpus recorded one). A resumed run compares it with its checkpoints' (`run_guard`)."""
        return {"num_tokens": len(self), "sha256": self.meta.get("sha256")}

    def prefetch(self, spans: list[tuple[int, int]], arrays: list | None = None) -> None:
        """Nothing to do for local shards (a remote store fetches the spans' blocks at once here)."""

    def read(self, start: int, stop: int, arrays: list | None = None) -> np.ndarray:
        """Tokens `[start, stop)` of the stream (or of `arrays`, shards of the same lengths: `masks`) as int32
        (a span may cross shard boundaries)."""
        arrays = self.shards if arrays is None else arrays
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            shard, base = arrays[first], int(self.offsets[first])
            take = min(stop, base + len(shard)) - start
            parts.append(shard[start - base:start - base + take])
            start += take
            first += 1
        return np.concatenate(parts).astype(np.int32)


def read_meta(meta_path: str, fix: str, text: str | None = None) -> dict:
    """A corpus `meta.json` (read from `meta_path`, or given as `text`), checked to be a manifest this
    module can trust: shards with plain relative names and positive token counts that add up to
    `num_tokens`, and a vocabulary that fits uint16. Raises `CorpusError` naming the file and `fix`."""
    def bad(problem: str) -> CorpusError:
        return CorpusError(f"{meta_path} {problem}: it is not a corpus meta.json that tokenize_corpus wrote; {fix}")

    try:
        meta = json.loads(file_io.read_text(meta_path) if text is None else text)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise bad("does not hold a JSON object")
    shards = meta.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad("has no list of shards")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict) or not _count(shard.get("num_tokens"), 1):
            raise bad(f"has shards[{i}] = {shard!r}, not {{\"file\": NAME, \"num_tokens\": COUNT > 0}}")
        for key in ("file", "mask_file") if "loss_mask" in meta else ("file",):
            file_io.manifest_member(os.path.dirname(meta_path), shard.get(key), manifest=meta_path,
                                    key=f"shards[{i}].{key}")
    total = sum(s["num_tokens"] for s in shards)
    if meta.get("num_tokens") != total:
        raise bad(f"says num_tokens={meta.get('num_tokens')!r} but its shards hold {total} tokens")
    if meta.get("dtype", "uint16") != "uint16":
        raise bad(f"says dtype={meta.get('dtype')!r}; shards are uint16")
    if not _count(meta.get("vocab_size"), 1) or meta["vocab_size"] > 1 << 16:
        raise bad(f"says vocab_size={meta.get('vocab_size')!r}, not a count of at most 65536 tokens")
    return meta


def shard_path(folder: str, meta: dict, i: int, key: str = "file") -> str:
    """Where shard `i` of a checked `meta` is (local folder or URL); `key="mask_file"`: its loss mask."""
    return file_io.manifest_member(folder, meta["shards"][i][key], manifest=file_io.join(folder, "meta.json"),
                                   key=f"shards[{i}].{key}")


def shard_files(meta: dict, i: int) -> list[tuple[str, int]]:
    """`(key, bytes per token)` of the files of shard `i`: its tokens, and its loss mask if the corpus has one."""
    return [("file", 2)] + ([("mask_file", 1)] if "loss_mask" in meta else [])


def _count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _check_ids(tokens: np.ndarray, vocab_size: int, path: str, fix: str) -> None:
    """Every id in `tokens` (a shard at `path`) is below `vocab_size`, read a bounded chunk at a time."""
    for start in range(0, len(tokens), _SCAN_TOKENS):
        chunk = tokens[start:start + _SCAN_TOKENS]
        if int(chunk.max()) >= vocab_size:
            at = start + int(np.argmax(chunk >= vocab_size))
            raise CorpusError(f"{path} holds token id {int(tokens[at])} at position {at}, past the vocabulary of "
                              f"{vocab_size} tokens its meta.json gives: the corpus is damaged or was written "
                              f"with another tokenizer; {fix}")


def _cache_root(cache_dir: str) -> str:
    return cache_dir or os.path.join(cache_root(), "tokens")


def _corpus_key(data_config) -> str:
    """Names a tokenized corpus by what went into it (`tokenize_corpus.corpus_inputs`): the files (size,
    mtime) or the dataset, the fields read, and the tokenizer. A changed file gets a fresh cache entry."""
    stamps = remote_source.remote_stamps(data_config.source)
    inputs = tc.corpus_inputs(data_config.source, text_field=data_config.text_field, recipe=data_config.recipe,
                              split=data_config.split, dataset_config=data_config.dataset_config,
                              tokenizer=data_config.tokenizer, stamps=stamps)
    name = os.path.basename(data_config.source.rstrip("/")).replace("*", "_") or "corpus"
    return f"{name}-{inputs[:16]}"


def load_tokens(data_config, progress: bool = True) -> TokenStore:
    """The tokenized corpus for `data_config.source`, tokenizing it into the cache on first use.

    `source` may also be a `tokenize_corpus` output folder, used as is. Both `source` and `cache_dir` may
    be `gs://` URLs: a remote corpus is read in place, each host fetching only the blocks its rows need
    (`data.remote_reads="range"`, train/remote_store.py), or mirrored whole into the local cache
    (`$FLAX_GPT2_CACHE/remote/`) first (`"mirror"`); and a corpus tokenized for a remote cache is uploaded there by
    process 0 (its `meta.json` last, so that a partial upload is never taken for a corpus).

    On several processes, a corpus not yet in the cache is tokenized by all of them together, each its share
    (`tokenize_hosts`), straight into the cache, which must then be shared: `gs://`, or a local folder every
    host mounts (`data.cache_shared`); a local cache is otherwise an error naming `data.cache_dir`.
    """
    source = data_config.source
    if not source:
        raise ConfigValueError("config.data.source is empty: give --config.data.source=... (a text/jsonl file, a "
                               "folder, a tokenized corpus or a datasets name); the demo configs (shakespeare, "
                               "tiny) fill it in with the text shipped in the package")
    corpus = source if file_io.is_url(source) else os.path.expanduser(source)
    if file_io.exists(file_io.join(corpus, "meta.json")):  # a tokenize_corpus folder
        if file_io.is_url(corpus):
            return _open_remote(corpus, data_config)
        return TokenStore(corpus)
    key = _corpus_key(data_config)
    cache = _cache_root(data_config.cache_dir)
    remote = file_io.is_url(cache)
    folder = os.path.join(cache_root(), "remote", key) if remote else os.path.join(cache, key)
    if remote and file_io.exists(file_io.join(cache, key, "meta.json")):
        url = file_io.join(cache, key)
        return _open_remote(url, data_config, folder)
    if jax.process_count() > 1 and not os.path.exists(os.path.join(folder, "meta.json")):
        return _tokenize_on_hosts(data_config, file_io.join(cache, key), folder)
    if not os.path.exists(os.path.join(folder, "meta.json")):
        if os.path.isdir(folder) and os.listdir(folder):
            raise CorpusError(f"the token cache folder {folder} holds files but no meta.json (tokenize_corpus writes "
                              "a corpus elsewhere and moves it in whole, so something else left them): nothing in "
                              f"it was read or changed; delete it ({folder}) and rerun to tokenize the source again")
        local_source = remote_source.download_source(source, key) if file_io.is_url(source) else source
        logging.info("tokenizing %s into %s", source, folder)
        tc.tokenize_corpus(local_source, folder, text_field=data_config.text_field, recipe=data_config.recipe,
                           split=data_config.split,
                           dataset_config=data_config.dataset_config, tokenizer=data_config.tokenizer,
                           num_threads=data_config.num_threads, progress=progress,
                           pass_folder_as=TOKENIZER_FLAG)
    if remote and jax.process_index() == 0:
        from . import remote_store  # it builds on this module

        remote_store.upload(folder, file_io.join(cache, key))
    return TokenStore(folder, fix=FIX_CACHE)


def _open_remote(url: str, data_config, folder: str | None = None) -> TokenStore:
    """A corpus at `url` read in place or mirrored into `folder` (`data.remote_reads`, train/remote_store.py)."""
    from . import remote_store  # it builds on this module

    return remote_store.open_remote(url, data_config, folder)


def _tokenize_on_hosts(data_config, target: str, mirror: str) -> TokenStore:
    """First use on several hosts: each tokenizes its share into the shared cache `target` (`tokenize_hosts`);
    a `gs://` one is then read in place or mirrored into the local `mirror` (`data.remote_reads`)."""
    n = jax.process_count()
    not_shared = (f"config.data.cache_dir={data_config.cache_dir!r} ({target}) is a folder local to each of the {n} "
                  f"hosts (it holds no tokenized corpus of {data_config.source!r} yet): set data.cache_dir to a "
                  "gs:// path, or set data.cache_shared=True if every host mounts it (NFS), or tokenize first "
                  "(python -m flax_gpt2.train.tokenize_corpus SOURCE OUT) and set data.source=OUT")
    remote = file_io.is_url(target)
    logging.info("tokenizing %s into %s on %d hosts, each its share", data_config.source, target, n)
    fix = FIX_REMOTE.format(url=target) if remote else FIX_CACHE.format(folder=target)
    th.tokenize_on_hosts(data_config.source, target, hosts=th.JaxHosts(), shared=data_config.cache_shared,
                         not_shared=not_shared, text_field=data_config.text_field, recipe=data_config.recipe,
                         split=data_config.split, dataset_config=data_config.dataset_config,
                         tokenizer=data_config.tokenizer, num_threads=data_config.num_threads, fix=fix,
                         pass_folder_as=TOKENIZER_FLAG)
    if remote:
        return _open_remote(target, data_config, mirror)
    return TokenStore(target, fix=FIX_CACHE)


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
    """The fixed windows of `seq_len + 1` tokens in `[start, stop)` of a token store; `scored`: with the
    store's loss mask packed into the ids (train/loss_mask.py)."""

    def __init__(self, store: TokenStore, start: int, stop: int, seq_len: int, scored: bool = False):
        self.store, self.start, self.seq_len, self.scored = store, start, seq_len, scored
        self.count = max(stop - start - 1, 0) // seq_len

    def _bounds(self, w: int) -> tuple[int, int]:
        return self.start + w * self.seq_len, self.start + (w + 1) * self.seq_len + 1

    def _span(self, w: int) -> np.ndarray:
        start, stop = self._bounds(w)
        tokens = self.store.read(start, stop)
        return loss_mask.pack(tokens, self.store.read(start, stop, self.store.masks)) if self.scored else tokens

    def read(self, window_ids: np.ndarray) -> np.ndarray:
        """`[..., seq_len + 1]` int32 tokens of the given windows."""
        spans = [self._bounds(int(w)) for w in window_ids.reshape(-1)]
        self.store.prefetch(spans)  # a remote store fetches every block of the batch at once
        if self.scored:
            self.store.prefetch(spans, self.store.masks)
        flat = [self._span(w) for w in window_ids.reshape(-1)]
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
            raise ValueError(f"the training split of the corpus {windows.store.folder} has {windows.count} windows "
                             f"of {windows.seq_len + 1} tokens, fewer than one batch of {batch_size}: use more data "
                             "(--config.data.source) or a smaller --config.batch_size or --config.data.seq_len")
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

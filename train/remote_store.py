"""A tokenized corpus on `gs://` (any fsspec URL) read in place, each host fetching only the bytes its rows need.

`data.remote_reads` picks how a remote corpus is read:

* `"range"` (default): `RemoteTokenStore` opens it with one read of `meta.json` and one listing of its folder,
  then fetches fixed-size blocks (`data.remote_block_bytes`) of the shards the host's windows touch, on first
  use, into a bounded LRU cache in memory (`data.remote_cache_bytes`). A batch's blocks are requested together
  (`prefetch`, fsspec's concurrent `cat_ranges`), so a step waits about one round trip, not one per row.
  Start-up time and local disk do not grow with the corpus; the bytes a host reads are those of its own rows,
  rounded up to whole blocks.
* `"mirror"`: the whole corpus is copied to local disk first (`mirror`) and memory-mapped (every host reads
  every byte once, and needs the disk for it).

What is read is checked as far as reading allows: `meta.json` as for a local corpus (`data.read_meta`), every
shard's object size against its token count before the first token is used, and each block as it arrives (its
length, every token id below the vocabulary, every loss-mask byte 0 or 1). A mismatch is a one-line
`CorpusError` naming the object and the fix.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading

import numpy as np

from flax_gpt2.utils import file_io
from flax_gpt2.utils.cache_root import cache_root

from .config_checks import ConfigValueError
from .data import FIX_CACHE, FIX_MIRROR, FIX_REMOTE, CorpusError, TokenStore, read_meta, shard_files, shard_path

REMOTE_READS = ("range", "mirror")
# The default of `data.remote_block_bytes`, 4 KiB: training windows are shuffled over the whole corpus, so nearly
# every row of a batch lands in blocks no other row touches, and a window of 1025 tokens (2050 bytes) costs its
# one or two blocks: 4-8 KiB read for it (64 KiB blocks: ~64 KiB, 32x; 8 MiB blocks: 2 GiB per 256-row step).
# Neighbouring blocks of a batch go out as one range request (`prefetch`), so a window is one request, and all
# of a batch's requests are issued together: a step waits about one round trip. Sequential reads (eval) coalesce
# into long ranges the same way.
BLOCK_BYTES = 4 << 10


def open_remote(url: str, data_config, folder: str | None = None) -> TokenStore:
    """The tokenized corpus at `url`, read as `data_config.remote_reads` says (`folder`: where a mirror goes)."""
    how = data_config.remote_reads
    if how == "mirror":
        return TokenStore(mirror(url, folder), fix=FIX_MIRROR.format(url=url, folder="{folder}"))
    if how != "range":
        raise ConfigValueError(f"config.data.remote_reads={how!r} must be one of {REMOTE_READS}: 'range' reads "
                               "only the blocks each host needs, 'mirror' copies the whole corpus to local disk")
    return RemoteTokenStore(url, cache_bytes=data_config.remote_cache_bytes, block_bytes=data_config.remote_block_bytes)


class BlockCache:
    """Fixed-size blocks of remote objects, least recently used dropped first, at most `capacity` bytes held.

    Counters: `bytes_read`/`blocks_read` (fetched from storage), `requests` (rounds of requests: one per block
    read alone, one per `prefetch`), `hits` (served from memory), `bytes_cached`.
    """

    def __init__(self, capacity: int, block_bytes: int):
        if not isinstance(capacity, int) or capacity < block_bytes:
            raise ConfigValueError(f"config.data.remote_cache_bytes={capacity!r} must be an integer of at least one "
                                   f"block ({block_bytes} bytes); the default is 2 GiB (2147483648)")
        self.capacity, self.block_bytes = capacity, block_bytes
        self._blocks: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self._lock = threading.Lock()  # the array callbacks of several devices may read at once
        self.bytes_read = self.blocks_read = self.hits = self.bytes_cached = self.requests = 0

    def __contains__(self, key: tuple[str, int]) -> bool:
        with self._lock:
            return key in self._blocks

    def get(self, key: tuple[str, int], fetch) -> bytes:
        """Block `key`, from memory or from `fetch()` (then kept, evicting the oldest blocks past `capacity`)."""
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                self.hits += 1
                return self._blocks[key]
            self.requests += 1
        return self.put(key, fetch())

    def count_request(self) -> None:
        """One more round of requests issued outside `get` (`RemoteTokenStore.prefetch`)."""
        with self._lock:
            self.requests += 1

    def put(self, key: tuple[str, int], block: bytes) -> bytes:
        """Keeps a block just fetched (counted in `bytes_read`), evicting the oldest past `capacity`."""
        with self._lock:
            self.bytes_read += len(block)
            self.blocks_read += 1
            if key not in self._blocks:
                self._blocks[key] = block
                self.bytes_cached += len(block)
            while self.bytes_cached > self.capacity:
                _, dropped = self._blocks.popitem(last=False)
                self.bytes_cached -= len(dropped)
        return block

    @property
    def blocks_cached(self) -> int:
        return len(self._blocks)


class RemoteShard:
    """One shard file (`uint16` tokens or `uint8` loss mask) as a read-only array: `len()` and `[a:b]` slices,
    fetched a block at a time through `cache` and checked as they arrive (ids `< limit`)."""

    def __init__(self, fs, path: str, url: str, count: int, dtype, limit: int, cache: BlockCache, fix: str):
        self.fs, self.path, self.url, self.count, self.dtype = fs, path, url, count, np.dtype(dtype)
        self.limit, self.cache, self.fix = limit, cache, fix
        self.nbytes = count * self.dtype.itemsize

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"a remote shard is read by contiguous slices, not {index!r}")
        start, stop, _ = index.indices(self.count)
        lo, hi, size = start * self.dtype.itemsize, stop * self.dtype.itemsize, self.cache.block_bytes
        parts = [self._block(b)[max(lo - b * size, 0):hi - b * size] for b in self.blocks(start, stop)]
        return np.frombuffer(b"".join(parts), self.dtype)

    def blocks(self, start: int, stop: int) -> range:
        """The block numbers holding items `[start, stop)`."""
        size, width = self.cache.block_bytes, self.dtype.itemsize
        return range(start * width // size, -(-stop * width // size)) if stop > start else range(0)

    def block_range(self, b: int) -> tuple[int, int]:
        """Byte offsets `[start, end)` of block `b` in the object (the last block is short)."""
        return b * self.cache.block_bytes, min((b + 1) * self.cache.block_bytes, self.nbytes)

    def _block(self, b: int) -> bytes:
        return self.cache.get((self.path, b), lambda: self.check(b, self.fs.cat_file(self.path, *self.block_range(b))))

    def check(self, b: int, raw: bytes) -> bytes:
        """Block `b` as fetched, checked: its full length, ids below the limit. Raises `CorpusError`."""
        start, end = self.block_range(b)
        if len(raw) != end - start:
            raise CorpusError(f"{self.url} gave {len(raw)} bytes at {start}..{end} of the {self.nbytes} it had when "
                              f"the corpus was opened: it was changed or truncated while in use; {self.fix}")
        values = np.frombuffer(raw, self.dtype)
        if values.size and int(values.max()) >= self.limit:
            at = start // self.dtype.itemsize + int(np.argmax(values >= self.limit))
            what = (f"token id {int(values.max())}, past the vocabulary of {self.limit} tokens its meta.json gives: "
                    "the corpus is damaged or was written with another tokenizer" if self.dtype == np.uint16 else
                    f"{int(values.max())}; a loss mask holds only 0 (not scored) and 1 (scored): the corpus is damaged")
            raise CorpusError(f"{self.url} holds {what} (near position {at}); {self.fix}")
        return raw


class RemoteTokenStore(TokenStore):
    """A `TokenStore` over a tokenized corpus at a URL, read in blocks on demand (see the module docstring).

    Same `read`, `len`, `identity`, `meta`, `masks` and `folder` (the URL) as a local store. `cache` holds the
    counters (`bytes_read`, `blocks_read`, `blocks_cached`, `bytes_cached`, `hits`, `requests`); `start_bytes` is
    what opening it read (meta.json).
    """

    def __init__(self, url: str, cache_bytes: int = 2 << 30, block_bytes: int = BLOCK_BYTES):
        if block_bytes % 2:
            raise ValueError(f"block_bytes={block_bytes} must be even (tokens are 2 bytes)")
        self.folder = url = url.rstrip("/")
        fix = FIX_REMOTE.format(url=url)
        meta_url = file_io.join(url, "meta.json")
        if not file_io.exists(meta_url):
            raise FileNotFoundError(f"{url!r} is not a tokenized corpus (no meta.json)")
        text = file_io.read_text(meta_url)
        self.start_bytes = len(text.encode())
        self.meta = read_meta(meta_url, fix, text=text)
        self.cache = BlockCache(cache_bytes, block_bytes)
        fs, root = file_io.filesystem(url)
        sizes = {fs._strip_protocol(p): info["size"] for p, info in fs.find(root, detail=True).items()}
        vocab = self.meta["vocab_size"]
        self.shards = [self._open(fs, sizes, i, "file", np.uint16, vocab, fix) for i in range(len(self.meta["shards"]))]
        self.masks = ([self._open(fs, sizes, i, "mask_file", np.uint8, 2, fix) for i in range(len(self.shards))]
                      if "loss_mask" in self.meta else None)
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.fs = fs

    def prefetch(self, spans: list[tuple[int, int]], arrays: list | None = None) -> None:
        """Fetches, all at once, the blocks of `[start, stop)` spans of the stream (or of `arrays`: `masks`) that
        the cache lacks, so that reading them next costs one round of concurrent requests."""
        arrays = self.shards if arrays is None else arrays
        wanted = {}
        for start, stop in spans:
            i = int(np.searchsorted(self.offsets, start, side="right")) - 1
            while start < stop:
                shard, base = arrays[i], int(self.offsets[i])
                end = min(stop, base + len(shard))
                for b in shard.blocks(start - base, end - base):
                    if (shard.path, b) not in self.cache:
                        wanted[(shard.path, b)] = (shard, b)
                start, i = end, i + 1
        if not wanted:
            return
        runs = []  # [shard, first block, last block]: neighbouring blocks of one file go out as one range
        for shard, b in sorted(wanted.values(), key=lambda sb: (sb[0].path, sb[1])):
            if runs and runs[-1][0] is shard and runs[-1][2] == b - 1:
                runs[-1][2] = b
            else:
                runs.append([shard, b, b])
        self.cache.count_request()
        starts = [shard.block_range(b)[0] for shard, b, _ in runs]
        ends = [shard.block_range(b)[1] for shard, _, b in runs]
        raws = self.fs.cat_ranges([shard.path for shard, _, _ in runs], starts, ends, on_error="raise")
        size = self.cache.block_bytes
        for (shard, first, last), raw in zip(runs, raws):
            for b in range(first, last + 1):
                part = raw[(b - first) * size:(b - first + 1) * size]
                self.cache.put((shard.path, b), shard.check(b, part))

    def _open(self, fs, sizes: dict, i: int, key: str, dtype, limit: int, fix: str) -> RemoteShard:
        url, count = shard_path(self.folder, self.meta, i, key), self.meta["shards"][i]["num_tokens"]
        path = fs._strip_protocol(url)
        size, want = sizes.get(path), count * np.dtype(dtype).itemsize
        if size != want:
            held = "is missing" if size is None else f"is {size} bytes"
            raise CorpusError(f"{url} {held} but {self.folder}/meta.json gives it {count} tokens ({want} bytes): the "
                              f"corpus is damaged (a truncated upload or an edited meta.json); {fix}")
        return RemoteShard(fs, path, url, count, dtype, limit, self.cache, fix)


def mirror(url: str, folder: str | None = None) -> str:
    """A local copy of a tokenized corpus at `url` (shards first, meta.json last: complete or absent).

    Every shard name in the bucket's meta.json is checked to stay inside the copy before a byte is written.
    """
    folder = folder or os.path.join(cache_root(), "remote", hashlib.sha256(url.encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    text = file_io.read_text(file_io.join(url, "meta.json"))
    meta = read_meta(file_io.join(url, "meta.json"), FIX_REMOTE.format(url=url), text=text)
    for i, shard in enumerate(meta["shards"]):
        for key, width in shard_files(meta, i):
            raw = file_io.read_bytes(shard_path(url, meta, i, key))
            if len(raw) != width * shard["num_tokens"]:
                raise CorpusError(f"{shard_path(url, meta, i, key)} is {len(raw)} bytes but {url}/meta.json gives "
                                  f"it {shard['num_tokens']} tokens; nothing was copied; {FIX_REMOTE.format(url=url)}")
            file_io.atomic_write(shard_path(folder, meta, i, key), raw)
    file_io.atomic_write(os.path.join(folder, "meta.json"), text)
    return folder


def upload(folder: str, url: str) -> None:
    """Copies a local tokenized corpus to `url` unless it is there already (meta.json last)."""
    if file_io.exists(file_io.join(url, "meta.json")):
        return
    text = file_io.read_text(os.path.join(folder, "meta.json"))
    meta = read_meta(os.path.join(folder, "meta.json"), FIX_CACHE.format(folder=folder), text=text)
    for i in range(len(meta["shards"])):
        for key, _ in shard_files(meta, i):
            with open(shard_path(folder, meta, i, key), "rb") as f:
                file_io.atomic_write(shard_path(url, meta, i, key), f.read())
    file_io.atomic_write(file_io.join(url, "meta.json"), text)

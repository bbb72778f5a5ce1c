"""Prefix caching: the KV of prompt prefixes already prefilled, kept by whole blocks of tokens and reused.

Requests that start alike (a system text, few-shot examples, an instruction) share their first tokens. The
engine splits each prompt into blocks of `block` tokens; block i of a prompt is keyed by the prompt's first
`(i + 1) * block` token ids (the whole prefix, not the block alone: a block's keys and values depend on every
token before it) and by the LoRA adapter (an adapter changes the keys and values). Its value is the block's
KV on the device (`slots.take_blocks`). A new prompt looks up its longest run of cached blocks, strictly
shorter than itself (at least one token is prefilled, to produce the logits of its first new token), and
only the rest is prefilled (`slots.prefill_after_prefix`). The tokens are the key itself, not a hash of
them, so two prefixes never collide.

Exactness: a token's keys and values depend only on it, the tokens before it and its position (position
ids count real tokens, left padding is masked), so the cached blocks are what a full prefill computes for
those positions, up to the order of float sums; greedy requests return the same tokens with the cache on and
off (tested), and the first logits agree to ~1e-6.

The bound is in bytes (`capacity`), least recently used first out. A block is useless without its parent,
so a lookup touches the deepest block first and the first block last: a parent is never less recent than
its children, eviction takes leaves first, and an entry with cached children is never evicted. Under device
memory pressure the engine drops the whole cache (`clear`) before it fails a request.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

Key = tuple  # (adapter, token ids of the whole prefix up to the end of the block)


@dataclasses.dataclass
class _Entry:
    value: Any  # the block's KV on the device
    nbytes: int
    children: int = 0  # cached blocks that extend this one


def out_of_memory(error: BaseException) -> bool:
    """Whether a device call failed for want of memory (XLA's RESOURCE_EXHAUSTED)."""
    return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


class PrefixCache:
    """A least-recently-used cache of prompt-prefix blocks, bounded by `capacity` bytes (0: off).

    Host bookkeeping only: the values are opaque (device arrays), each added with its size in bytes.
    """

    def __init__(self, block: int, capacity: int):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"the prefix cache's block must be a positive integer of tokens, got {block!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"the prefix cache's capacity must be a number of bytes >= 0 (0: off), got {capacity!r}")
        self.block, self.capacity = block, capacity
        self._entries: collections.OrderedDict[Key, _Entry] = collections.OrderedDict()  # oldest first
        self.bytes = 0
        self.hits = 0  # lookups that found at least one block
        self.hit_tokens = 0  # prompt tokens not prefilled again thanks to those hits
        self.evictions = 0  # blocks dropped to make room (or by `clear`)

    def __len__(self) -> int:
        return len(self._entries)

    def _key(self, adapter: int, ids: Sequence[int], i: int) -> Key:
        return (adapter, tuple(ids[:(i + 1) * self.block]))

    def lookup(self, adapter: int, ids: Sequence[int], min_blocks: int = 1) -> list[Any]:
        """The values of the longest run of cached blocks that starts `ids` and leaves at least one token
        after it, or `[]` when that run is shorter than `min_blocks` (what the caller can use). A run
        returned is touched (most recently used) and counted as a hit."""
        found, keys = [], []
        for i in range((len(ids) - 1) // self.block):
            key = self._key(adapter, ids, i)
            entry = self._entries.get(key)
            if entry is None:
                break
            found.append(entry.value)
            keys.append(key)
        if not found or len(found) < min_blocks:
            return []
        for key in reversed(keys):  # the parent last: never less recent than its children
            self._entries.move_to_end(key)
        self.hits += 1
        self.hit_tokens += len(found) * self.block
        return found

    def missing(self, adapter: int, ids: Sequence[int]) -> range:
        """The indices of the complete blocks of `ids` not cached (the first one and on: blocks are cached
        in order)."""
        complete = len(ids) // self.block
        first = 0
        while first < complete and self._key(adapter, ids, first) in self._entries:
            first += 1
        return range(first, complete)

    def add(self, adapter: int, ids: Sequence[int], first: int, values: Sequence[Any], nbytes: int) -> int:
        """Caches `values` as blocks `first`, `first + 1`, ... of `ids` (blocks before `first` must be cached),
        each `nbytes` bytes, evicting the least recently used blocks to make room; stops early when no room
        can be made (the bound is smaller than the chain). Returns how many were added."""
        if nbytes <= 0:
            raise ValueError(f"a block's size must be a positive number of bytes, got {nbytes}")
        chain = [self._key(adapter, ids, i) for i in range(first)]
        if any(key not in self._entries for key in chain):
            raise ValueError(f"block {first} of a prompt can only be cached after the blocks before it")
        protected = set(chain)
        added = 0
        for i, value in enumerate(values, start=first):
            key = self._key(adapter, ids, i)
            if key in self._entries:
                protected.add(key)
                chain.append(key)
                continue
            if not self._make_room(nbytes, protected):
                break
            self._entries[key] = _Entry(value, nbytes)
            self.bytes += nbytes
            if chain:
                self._entries[chain[-1]].children += 1
            protected.add(key)
            chain.append(key)
            added += 1
        for key in reversed(chain):  # restore the order: parents at least as recent as their children
            self._entries.move_to_end(key)
        return added

    def _make_room(self, nbytes: int, protected: set) -> bool:
        while self.bytes + nbytes > self.capacity:
            victim = next((k for k, e in self._entries.items() if e.children == 0 and k not in protected), None)
            if victim is None:
                return False
            self._drop(victim)
        return True

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes
        self.evictions += 1
        if len(key[1]) > self.block:
            parent = self._entries.get((key[0], key[1][:-self.block]))
            if parent is not None:
                parent.children -= 1

    def clear(self) -> int:
        """Drops every block (device memory is short); returns the bytes freed."""
        freed = self.bytes
        self.evictions += len(self._entries)
        self._entries.clear()
        self.bytes = 0
        return freed


def suffix_lengths(block: int, bucket: int) -> list[int]:
    """The lengths (compiled shapes) of the tail a prompt of bucket `bucket` prefills after a cached prefix:
    `block`, 4 `block`, 16 `block`, ... below `bucket`. Each is a compile per bucket at warm-up; a factor of 4
    keeps them few (64 and 256 for GPT-2's 1024-token bucket and 64-token blocks) at the price of recomputing up
    to 4x the uncached tail, which is short when the prefix is what repeats. A tail longer than the last
    one is prefilled whole."""
    lengths, n = [], block
    while n < bucket:
        lengths.append(n)
        n *= 4
    return lengths

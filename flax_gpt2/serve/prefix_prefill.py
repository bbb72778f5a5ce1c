"""The engine's prefill through the prefix cache: reuse the longest cached prefix of a prompt, prefill the rest,
cache the prompt's new complete blocks (`prefix_cache` holds the bookkeeping, `slots` the device programs).

Compiled shapes stay bounded: the cached blocks are passed as a fixed number per prompt bucket (`(P - 1) // B`,
padded with a repeated block that is never read), the tail prefilled after them is one of a few lengths per
bucket (`suffix_lengths`), and blocks are cut from a prefill by one program per bucket; `warm_up` compiles
them all, so a hit or a miss never compiles while serving.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2.modeling.model import GPT2LMHeadModel
from flax_gpt2.serve import slots as device
from flax_gpt2.serve.prefix_cache import PrefixCache, out_of_memory, suffix_lengths
from flax_gpt2.serve.requests import Stats

log = logging.getLogger("flax_gpt2.serve")


def kv_bytes_per_token(model: GPT2LMHeadModel) -> int:
    """Bytes of keys and values one token takes in the cache (all layers)."""
    c = model.config
    return 2 * c.n_layer * c.n_head * c.head_dim * jnp.dtype(c.dtype).itemsize


class PrefixPrefill:
    """Prefills prompts for one engine (its model, weights, output projection and adapter table), through a
    `PrefixCache` of `capacity` bytes (None: the KV of `default_rows` tokens; 0: off) and blocks of `block`
    tokens. Keeps the prefix fields of the engine's `stats` current.

    `chunk` > 0 (a multiple of `block`; the cache on) prefills long prompts in chunks (`chunk_ends`): each
    chunk is the prefill of a longer prefix of the prompt after a hit on the chunks before it, so a tail of
    `chunk` tokens is compiled per bucket beside `suffix_lengths`."""

    def __init__(self, model: GPT2LMHeadModel, params: Any, head: jax.Array, adapters: Any, stats: Stats,
                 block: int, capacity: int | None, default_rows: int, chunk: int = 0):
        if capacity is None:
            capacity = kv_bytes_per_token(model) * default_rows
        self.cache = PrefixCache(block, capacity)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0 or chunk % block:
            raise ValueError(f"the prefill chunk must be a multiple of the prefix block ({block} tokens) or 0 (off), "
                             f"got {chunk!r}")
        if chunk and not capacity:
            raise ValueError("a chunked prefill keeps its chunks in the prefix cache: it needs the cache on "
                             "(a prefix cache of more than 0 bytes)")
        self.chunk = chunk
        self.model, self.params, self.head, self.adapters, self.stats = model, params, head, adapters, stats

    def warm_up(self, ids: np.ndarray, mask: np.ndarray, prefilled) -> None:
        """Compiles the programs for one prompt bucket: cutting blocks (from `prefilled`, `prefill_prompt`'s
        output for `ids`, `mask`), and the prefill of each tail length after cached blocks."""
        b, p = self.cache.block, ids.shape[1]
        if not self.cache.capacity or p < b:
            return
        blocks = device.take_blocks(prefilled[1], prefilled[2], np.int32(p), b)
        for suffix in self.tails(p):
            jax.block_until_ready(device.prefill_after_prefix(
                self.model, self.params, self.head, blocks[:(p - 1) // b], ids, mask, suffix, self.adapters,
                np.int32(0)))

    def prefill(self, padded: np.ndarray, mask: np.ndarray, ids: list[int], adapter: int):
        """`slots.prefill_prompt(padded, mask)` for the prompt `ids` with LoRA adapter `adapter` (the same keys,
        values and logits, up to float rounding), computing only the tail after its longest usable cached
        prefix; then caches its complete blocks not cached yet."""
        cache, p = self.cache, padded.shape[1]
        b = cache.block
        tails = self.tails(p)
        # A hit is used only if the tail after it is at most the longest compiled one.
        blocks = cache.lookup(adapter, ids, min_blocks=-(-(len(ids) - tails[-1]) // b)) if tails else []
        if blocks:
            suffix = next(t for t in tails if t >= len(ids) - len(blocks) * b)
            filler = (blocks[0],) * ((p - 1) // b - len(blocks))
            out = self.with_memory(device.prefill_after_prefix, self.model, self.params, self.head,
                                   tuple(blocks) + filler, padded, mask, suffix, self.adapters, np.int32(adapter))
        else:
            out = self.with_memory(device.prefill_prompt, self.model, self.params, self.head, padded, mask,
                                   self.adapters, np.int32(adapter))
        missing = cache.missing(adapter, ids) if cache.capacity else range(0)
        if missing:
            taken = device.take_blocks(out[1], out[2], np.int32(len(ids)), b)
            cache.add(adapter, ids, missing.start, taken[missing.start:missing.stop], taken[0].nbytes)
        self._count()
        return out

    def tails(self, bucket: int) -> list[int]:
        """The tail lengths compiled for prompts of `bucket` (`suffix_lengths`, and the chunk when chunking)."""
        if not self.cache.capacity:
            return []
        lengths = suffix_lengths(self.cache.block, bucket)
        return sorted(set(lengths) | {self.chunk}) if 0 < self.chunk < bucket else lengths

    def chunk_ends(self, ids: list[int], adapter: int) -> list[int]:
        """Where the chunks of a chunked prefill of `ids` end, but the last: every multiple of the chunk shorter
        than the prompt whose blocks are not all cached already (none when not chunking). Prefilling `ids[:end]`
        for each in turn, then `ids`, leaves every one a tail of at most one chunk after a hit."""
        if not self.chunk:
            return []
        return [end for end in range(self.chunk, len(ids), self.chunk) if self.cache.missing(adapter, ids[:end])]

    def with_memory(self, program: Callable, *args):
        """Runs a device program; when the device runs out of memory while the prefix cache holds blocks, drops
        them all and runs it once more: cached prefixes are freed before any request fails for memory."""
        try:
            return program(*args)
        except Exception as e:
            if not out_of_memory(e) or not self.cache.bytes:
                raise
            log.warning("device memory exhausted: dropped the prefix cache (%d bytes); retrying", self.cache.clear())
            self._count()
            return program(*args)

    def _count(self) -> None:
        s, c = self.stats, self.cache
        s.prefix_hits, s.prefix_hit_tokens, s.prefix_evictions = c.hits, c.hit_tokens, c.evictions
        s.prefix_cache_bytes, s.prefix_cache_blocks = c.bytes, len(c)

"""The prefix cache's bookkeeping (longest run of blocks, bytes bound, least recently used out, leaves before
parents) and its device programs: a prefill after cached blocks equals a full prefill."""

import jax
import numpy as np
import pytest

from flax_gpt2.generation.model_step import output_projection
from flax_gpt2.modeling.config import GPT2Config
from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params
from flax_gpt2.serve import slots as device
from flax_gpt2.serve.prefix_cache import PrefixCache, out_of_memory, suffix_lengths

B = 4  # tokens per block in the bookkeeping tests


def _fill(cache, ids, adapter=0, nbytes=10):
    """Caches every complete block of `ids` not cached yet, each value naming its block."""
    missing = cache.missing(adapter, ids)
    values = [f"{adapter}:{tuple(ids[:(i + 1) * B])}" for i in missing]
    return cache.add(adapter, ids, missing.start, values, nbytes)


def test_lookup_finds_the_longest_run_of_blocks_shorter_than_the_prompt():
    cache = PrefixCache(B, 1000)
    ids = list(range(12))
    assert _fill(cache, ids) == 3 and cache.bytes == 30 and len(cache) == 3
    # The whole 12-token prompt is 3 blocks, but one token must be left to prefill: 2 blocks.
    assert cache.lookup(0, ids) == [f"0:{tuple(ids[:4])}", f"0:{tuple(ids[:8])}"]
    assert len(cache.lookup(0, ids + [99])) == 3
    assert len(cache.lookup(0, ids[:8] + [7, 7, 7, 7, 7])) == 2  # differs in block 3
    assert cache.lookup(0, [1] + ids[1:]) == []  # differs in the first token: no block matches
    assert cache.lookup(1, ids + [99]) == []  # another adapter's keys and values differ
    assert cache.lookup(0, ids[:4]) == []  # 4 tokens: no block can leave one to prefill
    assert cache.hits == 3 and cache.hit_tokens == 8 + 12 + 8


def test_min_blocks_refuses_a_short_run_without_counting_or_touching_it():
    cache = PrefixCache(B, 30)
    _fill(cache, list(range(8)))
    _fill(cache, [50] * 4)
    assert cache.lookup(0, list(range(9)), min_blocks=3) == [] and cache.hits == 0
    _fill(cache, [60] * 4)  # evicts the least recently used leaf: block 2 of range(8), not touched above
    assert len(cache.lookup(0, list(range(9)))) == 1


def test_the_bound_in_bytes_evicts_least_recently_used_leaves_first():
    cache = PrefixCache(B, 50)
    a, b = list(range(8)), list(range(100, 108))  # 2 blocks each
    _fill(cache, a)
    _fill(cache, b)
    assert cache.bytes == 40
    cache.lookup(0, a + [1])  # a is now the most recently used
    c = list(range(200, 212))  # 3 blocks: needs 30 bytes, 10 free: b's two blocks go (leaf first, then root)
    assert _fill(cache, c) == 3
    assert cache.bytes == 50 and cache.evictions == 2
    assert cache.lookup(0, b + [1]) == [] and len(cache.lookup(0, a + [1])) == 2
    assert len(cache.lookup(0, c + [1])) == 3


def test_a_parent_is_never_evicted_before_its_children():
    cache = PrefixCache(B, 30)
    shared = list(range(4))
    _fill(cache, shared + [10, 11, 12, 13])  # root + child 1
    _fill(cache, shared + [20, 21, 22, 23])  # child 2 (the root is reused)
    assert len(cache) == 3
    _fill(cache, [7] * 4)  # room for one: the least recent leaf (child 1) goes, the shared root stays
    assert len(cache.lookup(0, shared + [10, 11, 12, 13, 0])) == 1
    assert len(cache.lookup(0, shared + [20, 21, 22, 23, 0])) == 2


def test_a_chain_longer_than_the_bound_is_cached_as_far_as_it_fits():
    cache = PrefixCache(B, 25)
    assert _fill(cache, list(range(16))) == 2  # 4 blocks of 10 bytes, room for 2; its own chain is kept
    assert len(cache.lookup(0, list(range(16)))) == 2 and cache.bytes == 20


def test_zero_bytes_caches_nothing_and_clear_frees_everything():
    off = PrefixCache(B, 0)
    assert _fill(off, list(range(8))) == 0 and off.bytes == 0
    cache = PrefixCache(B, 100)
    _fill(cache, list(range(8)))
    assert cache.clear() == 20 and cache.bytes == 0 and len(cache) == 0 and cache.evictions == 2
    assert cache.lookup(0, list(range(9))) == []


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="capacity must be a number of bytes >= 0"):
        PrefixCache(B, -1)
    with pytest.raises(ValueError, match="block must be a positive integer"):
        PrefixCache(0, 10)
    cache = PrefixCache(B, 100)
    with pytest.raises(ValueError, match="only be cached after the blocks before it"):
        cache.add(0, list(range(8)), 1, ["x"], 10)


def test_suffix_lengths_and_out_of_memory():
    assert suffix_lengths(64, 1024) == [64, 256]
    assert suffix_lengths(16, 128) == [16, 64] and suffix_lengths(64, 64) == []
    assert out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"))
    assert not out_of_memory(RuntimeError("INVALID_ARGUMENT: shapes"))


# ---- the device programs ----

@pytest.fixture(scope="module")
def tiny():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4))
    params = init_params(model, jax.random.PRNGKey(0))
    # Random biases and larger weights than a fresh init (whose zero biases hide mix-ups).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params, output_projection(model, params)


def _left_padded(ids, p):
    padded, mask = np.zeros((1, p), np.int32), np.zeros((1, p), np.int32)
    padded[0, p - len(ids):], mask[0, p - len(ids):] = ids, 1
    return padded, mask


@pytest.mark.parametrize("cached_from, prompt_len, suffix", [(53, 55, 16), (53, 55, 64), (20, 70, 64), (99, 120, 64)])
def test_a_prefill_after_cached_blocks_equals_a_full_prefill(tiny, cached_from, prompt_len, suffix):
    """Blocks cut from one prompt's prefill (`take_blocks`), reused for another prompt with the same start in
    another bucket and padding: its logits, keys and values equal its own full prefill's to 1e-5."""
    model, params, head = tiny
    block, p = 16, (64 if prompt_len <= 64 else 128)
    rng = np.random.RandomState(prompt_len)
    first = rng.randint(0, 512, max(cached_from, prompt_len)).tolist()
    first_p = 64 if cached_from <= 64 else 128
    padded, mask = _left_padded(first[:cached_from], first_p)
    out = device.prefill_prompt(model, params, head, padded, mask)
    blocks = device.take_blocks(out[1], out[2], np.int32(cached_from), block)
    k = min(cached_from // block, (prompt_len - 1) // block)
    assert prompt_len - k * block <= suffix
    ids = first[:k * block] + rng.randint(0, 512, prompt_len - k * block).tolist()
    padded, mask = _left_padded(ids, p)
    filler = (blocks[0],) * ((p - 1) // block - k)
    got = device.prefill_after_prefix(model, params, head, tuple(blocks[:k]) + filler, padded, mask, suffix)
    want = device.prefill_prompt(model, params, head, padded, mask)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    real = slice(p - prompt_len, p)  # the padding's columns differ and are masked
    for g, w in zip(got[1] + got[2], want[1] + want[2]):
        np.testing.assert_allclose(np.asarray(g)[:, :, real], np.asarray(w)[:, :, real], atol=1e-5, rtol=1e-5)
    assert np.argmax(got[0]) == np.argmax(want[0])


def test_out_of_device_memory_drops_the_cache_and_retries_once(tiny):
    """A device program that fails for memory (XLA's RESOURCE_EXHAUSTED, injected once) runs again after the
    cached blocks are dropped; another error, or one with nothing cached to free, is raised as it was."""
    from flax_gpt2.serve.prefix_prefill import PrefixPrefill
    from flax_gpt2.serve.requests import Stats

    model, params, head = tiny
    stats = Stats()
    prefixes = PrefixPrefill(model, params, head, None, stats, 16, None, default_rows=2 * 128)
    assert prefixes.cache.capacity == 2 * 128 * 2 * 2 * 64 * 4  # the KV of 2 rows of 128 tokens
    ids = np.random.RandomState(3).randint(0, 512, 40).tolist()
    prefixes.prefill(*_left_padded(ids, 64), ids, 0)
    assert stats.prefix_cache_blocks == 2 and stats.prefix_cache_bytes == 2 * 16 * 2 * 2 * 64 * 4
    failures = [RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")]

    def program(x):
        if failures:
            raise failures.pop()
        return x + 1

    assert prefixes.with_memory(program, 1) == 2
    assert prefixes.cache.bytes == 0 and stats.prefix_cache_bytes == 0 and stats.prefix_evictions == 2
    failures.append(RuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):  # nothing left to free
        prefixes.with_memory(program, 1)
    prefixes.prefill(*_left_padded(ids, 64), ids, 0)
    failures.append(ValueError("INVALID_ARGUMENT"))
    with pytest.raises(ValueError):
        prefixes.with_memory(program, 1)
    assert prefixes.cache.bytes > 0

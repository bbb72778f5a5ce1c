"""The two model calls every decoding strategy makes: prefill a left-padded prompt, and one cached step.

Both return logits for the last position only (`[B, V]`), so the prefill never builds `[B, T, V]`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flax_gpt2.generation.logits_processors import limit_vocab
from flax_gpt2.modeling.kv_cache import KVCache
from flax_gpt2.modeling.model import GPT2LMHeadModel, output_logits

Array = jax.Array


def output_projection(model: GPT2LMHeadModel, params: Any, vocab_limit: int | None = None) -> Array:
    """The `[D, V]` matrix that maps the last hidden state to logits: `wte` transposed (tied embeddings) or
    the `lm_head` kernel; with `vocab_limit`, only its first `vocab_limit` columns (`limit_vocab`: ids
    the tokenizer cannot decode get no logit, so no strategy can choose them).

    Decoding transposes the tied embedding once per call, outside the loop: XLA's CPU dot is ~10% faster
    per step with a plain `[B, D] x [D, V]` product than with the transposed `[V, D]` operand inside the step.
    """
    if model.config.tie_word_embeddings:
        head = params["transformer"]["wte"]["embedding"].T
    else:
        head = params["lm_head"]["kernel"]
    return limit_vocab(head, vocab_limit)


def forward(model: GPT2LMHeadModel, params: Any, head: Array, input_ids: Array, attention_mask: Array,
            position_ids: Array, cache: KVCache, *, last_only: bool = True) -> tuple[Array, KVCache]:
    """Runs `input_ids [B, T]` through the model with `cache`; returns the last position's logits `[B, V]`
    (float32; every position's, `[B, T, V]`, with `last_only=False`) and the updated cache. `attention_mask` is
    `[B, S]` over every cache slot; `head` is `output_projection(model, params, vocab_limit)` (V is its width)."""

    def last_hidden(module, *args):
        out = module.transformer(*args)
        return (out.last_hidden_state[:, -1] if last_only else out.last_hidden_state), out.cache

    hidden, cache = model.apply({"params": params}, input_ids, attention_mask, position_ids, None, cache,
                                method=last_hidden)
    return output_logits(hidden, head, model.config.dtype), cache  # the same math as the model's own logits


def prefill(model: GPT2LMHeadModel, params: Any, head: Array, input_ids: Array, attention_mask: Array,
            cache_len: int) -> tuple[Array, KVCache, Array, Array]:
    """Encodes a left-padded prompt into a fresh cache of `cache_len` slots.

    Args:
      input_ids: `[B, T]` prompt, left-padded.
      attention_mask: `[B, T]`, 1 on prompt tokens and 0 on the left padding.
      cache_len: cache slots S (>= T); slot i holds the token at buffer column i.
    Returns:
      `(logits [B, V], cache, mask [B, S], lengths [B])`: next-token logits, the filled cache, the attention
      mask over all S slots (the slots after the prompt are 1; the causal mask hides the unwritten ones),
      and each row's number of prompt tokens, which is also the position id of its first new token.
    """
    b, t = input_ids.shape
    mask = attention_mask.astype(jnp.int32)
    # Position ids count real tokens only, so a left-padded row sees the positions it would see alone.
    position_ids = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    full_mask = jnp.concatenate([mask, jnp.ones((b, cache_len - t), jnp.int32)], axis=1)
    cache = KVCache.init(model.config, b, cache_len)
    logits, cache = forward(model, params, head, input_ids, full_mask, position_ids, cache)
    return logits, cache, full_mask, mask.sum(axis=1)


def repeat_rows(tree: Any, n: int) -> Any:
    """Repeats every array's rows `n` times in place (`[a, b] -> [a, a, b, b]`), like `repeat_interleave`;
    scalars (such as the cache index) are left alone."""
    if n == 1:
        return tree
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0) if x.ndim else x, tree)


def take_rows(tree: Any, rows: Array) -> Any:
    """Gathers rows `[N]` of every array in `tree` (beam reordering); scalars are left alone."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0) if x.ndim else x, tree)

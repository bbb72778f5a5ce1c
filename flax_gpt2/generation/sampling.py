"""Greedy and sampled decoding: a jitted prefill, then a `lax.while_loop` over a preallocated KV cache.

`generate_tokens` is the whole thing as one compiled computation. `start` and `decode` are its two halves,
compiled separately so that streaming can run the loop a few tokens at a time (`decode` stops at
`stop_at`) while the cache stays on the device between calls (it is donated).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from flax_gpt2.generation.logits_processors import GenerationConfig
from flax_gpt2.generation.model_step import forward, prefill, repeat_rows
from flax_gpt2.modeling.kv_cache import KVCache
from flax_gpt2.modeling.model import GPT2LMHeadModel

Array = jax.Array


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries; rows are prompts (times `num_return_sequences`)."""

    tokens: Array  # [B, S] int32: the left-padded prompt in slots < prompt_len, then the new tokens
    attention_mask: Array  # [B, S] int32: 0 on left padding, 1 elsewhere
    lengths: Array  # [B] int32: real prompt tokens per row (= position id of the first new token)
    cache: KVCache
    logits: Array  # [B, V] float32: logits for the token in slot prompt_len + step
    step: Array  # int32 scalar: new tokens chosen so far
    finished: Array  # [B] bool: the row has produced EOS (later slots hold the pad id)
    key: Array  # PRNG key; step i samples with fold_in(key, i)
    eos_token_id: Array  # int32 scalar; -1 when there is none
    pad_token_id: Array  # int32 scalar
    prompt_len: int = flax.struct.field(pytree_node=False)


def _choose(state: DecodeState, sampling: GenerationConfig) -> DecodeState:
    """Picks the token for slot prompt_len + step from `state.logits` and writes it to the buffer."""
    slot = state.prompt_len + state.step
    history = state.attention_mask.astype(bool) & (jnp.arange(state.tokens.shape[1]) < slot)[None, :]
    token = sampling.choose(state.logits, state.tokens, history, slot, jax.random.fold_in(state.key, state.step))
    token = jnp.where(state.finished, state.pad_token_id, token)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], slot, axis=1)
    return state.replace(tokens=tokens, finished=state.finished | (token == state.eos_token_id),
                         step=state.step + 1)


def _advance(model: GPT2LMHeadModel, params: Any, head: Array, state: DecodeState) -> DecodeState:
    """Feeds the last chosen token through the model; its k/v go to cache slot prompt_len + step - 1."""
    slot = state.prompt_len + state.step - 1
    token = jax.lax.dynamic_slice_in_dim(state.tokens, slot, 1, axis=1)
    positions = (state.lengths + state.step - 1)[:, None]
    logits, cache = forward(model, params, head, token, state.attention_mask, positions, state.cache)
    return state.replace(logits=logits, cache=cache)


@functools.partial(jax.jit, static_argnames=("model", "cache_len", "num_return_sequences"))
def start(model: GPT2LMHeadModel, params: Any, head: Array, input_ids: Array, attention_mask: Array,
          sampling: GenerationConfig, eos_token_id: Array, pad_token_id: Array, seed: Array, *,
          cache_len: int, num_return_sequences: int = 1) -> DecodeState:
    """Prefills the left-padded prompt `[B, T]` and chooses the first new token. `head` is
    `output_projection(model, params)`.

    Returns the state for `decode`, with `B * num_return_sequences` rows (each prompt's copies adjacent).
    """
    b, t = input_ids.shape
    logits, cache, mask, lengths = prefill(model, params, head, input_ids, attention_mask, cache_len)
    tokens = jnp.concatenate([input_ids.astype(jnp.int32),
                              jnp.broadcast_to(pad_token_id.astype(jnp.int32), (b, cache_len - t))], axis=1)
    # The prompt is encoded once; its copies for num_return_sequences share the prefill.
    tokens, mask, lengths, cache, logits = repeat_rows((tokens, mask, lengths, cache, logits), num_return_sequences)
    state = DecodeState(tokens=tokens, attention_mask=mask, lengths=lengths, cache=cache, logits=logits,
                        step=jnp.int32(0), finished=jnp.zeros(tokens.shape[0], bool),
                        key=jax.random.PRNGKey(seed), eos_token_id=eos_token_id.astype(jnp.int32),
                        pad_token_id=pad_token_id.astype(jnp.int32), prompt_len=t)
    return _choose(state, sampling)


def _decode(model, params, head, state: DecodeState, sampling: GenerationConfig, stop_at: Array) -> DecodeState:
    def running(state):
        return (state.step < stop_at) & ~jnp.all(state.finished)

    def body(state):
        return _choose(_advance(model, params, head, state), sampling)

    return jax.lax.while_loop(running, body, state)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("state",))
def decode(model: GPT2LMHeadModel, params: Any, head: Array, state: DecodeState, sampling: GenerationConfig,
           stop_at: Array) -> DecodeState:
    """Runs the loop until `state.step == stop_at` or every row has finished; returns the new state.

    The state is donated: its cache is updated in place, so do not reuse the `state` passed in.
    """
    return _decode(model, params, head, state, sampling, stop_at)


@functools.partial(jax.jit, static_argnames=("model", "cache_len", "num_return_sequences"))
def generate_tokens(model: GPT2LMHeadModel, params: Any, head: Array, input_ids: Array, attention_mask: Array,
                    sampling: GenerationConfig, eos_token_id: Array, pad_token_id: Array, seed: Array,
                    max_new_tokens: Array, *, cache_len: int, num_return_sequences: int = 1) -> Array:
    """Prefill and the whole decode loop in one computation; returns the token buffer `[B, S]`.

    Slots `< T` hold the prompt, the next `max_new_tokens` the new tokens (the pad id after EOS). `head`
    is `output_projection(model, params)`.
    """
    state = start(model, params, head, input_ids, attention_mask, sampling, eos_token_id, pad_token_id, seed,
                  cache_len=cache_len, num_return_sequences=num_return_sequences)
    return _decode(model, params, head, state, sampling, max_new_tokens).tokens

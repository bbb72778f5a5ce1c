"""Beam search (and beam sampling) in one jitted `lax.while_loop`, step for step the algorithm of
transformers' `GenerationMixin._beam_search` (the vectorized version of transformers >= 4.50).

Per prompt it keeps `num_beams` running beams and the `num_beams` best finished hypotheses. Each step takes
the top `2 * num_beams` continuations of all running beams (so that enough survive when some end in EOS);
those that end (EOS, or the length limit) compete for the finished slots with score
`sum of log-probs / new_tokens ** length_penalty`, the others become the next running beams. A prompt stops
when no running beam can beat its worst finished hypothesis (HF's `early_stopping=False` heuristic).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from flax_gpt2.generation.logits_processors import GenerationConfig
from flax_gpt2.generation.model_step import forward, prefill, repeat_rows, take_rows
from flax_gpt2.modeling.kv_cache import KVCache
from flax_gpt2.modeling.model import GPT2LMHeadModel

Array = jax.Array
_NEG = -1.0e9  # HF's "impossible" score


@flax.struct.dataclass
class BeamState:
    running: Array  # [N, M, S] int32 running beams (N prompts, M = num_beams); slot layout as in sampling
    running_scores: Array  # [N, M] float32 summed log-probs, best first
    finished: Array  # [N, M, S] int32 best finished hypotheses
    finished_scores: Array  # [N, M] float32 length-penalized scores (-1e9 for an empty slot)
    is_finished: Array  # [N, M] bool: the finished slot holds a hypothesis
    improvable: Array  # [N] bool: a running beam may still beat the worst finished hypothesis
    all_ended: Array  # bool: every candidate of the last step ended (nothing left to continue)
    attention_mask: Array  # [N * M, S]
    lengths: Array  # [N * M]
    cache: KVCache  # rows N * M
    logits: Array  # [N * M, V]
    step: Array  # int32: new tokens so far
    key: Array


def _select(state: BeamState, sampling: GenerationConfig, length_penalty: Array, eos_token_id: Array,
            max_new_tokens: Array, prompt_len: int) -> tuple[BeamState, Array]:
    """One beam step on `state.logits`; returns the new state and, per new running beam, the flat row
    `[N * M]` it continues (for reordering the cache)."""
    n, m, s = state.running.shape
    v = state.logits.shape[-1]
    slot = prompt_len + state.step
    flat_running = state.running.reshape(n * m, s)
    history = state.attention_mask.astype(bool) & (jnp.arange(s) < slot)[None, :]
    # HF processes log-probs, not logits; warpers keep >= 2 tokens so that a beam can avoid EOS.
    log_probs = jax.nn.log_softmax(state.logits, axis=-1)
    log_probs = sampling.process(log_probs, flat_running, history, slot, min_tokens_to_keep=2)
    scores = (log_probs.reshape(n, m, v) + state.running_scores[:, :, None]).reshape(n, m * v)

    k = 2 * m
    if sampling.do_sample:
        # Sampling k candidates without replacement from softmax(scores): the Gumbel top-k trick.
        gumbel = jax.random.gumbel(jax.random.fold_in(state.key, state.step), scores.shape)
        perturbed, top = jax.lax.top_k(scores + gumbel, k)
        top_scores = jnp.take_along_axis(scores, top, axis=1)
        # A NaN-propagating use of `perturbed`: with one output dead, XLA CPU turns top_k into a full sort.
        top_scores = jnp.where(jnp.isnan(perturbed), jnp.nan, top_scores)
    else:
        top_scores, top = jax.lax.top_k(scores, k)
    top_beam, top_token = top // v, (top % v).astype(jnp.int32)
    candidates = jnp.take_along_axis(state.running, top_beam[:, :, None], axis=1)
    candidates = jax.lax.dynamic_update_slice_in_dim(candidates, top_token[:, :, None], slot, axis=2)
    ended = (top_token == eos_token_id) | (state.step + 1 >= max_new_tokens)  # [N, k]

    # The best candidates that did not end continue as running beams.
    running_scores, keep = jax.lax.top_k(top_scores + ended * _NEG, m)
    running = jnp.take_along_axis(candidates, keep[:, :, None], axis=1)
    source_rows = (jnp.take_along_axis(top_beam, keep, axis=1) + jnp.arange(n)[:, None] * m).reshape(n * m)

    # Candidates among the first M that ended compete with the finished hypotheses.
    just_ended = ended & (jnp.arange(k) < m)[None, :]
    penalized = top_scores / ((state.step + 1).astype(jnp.float32) ** length_penalty)
    penalized = penalized + (~state.improvable[:, None]) * _NEG + (~just_ended) * _NEG
    merged_scores = jnp.concatenate([state.finished_scores, penalized], axis=1)
    finished_scores, best = jax.lax.top_k(merged_scores, m)
    finished = jnp.take_along_axis(jnp.concatenate([state.finished, candidates], axis=1), best[:, :, None], axis=1)
    is_finished = jnp.take_along_axis(jnp.concatenate([state.is_finished, just_ended], axis=1), best, axis=1)

    # HF's early_stopping=False heuristic: can the best running beam, scored at its current length, still
    # beat the worst finished hypothesis?
    step = state.step + 1
    best_possible = running_scores[:, :1] / (step.astype(jnp.float32) ** length_penalty)
    worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)
    improvable = state.improvable & jnp.any(best_possible > worst_finished, axis=1)
    state = state.replace(running=running, running_scores=running_scores, finished=finished,
                          finished_scores=finished_scores, is_finished=is_finished, improvable=improvable,
                          all_ended=jnp.all(ended), step=step)
    return state, source_rows


@functools.partial(jax.jit, static_argnames=("model", "cache_len", "num_beams", "num_return_sequences"))
def beam_search_tokens(model: GPT2LMHeadModel, params: Any, head: Array, input_ids: Array, attention_mask: Array,
                       sampling: GenerationConfig, length_penalty: Array, eos_token_id: Array, pad_token_id: Array,
                       seed: Array, max_new_tokens: Array, *, cache_len: int, num_beams: int,
                       num_return_sequences: int) -> Array:
    """Beam search over a left-padded prompt `[N, T]`; returns the best `num_return_sequences`
    hypotheses of each prompt as a token buffer `[N * num_return_sequences, S]` (pad id after the end).
    `head` is `output_projection(model, params)`."""
    n, t = input_ids.shape
    m = num_beams
    logits, cache, mask, lengths = prefill(model, params, head, input_ids, attention_mask, cache_len)
    buffer = jnp.concatenate([input_ids.astype(jnp.int32),
                              jnp.broadcast_to(pad_token_id.astype(jnp.int32), (n, cache_len - t))], axis=1)
    mask, lengths, cache, logits = repeat_rows((mask, lengths, cache, logits), m)
    running = jnp.broadcast_to(buffer[:, None], (n, m, cache_len))
    # Only the first beam starts alive, so that the first step does not pick the same token M times.
    running_scores = jnp.where(jnp.arange(m) == 0, 0.0, _NEG) * jnp.ones((n, 1), jnp.float32)
    state = BeamState(
        running=running, running_scores=running_scores, finished=running,
        finished_scores=jnp.full((n, m), _NEG, jnp.float32), is_finished=jnp.zeros((n, m), bool),
        improvable=jnp.ones((n,), bool), all_ended=jnp.bool_(False), attention_mask=mask, lengths=lengths,
        cache=cache, logits=logits, step=jnp.int32(0), key=jax.random.PRNGKey(seed))
    eos_token_id = eos_token_id.astype(jnp.int32)

    def select(state):
        return _select(state, sampling, length_penalty, eos_token_id, max_new_tokens, t)

    def running_cond(carry):
        state, _ = carry
        return (state.step < max_new_tokens) & jnp.any(state.improvable) & ~state.all_ended

    def body(carry):
        state, source_rows = carry
        # Reorder the cache to the surviving beams, then feed each its newest token.
        cache = take_rows(state.cache, source_rows)
        slot = t + state.step - 1
        token = jax.lax.dynamic_slice_in_dim(state.running.reshape(n * m, cache_len), slot, 1, axis=1)
        positions = (state.lengths + state.step - 1)[:, None]
        logits, cache = forward(model, params, head, token, state.attention_mask, positions, cache)
        return select(state.replace(cache=cache, logits=logits))

    state, _ = jax.lax.while_loop(running_cond, body, select(state))
    return state.finished[:, :num_return_sequences].reshape(n * num_return_sequences, cache_len)

"""Exact speculative decoding: a cheap proposer guesses `k` tokens, the target model checks them all in one
call, and the rule below keeps exactly what the target alone would have produced.

Proposers: a smaller draft model of the same vocabulary (any GPT-2 depth/width), or prompt lookup (the
tokens that followed the most recent earlier occurrence of the last n-gram, no second model).

Exactness:
  * greedy: a drafted token is kept while it equals the target's argmax, and the first mismatch is replaced
    by that argmax; so the output is the target's greedy decoding token for token (up to float rounding of
    a k+1-token step against a 1-token step, which can only matter at exact logit ties).
  * sampling: draft token x (drawn from q) is kept with probability min(1, p(x) / q(x)); at the first
    rejection the token is drawn from norm(max(0, p - q)); when all proposals are kept, one more token is
    drawn from p (the bonus). This is the rule of Leviathan et al. (2023) and Chen et al. (2023); every
    emitted token is distributed as p. `p` and `q` are the softmax of the *warped* logits (the project's
    temperature, top-k and top-p processors, `GenerationConfig.warp`), so `p` is exactly the distribution
    `generate` samples from. Prompt lookup proposes deterministically (q is a point mass), where the same
    rule keeps x with probability p(x).

`num_draft_tokens` (k) fixes the shapes: every round verifies k + 1 positions, so one compiled loop serves
every acceptance length; k around 3-5 suits a draft ~10x cheaper than the target, and more pays only when
the acceptance rate is high (a round costs about one target step plus k draft steps and yields 1 + the
number of accepted tokens). With `draft_schedule="constant"` every round drafts k tokens. With
`draft_schedule="heuristic"` (transformers' assisted-generation rule, capped at k because k fixes the
shapes) the first round drafts k, and each next round drafts n + 2 (at most k) when every running row kept
all n proposals of this round, else max(1, n - 1): a draft that keeps failing costs fewer wasted draft steps,
one that keeps succeeding is asked for more. The schedule changes only how many tokens are proposed, never
which are kept, so the output is the same under either. It applies to a draft model only (prompt lookup's
proposals cost nothing to make).

Layout (one jitted `lax.while_loop`, nothing recompiled per step or per acceptance length):
  * the token buffer `[B, M]` holds the left-padded prompt in columns `< P`, then the new tokens; row b has
    made `made[b]` of them, and its last token (column `P + made - 1`, "pending") is not yet in any cache;
  * each model has one KV cache of `M + k + 1` slots: slot c < M caches the token of column c, and the last
    k + 1 slots are scratch. The model call of a round writes its new keys/values to the scratch slots
    (a shared cache index, as the model requires) and then each row copies them to its own columns; the
    per-row attention mask over `[0, M)` marks which columns each row has cached. Rejected tokens are
    "rewound" simply by leaving them outside that mask: the next round overwrites them.
  * the target caches columns `< P + made - 1`; the draft one column less, and its first step of each round
    feeds two tokens (the one before the pending token, and the pending one), so that no matter how many
    proposals were kept, the draft has every key/value it needs with a fixed-shape step.

Why one file: the round (propose, verify, accept, rewind) keeps per-row cache bookkeeping for two models whose
invariants only hold together; split, each half would be unreadable without the other.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2.generation.logits_processors import GenerationConfig, argmax, draw_tokens
from flax_gpt2.generation.options import GenerateOptions
from flax_gpt2.generation.prompts import output_head, prepare_prompts
from flax_gpt2.modeling.kv_cache import KVCache
from flax_gpt2.modeling.model import GPT2LMHeadModel, output_logits, unwrap_params
from flax_gpt2.utils.validation import is_int

Array = jax.Array

# The acceptance rules the loop can run. Only "rejection" is exact. The others are wrong on purpose, so that
# the distribution test can show it detects a wrong rule: "always" keeps every proposal; "resample_target"
# applies the right test but draws a rejected token from p instead of norm(max(0, p - q)) (a classic bug).
_ACCEPTANCE_RULES = ("rejection", "always", "resample_target")
DRAFT_SCHEDULES = ("constant", "heuristic")


@flax.struct.dataclass
class SpeculativeState:
    """What the loop carries. Columns are the token buffer's; rows are prompts."""

    tokens: Array  # [B, M] int32: left-padded prompt in columns < P, then the new tokens (pad after EOS)
    made: Array  # [B] int32: new tokens so far (capped at max_new_tokens); the pending column is P + made - 1
    finished: Array  # [B] bool: produced EOS or max_new_tokens
    target_cache: KVCache
    draft_cache: KVCache | None
    rounds: Array  # int32 scalar: verification rounds run (round r draws with fold_in(key, r))
    proposed: Array  # [B] int32: valid proposals checked while the row was running
    accepted: Array  # [B] int32: proposals kept while the row was running
    active_rounds: Array  # [B] int32: rounds in which the row was running
    draft_tokens: Array  # int32 scalar: proposals the next round drafts (k, or as the schedule adapts it)
    kept_counts: Array  # [B, k + 1] int32: running rounds that kept 0, 1, ..., k proposals


def _cache(config, batch: int, slots: int) -> KVCache:
    """An empty cache of `slots` slots. Built directly: slots are buffer columns plus scratch, not positions,
    so there may be more of them than `n_positions` (position ids are passed separately and clipped)."""
    shape = (batch, config.n_head, slots, config.head_dim)
    zeros = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.n_layer))
    return KVCache(keys=zeros, values=tuple(jnp.zeros(shape, config.dtype) for _ in range(config.n_layer)),
                   index=jnp.zeros((), jnp.int32))


def _run(model: GPT2LMHeadModel, params: Any, head: Array | None, input_ids: Array, attention_mask: Array,
         position_ids: Array, cache: KVCache, *, last_only: bool = False) -> tuple[Array | None, KVCache]:
    """The model over `input_ids [B, T]` with `cache`: logits `[B, T, V]` for every position (`[B, V]` for
    the last one with `last_only`; None without `head`) and the updated cache."""

    def hidden(module, *args):
        out = module.transformer(*args)
        return out.last_hidden_state, out.cache

    x, cache = model.apply({"params": params}, input_ids, attention_mask, position_ids, None, cache, method=hidden)
    if last_only:
        x = x[:, -1]  # the output projection is a large part of a small draft's step: only where it is read
    return (None if head is None else output_logits(x, head, model.config.dtype)), cache


def _prefill(model, params, ids: Array, real: Array, slots: int) -> KVCache:
    """Caches the first `ids.shape[1]` columns (left-padded prompt; `real` marks its tokens) into a fresh
    cache of `slots` slots."""
    b, t = ids.shape
    cache = _cache(model.config, b, slots)
    if t == 0:
        return cache
    mask = real.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    full_mask = jnp.concatenate([mask, jnp.zeros((b, slots - t), jnp.int32)], axis=1)
    _, cache = _run(model, params, None, ids, full_mask, positions, cache)
    return cache


def _commit(cache: KVCache, columns: Array, scratch: int) -> KVCache:
    """Copies the `w` scratch slots `[scratch, scratch + w)` of each row to that row's slots
    `[columns[b], columns[b] + w)` (a scatter, in place inside the loop), and points the shared index back
    at the scratch."""
    def copy(layer):  # [B, H, S, K]
        new = layer[:, :, scratch:]
        return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (0, i, 0)))(layer, new, columns)

    return KVCache(keys=tuple(map(copy, cache.keys)), values=tuple(map(copy, cache.values)),
                   index=jnp.int32(scratch))


def _take(x: Array, columns: Array) -> Array:
    """`x[b, columns[b, j]]` for `x [B, M]`, `columns [B, J]` (clipped into range)."""
    return jnp.take_along_axis(x, jnp.clip(columns, 0, x.shape[1] - 1), axis=1)


def lookup_proposals(tokens: Array, real: Array, last: Array, ngram: int, k: int) -> tuple[Array, Array]:
    """Prompt-lookup drafting: for each row, the `k` tokens that followed the most recent earlier occurrence
    of the n-gram ending at column `last` (the text so far is `tokens [B, M]` up to `last`, `real` marking
    its tokens). The most recent occurrence with k known tokens after it is preferred: in a loop of period
    p < k the very latest occurrence is followed by only p of them.

    Returns `(proposals [B, k], count [B])`: only the first `count` proposals are meaningful (0 without a
    match; fewer than k when every match is so recent that its continuation reaches the current token).
    """
    b, m = tokens.shape
    ends = jnp.arange(m)
    match = (ends[None, :] < last[:, None]) & (ends[None, :] >= ngram - 1)
    for j in range(ngram):
        shifted = jnp.pad(tokens, ((0, 0), (j, 0)))[:, :m]  # shifted[:, e] = tokens[:, e - j]
        shifted_real = jnp.pad(real, ((0, 0), (j, 0)))[:, :m]
        want = _take(tokens, (last - j)[:, None])
        want_real = _take(real, (last - j)[:, None]) & (last - j >= 0)[:, None]
        match = match & shifted_real & want_real & (shifted == want)
    latest = jnp.max(jnp.where(match, ends[None, :], -1), axis=1)
    latest_full = jnp.max(jnp.where(match & (ends[None, :] <= (last - k)[:, None]), ends[None, :], -1), axis=1)
    end = jnp.where(latest_full >= 0, latest_full, latest)
    proposals = _take(tokens, end[:, None] + 1 + jnp.arange(k)[None, :])
    count = jnp.where(end >= 0, jnp.minimum(k, last - end), 0)
    return proposals, count


def _draft_proposals(draft_model, draft_params, draft_head, state: SpeculativeState, strategy: GenerationConfig,
                     real: Array, lengths: Array, key: Array, *, prompt_len: int, k: int):
    """`state.draft_tokens` (n <= k) tokens from the draft model (argmax, or samples of its warped
    distribution) in `[B, k]` (columns >= n unused), with their warped logits `[B, k, V]` when sampling,
    and the draft cache holding the round's n + 1 keys/values in scratch."""
    m = state.tokens.shape[1]
    last = prompt_len + state.made - 1  # the pending column
    before = last - 1  # the column before it (a padding column on the first round of a 1-token prompt)
    pos = lengths + state.made - 1  # position id of the pending token
    max_pos = draft_model.config.n_positions - 1
    slots = jnp.arange(m)[None, :]
    cached = real & (slots < before[:, None])
    scratch = jnp.concatenate([_take(real, before[:, None]), jnp.ones((real.shape[0], k), bool)], axis=1)
    mask = jnp.concatenate([cached, scratch], axis=1).astype(jnp.int32)

    def choose(logits, j):
        if not strategy.do_sample:
            return argmax(logits), None
        warped = strategy.warp(logits)
        return draw_tokens(jax.random.fold_in(key, j), warped), warped

    ids = _take(state.tokens, jnp.stack([before, last], axis=1))
    positions = jnp.clip(jnp.stack([pos - 1, pos], axis=1), 0, max_pos)
    cache = state.draft_cache.replace(index=jnp.int32(m))
    logits, cache = _run(draft_model, draft_params, draft_head, ids, mask, positions, cache, last_only=True)
    token, warped = choose(logits, 0)
    proposals = jnp.zeros((real.shape[0], k), jnp.int32).at[:, 0].set(token)
    q_logits = None if warped is None else jnp.zeros((real.shape[0], k, warped.shape[-1])).at[:, 0].set(warped)

    def step(j, carry):
        proposals, q_logits, cache = carry
        ids = jax.lax.dynamic_slice_in_dim(proposals, j - 1, 1, axis=1)
        positions = jnp.clip(pos + j, 0, max_pos)[:, None]
        logits, cache = _run(draft_model, draft_params, draft_head, ids, mask, positions, cache, last_only=True)
        token, warped = choose(logits, j)
        proposals = jax.lax.dynamic_update_slice_in_dim(proposals, token[:, None], j, axis=1)
        if warped is not None:
            q_logits = jax.lax.dynamic_update_slice_in_dim(q_logits, warped[:, None], j, axis=1)
        return proposals, q_logits, cache

    proposals, q_logits, cache = jax.lax.fori_loop(1, state.draft_tokens, step, (proposals, q_logits, cache))
    return proposals, q_logits, cache


def _accept(p_logits: Array, proposals: Array, q_logits: Array | None, count: Array, key: Array,
            strategy: GenerationConfig, acceptance: str) -> tuple[Array, Array]:
    """How many of the proposals each row keeps, and the token that follows them.

    Args:
      p_logits: `[B, k + 1, V]` target logits after the pending token and after each proposal.
      proposals: `[B, k]`; only the first `count [B]` of each row are real proposals.
      q_logits: `[B, k, V]` the draft's warped logits the proposals were drawn from; None for a
        deterministic proposer (prompt lookup, or any greedy proposer).
    Returns:
      `(kept [B], next_token [B])`.
    """
    b, k = proposals.shape
    if not strategy.do_sample:
        # Greedy: keep proposals while they are the target's argmax; the next token is the argmax after them.
        best = argmax(p_logits.reshape(b * (k + 1), -1)).reshape(b, k + 1)
        good = (proposals == best[:, :k]) | (acceptance == "always")
        good = good & (jnp.arange(k)[None, :] < count[:, None])
        kept = jnp.sum(jnp.cumprod(good, axis=1), axis=1)
        return kept, _take(best, kept[:, None])[:, 0]

    p_warped = strategy.warp(p_logits.reshape(b * (k + 1), -1)).reshape(p_logits.shape)
    if q_logits is None:  # a point mass on each proposal
        q = jax.nn.one_hot(proposals, p_warped.shape[-1], dtype=p_warped.dtype)
    else:
        q = jax.nn.softmax(q_logits, axis=-1)
    u_key, next_key = jax.random.split(key)
    kept, logits = rejection_rule(p_warped, q, proposals, jax.random.uniform(u_key, (b, k)), count, acceptance)
    return kept, draw_tokens(next_key, logits)


def rejection_rule(p_warped: Array, q: Array, proposals: Array, u: Array, count: Array,
                   acceptance: str = "rejection") -> tuple[Array, Array]:
    """The rule of speculative sampling (the module docstring) for given random numbers; `generate`'s rounds
    and the server's (`serve.speculative_slots`) both run it.

    Args:
      p_warped: `[B, k + 1, V]` the target's warped logits after the pending token and after each proposal.
      q: `[B, k, V]` the probabilities each proposal was drawn from.
      proposals: `[B, k]`; only the first `count [B]` of each row are real proposals.
      u: `[B, k]` uniform numbers in [0, 1), one per proposal.
    Returns:
      `(kept [B], next_logits [B, V])`: the proposals kept, and the logits the token after them is drawn
      from: norm(max(0, p - q)) after a rejection, else p.
    """
    b, k = proposals.shape
    p = jax.nn.softmax(p_warped, axis=-1)  # [B, k + 1, V]
    p_x = jnp.take_along_axis(p[:, :k], proposals[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q, proposals[..., None], axis=-1)[..., 0]
    if acceptance != "always":
        good = u * q_x < p_x  # u < p(x) / q(x), without dividing by a q(x) that may underflow
    else:
        good = jnp.ones((b, k), bool)
    good = good & (jnp.arange(k)[None, :] < count[:, None])
    kept = jnp.sum(jnp.cumprod(good, axis=1), axis=1)
    rejected = kept < count  # stopped by a rejection, not by running out of proposals
    p_next = jnp.take_along_axis(p_warped, kept[:, None, None], axis=1)[:, 0]
    q_next = jnp.take_along_axis(q, jnp.minimum(kept, k - 1)[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(jax.nn.softmax(p_next, axis=-1) - q_next, 0.0)
    # After a rejection p != q, so the residual has mass; the guard only keeps float noise from drawing from
    # an all-zero row.
    use_residual = rejected & (jnp.sum(residual, axis=-1) > 0) & (acceptance != "resample_target")
    return kept, jnp.where(use_residual[:, None], jnp.log(residual), p_next)


def _round(model, params, head, draft_model, draft_params, draft_head, state: SpeculativeState,
           strategy: GenerationConfig, real: Array, lengths: Array, key: Array, eos: Array, pad: Array,
           max_new_tokens: Array, *, prompt_len: int, k: int, ngram: int | None, acceptance: str,
           schedule: str = "constant"):
    """One round: propose k tokens, verify them with one target call, keep the accepted prefix plus one."""
    b, m = state.tokens.shape
    last = prompt_len + state.made - 1
    pos = lengths + state.made - 1
    round_key = jax.random.fold_in(key, state.rounds)
    draft_key, accept_key = jax.random.split(round_key)

    if draft_model is not None:
        proposals, q_logits, draft_cache = _draft_proposals(
            draft_model, draft_params, draft_head, state, strategy, real, lengths, draft_key,
            prompt_len=prompt_len, k=k)
        count = jnp.full((b,), state.draft_tokens, jnp.int32)
    else:
        proposals, count = lookup_proposals(state.tokens, real, last, ngram, k)
        q_logits, draft_cache = None, None

    # Verify: the pending token and the k proposals, written to the target's scratch slots.
    ids = jnp.concatenate([_take(state.tokens, last[:, None]), proposals], axis=1)
    positions = jnp.clip(pos[:, None] + jnp.arange(k + 1)[None, :], 0, model.config.n_positions - 1)
    cached = real & (jnp.arange(m)[None, :] < last[:, None])
    mask = jnp.concatenate([cached, jnp.ones((b, k + 1), bool)], axis=1).astype(jnp.int32)
    p_logits, target_cache = _run(model, params, head, ids, mask, positions,
                                  state.target_cache.replace(index=jnp.int32(m)))
    kept, next_token = _accept(p_logits, proposals, q_logits, count, accept_key, strategy, acceptance)

    # The new tokens: the kept proposals, then next_token; cut after an EOS; nothing for a finished row.
    j = jnp.arange(k + 1)[None, :]
    new = jnp.where(j < kept[:, None], jnp.pad(proposals, ((0, 0), (0, 1))), next_token[:, None])
    is_eos = (new == eos) & (j <= kept[:, None])
    first_eos = jnp.min(jnp.where(is_eos, j, k + 1), axis=1)
    n_new = jnp.where(state.finished, 0, jnp.minimum(kept + 1, first_eos + 1))
    new = jnp.where(j < n_new[:, None], new, pad)
    tokens = jax.vmap(lambda row, u, c: jax.lax.dynamic_update_slice(row, u, (c,)))(state.tokens, new, last + 1)

    running = ~state.finished
    draft_tokens = state.draft_tokens
    if schedule == "heuristic":
        all_kept = jnp.all(jnp.where(running, kept >= count, True))
        draft_tokens = jnp.where(all_kept, jnp.minimum(k, draft_tokens + 2), jnp.maximum(1, draft_tokens - 1))
    made = jnp.minimum(state.made + n_new, max_new_tokens)
    finished = state.finished | (running & (first_eos <= kept)) | (made >= max_new_tokens)
    return state.replace(
        tokens=tokens, made=made, finished=finished,
        target_cache=_commit(target_cache, last, m),
        draft_cache=None if draft_cache is None else _commit(draft_cache, last - 1, m),
        rounds=state.rounds + 1,
        proposed=state.proposed + jnp.where(running, count, 0),
        accepted=state.accepted + jnp.where(running, kept, 0),
        active_rounds=state.active_rounds + running.astype(jnp.int32), draft_tokens=draft_tokens,
        kept_counts=state.kept_counts + (running[:, None] & (kept[:, None] == jnp.arange(k + 1))).astype(jnp.int32))


def _buffers(input_ids: Array, attention_mask: Array, pad_token_id: Array, buffer_len: int):
    """`(tokens [B, M], real [B, M], lengths [B])`: the token buffer with the prompt in front, which of its
    columns are real tokens, and the position id of each row's first new token."""
    b, p = input_ids.shape
    pad = pad_token_id.astype(jnp.int32)
    tokens = jnp.concatenate([input_ids.astype(jnp.int32), jnp.broadcast_to(pad, (b, buffer_len - p))], axis=1)
    real = jnp.concatenate([attention_mask.astype(bool), jnp.ones((b, buffer_len - p), bool)], axis=1)
    return tokens, real, jnp.sum(attention_mask.astype(jnp.int32), axis=1)


def _start(model, params, draft_model, draft_params, input_ids, attention_mask, pad_token_id, *, buffer_len: int,
           k: int) -> SpeculativeState:
    b, p = input_ids.shape
    slots = buffer_len + k + 1
    tokens, real, _ = _buffers(input_ids, attention_mask, pad_token_id, buffer_len)
    # The pending token of the first round is the prompt's last; the target caches what comes before it,
    # the draft one column less (see the module docstring).
    target_cache = _prefill(model, params, tokens[:, :p - 1], real[:, :p - 1], slots)
    draft_cache = None
    if draft_model is not None:
        draft_cache = _prefill(draft_model, draft_params, tokens[:, :p - 2], real[:, :p - 2], slots)
    zeros = jnp.zeros((b,), jnp.int32)
    return SpeculativeState(tokens=tokens, made=zeros, finished=jnp.zeros((b,), bool), target_cache=target_cache,
                            draft_cache=draft_cache, rounds=jnp.int32(0), proposed=zeros, accepted=zeros,
                            active_rounds=zeros, draft_tokens=jnp.int32(k),
                            kept_counts=jnp.zeros((b, k + 1), jnp.int32))


def _rounds(model, params, head, draft_model, draft_params, draft_head, state: SpeculativeState, input_ids,
            attention_mask, strategy, eos_token_id, pad_token_id, seed, max_new_tokens, until_round, *,
            k: int, ngram: int | None, acceptance: str, schedule: str = "constant") -> SpeculativeState:
    """Rounds until every row is finished or `state.rounds == until_round`."""
    _, real, lengths = _buffers(input_ids, attention_mask, pad_token_id, state.tokens.shape[1])
    key = jax.random.PRNGKey(seed)

    def body(state):
        return _round(model, params, head, draft_model, draft_params, draft_head, state, strategy, real, lengths,
                      key, eos_token_id.astype(jnp.int32), pad_token_id.astype(jnp.int32), max_new_tokens,
                      prompt_len=input_ids.shape[1], k=k, ngram=ngram, acceptance=acceptance, schedule=schedule)

    return jax.lax.while_loop(lambda s: ~jnp.all(s.finished) & (s.rounds < until_round), body, state)


_STATIC = ("model", "draft_model", "buffer_len", "k", "ngram", "acceptance", "schedule")


@functools.partial(jax.jit, static_argnames=_STATIC)
def speculative_tokens(model: GPT2LMHeadModel, params: Any, head: Array, draft_model: GPT2LMHeadModel | None,
                       draft_params: Any, draft_head: Array | None, input_ids: Array, attention_mask: Array,
                       strategy: GenerationConfig, eos_token_id: Array, pad_token_id: Array, seed: Array,
                       max_new_tokens: Array, *, buffer_len: int, k: int, ngram: int | None,
                       acceptance: str = "rejection", schedule: str = "constant") -> SpeculativeState:
    """Prefill and the whole speculative loop as one computation; returns the final state.

    `input_ids`/`attention_mask` `[B, P]` hold the left-padded prompt, at least one padding column first
    (P >= 2); `buffer_len` (M) >= P + max_new_tokens + k + 1 columns. Either `draft_model` (with its params
    and output projection `draft_head`) or `ngram` (prompt lookup) proposes. `head` and `draft_head` are
    `output_projection(...)` cut to the same vocabulary.
    """
    state = _start(model, params, draft_model, draft_params, input_ids, attention_mask, pad_token_id,
                   buffer_len=buffer_len, k=k)
    return _rounds(model, params, head, draft_model, draft_params, draft_head, state, input_ids, attention_mask,
                   strategy, eos_token_id, pad_token_id, seed, max_new_tokens, jnp.iinfo(jnp.int32).max, k=k,
                   ngram=ngram, acceptance=acceptance, schedule=schedule)


# Streaming: the same computation cut between rounds (the prefill, then `rounds_per_chunk` rounds per call).
start_tokens = jax.jit(_start, static_argnames=("model", "draft_model", "buffer_len", "k"))
more_tokens = jax.jit(_rounds, static_argnames=("model", "draft_model", "k", "ngram", "acceptance", "schedule"),
                      donate_argnames=("state",))


def _check_draft(draft, prompt_lookup_ngram, num_draft_tokens, vocab: int, needed_positions: int,
                 draft_schedule: str = "constant"):
    if not is_int(num_draft_tokens) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be a positive integer, got {num_draft_tokens!r}")
    if draft_schedule not in DRAFT_SCHEDULES:
        raise ValueError(f"draft_schedule must be one of {DRAFT_SCHEDULES}, got {draft_schedule!r}")
    if draft_schedule != "constant" and draft is None:
        raise ValueError(f"draft_schedule={draft_schedule!r} adapts a draft model's steps; prompt lookup's "
                         "proposals cost nothing to make: use draft_schedule='constant' with prompt_lookup_ngram")
    if (draft is None) == (prompt_lookup_ngram is None):
        raise ValueError("speculative decoding needs exactly one proposer: draft=(draft_model, draft_params) or "
                         f"prompt_lookup_ngram=n; got draft={'set' if draft is not None else None} and "
                         f"prompt_lookup_ngram={prompt_lookup_ngram!r}")
    if prompt_lookup_ngram is not None:
        if not is_int(prompt_lookup_ngram) or prompt_lookup_ngram < 1:
            raise ValueError(f"prompt_lookup_ngram must be a positive integer, got {prompt_lookup_ngram!r}")
        return None, None
    return check_draft_model(draft, vocab, needed_positions, "prompt + max_new_tokens",
                             vocab_hint=", or pass vocab_limit=<the tokenizer's size>")


def check_draft_model(draft, vocab: int, needed_positions: int, needed_what: str,
                      vocab_hint: str = "") -> tuple[GPT2LMHeadModel, Any]:
    """`(draft_model, draft_params)` of `draft`, checked to be a GPT-2 pair that scores the target's `vocab`
    ids and embeds `needed_positions` positions (`needed_what` names them); ValueError naming what does not."""
    if not isinstance(draft, (tuple, list)) or len(draft) != 2 or not isinstance(draft[0], GPT2LMHeadModel):
        raise ValueError("draft must be a pair (draft_model, draft_params) with a GPT2LMHeadModel, got "
                         f"{type(draft).__name__}")
    draft_model, draft_params = draft
    dc = draft_model.config
    if dc.vocab_size < vocab:
        raise ValueError(f"the draft's vocab_size ({dc.vocab_size}) is smaller than the target's {vocab} ids; "
                         f"use a draft with the target's tokenizer{vocab_hint}")
    if dc.n_positions < needed_positions:
        raise ValueError(f"the draft's n_positions ({dc.n_positions}) is shorter than {needed_what} "
                         f"({needed_positions}); use a draft with at least the target's context")
    return draft_model, unwrap_params(draft_params)


def speculative_generate(model: GPT2LMHeadModel, params: Any, input_ids, attention_mask=None, *,
                         max_new_tokens: int, draft: tuple[GPT2LMHeadModel, Any] | None = None,
                         prompt_lookup_ngram: int | None = None, num_draft_tokens: int = 4,
                         do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         eos_token_id: int | None = None, pad_token_id: int | None = None, seed: int = 0,
                         vocab_limit: int | None = None, return_stats: bool = False,
                         draft_schedule: str = "constant"):
    """`generate` (greedy or sampling) sped up by speculative decoding; the output is the target's own.

    Args:
      model, params, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
        eos_token_id, pad_token_id, seed, vocab_limit: as in `generate`. Greedy output equals
        `generate(..., do_sample=False)`; sampled output has the distribution of `generate(..., do_sample=True)`
        (not the same draws for a seed).
      draft: `(draft_model, draft_params)`, a smaller GPT-2 with the target's vocabulary (any depth/width).
      prompt_lookup_ngram: instead of a draft model, propose the tokens that followed the most recent earlier
        occurrence of the last `n` tokens (prompt and text so far); no proposal without a match.
      num_draft_tokens: k, the most proposals checked per target call (it fixes the shapes).
      draft_schedule: "constant" (every round drafts k) or "heuristic" (a draft model's proposals per round
        adapt between 1 and k to how many were kept; see the module docstring). The output is the same.
      return_stats: also return a dict of numpy arrays per row: `proposed` and `accepted` proposals and
        `rounds` (target calls) while the row was running, `acceptance_rate` (accepted / proposed) and
        `kept_counts [B, k + 1]` (rounds that kept 0, 1, ..., k proposals).
    Returns:
      `[batch, prompt_length + max_new_tokens]` int32, like `generate`: the prompt, then the new tokens
      (`pad_token_id` after EOS); with `return_stats`, `(tokens, stats)`.
    """
    return _generate(model, params, input_ids, attention_mask, max_new_tokens=max_new_tokens, draft=draft,
                     prompt_lookup_ngram=prompt_lookup_ngram, num_draft_tokens=num_draft_tokens, do_sample=do_sample,
                     temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id, seed=seed, vocab_limit=vocab_limit, return_stats=return_stats,
                     draft_schedule=draft_schedule)


def _prepare(model, params, input_ids, attention_mask, *, max_new_tokens, draft, prompt_lookup_ngram,
             num_draft_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, seed, vocab_limit,
             acceptance, draft_schedule="constant"):
    """The checked arguments of the speculative computation, as `speculative_tokens` takes them, and
    `(extra, prompt columns)` to cut the output."""
    if acceptance not in _ACCEPTANCE_RULES:
        raise ValueError(f"acceptance must be one of {_ACCEPTANCE_RULES}, got {acceptance!r}")
    options = GenerateOptions(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              seed=seed, vocab_limit=vocab_limit)
    args, extra, vocab = prepare_prompts(model, input_ids, attention_mask, options)
    draft_model, draft_params = _check_draft(draft, prompt_lookup_ngram, num_draft_tokens, vocab,
                                             args["input_ids"].shape[1] - extra + max_new_tokens, draft_schedule)
    params = unwrap_params(params)
    k = int(num_draft_tokens)
    # One padding column in front, so that the column before the first pending token always exists.
    ids = jnp.pad(args["input_ids"], ((0, 0), (1, 0)), constant_values=args["pad_token_id"])
    mask = jnp.pad(args["attention_mask"], ((0, 0), (1, 0)))
    call = dict(model=model, params=params, head=output_head(model, params, vocab), draft_model=draft_model,
                draft_params=draft_params,
                draft_head=None if draft_model is None else output_head(draft_model, draft_params, vocab),
                input_ids=ids, attention_mask=mask, strategy=options.strategy(), eos_token_id=args["eos_token_id"],
                pad_token_id=args["pad_token_id"], seed=args["seed"], max_new_tokens=jnp.int32(max_new_tokens),
                buffer_len=1 + args["cache_len"] + k + 1, k=k,
                ngram=None if prompt_lookup_ngram is None else int(prompt_lookup_ngram), acceptance=acceptance,
                schedule=draft_schedule)
    return call, 1 + extra, ids.shape[1]


def _generate(model, params, input_ids, attention_mask=None, *, max_new_tokens, draft=None, prompt_lookup_ngram=None,
              num_draft_tokens=4, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
              pad_token_id=None, seed=0, vocab_limit=None, return_stats=False, acceptance="rejection",
              draft_schedule="constant"):
    """`speculative_generate` with a choice of acceptance rule (`_ACCEPTANCE_RULES`; tests only)."""
    call, first, prompt_cols = _prepare(
        model, params, input_ids, attention_mask, max_new_tokens=max_new_tokens, draft=draft,
        prompt_lookup_ngram=prompt_lookup_ngram, num_draft_tokens=num_draft_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        seed=seed, vocab_limit=vocab_limit, acceptance=acceptance, draft_schedule=draft_schedule)
    state = speculative_tokens(**call)
    tokens = np.asarray(state.tokens)[:, first:prompt_cols + max_new_tokens]
    if not return_stats:
        return tokens
    proposed, accepted = np.asarray(state.proposed), np.asarray(state.accepted)
    stats = dict(proposed=proposed, accepted=accepted, rounds=np.asarray(state.active_rounds),
                 acceptance_rate=accepted / np.maximum(proposed, 1), kept_counts=np.asarray(state.kept_counts))
    return tokens, stats


def speculative_stream(model: GPT2LMHeadModel, params: Any, input_ids, attention_mask=None, *, max_new_tokens: int,
                       rounds_per_chunk: int = 1, draft=None, prompt_lookup_ngram=None, num_draft_tokens: int = 4,
                       do_sample=False, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=None,
                       seed=0, vocab_limit=None, draft_schedule: str = "constant") -> Iterator[np.ndarray]:
    """`speculative_generate`, yielding new tokens as rounds accept them (`generate_stream` with a draft).

    Each chunk is `[batch, n]`: the tokens every row has by then (a row accepts 1 to k + 1 tokens per round;
    a finished row counts as complete), so the chunks together are exactly `speculative_generate`'s new
    tokens. Between chunks the loop stops after `rounds_per_chunk` rounds and only the tokens come back; the
    state stays on the device, and the rounds are the same computation as the unstreamed loop's.
    """
    if not is_int(rounds_per_chunk) or rounds_per_chunk < 1:
        raise ValueError(f"rounds_per_chunk must be a positive integer, got {rounds_per_chunk!r}")
    call, first, prompt_cols = _prepare(
        model, params, input_ids, attention_mask, max_new_tokens=max_new_tokens, draft=draft,
        prompt_lookup_ngram=prompt_lookup_ngram, num_draft_tokens=num_draft_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        seed=seed, vocab_limit=vocab_limit, acceptance="rejection", draft_schedule=draft_schedule)
    start_args = {n: call[n] for n in ("model", "params", "draft_model", "draft_params", "input_ids",
                                       "attention_mask", "pad_token_id", "buffer_len", "k")}
    state = start_tokens(**start_args)
    rest = {n: v for n, v in call.items() if n != "buffer_len"}
    done = 0
    while True:
        made, finished = np.asarray(state.made), np.asarray(state.finished)
        ready = int(np.min(np.where(finished, max_new_tokens, made)))
        if ready > done:
            # A copy (np.array): the next call donates the state's buffers.
            tokens = np.array(state.tokens[:, prompt_cols + done:prompt_cols + ready])
            yield tokens
            done = ready
        if done >= max_new_tokens:
            return
        state = more_tokens(state=state, until_round=state.rounds + rounds_per_chunk, **rest)

"""Speculative decoding in the server's slots (`serve --draft_model`): the device side.

A round, for every slot at once: choose the next token exactly as the plain step does (`slots.choose_next`,
from the stored logits), let the draft model propose the `k` tokens after it, run the target once over those
`k + 1` tokens, and keep a prefix of each drafting row's proposals. A row that drafts emits 1 + (the proposals
it kept) tokens per round.

Which rows draft (`drafting`, set per row by the engine from `may_draft`): rows without penalties or
log-probabilities; greedy ones always, sampled ones when the server drafts for them (`serve --draft_sampled`).
  * Greedy rows keep proposals while they equal the target's argmax: exactly the target's own greedy
    decoding, `generate`'s tokens. Their new stored logits are the target's after the last kept token.
  * Sampled rows draw their proposals from the draft's warped distribution q (their own temperature, top-k and
    top-p) and keep them by the rejection rule (`flax_gpt2.generation.speculative`'s: x kept with probability
    min(1, p(x) / q(x)); after the first rejection the next token is drawn from norm(max(0, p - q)); with all
    kept, the next round draws from p), so each emitted token is distributed as the target's own sample. The
    draws use the row's own key (`slots.row_keys`, folded with 1 .. k + 2), so a seeded request gets the same
    text in any batch, though not the same text as `generate(do_sample=True, seed=...)`, which draws once per
    token. The token drawn after a rejection is stored as a point-mass logit row, which the next round's
    `choose_next` returns whatever the row's warpers.
Every other row (penalised, with logprobs) keeps none of the proposals: it emits the one token the plain step
would have chosen, with the same key, and its stored logits are the target's after that token, so one compiled
round serves any mix of requests and each one's output is what the plain server gives it.

Cache layout (the slots', see `slots`): the target caches the columns before `pos`; the draft caches at least
the columns before `pos - 1`, and its first call of a round feeds two tokens (column `pos - 1` and the chosen
token at `pos`), so whatever a row kept in the last round, the draft has every key/value it needs with a
fixed-shape call (the same scheme as `flax_gpt2.generation.speculative`). A round writes columns
`pos .. pos + k` of both caches; rejected columns are left past the new `pos`, hidden by the causal mask until
overwritten, so nothing is rewound explicitly. The slots therefore hold `k + 1` columns more than the context,
and a row stops advancing at `RowSettings.stop` (the column after its last token), so that the rounds of a
multi-round dispatch never write past them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2.generation.logits_processors import ChoiceSettings, argmax, draw_tokens, warp
from flax_gpt2.generation.model_step import forward
from flax_gpt2.generation.speculative import check_draft_model, rejection_rule
from flax_gpt2.modeling.kv_cache import KVCache
from flax_gpt2.modeling.model import GPT2LMHeadModel
from flax_gpt2.serve.slots import RowSettings, Slots, StepWork, choose_next, row_keys

Array = jax.Array


def may_draft(settings: RowSettings, sampled: bool):
    """`[N]` bool: the rows that can draft: no penalties, no logprobs, and greedy unless `sampled`; numpy or jax.
    (The engine sets `RowSettings.draft` from it, when a row is admitted.)"""
    return ((settings.greedy | sampled) & (settings.repetition_penalty == 1) & (settings.presence_penalty == 0)
            & (settings.frequency_penalty == 0) & ~settings.logprobs)


def drafting(settings: RowSettings):
    """`[N]` bool: the running rows whose proposals are checked (`RowSettings.draft`); numpy or jax."""
    return settings.active & settings.draft


def _rows_forward(model, params, head, ids, mask, positions, index, keys, values, *, last_only):
    """The model over each row's `ids [N, T]` at its own cache column `index [N]` (a vmapped batch-1 call, as
    `slots.step` makes); returns the logits (`[N, V]`, or `[N, T, V]` without `last_only`) and the caches."""
    def row(ids, mask, positions, index, keys, values):
        cache = KVCache(keys=tuple(k[None] for k in keys), values=tuple(v[None] for v in values), index=index)
        logits, cache = forward(model, params, head, ids[None], mask[None], positions[None], cache,
                                last_only=last_only)
        return logits[0], tuple(k[0] for k in cache.keys), tuple(v[0] for v in cache.values)

    return jax.vmap(row)(ids, mask, positions, index, keys, values)


def _choice_settings(settings: RowSettings, repeat: int = 1) -> ChoiceSettings:
    """The rows' warpers (temperature, top-k, top-p), each row's repeated `repeat` times (for `[N * T, V]`)."""
    each = lambda x: jnp.repeat(x, repeat) if repeat > 1 else x  # noqa: E731
    return ChoiceSettings(greedy=each(settings.greedy), temperature=each(settings.temperature),
                          top_k=each(settings.top_k), top_p=each(settings.top_p))


def _draw(keys: Array, logits: Array, data: int) -> Array:
    """`[N]` one token per row from softmax(logits `[N, V]`), row n with `fold_in(keys[n], data)`."""
    return jax.vmap(lambda key, row: draw_tokens(jax.random.fold_in(key, data), row[None])[0])(keys, logits)


def _propose(logits: Array, keys: Array, j, settings: RowSettings, work: StepWork, sampled: bool):
    """The draft's proposal number `j` of every row after its logits `[N, V]`: the argmax for greedy rows, a
    draw from the warped distribution for sampled ones; and those warped logits (q's, `[N, V]`; None when no
    sampled row drafts, `sampled` False)."""
    best = argmax(logits)
    if not sampled:
        return best, None

    def sampled(x):
        warped = warp(x, _choice_settings(settings), work.choice)
        return jnp.where(settings.greedy, best, _draw(keys, warped, 1 + j)), warped

    return jax.lax.cond(work.choice.sample, sampled, lambda x: (best, x), logits)


def _sampled_rule(logits: Array, proposals: Array, q_warped: Array, keys: Array, settings: RowSettings,
                  work: StepWork, k: int):
    """The rejection rule (`generation.speculative.rejection_rule`) for sampled rows: `(good [N, k],
    next_logits [N, V])`, with each row's own warpers and random numbers.

    Proposal x_j (drawn from q_j) is kept with probability min(1, p_j(x_j) / q_j(x_j)), p and q the warped
    target and draft distributions. After the first rejection, at j, the next token is drawn here from
    norm(max(0, p_j - q_j)) and `next_logits` is a point mass on it, so that the next round's token choice
    (`choose_next`, which warps and draws from the stored logits) returns it whatever the row's settings; with
    every proposal kept, `next_logits` are the target's after the last one, and the next round draws the
    bonus token from p as the plain step would.
    """
    n = logits.shape[0]
    vocab = logits.shape[-1]
    p_warped = warp(logits.reshape(n * (k + 1), vocab), _choice_settings(settings, k + 1),
                    work.choice).reshape(n, k + 1, vocab)
    u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, k + 1), (k,)))(keys)
    kept, pending_logits = rejection_rule(p_warped, jax.nn.softmax(q_warped, axis=-1), proposals, u,
                                          jnp.full((n,), k, jnp.int32))
    good = jnp.arange(k)[None, :] < kept[:, None]
    pending = _draw(keys, pending_logits, k + 2)
    # A point mass that survives any warper: -1e9 is far enough below 0 for exp to give exactly 0 in float32
    # after any temperature, and finite, so top-k/top-p's bisections stay finite.
    point = jnp.where(jnp.arange(vocab)[None, :] == pending[:, None], 0.0, -1e9)
    return good, jnp.where((kept < k)[:, None], point, logits[jnp.arange(n), kept])


def _round(model, params, head, draft_model, draft_params, draft_head, slots: Slots, settings: RowSettings,
           work: StepWork, k: int, sampled: bool):
    n, s = slots.tokens.shape
    rows = jnp.arange(n)
    pos = slots.pos
    running = settings.active & (pos < settings.stop)
    # Where the round writes: a row's own pos while it runs (pos < stop <= S - k - 1); a row that is idle or
    # past its stop (its later tokens are dropped) writes inside the slots too, to columns that no longer matter.
    at = jnp.minimum(pos, s - k - 1)
    token, logprobs = choose_next(slots, settings, work)
    token = jnp.where(running, token, slots.tokens[rows, at])
    position = slots.lengths + pos - slots.start  # of the chosen token (column pos)
    # The key of the chosen token; the round's other draws fold it with 1 .. k + 2 (`_propose`, `_sampled_rule`).
    rngs = row_keys(settings, pos - slots.start)

    # The draft: columns pos - 1 and pos, then one proposal per call.
    before = jnp.maximum(at - 1, 0)
    ids = jnp.stack([slots.tokens[rows, before], token], axis=1)
    max_pos = draft_model.config.n_positions - 1
    positions = jnp.clip(jnp.stack([position - 1, position], axis=1), 0, max_pos)
    logits, dkeys, dvalues = _rows_forward(draft_model, draft_params, draft_head, ids, slots.mask, positions, before,
                                           slots.draft_keys, slots.draft_values, last_only=True)
    first, q_first = _propose(logits, rngs, 0, settings, work, sampled)
    proposals = jnp.zeros((n, k), jnp.int32).at[:, 0].set(first)
    q_warped = None if q_first is None else jnp.zeros((n, k) + q_first.shape[1:], q_first.dtype).at[:, 0].set(q_first)

    def propose(j, carry):
        proposals, q_warped, dkeys, dvalues = carry
        ids = jax.lax.dynamic_slice_in_dim(proposals, j - 1, 1, axis=1)
        positions = jnp.clip(position + j, 0, max_pos)[:, None]
        logits, dkeys, dvalues = _rows_forward(draft_model, draft_params, draft_head, ids, slots.mask, positions,
                                               at + j, dkeys, dvalues, last_only=True)
        token, q = _propose(logits, rngs, j, settings, work, sampled)
        proposals = jax.lax.dynamic_update_slice_in_dim(proposals, token[:, None], j, axis=1)
        if q is not None:
            q_warped = jax.lax.dynamic_update_slice_in_dim(q_warped, q[:, None], j, axis=1)
        return proposals, q_warped, dkeys, dvalues

    proposals, q_warped, dkeys, dvalues = jax.lax.fori_loop(1, k, propose, (proposals, q_warped, dkeys, dvalues))

    # The target over the chosen token and the k proposals. A greedy drafting row keeps proposals while they
    # are the target's argmax after the tokens before them; a sampled one by the rejection rule.
    candidates = jnp.concatenate([token[:, None], proposals], axis=1)  # [N, k + 1]
    positions = jnp.clip(position[:, None] + jnp.arange(k + 1)[None, :], 0, model.config.n_positions - 1)
    logits, keys, values = _rows_forward(model, params, head, candidates, slots.mask, positions, at, slots.keys,
                                         slots.values, last_only=False)  # [N, k + 1, V]
    best = argmax(logits.reshape(n * (k + 1), -1)).reshape(n, k + 1)
    good = proposals == best[:, :k]
    if sampled:
        sampled_rows = (drafting(settings) & ~settings.greedy)[:, None]
        good_sampled, sampled_logits = jax.lax.cond(
            work.choice.sample, lambda: _sampled_rule(logits, proposals, q_warped, rngs, settings, work, k),
            lambda: (good, logits[:, 0]))
        good = jnp.where(sampled_rows, good_sampled, good)
    kept = jnp.sum(jnp.cumprod(good & drafting(settings)[:, None], axis=1), axis=1)
    count = jnp.where(running, 1 + kept, 0)
    next_logits = logits[rows, kept]
    if sampled:
        next_logits = jnp.where(sampled_rows, sampled_logits, next_logits)

    old = jnp.take_along_axis(slots.tokens, at[:, None] + jnp.arange(k + 1)[None, :], axis=1)
    written = jnp.where(running[:, None], candidates, old)
    tokens = jax.vmap(lambda row, new, p: jax.lax.dynamic_update_slice(row, new, (p,)))(slots.tokens, written, at)
    slots = slots.replace(keys=keys, values=values, draft_keys=dkeys, draft_values=dvalues, tokens=tokens,
                          logits=jnp.where(running[:, None], next_logits, slots.logits), pos=pos + count)
    return slots, candidates, count, logprobs


@functools.partial(jax.jit, static_argnames=("model", "draft_model", "k", "num_rounds", "sampled"),
                   donate_argnames=("slots",))
def speculative_steps(model: GPT2LMHeadModel, params: Any, head: Array, draft_model: GPT2LMHeadModel,
                      draft_params: Any, draft_head: Array, slots: Slots, settings: RowSettings, work: StepWork, k: int,
                      num_rounds: int, sampled: bool = False):
    """`num_rounds` speculative rounds (see the module docstring) of every slot, in one call (a `lax.scan`).
    `sampled`: sampled rows may draft (`serve --draft_sampled`); without it the round traces neither the
    draft's warped distributions nor the rejection rule.

    Returns `(slots, tokens [R, N, k + 1], counts [R, N], logprobs)`: round r gave row n its tokens
    `tokens[r, n, :counts[r, n]]` (0 for a row not running); logprobs (of the first token of each round, the
    only one a row that asks for them emits) are stacked like `slots.steps`'.
    """
    def body(slots, _):
        slots, tokens, count, logprobs = _round(model, params, head, draft_model, draft_params, draft_head, slots,
                                                settings, work, k, sampled)
        return slots, (tokens, count, logprobs)

    slots, (tokens, counts, logprobs) = jax.lax.scan(body, slots, None, length=num_rounds)
    return slots, tokens, counts, logprobs


def check_draft(draft: tuple[GPT2LMHeadModel, Any] | None, k: int, vocab_limit: int, context_length: int, *,
                plain: bool) -> tuple[GPT2LMHeadModel | None, Any, int]:
    """`(draft_model, draft_params, k)` of a server's `draft=(model, params)`, checked against what it serves
    (`vocab_limit` ids, `context_length` tokens; `plain`: one device, no LoRA adapters); `(None, None, 0)`
    without a draft. ValueError naming what does not fit."""
    if draft is None:
        return None, None, 0
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_draft_tokens must be an integer >= 1, got {k!r}")
    if not plain:
        raise ValueError("a draft model is served on one device without LoRA adapters: drop --mesh / --adapter, "
                         "or --draft_model")
    draft_model, draft_params = check_draft_model(draft, vocab_limit, context_length, "the served context")
    return draft_model, draft_params, k


def any_drafting(settings: RowSettings) -> bool:
    """Whether a round would check any proposals (else the plain step is cheaper and gives the same tokens)."""
    return bool(np.any(drafting(settings)))

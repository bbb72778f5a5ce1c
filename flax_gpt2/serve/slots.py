"""The device side of the server: a fixed set of decode slots, each a row of one preallocated KV cache.

Every function here is jitted, and its compiled code depends only on the model, the number of slots N, the
cache length S, the shapes of the LoRA adapter table (if adapters are served) and (for `prefill`, `score_prompt`
and `insert`) the prompt bucket P, so the engine compiles them all at start-up and never again: which adapter
each row uses is data (`RowSettings.adapter`), not a shape.

A slot's row holds one sequence laid out as `flax_gpt2.generate` lays out a prompt of its own: the prompt,
left-padded, ends at column `start`; the new tokens follow from `start` on; position ids count real tokens
only. Each row has its own write position (`pos`), which the model's KV cache (one shared `index` for the
batch) does not have: the cached forward pass is therefore `jax.vmap`ped over the rows, each row being
exactly `generate`'s batch-1 step (the cache write becomes a per-row scatter). The next-token choice
applies the same logits processors as `generate` (`flax_gpt2.generation.logits_processors`), with every
setting a per-row array instead of a per-batch constant, so one compiled step serves any mix of greedy and
sampled requests.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2.generation.logits_processors import ChoiceSettings, ChoiceStages, choose_tokens, limit_vocab
from flax_gpt2.generation.model_step import forward, prefill
from flax_gpt2.modeling.kv_cache import KVCache
from flax_gpt2.modeling.lora_rows import row_adapters
from flax_gpt2.modeling.model import GPT2LMHeadModel

Array = jax.Array

# Top log-probabilities returned per token (the OpenAI completions API allows `logprobs` up to 5).
MAX_LOGPROBS = 5


@flax.struct.dataclass
class Slots:
    """The state of all N decode slots on the device (rows are slots)."""

    keys: tuple[Array, ...]  # per layer [N, H, S, K]
    values: tuple[Array, ...]  # per layer [N, H, S, K]
    tokens: Array  # [N, S] int32: the left-padded prompt in columns < start, then the new tokens
    mask: Array  # [N, S] int32: 0 on left padding, 1 elsewhere
    lengths: Array  # [N] int32: real prompt tokens (= position id of the first new token)
    start: Array  # [N] int32: column of the first new token
    pos: Array  # [N] int32: column the next chosen token goes to (start + new tokens so far)
    logits: Array  # [N, V] float32: logits for the token in column `pos` (V: the tokenizer's ids, see engine)
    # A draft model's KV cache (`serve --draft_model`, `speculative_slots`), per layer [N, H', S, K']; () without.
    draft_keys: tuple[Array, ...] = ()
    draft_values: tuple[Array, ...] = ()


@flax.struct.dataclass
class RowSettings:
    """Per-slot decoding settings, `[N]` each, sent with every step (a few hundred bytes)."""

    active: Array  # bool: the slot holds a running sequence
    greedy: Array  # bool: the most likely token (temperature 0)
    temperature: Array  # float32 (1.0 where greedy)
    top_k: Array  # int32, 0 = off
    top_p: Array  # float32, 1.0 = off
    repetition_penalty: Array  # float32, 1.0 = off (the project's CTRL/HF penalty, prompt included)
    presence_penalty: Array  # float32, 0.0 = off (OpenAI's, generated tokens only)
    frequency_penalty: Array  # float32, 0.0 = off (OpenAI's, generated tokens only)
    seed: Array  # uint32: jax.random.PRNGKey(seed)
    stream: Array  # int32: 0, or the index of a sample's copy (its key is folded with it)
    logprobs: Array  # bool: return the top log-probabilities
    adapter: Array  # int32: the row's LoRA adapter, a row of the adapter table (`lora_rows`); 0 = the base
    stop: Array  # int32: the column after the row's last token (start + max_tokens); speculative rounds stop there
    draft: Array  # bool: speculative rounds check a draft model's proposals for this row (`speculative_slots`)

    @classmethod
    def empty(cls, n: int) -> "RowSettings":
        """Host (numpy) settings for n idle slots."""
        return cls(active=np.zeros(n, bool), greedy=np.ones(n, bool), temperature=np.ones(n, np.float32),
                   top_k=np.zeros(n, np.int32), top_p=np.ones(n, np.float32),
                   repetition_penalty=np.ones(n, np.float32), presence_penalty=np.zeros(n, np.float32),
                   frequency_penalty=np.zeros(n, np.float32), seed=np.zeros(n, np.uint32),
                   stream=np.zeros(n, np.int32), logprobs=np.zeros(n, bool), adapter=np.zeros(n, np.int32),
                   stop=np.zeros(n, np.int32), draft=np.zeros(n, bool))


@flax.struct.dataclass
class StepWork:
    """What any active row needs this step, as scalar bools: work no row needs is skipped (`lax.cond`)."""

    choice: ChoiceStages  # penalties, sampling, top-k, top-p
    logprobs: Array

    @classmethod
    def of(cls, rows: RowSettings) -> "StepWork":
        """What the active rows of host (numpy) settings need."""
        act = rows.active
        sampled = act & ~rows.greedy
        choice = ChoiceStages(
            repetition_penalty=np.any(act & (rows.repetition_penalty != 1)),
            counts_penalty=np.any(act & ((rows.presence_penalty != 0) | (rows.frequency_penalty != 0))),
            sample=np.any(sampled), top_k=np.any(sampled & (rows.top_k > 0)),
            top_p=np.any(sampled & (rows.top_p < 1)))
        return cls(choice=choice, logprobs=np.any(act & rows.logprobs))

    @classmethod
    def everything(cls) -> "StepWork":
        """Every branch on: what warm-up compiles (the branches are traced either way)."""
        on = np.bool_(True)
        return cls(choice=ChoiceStages(on, on, on, on, on), logprobs=on)


def init_slots(model: GPT2LMHeadModel, num_slots: int, cache_len: int, vocab: int,
               draft_model: GPT2LMHeadModel | None = None, scratch: int = 0) -> Slots:
    """N empty slots of `cache_len` columns each, for logits over `vocab` ids (the output projection's width),
    with a KV cache for `draft_model` too when one is given; the last `scratch` columns are written by
    speculative rounds only (`speculative_slots`)."""
    config = model.config
    cache = KVCache.init(config, num_slots, cache_len, scratch=scratch)
    draft = None if draft_model is None else KVCache.init(draft_model.config, num_slots, cache_len, scratch=scratch)
    zeros = lambda dtype: jnp.zeros((num_slots,), dtype)  # noqa: E731
    return Slots(keys=cache.keys, values=cache.values, tokens=jnp.zeros((num_slots, cache_len), jnp.int32),
                 mask=jnp.zeros((num_slots, cache_len), jnp.int32), lengths=zeros(jnp.int32),
                 start=zeros(jnp.int32), pos=zeros(jnp.int32),
                 logits=jnp.zeros((num_slots, vocab), jnp.float32),
                 draft_keys=() if draft is None else draft.keys, draft_values=() if draft is None else draft.values)


@functools.partial(jax.jit, static_argnames=("model",))
def prefill_prompt(model: GPT2LMHeadModel, params: Any, head: Array, input_ids: Array, attention_mask: Array,
                   adapters: Any = None, adapter: Array | int = 0):
    """`generate`'s prefill of one left-padded prompt `[1, P]` into a cache of P columns, with LoRA adapter
    `adapter` of the table `adapters` (`lora_rows.stack_adapters`; None: no adapters served).

    Returns `(logits [1, V], keys, values)`, the cache as per-layer `[1, H, P, K]`.
    """
    with row_adapters(adapters, adapter):
        logits, cache, _, _ = prefill(model, params, head, input_ids, attention_mask, input_ids.shape[1])
    return logits, cache.keys, cache.values


@functools.partial(jax.jit, static_argnames=("model", "vocab_limit"))
def score_prompt(model: GPT2LMHeadModel, params: Any, input_ids: Array, attention_mask: Array, vocab_limit: int,
                 adapters: Any = None, adapter: Array | int = 0):
    """Log-probabilities of a left-padded prompt's own tokens (for `echo` with `logprobs`), over the ids
    the tokenizer can decode (`limit_vocab`), the same distribution the decoding step draws from; with LoRA
    adapter `adapter` of `adapters` as in `prefill_prompt`.

    Returns `(chosen [P], top_ids [P, MAX_LOGPROBS], top_logprobs [P, MAX_LOGPROBS])`: column c scores the
    token in column c + 1 given the tokens up to c (the last column scores nothing).
    """
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    with row_adapters(adapters, adapter):
        logits = model.apply({"params": params}, input_ids, mask, positions).logits[0]
    logits = limit_vocab(logits, vocab_limit)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    following = jnp.concatenate([input_ids[0, 1:], input_ids[0, :1]])
    chosen = jnp.take_along_axis(logprobs, following[:, None], axis=1)[:, 0]
    top_values, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    return chosen, top_ids, top_values


@functools.partial(jax.jit, static_argnames=("model", "suffix"))
def prefill_after_prefix(model: GPT2LMHeadModel, params: Any, head: Array, blocks: tuple[Array, ...],
                         input_ids: Array, attention_mask: Array, suffix: int, adapters: Any = None,
                         adapter: Array | int = 0):
    """`prefill_prompt` of a left-padded prompt `[1, P]` whose first tokens' KV is cached (`serve.prefix_cache`):
    `blocks` are the KV (`take_blocks`) of its first `len(blocks) * B` tokens, or more blocks (a fixed count per
    bucket, so one compile serves any hit) of which only those the `suffix` last columns do not cover are read.

    Only the last `suffix` columns (at least the tokens after the cached ones) run through the model, at their
    own positions and against the cached columns before them. Returns what `prefill_prompt` returns.
    """
    p = input_ids.shape[1]
    mask = attention_mask.astype(jnp.int32)
    kv = jnp.concatenate(blocks, axis=3)  # [L, 2, H, M * B, K], the prompt's first tokens from column 0
    kv = jnp.pad(kv, ((0, 0), (0, 0), (0, 0), (0, p - kv.shape[3]), (0, 0)))
    # Where a full prefill puts them: after the left padding. Columns past the cached tokens are rewritten
    # below; the padding's are masked.
    kv = jnp.roll(kv, p - mask.sum(), axis=3)
    cache = KVCache(keys=tuple(layer[0][None] for layer in kv), values=tuple(layer[1][None] for layer in kv),
                    index=jnp.int32(p - suffix))
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)[:, p - suffix:]
    with row_adapters(adapters, adapter):
        logits, cache = forward(model, params, head, input_ids[:, p - suffix:], mask, positions, cache)
    return logits, cache.keys, cache.values


@functools.partial(jax.jit, static_argnames=("block",))
def take_blocks(keys: tuple[Array, ...], values: tuple[Array, ...], length: Array, block: int) -> tuple[Array, ...]:
    """The KV of a prefilled prompt (`prefill_prompt`'s per-layer `[1, H, P, K]`, `length` real tokens ending
    at column P) by blocks of `block` tokens from its first token: `P // block` arrays `[L, 2, H, block, K]`
    (keys then values per layer); those past the prompt's complete blocks hold other columns, to be dropped."""
    p = keys[0].shape[2]

    def take(x, i):  # (slices: 2.5x faster than rolling the whole cache on XLA's CPU backend)
        return jax.lax.dynamic_slice_in_dim(x[0], p - length + i * block, block, axis=1)

    return tuple(jnp.stack([jnp.stack([take(k, i), take(v, i)]) for k, v in zip(keys, values)])
                 for i in range(p // block))


@functools.partial(jax.jit, donate_argnames=("slots",))
def insert(slots: Slots, slot: Array, end: Array, length: Array, input_ids: Array, logits: Array,
           keys: tuple[Array, ...], values: tuple[Array, ...]) -> Slots:
    """Puts a prefilled prompt (`prefill_prompt`'s output, bucket P) into row `slot`, ending at column `end`.

    The prompt's `length` real tokens sit at the end of its P columns; they are rotated left by `P - end`
    (`end <= P`), which only drops left padding, so that a prompt near the end of the context still
    leaves room for its new tokens without another bucket. Attention does not depend on the column order
    of the keys (GPT-2's positions are embedded in them), so this is still `generate`'s computation (up
    to the order of the softmax sums).
    Columns from `end` on keep an earlier sequence's leftovers until the new tokens overwrite them; the
    causal mask hides each one until then.
    """
    p = input_ids.shape[1]
    s = slots.tokens.shape[1]
    shift = p - end
    put = functools.partial(_put_row, slot=slot, shift=shift)
    ids = jnp.roll(input_ids.astype(jnp.int32), -shift, axis=1)
    row_mask = (jnp.arange(s) >= end - length).astype(jnp.int32)[None, :]
    return slots.replace(
        keys=tuple(put(b, k) for b, k in zip(slots.keys, keys)),
        values=tuple(put(b, v) for b, v in zip(slots.values, values)),
        tokens=jax.lax.dynamic_update_slice(slots.tokens, ids, (slot, 0)),
        mask=jax.lax.dynamic_update_slice(slots.mask, row_mask, (slot, 0)),
        lengths=slots.lengths.at[slot].set(length), start=slots.start.at[slot].set(end),
        pos=slots.pos.at[slot].set(end), logits=jax.lax.dynamic_update_slice(slots.logits, logits, (slot, 0)))


def _put_row(big: Array, block: Array, slot: Array, shift: Array) -> Array:
    """A prefilled row's cache `block [1, H, P, K]`, rotated left by `shift` columns, into row `slot` of
    `big [N, H, S, K]` (`insert`)."""
    block = jnp.roll(block, -shift, axis=2)
    return jax.lax.dynamic_update_slice(big, block.astype(big.dtype), (slot, 0, 0, 0))


@functools.partial(jax.jit, donate_argnames=("slots",))
def insert_draft(slots: Slots, slot: Array, end: Array, keys: tuple[Array, ...], values: tuple[Array, ...]) -> Slots:
    """Puts the draft model's prefill of a prompt (`prefill_prompt` of the draft, bucket P) into row `slot`'s
    draft cache, rotated as `insert` rotates the target's."""
    put = functools.partial(_put_row, slot=slot, shift=keys[0].shape[2] - end)
    return slots.replace(draft_keys=tuple(put(b, k) for b, k in zip(slots.draft_keys, keys)),
                         draft_values=tuple(put(b, v) for b, v in zip(slots.draft_values, values)))


def row_keys(rows: RowSettings, steps: Array) -> Array:
    """`[N, 2]`: each row's PRNG key for its new token number `steps [N]`: `PRNGKey(seed)`, folded with the
    index of the sample's copy when it has one, then with the step, so a row's draws depend on its own request
    only (`generate(seed=...)`'s draws for that prompt alone), never on which other rows share the batch."""
    def row_key(seed, stream, step):
        key = jax.random.PRNGKey(seed)
        key = jnp.where(stream > 0, jax.random.fold_in(key, stream), key)
        return jax.random.fold_in(key, step)

    return jax.vmap(row_key)(rows.seed, rows.stream, steps)


def choose_next(slots: Slots, rows: RowSettings, work: StepWork):
    """The next token of every row (`choose_tokens`, `generate`'s token choice, with per-row settings and
    each row's key folded with its step), and the log-probabilities of the raw logits when asked."""
    n, s = slots.tokens.shape
    cols = jnp.arange(s)[None, :]
    history = slots.mask.astype(bool) & (cols < slots.pos[:, None])
    generated = (cols >= slots.start[:, None]) & (cols < slots.pos[:, None])

    keys = row_keys(rows, slots.pos - slots.start)
    settings = ChoiceSettings(greedy=rows.greedy, temperature=rows.temperature, top_k=rows.top_k,
                              top_p=rows.top_p, repetition_penalty=rows.repetition_penalty,
                              frequency_penalty=rows.frequency_penalty, presence_penalty=rows.presence_penalty)
    token = choose_tokens(slots.logits, keys, slots.tokens, history, slots.pos, settings, work.choice, generated)

    def top(x):
        logprobs = jax.nn.log_softmax(x, axis=-1)
        values, ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
        return jnp.take_along_axis(logprobs, token[:, None], axis=1)[:, 0], ids, values

    def no_top(x):
        return (jnp.zeros((n,), jnp.float32), jnp.zeros((n, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((n, MAX_LOGPROBS), jnp.float32))

    logprobs = jax.lax.cond(work.logprobs, top, no_top, slots.logits)
    return token, logprobs


@jax.jit
def resize(slots: Slots, rows: Array) -> Slots:
    """A new set of `len(rows)` slots whose row i is row `rows[i]` of `slots` (a row repeated, or any row
    for a new idle slot: idle rows' contents never matter). Grows or compacts the slots between steps."""
    return jax.tree.map(lambda x: x[rows], slots)


def step(model: GPT2LMHeadModel, params: Any, head: Array, slots: Slots, settings: RowSettings, work: StepWork,
         adapters: Any = None):
    """One decoding step of every slot, in place: choose each row's next token, write it, and run it
    through the model. Idle rows (`settings.active` False) compute too, but keep their position, and
    their results are ignored.

    (Stepping a subset of the rows, gathered from a larger cache, measured several times slower on XLA's
    CPU backend than stepping a smaller cache in place; the engine resizes the slots instead.)

    `work` says what any active row needs (penalties, sampling, top-k, top-p, log-probabilities): work that
    no row needs is skipped (`lax.cond`). `adapters` is the table of LoRA adapters served
    (`lora_rows.stack_adapters`), each row adding adapter `settings.adapter` to the shared base weights; None
    (no adapters served) traces the plain model, `settings.adapter` unused.

    Returns `(slots, tokens [N], (chosen_logprob [N], top_ids [N, 5], top_logprobs [N, 5]))`.
    """
    n, s = slots.tokens.shape
    token, logprobs = choose_next(slots, settings, work)
    pos = jnp.minimum(slots.pos, s - 1)
    token = jnp.where(settings.active, token, slots.tokens[jnp.arange(n), pos])
    position = jnp.minimum(slots.lengths + slots.pos - slots.start, model.config.n_positions - 1)

    def row_forward(token, mask, position, index, adapter, keys, values):
        cache = KVCache(keys=tuple(k[None] for k in keys), values=tuple(v[None] for v in values), index=index)
        with row_adapters(adapters, adapter, batch_rows=n):
            logits, cache = forward(model, params, head, token[None, None], mask[None], position[None, None], cache)
        return logits[0], tuple(k[0] for k in cache.keys), tuple(v[0] for v in cache.values)

    if n == 1:  # one row: the plain batch-1 step (a dynamic-update-slice, not a one-row scatter)
        logits, keys, values = jax.tree.map(lambda x: x[None], row_forward(
            token[0], slots.mask[0], position[0], pos[0], settings.adapter[0], tuple(k[0] for k in slots.keys),
            tuple(v[0] for v in slots.values)))
    else:
        logits, keys, values = jax.vmap(row_forward)(token, slots.mask, position, pos, settings.adapter, slots.keys,
                                                     slots.values)
    slots = slots.replace(keys=keys, values=values, tokens=slots.tokens.at[jnp.arange(n), pos].set(token),
                          logits=logits, pos=jnp.where(settings.active, slots.pos + 1, slots.pos))
    return slots, token, logprobs


@functools.partial(jax.jit, static_argnames=("model", "num_steps"), donate_argnames=("slots",))
def steps(model: GPT2LMHeadModel, params: Any, head: Array, slots: Slots, settings: RowSettings, work: StepWork,
          num_steps: int, adapters: Any = None):
    """`num_steps` decoding steps (`step`) in one call: a `lax.scan`, so the host dispatches and waits once,
    not once per token. Each step computes exactly what `step` alone would.

    Returns `(slots, tokens [num_steps, N], logprobs)`, the logprobs stacked likewise along a leading axis.
    """
    def body(slots, _):
        slots, token, logprobs = step(model, params, head, slots, settings, work, adapters)
        return slots, (token, logprobs)

    slots, (tokens, logprobs) = jax.lax.scan(body, slots, None, length=num_steps)
    return slots, tokens, logprobs

"""Next-token logits processors: small pure functions over `[B, V]` logits, and `GenerationConfig`, which
chains them into one decoding strategy (greedy, sampling, or the per-step choice of beam search).

Each filter matches the Hugging Face transformers logits processor of the same purpose (named in its
docstring), so that greedy and beam search reproduce `transformers.generate` token for token. The token
history they read is the decode buffer `tokens [B, S]` with `valid [B, S]` marking real tokens (left
padding and the not-yet-written slots are invalid), so they work unchanged inside a jitted loop.

Written for XLA's CPU backend as much as for accelerators: no sort over the vocabulary (XLA's CPU sort
takes ~9 ms for one row of 50257), no variadic argmax reduction, and `lax.top_k` only with both of its
outputs used (otherwise XLA turns it into a full sort).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def limit_vocab(x: Array, vocab_limit: int | None) -> Array:
    """The first `vocab_limit` entries of the last axis of logits `[..., V]` or of an output projection
    `[D, V]`: the one rule for a model whose vocabulary is larger than its tokenizer's (GPT-2's 50,257 ids
    padded to 50,304, as llm.c and nanoGPT checkpoints are).

    The ids the tokenizer cannot decode get no logit at all (probability 0, as if masked to -inf): they
    are never chosen, and every strategy computes exactly what it computes for the same model with its
    vocabulary cut to `vocab_limit`, sampled draws included. `None` (or a limit >= V) keeps every id.
    """
    if vocab_limit is None or vocab_limit >= x.shape[-1]:
        return x
    return x[..., :vocab_limit]


def argmax(logits: Array) -> Array:
    """`[B, V] -> [B]` int32 index of the largest logit, the first one among ties (as torch and numpy).

    Two plain reductions (max, then the smallest index reaching it) instead of one (value, index)
    reduction, which XLA's CPU backend runs several times slower.
    """
    largest = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == largest, index, logits.shape[-1] - 1), axis=-1)


def draw_tokens(key: Array, logits: Array) -> Array:
    """`[B, V] -> [B]` a token drawn from softmax(logits); -inf logits (probability 0) are never drawn.

    Inverse transform: one uniform number per row, placed on the running sum of the probabilities. Gumbel-max
    would need V random numbers per row: 4 ms per row of GPT-2's 50,257 on XLA's CPU backend against 0.7 ms
    for this (measured together; the PRNG dominates). The float32 running sum rounds the mass of tokens
    below ~1e-7 probability, as `torch.multinomial`'s does.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32) * cdf[..., -1:]
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    # u * total may round up to the total: then the last token with any probability, never a masked one.
    last = jnp.max(jnp.where(probs > 0, index, 0), axis=-1)
    return jnp.minimum(jnp.sum(cdf <= u, axis=-1, dtype=jnp.int32), last)


def apply_temperature(logits: Array, temperature: Array | float) -> Array:
    """Divides the logits by `temperature` (HF's `TemperatureLogitsWarper`); below 1 sharpens, above 1 flattens."""
    return logits / jnp.asarray(temperature, logits.dtype)


def top_k_filter(logits: Array, k: Array | int, min_tokens_to_keep: int = 1) -> Array:
    """Keeps the `k` largest logits of each row and sets the rest to -inf (HF's `TopKLogitsWarper`).

    Ties with the k-th largest value are kept, as HF does. `k` is an int (every row) or an int array `[B]`
    (one per row, 0 = keep every logit). The k-th value comes from `kth_largest`: `lax.top_k` whose only
    use is its last value measured 12 ms per row of 50,257 on XLA's CPU backend (rewritten into a sort),
    the bisection 0.5 ms.
    """
    k = jnp.asarray(k, jnp.int32)
    kth = kth_largest(logits, jnp.clip(jnp.broadcast_to(k, logits.shape[:-1]), min_tokens_to_keep, logits.shape[-1]))
    return jnp.where(_column(k) > 0, jnp.where(logits < kth, -jnp.inf, logits), logits)


def _tail_mass(p: Array | float) -> Array:
    """`1 - p` as float32 (computed in float64 when `p` is a Python number, as HF does)."""
    return jnp.float32(1.0 - p) if isinstance(p, (int, float)) else 1.0 - jnp.asarray(p, jnp.float32)


def top_p_filter(logits: Array, p: Array | float, min_tokens_to_keep: int = 1) -> Array:
    """Nucleus filtering (HF's `TopPLogitsWarper`): keeps the smallest set of most likely tokens whose
    probability mass is at least `p` (and at least `min_tokens_to_keep` tokens); the rest become -inf.
    Tokens tied with the least likely kept one are kept too.

    Finds the probability threshold by bisection on its float32 bit pattern (monotone for non-negative
    floats): 31 masked sums over the vocabulary instead of a sort, and exact. As in HF, the test is on
    the dropped tail (mass <= 1 - p), which float32 sums accurately even when it is made of tiny
    probabilities.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    tail = _tail_mass(p)
    # Invariant: dropping the tokens with bits < lo drops mass <= 1 - p; dropping those below hi, more.
    lo = jnp.zeros(probs.shape[:-1] + (1,), jnp.int32)
    hi = jnp.full_like(lo, 0x3F800001)  # just above the bits of 1.0

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        can_drop = jnp.sum(jnp.where(bits < mid, probs, 0.0), axis=-1, keepdims=True) <= tail
        return jnp.where(can_drop, mid, lo), jnp.where(can_drop, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, halve, (lo, hi))
    keep = bits >= lo
    if min_tokens_to_keep > 1:
        keep = keep | (top_k_filter(logits, min_tokens_to_keep) > -jnp.inf)
    else:
        # The most likely token always stays (HF's min_tokens_to_keep=1): when 1 - p rounds to 1.0 in
        # float32 (p below ~6e-8), the bisection may drop every token, and a draw from all -inf is token 0.
        keep = keep | (logits >= jnp.max(logits, axis=-1, keepdims=True))
    return jnp.where(keep, logits, -jnp.inf)


def _seen_tokens(tokens: Array, valid: Array, vocab_size: int) -> Array:
    """`[B, V]` bool: which token ids occur among the valid entries of `tokens [B, S]`."""
    rows = jnp.arange(tokens.shape[0])[:, None]
    # Invalid entries land in a spare column V that is dropped; ids outside the vocabulary too.
    ids = jnp.where(valid & (tokens < vocab_size), tokens, vocab_size)
    return jnp.zeros((tokens.shape[0], vocab_size + 1), bool).at[rows, ids].set(True)[:, :vocab_size]


def repetition_penalty(logits: Array, tokens: Array, valid: Array, penalty: Array | float) -> Array:
    """Penalizes every token already in the sequence (prompt included, padding not), as in CTRL and HF's
    `RepetitionPenaltyLogitsProcessor`: a negative logit is multiplied by `penalty`, a positive one divided.
    """
    seen = _seen_tokens(tokens, valid, logits.shape[-1])
    penalty = jnp.asarray(penalty, logits.dtype)
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def no_repeat_ngram(logits: Array, tokens: Array, valid: Array, length: Array | int, n: int) -> Array:
    """Bans every token that would complete an n-gram already present (HF's `NoRepeatNGramLogitsProcessor`).

    Args:
      logits: `[B, V]`.
      tokens: `[B, S]` token buffer; slots `< length` hold the sequence so far.
      valid: `[B, S]`, False on left padding and unwritten slots; n-grams touching them do not count.
      length: how many slots are written (the next token goes to slot `length`).
      n: the n-gram size (a Python int >= 1).
    """
    b, s = tokens.shape
    if n > s:
        return logits
    # The last n - 1 tokens: an earlier n-gram that starts with them bans its final token.
    start = jnp.maximum(length - (n - 1), 0)
    prefix = jax.lax.dynamic_slice_in_dim(tokens, start, n - 1, axis=1)
    prefix_valid = jax.lax.dynamic_slice_in_dim(valid, start, n - 1, axis=1)
    windows = s - n + 1  # n-grams start at slots 0 .. s - n
    match = jnp.all(prefix_valid, axis=1, keepdims=True) & (length >= n)
    for j in range(n):
        match = match & valid[:, j:j + windows]
    for j in range(n - 1):
        match = match & (tokens[:, j:j + windows] == prefix[:, j:j + 1])
    vocab = logits.shape[-1]
    banned_ids = jnp.where(match & (tokens[:, n - 1:] < vocab), tokens[:, n - 1:], vocab)
    banned = jnp.zeros((b, vocab + 1), bool).at[jnp.arange(b)[:, None], banned_ids].set(True)[:, :vocab]
    return jnp.where(banned, -jnp.inf, logits)


def kth_largest(logits: Array, k: Array) -> Array:
    """`[B, V], [B] -> [B, 1]`: each row's k-th largest value (k >= 1, a per-row array), by bisection over
    the order-preserving integer image of float32 (32 masked counts instead of a sort; exact, ties count)."""
    bits = jax.lax.bitcast_convert_type(logits.astype(jnp.float32), jnp.int32)
    # Flip the magnitude bits of negative floats: the int32 order is then the float order (-inf included).
    key = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    lo = jnp.full(logits.shape[:-1] + (1,), jnp.iinfo(jnp.int32).min, jnp.int32)
    hi = jnp.full_like(lo, jnp.iinfo(jnp.int32).max)
    k = jnp.asarray(k).reshape(lo.shape)

    def halve(_, bounds):
        lo, hi = bounds  # invariant: count(key >= lo) >= k, and the answer is at most hi
        mid = (lo >> 1) + (hi >> 1) + (((lo & 1) + (hi & 1) + 1) >> 1)  # the upper middle, without overflow
        enough = jnp.sum(key >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    bits = jnp.where(lo < 0, lo ^ 0x7FFFFFFF, lo)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def frequency_presence_penalty(logits: Array, tokens: Array, generated: Array, frequency: Array | float,
                               presence: Array | float) -> Array:
    """OpenAI's penalties on the tokens generated so far (`generated [B, S]` marks them; the prompt does not
    count): `logit - frequency * count - presence * (count > 0)`."""
    b, vocab = logits.shape
    ids = jnp.where(generated & (tokens < vocab), tokens, vocab)
    counts = jnp.zeros((b, vocab + 1), jnp.float32).at[jnp.arange(b)[:, None], ids].add(1.0)[:, :vocab]
    return logits - (_column(frequency) * counts + _column(presence) * (counts > 0).astype(jnp.float32))


def _column(x: Array | float) -> Array | float:
    """A per-row setting `[B]` as `[B, 1]` (to broadcast over the vocabulary); a scalar unchanged."""
    return x[:, None] if getattr(x, "ndim", 0) == 1 else x


def _stage(run: Array | bool, fn, x: Array, otherwise=lambda y: y) -> Array:
    """`fn(x)` if `run`, else `otherwise(x)` (default: `x`). A Python bool is decided while tracing (a stage
    nothing asks for is not compiled: `generate`, one strategy per compilation); a traced scalar bool is
    decided per call with `lax.cond` (the server: one compiled step for any mix of requests, skipping what
    no row needs)."""
    if isinstance(run, (bool, np.bool_)):
        return fn(x) if run else otherwise(x)
    return jax.lax.cond(run, fn, otherwise, x)


@flax.struct.dataclass
class ChoiceStages:
    """Which stages of token choice run: each a Python bool (decided when tracing) or a traced scalar bool
    (decided per call; see `_stage`). A stage that runs still leaves rows whose setting is neutral as they are."""

    repetition_penalty: Array | bool = False
    counts_penalty: Array | bool = False  # OpenAI's presence / frequency penalties
    sample: Array | bool = False
    top_k: Array | bool = False
    top_p: Array | bool = False


@flax.struct.dataclass
class ChoiceSettings:
    """The numbers of token choice, each a scalar (every row alike) or `[B]` (one per row).

    `top_k` is an int or an int32 array (per-row k); 0 = off.
    `greedy` is a Python bool or a `[B]` bool array (those rows take the argmax even when others sample).
    """

    greedy: Array | bool = True
    temperature: Array | float = 1.0
    top_k: Array | int = 0
    top_p: Array | float = 1.0
    repetition_penalty: Array | float = 1.0
    frequency_penalty: Array | float = 0.0
    presence_penalty: Array | float = 0.0
    no_repeat_ngram_size: int = flax.struct.field(pytree_node=False, default=0)


def penalize(logits: Array, tokens: Array, history: Array, length: Array | int, settings: ChoiceSettings,
             stages: ChoiceStages, generated: Array | None = None) -> Array:
    """The penalties, in transformers' order: repetition (CTRL/HF, prompt included), OpenAI's presence and
    frequency (on `generated` tokens only), and the n-gram ban. `history [B, S]` marks the real tokens of
    the buffer `tokens` so far; `length` is how many slots are written (for the n-gram ban)."""
    logits = _stage(stages.repetition_penalty,
                    lambda x: repetition_penalty(x, tokens, history, _column(settings.repetition_penalty)), logits)
    logits = _stage(stages.counts_penalty, lambda x: frequency_presence_penalty(
        x, tokens, generated, settings.frequency_penalty, settings.presence_penalty), logits)
    if settings.no_repeat_ngram_size > 0:
        logits = no_repeat_ngram(logits, tokens, history, length, settings.no_repeat_ngram_size)
    return logits


def warp(logits: Array, settings: ChoiceSettings, stages: ChoiceStages, min_tokens_to_keep: int = 1) -> Array:
    """Temperature, top-k and top-p (HF's warpers, in its order): the `[B, V]` logits a sample is drawn from."""
    logits = apply_temperature(logits, _column(settings.temperature))
    logits = _stage(stages.top_k, lambda x: top_k_filter(x, settings.top_k, min_tokens_to_keep), logits)
    p = _column(settings.top_p)
    return _stage(stages.top_p, lambda x: jnp.where(p < 1, top_p_filter(x, p, min_tokens_to_keep), x), logits)


def choose_tokens(logits: Array, key: Array, tokens: Array, history: Array, length: Array | int,
                  settings: ChoiceSettings, stages: ChoiceStages, generated: Array | None = None) -> Array:
    """The next token `[B]` of every row: `penalize`, then the argmax, or a draw (`draw_tokens`) from `warp`'s
    logits. The one token choice of `generate` (one setting for the batch, static stages) and of the
    server's slots (per-row settings, stages decided per step).

    `key` is one PRNG key (`[2]`: one draw over the batch) or one per row (`[B, 2]`: each row's draw
    depends on its own key only).
    """
    logits = penalize(logits, tokens, history, length, settings, stages, generated)
    greedy_token = argmax(logits)
    if settings.greedy is True:
        return greedy_token

    def sampled(x):
        x = warp(x, settings, stages)
        if key.ndim == 2:
            return jax.vmap(lambda k, row: draw_tokens(k, row[None])[0])(key, x)
        return draw_tokens(key, x)

    token = _stage(stages.sample, sampled, logits, otherwise=lambda x: greedy_token)
    return token if settings.greedy is False else jnp.where(settings.greedy, greedy_token, token)


@flax.struct.dataclass
class GenerationConfig:
    """How the next token is chosen: penalties, then greedy or sampling with temperature, top-k and top-p,
    applied in transformers' order. Greedy search, sampling and beam search all run on it (hence the name
    Hugging Face uses for the same settings, not "sampling params").

    Numbers that may change between calls without recompiling (`temperature`, `top_p`,
    `repetition_penalty`) are pytree leaves; the choices that change the computation (`do_sample`,
    `top_k`, `no_repeat_ngram_size`, and whether top-p or the repetition penalty apply at all) are static.
    """

    temperature: Array | float = 1.0
    top_p: Array | float = 1.0
    repetition_penalty: Array | float = 1.0
    do_sample: bool = flax.struct.field(pytree_node=False, default=False)
    top_k: int = flax.struct.field(pytree_node=False, default=0)
    no_repeat_ngram_size: int = flax.struct.field(pytree_node=False, default=0)
    use_top_p: bool = flax.struct.field(pytree_node=False, default=False)
    use_repetition_penalty: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, *, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
               no_repeat_ngram_size=0) -> "GenerationConfig":
        return cls(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p),
                   repetition_penalty=jnp.float32(repetition_penalty), do_sample=bool(do_sample),
                   top_k=int(top_k) if do_sample else 0, no_repeat_ngram_size=int(no_repeat_ngram_size),
                   use_top_p=bool(do_sample and top_p < 1.0),
                   use_repetition_penalty=repetition_penalty != 1.0)

    @property
    def settings(self) -> ChoiceSettings:
        """These settings for `choose_tokens` (the same for every row)."""
        return ChoiceSettings(greedy=not self.do_sample, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                              no_repeat_ngram_size=self.no_repeat_ngram_size)

    @property
    def stages(self) -> ChoiceStages:
        """The stages these settings need, decided when tracing."""
        return ChoiceStages(repetition_penalty=self.use_repetition_penalty, sample=self.do_sample,
                            top_k=self.do_sample and self.top_k > 0, top_p=self.use_top_p)

    def penalize(self, logits: Array, tokens: Array, valid: Array, length: Array | int) -> Array:
        """The repetition penalty and the n-gram ban (for greedy, sampling and beams alike)."""
        return penalize(logits, tokens, valid, length, self.settings, self.stages)

    def warp(self, logits: Array, min_tokens_to_keep: int = 1) -> Array:
        """Temperature, top-k and top-p as `[B, V]` filtered logits (HF's warpers; sampling only)."""
        return warp(logits, self.settings, self.stages, min_tokens_to_keep)

    def process(self, logits: Array, tokens: Array, valid: Array, length: Array | int,
                min_tokens_to_keep: int = 1) -> Array:
        """`penalize`, then `warp` when sampling: the logits HF's processor list would hand to its sampler."""
        logits = self.penalize(logits, tokens, valid, length)
        return self.warp(logits, min_tokens_to_keep) if self.do_sample else logits

    def choose(self, logits: Array, tokens: Array, valid: Array, length: Array | int, key: Array) -> Array:
        """The next token `[B]`: the most likely one, or a sample from the processed distribution
        (`choose_tokens`, the same code the server's slots run)."""
        return choose_tokens(logits, key, tokens, valid, length, self.settings, self.stages)

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
    """`[B, V] -> [B]` a token drawn from softmax(logits) (Gumbel-max); -inf logits are never drawn."""
    return argmax(logits + jax.random.gumbel(key, logits.shape, jnp.float32))


def apply_temperature(logits: Array, temperature: Array | float) -> Array:
    """Divides the logits by `temperature` (HF's `TemperatureLogitsWarper`); below 1 sharpens, above 1 flattens."""
    return logits / jnp.asarray(temperature, logits.dtype)


def _top_k(logits: Array, k: int) -> tuple[Array, Array]:
    """`lax.top_k` clipped to the vocabulary: the k largest values `[B, k]` (descending) and their indices."""
    return jax.lax.top_k(logits, min(k, logits.shape[-1]))


def top_k_filter(logits: Array, k: int, min_tokens_to_keep: int = 1) -> Array:
    """Keeps the `k` largest logits of each row and sets the rest to -inf (HF's `TopKLogitsWarper`).

    Ties with the k-th largest value are kept, as HF does. `k` is a Python int (it fixes a shape).
    """
    values, indices = _top_k(logits, max(k, min_tokens_to_keep))
    # The k-th value, read both from `values` and through its index: equal, but using both outputs keeps
    # lax.top_k on XLA's TopK kernel (with one output dead, XLA CPU rewrites it into a full sort).
    kth = jnp.minimum(values[:, -1:], jnp.take_along_axis(logits, indices[:, -1:], axis=1))
    return jnp.where(logits < kth, -jnp.inf, logits)


def nucleus_of_sorted(sorted_logits: Array, p: Array | float, min_tokens_to_keep: int = 1) -> Array:
    """For candidates sorted in descending order, `[B, N]` bool: the smallest prefix whose probability mass
    (softmax over the candidates) is at least `p`, and at least `min_tokens_to_keep` of them."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # HF's rule: drop the tokens whose cumulative mass, summed from the least likely up, is <= 1 - p.
    mass_from_bottom = jnp.cumsum(probs[..., ::-1], axis=-1)[..., ::-1]
    keep = mass_from_bottom > _tail_mass(p)
    return keep | (jnp.arange(sorted_logits.shape[-1]) < min_tokens_to_keep)


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

    def penalize(self, logits: Array, tokens: Array, valid: Array, length: Array | int) -> Array:
        """The repetition penalty and the n-gram ban (for greedy, sampling and beams alike)."""
        if self.use_repetition_penalty:
            logits = repetition_penalty(logits, tokens, valid, self.repetition_penalty)
        if self.no_repeat_ngram_size > 0:
            logits = no_repeat_ngram(logits, tokens, valid, length, self.no_repeat_ngram_size)
        return logits

    def warp(self, logits: Array, min_tokens_to_keep: int = 1) -> Array:
        """Temperature, top-k and top-p as `[B, V]` filtered logits (HF's warpers; sampling only)."""
        logits = apply_temperature(logits, self.temperature)
        if self.top_k > 0:
            logits = top_k_filter(logits, self.top_k, min_tokens_to_keep)
        if self.use_top_p:
            logits = top_p_filter(logits, self.top_p, min_tokens_to_keep)
        return logits

    def process(self, logits: Array, tokens: Array, valid: Array, length: Array | int,
                min_tokens_to_keep: int = 1) -> Array:
        """`penalize`, then `warp` when sampling: the logits HF's processor list would hand to its sampler."""
        logits = self.penalize(logits, tokens, valid, length)
        return self.warp(logits, min_tokens_to_keep) if self.do_sample else logits

    def choose(self, logits: Array, tokens: Array, valid: Array, length: Array | int, key: Array) -> Array:
        """The next token `[B]`: the most likely one, or a sample from the processed distribution.

        With top-k, the draw is among the k candidates only (the k largest, ties broken by index, where
        `top_k_filter` keeps every tie): a softmax over k values instead of the vocabulary.
        """
        logits = self.penalize(logits, tokens, valid, length)
        if not self.do_sample:
            return argmax(logits)
        logits = apply_temperature(logits, self.temperature)
        if self.top_k > 0:
            values, indices = _top_k(logits, self.top_k)
            if self.use_top_p:
                values = jnp.where(nucleus_of_sorted(values, self.top_p), values, -jnp.inf)
            return jnp.take_along_axis(indices, draw_tokens(key, values)[:, None], axis=1)[:, 0]
        if self.use_top_p:
            logits = top_p_filter(logits, self.top_p)
        return draw_tokens(key, logits)


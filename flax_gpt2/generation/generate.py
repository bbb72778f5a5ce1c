"""`generate` and `generate_stream`: check the arguments, left-pad the prompt to a length bucket, dispatch to
the jitted greedy/sampling loop or to beam search, and cut the bucket padding off again.

Compiled code depends only on the model, the batch size, the prompt bucket, the cache bucket and the
strategy's static choices (greedy or sampling, top-k, n-gram size, number of beams); a new prompt length in
the same bucket, a new `max_new_tokens` within the cache bucket, a new temperature, top-p, seed, EOS or pad
id reuses the compiled computation.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2.generation import beam_search, sampling
from flax_gpt2.generation.logits_processors import GenerationConfig
from flax_gpt2.generation.model_step import output_projection
from flax_gpt2.modeling.model import GPT2LMHeadModel, unwrap_params

_output_projection = jax.jit(output_projection, static_argnums=(0, 2))
_heads: dict[tuple[int, int | None], tuple[weakref.ref, jax.Array]] = {}


def _head(model: GPT2LMHeadModel, params: Any, vocab_limit: int | None) -> jax.Array:
    """`output_projection(model, params, vocab_limit)`; on CPU a copy it makes (the transposed tied
    embeddings, or the first `vocab_limit` columns) is kept for as long as the weights live, so that
    later calls skip the copy (~40 ms for GPT-2 124M, as much as the whole prefill of a short prompt)."""
    if vocab_limit is not None and vocab_limit >= model.config.vocab_size:
        vocab_limit = None
    tied = model.config.tie_word_embeddings
    if not tied and vocab_limit is None:
        return params["lm_head"]["kernel"]
    weights = params["transformer"]["wte"]["embedding"] if tied else params["lm_head"]["kernel"]
    try:  # where the weights are decides, not the default backend
        platforms = {d.platform for d in weights.devices()}
    except (AttributeError, jax.errors.ConcretizationTypeError):  # a host array or a tracer: default device
        platforms = {jax.default_backend()}
    if platforms != {"cpu"}:
        return _output_projection(model, params, vocab_limit)
    key = (id(weights), vocab_limit)
    if key in _heads and _heads[key][0]() is weights:
        return _heads[key][1]
    head = _output_projection(model, params, vocab_limit)
    _heads[key] = (weakref.ref(weights, lambda _: _heads.pop(key, None)), head)
    return head


def bucket_length(n: int) -> int:
    """The padded length for `n` tokens: the next power of two from 16 up to 256, then a multiple of 128."""
    if n <= 256:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 128) * 128


def _as_int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)):
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a.astype(np.int64)


def _check_vocab_limit(model, vocab_limit) -> int:
    """The number of ids the strategies may choose from: `vocab_limit` (checked), else the model's vocabulary."""
    vocab = model.config.vocab_size
    if vocab_limit is None:
        return vocab
    if not _is_int(vocab_limit) or not 1 <= vocab_limit <= vocab:
        raise ValueError(f"vocab_limit must be None or an integer from 1 to the model's vocab_size ({vocab}), "
                         f"got {vocab_limit!r}; pass the tokenizer's vocab_size")
    return int(vocab_limit)


def _check_prompt(model, input_ids, attention_mask, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(model, GPT2LMHeadModel):
        raise TypeError(f"generate needs a GPT2LMHeadModel, got {type(model).__name__}")
    ids = _as_int_array(input_ids, "input_ids")
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    if ids.shape[0] == 0:
        raise ValueError("input_ids has an empty batch")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        limit = "" if vocab == model.config.vocab_size else " (vocab_limit: the ids the tokenizer can decode)"
        raise ValueError(f"input_ids must lie in [0, {vocab}){limit}, found ids from {ids.min()} to {ids.max()}")
    if attention_mask is None:
        mask = np.ones_like(ids)
    else:
        mask = _as_int_array(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}; they must match")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if ids.shape[1] == 0:
        # GPT-2 was trained on documents that follow <|endoftext|>; an empty prompt starts from it.
        ids = np.full((ids.shape[0], 1), model.config.bos_token_id, np.int64)
        mask = np.ones_like(ids)
    if np.any(np.diff(mask, axis=1) < 0):
        raise ValueError("attention_mask must be left-padded (zeros before the tokens in every row); "
                         "right padding would put the padding between the prompt and the new tokens")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"rows {empty.tolist()} of attention_mask are all padding (an empty prompt); "
                         f"start them with <|endoftext|> (id {model.config.bos_token_id}) instead")
    return ids, mask


# The smallest sampling temperature: logits are divided by it in float32, and GPT-2's logits (|x| up to
# a few hundred) divided by much less overflow to inf, which turns the softmax into NaN.
MIN_TEMPERATURE = 1e-4
MAX_SEED = 2**32 - 1  # jax.random.PRNGKey takes a 32-bit seed


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    """A finite real number (int or float, not bool): NaN and ±inf are never a meaningful setting."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and np.isfinite(x)


def check_seed(seed, name: str = "seed") -> int:
    """`seed` as an int, or a ValueError: it must be an integer in [0, 2**32 - 1]."""
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**32 - 1] (jax.random.PRNGKey takes 32 bits), "
                         f"got {seed!r}")
    return int(seed)


def check_sampling_options(*, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, length_penalty=1.0,
                           seed=0) -> None:
    """ValueError unless every numeric generation setting is finite and in its range (see `generate`).

    `temperature` must be at least `MIN_TEMPERATURE` (smaller values overflow float32 logits); for the
    most likely token use greedy decoding (`do_sample=False`) instead of a tiny temperature.
    """
    if not _is_real(temperature) or not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"temperature must be > 0 and at least {MIN_TEMPERATURE:g} (smaller values overflow "
                         f"float32 logits), got {temperature!r}; for greedy decoding use do_sample=False")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not _is_real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not _is_real(repetition_penalty) or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 and finite (1.0 disables it), got {repetition_penalty!r}")
    if not _is_real(length_penalty):
        raise ValueError(f"length_penalty must be a finite number (1.0 is the default), got {length_penalty!r}")
    check_seed(seed)


def _check_options(config, *, prompt_length, max_new_tokens, do_sample, temperature, top_k, top_p,
                   repetition_penalty, no_repeat_ngram_size, num_beams, num_return_sequences, eos_token_id,
                   pad_token_id, length_penalty=1.0, seed=0):
    is_int = _is_int
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if prompt_length + max_new_tokens > config.n_positions:
        raise ValueError(
            f"prompt length {prompt_length} + max_new_tokens {max_new_tokens} = {prompt_length + max_new_tokens} "
            f"exceeds the model's n_positions={config.n_positions}; shorten the prompt or ask for fewer tokens")
    check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, length_penalty=length_penalty, seed=seed)
    if not is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be an integer >= 0, got {no_repeat_ngram_size!r}")
    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    if not is_int(num_return_sequences) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) cannot exceed num_beams ({num_beams})")
    if num_beams == 1 and not do_sample and num_return_sequences > 1:
        raise ValueError("greedy decoding returns a single sequence per prompt: set do_sample=True or "
                         f"num_beams >= num_return_sequences to get {num_return_sequences}")
    for name, token in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if token is not None and (not is_int(token) or not 0 <= token < config.vocab_size):
            raise ValueError(f"{name} must be None or a token id in [0, {config.vocab_size}), got {token!r}")


def _prepare(model, input_ids, attention_mask, max_new_tokens, vocab, options):
    """Validates, then left-pads the prompt to its bucket. Returns the device arguments and the layout."""
    ids, mask = _check_prompt(model, input_ids, attention_mask, vocab)
    config = model.config
    _check_options(config, prompt_length=ids.shape[1], max_new_tokens=max_new_tokens, **options)
    t = ids.shape[1]
    # Bucket the prompt and the cache so that nearby lengths share one compiled computation.
    prompt_len = max(t, min(bucket_length(t), config.n_positions - max_new_tokens))
    cache_len = max(prompt_len + max_new_tokens, min(bucket_length(prompt_len + max_new_tokens), config.n_positions))
    extra = prompt_len - t
    ids = np.pad(ids, ((0, 0), (extra, 0)))
    mask = np.pad(mask, ((0, 0), (extra, 0)))
    eos = options["eos_token_id"]
    pad = options["pad_token_id"]
    pad = pad if pad is not None else (eos if eos is not None else 0)
    return dict(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask, jnp.int32),
                eos_token_id=jnp.int32(-1 if eos is None else eos), pad_token_id=jnp.int32(pad),
                seed=jnp.uint32(options["seed"]), cache_len=cache_len), extra


def _setup(model, params, input_ids, attention_mask, max_new_tokens, vocab_limit, **options):
    """What `generate` and `generate_stream` share: checked, padded arguments, unwrapped params, the
    sampling strategy and the output projection (cut to `vocab_limit`)."""
    vocab = _check_vocab_limit(model, vocab_limit)
    args, extra = _prepare(model, input_ids, attention_mask, max_new_tokens, vocab, options)
    params = unwrap_params(params)
    strategy = GenerationConfig.create(**{k: options[k] for k in (
        "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size")})
    return args, extra, params, strategy, _head(model, params, vocab)


def generate(model: GPT2LMHeadModel, params: Any, input_ids, attention_mask=None, *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, num_beams: int = 1,
             length_penalty: float = 1.0, num_return_sequences: int = 1, eos_token_id: int | None = None,
             pad_token_id: int | None = None, seed: int = 0, vocab_limit: int | None = None) -> np.ndarray:
    """Generates continuations of a batch of prompts, like transformers' `generate`.

    Prefill and every decoding step run in one compiled computation over a preallocated KV cache.

    Args:
      model: a `GPT2LMHeadModel`.
      params: its parameters (or `{"params": params}`).
      input_ids: `[batch, prompt_length]` token ids; prompts of different lengths are left-padded. An empty
        prompt (`prompt_length == 0`) starts from `<|endoftext|>` (`config.bos_token_id`).
      attention_mask: `[batch, prompt_length]`, 1 on tokens and 0 on the left padding (default all ones).
        Each row's output equals generating that prompt alone.
      max_new_tokens: how many tokens to add; `prompt_length + max_new_tokens` must fit `n_positions`.
      do_sample: sample instead of taking the most likely token (or the best beams).
      temperature, top_k, top_p: sampling warpers (only with `do_sample`); `top_k=0` and `top_p=1.0`
        disable theirs. `temperature` must be at least `MIN_TEMPERATURE` (1e-4; smaller values overflow
        float32 logits): for the most likely token, use `do_sample=False`.
      repetition_penalty: > 1 discourages tokens already in the prompt or output (CTRL's penalty).
      no_repeat_ngram_size: if > 0, no n-gram of this size occurs twice.
      num_beams: > 1 runs beam search (with `do_sample`, beam sampling).
      length_penalty: beam search scores a finished hypothesis `sum log p / new_tokens ** length_penalty`
        (any finite number).
      num_return_sequences: sequences per prompt (samples, or the best beams); copies are adjacent rows.
      eos_token_id: a row that produces it stops, and the rest of its row is `pad_token_id`. None: never stop.
      pad_token_id: the filler after EOS (default `eos_token_id`).
      seed: the random seed, an integer in [0, 2**32 - 1]; the same seed and arguments give the same tokens.
      vocab_limit: the tokenizer's `vocab_size` when the model's vocabulary is larger (padded, e.g. 50,304
        for GPT-2's 50,257): ids from it on are never chosen (they get no logit; the result equals the
        model cut to `vocab_limit` ids), and a prompt holding one is a ValueError. None: every model id.
    Raises:
      ValueError: an argument is out of range or not finite (NaN, inf); the message names it.
    Returns:
      A numpy int32 array `[batch * num_return_sequences, prompt_length + max_new_tokens]`: the (padded)
      prompt, then the new tokens.
    """
    args, extra, params, strategy, head = _setup(
        model, params, input_ids, attention_mask, max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, num_beams=num_beams, length_penalty=length_penalty,
        num_return_sequences=num_return_sequences, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
        vocab_limit=vocab_limit)
    if num_beams > 1:
        tokens = beam_search.beam_search_tokens(
            model, params, head, args["input_ids"], args["attention_mask"], strategy, jnp.float32(length_penalty),
            args["eos_token_id"], args["pad_token_id"], args["seed"], jnp.int32(max_new_tokens),
            cache_len=args["cache_len"], num_beams=num_beams, num_return_sequences=num_return_sequences)
    else:
        tokens = sampling.generate_tokens(
            model, params, head, args["input_ids"], args["attention_mask"], strategy, args["eos_token_id"],
            args["pad_token_id"], args["seed"], jnp.int32(max_new_tokens), cache_len=args["cache_len"],
            num_return_sequences=num_return_sequences)
    end = args["input_ids"].shape[1] + max_new_tokens
    return np.asarray(tokens)[:, extra:end]


def generate_stream(model: GPT2LMHeadModel, params: Any, input_ids, attention_mask=None, *, max_new_tokens: int,
                    do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, num_return_sequences: int = 1,
                    eos_token_id: int | None = None, pad_token_id: int | None = None, seed: int = 0,
                    tokens_per_chunk: int = 1, vocab_limit: int | None = None) -> Iterator[np.ndarray]:
    """Like `generate` (greedy or sampling), but yields the new tokens as they are produced.

    Yields numpy int32 arrays `[batch * num_return_sequences, n]` of the next `n <= tokens_per_chunk` new
    tokens; together they are exactly the new tokens `generate` returns with the same arguments (stopping
    early when every row has produced EOS). Stop iterating to stop generating. The decode loop stays
    compiled; between chunks only the new tokens come back to the host.
    """
    if not isinstance(tokens_per_chunk, int) or tokens_per_chunk < 1:
        raise ValueError(f"tokens_per_chunk must be a positive integer, got {tokens_per_chunk!r}")
    args, _, params, strategy, head = _setup(
        model, params, input_ids, attention_mask, max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, num_beams=1, num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, vocab_limit=vocab_limit)
    prompt_len = args["input_ids"].shape[1]
    state = sampling.start(model, params, head, args["input_ids"], args["attention_mask"], strategy,
                           args["eos_token_id"], args["pad_token_id"], args["seed"],
                           cache_len=args["cache_len"], num_return_sequences=num_return_sequences)
    done = 0
    while True:
        # Copies (np.array, not a view): the next decode call donates these buffers.
        step, tokens, finished = int(state.step), np.array(state.tokens), np.array(state.finished)
        yield tokens[:, prompt_len + done:prompt_len + step]
        done = step
        if step >= max_new_tokens or finished.all():
            return
        stop_at = jnp.int32(min(step + tokens_per_chunk, max_new_tokens))
        state = sampling.decode(model, params, head, state, strategy, stop_at)

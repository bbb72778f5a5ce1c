"""`generate` and `generate_stream`: check the arguments, left-pad the prompt to a length bucket, dispatch to
the jitted greedy/sampling loop, to beam search or to speculative decoding, and cut the bucket padding off
again (the prompt checks and bucketing: `prompts.py`).

Compiled code depends only on the model, the batch size, the prompt bucket, the cache bucket and the
strategy's static choices (greedy or sampling, top-k, n-gram size, number of beams); a new prompt length in
the same bucket, a new `max_new_tokens` within the cache bucket, a new temperature, top-p, seed, EOS or pad
id reuses the compiled computation.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np

from flax_gpt2.generation import beam_search, sampling
from flax_gpt2.generation.options import GenerateOptions
from flax_gpt2.generation.prompts import output_head, prepare_prompts
from flax_gpt2.generation.speculative import speculative_generate, speculative_stream
from flax_gpt2.modeling.model import GPT2LMHeadModel, unwrap_params


def _setup(model, params, input_ids, attention_mask, options: GenerateOptions | None, overrides: dict):
    """What `generate` and `generate_stream` share: the options, checked, padded arguments, unwrapped params,
    the sampling strategy and the output projection (cut to `vocab_limit`)."""
    if options is None and "max_new_tokens" not in overrides:
        raise TypeError("missing the required keyword argument max_new_tokens")
    options = GenerateOptions.of(options, overrides)
    args, extra, vocab = prepare_prompts(model, input_ids, attention_mask, options)
    params = unwrap_params(params)
    return options, args, extra, params, options.strategy(), output_head(model, params, vocab)


def generate(model: GPT2LMHeadModel, params: Any, input_ids, attention_mask=None, *,
             options: GenerateOptions | None = None, draft: tuple[GPT2LMHeadModel, Any] | None = None,
             num_draft_tokens: int = 4, prompt_lookup_ngram: int | None = None, draft_schedule: str = "constant",
             **kwargs: Any) -> np.ndarray:
    """Generates continuations of a batch of prompts, like transformers' `generate`.

    Prefill and every decoding step run in one compiled computation over a preallocated KV cache.

    Args:
      model: a `GPT2LMHeadModel`.
      params: its parameters (or `{"params": params}`).
      input_ids: `[batch, prompt_length]` token ids; prompts of different lengths are left-padded. An empty
        prompt (`prompt_length == 0`) starts from `<|endoftext|>` (`config.bos_token_id`).
      attention_mask: `[batch, prompt_length]`, 1 on tokens and 0 on the left padding (default all ones).
        Each row's output equals generating that prompt alone.
      options: a `GenerateOptions` (optional).
      **kwargs: `GenerateOptions` fields, overriding `options`' (`max_new_tokens` is required without
        `options`): `max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
        no_repeat_ngram_size, num_beams, length_penalty, num_return_sequences, eos_token_id, pad_token_id,
        seed, vocab_limit`; see `GenerateOptions` for each.
      draft, num_draft_tokens, prompt_lookup_ngram: speculative decoding (greedy or sampling, without
        penalties, beams or several sequences per prompt): `draft=(draft_model, draft_params)` or
        `prompt_lookup_ngram=n` proposes `num_draft_tokens` tokens per target call; the output is the
        target's own (see `flax_gpt2.generation.speculative`).
      draft_schedule: "constant", or "heuristic" to adapt a draft model's proposals per round (1 to
        `num_draft_tokens`) to how many were kept.
    Raises:
      ValueError: an argument is out of range or not finite (NaN, inf); the message names it.
    Returns:
      A numpy int32 array `[batch * num_return_sequences, prompt_length + max_new_tokens]`: the (padded)
      prompt, then the new tokens.
    """
    if draft is not None or prompt_lookup_ngram is not None:
        return _speculative(model, params, input_ids, attention_mask, GenerateOptions.of(options, kwargs), draft,
                            num_draft_tokens, prompt_lookup_ngram, draft_schedule)
    options, args, extra, params, strategy, head = _setup(model, params, input_ids, attention_mask, options, kwargs)
    max_new_tokens, num_beams, num_return_sequences = (options.max_new_tokens, options.num_beams,
                                                       options.num_return_sequences)
    if num_beams > 1:
        tokens = beam_search.beam_search_tokens(
            model, params, head, args["input_ids"], args["attention_mask"], strategy,
            jnp.float32(options.length_penalty),
            args["eos_token_id"], args["pad_token_id"], args["seed"], jnp.int32(max_new_tokens),
            cache_len=args["cache_len"], num_beams=num_beams, num_return_sequences=num_return_sequences)
    else:
        tokens = sampling.generate_tokens(
            model, params, head, args["input_ids"], args["attention_mask"], strategy, args["eos_token_id"],
            args["pad_token_id"], args["seed"], jnp.int32(max_new_tokens), cache_len=args["cache_len"],
            num_return_sequences=num_return_sequences)
    end = args["input_ids"].shape[1] + max_new_tokens
    return np.asarray(tokens)[:, extra:end]


def _check_speculative(options: GenerateOptions) -> None:
    unsupported = dict(repetition_penalty=(options.repetition_penalty, 1.0),
                       no_repeat_ngram_size=(options.no_repeat_ngram_size, 0), num_beams=(options.num_beams, 1),
                       num_return_sequences=(options.num_return_sequences, 1))
    for name, (value, default) in unsupported.items():
        if value != default:
            raise ValueError(f"speculative decoding (draft / prompt_lookup_ngram) does not support {name}="
                             f"{value!r}; leave it at {default!r} or drop the draft")
    if options.max_new_tokens is None:
        raise TypeError("missing the required keyword argument max_new_tokens")


def _speculative(model, params, input_ids, attention_mask, options: GenerateOptions, draft, num_draft_tokens,
                 prompt_lookup_ngram, draft_schedule="constant"):
    _check_speculative(options)
    return speculative_generate(
        model, params, input_ids, attention_mask, max_new_tokens=options.max_new_tokens, draft=draft,
        prompt_lookup_ngram=prompt_lookup_ngram, num_draft_tokens=num_draft_tokens, do_sample=options.do_sample,
        temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
        eos_token_id=options.eos_token_id, pad_token_id=options.pad_token_id, seed=options.seed,
        vocab_limit=options.vocab_limit, draft_schedule=draft_schedule)


def generate_stream(model: GPT2LMHeadModel, params: Any, input_ids, attention_mask=None, *,
                    options: GenerateOptions | None = None, tokens_per_chunk: int = 1,
                    draft: tuple[GPT2LMHeadModel, Any] | None = None, num_draft_tokens: int = 4,
                    prompt_lookup_ngram: int | None = None, draft_schedule: str = "constant",
                    **kwargs: Any) -> Iterator[np.ndarray]:
    """Like `generate` (greedy or sampling), but yields the new tokens as they are produced.

    Yields numpy int32 arrays `[batch * num_return_sequences, n]` of the next `n <= tokens_per_chunk` new
    tokens; together they are exactly the new tokens `generate` returns with the same arguments (stopping
    early when every row has produced EOS). Stop iterating to stop generating. The decode loop stays
    compiled; between chunks only the new tokens come back to the host.

    With `draft` or `prompt_lookup_ngram` (speculative decoding, as in `generate`), each chunk is what one
    verification round (`tokens_per_chunk` rounds) added to every row: between 1 and `num_draft_tokens + 1`
    tokens per round, so `n` varies.
    """
    if not isinstance(tokens_per_chunk, int) or tokens_per_chunk < 1:
        raise ValueError(f"tokens_per_chunk must be a positive integer, got {tokens_per_chunk!r}")
    if draft is not None or prompt_lookup_ngram is not None:
        options = GenerateOptions.of(options, kwargs)
        _check_speculative(options)
        yield from speculative_stream(
            model, params, input_ids, attention_mask, max_new_tokens=options.max_new_tokens,
            rounds_per_chunk=tokens_per_chunk, draft=draft, prompt_lookup_ngram=prompt_lookup_ngram,
            num_draft_tokens=num_draft_tokens, do_sample=options.do_sample, temperature=options.temperature,
            top_k=options.top_k, top_p=options.top_p, eos_token_id=options.eos_token_id,
            pad_token_id=options.pad_token_id, seed=options.seed, vocab_limit=options.vocab_limit,
            draft_schedule=draft_schedule)
        return
    options, args, _, params, strategy, head = _setup(model, params, input_ids, attention_mask, options, kwargs)
    if options.num_beams != 1:
        raise ValueError(f"generate_stream does greedy search or sampling: num_beams must be 1, got "
                         f"{options.num_beams!r} (beam search's best beams are only known at the end)")
    max_new_tokens, num_return_sequences = options.max_new_tokens, options.num_return_sequences
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

"""What every decoding loop starts from: the checked prompt, left-padded to its length bucket, and the output
projection (cut to the tokenizer's vocabulary) that turns hidden states into logits.

`generate`, `generate_stream` and speculative decoding share these, so a prompt is checked and bucketed one way
whichever loop runs it.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2.generation.model_step import output_projection
from flax_gpt2.generation.options import GenerateOptions
from flax_gpt2.modeling.model import GPT2LMHeadModel
from flax_gpt2.utils.buckets import bucket_length
from flax_gpt2.utils.validation import is_int

_output_projection = jax.jit(output_projection, static_argnums=(0, 2))
_heads: dict[tuple[int, int | None], tuple[weakref.ref, jax.Array]] = {}


def output_head(model: GPT2LMHeadModel, params: Any, vocab_limit: int | None) -> jax.Array:
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


def _as_int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)):
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a.astype(np.int64)


def check_vocab_limit(model, vocab_limit) -> int:
    """The number of ids the strategies may choose from: `vocab_limit` (checked), else the model's vocabulary."""
    vocab = model.config.vocab_size
    if vocab_limit is None:
        return vocab
    if not is_int(vocab_limit) or not 1 <= vocab_limit <= vocab:
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


def prepare_prompts(model, input_ids, attention_mask, options: GenerateOptions):
    """Validates, then left-pads the prompt to its bucket. Returns the device arguments and the layout."""
    vocab = check_vocab_limit(model, options.vocab_limit)
    ids, mask = _check_prompt(model, input_ids, attention_mask, vocab)
    config = model.config
    options.check(config.n_positions, config.vocab_size, prompt_length=ids.shape[1])
    t, max_new_tokens = ids.shape[1], options.max_new_tokens
    # Bucket the prompt and the cache so that nearby lengths share one compiled computation.
    prompt_len = bucket_length(t, cap=config.n_positions - max_new_tokens)
    cache_len = bucket_length(prompt_len + max_new_tokens, cap=config.n_positions)
    extra = prompt_len - t
    ids = np.pad(ids, ((0, 0), (extra, 0)))
    mask = np.pad(mask, ((0, 0), (extra, 0)))
    eos, pad = options.eos_token_id, options.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    return dict(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask, jnp.int32),
                eos_token_id=jnp.int32(-1 if eos is None else eos), pad_token_id=jnp.int32(pad),
                seed=jnp.uint32(options.seed), cache_len=cache_len), extra, vocab

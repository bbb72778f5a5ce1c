"""`pipeline("text-generation", model=...)`: text in, text out, like transformers' pipeline of that name.

    from flax_gpt2 import pipeline, set_seed
    generator = pipeline("text-generation", model="gpt2")
    set_seed(42)
    generator("Hello, I'm a language model,", max_length=30, num_return_sequences=5)
    # [{'generated_text': "Hello, I'm a language model, ..."}, ...]
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from flax_gpt2.checkpoints.loading import check_vocab, tokenizer_source
from flax_gpt2.checkpoints.pretrained import from_pretrained, resolve
from flax_gpt2.generation.generate import generate
from flax_gpt2.generation.options import GenerateOptions
from flax_gpt2.generation.text import TEXT_DEFAULTS
from flax_gpt2.tokenizer.bpe_tokenizer import ENDOFTEXT, USER_TEXT_SPECIAL, Tokenizer, get_tokenizer

_DEFAULT_MAX_NEW_TOKENS = 256  # transformers' text-generation default
_seeds = np.random.default_rng(0)


def set_seed(seed: int) -> None:
    """Makes the following pipeline calls reproducible (each call draws its seed from this sequence).

    Like `transformers.set_seed`, for flax_gpt2's generation; the sequence starts at seed 0 when it is
    never called. A `seed=` given to a call wins over it.
    """
    global _seeds
    _seeds = np.random.default_rng(seed)


class TextGenerationPipeline:
    """Generates continuations of strings. Build it with `pipeline("text-generation", model=...)`."""

    def __init__(self, model, params, tokenizer):
        self.model, self.params, self.tokenizer = model, params, tokenizer

    def __call__(self, text_inputs: str | Sequence[str], *, max_length: int | None = None,
                 max_new_tokens: int | None = None, return_full_text: bool = True, seed: int | None = None,
                 **generate_kwargs: Any) -> list[dict[str, str]] | list[list[dict]]:
        """Generates text for one prompt (returns a list of dicts) or several (a list of such lists).

        Args:
          text_inputs: a prompt or a list of prompts. `<|endoftext|>` in a prompt is the special token; an
            empty prompt starts from it.
          max_length: the length in tokens of prompt plus continuation (per prompt), as in transformers.
          max_new_tokens: the number of new tokens (wins over `max_length`); default 256 (as transformers)
            or what still fits the model's `n_positions`.
          **generate_kwargs: `flax_gpt2.GenerateOptions` fields (`do_sample`, `temperature`, `top_k`, ...,
            `num_return_sequences`, `num_beams`). The defaults are transformers': sampling with top-k 50.
          return_full_text: prepend the prompt to each generated text.
          seed: the random seed; default the next one from `set_seed`'s sequence.
        Returns:
          `[{"generated_text": str}, ...]` with `num_return_sequences` entries per prompt.
        """
        single = isinstance(text_inputs, str)
        prompts = [text_inputs] if single else text_inputs
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"text_inputs must be a string or a non-empty list of strings, got {text_inputs!r}")

        eot = self.tokenizer.eot_token
        # <|endoftext|> is the only special token a prompt may contain (a custom BPE's others are plain text).
        # An empty prompt starts from <|endoftext|>, as GPT-2 was trained; rows are left-padded for generate.
        ids, mask = self.tokenizer.encode_batch([p or ENDOFTEXT for p in prompts], padding_side="left", pad_id=eot,
                                                allowed_special=USER_TEXT_SPECIAL)
        lengths = [int(n) for n in mask.sum(axis=1)]
        longest = ids.shape[1]
        n_positions = self.model.config.n_positions
        if max_new_tokens is not None:
            per_prompt = [max_new_tokens] * len(prompts)
        elif max_length is not None:
            per_prompt = [max_length - n for n in lengths]
            short = [i for i, n in enumerate(per_prompt) if n < 1]
            if short:
                raise ValueError(f"max_length={max_length} leaves no room for new tokens after prompt {short[0]} "
                                 f"({lengths[short[0]]} tokens); raise it or pass max_new_tokens")
        else:
            per_prompt = [min(_DEFAULT_MAX_NEW_TOKENS, n_positions - longest)] * len(prompts)
        if seed is None:
            seed = int(_seeds.integers(2**31 - 1))
        # One batch; each row's output equals generating it alone, so a shorter max_length just cuts it.
        options = GenerateOptions.of(TEXT_DEFAULTS, generate_kwargs).replace(
            max_new_tokens=max(per_prompt), eos_token_id=eot, pad_token_id=eot, seed=seed,
            vocab_limit=self.tokenizer.vocab_size)
        out = np.asarray(generate(self.model, self.params, ids, mask, options=options))
        num_return_sequences = options.num_return_sequences
        results = []
        for i, prompt in enumerate(prompts):
            rows = out[i * num_return_sequences:(i + 1) * num_return_sequences, longest:longest + per_prompt[i]]
            texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
            results.append([{"generated_text": prompt + t if return_full_text else t} for t in texts])
        return results[0] if single else results


def pipeline(task: str = "text-generation", model: Any = None, *, tokenizer: Any = None, dtype: Any = None,
             progress: bool = True, adapter: str | os.PathLike | None = None) -> TextGenerationPipeline:
    """A text-generation pipeline, as `transformers.pipeline("text-generation", model=...)`.

    Args:
      task: only "text-generation".
      model: a hub id, a Hugging Face folder or a flax_gpt2 training run (loaded with
        `flax_gpt2.from_pretrained`), or a `(model, params)` pair.
      tokenizer: a `flax_gpt2.tokenizer.bpe_tokenizer.Tokenizer` or where to load one from; default the model folder's
        (`vocab.json` + `merges.txt`), else the standard GPT-2 tokenizer.
      dtype: compute dtype for a model loaded here (e.g. `jnp.bfloat16`).
      progress: show loading progress.
      adapter: a PEFT LoRA adapter folder for a model loaded here, merged into its weights
        (`from_pretrained(adapter=)`).
    """
    if task != "text-generation":
        raise ValueError(f"flax_gpt2.pipeline supports only task='text-generation', got {task!r}")
    if model is None:
        raise ValueError("pass model=: a hub id such as 'gpt2', a model folder, or a (model, params) pair")
    folder = None
    if isinstance(model, (str, os.PathLike)):
        folder = resolve(model, progress=progress)
        model, params = from_pretrained(folder, dtype=dtype, progress=progress, adapter=adapter)
    elif adapter is not None:
        raise ValueError("adapter= applies to a model loaded by name; for a (model, params) pair, merge it first: "
                         "flax_gpt2.merge_adapter(params, *flax_gpt2.load_peft_adapter(DIR, params, model.config))")
    else:
        model, params = model
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = get_tokenizer(tokenizer if tokenizer is not None else tokenizer_source(folder))
    check_vocab(model.config, tokenizer)
    return TextGenerationPipeline(model, params, tokenizer)

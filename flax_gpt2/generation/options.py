"""`GenerateOptions`: every setting of `generate` in one frozen object, checked in one place.

`generate(model, params, ids, max_new_tokens=20, do_sample=True)` builds one from its keywords;
`generate(model, params, ids, options=opts)` takes one whole (and keywords then override its fields), so the
pipeline, `generate_text`, lm-eval and the benchmarks pass settings along without restating them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax_gpt2.generation.logits_processors import GenerationConfig
from flax_gpt2.utils.validation import is_int, is_real

# The smallest sampling temperature: logits are divided by it in float32, and GPT-2's logits (|x| up to
# a few hundred) divided by much less overflow to inf, which turns the softmax into NaN.
MIN_TEMPERATURE = 1e-4
MAX_SEED = 2**32 - 1  # jax.random.PRNGKey takes a 32-bit seed


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """How `generate` continues prompts (transformers' `generate` keywords and defaults).

    Attributes:
      max_new_tokens: how many tokens to add; prompt length + max_new_tokens must fit `n_positions`.
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
    """

    max_new_tokens: int | None = None  # required by generate
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    seed: int = 0
    vocab_limit: int | None = None

    @classmethod
    def of(cls, options: "GenerateOptions | None" = None, overrides: Mapping[str, Any] | None = None
           ) -> "GenerateOptions":
        """`options` (default: the defaults) with `overrides` applied; a TypeError names an unknown keyword."""
        base = options if options is not None else cls()
        if not isinstance(base, GenerateOptions):
            raise TypeError(f"options must be a GenerateOptions, got {type(base).__name__}")
        unknown = sorted(set(overrides or ()) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown generation option(s) {', '.join(unknown)}; the options are "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return dataclasses.replace(base, **(overrides or {}))

    def replace(self, **changes: Any) -> "GenerateOptions":
        return GenerateOptions.of(self, changes)

    def strategy(self) -> GenerationConfig:
        """The device-side token choice these options ask for (penalties, greedy or sampling warpers)."""
        return GenerationConfig.create(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k,
                                       top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                                       no_repeat_ngram_size=self.no_repeat_ngram_size)

    def check(self, n_positions: int, vocab_size: int, prompt_length: int) -> None:
        """ValueError naming the first option out of range for this model and prompt (NaN and inf included)."""
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if prompt_length + self.max_new_tokens > n_positions:
            raise ValueError(
                f"prompt length {prompt_length} + max_new_tokens {self.max_new_tokens} = "
                f"{prompt_length + self.max_new_tokens} exceeds the model's n_positions={n_positions}; shorten "
                "the prompt or ask for fewer tokens")
        check_sampling_options(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               repetition_penalty=self.repetition_penalty, length_penalty=self.length_penalty,
                               seed=self.seed)
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        n = self.num_return_sequences
        if not is_int(n) or n < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {n!r}")
        if self.num_beams > 1 and n > self.num_beams:
            raise ValueError(f"num_return_sequences ({n}) cannot exceed num_beams ({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and n > 1:
            raise ValueError("greedy decoding returns a single sequence per prompt: set do_sample=True or "
                             f"num_beams >= num_return_sequences to get {n}")
        for name, token in (("eos_token_id", self.eos_token_id), ("pad_token_id", self.pad_token_id)):
            if token is not None and (not is_int(token) or not 0 <= token < vocab_size):
                raise ValueError(f"{name} must be None or a token id in [0, {vocab_size}), got {token!r}")


def check_seed(seed, name: str = "seed") -> int:
    """`seed` as an int, or a ValueError: it must be an integer in [0, 2**32 - 1]."""
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**32 - 1] (jax.random.PRNGKey takes 32 bits), "
                         f"got {seed!r}")
    return int(seed)


def check_sampling_options(*, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, length_penalty=1.0,
                           seed=0) -> None:
    """ValueError unless every numeric generation setting is finite and in its range (see `GenerateOptions`).

    `temperature` must be at least `MIN_TEMPERATURE` (smaller values overflow float32 logits); for the
    most likely token use greedy decoding (`do_sample=False`) instead of a tiny temperature.
    """
    if not is_real(temperature) or not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"temperature must be > 0 and at least {MIN_TEMPERATURE:g} (smaller values overflow "
                         f"float32 logits), got {temperature!r}; for greedy decoding use do_sample=False")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not is_real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not is_real(repetition_penalty) or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 and finite (1.0 disables it), got {repetition_penalty!r}")
    if not is_real(length_penalty):
        raise ValueError(f"length_penalty must be a finite number (1.0 is the default), got {length_penalty!r}")
    check_seed(seed)

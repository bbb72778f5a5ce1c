"""`generate_text`: text in, text out, optionally streamed; what `python -m flax_gpt2.sample` runs."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from flax_gpt2.generation.detokenize import Detokenizer
from flax_gpt2.generation.generate import generate, generate_stream
from flax_gpt2.generation.options import GenerateOptions
from flax_gpt2.tokenizer.bpe_tokenizer import USER_TEXT_SPECIAL

# transformers' defaults for text generation: sampling with top-k 50 (and 20 new tokens).
TEXT_DEFAULTS = GenerateOptions(max_new_tokens=20, do_sample=True, top_k=50)


def generate_text(model, params, tokenizer, prompt: str, *, stop_token: str | None = None,
                  stream: Callable[[str], None] | None = None, draft: tuple[Any, Any] | None = None,
                  num_draft_tokens: int = 4, prompt_lookup_ngram: int | None = None,
                  draft_schedule: str = "constant", **generate_kwargs: Any) -> list[str]:
    """Continues `prompt` (text in, text out); returns each sequence's text (prompt + continuation).

    Greedy, sampled (the default: `TEXT_DEFAULTS`) or beam search, as `generate_kwargs` (`GenerateOptions`
    fields) say; the end-of-text id and the tokenizer's vocabulary limit come from `tokenizer`.

    `<|endoftext|>` in the prompt is the special token (as in the model card's CommonGen format), and the
    only one: a custom BPE's other special tokens are plain text there. An empty prompt starts from it.
    Only ids the tokenizer can decode are generated (`vocab_limit`: a model vocabulary padded past the
    tokenizer's never yields its extra ids). The continuation ends at <|endoftext|> and, with
    `stop_token`, just before that string. With `stream` (one greedy or sampled sequence only), the prompt
    and then the continuation are passed to it piece by piece as they are produced (never half a character,
    never text that could still be the start of `stop_token`); generation stops once the stop string appears.
    `draft` / `prompt_lookup_ngram` / `num_draft_tokens` / `draft_schedule`: speculative decoding
    (`generate`'s); streamed, it passes on what each verification round accepted.
    """
    ids = tokenizer.encode(prompt, allowed_special=USER_TEXT_SPECIAL) or [tokenizer.eot_token]
    options = GenerateOptions.of(TEXT_DEFAULTS, generate_kwargs).replace(
        eos_token_id=tokenizer.eot_token, vocab_limit=tokenizer.vocab_size)
    speculative = dict(draft=draft, num_draft_tokens=num_draft_tokens, prompt_lookup_ngram=prompt_lookup_ngram,
                       draft_schedule=draft_schedule)
    if stream is not None:
        if options.num_return_sequences != 1 or options.num_beams != 1:
            raise ValueError("streaming prints one sequence: it needs num_return_sequences=1 and num_beams=1")
        stream(prompt)
        text = Detokenizer((stop_token,) if stop_token else ())
        for chunk in generate_stream(model, params, [ids], options=options, **speculative):
            if _add_tokens(text, tokenizer, chunk[0].tolist()):
                break  # <|endoftext|> or the stop string: stop generating
            if piece := text.take(final=False):
                stream(piece)
        if piece := text.take(final=True):
            stream(piece)
        return [prompt + text.text]
    out = np.asarray(generate(model, params, [ids], options=options, **speculative))
    return [prompt + continuation(tokenizer, row[len(ids):].tolist(), stop_token) for row in out]


def continuation(tokenizer, tokens: list[int], stop_token: str | None = None) -> str:
    """The text of new tokens up to the first <|endoftext|>, cut just before `stop_token` (not included)."""
    text = Detokenizer((stop_token,) if stop_token else ())
    _add_tokens(text, tokenizer, tokens)
    text.take(final=True)
    return text.text


def _add_tokens(text: Detokenizer, tokenizer, tokens: list[int]) -> bool:
    """Feeds tokens up to <|endoftext|>; True once the text is finished (end of text or a stop string)."""
    for token in tokens:
        if token == tokenizer.eot_token:
            return True
        if text.add(tokenizer.encoding.decode_single_token_bytes(token)):
            return True
    return False

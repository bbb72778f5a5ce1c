"""Text generation: one jitted prefill + decode loop over a KV cache, the decoding strategies (small functions on
logits, equal to transformers' processors), text in/text out, and a pipeline."""

from flax_gpt2.generation.generate import generate, generate_stream
from flax_gpt2.generation.logits_processors import (GenerationConfig, apply_temperature, draw_tokens, limit_vocab,
                                                    no_repeat_ngram, repetition_penalty, top_k_filter, top_p_filter)
from flax_gpt2.generation.options import GenerateOptions
from flax_gpt2.generation.text import generate_text

__all__ = ["GenerateOptions", "GenerationConfig", "apply_temperature", "draw_tokens", "generate", "generate_stream",
           "generate_text", "limit_vocab", "no_repeat_ngram", "repetition_penalty", "top_k_filter", "top_p_filter"]

"""Text generation: one jitted prefill + decode loop over a KV cache, the decoding strategies, and a pipeline."""

from flax_gpt2.deprecation import renamed_attributes
from flax_gpt2.generation.generate import bucket_length, generate, generate_stream
from flax_gpt2.generation.logits_processors import (GenerationConfig, apply_temperature, draw_tokens, limit_vocab,
                                                    no_repeat_ngram, repetition_penalty, top_k_filter, top_p_filter)


# The old name, kept importable: it drives greedy and beam search too, not only sampling.
__getattr__ = renamed_attributes(__name__, SamplingParams=("GenerationConfig", GenerationConfig))

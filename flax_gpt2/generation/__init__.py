"""Text generation: one jitted prefill + decode loop over a KV cache, the decoding strategies, and a pipeline."""

from flax_gpt2.generation.generate import bucket_length, generate, generate_stream
from flax_gpt2.generation.logits_processors import (SamplingParams, apply_temperature, no_repeat_ngram,
                                                    repetition_penalty, top_k_filter, top_p_filter)

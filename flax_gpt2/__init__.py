"""flax_gpt2: GPT-2 in JAX/Flax, equal to Hugging Face transformers' GPT-2.

The public API: the config and models, Hugging Face import/export, LoRA adapters (PEFT's format), the tokenizer,
and generation.
"""

from flax_gpt2.checkpoints.hf_state_dict import hf_state_dict_from_params, params_from_hf_state_dict
from flax_gpt2.checkpoints.peft_adapters import load_peft_adapter, save_peft_adapter
from flax_gpt2.checkpoints.pretrained import from_pretrained, save_pretrained
from flax_gpt2.evaluation.lm_eval_registration import register_lm_eval_model as _register_lm_eval_model
from flax_gpt2.generation import GenerateOptions, generate, generate_stream
from flax_gpt2.generation.pipeline import pipeline, set_seed
from flax_gpt2.modeling.config import PRESETS, GPT2Config
from flax_gpt2.modeling.kv_cache import KVCache
from flax_gpt2.modeling.lora import LoRAConfig, apply_lora, init_lora, merge_adapter
from flax_gpt2.modeling.model import (GPT2DoubleHeadsModel, GPT2DoubleHeadsOutput, GPT2LMHeadModel, GPT2LMOutput,
                                      GPT2Model, GPT2ModelOutput, init_params)
from flax_gpt2.tokenizer.bpe_tokenizer import ENDOFTEXT, Tokenizer, get_tokenizer

_register_lm_eval_model()  # lm-eval's model "flax_gpt2", when lm_eval is installed (lazy: nothing heavy imported)

__all__ = [
    "PRESETS", "GPT2Config", "KVCache", "GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ModelOutput",
    "GPT2LMOutput", "GPT2DoubleHeadsOutput", "init_params", "from_pretrained", "save_pretrained",
    "hf_state_dict_from_params", "params_from_hf_state_dict", "ENDOFTEXT", "Tokenizer", "get_tokenizer",
    "GenerateOptions", "generate", "generate_stream", "pipeline", "set_seed", "LoRAConfig", "init_lora",
    "apply_lora", "merge_adapter", "save_peft_adapter", "load_peft_adapter",
]

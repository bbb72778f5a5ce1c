"""flax_gpt2: GPT-2 in JAX/Flax."""

from flax_gpt2.config import PRESETS, GPT2Config
from flax_gpt2.kv_cache import KVCache
from flax_gpt2.model import (GPT2DoubleHeadsModel, GPT2DoubleHeadsOutput, GPT2LMHeadModel, GPT2LMOutput,
                             GPT2Model, GPT2ModelOutput, init_params)
from flax_gpt2.tokenizer import ENDOFTEXT, Tokenizer, get_tokenizer
from flax_gpt2.pretrained import from_pretrained, save_pretrained
from flax_gpt2.weights import hf_state_dict_from_params, params_from_hf_state_dict

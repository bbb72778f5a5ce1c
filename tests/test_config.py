"""GPT2Config: presets, parameter counts, and the Hugging Face config.json bridge (against transformers)."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

import flax_gpt2
from flax_gpt2 import GPT2Config

# GPT2LMHeadModel parameter counts (tied embeddings counted once), as transformers counts them.
PARAM_COUNTS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "distilgpt2": 81_912_576,
}


@pytest.mark.parametrize("preset", sorted(PARAM_COUNTS))
def test_preset_parameter_counts(preset):
    config = GPT2Config.from_preset(preset)
    assert config.num_params == PARAM_COUNTS[preset]
    # transformers' own count, on the meta device (no memory, no init).
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_config()))
    assert sum(p.numel() for p in hf.parameters()) == PARAM_COUNTS[preset]
    # Our model's count, from shapes only.
    shapes = jax.eval_shape(flax_gpt2.GPT2LMHeadModel(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(nn.unbox(shapes["params"]))) == PARAM_COUNTS[preset]


def test_untied_parameter_count():
    config = GPT2Config.from_preset("tiny", tie_word_embeddings=False)
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_config()))
    assert config.num_params == sum(p.numel() for p in hf.parameters())


VARIANTS = [
    {}, dict(activation_function="relu", n_inner=100, layer_norm_epsilon=1e-3),
    dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    dict(tie_word_embeddings=False, summary_type="mean", summary_activation="tanh", summary_proj_to_labels=False),
]


@pytest.mark.parametrize("preset", sorted(flax_gpt2.PRESETS))
@pytest.mark.parametrize("overrides", VARIANTS, ids=["plain", "mlp", "attention", "heads"])
def test_hf_config_round_trip_through_transformers(preset, overrides):
    config = GPT2Config.from_preset(preset, **overrides)
    hf = transformers.GPT2Config(**config.to_hf_config())
    for key, value in config.to_hf_config().items():
        if key not in ("architectures", "task_specific_params"):
            assert getattr(hf, key) == value, key
    assert GPT2Config.from_hf_config(hf.to_dict()) == config
    assert GPT2Config.from_hf_config(json.loads(hf.to_json_string())) == config


def test_reads_config_json_transformers_wrote(hf_tiny):
    _, folder = hf_tiny
    config = GPT2Config.from_hf_config(folder)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (64, 2, 4, 128)
    assert config.vocab_size == 50257
    assert config == GPT2Config.from_hf_config(folder / "config.json")
    assert config.to_hf_config()["architectures"] == ["GPT2LMHeadModel"]


def test_hf_aliases_and_overrides():
    config = GPT2Config.from_hf_config({"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 8,
                                        "max_position_embeddings": 64}, dtype=jnp.bfloat16)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (128, 3, 8, 64)
    assert config.dtype == jnp.bfloat16 and config.param_dtype == jnp.float32


def test_unknown_field_that_may_change_the_math_is_an_error():
    hf = GPT2Config().to_hf_config()
    hf.update(rotary_dim=64, use_parallel_residual=True)
    with pytest.raises(ValueError, match=r"fields flax_gpt2 does not know: \['rotary_dim', 'use_parallel_residual'\]"):
        GPT2Config.from_hf_config(hf)


def test_unsupported_activation_is_an_error(tmp_path):
    hf = GPT2Config().to_hf_config()
    hf["activation_function"] = "gelu_10"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"activation_function='gelu_10' is not supported; choose one of"):
        GPT2Config.from_hf_config(tmp_path)
    with pytest.raises(ValueError, match=r"summary_activation='softmax' is not supported"):
        GPT2Config(summary_activation="softmax")


def test_add_cross_attention_is_an_error():
    with pytest.raises(ValueError, match="add_cross_attention=True is not supported"):
        GPT2Config.from_hf_config({**GPT2Config().to_hf_config(), "add_cross_attention": True})


def test_other_bad_configs_are_named():
    with pytest.raises(ValueError, match=r"model_type='gptj'"):
        GPT2Config.from_hf_config({"model_type": "gptj"})
    with pytest.raises(ValueError, match="pruned_heads"):
        GPT2Config.from_hf_config({"pruned_heads": {"0": [1]}})
    with pytest.raises(ValueError, match=r"n_embd \(100\) must be divisible by n_head \(12\)"):
        GPT2Config(n_embd=100)
    with pytest.raises(ValueError, match="unknown GPT-2 preset 'gpt3'"):
        GPT2Config.from_preset("gpt3")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPT2Config().n_layer = 3

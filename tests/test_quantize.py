"""int8 weight-only quantization (`flax_gpt2.modeling.quantize`): bytes, the quantizer against NumPy, the quantized
forward against the float forward on the dequantized weights (flax and transformers), generation in both layer
layouts, perplexity against the float model, the command lines and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model

import flax_gpt2
from flax_gpt2 import sample as sample_cli
from flax_gpt2.assets import TINYSHAKESPEARE, path as asset_path
from flax_gpt2.checkpoints.hf_state_dict import hf_state_dict_from_params
from flax_gpt2.checkpoints.loading import load_model
from flax_gpt2.evaluation.perplexity import perplexity
from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.lora import LoRAConfig, apply_lora, init_lora
from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params
from flax_gpt2.modeling.quantize import Int8Weight, is_quantized, parameter_bytes, quantize_params, quantize_weight
from flax_gpt2.serve import __main__ as serve_cli
from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer

MAX_RATIO = 0.35  # int8 parameter bytes / float32 parameter bytes, the bound
IS_Q = dict(is_leaf=lambda x: isinstance(x, Int8Weight))


def dequantized(params):
    """The float params the quantized model computes with: every Int8Weight as q * scale, computed in NumPy."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x.q, np.float64) * np.asarray(x.scale, np.float64),
                                              jnp.float32) if isinstance(x, Int8Weight) else x, params, **IS_Q)


def tiny(scan_layers=False, **kwargs):
    kw = dict(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.3)
    kw.update(kwargs)
    return flax_gpt2.GPT2Config(scan_layers=scan_layers, **kw)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random GPT-2 (every parameter redrawn, peaked next-token distributions) with the GPT-2 tokenizer."""
    return make_hf_model(tmp_path_factory, "quantize_model", randomize=True, randomize_std=0.3, n_positions=128)


# --- bytes ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(flax_gpt2.PRESETS))
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_bytes_of_every_preset(preset, tied):
    """Abstract params (jax.eval_shape): the int8 tree takes <= 0.35x the float32 bytes, for both layouts."""
    for scan in (False, True):
        config = flax_gpt2.GPT2Config.from_preset(preset, scan_layers=scan, tie_word_embeddings=tied)
        model = GPT2LMHeadModel(config)
        float_params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        int8_params = jax.eval_shape(lambda: quantize_params(init_params(model, jax.random.key(0))))
        assert parameter_bytes(float_params) == 4 * config.num_params
        ratio = parameter_bytes(int8_params) / parameter_bytes(float_params)
        assert ratio <= MAX_RATIO, (preset, tied, scan, ratio)
        leaves = jax.tree.leaves_with_path(int8_params)
        int8_bytes = sum(x.size for _, x in leaves if x.dtype == jnp.int8)
        assert int8_bytes == config.num_params - config.n_positions * config.n_embd - _small(config), preset


def _small(config):
    """Biases and LayerNorm parameters: what stays float besides wpe."""
    d, f = config.n_embd, config.mlp_dim
    return config.n_layer * (4 * d + 3 * d + d + f + d) + 2 * d


def test_parameter_bytes_measured_on_the_tiny_model():
    model = GPT2LMHeadModel(tiny())
    params = init_params(model, jax.random.key(0))
    qparams = quantize_params(params)
    ratio = parameter_bytes(qparams) / parameter_bytes(params)
    assert ratio <= MAX_RATIO
    assert sum(x.nbytes for x in jax.tree.leaves(qparams)) == parameter_bytes(qparams)  # from the arrays
    blocks = qparams["transformer"]["h_0"]
    assert blocks["attn"]["c_attn"]["kernel"].q.dtype == jnp.int8
    assert blocks["attn"]["c_attn"]["kernel"].scale.shape == (1, 3, 4, 16)  # one per output channel
    assert blocks["attn"]["c_proj"]["kernel"].scale.shape == (1, 1, 64)
    assert qparams["transformer"]["wte"]["embedding"].scale.shape == (256, 1)  # one per vocabulary row
    assert qparams["transformer"]["wpe"]["embedding"].dtype == jnp.float32
    assert blocks["ln_1"]["scale"].dtype == jnp.float32 and blocks["mlp"]["c_fc"]["bias"].dtype == jnp.float32


# --- the quantizer --------------------------------------------------------------------------------------------

def test_quantizer_matches_numpy():
    """Per output channel: scale = max|w| / 127, q = round(w / scale); an all-zero channel stays zero."""
    w = np.random.default_rng(0).normal(size=(8, 3, 4, 5)).astype(np.float32)
    w[:, 1, 2, 3] = 0.0
    got = quantize_weight(w, (0,))
    scale = np.abs(w).max(axis=0, keepdims=True) / 127
    q = np.round(w / np.where(scale > 0, scale, 1))
    np.testing.assert_array_equal(np.asarray(got.q), q.astype(np.int8))
    np.testing.assert_allclose(np.asarray(got.scale), scale, rtol=2.4e-7)  # XLA divides by 127 to within 2 ulp
    assert np.abs(np.asarray(got.q)).max() == 127
    assert np.abs(got.dequantize() - w).max() <= scale.max() / 2 * (1 + 1e-6)  # rounding: half a step at most


def test_int8_weight_indexing_and_transpose():
    w = np.random.default_rng(1).normal(size=(6, 10)).astype(np.float32)
    qw = quantize_weight(w, (1,))  # [V, D]: a scale per row, like wte
    head = qw.T  # [D, V]
    assert head.shape == (10, 6) and head.scale.shape == (1, 6)
    np.testing.assert_array_equal(head[..., :4].dequantize(), qw.dequantize().T[:, :4])
    np.testing.assert_array_equal(qw[2].dequantize(), qw.dequantize()[2])
    np.testing.assert_array_equal(qw[1:3, 5].dequantize(), qw.dequantize()[1:3, 5])
    with pytest.raises(IndexError, match="basic indexing"):
        qw[np.array([0, 1])]


# --- the quantized forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_forward_equals_float_forward_on_dequantized_weights(scan_layers, tied):
    model = GPT2LMHeadModel(tiny(scan_layers, tie_word_embeddings=tied, initializer_range=0.02))  # GPT-2's init
    params = init_params(model, jax.random.key(0))
    qparams = quantize_params(params)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
    got = model.apply({"params": qparams}, ids).logits
    want = model.apply({"params": dequantized(qparams)}, ids).logits
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got - want).max()) <= 1e-5 * scale
    # Against the float model: rounding to 255 levels per channel moves each weight by at most half a step,
    # max|w|/254; RMS max|w|/(127*sqrt(12)), i.e. 0.23% of max|w|, ~0.7% of the std of a Gaussian channel of
    # 64-256 weights (max|w| ~ 3 std). The nine quantized matrices on the path (2 layers x 4, and the head) with
    # independent errors add in quadrature: ~2% of the logits' RMS at GPT-2's init (0.02), where the blocks are
    # near-linear; 3% is the bound. (Much larger random weights amplify errors through the softmax and GELU.)
    exact = model.apply({"params": params}, ids).logits
    rel = float(jnp.sqrt(jnp.mean((got - exact) ** 2)) / jnp.sqrt(jnp.mean(exact ** 2)))
    assert rel <= 0.03, rel


def test_bfloat16_compute():
    config = tiny(dtype=jnp.bfloat16, initializer_range=0.02)
    model = GPT2LMHeadModel(config)
    params = init_params(model, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
    got = model.apply({"params": quantize_params(params)}, ids).logits
    want = model.apply({"params": params}, ids).logits
    assert got.dtype == jnp.float32
    rel = float(jnp.sqrt(jnp.mean((got - want) ** 2)) / jnp.sqrt(jnp.mean(want ** 2)))
    assert rel <= 0.05, rel  # the int8 error above, plus bfloat16 rounding (2^-8) of two different computations


def test_from_pretrained_int8_against_transformers(hf_folder):
    """from_pretrained(quantize="int8") equals transformers' GPT-2 holding the dequantized weights (1e-5)."""
    torch_model, folder = hf_folder
    model, qparams = flax_gpt2.from_pretrained(folder, quantize="int8", progress=False)
    assert is_quantized(qparams)
    ids = np.random.default_rng(2).integers(0, 50257, (2, 16))
    got = np.asarray(model.apply({"params": qparams}, jnp.asarray(ids)).logits)
    state = hf_state_dict_from_params(dequantized(qparams), model.config, GPT2LMHeadModel)
    reference = type(torch_model)(torch_model.config).eval()
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    reference.tie_weights()
    with torch.no_grad():
        want = reference(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    with torch.no_grad():
        exact = torch_model(torch.as_tensor(ids)).logits.numpy()
    rel = np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact ** 2))
    assert rel <= 0.05  # the bound argued above, for weights 15x GPT-2's init (errors grow through the softmax)


# --- generation -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_generate_greedy(scan_layers, tied):
    """KV-cache decoding on int8 params makes the tokens the float model makes on the dequantized weights, in both
    layouts, tied or untied, with a vocab_limit (the head's columns cut) too."""
    model = GPT2LMHeadModel(tiny(scan_layers, tie_word_embeddings=tied))
    params = init_params(model, jax.random.key(3))
    qparams = quantize_params(params)
    ids = np.random.default_rng(4).integers(0, 200, (3, 7))
    for vocab_limit in (None, 200):
        got = flax_gpt2.generate(model, qparams, ids, max_new_tokens=12, do_sample=False, vocab_limit=vocab_limit)
        want = flax_gpt2.generate(model, dequantized(qparams), ids, max_new_tokens=12, do_sample=False,
                                  vocab_limit=vocab_limit)
        np.testing.assert_array_equal(got, want)
    other = layer_stacking.to_layout(qparams, not scan_layers)  # the int8 tree converts between layouts
    other_model = GPT2LMHeadModel(tiny(not scan_layers, tie_word_embeddings=tied))
    np.testing.assert_array_equal(flax_gpt2.generate(other_model, other, ids, max_new_tokens=12, do_sample=False),
                                  flax_gpt2.generate(model, qparams, ids, max_new_tokens=12, do_sample=False))


def test_perplexity_and_greedy_agreement_on_held_out_text(hf_folder, capsys):
    """On Tiny Shakespeare's last 10% (held out), the int8 model's perplexity is within 1% of the float model's
    (random weights with peaked next-token distributions); the rate at which both pick the same next token is
    reported."""
    _, folder = hf_folder
    model, params = flax_gpt2.from_pretrained(folder, progress=False)
    _, qparams = flax_gpt2.from_pretrained(folder, quantize="int8", progress=False)
    with open(asset_path(TINYSHAKESPEARE), encoding="utf-8") as f:
        text = f.read()
    tokens = get_tokenizer(folder).encode(text[int(0.9 * len(text)):])[:2048]
    ppl = perplexity(model, params, tokens, stride=128, progress=False)["perplexity"]
    qppl = perplexity(model, qparams, tokens, stride=128, progress=False)["perplexity"]
    ids = jnp.asarray(np.asarray(tokens[:16 * 128]).reshape(16, 128), jnp.int32)
    greedy = jnp.argmax(model.apply({"params": params}, ids).logits, -1)
    qgreedy = jnp.argmax(model.apply({"params": qparams}, ids).logits, -1)
    agreement = float(jnp.mean(greedy == qgreedy))
    with capsys.disabled():
        print(f"\nheld-out perplexity float {ppl:.4g}, int8 {qppl:.4g} ({qppl / ppl - 1:+.3%}); "
              f"greedy next-token agreement {agreement:.1%}")
    assert abs(qppl / ppl - 1) <= 0.01
    assert agreement >= 0.9


# --- command lines and errors ---------------------------------------------------------------------------------

def test_sample_cli_int8(hf_folder, capsys, monkeypatch, tmp_path):
    _, folder = hf_folder
    monkeypatch.setattr(sample_cli, "enable_compilation_cache", lambda cache_dir=None: None)
    monkeypatch.setenv("FLAX_GPT2_CACHE", str(tmp_path / "cache"))
    args = ["--model", str(folder), "--prompt", "Hello there", "--max_new_tokens", "6", "--greedy", "--no_progress"]
    assert sample_cli.main([*args, "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    model, qparams, tokenizer = load_model(str(folder), quantize="int8", progress=False)
    prompt = tokenizer.encode("Hello there")
    tokens = flax_gpt2.generate(model, qparams, [prompt], max_new_tokens=6, do_sample=False,
                                vocab_limit=tokenizer.vocab_size)
    assert out == "Hello there" + tokenizer.decode(tokens[0, len(prompt):].tolist()) + "\n"


@pytest.mark.parametrize("value", ["int4", "INT8", "float32", ""])
def test_bad_quantize_flag(value, capsys):
    assert sample_cli.main(["--prompt", "Hi", "--quantize", value]) == 2
    err = capsys.readouterr().err
    assert "--quantize" in err and "int8" in err
    with pytest.raises(SystemExit) as e:
        serve_cli.parse_args(["--model", "gpt2", "--quantize", value])
    assert e.value.code == 2


@pytest.mark.parametrize("value", ["int4", "INT8", 8, True])
def test_bad_quantize_value(hf_folder, value):
    _, folder = hf_folder
    with pytest.raises(ValueError, match=r"quantize must be None .* 'int8'"):
        flax_gpt2.from_pretrained(folder, quantize=value, progress=False)
    with pytest.raises(ValueError, match="quantize must be"):
        load_model(str(folder), quantize=value, progress=False)


def test_int8_params_are_for_inference_only(tmp_path):
    model = GPT2LMHeadModel(tiny())
    params = init_params(model, jax.random.key(0))
    qparams = quantize_params(params)
    with pytest.raises(ValueError, match="already int8-quantized"):
        quantize_params(qparams)
    with pytest.raises(ValueError, match="save_pretrained needs float weights"):
        flax_gpt2.save_pretrained(tmp_path / "out", model, qparams, tokenizer=False, progress=False)
    lora = LoRAConfig(rank=2)
    with pytest.raises(ValueError, match="apply_lora .* needs float weights"):
        apply_lora(qparams, init_lora(jax.random.key(1), params, model.config, lora), lora)
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(TypeError, match="int8"):  # jax refuses to differentiate int8 leaves: no silent training
        jax.grad(lambda p: model.apply({"params": p}, ids).logits.sum())(qparams)
    bad = jax.tree.map(lambda x: x, params)
    fc = bad["transformer"]["h_1"]["mlp"]["c_fc"]
    fc["kernel"] = fc["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_params(bad)

"""LoRA adapters through loading and the commands, against the real Hugging Face PEFT and transformers:
`from_pretrained(adapter=)`, `convert --adapter --merge` and `--format peft`, `sample --adapter`,
`evaluate --adapter` and `pipeline(adapter=)`, each compared with a PEFT model made by PEFT itself."""

import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import make_hf_model
from safetensors import safe_open

import flax_gpt2
from flax_gpt2 import convert, evaluate, sample
from flax_gpt2.checkpoints.peft_adapters import BASE_HASH_KEY, AdapterError, base_weights_sha256
from flax_gpt2.generation.pipeline import pipeline
from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer

TINY = dict(n_positions=64, n_embd=32, n_layer=2, n_head=4)  # GPT-2's vocabulary: the commands tokenize text
EOT = 50256
IDS = np.random.default_rng(0).integers(0, EOT, (2, 9))
PROMPT = "To be, or not to be, that is"
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."


@pytest.fixture(scope="module")
def base(tmp_path_factory, bpe_dir):
    """(torch GPT2LMHeadModel, its save_pretrained folder with GPT-2's tokenizer files), every parameter random."""
    return make_hf_model(tmp_path_factory, "lora_loading_base", randomize=True, **TINY)


def _torch_base(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


def _peft_model(folder, out, seed=0, **lora_kwargs):
    """A PEFT LoRA model of the torch base at `folder`, saved by PEFT to `out`. `init_lora_weights=False`
    (PEFT's random B) and then every lora_A/lora_B redrawn larger, so that the adapter moves the logits."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    model = peft.get_peft_model(_torch_base(folder), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """(PEFT folder, the PEFT torch model) on c_attn, both c_proj and c_fc, rank 4, alpha 8."""
    out = tmp_path_factory.mktemp("peft_adapter")
    model = _peft_model(base[1], out, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])
    return out, model


@pytest.fixture(scope="module")
def wide_adapter(tmp_path_factory):
    """A PEFT adapter for a wider base (n_embd 64): its shapes do not fit `base`."""
    _, wide_folder = make_hf_model(tmp_path_factory, "lora_loading_wide", tokenizer_files=False,
                                   **{**TINY, "vocab_size": 100, "n_embd": 64})
    out = tmp_path_factory.mktemp("wide_adapter")
    _peft_model(wide_folder, out, r=2, target_modules=["c_attn"])
    return out


def _torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _flax_logits(model, params, ids=IDS):
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids)).logits)


def _torch_greedy(model, ids, new_tokens):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=EOT, pad_token_id=EOT)
    new = out[0, len(ids):].tolist()
    return new[:new.index(EOT)] if EOT in new else new


@pytest.fixture(autouse=True)
def no_global_compilation_cache(monkeypatch, tmp_path):
    """As in test_sample_cli: in-process runs keep this session's JAX off a persistent compilation cache;
    converted models go to a temporary cache."""
    monkeypatch.setattr(sample, "enable_compilation_cache", lambda cache_dir=None: None)
    monkeypatch.setenv("FLAX_GPT2_CACHE", str(tmp_path / "cache"))


# --- from_pretrained(adapter=) -----------------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scanned"])
def test_from_pretrained_with_a_peft_adapter_has_the_peft_models_logits(base, adapter, scan_layers):
    folder = base[1]
    model, params = flax_gpt2.from_pretrained(folder, adapter=adapter[0], progress=False, scan_layers=scan_layers)
    _, base_params = flax_gpt2.from_pretrained(folder, progress=False, scan_layers=scan_layers)
    assert type(model) is flax_gpt2.GPT2LMHeadModel  # the base's class and shapes: the adapter is merged
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, base_params)
    logits = _flax_logits(model, params)
    np.testing.assert_allclose(logits, _torch_logits(adapter[1]), atol=1e-5, rtol=0)
    assert np.abs(logits - _flax_logits(model, base_params)).max() > 1e-1  # the adapter changes the model


def test_from_pretrained_bfloat16_params_get_a_float32_update_rounded_once(base, adapter):
    """The adapter is merged after the cast to param_dtype, in float32, as `apply_lora` does on a bfloat16 base."""
    kernel = lambda p: p["transformer"]["h_1"]["mlp"]["c_fc"]["kernel"]  # noqa: E731
    _, base_params = flax_gpt2.from_pretrained(base[1], progress=False)
    _, merged = flax_gpt2.from_pretrained(base[1], adapter=adapter[0], progress=False)
    _, bf16 = flax_gpt2.from_pretrained(base[1], adapter=adapter[0], progress=False, param_dtype=jnp.bfloat16)
    assert kernel(bf16).dtype == jnp.bfloat16
    delta = kernel(merged) - kernel(base_params)
    np.testing.assert_array_equal(kernel(bf16), (kernel(base_params).astype(jnp.bfloat16).astype(jnp.float32)
                                                 + delta).astype(jnp.bfloat16))


def test_an_adapter_for_another_base_is_a_named_error(base, adapter, wide_adapter, tmp_path):
    folder = base[1]
    with pytest.raises(AdapterError, match=re.escape(f"no adapter folder {tmp_path / 'missing'}")):
        flax_gpt2.from_pretrained(folder, adapter=tmp_path / "missing", progress=False)
    # Wider base: the shapes say so.
    with pytest.raises(ValueError, match=rf"{re.escape(str(wide_adapter))}: .*shape \[2, 64\], .* another base"):
        flax_gpt2.from_pretrained(folder, adapter=wide_adapter, progress=False)
    # Same shapes, other weights: the base hash the adapter records says so.
    model, params = flax_gpt2.from_pretrained(folder, progress=False)
    other = jax.tree.map(lambda x: x, params)
    other["transformer"]["ln_f"]["bias"] = other["transformer"]["ln_f"]["bias"] + 1
    adapters, lora = flax_gpt2.load_peft_adapter(adapter[0], params, model.config)
    hashed = tmp_path / "hashed"
    flax_gpt2.save_peft_adapter(hashed, adapters, lora, base_model_name_or_path="other-base", base_params=other)
    with pytest.raises(ValueError, match=rf"{re.escape(str(hashed))}: .*saved for other base weights .*'other-base'"):
        flax_gpt2.from_pretrained(folder, adapter=hashed, progress=False)


# --- convert -----------------------------------------------------------------------------------------------

def run_convert(*args):
    return convert.main(["--no_progress", *map(str, args)])


def test_convert_merge_writes_a_plain_hf_model_with_the_peft_models_logits(base, adapter, tmp_path):
    out = tmp_path / "merged"
    assert run_convert("--model", base[1], "--adapter", adapter[0], "--merge", "--out", out) == 0
    assert not (out / "adapter_config.json").exists()
    np.testing.assert_allclose(_torch_logits(_torch_base(out)), _torch_logits(adapter[1]), atol=1e-5, rtol=0)


def _hash_in(folder):
    with safe_open(folder / "adapter_model.safetensors", "np") as f:
        return f.metadata().get(BASE_HASH_KEY)


@pytest.mark.parametrize("source", ["peft", "flax"])
def test_convert_format_peft_writes_an_adapter_peft_loads_with_equal_logits(base, adapter, tmp_path, source):
    folder = base[1]
    model, params = flax_gpt2.from_pretrained(folder, progress=False)
    if source == "peft":
        src, expected = adapter[0], _torch_logits(adapter[1])
    else:  # an adapter flax_gpt2 wrote (as training will), without a base hash
        lora = flax_gpt2.LoRAConfig(rank=3, alpha=5, targets="c_fc,attn.c_proj")
        adapters = flax_gpt2.init_lora(jax.random.PRNGKey(0), params, model.config, lora)
        adapters = jax.tree.map(lambda x: x + 0.2 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), adapters)
        src = tmp_path / "flax_adapter"
        flax_gpt2.save_peft_adapter(src, adapters, lora, base_model_name_or_path=None)
        expected = _flax_logits(model, flax_gpt2.merge_adapter(params, adapters, lora))
    out = tmp_path / "exported"
    assert run_convert("--model", folder, "--adapter", src, "--format", "peft", "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder) and config["peft_type"] == "LORA"
    assert _hash_in(out) == base_weights_sha256(params)  # the export records its base
    reference = peft.PeftModel.from_pretrained(_torch_base(folder), out).eval()
    logits = _torch_logits(reference)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    assert np.abs(logits - _flax_logits(model, params)).max() > 1e-1


CONVERT_USAGE_ERRORS = [  # exit 2, one line naming the flags
    (["--merge"], "--merge folds a LoRA adapter into --model: pass --adapter DIR"),
    (["--format", "peft"], "--format peft writes a LoRA adapter: pass --adapter DIR"),
    (["--format", "lora"], "argument --format: invalid choice: 'lora'"),
    (["--adapter", "A"], "--adapter with --format safetensors needs --merge"),
    (["--adapter", "A", "--merge", "--format", "peft"], "--merge writes a full model, --format peft the adapter"),
    (["--adapter", "A", "--format", "peft", "--dtype", "bfloat16"], "--dtype bfloat16 applies to full models"),
]


@pytest.mark.parametrize("args, message", CONVERT_USAGE_ERRORS, ids=[m[:30] for _, m in CONVERT_USAGE_ERRORS])
def test_convert_adapter_flags_that_do_not_go_together_are_usage_errors(capsys, tmp_path, args, message):
    assert run_convert("--model", "gpt2", "--out", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", [["--merge"], ["--format", "peft"]], ids=["merge", "peft"])
def test_convert_with_an_adapter_for_another_base_fails_and_writes_nothing(capsys, base, wide_adapter, tmp_path,
                                                                          mode):
    assert run_convert("--model", base[1], "--adapter", wide_adapter, *mode, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{wide_adapter}: " in err and "made for another base model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --- sample, evaluate, pipeline ----------------------------------------------------------------------------

def test_sample_greedy_with_adapter_equals_peft_greedy_generate(capsys, base, adapter, bpe_dir):
    tokenizer = get_tokenizer(bpe_dir)
    ids = tokenizer.encode(PROMPT)
    tokens = _torch_greedy(adapter[1], ids, 10)
    assert tokens != _torch_greedy(_torch_base(base[1]), ids, 10)  # the adapter changes what is generated
    assert sample.main(["--no_progress", "--model", str(base[1]), "--adapter", str(adapter[0]), "--prompt", PROMPT,
                        "--max_new_tokens", "10", "--greedy"]) == 0
    assert capsys.readouterr().out == PROMPT + tokenizer.decode(tokens) + "\n"


def test_sample_adapter_on_a_converted_and_cached_base(capsys, base, adapter, wide_adapter, bpe_dir, tmp_path):
    """A .bin base goes through the conversion cache, which holds the base; the adapter is merged on load, and
    an adapter that does not fit is reported as such, not taken for a broken cached copy."""
    folder = tmp_path / "bin_base"
    folder.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(base[1] / name, folder / name)
    torch.save(base[0].state_dict(), folder / "pytorch_model.bin")  # transformers 5 saves only safetensors
    tokenizer = get_tokenizer(bpe_dir)
    tokens = _torch_greedy(adapter[1], tokenizer.encode(PROMPT), 6)
    args = ["--model", str(folder), "--prompt", PROMPT, "--max_new_tokens", "6", "--greedy"]
    for _ in range(2):  # converted, then read from the cache
        assert sample.main(["--no_progress", "--adapter", str(adapter[0]), *args]) == 0
        assert capsys.readouterr().out == PROMPT + tokenizer.decode(tokens) + "\n"
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1  # the base, converted once
    assert sample.main(["--adapter", str(wide_adapter), *args]) == 1  # with progress: the log on stderr
    err = capsys.readouterr().err
    assert "made for another base model" in err and "again" not in err


def test_evaluate_with_adapter_equals_the_peft_models_perplexity(capsys, base, adapter, bpe_dir, tmp_path):
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT)
    ids = get_tokenizer(bpe_dir).encode(TEXT)
    assert len(ids) <= TINY["n_positions"]  # one window scores every token, as one torch call does
    with torch.no_grad():
        nll = adapter[1](torch.tensor([ids]), labels=torch.tensor([ids])).loss.double().item()
    assert evaluate.main(["--model", str(base[1]), "--adapter", str(adapter[0]), "--text_file", str(text_file),
                          "--no_progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["adapter"] == str(adapter[0]) and result["num_tokens"] == len(ids) - 1
    assert abs(result["nll"] - nll) <= 1e-4
    np.testing.assert_allclose(result["perplexity"], math.exp(nll), rtol=1e-4)
    assert evaluate.main(["--model", str(base[1]), "--text_file", str(text_file), "--no_progress"]) == 0
    assert abs(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nll"] - nll) > 1e-2


def test_lm_eval_with_adapter_equals_hflm_with_the_peft_adapter(base, adapter):
    """The lm-eval model with `adapter=` (what `evaluate --tasks --adapter` passes) scores requests as lm-eval's
    own HFLM with `peft=` the same folder; without the adapter the scores differ."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional [eval] extra")
    pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (lm_eval[hf])")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from flax_gpt2.evaluation.lm_eval_model import FlaxGPT2LM

    requests = [("To be, or not", " to be"), ("The cat sat on the", " mat"), ("Hello", ", world. And more")]
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
    theirs = HFLM(pretrained=str(base[1]), peft=str(adapter[0]), device="cpu", batch_size=2,
                  dtype="float32").loglikelihood(inst)
    ours = FlaxGPT2LM(pretrained=base[1], adapter=adapter[0], batch_size=2, progress=False).loglikelihood(inst)
    plain = FlaxGPT2LM(pretrained=base[1], batch_size=2, progress=False).loglikelihood(inst)
    np.testing.assert_allclose([o[0] for o in ours], [t[0] for t in theirs], rtol=1e-4)
    assert not np.allclose([p[0] for p in plain], [t[0] for t in theirs], rtol=1e-2)


def test_pipeline_with_adapter_equals_peft_greedy_generate(base, adapter, bpe_dir):
    tokenizer = get_tokenizer(bpe_dir)
    tokens = _torch_greedy(adapter[1], tokenizer.encode(PROMPT), 8)
    generator = pipeline("text-generation", model=str(base[1]), adapter=adapter[0], progress=False)
    out = generator(PROMPT, max_new_tokens=8, do_sample=False, return_full_text=False)
    assert out == [{"generated_text": tokenizer.decode(tokens)}]
    with pytest.raises(ValueError, match="adapter= applies to a model loaded by name"):
        pipeline("text-generation", model=(generator.model, generator.params), adapter=adapter[0])

"""Several LoRA adapters served at once: the per-row branch (`modeling/lora_rows`) against merged weights, and the
real server (`--adapter`) with adapters made by the real PEFT, driven by the official `openai` client, each
request's text checked against `generate` with that adapter alone (`from_pretrained(base, adapter=DIR)`)."""

import concurrent.futures
import http.client
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import openai
import peft
import pytest
import torch
import transformers
from conftest import make_hf_model
from serve_process import server_process

import flax_gpt2
from flax_gpt2 import (GPT2Config, GPT2LMHeadModel, LoRAConfig, apply_lora, generate, get_tokenizer, init_lora,
                       init_params)
from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.lora_rows import row_adapters, stack_adapters

EOT = 50256
TINY = dict(n_positions=64, n_embd=32, n_layer=2, n_head=4)
BASE_NAME = "tiny"
FIRST = "poet"
MAX_BATCH = 4


# ---- the per-row branch, at the model level ----

def _random_adapter(params, config, lora, seed):
    adapters = init_lora(jax.random.PRNGKey(seed), params, config, lora)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        0.5 * jax.random.normal(k, x.shape) if path[-1].key == "lora_b" else x for k, (path, x) in zip(keys, leaves)])


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scanned_adapters"])
def test_row_branch_equals_merged_weights(scan_layers):
    """Each row's unmerged branch (ranks 2 and 5, different modules, one with rslora) gives the merged model's
    logits to 1e-5, alone and mixed in one vmapped batch, gathered or masked; row 0 is the base exactly."""
    config = GPT2Config(vocab_size=100, **TINY)
    model = GPT2LMHeadModel(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (1, 9)))
    params = init_params(model, jax.random.PRNGKey(0))
    loras = [LoRAConfig(rank=2, alpha=16, targets=("c_attn",)),
             LoRAConfig(rank=5, alpha=4, targets=("c_proj", "c_fc"), use_rslora=True)]
    adapters = [_random_adapter(params, config, lora, seed) for seed, lora in enumerate(loras)]
    stacked = [layer_stacking.stack_layers(a) if scan_layers else a for a in adapters]
    table = stack_adapters(list(zip(stacked, loras)))
    assert table["transformer"]["h_1"]["mlp"]["c_fc"]["lora_a"].shape == (3, 32, 5)

    def logits(index, input_ids, batch_rows=1):
        with row_adapters(table, index, batch_rows):
            return model.apply({"params": params}, input_ids).logits

    base = model.apply({"params": params}, ids).logits
    merged = [base] + [model.apply({"params": apply_lora(params, a, lora)}, ids).logits
                       for a, lora in zip(adapters, loras)]
    np.testing.assert_array_equal(logits(0, ids), base)
    for k in (1, 2):
        np.testing.assert_allclose(logits(k, ids), merged[k], atol=1e-5, rtol=0)
        assert np.abs(merged[k] - base).max() > 1e-2  # the adapter changes the model
    rows = jnp.asarray([2, 0, 1, 2])
    for batch_rows in (1, 4):  # each row's adapter gathered (3 adapters > 1 row), or all 3 masked (3 <= 4 rows)
        mixed = jax.jit(jax.vmap(lambda i, x: logits(i, x, batch_rows)))(rows, jnp.repeat(ids[None], 4, axis=0))
        for row, k in enumerate(rows.tolist()):
            np.testing.assert_allclose(mixed[row], merged[k], atol=1e-5, rtol=0)


def test_adapters_for_different_bases_do_not_stack():
    small = {"h_0": {"attn": {"c_attn": {"lora_a": jnp.zeros((8, 2)), "lora_b": jnp.zeros((2, 3, 2, 4))}}}}
    wide = {"h_0": {"attn": {"c_attn": {"lora_a": jnp.zeros((16, 2)), "lora_b": jnp.zeros((2, 3, 4, 4))}}}}
    lora = LoRAConfig(rank=2)
    with pytest.raises(ValueError, match="different base models"):
        stack_adapters([(small, lora), (wide, lora)])


# ---- the server ----

def _peft_adapter(base_folder, out, seed, **lora_kwargs):
    """A PEFT LoRA adapter of the torch base, saved by PEFT itself, with random non-zero lora_B."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel.from_pretrained(base_folder).eval()
    model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora_kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, bpe_dir):
    # Every parameter random and large: peaked next-token distributions, varied greedy continuations.
    return make_hf_model(tmp_path_factory, "serve_adapters_base", randomize=True, randomize_std=0.3, **TINY)[1]


@pytest.fixture(scope="module")
def adapter_folders(base_folder, tmp_path_factory):
    """Two adapters: rank 2 on c_attn; rank 6 on both c_proj and c_fc (the second one's folder names it)."""
    first = _peft_adapter(base_folder, tmp_path_factory.mktemp("poet_adapter"), 1, r=2, lora_alpha=8,
                          target_modules=["c_attn"])
    second = _peft_adapter(base_folder, tmp_path_factory.mktemp("legal"), 2, r=6, lora_alpha=12,
                           target_modules=["c_proj", "c_fc"])
    return {FIRST: first, second.name: second}


@pytest.fixture(scope="module")
def references(base_folder, adapter_folders):
    """model name -> (model, params with that adapter merged), and the tokenizer."""
    out = {BASE_NAME: flax_gpt2.from_pretrained(base_folder, progress=False)}
    for name, folder in adapter_folders.items():
        out[name] = flax_gpt2.from_pretrained(base_folder, adapter=folder, progress=False)
    return out, get_tokenizer(str(base_folder))


@pytest.fixture(scope="module")
def server(base_folder, adapter_folders, tmp_path_factory):
    first, second = adapter_folders.values()
    args = ["--model", str(base_folder), "--served_model_name", BASE_NAME, "--max_batch", str(MAX_BATCH),
            "--context_length", "64", "--prompt_buckets", "16", "--decode_steps", "4", "--prefix_block", "16",
            "--adapter", f"{FIRST}={first}", "--adapter", str(second)]
    with server_process(args, tmp_path_factory) as (port, _):
        yield port


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", max_retries=0, timeout=120)


def _health(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def _prompt(n, seed):
    return np.random.RandomState(seed).randint(0, EOT, n).tolist()


def _generate_text(references, name, ids, max_tokens):
    models, tokenizer = references
    model, params = models[name]
    out = generate(model, params, [ids], max_new_tokens=max_tokens)[0, len(ids):].tolist()
    return tokenizer.decode(out[:out.index(EOT)] if EOT in out else out)


def test_models_lists_the_base_and_every_adapter(client, adapter_folders):
    second = list(adapter_folders)[1]
    models = client.models.list().data
    assert [m.id for m in models] == [BASE_NAME, FIRST, second]
    assert [getattr(m, "parent", None) for m in models] == [None, BASE_NAME, BASE_NAME]
    assert client.models.retrieve(FIRST).parent == BASE_NAME


def test_concurrent_requests_for_different_adapters_equal_generate_with_each_alone(client, server, references,
                                                                                  adapter_folders):
    """12 greedy requests, 4 each for the base and the two adapters, at once (4 slots): each text is `generate`'s
    with its adapter merged, the adapters really change the text, and the rows ran in shared batches."""
    names = [BASE_NAME, *adapter_folders]
    requests = [dict(model=names[i % 3], prompt=_prompt(2 + 3 * (i // 3), seed=i // 3), max_tokens=8, temperature=0)
                for i in range(12)]
    before = _health(server)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        outs = list(pool.map(lambda kw: client.completions.create(**kw), requests))
    after = _health(server)
    assert after["peak_busy_slots"] == MAX_BATCH and after["batched_steps"] > before["batched_steps"]
    for kwargs, out in zip(requests, outs):
        assert out.model == kwargs["model"]
        assert out.choices[0].text == _generate_text(references, kwargs["model"], kwargs["prompt"], 8), kwargs
    for i in range(0, 12, 3):  # the same prompt under the three models
        assert len({outs[i + j].choices[0].text for j in range(3)}) == 3


def test_stream_with_an_adapter_equals_generate(client, references, adapter_folders):
    second = list(adapter_folders)[1]
    ids = _prompt(5, seed=40)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streams = list(pool.map(lambda name: list(client.completions.create(
            model=name, prompt=ids, max_tokens=8, temperature=0, stream=True)), [FIRST, second]))
    for name, chunks in zip([FIRST, second], streams):
        assert {c.model for c in chunks} == {name}
        assert "".join(c.choices[0].text for c in chunks) == _generate_text(references, name, ids, 8)


def test_prefix_cache_keeps_each_adapters_prefixes_apart(client, server, references, adapter_folders):
    """A 40-token prefix under the base and both adapters, twice each with another tail: every text is
    `generate`'s with its adapter, and each model's second request (only) reuses its own first's blocks (an
    adapter changes the keys and values, so another model's cached prefix is never used)."""
    names = [BASE_NAME, *adapter_folders]
    prefix = _prompt(40, seed=50)
    before = _health(server)
    for tail in (3, 6):
        for name in names:
            ids = prefix + _prompt(tail, seed=51 + tail)
            out = client.completions.create(model=name, prompt=ids, max_tokens=8, temperature=0)
            assert out.choices[0].text == _generate_text(references, name, ids, 8), (name, tail)
    after = _health(server)
    assert after["prefix_hits"] - before["prefix_hits"] == 3
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] == 3 * 32


def test_echo_logprobs_use_the_adapter(client, references):
    ids = _prompt(6, seed=41)
    out = client.completions.create(model=FIRST, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    model, params = references[0][FIRST]
    logprobs = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray([ids])).logits[0], -1))
    expected = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    np.testing.assert_allclose(out.choices[0].logprobs.token_logprobs[1:], expected, atol=1e-4)


def test_unknown_model_is_a_404(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nonexistent-adapter", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nonexistent-adapter")
    assert _health(server)["compiles_after_warmup"] == 0  # every mix of adapters above reused the start-up code


def _serve(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "flax_gpt2.serve", *args, "--port", "0"], capture_output=True,
                          text=True, env=env, timeout=300)


def test_bad_adapter_flags_are_clear_errors(base_folder, adapter_folders, tmp_path_factory):
    first, second = map(str, adapter_folders.values())
    usage = [(["--model", "x", "--adapter", f"x={first}"], "already the served model name"),
             (["--model", "x", "--served_model_name", "m", "--adapter", f"m={first}"], "already the served model"),
             (["--model", "x", "--adapter", f"a={first}", "--adapter", f"a={second}"], "already the name of --adapter"),
             (["--model", "x", "--adapter", f"my adapter={first}"], "cannot name an adapter"),
             (["--model", "x", "--adapter", f"é={first}"], "cannot name an adapter"),
             (["--model", "x", "--adapter", f"a={first}", "--quantize", "int8"], "is not supported")]
    for args, message in usage:
        bad = _serve(*args)
        assert bad.returncode == 2 and "--adapter" in bad.stderr and message in bad.stderr, (args, bad.stderr)
    # Found on loading, before serving: not an adapter folder; an adapter for a base of another shape.
    _, wide = make_hf_model(tmp_path_factory, "serve_adapters_wide", tokenizer_files=False,
                            **{**TINY, "vocab_size": 100, "n_embd": 64})
    wide_adapter = _peft_adapter(wide, tmp_path_factory.mktemp("wide_adapter"), 3, r=2, target_modules=["c_attn"])
    for folder, message in [(base_folder, "is not a PEFT adapter folder"), (wide_adapter, "another base model")]:
        bad = _serve("--model", str(base_folder), "--adapter", f"bad={folder}")
        assert bad.returncode == 1 and f"--adapter bad={folder}" in bad.stderr and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


def test_an_adapter_with_a_base_hash_serves_in_float16(base_folder, tmp_path):
    """A flax_gpt2 adapter records its base's weight hash; `--dtype float16` must check it on the weights as
    stored (the cast changes them), then serve float16 weights."""
    import argparse

    from flax_gpt2.checkpoints.peft_adapters import AdapterError, save_peft_adapter
    from flax_gpt2.serve.__main__ import load_with_adapters

    model, params = flax_gpt2.from_pretrained(base_folder, progress=False)
    lora = LoRAConfig(rank=3, alpha=6.0, targets=("c_attn",))
    folder = tmp_path / "hashed"
    save_peft_adapter(folder, _random_adapter(params, model.config, lora, 5), lora,
                      base_model_name_or_path=str(base_folder), base_params=params)
    args = argparse.Namespace(model=str(base_folder), dtype="float16", cache_dir=str(tmp_path / "cache"),
                              adapter=[("hashed", str(folder))], quantize=None)
    served, served_params, _, adapters = load_with_adapters(args)
    assert set(adapters) == {"hashed"} and served.config.param_dtype == jnp.float16
    assert {x.dtype for x in jax.tree.leaves(served_params)} == {jnp.dtype(jnp.float16)}

    other = jax.tree.map(lambda x: x + 0.01, params)  # another base of the same shapes
    save_peft_adapter(folder, _random_adapter(params, model.config, lora, 5), lora,
                      base_model_name_or_path=str(base_folder), base_params=other)
    with pytest.raises(AdapterError, match="--adapter hashed=.*saved for other base weights"):
        load_with_adapters(args)

"""`python -m flax_gpt2.sample` and `flax_gpt2.generation.pipeline` against a small saved model."""

import io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_hf_model

from flax_gpt2 import sample as cli
from flax_gpt2.checkpoints import loading
from flax_gpt2.checkpoints.pretrained import from_pretrained
from flax_gpt2.generation import generate, speculative
from flax_gpt2.generation.detokenize import Detokenizer
from flax_gpt2.generation.pipeline import pipeline, set_seed
from flax_gpt2.generation.text import generate_text
from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer

EOT = 50256


@pytest.fixture(scope="module")
def folder(tmp_path_factory, bpe_dir):
    """A random-init Hugging Face GPT-2 folder (safetensors) with the GPT-2 tokenizer files."""
    _, path = make_hf_model(tmp_path_factory, "cli_model", n_positions=128, initializer_range=0.3)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(bpe_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    model, params = from_pretrained(folder, progress=False)
    return model, params, get_tokenizer(folder)


@pytest.fixture(autouse=True)
def no_global_compilation_cache(monkeypatch, tmp_path):
    """In-process runs must not point this test session's JAX at a persistent cache (a subprocess test
    checks that one); converted models go to a temporary cache."""
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda cache_dir=None: None)
    monkeypatch.setenv("FLAX_GPT2_CACHE", str(tmp_path / "cache"))


def run_cli(capsys, *args):
    assert cli.main(["--no_progress", *map(str, args)]) == 0
    return capsys.readouterr().out


def greedy_text(loaded, prompt_ids, new_tokens, **kwargs):
    model, params, tokenizer = loaded
    out = np.asarray(generate(model, params, [prompt_ids], max_new_tokens=new_tokens, eos_token_id=EOT, **kwargs))
    new = out[:, len(prompt_ids):].tolist()
    return [tokenizer.decode(row[:row.index(EOT)] if EOT in row else row) for row in new]


def test_cli_prints_the_greedy_continuation(capsys, folder, loaded):
    out = run_cli(capsys, "--model", folder, "--prompt", "Hello, I'm a language model,", "--length", 16, "--greedy")
    ids = loaded[2].encode("Hello, I'm a language model,")
    assert out == "Hello, I'm a language model," + greedy_text(loaded, ids, 16)[0] + "\n"


def test_cli_speculative_greedy_prints_the_plain_greedy_text(capsys, tmp_path_factory, monkeypatch, folder, loaded):
    """`--prompt_lookup` and `--draft_model` (a shallower, narrower GPT-2 with the same tokenizer) change how
    fast the tokens come, not which: greedy output equals plain greedy decoding (and the speculative loop ran,
    streamed: each round prints what it accepted)."""
    calls = []
    real = speculative.speculative_stream
    # generate_stream calls it by the name its module imported (the package's `generate` is the function).
    generate_module = sys.modules["flax_gpt2.generation.generate"]
    monkeypatch.setattr(generate_module, "speculative_stream", lambda *a, **k: calls.append(k) or real(*a, **k))
    _, draft = make_hf_model(tmp_path_factory, "cli_draft", n_positions=128, n_layer=1, n_embd=32, n_head=2)
    prompt = "the cat sat on the mat and the cat sat on the"
    ids = loaded[2].encode(prompt)
    expected = prompt + greedy_text(loaded, ids, 24)[0] + "\n"
    assert run_cli(capsys, "--model", folder, "--prompt", prompt, "--length", 24, "--greedy",
                   "--prompt_lookup", 2, "--num_draft_tokens", 3) == expected
    assert run_cli(capsys, "--model", folder, "--prompt", prompt, "--length", 24, "--greedy",
                   "--draft_model", draft) == expected
    assert run_cli(capsys, "--model", folder, "--prompt", prompt, "--length", 24, "--greedy",
                   "--draft_model", draft, "--draft_schedule", "heuristic") == expected
    assert [(k["prompt_lookup_ngram"], k["num_draft_tokens"], k["draft"] is not None, k["draft_schedule"])
            for k in calls] == [(2, 3, False, "constant"), (None, 4, True, "constant"), (None, 4, True, "heuristic")]


def test_cli_samples_by_default_and_a_seed_reproduces_it(capsys, folder):
    args = ["--model", folder, "--prompt", "The meaning of life is", "--max_new_tokens", 12]
    first = run_cli(capsys, *args, "--seed", 3)
    assert first.startswith("The meaning of life is") and len(first) > len("The meaning of life is\n")
    assert run_cli(capsys, *args, "--seed", 3) == first
    assert run_cli(capsys, *args, "--seed", 4) != first
    assert run_cli(capsys, *args, "--seed", 3, "--k", 5, "--p", 0.9, "--temperature", 0.8) != first


def test_cli_several_sequences_are_numbered(capsys, folder, loaded):
    out = run_cli(capsys, "--model", folder, "--prompt", "Hi", "--length", 8, "--num_return_sequences", 3)
    assert [line for line in out.splitlines() if line.startswith("===")] == [
        f"=== GENERATED SEQUENCE {i} ===" for i in (1, 2, 3)]
    out = run_cli(capsys, "--model", folder, "--prompt", "Hi", "--length", 8, "--num_beams", 3,
                  "--num_return_sequences", 2)
    beams = greedy_text(loaded, loaded[2].encode("Hi"), 8, num_beams=3, num_return_sequences=2)
    assert out == "".join(f"=== GENERATED SEQUENCE {i} ===\nHi{text}\n" for i, text in enumerate(beams, 1))


def test_cli_reads_the_prompt_from_stdin(capsys, folder, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time\n"))
    assert run_cli(capsys, "--model", folder, "--length", 5, "--greedy").startswith("Once upon a time")


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "streamed-sample"])
def test_cli_stop_token_cuts_the_text(capsys, folder, sampling):
    args = ["--model", folder, "--prompt", "Tell me", "--length", 24, "--seed", 5] + ([] if sampling else ["--greedy"])
    free = run_cli(capsys, *args)[len("Tell me"):-1]
    stop = free[len(free) // 2:len(free) // 2 + 2]  # two characters from the middle of the continuation
    assert run_cli(capsys, *args, "--stop_token", stop) == "Tell me" + free[:free.index(stop)] + "\n"


def test_commongen_prompt_format(capsys, folder, loaded):
    """The seed model card's prompt: <|endoftext|> is the special token, and the text ends before the '.'."""
    prompt = "<|endoftext|> kid, room, dance:"
    out = run_cli(capsys, "--model", folder, "--prompt", prompt, "--stop_token", ".", "--greedy", "--length", 40)
    expected = greedy_text(loaded, [EOT] + loaded[2].encode(" kid, room, dance:"), 40)[0]
    assert out == prompt + expected.split(".")[0] + "\n"


def test_generate_text_equals_greedy_generate(loaded):
    """`generate_text` (text in, text out), what `python -m flax_gpt2.sample` runs, equals `generate` + decode."""
    model, params, tokenizer = loaded
    text = generate_text(model, params, tokenizer, "Hello", max_new_tokens=6, do_sample=False)
    assert text == ["Hello" + greedy_text(loaded, tokenizer.encode("Hello"), 6)[0]]


def _streamed(pieces: list[bytes], stop: tuple[str, ...] = ()) -> list[str]:
    text, out = Detokenizer(stop), []
    for data in pieces:
        if text.add(data):
            break
        out.append(text.take(final=False))
    out.append(text.take(final=True))
    return out


def test_detokenizer_holds_back_a_partial_stop_string():
    out = _streamed([b"abc", b" E", b"N", b"DING", b" more"], stop=("END",))
    # the last len("END") - 1 characters wait: they may start "END"; the text is cut before it
    assert out == ["a", "bc", " ", ""]
    assert _streamed([b"abc", b" EN", b"ough"], stop=("END",)) == ["a", "bc ", "ENou", "gh"]


def test_detokenizer_never_splits_a_character():
    e_acute = "é".encode()
    assert _streamed([b"caf", e_acute[:1], e_acute[1:], b"!"]) == ["caf", "", "é", "!", ""]
    # a half character at the very end is U+FFFD, as tokenizer.decode of the whole sequence gives
    assert "".join(_streamed([b"caf", e_acute[:1]])) == b"caf\xc3".decode("utf-8", errors="replace")
    # a stop string made of a multi-byte character, arriving in two tokens
    assert _streamed([b"ab", e_acute[:1], e_acute[1:], b"cd"], stop=("é",)) == ["ab", "", ""]


BAD_ARGS = [  # runtime errors: exit 1, one line on stderr
    (["--model", "/no/such/folder"], "no such folder"),
    (["--length", "200"], "exceeds the model's n_positions=128"),
]


@pytest.mark.parametrize("args, message", BAD_ARGS, ids=[m for _, m in BAD_ARGS])
def test_cli_bad_inputs_are_clear_errors(capsys, folder, args, message):
    if "--model" not in args:
        args = ["--model", str(folder), *args]
    assert cli.main(["--no_progress", "--prompt", "Hi", *args]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err)


PARSER_ERRORS = [  # usage errors: exit 2, the flag named
    (["--length", "0"], "--max_new_tokens/--length: must be a positive integer"),
    (["--num_beams", "2", "--num_return_sequences", "3"], r"--num_return_sequences \(3\) cannot exceed --num_beams"),
    (["--greedy", "--num_return_sequences", "2"], "--greedy gives one sequence"),
    (["--dtype", "int8"], "invalid choice"),
    (["--temperature", "0"], "--temperature: must be at least 0.0001"),
    (["--temperature", "1e-39"], "--temperature: must be at least 0.0001"),
    (["--top_p", "1.5"], r"--top_p/--p: must be in \(0, 1\]"),
    (["--repetition_penalty", "-1"], "--repetition_penalty: must be a number > 0"),
    (["--repetition_penalty", "nan"], "--repetition_penalty: must be a number > 0"),
    (["--seed", "99999999999"], "--seed: must be an integer from 0 to 2"),
    (["--draft_model", "x", "--prompt_lookup", "2"], "--draft_model and --prompt_lookup are two ways"),
    (["--prompt_lookup", "2", "--num_beams", "2"], "--num_beams does not go with speculative decoding"),
    (["--prompt_lookup", "2", "--repetition_penalty", "1.2"], "--repetition_penalty does not go with speculative"),
    (["--prompt_lookup", "0"], "--prompt_lookup: must be a positive integer"),
    (["--num_draft_tokens", "0"], "--num_draft_tokens: must be a positive integer"),
    (["--prompt_lookup", "2", "--draft_schedule", "heuristic"], "--draft_schedule adapts a draft model's steps"),
    (["--draft_model", "x", "--draft_schedule", "fast"], "invalid choice"),
]


@pytest.mark.parametrize("args, message", PARSER_ERRORS, ids=[m for _, m in PARSER_ERRORS])
def test_cli_rejects_bad_options(capsys, args, message):
    assert cli.main(["--prompt", "Hi", *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_converted_model_is_cached(folder, tmp_path):
    """A PyTorch .bin folder is converted once; the next load reads the cached safetensors copy."""
    bin_folder = tmp_path / "bin_model"
    bin_folder.mkdir()
    for name in ("config.json", "encoder.json", "vocab.bpe"):
        shutil.copy(folder / name, bin_folder / name)
    import transformers

    hf_model = transformers.GPT2LMHeadModel.from_pretrained(folder)
    torch.save(hf_model.state_dict(), bin_folder / "pytorch_model.bin")
    params = from_pretrained(folder, progress=False)[1]
    logs = []
    first = loading.load_model(str(bin_folder), progress=False, log=logs.append)
    second = loading.load_model(str(bin_folder), progress=False, log=logs.append)
    assert logs[0].startswith("Converting") and logs[1].startswith("Loading") and logs[2].startswith("Loading")
    cached = os.listdir(tmp_path / "cache" / "models")
    assert len(cached) == 1 and cached[0] in logs[2]
    for loaded in (first, second):
        np.testing.assert_array_equal(loaded[1]["transformer"]["wte"]["embedding"],
                                      params["transformer"]["wte"]["embedding"])


def test_module_entry_point_uses_the_compilation_cache(folder, tmp_path):
    env = {**os.environ, "FLAX_GPT2_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "flax_gpt2.sample", "--model", str(folder), "--prompt", "Hi", "--length", "4",
               "--no_progress", "--seed", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hi")
    assert os.listdir(tmp_path / "cache" / "jax")  # the compiled loop is there for the next start


def test_pipeline_returns_generated_text(folder, loaded):
    generator = pipeline("text-generation", model=str(folder), progress=False)
    out = generator("Hello, I'm a language model,", max_new_tokens=10, num_return_sequences=3)
    assert len(out) == 3 and all(o["generated_text"].startswith("Hello, I'm a language model,") for o in out)
    greedy = generator("Hello", max_length=9, do_sample=False, return_full_text=False)  # "Hello" is 1 token
    assert greedy == [{"generated_text": greedy_text(loaded, [15496], 8)[0]}]


def test_pipeline_batches_prompts_like_one_at_a_time(loaded):
    model, params, tokenizer = loaded
    generator = pipeline("text-generation", model=(model, params), tokenizer=tokenizer)
    prompts = ["A", "The quick brown fox", ""]
    batch = generator(prompts, max_length=12, do_sample=False)
    assert [generator(p, max_length=12, do_sample=False) for p in prompts] == batch
    assert batch[2][0]["generated_text"] == greedy_text(loaded, [EOT], 11)[0]  # "" starts from <|endoftext|>


def test_pipeline_set_seed_reproduces(loaded):
    generator = pipeline("text-generation", model=loaded[:2], tokenizer=loaded[2])
    set_seed(42)
    first = [generator("Hi", max_new_tokens=8), generator("Hi", max_new_tokens=8)]
    set_seed(42)
    assert [generator("Hi", max_new_tokens=8), generator("Hi", max_new_tokens=8)] == first
    assert first[0] != first[1]  # each call draws a new seed


def test_pipeline_errors(loaded):
    with pytest.raises(ValueError, match="supports only task='text-generation'"):
        pipeline("summarization", model=loaded[:2])
    with pytest.raises(ValueError, match="pass model="):
        pipeline("text-generation")
    generator = pipeline("text-generation", model=loaded[:2], tokenizer=loaded[2])
    with pytest.raises(ValueError, match="max_length=3 leaves no room"):
        generator("The quick brown fox", max_length=3)
    with pytest.raises(TypeError, match="text_inputs must be a string"):
        generator(42)


def test_a_relative_training_run_path(tmp_path, monkeypatch):
    """`--model runs/x` (relative) used to fail inside orbax, which needs absolute checkpoint paths."""
    import jax
    from conftest import write_run_checkpoint

    from flax_gpt2 import GPT2Config, GPT2LMHeadModel, init_params
    from flax_gpt2.checkpoints.pretrained import resolve

    config = GPT2Config.from_preset("tiny", n_layer=1, vocab_size=50257)
    params = init_params(GPT2LMHeadModel(config), jax.random.PRNGKey(3))
    write_run_checkpoint(tmp_path / "runs" / "tiny", 1, config, params)
    monkeypatch.chdir(tmp_path)
    assert resolve("runs/tiny") == str(tmp_path / "runs" / "tiny")
    _, loaded = from_pretrained("runs/tiny", progress=False)
    np.testing.assert_array_equal(loaded["transformer"]["wte"]["embedding"], params["transformer"]["wte"]["embedding"])


def test_urls_are_never_hub_ids_or_folders(tmp_path, monkeypatch):
    """A URL is remote storage or an error naming it, never a hub id or a local folder (gs:// itself is tested
    against a local GCS server in test_train_gcs.py)."""
    from flax_gpt2.checkpoints.pretrained import resolve

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="ftp://bucket/run"):
        resolve("ftp://bucket/run")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="empty"):
        resolve("")

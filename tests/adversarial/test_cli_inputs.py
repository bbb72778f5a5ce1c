"""Bad command lines and bad files given to `sample`, `evaluate` and `convert`.

Each case must end with one error line on stderr that names the flag or file (the last line; argparse
prints its usage line first), exit code 2 for a usage error or 1 for a runtime one, no traceback unless
`--debug` is given. The corpus is generated below; every case runs in-process through `main(argv)` (the
same code path as `python -m ...`), and a few run as real subprocesses, with and without `--debug`.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import make_hf_model
from flax_gpt2 import convert, evaluate
from flax_gpt2 import sample as sample_cli

MAINS = {"sample": sample_cli.main, "evaluate": evaluate.main, "convert": convert.main}
QUIET = {"sample": ["--no_progress", "--prompt", "Hi"], "evaluate": ["--no_progress"], "convert": ["--no-progress"]}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Every file and folder the corpus refers to, by placeholder name."""
    _, model = make_hf_model(tmp_path_factory, "cli_inputs_model", n_positions=64)
    root = tmp_path_factory.mktemp("cli_inputs")
    p = {"model": str(model), "root": str(root)}

    def model_copy(name, edit):
        folder = root / name
        shutil.copytree(model, folder)
        edit(folder)
        p[name] = str(folder)

    weights_size = (model / "model.safetensors").stat().st_size
    model_copy("bad_header", lambda f: (f / "model.safetensors").write_bytes(
        (10**12).to_bytes(8, "little") + b"{" * 100))
    model_copy("truncated_weights", lambda f: os.truncate(f / "model.safetensors", weights_size // 2))

    def bad_index(folder):
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text('{"weight_map": {"wte.weight": ')

    model_copy("bad_index", bad_index)

    def index_missing_shard(folder):
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"wte.weight": "model-00001-of-00002.safetensors"}}))

    model_copy("index_missing_shard", index_missing_shard)
    model_copy("no_weights", lambda f: (f / "model.safetensors").unlink())
    model_copy("bad_config", lambda f: (f / "config.json").write_text("{not json"))

    def truncated_merges(folder):
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        (folder / "merges.txt").write_text("\n".join(lines[:25001]) + "\n", encoding="utf-8")

    model_copy("truncated_merges", truncated_merges)
    _, small_vocab = make_hf_model(tmp_path_factory, "cli_inputs_small_vocab", vocab_size=500, n_positions=64)
    p["small_vocab"] = str(small_vocab)

    (root / "text.txt").write_text("Some words to score here and there.\n" * 10)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    (root / "bad.jsonl").write_text('{"text": "a fine record here"}\n{"text": "cut off\n')
    (root / "long_word.jsonl").write_text(json.dumps({"text": "some context " + "a1" * 40}) + "\n")
    (root / "a_file").write_text("not a folder")
    (root / "not_empty").mkdir()
    (root / "not_empty" / "notes.txt").write_text("mine")
    p.update(text=str(root / "text.txt"), latin1=str(root / "latin1.txt"), bad_jsonl=str(root / "bad.jsonl"),
             long_word=str(root / "long_word.jsonl"), a_file=str(root / "a_file"), not_empty=str(root / "not_empty"))
    return p


# (id, cli, args, exit code, what the error line must name). Placeholders {name} are `paths` entries.
CASES = [
    # sample: flags
    ("sample-seed-overflow", "sample", ["--model", "{model}", "--seed", "99999999999"], 2, "--seed"),
    ("sample-temperature-tiny", "sample", ["--model", "{model}", "--temperature", "1e-39"], 2, "--temperature"),
    ("sample-temperature-nan", "sample", ["--model", "{model}", "--temperature", "nan"], 2, "--temperature"),
    ("sample-top-k-negative", "sample", ["--model", "{model}", "--top_k", "-1"], 2, "--top_k"),
    ("sample-length-zero", "sample", ["--model", "{model}", "--length", "0"], 2, "--length"),
    ("sample-length-past-window", "sample", ["--model", "{model}", "--length", "100"], 1, "max_new_tokens"),
    # sample: models and files
    ("sample-missing-folder", "sample", ["--model", "{root}/nowhere"], 1, "nowhere"),
    ("sample-model-is-a-file", "sample", ["--model", "{a_file}"], 1, "a_file"),
    ("sample-bad-safetensors-header", "sample", ["--model", "{bad_header}"], 1, "bad_header/model.safetensors"),
    ("sample-truncated-weights", "sample", ["--model", "{truncated_weights}"], 1, "truncated_weights/model.safet"),
    ("sample-bad-index-json", "sample", ["--model", "{bad_index}"], 1, "model.safetensors.index.json"),
    ("sample-no-weights", "sample", ["--model", "{no_weights}"], 1, "no_weights"),
    ("sample-bad-config", "sample", ["--model", "{bad_config}"], 1, "config.json"),
    ("sample-truncated-merges", "sample", ["--model", "{truncated_merges}"], 1, "merges.txt"),
    ("sample-offline-hub-id", "sample", ["--model", "nobody-here/no-such-model"], 1, "--model DIR"),
    ("sample-url", "sample", ["--model", "ftp://no-bucket/run"], 1, "ftp://no-bucket/run"),  # gs:// itself: test_train_gcs.py
    # evaluate
    ("evaluate-batch-size-zero", "evaluate", ["--model", "{model}", "--text_file", "{text}", "--batch_size", "0"],
     2, "--batch_size"),
    ("evaluate-batch-size-negative", "evaluate",
     ["--model", "{model}", "--text_file", "{text}", "--batch_size", "-1"], 2, "--batch_size"),
    ("evaluate-stride-zero", "evaluate", ["--model", "{model}", "--text_file", "{text}", "--stride", "0"],
     2, "--stride"),
    ("evaluate-nothing-to-do", "evaluate", ["--model", "{model}"], 2, "--text_file"),
    ("evaluate-window-length-past-n-positions", "evaluate",
     ["--model", "{model}", "--text_file", "{text}", "--window_length", "1000"], 2, "--window_length"),
    ("evaluate-text-file-is-a-folder", "evaluate", ["--model", "{model}", "--text_file", "{root}"], 1, "--text_file"),
    ("evaluate-text-not-utf8", "evaluate", ["--model", "{model}", "--text_file", "{latin1}"], 1, "latin1.txt"),
    ("evaluate-lambada-bad-json", "evaluate", ["--model", "{model}", "--lambada", "{bad_jsonl}"], 1, "bad.jsonl:2"),
    ("evaluate-lambada-word-past-window", "evaluate", ["--model", "{model}", "--lambada", "{long_word}"],
     1, "final word"),
    ("evaluate-vocab-smaller-than-tokenizer", "evaluate", ["--model", "{small_vocab}", "--text_file", "{text}"],
     1, "vocab_size (500)"),
    ("evaluate-index-missing-shard", "evaluate", ["--model", "{index_missing_shard}", "--text_file", "{text}"],
     1, "model-00001-of-00002.safetensors"),
    # convert
    ("convert-out-is-a-file", "convert", ["--model", "{model}", "--out", "{a_file}"], 2, "--out"),
    ("convert-out-not-empty", "convert", ["--model", "{model}", "--out", "{not_empty}"], 2,
     "--overwrite"),
    ("convert-missing-model", "convert", ["--model", "{root}/nowhere", "--out", "{root}/o"], 1,
     "nowhere"),
    ("convert-bad-header", "convert", ["--model", "{bad_header}", "--out", "{root}/o2"], 1,
     "bad_header/model.safetensors"),
]


def _argv(case, paths):
    _, cli, args, _, _ = case
    return [a.format(**paths) for a in args] + QUIET[cli]


def _check_error(err: str, code: int, names: str) -> None:
    lines = err.strip().splitlines()
    assert lines, "no error message"
    assert "Traceback" not in err, err
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]], f"expected one error line, last: {err}"
    assert names in lines[-1], f"{names!r} not named in: {lines[-1]}"
    if code == 1:
        assert "--debug" in lines[-1]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, paths, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FLAX_GPT2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sample_cli, "enable_compilation_cache", lambda cache_dir=None: None)
    _, cli, _, code, names = case
    assert MAINS[cli](_argv(case, paths)) == code
    captured = capsys.readouterr()
    _check_error(captured.err, code, names)
    assert "NaN" not in captured.out and "Infinity" not in captured.out
    if code == 1:  # --debug: the exception itself, for a bug report
        with pytest.raises(Exception):
            MAINS[cli](_argv(case, paths) + ["--debug"])


SUBPROCESS_CASES = ["sample-seed-overflow", "sample-bad-safetensors-header", "sample-offline-hub-id",
                    "evaluate-vocab-smaller-than-tokenizer", "convert-bad-header"]


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_the_real_entry_points(case_id, debug, paths, tmp_path):
    case = next(c for c in CASES if c[0] == case_id)
    _, cli, _, code, names = case
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "FLAX_GPT2_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", f"flax_gpt2.{cli}", *_argv(case, paths), *(["--debug"] if debug else [])]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == code, result.stderr
    if debug and code == 1:
        assert "Traceback" in result.stderr and names in result.stderr
    else:
        _check_error(result.stderr, code, names)


def test_a_truncated_conversion_cache_is_rebuilt_from_the_command_line(paths, tmp_path, capsys, monkeypatch):
    """A cache entry cut short by an earlier crash: converted again, not an error."""
    import torch
    import transformers

    folder = tmp_path / "bin_model"
    shutil.copytree(paths["model"], folder)
    torch.save(transformers.GPT2LMHeadModel.from_pretrained(folder).state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    monkeypatch.setenv("FLAX_GPT2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sample_cli, "enable_compilation_cache", lambda cache_dir=None: None)
    argv = ["--model", str(folder), "--prompt", "Hi", "--length", "3", "--greedy"]
    assert sample_cli.main(argv + ["--no_progress"]) == 0
    first = capsys.readouterr().out
    (entry,) = (tmp_path / "cache" / "models").iterdir()
    os.truncate(entry / "model.safetensors", 1000)
    assert sample_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == first and "incomplete" in captured.err and "Traceback" not in captured.err

"""The lm-eval model `flax_gpt2` equals lm-eval's own Hugging Face model (`HFLM`) on the same weights, request
by request and task by task, offline on local task files (tests/data)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional [eval] extra")

from conftest import make_hf_model  # noqa: E402

from flax_gpt2.evaluation import lm_eval_registration, lm_eval_tasks as lm_eval_cli  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
REPO = Path(__file__).resolve().parents[1]
TASKS = ["lambada_openai", "hellaswag", "wikitext", "gen_tiny"]
GEN_TASK = """task: gen_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["es", "\\n\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


def peaked_hf_model(tmp_path_factory, name):
    """A tiny random GPT-2 (window 128) whose every weight is random and large enough that next-token
    distributions are peaked: near-ties in greedy decoding and argmax comparisons would hide nothing."""
    return make_hf_model(tmp_path_factory, name=name, seed=1, randomize=True, randomize_std=0.3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(peaked_hf_model(tmp_path_factory, "lm_eval_tiny")[1])


@pytest.fixture(scope="module")
def ours(folder):
    from flax_gpt2.evaluation.lm_eval_model import FlaxGPT2LM

    return FlaxGPT2LM(pretrained=folder, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def hflm(folder):
    pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (lm_eval[hf])")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=folder, device="cpu", batch_size=4, dtype="float32")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """lm-eval's lambada_openai, hellaswag and wikitext reading tests/data, plus a small generation task."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    cache = tmp_path_factory.mktemp("datasets_cache")
    for task, data in [("lambada_openai", "lambada_tiny.jsonl"), ("hellaswag", "hellaswag_tiny.jsonl"),
                       ("wikitext", "wikitext_tiny.jsonl")]:
        lm_eval_cli.write_local_task(folder, task, DATA / data, cache_dir=cache)
    (folder / "gen_tiny.yaml").write_text(GEN_TASK.format(data=DATA / "generate_tiny.jsonl", cache=cache))
    return str(folder)


def instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def assert_close(a, b, rel=1e-4):
    assert np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rel, atol=0), (a, b)


def test_registered_and_hf_still_found(ours):
    from lm_eval.api.registry import get_model, model_registry

    from flax_gpt2.evaluation.lm_eval_model import FlaxGPT2LM

    assert get_model("flax_gpt2") is FlaxGPT2LM
    assert "hf" in model_registry  # registering ours never hides lm-eval's own models


def test_lazy_registration_imports_nothing_heavy():
    code = ("import sys; from flax_gpt2.evaluation.lm_eval_registration import register_lm_eval_model as r; assert r(); "
            "from lm_eval.api.registry import model_registry as m; "
            "assert 'flax_gpt2' in m and 'hf' in m, list(m); "
            "assert 'lm_eval.api.model' not in sys.modules and 'flax_gpt2.evaluation.lm_eval_model' not in sys.modules; "
            "from lm_eval.api.registry import get_model; print(get_model('flax_gpt2').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "FlaxGPT2LM"


def test_importing_flax_gpt2_registers_the_model():
    code = ("import flax_gpt2; from lm_eval.api.registry import model_registry as m; "
            "assert 'flax_gpt2' in m and 'hf' in m")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def greedy_texts(hflm, prompts, n=8):
    return hflm.generate_until(instances("generate_until", [(p, {"until": [], "max_gen_toks": n}) for p in prompts]))


def test_loglikelihood_equals_hflm(ours, hflm):
    prompts = ["The cat sat on the", "In 1850 the king", "Hello, my name is"]
    greedy = greedy_texts(hflm, prompts)  # continuations that are the greedy choice, so is_greedy is True
    requests = [(p, g) for p, g in zip(prompts, greedy)] + [
        ("The cat sat on the", " mat"), ("Hello ,", " world ."),
        ("", "A text with no context"),  # lm-eval's empty context: <|endoftext|> stands in
        ("Trailing spaces   ", "move into the continuation"),
        ("<|endoftext|>A special token", " in the text"),
        ("word " * 200, " and more words at the end"),  # longer than the window: truncated from the left
        ("x", " " + "y " * 100),  # a continuation that fills most of the window
    ]
    expected = hflm.loglikelihood(instances("loglikelihood", requests))
    got = ours.loglikelihood(instances("loglikelihood", requests))
    assert_close([g[0] for g in got], [e[0] for e in expected])
    assert [g[1] for g in got] == [e[1] for e in expected]
    # Greedy continuations are recognised as such (unless their text re-tokenizes differently).
    assert sum(e[1] for e in expected) >= 2


def test_loglikelihood_rolling_equals_hflm(ours, hflm):
    docs = [json.loads(line)["page"] for line in (DATA / "wikitext_tiny.jsonl").read_text().splitlines()]
    assert len(ours.tok_encode(docs[0])) > 2 * ours.max_length  # three rolling windows, the last one partial
    docs += ["one short line", ""]
    expected = hflm.loglikelihood_rolling(instances("loglikelihood_rolling", [(d,) for d in docs]))
    got = ours.loglikelihood_rolling(instances("loglikelihood_rolling", [(d,) for d in docs]))
    assert_close(got, expected)
    assert got[-1] == 0.0


def test_generate_until_equals_hflm(ours, hflm):
    prompts = ["Once upon a time", "The meaning of life is", "Q: What is 2+2?\nA:", "Hello", "word " * 150]
    free = greedy_texts(hflm, prompts, n=16)
    # Stop sequences taken from the middle of the free outputs, so that the cut is exercised.
    stops = [text[len(text) // 2:len(text) // 2 + 2] or "\n\n" for text in free]
    requests = [(p, {"until": [s], "max_gen_toks": 16, "do_sample": False}) for p, s in zip(prompts, stops)]
    requests += [(p, {"until": "\n\n", "max_new_tokens": 5}) for p in prompts[:3]]  # another kwargs group
    requests += [(prompts[0], {"until": ["es", " a"], "max_gen_toks": 20, "temperature": 0.0})]
    expected = hflm.generate_until(instances("generate_until", requests))
    got = ours.generate_until(instances("generate_until", requests))
    assert got == expected
    assert sum(len(g) < len(f) for g, f in zip(got, free)) >= 3  # the stop sequences did cut


def run_harness(model, model_args, task_dir, tasks=TASKS, **kwargs):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=4,
                                   task_manager=TaskManager(include_path=task_dir, include_defaults=False),
                                   bootstrap_iters=0, log_samples=True, **kwargs)


def test_task_metrics_equal_hflm(folder, task_dir, hflm):
    ours = run_harness("flax_gpt2", {"pretrained": folder, "progress": False}, task_dir)
    theirs = run_harness(hflm, None, task_dir)
    for task in TASKS:
        for mine, ref in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            if task == "gen_tiny":
                assert mine["resps"] == ref["resps"]
            else:
                flat = lambda resps: [r[0][0] if isinstance(r[0], tuple) else r[0] for r in resps]  # noqa: E731
                assert_close(flat(mine["resps"]), flat(ref["resps"]))
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    assert ours["results"]["hellaswag"]["acc_norm,none"] == theirs["results"]["hellaswag"]["acc_norm,none"]
    assert len(ours["samples"]["hellaswag"]) == 12 and len(ours["samples"]["wikitext"]) == 2


def test_run_tasks_prints_the_table_and_writes_results(folder, task_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    results = lm_eval_cli.run_tasks({"model": folder, "tasks": "lambada_openai,hellaswag,wikitext",
                                     "include_path": task_dir, "batch_size": 4, "limit": 3, "output_path": str(out),
                                     "bootstrap_iters": 0, "no_progress": True})
    table = capsys.readouterr().out
    for name in ("lambada_openai", "hellaswag", "wikitext", "acc_norm", "word_perplexity"):
        assert name in table
    assert set(results["results"]) == {"lambada_openai", "hellaswag", "wikitext"}
    saved = json.loads(out.read_text())
    assert saved["config"]["model"] == "flax_gpt2" and len(saved["samples"]["lambada_openai"]) == 3
    # acc_norm as lm-eval defines it, recomputed from the saved samples: the choice (lm-eval's preprocessed
    # ending) with the highest log-likelihood per character.
    samples = saved["samples"]["hellaswag"]
    right = [np.argmax([r[0][0] / len(c) for r, c in zip(s["resps"], s["doc"]["choices"])]) == s["doc"]["gold"]
             for s in samples]
    assert len(samples) == 3
    for results in (saved["results"], results["results"]):
        assert results["hellaswag"]["acc_norm,none"] == pytest.approx(np.mean(right))


def test_evaluate_cli_runs_tasks_offline(folder, task_dir, tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "flax_gpt2.evaluate", "--model", folder, "--tasks",
                           "lambada_openai,hellaswag,wikitext", "--include_path", task_dir, "--batch_size", "4",
                           "--limit", "2", "--output_path", str(out), "--bootstrap_iters", "0", "--no_progress"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hellaswag" in proc.stdout and "acc_norm" in proc.stdout
    assert set(json.loads(out.read_text())["results"]) == {"lambada_openai", "hellaswag", "wikitext"}


def test_bounded_compiled_shapes(ours):
    requests = [("word " * n, " end") for n in range(1, 120, 7)]
    ours.loglikelihood(instances("loglikelihood", requests))
    # 17 lengths from 3 to 121 tokens, 5 batches: at most the buckets 16, 32, 64, 128.
    assert ours._score._cache_size() <= 4


def test_bad_model_args_are_clear(folder):
    from flax_gpt2.evaluation.lm_eval_model import FlaxGPT2LM

    with pytest.raises(TypeError, match="unknown model_args for flax_gpt2: trust_remote_code"):
        FlaxGPT2LM(pretrained=folder, trust_remote_code=True)
    with pytest.raises(ValueError, match="dtype must be one of"):
        FlaxGPT2LM(pretrained=folder, dtype="int8")
    with pytest.raises(ValueError, match="needs pretrained=PATH"):
        FlaxGPT2LM()
    with pytest.raises(ValueError, match="exceeds the model's n_positions"):
        FlaxGPT2LM(pretrained=folder, max_length=4096, progress=False)


def test_unsupported_generation_kwargs_are_errors(ours):
    with pytest.raises(ValueError, match="unsupported generation kwargs for flax_gpt2: num_beams"):
        ours.generate_until(instances("generate_until", [("Hi", {"until": ["."], "num_beams": 4})]))
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        ours.generate_until(instances("generate_until", [("Hi", {"max_gen_toks": 128})]))


def test_missing_lm_eval_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[eval\]"'):
        lm_eval_cli.run_tasks({"model": "gpt2", "tasks": "hellaswag"})
    assert lm_eval_registration.register_lm_eval_model() is False


def test_task_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=4)  # the evaluate CLI's own flag is kept
    lm_eval_cli.add_task_arguments(parser)
    args = parser.parse_args(["--tasks", "hellaswag,wikitext", "--limit", "0.5", "--num_fewshot", "0",
                              "--batch_size", "2"])
    assert (args.tasks, args.limit, args.num_fewshot, args.batch_size) == ("hellaswag,wikitext", 0.5, 0, 2)
    assert parser.parse_args(["--limit", "10"]).limit == 10
    with pytest.raises(SystemExit):
        parser.parse_args(["--limit", "2.5"])

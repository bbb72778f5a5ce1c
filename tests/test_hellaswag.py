"""HellaSwag scoring equals build-nanogpt's PyTorch computation (style "nanogpt") and lm-eval's `hellaswag`
task (style "harness") on the same tiny model."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_hf_model

import flax_gpt2
from flax_gpt2.evaluation import hellaswag

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
DATA = Path(__file__).resolve().parent / "data"
HELLASWAG = DATA / "hellaswag_tiny.jsonl"  # 12 records in the official hellaswag_val.jsonl format


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bpe_dir):
    """A tiny random GPT-2 with every weight random and large (peaked next-token distributions)."""
    torch_model, folder = make_hf_model(tmp_path_factory, name="hellaswag_tiny", seed=2, randomize=True,
                                        randomize_std=0.3)
    model, params = flax_gpt2.from_pretrained(str(folder), progress=False)
    return torch_model, model, params, flax_gpt2.get_tokenizer(bpe_dir), folder


def torch_nanogpt(torch_model, hf_tokenizer, record):
    """build-nanogpt's hellaswag.py: `render_example`, then the mean loss over each ending's tokens."""
    ctx_tokens = hf_tokenizer.encode(record["ctx"])
    rows, masks = [], []
    for end in record["endings"]:
        end_tokens = hf_tokenizer.encode(" " + end)
        rows.append(ctx_tokens + end_tokens)
        masks.append([0] * len(ctx_tokens) + [1] * len(end_tokens))
    width = max(len(r) for r in rows)
    tokens = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)], mask[i, :len(m)] = torch.tensor(r), torch.tensor(m)
    with torch.no_grad():
        logits = torch_model(tokens).logits
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                               tokens[:, 1:].reshape(-1), reduction="none").view(4, -1)
    shift_mask = mask[:, 1:]
    sum_loss = (losses * shift_mask).sum(dim=1)
    return sum_loss.numpy(), shift_mask.sum(dim=1).numpy()


def test_nanogpt_style_matches_build_nanogpt(tiny):
    import transformers

    torch_model, model, params, tokenizer, folder = tiny
    examples = hellaswag.load(HELLASWAG, tokenizer)
    loss_fn = hellaswag.make_loss_fn(model)
    sums, counts = hellaswag.score(params, examples, loss_fn, seq_len=hellaswag.rows_length(examples, 128),
                                   batch_size=5)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    records = hellaswag.read_records(HELLASWAG)
    ref = [torch_nanogpt(torch_model, hf_tokenizer, r) for r in records]
    ref_sums, ref_counts = np.array([r[0] for r in ref]), np.array([r[1] for r in ref])
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(sums / counts, ref_sums / ref_counts, rtol=1e-4)
    labels = np.array([r["label"] for r in records])
    expected = {"acc": np.mean(ref_sums.argmin(1) == labels),
                "acc_norm": np.mean((ref_sums / ref_counts).argmin(1) == labels)}
    result = hellaswag.evaluate(params, examples, loss_fn, batch_size=5, context_length=128)
    assert result == {**expected, "num_examples": 12}
    assert hellaswag.evaluate_model(model, params, HELLASWAG, tokenizer, batch_size=5) == result
    assert loss_fn._cache_size() == 1  # one shape for every batch, the short last one included


# Appended to the endings in turn: text whose length in characters, UTF-8 bytes and tokens disagree.
NON_ASCII = (" à côté du café", " 東京の夜", " 🎉🎉 fête", "", " naïve Zoë", " Привет мир")


def non_ascii_file(folder: Path) -> Path:
    """hellaswag_tiny with non-ASCII text added to its endings (more to some endings than to others)."""
    path = folder / "hellaswag_non_ascii.jsonl"
    lines = []
    for i, line in enumerate(HELLASWAG.read_text().splitlines()):
        record = json.loads(line)
        record["endings"] = [e.rstrip(".") + NON_ASCII[(i + j) % len(NON_ASCII)] + "."
                             for j, e in enumerate(record["endings"])]
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("data", ["official", "non_ascii"])
def test_harness_style_equals_lm_eval_hellaswag(tiny, tmp_path, data):
    """Log-likelihoods, `acc` and `acc_norm` equal lm-eval's `hellaswag` run with its HF model; with
    non-ASCII endings `acc_norm` divides by characters, as lm-eval does (not bytes, not tokens: on this file
    each of those gives another `acc_norm`)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional [eval] extra")
    pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (lm_eval[hf])")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from flax_gpt2.evaluation import lm_eval_tasks as lm_eval_cli

    _, model, params, tokenizer, folder = tiny
    path = HELLASWAG if data == "official" else non_ascii_file(tmp_path)
    lm_eval_cli.write_local_task(tmp_path / "tasks", "hellaswag", path, cache_dir=tmp_path / "cache")
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(folder), "device": "cpu", "dtype": "float32"}, tasks=["hellaswag"],
        batch_size=4, bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    examples = hellaswag.load(path, tokenizer, style="harness")
    loss_fn = hellaswag.make_loss_fn(model)
    sums, _ = hellaswag.score(params, examples, loss_fn, seq_len=hellaswag.rows_length(examples, 128), batch_size=4)
    lls = np.array([[resp[0][0] for resp in sample["resps"]] for sample in out["samples"]["hellaswag"]])
    np.testing.assert_allclose(-sums, lls, rtol=1e-4)
    result = hellaswag.evaluate(params, examples, loss_fn, batch_size=4, context_length=128)
    assert result["acc"] == out["results"]["hellaswag"]["acc,none"]
    assert result["acc_norm"] == out["results"]["hellaswag"]["acc_norm,none"]
    if data == "non_ascii":
        labels = np.array([e.label for e in examples.examples])
        endings = [[hellaswag.harness_preprocess(e) for e in r["endings"]] for r in hellaswag.read_records(path)]
        chars = np.array([[len(e) for e in row] for row in endings], float)
        utf8 = np.array([[len(e.encode()) for e in row] for row in endings], float)
        tokens = np.array([[len(t) for t in e.endings] for e in examples.examples], float)
        assert (chars != utf8).any() and (chars != tokens).any()
        acc_norm = lambda lengths: float(np.mean(np.argmax(lls / lengths, axis=1) == labels))  # noqa: E731
        assert acc_norm(chars) == result["acc_norm"]
        assert acc_norm(utf8) != result["acc_norm"] and acc_norm(tokens) != result["acc_norm"]


def test_hugging_face_rows_read_like_the_official_file(tiny, tmp_path):
    tokenizer = tiny[3]
    official = hellaswag.load(HELLASWAG, tokenizer)
    rows = []
    for line in HELLASWAG.read_text().splitlines():
        record = json.loads(line)
        record["label"] = str(record["label"])  # Rowan/hellaswag stores labels as strings
        if record["ind"] % 2:
            del record["ctx"]  # and a record without `ctx` is ctx_a + " " + ctx_b
        rows.append(json.dumps(record))
    (tmp_path / "hf.jsonl").write_text("\n".join(rows) + "\n")
    for style in hellaswag.STYLES:
        assert hellaswag.load(tmp_path / "hf.jsonl", tokenizer, style=style) == hellaswag.load(HELLASWAG, tokenizer,
                                                                                                 style=style)
    assert len(hellaswag.load(HELLASWAG, tokenizer, limit=5)) == 5
    assert official.style == "nanogpt"


@pytest.mark.parametrize("line, message", [
    ("not json", r":1: not a JSON object"),
    ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}', "'endings' must be a list of 4"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": ""}', "the test split has no labels"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "'label' must be 0..3"),
    ('{"endings": ["b", "c", "d", "e"], "label": 1}', "has no context"),
])
def test_bad_records_are_clear_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        hellaswag.read_records(path)


def test_long_rows_lose_context_from_the_left(tiny):
    _, model, params, tokenizer, _ = tiny
    examples = hellaswag.load(HELLASWAG, tokenizer, limit=4)
    loss_fn = hellaswag.make_loss_fn(model)
    full, counts = hellaswag.score(params, examples, loss_fn, seq_len=64, batch_size=4)
    short, short_counts = hellaswag.score(params, examples, loss_fn, seq_len=24, batch_size=4)
    np.testing.assert_array_equal(counts, short_counts)  # every ending token is still scored
    assert np.all(np.isfinite(short)) and not np.allclose(full, short)
    with pytest.raises(ValueError, match="does not fit seq_len=4"):
        hellaswag.score(params, examples, loss_fn, seq_len=4, batch_size=4)


SHARDED = """
import json, sys
import jax, numpy as np
import flax_gpt2
from flax_gpt2.evaluation import hellaswag
from jax.sharding import NamedSharding, PartitionSpec as P
folder, bpe, data = sys.argv[1:]
model, params = flax_gpt2.from_pretrained(folder, progress=False)
examples = hellaswag.load(data, flax_gpt2.get_tokenizer(bpe))
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as train/mesh.py
replicated = NamedSharding(mesh, P())
params = jax.device_put(params, replicated)
rows = NamedSharding(mesh, P("data", None))
sharded = hellaswag.make_loss_fn(model, jax.tree.map(lambda _: replicated, params), rows)
plain = hellaswag.make_loss_fn(model)
a = hellaswag.score(params, examples, sharded, seq_len=64, batch_size=3)
b = hellaswag.score(jax.device_get(params), examples, plain, seq_len=64, batch_size=3)
print(json.dumps({"devices": jax.device_count(), "max_rel": float(np.max(np.abs(a[0] - b[0]) / np.abs(b[0]))),
                  "counts": bool((a[1] == b[1]).all()), "compiles": sharded.jitted._cache_size(),
                  "acc": hellaswag.accuracy(examples, *a) == hellaswag.accuracy(examples, *b)}))
"""


def test_sharded_loss_fn_splits_rows_over_devices(tiny, bpe_dir):
    """On 4 (fake CPU) devices, each scores a quarter of the rows; the result equals one device's."""
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(tiny[4]), str(bpe_dir), str(HELLASWAG)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"devices": 4, "max_rel": pytest.approx(0, abs=1e-5), "counts": True, "compiles": 1, "acc": True}


def test_hellaswag_during_training_is_logged_and_right(tmp_path, shared_dir, bpe_dir):
    """`--config.eval_hellaswag=FILE` scores HellaSwag at every eval; the logged accuracy equals a one-off
    evaluation of the saved params."""
    from flax_gpt2.configs import tiny as tiny_config
    from flax_gpt2.checkpoints import run_folders as run_checkpoint
    from flax_gpt2.modeling.model import GPT2LMHeadModel
    from flax_gpt2.train.metrics import read_metrics
    from flax_gpt2.train.train_loop import train_and_evaluate

    data = Path(__file__).parent / "data" / "hellaswag_tiny.jsonl"
    config = tiny_config.get_config()
    config.steps, config.eval_every, config.checkpoint_every, config.log_every, config.progress_bar = 4, 2, 4, 1, False
    config.eval_hellaswag = str(data)
    config.data.cache_dir = str(tmp_path / "cache")
    train_and_evaluate(config, str(tmp_path / "run"))
    records = [r for r in read_metrics(str(tmp_path / "run")) if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in records] == [2, 4] and all("eval_loss" in r for r in records)
    model_config, params = run_checkpoint.load_run(tmp_path / "run")
    expected = hellaswag.evaluate_model(GPT2LMHeadModel(model_config), params, data,
                                        flax_gpt2.get_tokenizer(str(bpe_dir)))
    assert records[-1]["hellaswag_acc"] == expected["acc"] and records[-1]["hellaswag_acc_norm"] == expected["acc_norm"]

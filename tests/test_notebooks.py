"""The Colab notebooks (notebooks/*.ipynb) run top to bottom in a real Jupyter kernel, offline, on tiny
parameters, and each test checks what its notebook produced, not only that it ran.

papermill executes them (through nbclient, in an ipykernel kernel): it injects the test's values after the
notebook's `parameters` cell, exactly as a user runs a notebook headless, and a failing cell fails the
test with that cell's traceback. The executed copies are left in pytest's tmp folder for inspection.
Each notebook ends with a cell tagged `summary` that prints its results as JSON; the tests read it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("quickstart.ipynb", "finetune_commongen.ipynb", "pretrain_shakespeare.ipynb")
CELL_TIMEOUT_S = 420  # a hung cell fails the test instead of CI


def _require(module: str):
    """The module, or a skip; in CI (where the `[test]` extra installs it) a failure, never a quiet skip."""
    try:
        return __import__(module)
    except ImportError:
        message = f"{module} is not installed (pip install -e '.[test]')"
        if os.environ.get("CI") or os.environ.get("FLAX_GPT2_REQUIRE_SHARED"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(autouse=True)
def offline_kernel(monkeypatch, tmp_path):
    """The kernel inherits this environment: no network, CPU only, a private token cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("FLAX_GPT2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty hub cache: nothing comes from a download
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "XLA_FLAGS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, bpe_dir) -> Path:
    """A random-init `tiny` GPT-2 (2 layers, width 64, GPT-2's vocabulary) as a Hugging Face folder."""
    import jax

    import flax_gpt2

    model = flax_gpt2.GPT2LMHeadModel(flax_gpt2.GPT2Config.from_preset("tiny"))
    params = flax_gpt2.init_params(model, jax.random.key(0))
    folder = tmp_path_factory.mktemp("notebook_models") / "tiny-gpt2"
    flax_gpt2.save_pretrained(folder, model, params, tokenizer=flax_gpt2.get_tokenizer(bpe_dir), progress=False)
    return folder


def run_notebook(name: str, tmp_path: Path, **parameters):
    """Executes notebooks/`name` with `parameters` in `tmp_path` (its working directory); returns the
    executed notebook. The checkout under test is imported (`repo_dir`), not whatever is installed."""
    papermill = _require("papermill")
    import nbformat

    parameters = {"repo_dir": str(ROOT), **parameters}
    unknown = set(parameters) - set(papermill.inspect_notebook(str(NOTEBOOKS / name)))
    assert not unknown, f"{name} has no parameters {sorted(unknown)}"
    out = tmp_path / name
    started = time.monotonic()
    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters,
                               kernel_name="python3", cwd=str(tmp_path), progress_bar=False,
                               execution_timeout=CELL_TIMEOUT_S)
    print(f"{name}: {time.monotonic() - started:.0f} s")
    nb = nbformat.read(out, as_version=4)
    # tqdm.auto's notebook bars (from_pretrained, evaluation) need ipywidgets (the [test] extra has it).
    noise = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if o.output_type == "stream" and "IProgress not found" in o.get("text", "")]
    assert not noise, noise[0]
    return nb


def tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r} expected, found {len(cells)}"
    return cells[0]


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def summary(nb) -> dict:
    """The JSON the notebook's last cell (tagged `summary`) printed."""
    return json.loads(stdout(tagged(nb, "summary")))


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_quickstart(tmp_path, tiny_model):
    nb = run_notebook("quickstart.ipynb", tmp_path, model_name=str(tiny_model), max_new_tokens=12,
                      ppl_window=32, ppl_stride=16)
    s = summary(nb)
    generations = s["generations"]
    assert set(generations) == {"greedy", "top-k 50 + top-p 0.95 sampling",
                                "beam search (4 beams, no repeated 3-grams)", "greedy + repetition penalty 1.3"}
    for texts in generations.values():
        assert all(t.strip() for t in ([texts] if isinstance(texts, str) else texts)), generations
    assert len(generations["top-k 50 + top-p 0.95 sampling"]) == 3
    assert len(generations["beam search (4 beams, no repeated 3-grams)"]) == 2
    assert len(s["pipeline"]) == 5
    assert all(t.startswith("Hello, I'm a language model,") and len(t) > len("Hello, I'm a language model,")
               for t in s["pipeline"])
    assert s["stream"].strip() and s["stream_equals_generate"] is True
    assert len(s["top_tokens"]) == 20 and s["top_probs"] == sorted(s["top_probs"], reverse=True)
    assert 0 < sum(s["top_probs"]) <= 1 + 1e-6
    assert len(s["perplexity"]) == 3
    # A random-init model: about the vocabulary size (50257), finite either way.
    assert all(1 < p < 1e6 for p in s["perplexity"].values()), s["perplexity"]
    assert images(nb) >= 1  # the next-token bar chart


@pytest.mark.parametrize("name, hub_parameter, cell_source", [
    ("quickstart.ipynb", {"model_name": "gpt2"}, "flax_gpt2.from_pretrained(model_name)"),
    ("finetune_commongen.ipynb", {"data_source": "allenai/common_gen"}, "data_lib.load_tokens(config.data)"),
])
def test_hub_downloads_fail_with_instructions(tmp_path, bpe_dir, name, hub_parameter, cell_source):
    """Offline, the cell that needs the hub fails (stopping the notebook there) and says what to do instead."""
    papermill = _require("papermill")
    parameters = dict(hub_parameter)
    if name == "finetune_commongen.ipynb":
        parameters.update(tokenizer=str(bpe_dir), workdir=str(tmp_path / "run"))
    with pytest.raises(papermill.PapermillExecutionError) as failure:
        run_notebook(name, tmp_path, **parameters)
    message = str(failure.value)
    assert cell_source in failure.value.source  # the failing cell is the download, not a later one
    assert "hf download" in message and "in the Parameters cell" in message, message


def test_notebooks_are_committed_without_outputs():
    """As nbstripout leaves them: no outputs, no execution counts, no papermill metadata."""
    import nbformat

    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {i} has outputs: strip them"
            assert "papermill" not in cell.metadata and "execution" not in cell.metadata, f"{name} cell {i}"
        assert "papermill" not in nb.metadata and "widgets" not in nb.metadata, name
        assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1, f"{name}: one parameters cell"


def test_parameters_cells_are_papermill_readable():
    """papermill sees every variable of each parameters cell (one plain assignment a line, no '=' in comments),
    so `papermill --help-notebook` lists them and no test passes a parameter the notebook does not have."""
    papermill = _require("papermill")
    import ast

    import nbformat

    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        cell = tagged(nb, "parameters")
        assigned = [t.id for node in ast.parse(cell.source).body for t in node.targets]
        assert list(papermill.inspect_notebook(str(NOTEBOOKS / name))) == assigned, name
        assert "repo_dir" in assigned, name


def test_notebooks_match_their_jupytext_pairs():
    """Each notebook's cells equal its paired notebooks/*.py (percent format), the file to review and diff."""
    jupytext = _require("jupytext")
    import nbformat

    for name in NAMES:
        ipynb = nbformat.read(NOTEBOOKS / name, as_version=4)
        paired = jupytext.read(NOTEBOOKS / name.replace(".ipynb", ".py"))
        strip = lambda nb: [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]  # noqa: E731
        assert strip(ipynb) == strip(paired), (f"{name} and its .py differ: run `jupytext --sync notebooks/{name}` "
                                               "after editing either")


def test_pretrain_shakespeare(tmp_path, shared_dir, monkeypatch):
    # Two CPU devices: the mesh, the parameter shards and the sharded step are real, not trivial.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    steps, stop_at = 40, 12
    nb = run_notebook("pretrain_shakespeare.ipynb", tmp_path,
                      data_path=str(shared_dir / "data" / "tinyshakespeare.txt"),
                      tokenizer=str(shared_dir / "gpt2-bpe"), workdir=str(tmp_path / "run"),
                      n_layer=2, n_embd=64, n_head=4, seq_len=32, batch_size=4, steps=steps, learning_rate=5e-3,
                      warmup_steps=5, log_every=2, eval_every=20, eval_batches=2, checkpoint_every=20,
                      press_stop_at=stop_at, plot_every_s=0.5, sample_tokens=24)
    s = summary(nb)
    assert len(s["devices"]) == 2
    assert s["placement"]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and s["placement"]["wte_shards"] == 2
    # The simulated Stop press interrupted the first run after a checkpoint, and the second call resumed it.
    first, resumed = s["first_run"], s["resumed"]
    assert first["stopped"] == "interrupted" and stop_at <= first["step"] < steps, first
    assert first["step"] in s["checkpoint_steps"] and s["checkpoint_steps"][-1] == first["step"]
    assert resumed["stopped"] == "done" and resumed["step"] == steps, resumed
    logged = s["steps_logged"]
    assert logged == sorted(set(logged)) and logged[-1] == steps  # one run: no step logged twice
    losses = s["losses"]
    after_resume = losses[next(i for i, step in enumerate(logged) if step > first["step"])]
    assert after_resume < losses[0] - 0.5, losses  # resumed, not restarted from a random init
    assert losses[-1] < losses[0] - 1.0, losses  # the loss went down
    assert s["eval_losses"][-1] < s["eval_losses"][0], s["eval_losses"]
    assert s["sample"].startswith("ROMEO:") and len(s["sample"]) > len("ROMEO:")
    assert images(nb) >= 2  # the live loss curves of both training cells


def test_finetune_commongen(tmp_path, shared_dir, tiny_model, monkeypatch):
    _require("transformers")  # the notebook loads its export back with transformers when it is installed
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # a 2-device data-parallel mesh
    steps = 30
    nb = run_notebook("finetune_commongen.ipynb", tmp_path, model_name=str(tiny_model),
                      data_source=str(shared_dir / "data" / "commongen" / "commongen.dev.jsonl"),
                      tokenizer=str(shared_dir / "gpt2-bpe"), workdir=str(tmp_path / "run"),
                      export_dir=str(tmp_path / "export"), steps=steps, batch_size=8, seq_len=64,
                      learning_rate=3e-3, warmup_steps=5, log_every=2, eval_every=15, num_coverage_sets=6,
                      plot_every_s=1.0)
    s = summary(nb)
    assert s["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert s["result"]["stopped"] == "done" and s["result"]["step"] == steps
    losses = s["losses"]
    assert losses[-1] < losses[0] - 1.0, losses  # fine-tuning lowered the loss
    assert len(s["eval_losses"]) == 2 and s["eval_losses"][-1] < s["eval_losses"][0]
    assert isinstance(s["before"], str) and isinstance(s["after"], str)
    assert len(s["samples"]) == 6
    for row in s["samples"]:
        assert row["concepts"] and "." not in row["sentence"] and 0 <= row["coverage"] <= 1
    assert 0 <= s["coverage"] <= 1
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(s["export_files"])
    hf = s["hf_check"]  # transformers loaded the export: same tokenizer, logits and greedy tokens
    assert hf is not None and hf["same_token_ids"] and hf["same_greedy_tokens"], hf
    assert hf["max_abs_logit_diff"] < 1e-4, hf
    assert images(nb) >= 1  # the live loss curve


def test_finetune_commongen_with_lora(tmp_path, shared_dir, tiny_model, monkeypatch):
    """`lora_rank > 0`: the LoRA recipe trains adapters only, exports them as a PEFT folder, and both flax_gpt2
    (`from_pretrained(base, adapter=DIR)`) and peft on transformers load it back with the run's logits."""
    _require("peft")  # the notebook loads the adapter back with peft when it is installed
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    steps, rank = 20, 4
    nb = run_notebook("finetune_commongen.ipynb", tmp_path, model_name=str(tiny_model),
                      data_source=str(shared_dir / "data" / "commongen" / "commongen.dev.jsonl"),
                      tokenizer=str(shared_dir / "gpt2-bpe"), workdir=str(tmp_path / "run"),
                      export_dir=str(tmp_path / "adapter"), lora_rank=rank, steps=steps, batch_size=8, seq_len=64,
                      learning_rate=1e-2, warmup_steps=2, log_every=2, eval_every=10, num_coverage_sets=2,
                      plot_every_s=1.0)
    s = summary(nb)
    assert s["lora_rank"] == rank and s["result"]["stopped"] == "done" and s["result"]["step"] == steps
    losses = s["losses"]
    # The adapters alone lowered the loss (of a random base with frozen embeddings: by a few tenths here).
    assert losses[-1] < losses[0] - 0.1, losses
    assert len(s["eval_losses"]) == 2 and s["eval_losses"][-1] < s["eval_losses"][0], s["eval_losses"]
    # The tiny model (2 layers, width 64, MLP 256): r x (in + out) per adapted module, c_attn, both c_proj, c_fc.
    assert s["adapter_weights"] == 2 * rank * ((64 + 3 * 64) + (64 + 64) + (64 + 256) + (256 + 64))
    assert set(s["export_files"]) == {"adapter_config.json", "adapter_model.safetensors"}, s["export_files"]
    assert s["reload_max_abs_diff"] < 1e-5  # flax_gpt2.from_pretrained(base, adapter=export) is the run's model
    hf = s["hf_check"]  # peft.PeftModel on transformers' GPT-2: same logits and greedy tokens
    assert hf is not None and hf["same_token_ids"] and hf["same_greedy_tokens"], hf
    assert hf["max_abs_logit_diff"] < 1e-4, hf
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == rank and config["lora_alpha"] == 2 * rank, config
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"], config

"""Training runs a user trips on: bad configs, `--help`, explicit steps on epoch-counting configs, what a run
prints and writes (result.json and metrics.jsonl strict JSON, the progress bar), and `evaluate --limit`.

Command lines run as real subprocesses (`python -m train --config configs/tiny.py ...` from the repository
root): one error line naming the key or file, exit 2 for a usage error and 1 for a runtime one, no traceback
without `--debug`, and a run that fails before training leaves nothing new behind (no workdir, no `.lock`).
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SHARED, tiny_train_config

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def _train(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _check_error(err: str, names: str, code: int) -> None:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err[-3000:]
    assert [line for line in lines if "error:" in line] == [lines[-1]], err[-3000:]
    assert lines[-1].startswith("train: error:") and names in lines[-1], lines[-1]
    assert ("--debug" in lines[-1]) == (code == 1), lines[-1]


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


NONE_CONFIG = "def get_config():\n    return None\n"
DICT_CONFIG = "def get_config():\n    return {'steps': 3}\n"
PARTIAL_CONFIG = "import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({'steps': 3})\n"

# (id, config file (None: configs/tiny.py) or its text, overrides, exit code, what the error line names)
CASES = [
    ("get-config-returns-none", NONE_CONFIG, [], 2, "get_config() returned NoneType"),
    ("get-config-returns-none-with-override", NONE_CONFIG, ["--config.steps=3"], 2, "get_config() returned NoneType"),
    ("get-config-returns-dict", DICT_CONFIG, [], 2, "get_config() returned dict"),
    ("get-config-lacks-keys", PARTIAL_CONFIG, [], 2, "lacks the config keys"),
    ("micro-batch-not-dividing", None, ["--config.micro_batch_size=3"], 2, "micro_batch_size=3"),
    ("dtype-unknown", None, ["--config.model.dtype=fp8"], 2, "config.model.dtype='fp8'"),
    ("schedule-unknown", None, ["--config.optimizer.schedule=cosin"], 2, "optimizer.schedule='cosin'"),
    ("recipe-unknown", None, ["--config.data.recipe=commongem"], 2, "config.data.recipe='commongem'"),
    ("mesh-too-big", None, ["--config.mesh.data=3"], 2, "mesh (data=3"),
    ("preset-unknown", None, ["--config.model.preset=gpt5"], 2, "preset 'gpt5'"),
    ("layers-zero", None, ["--config.model.n_layer=0"], 2, "config.model: n_layer"),
    ("attention-unknown", None, ["--config.model.attention=flash"], 2, "attention='flash'"),
    ("seq-len-past-n-positions", None, ["--config.data.seq_len=5000"], 2, "data.seq_len=5000"),
    ("axis-rules-not-pairs", None, ["--config.logical_axis_rules=foo"], 2, "config.logical_axis_rules"),
    ("init-from-with-sizes", None, ["--config.init_from=gpt2", "--config.model.n_layer=3"], 2, "init_from='gpt2'"),
    ("data-source-empty", None, ["--config.data.source="], 2, "config.data.source is empty"),
    ("profile-end-before-start", None, ["--config.profile_steps=5:3"], 2, "config.profile_steps='5:3'"),
    ("profile-past-the-run", None, ["--config.steps=10", "--config.profile_steps=8:12"], 2,
     "the run ends at step 10"),
    ("profile-not-a-window", None, ["--config.profile_steps=5"], 2, "must be 'START:END'"),
    ("steps-and-epochs", "finetune_commongen", ["--config.steps=10", "--config.epochs=2"], 2,
     "--config.steps=10 and --config.epochs=2"),
    ("data-source-missing", None, ["--config.data.source=/nonexistent/corpus.txt"], 1, "/nonexistent/corpus.txt"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_run_that_cannot_start_is_one_line_and_leaves_nothing(case, tmp_path):
    _, config, overrides, code, names = case
    if config is None or "\n" not in config:
        config_arg = config or "configs/tiny.py"
        overrides = [f"--config.data.cache_dir={tmp_path / 'cache'}", *overrides]
    else:  # a config file of the user's (with the case's overrides only)
        (tmp_path / "my_config.py").write_text(config)
        config_arg = str(tmp_path / "my_config.py")
    workdir = tmp_path / "run"
    proc = _train("--config", config_arg, "--workdir", str(workdir), *overrides)
    assert proc.returncode == code, proc.stderr[-3000:]
    _check_error(proc.stderr, names, code)
    assert not workdir.exists(), sorted(os.listdir(workdir))


def test_a_failed_start_in_an_existing_workdir_leaves_only_what_was_there(tmp_path):
    workdir = tmp_path / "mine"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    proc = _train("--config", "configs/tiny.py", "--workdir", str(workdir), "--config.data.source=/nonexistent.txt")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert sorted(os.listdir(workdir)) == ["notes.txt"] and (workdir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", [[sys.executable, "-m", "train", "--help"],
                                     [sys.executable, "-m", "train", "--config", "configs/tiny.py", "-h"],
                                     [str(Path(sys.executable).parent / "flax-gpt2-train"), "--help"]],
                         ids=["python-m-train", "dash-h-after-a-config", "console-script"])
def test_help_prints_the_usage_the_configs_and_where_the_keys_are(command, tmp_path):
    if not Path(command[0]).exists():
        pytest.skip("the flax-gpt2-train script is not installed in this environment")
    proc = subprocess.run(command, cwd=tmp_path if "flax-gpt2-train" in command[0] else REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: ") and "--workdir DIR" in proc.stdout and "--config.KEY=VALUE" in proc.stdout
    for name in ("tiny", "shakespeare", "finetune_commongen", "gpt2_124m"):
        assert f"\n  {name} " in proc.stdout
    assert "configs/base.py" in proc.stdout and "Unknown command line flag" not in proc.stderr


@pytest.mark.parametrize("name", ["finetune_commongen", "finetune_eli5"])
def test_explicit_steps_beat_a_configs_epochs(name):
    from flax_gpt2.train import train_loop
    from flax_gpt2.train.config_cli import parse_args

    config, _ = parse_args(["train", "--config", name, "--workdir", "w", "--config.steps=10"])
    assert train_loop._resolve_epochs(config, steps_per_epoch=20).steps == 10
    default, _ = parse_args(["train", "--config", name, "--workdir", "w"])
    assert train_loop._resolve_epochs(default, steps_per_epoch=20).steps == default.epochs * 20  # epochs still count


def _read(path: Path):
    return _strict_json(path.read_text())


@pytest.fixture(scope="module")
def run_without_held_out_data(tmp_path_factory):
    """A finished 2-step run of the tiny config on a fresh corpus with no held-out split and progress_bar=False:
    `(workdir, config, returned result, stdout, stderr)`."""
    import contextlib
    import io

    from flax_gpt2.train.train_loop import train_and_evaluate

    tmp_path = tmp_path_factory.mktemp("no_held_out")
    corpus = tmp_path / "corpus.txt"  # a fresh corpus (tokenized by this run), small enough to tokenize fast
    corpus.write_text((SHARED / "data" / "tinyshakespeare.txt").read_text()[:20_000])
    config = tiny_train_config(tmp_path / "cache", steps=2, eval_every=0,
                               **{"data.val_fraction": 0.0, "data.source": str(corpus)})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = train_and_evaluate(config, str(tmp_path / "run"))
    return tmp_path / "run", config, result, out.getvalue(), err.getvalue()


def test_result_json_is_strict_json_without_held_out_data(run_without_held_out_data):
    """No held-out split: no eval loss, null in result.json with the reason (never NaN), no NaN eval record.
    The run says where its outputs are, and progress_bar=False shows no bar (not even the tokenizer's)."""
    workdir, _, returned, out, err = run_without_held_out_data
    result = _read(workdir / "result.json")
    assert result == returned and result["step"] == 2 and result["loss"] > 0
    assert result["eval_loss"] is None and "no held-out batch" in result["why_null"]["eval_loss"]
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)
    assert f"done: step 2, loss {result['loss']:.4f}, eval loss n/a; outputs in {workdir}" in out
    assert "tokens/s" not in err and "tokenizing" not in err and "%|" not in err, err[-2000:]


def test_rerunning_a_finished_run_writes_strict_json(run_without_held_out_data, capsys):
    """Rerunning a finished run trains no step: its loss is null in result.json, with the reason."""
    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir, config, _, _, _ = run_without_held_out_data
    again = train_and_evaluate(config, str(workdir))
    result = _read(workdir / "result.json")
    assert result == again and result["step"] == 2 and result["loss"] is None
    assert "already done (steps=2)" in result["why_null"]["loss"]
    assert "done: step 2, loss n/a" in capsys.readouterr().out


def test_result_json_of_a_run_stopped_before_its_first_eval(tmp_path):
    """SIGTERM (a preemption) after the first step, before any eval: eval_loss is null, and says why."""
    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir = tmp_path / "run"
    config = tiny_train_config(tmp_path / "cache", steps=500, eval_every=0, checkpoint_every=1000)
    done = threading.Event()

    def preempt_after_step_1():
        deadline = time.time() + 300
        while time.time() < deadline and not done.is_set():
            metrics = workdir / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().strip():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=preempt_after_step_1, daemon=True)
    thread.start()
    try:
        returned = train_and_evaluate(config, str(workdir))
    finally:
        done.set()
        thread.join()
    result = _read(workdir / "result.json")
    assert result == returned and result["stopped"] == "preempted" and 1 <= result["step"] < 500
    assert result["eval_loss"] is None
    assert result["why_null"]["eval_loss"] == f"no eval ran before the run was preempted at step {result['step']}"


@pytest.mark.parametrize("initial", [0, 50], ids=["start", "restart"])
def test_the_bar_leaves_the_compile_step_out_of_its_rates_and_eta(initial, capsys):
    """The first step of a start or restart compiles: it shows no `tok/s=nan` and no ETA extrapolated from the
    compile time; the ETA then follows the timed steps."""
    from flax_gpt2.train.metrics import Progress

    progress = Progress(total=100, initial=initial, tokens_per_step=512, flops_per_token=1e6, peak=1e12)
    progress.start_timing()
    time.sleep(1.0)  # "compiling"
    progress.update(10.5, timed=False)
    for _ in range(3):
        time.sleep(0.01)
        progress.update(10.4)
    progress.close()
    err = capsys.readouterr().err
    assert "nan" not in err.lower(), err
    assert re.search(r"ETA \?, loss=10\.5000, first step \d+\.\d s \(compiling\)", err), err
    eta = progress.postfix(10.4).split(",")[0]  # "ETA 00:01": ~96 steps of ~0.01 s, not ~96 x 1 s
    minutes, seconds = eta.removeprefix("ETA ").split(":")
    assert int(minutes) * 60 + int(seconds) < 30, eta
    assert progress.tokens_per_sec > 512 / 0.5  # measured over the timed steps only


def test_evaluate_limit_must_be_finite(capsys):
    from flax_gpt2 import evaluate

    for value in ("inf", "nan", "-inf"):
        assert evaluate.main(["--model", "gpt2", "--tasks", "hellaswag", "--limit", value]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "--limit" in err.strip().splitlines()[-1], err

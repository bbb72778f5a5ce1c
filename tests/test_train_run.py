"""`python -m train` end to end on the tiny config: outputs, preemption (SIGTERM) and kill -9 resumes that
reproduce the uninterrupted run, unreadable checkpoints, and the NaN stop."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_train_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 10


def _args(workdir, cache_dir, *extra):
    return [sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir", str(workdir),
            f"--config.steps={STEPS}", "--config.checkpoint_every=4", "--config.log_every=1", "--config.eval_every=5",
            f"--config.data.cache_dir={cache_dir}", *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def _run(workdir, cache_dir, *extra):
    proc = subprocess.run(_args(workdir, cache_dir, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _records(workdir):
    with open(Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(workdir, key="loss"):
    return {r["step"]: r[key] for r in _records(workdir) if key in r}


def _start_and_stop(workdir, cache_dir, sig, at_step, after_checkpoint=None):
    """Starts a run and sends `sig` once metrics.jsonl shows step `at_step` (and, if given, checkpoint
    `after_checkpoint` is complete: orbax renames its folder to the bare step number when done)."""
    proc = subprocess.Popen(_args(workdir, cache_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        path = Path(workdir) / "metrics.jsonl"
        if (path.exists() and max([r["step"] for r in _records(workdir)] or [0]) >= at_step
                and (after_checkpoint is None or (Path(workdir) / "checkpoints" / str(after_checkpoint)).is_dir())):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stderr.read()[-3000:]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, shared_dir):
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted run of STEPS steps, profiling steps 3 and 4 (the interrupted runs compared with it
    do not: the trace changes nothing a step computes)."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = _run(workdir, cache_dir, "--config.profile_steps=3:4",
                f"--config.compile_cache_dir={workdir / 'compile_cache'}")  # (off by default on CPU)
    return workdir, proc.stderr


def test_tiny_trains_end_to_end(reference):
    workdir, console = reference
    records = _records(workdir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all({"grad_norm", "lr"} <= set(r) for r in train)
    assert all({"tokens_per_sec", "mfu", "mfu_causal"} <= set(r) for r in train[1:])  # step 1 is compilation
    assert all(0 < r["mfu_causal"] < r["mfu"] for r in train[1:])
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    assert [r["step"] for r in records if "eval_loss" in r] == [5, 10]
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    assert (workdir / "loss.png").stat().st_size > 1000
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [4, 8, 10]
    for field in ("loss=", "tok/s=", "MFU=", "ETA"):  # the progress bar
        assert field in console
    result = json.loads((workdir / "result.json").read_text())
    assert result["step"] == STEPS and result["stopped"] == "done"


def test_run_loads_as_a_model(reference):
    import jax

    import flax_gpt2
    from flax_gpt2.checkpoints import run_folders as run_checkpoint

    workdir, _ = reference
    assert run_checkpoint.is_training_run(workdir) and not run_checkpoint.is_training_run(workdir / "tensorboard")
    config, params = run_checkpoint.load_run(workdir)
    assert config.n_layer == 2 and config.n_embd == 64
    _, early = run_checkpoint.load_run(workdir, step=4)
    assert not np.allclose(early["transformer"]["wte"]["embedding"], params["transformer"]["wte"]["embedding"])
    model, loaded = flax_gpt2.from_pretrained(str(workdir), progress=False)
    np.testing.assert_array_equal(jax.tree.leaves(loaded)[0], jax.tree.leaves(params)[0])
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 5"):
        run_checkpoint.load_run(workdir, step=5)


def test_run_exports_to_transformers_and_samples(reference, tmp_path, capsys):
    import jax.numpy as jnp
    import torch
    import transformers

    import flax_gpt2
    from flax_gpt2 import convert, sample

    workdir, _ = reference
    out = convert.convert(str(workdir), str(tmp_path / "hf"), progress=False)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    model, params = flax_gpt2.from_pretrained(str(workdir), progress=False)
    ids = np.random.default_rng(0).integers(0, 50257, (2, 16))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)).logits)
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # The run folder carries its tokenizer, so sampling from it works offline.
    assert 0 == sample.main(["--model", str(workdir), "--prompt", "ROMEO:", "--max_new_tokens", "5",
                 "--cache_dir", str(tmp_path / "cache"), "--no_progress"])
    assert "ROMEO:" in capsys.readouterr().out


def test_sigterm_then_resume_reproduces_the_run(reference, cache_dir, tmp_path):
    code, err = _start_and_stop(tmp_path, cache_dir, signal.SIGTERM, at_step=2)
    assert code == 0, err[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["stopped"] == "preempted" and result["step"] < STEPS
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved[-1] == result["step"]  # saved where it stopped, not at the last periodic checkpoint
    _run(tmp_path, cache_dir)
    expected = _losses(reference[0])
    np.testing.assert_allclose([_losses(tmp_path)[s] for s in expected], list(expected.values()), rtol=1e-6)
    expected_eval = _losses(reference[0], "eval_loss")
    np.testing.assert_allclose([_losses(tmp_path, "eval_loss")[s] for s in expected_eval],
                               list(expected_eval.values()), rtol=1e-6)


def test_kill_9_between_checkpoints_then_resume_reproduces_the_run(reference, cache_dir, tmp_path):
    code, _ = _start_and_stop(tmp_path, cache_dir, signal.SIGKILL, at_step=5, after_checkpoint=4)
    assert code == -signal.SIGKILL
    logged = max(r["step"] for r in _records(tmp_path))
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved and saved[-1] < logged  # steps after the last checkpoint are lost and will be redone
    _run(tmp_path, cache_dir)
    expected = _losses(reference[0])
    got = _losses(tmp_path)
    assert sorted(got) == sorted(expected)  # the redone steps replaced the lost ones' records
    np.testing.assert_allclose([got[s] for s in expected], list(expected.values()), rtol=1e-6)


def _tiny_config(cache_dir, **overrides):
    return tiny_train_config(cache_dir, **{"steps": STEPS, "checkpoint_every": 4, "eval_every": 5, **overrides})


def _truncate_largest_file(folder):
    files = [f for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(f)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(reference, cache_dir, tmp_path, caplog):
    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    _truncate_largest_file(workdir / "checkpoints" / "10" / "params")
    with caplog.at_level("WARNING"):
        result = train_and_evaluate(_tiny_config(cache_dir), str(workdir))
    assert "checkpoint at step 10 is corrupt or unreadable" in caplog.text
    assert "resuming from the checkpoint at step 8" in caplog.text
    assert glob.glob(str(workdir / "corrupt_checkpoints" / "10-*"))
    assert result["step"] == STEPS  # steps 9 and 10 redone from step 8, as in the uninterrupted run
    np.testing.assert_allclose(_losses(workdir)[10], _losses(reference[0])[10], rtol=1e-6)
    # With every checkpoint unreadable the run refuses to start over from step 0.
    for step in (4, 8, 10):
        _truncate_largest_file(workdir / "checkpoints" / str(step) / "params")
    with pytest.raises(RuntimeError, match="no intact checkpoint .* refusing to restart from step 0"):
        # (a longer run on the same lr schedule: decay_steps keeps the length the run had)
        train_and_evaluate(_tiny_config(cache_dir, steps=12, **{"optimizer.decay_steps": STEPS}), str(workdir))


def test_nan_loss_stops_with_the_last_good_state_saved(cache_dir, tmp_path, monkeypatch):
    """A loss that turns NaN once training gets below 10.6 nats (the tiny run crosses that by step ~7)."""
    import jax.numpy as jnp

    from flax_gpt2.checkpoints import run_folders as run_checkpoint
    from flax_gpt2.train import step as step_lib
    from flax_gpt2.train.train_loop import train_and_evaluate

    real = step_lib.cross_entropy
    monkeypatch.setattr(step_lib, "cross_entropy",
                        lambda logits, targets: (lambda x: jnp.where(x < 10.6, jnp.nan, x))(real(logits, targets)))
    with pytest.raises(FloatingPointError, match=r"loss is nan .*at step \d+.*last good state \(step \d+\)") as e:
        train_and_evaluate(_tiny_config(cache_dir, checkpoint_every=100, eval_every=100), str(tmp_path))
    logged = _losses(tmp_path)
    last_good = max(logged)
    assert f"at step {last_good + 1};" in str(e.value) and f"(step {last_good})" in str(e.value)
    assert 1 < last_good < STEPS and all(np.isfinite(list(logged.values())))
    _, params = run_checkpoint.load_run(tmp_path)  # saved although no periodic checkpoint was due
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [last_good]
    assert all(np.isfinite(np.asarray(p)).all() for p in __import__("jax").tree.leaves(params))


def test_profile_window_writes_a_trace(reference):
    """`profile_steps=3:4` leaves one jax.profiler trace (an .xplane.pb TensorBoard's profile plugin reads)."""
    workdir, console = reference
    traces = glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000, traces
    assert "profile of steps 3..4 written to" in console
    # The same trace as Perfetto JSON, and its top ops in the log: XLA's fusions, not Python or runtime spans.
    assert len(glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*.trace.json.gz"))) >= 1
    table = console.split("top ops of steps 3..4 (total ms, calls, share of op time):\n", 1)[1].splitlines()
    assert table[0] == "| op | total ms | calls | share |" and len(table) >= 7
    ops = [row.split(" | ")[0].lstrip("| ") for row in table[2:7]]
    assert any("fusion" in op for op in ops) and not any(op.startswith("$") or "::" in op for op in ops), ops


def test_model_flops_both_conventions_by_hand():
    """GPT-2 124M at T = 1024, counted by hand: 6N for the matmuls (N = 124,439,808 with the tied embedding
    and wpe), plus attention 12·L·D·T (PaLM, nanoGPT's MFU), or half of it over the causal triangle
    (MaxText's)."""
    from flax_gpt2 import GPT2Config
    from flax_gpt2.train.metrics import flops_per_token

    config = GPT2Config.from_preset("gpt2")
    assert config.num_params == 124_439_808
    assert flops_per_token(config, 1024) == 6 * 124_439_808 + 12 * 12 * 768 * 1024
    assert flops_per_token(config, 1024, causal=True) == 6 * 124_439_808 + 6 * 12 * 768 * 1024


def test_goodput_splits_the_wall_time(reference):
    """result.json and the last metrics record split the invocation's wall time by where it went; every
    logged step says how long it waited for data."""
    workdir, _ = reference
    goodput = json.loads((workdir / "result.json").read_text())["goodput"]
    parts = ("restart_s", "compile_s", "data_wait_s", "step_s", "checkpoint_s", "eval_s", "other_s")
    assert all(goodput[k] >= 0 for k in parts)
    assert all(goodput[k] > 0 for k in ("restart_s", "compile_s", "step_s", "checkpoint_s", "eval_s"))
    assert abs(sum(goodput[k] for k in parts) - goodput["wall_s"]) < 0.01 * goodput["wall_s"] + 0.01
    assert goodput["goodput"] == pytest.approx(goodput["step_s"] / goodput["wall_s"], abs=1e-3)
    records = _records(workdir)
    assert {f"goodput_{k}": v for k, v in goodput.items()} == {k: v for k, v in records[-1].items() if k != "step"}
    assert all(r["data_wait_s"] >= 0 for r in records if "loss" in r)


def test_the_run_cache_is_on_by_default_on_tpu_and_gpu_and_off_on_cpu(tmp_path):
    from flax_gpt2.train.compile_cache import cache_dir_for

    workdir = str(tmp_path / "run")
    assert cache_dir_for("", workdir, "tpu") == cache_dir_for("", workdir, "gpu") == f"{workdir}/compile_cache"
    assert cache_dir_for("", workdir, "cpu") is None and cache_dir_for("none", workdir, "tpu") is None
    assert cache_dir_for(str(tmp_path / "c"), workdir, "cpu") == str(tmp_path / "c")


def test_a_new_start_loads_the_compiled_steps_from_the_run_cache(reference, cache_dir, tmp_path):
    """The first run filled WORKDIR/compile_cache; a new process pointed at it loads the train step instead
    of compiling it (jax reports cache hits), and the process's own cache setting is restored after. (In a
    subprocess: this test process keeps its compiles out of any persistent cache, see conftest.)"""
    workdir, _ = reference
    assert glob.glob(str(workdir / "compile_cache" / "jit_train_step-*"))
    script = f"""
import json, sys
import jax
sys.path.insert(0, {str(REPO / "tests")!r})
from conftest import tiny_train_config
jax.config.update("jax_enable_compilation_cache", True)  # (importing conftest turned it off)
from flax_gpt2.train.train_loop import train_and_evaluate
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
before = jax.config.jax_compilation_cache_dir
config = tiny_train_config({str(cache_dir)!r}, steps=2, compile_cache_dir={str(workdir / "compile_cache")!r})
train_and_evaluate(config, {str(tmp_path / "again")!r})
print(json.dumps({{"hits": len(hits), "restored": jax.config.jax_compilation_cache_dir == before}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hits"] >= 2  # the init and the train step at least
    assert result["restored"]
    assert not (tmp_path / "again" / "compile_cache").exists()  # it used the one it was given

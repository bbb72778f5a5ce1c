"""A run is never lost: relative workdirs, Ctrl-C, resumes under a changed config, two runs on one workdir,
flipped bytes in a checkpoint, emptied checkpoint folders, a crash mid-write of metrics.jsonl, and bad
config values. Each case checks the exit code / error, the message, and that nothing the run made changed.
"""

import hashlib
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
STEPS = 8


# The lr schedule's length is fixed (decay_steps), so that a run may be extended with a larger `steps`:
# a schedule that follows `steps` would change mid-run, which a resume refuses (run_guard.LENGTH).
def _config(cache_dir, **overrides):
    return tiny_train_config(cache_dir, **{"steps": STEPS, "checkpoint_every": 4, "eval_every": 4,
                                           "optimizer.decay_steps": STEPS, **overrides})


def _cli(cache_dir, workdir, *extra, cwd=REPO):
    return [sys.executable, "-m", "train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(workdir),
            f"--config.steps={STEPS}", f"--config.optimizer.decay_steps={STEPS}", "--config.checkpoint_every=4",
            "--config.log_every=1",
            "--config.eval_every=4", "--config.progress_bar=False", f"--config.data.cache_dir={cache_dir}", *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def _run(args, cwd=REPO, expect=0):
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the lock file aside): what 'nothing changed' compares."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != ".lock":
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _losses(workdir):
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if "error:" in line]
    assert lines and "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, shared_dir):
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, cache_dir):
    """A complete run of STEPS steps with checkpoints at 4 and 8."""
    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir = tmp_path_factory.mktemp("base")
    train_and_evaluate(_config(cache_dir), str(workdir))
    return workdir


def test_relative_workdir_trains_resumes_and_serves(cache_dir, tmp_path, monkeypatch):
    """The README's commands with a relative --workdir: save, resume, then every reader of the run folder."""
    _run(_cli(cache_dir, "runs/tiny", "--config.steps=5"), cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny" / "checkpoints").iterdir()) == ["4", "5"]
    resumed = _run(_cli(cache_dir, "runs/tiny"), cwd=tmp_path)
    assert "resumed from the checkpoint at step 5" in resumed.stderr

    assert sorted(_losses(tmp_path / "runs" / "tiny")) == list(range(1, STEPS + 1))

    import flax_gpt2

    monkeypatch.chdir(tmp_path)
    model, params = flax_gpt2.from_pretrained("runs/tiny", progress=False)
    assert model.config.n_layer == 2
    out = _run([sys.executable, "-m", "flax_gpt2.sample", "--model", "runs/tiny", "--prompt", "ROMEO:",
                "--max_new_tokens", "3", "--seed", "0", "--cache_dir", "cache"], cwd=tmp_path)
    assert "ROMEO:" in out.stdout
    _run([sys.executable, "-m", "flax_gpt2.convert", "--model", "runs/tiny", "--out", "hf"], cwd=tmp_path)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question. " * 20)
    evaluated = _run([sys.executable, "-m", "flax_gpt2.evaluate", "--model", "runs/tiny", "--text_file", "text.txt"],
                     cwd=tmp_path)
    assert np.isfinite(json.loads(evaluated.stdout.strip().splitlines()[-1])["perplexity"])


def test_resume_under_a_changed_config_touches_nothing(base_run, cache_dir, tmp_path):
    from flax_gpt2.train import checkpointing, run_guard
    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(base_run, workdir)
    before = _snapshot(workdir)
    with pytest.raises(run_guard.ConfigChangedError, match=r"optimizer\.grad_clip: 1\.0 -> 0\.0.*allow_config_change"):
        train_and_evaluate(_config(cache_dir, steps=12, **{"optimizer.grad_clip": 0.0}), str(workdir))
    with pytest.raises(run_guard.ConfigChangedError, match=r"model\.n_embd: None -> 128.*fix the shapes"):
        train_and_evaluate(_config(cache_dir, **{"model.n_embd": 128}), str(workdir))
    with pytest.raises(run_guard.ConfigChangedError, match=r"model\.n_embd"):  # never, even when allowed
        train_and_evaluate(_config(cache_dir, allow_config_change=True, **{"model.n_embd": 128}), str(workdir))
    # Allowed, but the optimizer state no longer has the saved structure: still refused, still untouched.
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="opt_state"):
        train_and_evaluate(_config(cache_dir, allow_config_change=True, **{"optimizer.grad_clip": 0.0}), str(workdir))
    assert _snapshot(workdir) == before
    # The original command (and harmless changes: more steps, other cadences) still resumes the run.
    result = train_and_evaluate(_config(cache_dir, steps=10, eval_every=5), str(workdir))
    assert result["step"] == 10 and sorted(_losses(workdir)) == list(range(1, 11))
    # An allowed change resumes with the new value.
    result = train_and_evaluate(_config(cache_dir, steps=11, allow_config_change=True, **{"optimizer.lr": 5e-4}),
                                str(workdir))
    assert result["step"] == 11


@pytest.mark.parametrize("override, key", [
    ("--config.keep_checkpoints=0", "keep_checkpoints"),
    ("--config.log_every=0", "log_every"),
    ("--config.steps=0", "steps"),
    ("--config.optimizer.b2=1.5", "optimizer.b2"),
])
def test_bad_config_values_are_usage_errors(cache_dir, tmp_path, override, key):
    proc = _run(_cli(cache_dir, tmp_path / "run", override), expect=2)
    assert f"config.{key}=" in _one_line_error(proc.stderr)
    assert not (tmp_path / "run").exists()  # nothing written


def test_workdir_that_is_a_file_is_a_clear_error(cache_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = _run(_cli(cache_dir, tmp_path / "notes.txt"), expect=1)
    assert "notes.txt is a file" in _one_line_error(proc.stderr)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_second_run_on_a_busy_workdir_is_refused(base_run, cache_dir, tmp_path):
    from flax_gpt2.train import run_guard

    workdir = tmp_path / "run"
    shutil.copytree(base_run, workdir)
    before = _snapshot(workdir)
    with run_guard.WorkdirLock(str(workdir)):  # stands for a run that is still going
        proc = _run(_cli(cache_dir, workdir, "--config.steps=12"), expect=1)
        assert "is in use by a run that is still going" in _one_line_error(proc.stderr)
        assert f"pid {os.getpid()}" in proc.stderr
    assert _snapshot(workdir) == before
    # The holder gone (its lock file left behind), the next run proceeds.
    assert (workdir / ".lock").exists()
    _run(_cli(cache_dir, workdir, "--config.steps=9"))


def test_ctrl_c_saves_then_the_same_command_resumes(base_run, cache_dir, tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_cli(cache_dir, workdir, "--config.checkpoint_every=100"), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and max(_losses(workdir) if (workdir / "metrics.jsonl").exists()
                                                                 else [0]) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Ctrl-C: saving a checkpoint" in err and "interrupted: saved step" in out and "Traceback" not in err
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 2 <= saved[0] < STEPS  # no periodic checkpoint was due: Ctrl-C saved this one
    _run(_cli(cache_dir, workdir, "--config.checkpoint_every=100"))
    reference = _losses(base_run)
    np.testing.assert_allclose([_losses(workdir)[s] for s in range(1, STEPS + 1)],
                               [reference[s] for s in range(1, STEPS + 1)], rtol=1e-6)


def test_flipped_bytes_in_a_checkpoint_are_caught(base_run, cache_dir, tmp_path, caplog):
    from flax_gpt2.checkpoints import run_folders as run_checkpoint
    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(base_run, workdir)
    files = [p for p in (workdir / "checkpoints" / "8" / "params").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, inside the (uncompressed) embedding table
    largest.write_bytes(bytes(data))

    with caplog.at_level("WARNING"):  # a reader never moves files, but never uses the corrupt one either
        _, params = run_checkpoint.load_run(workdir)
    assert "ChecksumMismatchError" in caplog.text and "using the checkpoint at step 4 instead" in caplog.text
    _, params_4 = run_checkpoint.load_run(workdir, step=4)
    np.testing.assert_array_equal(params["transformer"]["wte"]["embedding"], params_4["transformer"]["wte"]["embedding"])

    caplog.clear()
    with caplog.at_level("WARNING"):
        result = train_and_evaluate(_config(cache_dir), str(workdir))
    assert "checkpoint at step 8 is corrupt" in caplog.text and "resuming from the checkpoint at step 4" in caplog.text
    assert len(list((workdir / "corrupt_checkpoints").iterdir())) == 1  # set aside, not deleted
    assert result["step"] == STEPS
    np.testing.assert_allclose(_losses(workdir)[STEPS], _losses(base_run)[STEPS], rtol=1e-6)


def test_a_run_that_has_checkpointed_never_restarts_from_zero(base_run, cache_dir, tmp_path):
    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(base_run, workdir)
    shutil.move(workdir / "checkpoints", tmp_path / "elsewhere")
    metrics = (workdir / "metrics.jsonl").read_bytes()
    with pytest.raises(RuntimeError, match="refusing to restart from step 0"):
        train_and_evaluate(_config(cache_dir), str(workdir))
    assert (workdir / "metrics.jsonl").read_bytes() == metrics


def test_metrics_survive_a_crash_mid_write(base_run, cache_dir, tmp_path):
    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(base_run, workdir)
    original = (workdir / "metrics.jsonl").read_text()
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 3.1')  # the crash
    train_and_evaluate(_config(cache_dir, steps=10), str(workdir))
    text = (workdir / "metrics.jsonl").read_text()
    assert text.startswith(original)  # every record of the run kept, byte for byte
    records = [json.loads(line) for line in text.splitlines()]
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(1, 11))


def test_data_shorter_than_a_batch_is_a_clear_error(cache_dir, tmp_path):
    (tmp_path / "short.txt").write_text("Too short to fill a batch.")
    proc = _run(_cli(cache_dir, tmp_path / "run", f"--config.data.source={tmp_path / 'short.txt'}"), expect=1)
    line = _one_line_error(proc.stderr)
    # tiny: batches of 8 windows of 64 + 1 tokens; the corpus (named by its cache folder) has none
    assert "short.txt" in line and "has 0 windows of 65 tokens, fewer than one batch of 8" in line, line
    assert "--config.data.source" in line and "--config.batch_size" in line and "--config.data.seq_len" in line
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_flipped_bit_in_the_optimizer_state_is_caught(base_run, cache_dir, tmp_path, caplog):
    """The params are intact, an AdamW moment is not: resuming from it would silently change every later
    update, so the checkpoint is set aside and the one before it used, as for a flipped bit in the params."""
    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(base_run, workdir)
    files = [p for p in (workdir / "checkpoints" / "8" / "opt_state").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit inside a moment (the embedding's mu or nu)
    largest.write_bytes(bytes(data))

    with caplog.at_level("WARNING"):
        result = train_and_evaluate(_config(cache_dir), str(workdir))
    assert "checkpoint at step 8 is corrupt" in caplog.text and "ChecksumMismatchError" in caplog.text
    assert "resuming from the checkpoint at step 4" in caplog.text
    assert len(list((workdir / "corrupt_checkpoints").iterdir())) == 1  # set aside, not deleted
    assert result["step"] == STEPS
    np.testing.assert_allclose(_losses(workdir)[STEPS], _losses(base_run)[STEPS], rtol=1e-6)


def test_a_checkpoint_meta_missing_a_field_is_corruption_not_a_guess(base_run, cache_dir, tmp_path, caplog):
    """A meta without its training config (or checksums) is not guessed at (no older format exists to be
    compatible with): it is a corrupt checkpoint, named; the reader and the trainer use the one before it, and
    the trainer sets the bad one aside, so the resumed run still equals the uninterrupted one."""
    from flax_gpt2.checkpoints import run_folders as run_checkpoint
    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(base_run, workdir)
    (path,) = (workdir / "checkpoints" / str(STEPS)).glob("meta/metadata")
    meta = json.loads(path.read_text())
    assert meta.pop("train_config")
    path.write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        _, params = run_checkpoint.load_run(workdir)
    assert "its meta lacks train_config" in caplog.text and "using the checkpoint at step 4 instead" in caplog.text
    _, at_4 = run_checkpoint.load_run(base_run, step=4)
    np.testing.assert_array_equal(params["transformer"]["h_1"]["mlp"]["c_fc"]["kernel"],
                                  at_4["transformer"]["h_1"]["mlp"]["c_fc"]["kernel"])

    result = train_and_evaluate(_config(cache_dir), str(workdir))
    assert result["step"] == STEPS
    assert len(list((workdir / "corrupt_checkpoints").iterdir())) == 1  # set aside, never deleted
    np.testing.assert_allclose([_losses(workdir)[s] for s in range(5, STEPS + 1)],
                               [_losses(base_run)[s] for s in range(5, STEPS + 1)], rtol=1e-6)
"""Two processes x 4 CPU devices joined by `jax.distributed.initialize` train exactly like one process with
8 devices, each process reading only its half of every batch.

Each process runs this file as a script (`python tests/test_train_multiprocess.py ARGS...`): it counts the
token rows its `Windows.read` loads, then runs `train.train_loop.train_and_evaluate` from the command
line `ARGS`, and writes the count to `WORKDIR/rows_read_<process>.json`.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _driver(argv):
    import jax

    from flax_gpt2.train import data
    from flax_gpt2.train.config_cli import parse_args
    from flax_gpt2.train.train_loop import train_and_evaluate

    config, workdir = parse_args(["train", *argv])
    rows = [0]
    read = data.Windows.read

    def counting_read(self, window_ids):
        rows[0] += int(np.asarray(window_ids).size)
        return read(self, window_ids)

    data.Windows.read = counting_read
    train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, f"rows_read_{jax.process_index()}.json"), "w") as f:
        json.dump({"rows": rows[0], "devices": jax.device_count(), "local": jax.local_device_count()}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, shared_dir):
    from flax_gpt2.checkpoints import run_folders as run_checkpoint
    from flax_gpt2.train import data
    from flax_gpt2.configs import tiny

    # Tokenize once, so that the three runs do not race to fill the cache.
    config = tiny.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    corpus = data.load_tokens(config.data, progress=False).folder
    common = ["--config", "configs/tiny.py", "--config.steps=4", "--config.log_every=1", "--config.eval_every=4",
              "--config.checkpoint_every=4", f"--config.data.source={corpus}", "--config.progress_bar=False",
              "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]

    def launch(workdir, devices, *extra):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        return subprocess.Popen([sys.executable, __file__, "--workdir", str(workdir), *common, *extra], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    port = _free_port()
    procs = [launch(tmp_path / "multi", 4, "--config.distributed.enabled=True",
                    f"--config.distributed.coordinator_address=localhost:{port}",
                    "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}")
             for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
    single = launch(tmp_path / "single", 8)
    _, err = single.communicate(timeout=900)
    assert single.returncode == 0, err[-4000:]

    def records(workdir):  # loss and eval records (not the run's closing goodput record: wall times differ)
        with open(workdir / "metrics.jsonl") as f:
            return [r for r in map(json.loads, f) if "loss" in r or "eval_loss" in r]

    one, two = records(tmp_path / "single"), records(tmp_path / "multi")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    np.testing.assert_allclose([r.get("loss", r.get("eval_loss")) for r in two],
                               [r.get("loss", r.get("eval_loss")) for r in one], rtol=0, atol=1e-5)
    _, params_one = run_checkpoint.load_run(tmp_path / "single")
    _, params_two = run_checkpoint.load_run(tmp_path / "multi")
    import jax
    for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)

    reads = [json.loads((tmp_path / "multi" / f"rows_read_{i}.json").read_text()) for i in range(2)]
    single_reads = json.loads((tmp_path / "single" / "rows_read_0.json").read_text())
    assert all(r["devices"] == 8 and r["local"] == 4 for r in reads)
    assert reads[0]["rows"] == reads[1]["rows"] == single_reads["rows"] // 2  # each host reads only its half


@pytest.mark.slow
def test_sigterm_on_one_host_saves_on_all_and_resumes(tmp_path, shared_dir):
    """A preemption notice reaching only process 1 (the one that writes nothing): every process stops after
    the same step with one checkpoint of it, and rerunning both resumes to the uninterrupted losses."""
    import signal
    import time

    from flax_gpt2.configs import tiny
    from flax_gpt2.train import data

    config = tiny.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    corpus = data.load_tokens(config.data, progress=False).folder
    common = ["--config", "configs/tiny.py", "--config.steps=10", "--config.log_every=1", "--config.eval_every=100",
              "--config.checkpoint_every=100", f"--config.data.source={corpus}", "--config.progress_bar=False",
              "--config.mesh.data=2", "--config.mesh.fsdp=4"]

    def launch(workdir, devices, *extra):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        return subprocess.Popen([sys.executable, "-m", "train", "--workdir", str(workdir), *common, *extra], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def pair(workdir):
        port = _free_port()
        return [launch(workdir, 4, "--config.distributed.enabled=True",
                       f"--config.distributed.coordinator_address=localhost:{port}",
                       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}")
                for i in range(2)]

    def steps(workdir):
        path = workdir / "metrics.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines() if line] if path.exists() else []

    single = launch(tmp_path / "single", 8)
    _, err = single.communicate(timeout=900)
    assert single.returncode == 0, err[-4000:]

    workdir = tmp_path / "multi"
    procs = pair(workdir)
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in procs) and max(steps(workdir) or [0]) < 3:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "preempted: saved step" in outs[0][0]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 10, saved

    procs = pair(workdir)  # the same command again, on both hosts
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]

    def losses(w):
        return {r["step"]: r["loss"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    got, want = losses(workdir), losses(tmp_path / "single")
    assert sorted(got) == list(range(1, 11))
    np.testing.assert_allclose([got[s] for s in range(1, 11)], [want[s] for s in range(1, 11)], rtol=0, atol=1e-5)


if __name__ == "__main__":
    _driver(sys.argv[1:])

"""The hang watchdog (train/watchdog.py): a stuck run dumps every thread's stack on every host and, with
`watchdog_exit`, exits with the status babysit restarts.

The 2-process test runs this file as a script (`python tests/test_watchdog.py STALL_STEP ARGS...`): it wraps
the jitted train step so that process 1 blocks forever before step STALL_STEP (the test hook lives here, not
in the training code); process 0 then waits in that step's collective for a peer that never comes.
"""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _driver(stall_step: int, argv):
    import jax

    from flax_gpt2.train import step as step_lib
    from flax_gpt2.train.config_cli import parse_args
    from flax_gpt2.train.train_loop import train_and_evaluate

    config, workdir = parse_args(["train", *argv])
    jit_train_step = step_lib.jit_train_step

    def stalling_jit_train_step(*args, **kwargs):
        train_step = jit_train_step(*args, **kwargs)
        calls = [0]

        def step_that_hangs_on_process_1(state, batch, rng):
            calls[0] += 1
            if calls[0] == stall_step and jax.process_index() == 1:
                threading.Event().wait()  # a frozen host: never returns
            return train_step(state, batch, rng)

        return step_that_hangs_on_process_1

    step_lib.jit_train_step = stalling_jit_train_step
    train_and_evaluate(config, workdir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_timeout_is_the_minimum_or_ten_median_steps():
    from flax_gpt2.train.watchdog import timeout_for

    assert timeout_for(60, []) == 180  # the first step compiles: three times the minimum
    assert timeout_for(60, [1.0, 2.0, 3.0]) == 60
    assert timeout_for(60, [10.0, 30.0, 7.0]) == 100  # 10 x the median
    with pytest.raises(ValueError, match="watchdog_seconds=0 must be > 0"):
        from flax_gpt2.train.watchdog import Watchdog
        Watchdog(0, "/tmp", 0)


def test_a_stalled_main_thread_is_dumped_once_per_timeout(tmp_path):
    from flax_gpt2.train.watchdog import Watchdog

    watchdog = Watchdog(0.2, str(tmp_path), process_index=3)

    def waiting_in_a_collective_that_never_ends():
        while watchdog.dumps < 2 and time.monotonic() - start < 60:
            time.sleep(0.01)

    with watchdog:
        watchdog.step_took(0.01)  # timeout: max(0.2, 10 x 0.01)
        start = time.monotonic()
        waiting_in_a_collective_that_never_ends()
        elapsed = time.monotonic() - start
    text = (tmp_path / "hangs" / "process_3.txt").read_text()
    assert "no training step finished" in text
    assert "waiting_in_a_collective_that_never_ends" in text  # the main thread's stack
    assert "hang-watchdog" in text or "_watch" in text  # all threads, the watchdog's own too
    assert watchdog.dumps == 2 and elapsed >= 0.4  # a second dump only after a second full timeout
    assert text.count("no training step finished") == 2  # appended: the first dump is kept


def test_progress_keeps_it_quiet(tmp_path):
    from flax_gpt2.train.watchdog import Watchdog

    watchdog = Watchdog(0.3, str(tmp_path), process_index=0)
    with watchdog:
        for _ in range(8):
            time.sleep(0.1)
            watchdog.step_took(0.1)
    assert watchdog.dumps == 0 and not (tmp_path / "hangs").exists()


def test_watchdog_seconds_must_be_positive(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir",
                           str(tmp_path / "run"), "--config.watchdog_seconds=0"], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config.watchdog_seconds=0" in proc.stderr and "must be a number of seconds > 0" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_host_frozen_mid_run_makes_both_hosts_dump_and_exit_for_a_restart(tmp_path, shared_dir):
    from flax_gpt2.configs import tiny
    from flax_gpt2.train import data
    from flax_gpt2.train.watchdog import HANG_EXIT_CODE

    config = tiny.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    corpus = data.load_tokens(config.data, progress=False).folder
    workdir = tmp_path / "run"
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen(
        [sys.executable, __file__, "4", "--workdir", str(workdir), "--config", "configs/tiny.py", "--config.steps=20",
         "--config.log_every=1", "--config.eval_every=100", "--config.checkpoint_every=100",
         f"--config.data.source={corpus}", "--config.progress_bar=False", "--config.mesh.data=2",
         "--config.watchdog_seconds=20", "--config.watchdog_exit=True", "--config.distributed.enabled=True",
         f"--config.distributed.coordinator_address=localhost:{port}", "--config.distributed.num_processes=2",
         f"--config.distributed.process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == HANG_EXIT_CODE, err[-4000:]
        assert "watchdog: no training step finished" in err
    frozen = (workdir / "hangs" / "process_1.txt").read_text()
    assert "step_that_hangs_on_process_1" in frozen
    waiting = (workdir / "hangs" / "process_0.txt").read_text()
    assert "run_steps" in waiting  # process 0 is stuck in the loop, waiting on the step's collective
    assert not (workdir / "result.json").exists()


if __name__ == "__main__":
    _driver(int(sys.argv[1]), sys.argv[2:])

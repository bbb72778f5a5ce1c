"""The real `python -m flax_gpt2.serve` in a child process, on a free 127.0.0.1 port, for the server tests."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


@contextlib.contextmanager
def server_process(args: list[str], tmp_path_factory, *, file_limit: int | None = None,
                   start_timeout: float = 300, procs: list | None = None,
                   env: dict[str, str] | None = None) -> Iterator[tuple[int, Path]]:
    """Starts the server with `args` (its flags, `--port` added here) and yields `(port, log path)` once
    `/health` says ok; fails the test with the log's tail if it exits or does not come up in time.

    `file_limit` sets the child's open-file limit (`ulimit -n`) at once, long before it opens its port (no
    fork-time hook in a process that runs JAX's threads). `procs`, when given, gets the `Popen` (to signal it).
    `env` adds to the child's environment (e.g. XLA_FLAGS for simulated devices).
    """
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", FLAX_GPT2_CACHE=str(tmp_path_factory.mktemp("serve_cache")),
               **(env or {}))
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flax_gpt2.serve", *args, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if procs is not None:
            procs.append(proc)
        try:
            if file_limit is not None:
                resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (file_limit, file_limit))
            deadline = time.time() + start_timeout
            while True:
                try:
                    if health(port)["status"] == "ok":
                        break
                except (OSError, http.client.HTTPException, ValueError):
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    import pytest

                    pytest.fail(f"the server did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield port, log_path
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

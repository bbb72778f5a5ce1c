"""Graceful shutdown: on SIGTERM (or Ctrl-C) the server drains, then exits 0.

Draining: new completions are answered 503 `shutting_down` (and /health 503 `draining`, so a load balancer
stops sending), the requests already running or queued finish, for at most `--drain_seconds`; then uvicorn's
own shutdown closes the connections (requests still running then are cancelled, their slots freed). A second
signal stops at once. uvicorn's default handler would stop taking connections at once and, after
shutting down, re-raise the signal, so a server that shut down cleanly still died "killed by SIGTERM"
(exit status 143) and supervisors counted a failure.
"""

from __future__ import annotations

import logging
import threading
import time


class Drain:
    """The drain of one server: `started` is set by the first signal; `server_class(uvicorn.Server)` is the
    server type whose signal handler starts it."""

    def __init__(self, engine, seconds: float, log: logging.Logger, poll_s: float = 0.05):
        self.engine, self.seconds, self.log, self.poll_s = engine, seconds, log, poll_s
        self.started = threading.Event()

    def server_class(self, base: type) -> type:
        drain = self

        class DrainingServer(base):
            def handle_exit(self, sig, frame) -> None:  # uvicorn's signal handler (main thread)
                if drain.started.is_set():
                    self.should_exit = self.force_exit = True  # a second signal: now
                    return
                drain.started.set()
                threading.Thread(target=drain.wait_then_stop, args=(self,), name="drain", daemon=True).start()

        return DrainingServer

    def wait_then_stop(self, server) -> None:
        """Waits until the engine has nothing running or queued, or `seconds` pass; then stops `server`."""
        self.log.info("draining: new requests get 503; waiting up to %g s for the running ones", self.seconds)
        start = time.monotonic()
        while not self.engine.idle and time.monotonic() - start < self.seconds:
            time.sleep(self.poll_s)
        if self.engine.idle:
            self.log.info("drained in %.1f s; stopping", time.monotonic() - start)
        else:
            self.log.warning("--drain_seconds %g passed with requests still running; they are cancelled",
                             self.seconds)
        server.should_exit = True

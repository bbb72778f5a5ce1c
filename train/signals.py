"""Stopping a run cleanly: SIGTERM (a preemption) and Ctrl-C become a request the loop honours after the current
step, agreed on by every process of a multi-host run."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopSignals:
    """SIGTERM (a preemption) and Ctrl-C become a request the loop honours after the current step: it saves,
    says so, and exits; rerunning the same command resumes. A second Ctrl-C aborts at once.

    On multi-host runs a signal may reach one host only (Ctrl-C on the launcher's terminal, a host's own
    maintenance event): `should_stop` makes every process agree, once per step, so that all save the same
    step; JAX's preemption service (`Checkpointer.reached_preemption`) covers pod-wide notices too.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signum = self.signum or signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: saving a checkpoint after this step, then stopping "
              f"{'(press Ctrl-C again to abort without saving)' if signum == signal.SIGINT else ''}",
              file=sys.stderr, flush=True)

    def should_stop(self) -> bool:
        local = self.signum is not None
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))

    @property
    def reason(self) -> str:
        return "interrupted" if self.signum == signal.SIGINT else "preempted"

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

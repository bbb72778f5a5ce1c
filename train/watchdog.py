"""The hang watchdog: when no training step finishes for too long, every host dumps all its Python stacks.

A pod run that hangs (a host stuck in a collective because another host froze, a dead data reader, a
filesystem that stopped answering) otherwise burns the whole slice silently until someone looks. The
watchdog is a thread of its own, so it still runs while the main thread is blocked inside a collective:
after `timeout` seconds without a `beat()` it writes every thread's stack (`faulthandler`) to the log and
to `WORKDIR/hangs/process_N.txt`, and, with `watchdog_exit=True`, exits the process with `HANG_EXIT_CODE`,
which `scripts/tpu_pod.py babysit` treats as "restart from the last checkpoint", not as a crash.

The timeout: `max(watchdog_seconds, 10 x the median step time so far)` (3 x watchdog_seconds until the
first step has been timed: it compiles), so a run whose steps legitimately
take minutes (a large model on few chips) is not killed by the default. Evaluations and checkpoint saves
beat too: only a stretch with no progress of any kind counts.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import statistics
import sys
import tempfile
import threading
import time

from flax_gpt2.utils import file_io

# Distinct from 1 (a crash) and 2 (a usage error): scripts/tpu_pod.py keeps the same number.
HANG_EXIT_CODE = 75
# Step durations the median is taken over (the newest ones).
_WINDOW = 100


def timeout_for(watchdog_seconds: float, step_seconds: list[float]) -> float:
    """The watchdog's timeout: `watchdog_seconds`, raised to 10 x the median of the recent step times; 3 x
    `watchdog_seconds` before any step time is known (the first step of each start also compiles)."""
    if not step_seconds:
        return 3.0 * watchdog_seconds
    return max(watchdog_seconds, 10.0 * statistics.median(step_seconds[-_WINDOW:]))


def stacks_text() -> str:
    """Every Python thread's stack, as `faulthandler` writes it (it needs a real file descriptor)."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()


class Watchdog:
    """Use as a context manager around the training loop; call `beat()` whenever progress is made and
    `step_took(seconds)` after each timed step.

    Args:
      seconds: the minimum timeout (config `watchdog_seconds`, > 0).
      workdir: the run's folder (local or `gs://`); the dump goes to `workdir/hangs/process_<i>.txt`.
      process_index: this host's `jax.process_index()`.
      exit_on_hang: after dumping, exit the process with HANG_EXIT_CODE.
    """

    def __init__(self, seconds: float, workdir: str, process_index: int, exit_on_hang: bool = False):
        if not seconds > 0:
            raise ValueError(f"watchdog_seconds={seconds} must be > 0 (it is the minimum time without a finished "
                             "step before every host dumps its stacks)")
        self.seconds = float(seconds)
        self.folder = file_io.join(workdir, "hangs")
        self.path = file_io.join(self.folder, f"process_{process_index}.txt")
        self.exit_on_hang = exit_on_hang
        self.dumps = 0
        self._steps: list[float] = []
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def beat(self) -> None:
        """Progress was made now."""
        with self._lock:
            self._last = time.monotonic()

    def step_took(self, seconds: float) -> None:
        """A step finished in `seconds` (it also counts as a beat)."""
        with self._lock:
            self._steps.append(seconds)
            del self._steps[:-_WINDOW]
            self._last = time.monotonic()

    def timeout(self) -> float:
        with self._lock:
            return timeout_for(self.seconds, self._steps)

    def _watch(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                idle = time.monotonic() - self._last
            timeout = self.timeout()
            if idle < timeout:
                self._stop.wait(min(timeout - idle, 5.0) + 0.01)
                continue
            self._dump(idle)
            if self.exit_on_hang:
                # Every host's watchdog fires at about the same time (the steps are in lockstep); waiting a
                # little lets them all dump before the first exit breaks the others' collectives.
                grace = min(60.0, 0.5 * timeout)
                logging.error("watchdog: exiting with status %d in %.0f s so that the run restarts from its last "
                              "checkpoint", HANG_EXIT_CODE, grace)
                time.sleep(grace)
                logging.shutdown()
                os._exit(HANG_EXIT_CODE)  # the main thread is stuck: sys.exit from here would not end it
            self.beat()  # dump again only after another full timeout without progress

    def _dump(self, idle: float) -> None:
        header = (f"watchdog: no training step finished for {idle:.0f} s (timeout {self.timeout():.0f} s: "
                  f"watchdog_seconds={self.seconds:g} or 10x the median step); stacks of every thread at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}:\n")
        text = header + stacks_text()
        self.dumps += 1
        print(text, file=sys.stderr, flush=True)
        try:
            file_io.makedirs(self.folder)
            before = file_io.read_text(self.path) if file_io.exists(self.path) else ""  # earlier dumps stay
            file_io.atomic_write(self.path, before + text + "\n")
            logging.error("watchdog: stacks written to %s", self.path)
        except OSError as e:  # a hang of the filesystem itself: the log above has the stacks
            logging.error("watchdog: could not write %s: %s", self.path, e)

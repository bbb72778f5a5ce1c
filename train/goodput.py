"""Goodput: where a run's wall time went (compile, data wait, step, checkpoint, eval, restart).

A long pod run loses time in ways a loss curve does not show: compiling again after each preemption,
waiting on input, saving checkpoints, evaluating. `result.json["goodput"]` and the TensorBoard scalars
`goodput_*_s` split the wall time of this invocation into:

    restart     start-up before the first step: loading the model and data, restoring the checkpoint
    compile     tracing, lowering and compiling (or loading from the persistent compilation cache)
    data_wait   waiting for the next batch (`next(batches)`)
    step        the training steps themselves (dispatch until the loss is on the host)
    checkpoint  saving, and waiting for asynchronous saves
    eval        held-out loss, HellaSwag, coverage and samples
    other       the rest (logging, the end of the run)

Compile time is taken out of whatever it happened in (JAX reports it through `jax.monitoring`), so the
first step's compile counts as compile, not as a slow step. `goodput` is `step / wall`, the fraction of
the time spent training (MaxText's and Google's "goodput" of a job, for one invocation).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import jax

CATEGORIES = ("restart", "compile", "data_wait", "step", "checkpoint", "eval")
# jax's compile events (jax._src.dispatch): tracing, lowering to MLIR, and XLA's compile or cache load.
_COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                             "/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration"})


class Goodput:
    """Accumulates seconds per category from its creation (the start of the invocation) on; `close()` it."""

    def __init__(self):
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self._compiled = 0.0  # compile seconds reported so far, from any thread
        self._lock = threading.Lock()
        self._restart_done = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event in _COMPILE_EVENTS:
            with self._lock:
                self._compiled += duration

    def _compiled_now(self) -> float:
        with self._lock:
            return self._compiled

    def _add(self, category: str, elapsed: float, compiled: float) -> None:
        compiled = min(compiled, elapsed)  # nested jits report their tracing inside the outer one's
        self.seconds["compile"] += compiled
        self.seconds[category] += elapsed - compiled

    @contextlib.contextmanager
    def timed(self, category: str) -> Iterator[None]:
        """Counts the block's wall time under `category` (its compile time under "compile")."""
        t0, c0 = time.perf_counter(), self._compiled_now()
        try:
            yield
        finally:
            self._add(category, time.perf_counter() - t0, self._compiled_now() - c0)

    def restart_done(self) -> None:
        """The first step is about to run: everything since the start is "restart" (or compile)."""
        if not self._restart_done:
            self._restart_done = True
            counted = sum(self.seconds.values())
            self._add("restart", time.perf_counter() - self.started - counted,
                      self._compiled_now() - self.seconds["compile"])

    def summary(self) -> dict[str, float]:
        """`{"<category>_s": seconds, "other_s", "wall_s", "goodput": step / wall}` for this invocation."""
        wall = time.perf_counter() - self.started
        out = {f"{k}_s": round(v, 3) for k, v in self.seconds.items()}
        out["other_s"] = round(max(0.0, wall - sum(self.seconds.values())), 3)
        out["wall_s"] = round(wall, 3)
        out["goodput"] = round(self.seconds["step"] / wall, 4) if wall > 0 else 0.0
        return out

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)

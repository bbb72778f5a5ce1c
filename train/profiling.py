"""`config.profile_steps="START:END"`: a `jax.profiler` trace of optimizer steps START..END (1-based, as
`metrics.jsonl` numbers them), written under `WORKDIR/profile/` for TensorBoard's profile plugin or xprof
(`tensorboard --logdir WORKDIR/profile`, or `xprof WORKDIR/profile`).

Why a window and not the whole run: a trace holds every op of every step (megabytes per step of a small
model, far more on a pod), and the first steps include compilation; a few steady steps say where the time
goes. Each process writes its own trace (hosts of a pod under their own hostnames, as jax names them).
"""

from __future__ import annotations

import logging
import os

import jax

from .config_checks import ConfigValueError

PROFILE_DIR = "profile"


def parse_window(spec: str, steps: int | None = None) -> tuple[int, int] | None:
    """`"START:END"` -> (START, END), or None for `""`. ConfigValueError names a bad value: not two
    integers, START < 1, END < START, or END past `steps` (when known)."""
    if spec in ("", None):
        return None
    parts = str(spec).split(":")
    try:
        start, end = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        start = end = None
    if start is None or start < 1 or end < start:
        raise ConfigValueError(f"config.profile_steps={spec!r}: must be 'START:END', optimizer steps with "
                               f"1 <= START <= END (e.g. '10:15'; '' = no trace)")
    if steps is not None and end > steps:
        raise ConfigValueError(f"config.profile_steps={spec!r}: the run ends at step {steps} (config.steps), "
                               f"so END must be at most {steps}")
    return start, end


class ProfileWindow:
    """Starts the trace before step START and stops it once step END's results are on the host; as a
    context manager, stops a trace still running at exit (see `close`)."""

    def __init__(self, spec: str, steps: int, workdir: str, first_step: int):
        self.window = parse_window(spec, steps)
        self.dir = os.path.join(workdir, PROFILE_DIR)
        self.active = False
        if self.window is not None and first_step >= self.window[0]:
            logging.info("profile_steps=%s: the run resumes at step %d, past its start; no trace", spec,
                         first_step + 1)
            self.window = None

    def before(self, step: int) -> None:
        """Called before optimizer step `step` (1-based) runs."""
        if self.window is not None and step == self.window[0]:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after(self, step: int, outputs) -> None:
        """Called after step `step`, with what it returned (waited on, so the trace holds the whole step)."""
        if self.active and step == self.window[1]:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile of steps %d..%d written to %s", *self.window, self.dir)

    def close(self) -> None:
        """Stops a trace still running (the run stopped inside the window), so what was traced is kept."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False

    def __enter__(self) -> "ProfileWindow":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

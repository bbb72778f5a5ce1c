"""`config.profile_steps="START:END"`: a `jax.profiler` trace of optimizer steps START..END (1-based, as
`metrics.jsonl` numbers them), written under `WORKDIR/profile/` for TensorBoard's profile plugin or xprof
(`tensorboard --logdir WORKDIR/profile`, or `xprof WORKDIR/profile`).

Besides the `.xplane.pb` (TensorBoard / xprof), the trace is also written as Perfetto JSON (`perfetto_trace.json.gz`,
ui.perfetto.dev opens it), and the run logs the window's top device ops by total time (`top_ops`): where the
steps spend their time, readable without any profiler UI.

Why a window and not the whole run: a trace holds every op of every step (megabytes per step of a small
model, far more on a pod), and the first steps include compilation; a few steady steps say where the time
goes. Each process writes its own trace (hosts of a pod under their own hostnames, as jax names them).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
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
            jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, outputs) -> None:
        """Called after step `step`, with what it returned (waited on, so the trace holds the whole step)."""
        if self.active and step == self.window[1]:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile of steps %d..%d written to %s", *self.window, self.dir)
            try:
                table = top_ops(self.dir)
            except (OSError, ValueError) as e:  # a summary only: the trace itself is written
                logging.warning("could not summarise the trace: %s", e)
            else:
                logging.info("top ops of steps %d..%d (total ms, calls, share of op time):\n%s", *self.window, table)

    def close(self) -> None:
        """Stops a trace still running (the run stopped inside the window), so what was traced is kept."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False

    def __enter__(self) -> "ProfileWindow":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def top_ops(profile_dir: str, n: int = 10) -> str:
    """The `n` ops with the most total time in the newest Perfetto trace under `profile_dir`, as a Markdown table
    (op name, total ms, calls, share of all op time). Ops are the trace's complete events ("ph": "X") other than
    Python's frames and the runtime's wrapping spans: XLA's fusions, dots, copies and collectives."""
    traces = sorted(glob.glob(os.path.join(profile_dir, "**", "*.trace.json.gz"), recursive=True),
                    key=os.path.getmtime)
    if not traces:
        raise OSError(f"no *.trace.json.gz under {profile_dir}")
    with gzip.open(traces[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    python_thread = {(e.get("pid"), e.get("tid")) for e in events if e.get("ph") == "M"
                     and e.get("name") == "thread_name" and e.get("args", {}).get("name") == "python"}
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        # Not ops: the Python thread's spans (waiting for results), "$file:line fn" Python frames, and "A::B" the
        # runtime's spans around the ops (ThunkExecutor::Execute).
        if (e.get("ph") == "X" and "dur" in e and (e.get("pid"), e.get("tid")) not in python_thread
                and not name.startswith("$") and "::" not in name):
            total[name] += float(e["dur"])
            calls[name] += 1
    if not total:
        raise ValueError(f"{traces[-1]} holds no op events")
    everything = sum(total.values())
    rows = ["| op | total ms | calls | share |", "|---|---|---|---|"]
    rows += [f"| {name} | {us / 1000:.2f} | {calls[name]} | {100 * us / everything:.1f}% |"
             for name, us in total.most_common(n)]
    return "\n".join(rows)

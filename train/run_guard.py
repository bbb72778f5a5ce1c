"""What protects a run's workdir: one process at a time, and no resume under a config that would wreck it.

- `WorkdirLock`: process 0 holds an exclusive lock on `WORKDIR/.lock` for the run's life, so a second
  run on the same workdir stops at once instead of interleaving metrics and checkpoints with the first.
  On local disks the lock is `fcntl.flock`, which the OS releases when its holder dies (no stale locks).
  On `gs://` there is no lock: Cloud Storage has no advisory locking, and one job per workdir is then the
  user's promise (documented in docs/TPU_PODS.md).
- `check_resume_config`: compares the config of a run being resumed with the one its checkpoints were
  written under and refuses a change that is not known to be harmless, naming the keys.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Iterable

from flax_gpt2 import file_io

# Keys a resumed run may change freely: cadence, bookkeeping, placement (orbax reshards on restore) and
# the length of the run. Nothing here changes the math of a step or the state's structure.
SAFE_ON_RESUME = (
    "steps", "epochs", "log_every", "eval_every", "eval_batches", "eval_batch_size", "checkpoint_every",
    "keep_checkpoints", "async_checkpointing", "progress_bar", "cpu_peak_flops", "coverage_sets", "sample.",
    "distributed.", "mesh.", "logical_axis_rules", "micro_batch_size", "data.num_threads", "data.cache_dir",
    "compile_only", "allow_config_change", "eval_hellaswag", "eval_hellaswag_limit",
    # The same math in another form: rematerialized, scanned (checkpoints convert), another attention kernel.
    "model.remat", "model.scan_layers", "model.attention",
)
# Keys that fix the shapes of the params and optimizer state: a checkpoint cannot be resumed under others.
ARCHITECTURE = ("model.preset", "model.n_layer", "model.n_embd", "model.n_head", "model.n_positions",
                "model.param_dtype")


class ConfigChangedError(RuntimeError):
    """A resume under a config that differs from the run's in keys that are not safe to change."""


class WorkdirLockedError(RuntimeError):
    """Another live process is running in this workdir."""


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{"optimizer.lr": 6e-4, ...}` of a ConfigDict or a JSON-decoded dict (tuples as lists)."""
    items = config.items() if hasattr(config, "items") else []
    out: dict[str, Any] = {}
    for key, value in items:
        if hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return out


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{key: (saved, current)}` for every flattened key whose value differs (or exists in one only)."""
    absent = "<absent>"
    return {k: (saved.get(k, absent), current.get(k, absent)) for k in sorted(set(saved) | set(current))
            if saved.get(k, absent) != current.get(k, absent)}


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], *, allow_change: bool,
                        workdir: str) -> dict[str, tuple[Any, Any]]:
    """Returns the differing keys a resume may accept; raises `ConfigChangedError` naming the others.

    `saved` and `current` are flattened configs. Architecture keys are never accepted; other training
    keys (optimizer, data, seed, dropout, ...) only with `allow_change` (`--config.allow_config_change=True`).
    """
    diff = config_diff(saved, current)
    unsafe = {k: v for k, v in diff.items() if not _matches(k, SAFE_ON_RESUME)}
    fixed = {k: v for k, v in unsafe.items() if _matches(k, ARCHITECTURE)}
    if fixed or (unsafe and not allow_change):
        blocking = fixed or unsafe
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in blocking.items())
        how = ("these keys fix the shapes of the saved params, so resume with the run's own values, or start a new "
               "run in another --workdir (use --config.init_from=" + workdir + " to start from its weights)"
               if fixed else
               "rerun with the run's own values, use another --workdir, or pass --config.allow_config_change=True "
               "to resume with the new values")
        raise ConfigChangedError(f"{workdir} holds a run trained with a different config ({listed}); nothing was "
                                 f"changed in the workdir. To proceed: {how}.")
    return diff


class WorkdirLock:
    """An exclusive lock on `WORKDIR/.lock`, held by process 0 while the run lives (a no-op elsewhere).

    Raises `WorkdirLockedError` naming the holder (host and pid) when another live process holds it.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled and not file_io.is_url(workdir)
        self.path = os.path.join(workdir, ".lock")
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        if not self.enabled:
            return self
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WorkdirLockedError(f"{self.workdir} is in use by a run that is still going ({holder}); wait for "
                                     "it to finish or stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays (removing it would race a new holder)
            self._fd = None

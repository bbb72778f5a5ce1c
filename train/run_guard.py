"""What protects a run's workdir: one process at a time, and no resume under a config that would wreck it.

- `WorkdirLock`: process 0 holds an exclusive lock on `WORKDIR/.lock` for the run's life, so a second
  run on the same workdir stops at once instead of interleaving metrics and checkpoints with the first.
  On local disks the lock is `fcntl.flock`, which the OS releases when its holder dies (no stale locks).
  On `gs://` there is no lock: Cloud Storage has no advisory locking, and one job per workdir is then the
  user's promise (documented in docs/TPU_PODS.md).
- `check_resume_config`: compares the config of a run being resumed with the one its checkpoints were
  written under and refuses a change that is not known to be harmless, naming the keys. The run's length
  (`steps`, `epochs`, `optimizer.decay_steps`) is harmless only while the learning-rate schedule stays the
  same at every step; and the corpus the run trains on (`corpus.*`: its token count and checksum, recorded
  beside the config) is checked like a config key, so edited data is not trained on at the saved position.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, Iterable

import numpy as np

from flax_gpt2.utils import file_io

from . import step as step_lib

# Keys a resumed run may change freely: cadence, bookkeeping and placement (orbax reshards on restore).
# Nothing here changes the math of a step or the state's structure.
SAFE_ON_RESUME = (
    "log_every", "eval_every", "eval_batches", "eval_batch_size", "checkpoint_every",
    "keep_checkpoints", "async_checkpointing", "progress_bar", "cpu_peak_flops", "coverage_sets", "sample.",
    "distributed.", "mesh.", "logical_axis_rules", "micro_batch_size", "data.num_threads", "data.cache_dir",
    "data.cache_shared", "data.remote_reads", "data.remote_cache_bytes", "data.remote_block_bytes",
    "compile_only", "allow_config_change", "eval_hellaswag", "eval_hellaswag_limit", "profile_steps",
    "watchdog_seconds", "watchdog_exit", "compile_cache_dir",
    # The same math in another form: rematerialized, scanned (checkpoints convert), another attention kernel.
    "model.remat", "model.scan_layers", "model.attention",
)
# Keys that set the run's length: harmless while the learning rate stays the same at every step the run takes
# (a `constant` schedule, or `optimizer.decay_steps` kept), else they reshape the schedule mid-run.
LENGTH = ("steps", "epochs", "optimizer.decay_steps")
# Not config keys: the identity of the corpus the run trains on (`data.TokenStore.identity`), stored with the
# config in each checkpoint. A value that is unknown on either side (an older checkpoint) is not compared.
CORPUS = "corpus."
# Keys that fix the shapes of the params and optimizer state: a checkpoint cannot be resumed under others.
# A LoRA run's adapters have shapes set by `lora.rank` and `lora.targets` too (its other `lora.*` keys are
# training keys: refused unless allow_config_change).
ARCHITECTURE = ("model.preset", "model.n_layer", "model.n_embd", "model.n_head", "model.n_positions",
                "model.param_dtype", "lora.rank", "lora.targets")
# Keys added after runs existed, with the value that does what a run from before them did: a saved config without
# one is not a change while the current run keeps that value (the run goes on as it trained).
ADDED_LATER = {"data.document_mask": False, "data.reset_positions": False, "data.loss_on": "all"}
# Not config keys: what identifies the frozen base of a LoRA run (`run_folders.LORA_BASE_SHA256`), stored with the
# config. Checkpoints hold only the adapters, which mean nothing on other base weights: never accepted changed.
BASE = "lora_base."


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


def read_saved_config(workdir: str) -> dict[str, Any] | None:
    """The flattened config of the run already in `workdir` (its train_config.json), if any."""
    path = file_io.join(workdir, "train_config.json")
    if not file_io.exists(path):
        return None
    try:
        return flatten(json.loads(file_io.read_text(path)))
    except (json.JSONDecodeError, UnicodeDecodeError):
        logging.warning("%s is not valid JSON; the checkpoints' own record of the config is used", path)
        return None


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{key: (saved, current)}` for every flattened key whose value differs (or exists in one only); a
    `corpus.*` value unknown on either side (absent or None) is not a difference, nor is an `ADDED_LATER` key
    the saved config lacks while the current one holds the value runs had before it."""
    absent = "<absent>"
    saved = {**{k: v for k, v in ADDED_LATER.items() if k not in saved and current.get(k) == v}, **saved}
    diff = {k: (saved.get(k, absent), current.get(k, absent)) for k in sorted(set(saved) | set(current))
            if saved.get(k, absent) != current.get(k, absent)}
    return {k: (a, b) for k, (a, b) in diff.items()
            if not (k.startswith(CORPUS) and any(v is None or v == absent for v in (a, b)))}


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], *, allow_change: bool,
                        workdir: str, step: int | None = None) -> dict[str, tuple[Any, Any]]:
    """Returns the differing keys a resume may accept; raises `ConfigChangedError` naming the others.

    `saved` and `current` are flattened configs (with the `corpus.*` identity, when known). Architecture
    keys are never accepted; other training keys (optimizer, data, seed, dropout, ...), a length that
    reshapes the learning-rate schedule and a changed corpus only with `allow_change`
    (`--config.allow_config_change=True`). `step` is the checkpoint's, for the message.
    """
    if "lora.rank" not in saved and not current.get("lora.rank"):
        # A run from before LoRA existed trained the whole model, as `lora.rank=0` does: not a change.
        current = {k: v for k, v in current.items() if not k.startswith("lora.")}
    diff = config_diff(saved, current)
    unsafe = {k: v for k, v in diff.items() if not _matches(k, SAFE_ON_RESUME)}
    if _matches_any(unsafe, LENGTH) and _same_schedule(saved, current):
        unsafe = {k: v for k, v in unsafe.items() if k not in LENGTH}
    fixed = {k: v for k, v in unsafe.items() if _matches(k, ARCHITECTURE)}
    # Both sides known: a LoRA run on other base weights (a switch to or from LoRA is `lora.rank`'s error below).
    base = {k: v for k, v in diff.items() if k.startswith(BASE) and k in saved and k in current}
    if base:
        saved_hash, current_hash = next(iter(base.values()))
        raise ConfigChangedError(
            f"{workdir} holds LoRA adapters trained on other base weights than init_from="
            f"{current.get('init_from')!r} holds now (sha256 {str(saved_hash)[:12]}... when trained, "
            f"{str(current_hash)[:12]}... now); nothing was changed in the workdir. The checkpoints hold only the "
            "adapters, so the run needs the base it was trained on: point init_from at those weights (the run "
            f"started from {saved.get('init_from')!r}), or start a new run in another --workdir.")
    if fixed or (unsafe and not allow_change):
        blocking = fixed or unsafe
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in blocking.items())
        if fixed:
            how = ("these keys fix the shapes of the saved params, so resume with the run's own values, or start a "
                   "new run in another --workdir (use --config.init_from=" + workdir + " to start from its weights)")
        else:
            how = ("rerun with the run's own values, use another --workdir, or pass --config.allow_config_change=True "
                   "to resume with the new values")
        why = _length_note(saved, current, step) if _matches_any(blocking, LENGTH) else ""
        if any(k.startswith(CORPUS) for k in blocking):
            why += (" The training data changed since the checkpoints were written: resuming would train on other "
                    "windows from the saved position and evaluate on another held-out split (restore the data the "
                    "run used to resume it as it was).")
        raise ConfigChangedError(f"{workdir} holds a run trained with a different config ({listed}); nothing was "
                                 f"changed in the workdir.{why} To proceed: {how}.")
    if any(k.startswith(CORPUS) for k in diff):
        logging.warning("%s: the training data changed since the checkpoints were written; continuing on the new "
                        "data (allow_config_change=True)", workdir)
    return diff


def _matches_any(keys: Iterable[str], patterns: Iterable[str]) -> bool:
    return any(_matches(k, patterns) for k in keys)


def _learning_rates(flat: dict[str, Any], steps: int):
    """The learning rate at steps 0..steps-1 of the schedule a flattened config builds (train/step.py)."""
    import types



    optimizer = types.SimpleNamespace(**{k[len("optimizer."):]: v for k, v in flat.items()
                                         if k.startswith("optimizer.")})
    schedule = step_lib.make_schedule(optimizer, flat["steps"])
    return np.asarray(schedule(np.arange(steps)))


def _same_schedule(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the current optimizer settings give the same learning rate at every step either run takes
    under the saved length as under the current one (other optimizer keys are judged on their own)."""
    steps = max(saved.get("steps", 0), current.get("steps", 0))
    saved_length = {**current, **{k: saved[k] for k in LENGTH if k in saved}}
    try:
        return bool((_learning_rates(saved_length, steps) == _learning_rates(current, steps)).all())
    except (TypeError, ValueError, KeyError):  # a saved config from before a key existed: not known to match
        return False


def _length_note(saved: dict[str, Any], current: dict[str, Any], step: int | None) -> str:
    """Why a changed length matters (with the learning rate's jump at `step`) and how to extend a run."""
    jump = ""
    if step is not None:
        try:
            before = float(_learning_rates(saved, step + 1)[step])
            after = float(_learning_rates(current, step + 1)[step])
            jump = f" (the update after step {step} would use a learning rate of {after:.3g} instead of {before:.3g})"
        except (TypeError, ValueError, KeyError):
            pass
    decay = saved.get("optimizer.decay_steps") or saved.get("steps")
    return (f" The run's length sets its learning-rate schedule{jump}. To train longer on the schedule it had, "
            f"also pass --config.optimizer.decay_steps={decay} (the learning rate stays at its final value after "
            "that step).")


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

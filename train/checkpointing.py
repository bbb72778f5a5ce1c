"""Checkpoints of the train state and the data iterator: orbax's CheckpointManager, async, last K kept.

Layout (shared with `flax_gpt2.checkpoints.run_folders`, which reads params back for `from_pretrained`):
`WORKDIR/checkpoints/<step>/{params, opt_state, meta}`. `meta` is JSON: the step, the data iterator's
`(epoch, position)`, the model's Hugging Face config, the flattened training config, a checksum of
every array (`run_folders.fingerprint`), and a sha256 of the meta itself: `run_folders.RunMeta`, the schema
the library reads too.

What a restore does with each checkpoint, newest first, and why:
- written under a different config (meta's `train_config`, see `run_guard`) or holding arrays of other
  shapes: the run stops and names the difference. The checkpoint is *not* touched: it is good, the
  command is what changed.
- fails to read, or reads with checksums that do not match (the arrays', or the meta's: an edited step or
  data position; or a step the optimizer's update count contradicts): it is corrupt. It is reported, moved aside
  to `WORKDIR/corrupt_checkpoints/` (never deleted), and the one before it is tried.
orbax writes each step to a temporary folder and renames it when complete, so a run killed mid-save
leaves no half checkpoint that could be mistaken for a complete one. A run that has ever completed a
checkpoint (`WORKDIR/.has_checkpoints`) never silently restarts from step 0.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flax_gpt2.checkpoints import run_folders
from flax_gpt2.checkpoints.run_folders import checkpoint_dir
from flax_gpt2.modeling import layer_stacking
from flax_gpt2.utils import file_io

from . import run_guard
from .data import DataState
from .step import TrainState

HAS_CHECKPOINTS = ".has_checkpoints"  # in the workdir, once the first checkpoint is complete
CORRUPT_DIR = "corrupt_checkpoints"


class _QuietOrbaxFailures(logging.Filter):
    """Drops orbax's ERROR records that carry a traceback, unless DEBUG logging is on.

    One failed async save (a full disk) makes orbax log the same exception with a full traceback from each
    of its background threads (five or more), then raise it in the thread that waits for the save, where
    the command line prints it as one line (with the traceback under --debug). The records add nothing
    but pages of noise around that line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info and "orbax" in record.pathname:
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def _quiet_orbax_failures() -> None:
    absl = logging.getLogger("absl")  # orbax logs through absl's logger
    if not any(isinstance(f, _QuietOrbaxFailures) for f in absl.filters):
        absl.addFilter(_QuietOrbaxFailures())
    if not getattr(sys.unraisablehook, "_skips_closed_loop", False):
        sys.unraisablehook = _skip_closed_loop_callbacks(sys.unraisablehook)


def _skip_closed_loop_callbacks(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable-exception hook that drops "Event loop is closed" (unless DEBUG logging is on): after a
    failed save, tensorstore still completes futures whose callbacks reach orbax's closed event loop, and
    each one printed a traceback after the one-line error."""
    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
                and not logging.getLogger().isEnabledFor(logging.DEBUG)):
            previous(unraisable)
    hook._skips_closed_loop = True  # type: ignore[attr-defined]
    return hook


class IncompatibleCheckpointError(RuntimeError):
    """A readable checkpoint whose arrays do not fit the current config's train state."""


class Checkpointer:
    """Saves every `every` steps (and at a preemption sync point on multi-host runs), keeps `keep`."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True,
                 train_config: dict[str, Any] | None = None):
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep}: keep at least 1 checkpoint")
        if every < 1:
            raise ValueError(f"checkpoint_every={every}: must be at least 1")
        self.workdir = workdir
        self.train_config = train_config or {}
        _quiet_orbax_failures()
        self._marked = False  # HAS_CHECKPOINTS known to exist: save() runs every step, so no stat (or gs:// request) each time
        policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(every),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
        ])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, save_decision_policy=policy,
            cleanup_tmp_directories=True)  # temporary folders of saves that a kill cut short
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                             item_handlers=run_folders.item_handlers())

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any was told to stop (multi-host runs only)."""
        return self.manager.reached_preemption(step)

    def has_ever_checkpointed(self) -> bool:
        return file_io.exists(file_io.join(self.workdir, HAS_CHECKPOINTS))

    def save(self, state: TrainState, data_state: DataState, model_config: dict, *, force: bool = False) -> bool:
        """Starts saving `state` (in the background) if the policy says so or `force`; returns whether."""
        step = int(state.step)
        if step in self.manager.all_steps():
            return False
        self._mark_if_checkpointed()
        if not force and not self.manager.should_save(step):
            return False
        meta = run_folders.RunMeta(
            step=step, data=dataclasses.asdict(data_state), model_config=model_config,
            train_config=self.train_config, checksums={"params": run_folders.fingerprint(state.params),
                                                       "opt_state": run_folders.fingerprint(state.opt_state)})
        return self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta.to_json())), force=True)

    def restore_latest(self, abstract_state: TrainState, *,
                       allow_config_change: bool = False) -> tuple[TrainState, DataState] | None:
        """The newest intact checkpoint, placed as `abstract_state`'s shardings say; None if there is none.

        Raises:
          run_guard.ConfigChangedError / IncompatibleCheckpointError: the newest intact checkpoint does
            not fit the current config; nothing was touched.
          RuntimeError: checkpoints were written but none is intact (the corrupt ones are set aside):
            a run never silently restarts from step 0.
        """
        def restore(step: int) -> tuple[TrainState, DataState]:
            where = f"checkpoint {checkpoint_dir(self.workdir)}/{step}"
            meta = run_folders.read_meta(self.manager, step, where)
            run_guard.check_resume_config(meta.train_config, self.train_config, allow_change=allow_config_change,
                                          workdir=self.workdir, step=meta.step)
            # A run may switch between per-layer and scanned blocks: read the saved layout, convert after.
            saved_scan = run_folders.saved_params_are_stacked(self.manager, step)
            current_scan = layer_stacking.is_stacked(abstract_state.params)
            target = abstract_state
            if saved_scan != current_scan:
                convert = lambda tree: layer_stacking.convert_tree(  # noqa: E731
                    tree, saved_scan, stack=layer_stacking.abstract_stack, take=layer_stacking.abstract_take)
                target = abstract_state.replace(params=convert(abstract_state.params),
                                                opt_state=convert(abstract_state.opt_state))
            self._check_shapes(step, target)
            restored = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params), opt_state=ocp.args.StandardRestore(target.opt_state)))
            checksums = meta.checksums
            run_folders.verify(restored["params"], checksums.get("params"), where)
            run_folders.verify(restored["opt_state"], checksums.get("opt_state"), where)
            run_folders.check_update_count(restored["opt_state"], step, where)
            if saved_scan != current_scan:
                logging.info("converting checkpoint %d to scan_layers=%s", step, current_scan)
                restored = {k: jax.device_put(layer_stacking.convert_tree(restored[k], current_scan),
                                              jax.tree.map(lambda a: a.sharding, getattr(abstract_state, k)))
                            for k in ("params", "opt_state")}
            state = TrainState(step=jax.device_put(jax.numpy.int32(step), abstract_state.step.sharding),
                               params=restored["params"], opt_state=restored["opt_state"])
            return state, DataState(**meta.data)

        # An intact checkpoint that does not fit the config stops the resume; anything else is corruption.
        restored, errors = run_folders.restore_newest_intact(
            sorted(self.manager.all_steps(), reverse=True), restore, where=checkpoint_dir(self.workdir),
            on_corrupt=self._set_aside, fatal=(run_guard.ConfigChangedError, IncompatibleCheckpointError))
        if restored is not None:
            if errors:
                logging.warning("resuming from the checkpoint at step %d instead", restored[0])
            return restored[1]
        if errors or self.has_ever_checkpointed():
            raise RuntimeError(
                f"no intact checkpoint in {checkpoint_dir(self.workdir)} although this run has saved checkpoints"
                f"{' (unreadable ones were moved to ' + CORRUPT_DIR + '/)' if errors else ''}; refusing to restart "
                "from step 0. To start over, use a new --workdir." + "".join(f"\n  {e}" for e in errors))
        return None

    def _check_shapes(self, step: int, abstract_state: TrainState) -> None:
        """Raises IncompatibleCheckpointError if the saved arrays' shapes/dtypes differ from the state's."""
        metadata = self.manager.item_metadata(step)
        for item in ("params", "opt_state"):
            saved = metadata[item]
            have = _leaves_by_path(getattr(saved, "tree", saved))
            want = _leaves_by_path(getattr(abstract_state, item))
            if set(have) != set(want):
                extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
                raise IncompatibleCheckpointError(
                    f"checkpoint {step} in {self.workdir} holds other {item} arrays than the current config needs "
                    f"(only in the checkpoint: {', '.join(extra[:3]) or 'none'}; only in the config: "
                    f"{', '.join(missing[:3]) or 'none'}): was the model or optimizer changed? Nothing was changed "
                    "in the workdir")
            for path, w in want.items():
                h = have[path]
                if tuple(h.shape) != tuple(w.shape) or np.dtype(h.dtype) != np.dtype(w.dtype):
                    raise IncompatibleCheckpointError(
                        f"checkpoint {step} in {self.workdir}: {item}.{path} is {np.dtype(h.dtype).name}"
                        f"{list(h.shape)} but the current config needs {np.dtype(w.dtype).name}{list(w.shape)}; "
                        "nothing was changed in the workdir")

    def _set_aside(self, step: int) -> None:
        """Moves a corrupt checkpoint out of the manager's folder (never deletes it)."""
        if jax.process_index() == 0:
            target = file_io.join(self.workdir, CORRUPT_DIR, f"{step}-{int(time.time())}")
            file_io.makedirs(file_io.join(self.workdir, CORRUPT_DIR))
            file_io.epath(file_io.join(checkpoint_dir(self.workdir), str(step))).rename(target)
            logging.warning("moved it to %s", target)
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def _mark_if_checkpointed(self) -> None:
        if self._marked or jax.process_index() != 0 or self.manager.latest_step() is None:
            return
        if not self.has_ever_checkpointed():
            file_io.atomic_write(file_io.join(self.workdir, HAS_CHECKPOINTS), "")
        self._marked = True

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._mark_if_checkpointed()

    def close(self) -> None:
        self.manager.close()


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    """`{"a.b.0": leaf}`: one spelling of a leaf's path whether the tree holds dicts, namedtuples or lists
    (orbax's metadata turns the optimizer's namedtuples into dicts)."""
    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    return {".".join(name(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
            if leaf is not None}


def abstract_train_state(state_shapes: Any, shardings: TrainState) -> TrainState:
    """`jax.ShapeDtypeStruct`s of the train state carrying their target shardings (for restore)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes, shardings)

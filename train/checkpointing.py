"""Checkpoints of the train state and the data iterator: orbax's CheckpointManager, async, last K kept.

Layout (shared with `flax_gpt2.run_checkpoint`, which reads params back for `from_pretrained`):
`WORKDIR/checkpoints/<step>/{params, opt_state, meta}`. `meta` is JSON: the step, the data iterator's
`(epoch, position)` and the model's Hugging Face config. orbax writes each step to a temporary folder
and renames it when complete, so a run killed mid-save leaves no half checkpoint behind that could be
mistaken for a complete one; one that is complete but unreadable (truncated files) is reported, moved
aside to `WORKDIR/corrupt_checkpoints/`, and the one before it is used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flax_gpt2.run_checkpoint import ITEMS, checkpoint_dir
from train.data import DataState
from train.step import TrainState


class Checkpointer:
    """Saves every `every` steps (and at a preemption sync point on multi-host runs), keeps `keep`."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        self.workdir = workdir
        policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(every),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
        ])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, save_decision_policy=policy,
            cleanup_tmp_directories=True)  # temporary folders of saves that a kill cut short
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any was told to stop (multi-host runs only)."""
        return self.manager.reached_preemption(step)

    def save(self, state: TrainState, data_state: DataState, model_config: dict, *, force: bool = False) -> bool:
        """Starts saving `state` (in the background) if the policy says so or `force`; returns whether."""
        step = int(state.step)
        if step in self.manager.all_steps():
            return False
        meta = {"step": step, "data": dataclasses.asdict(data_state), "model_config": model_config}
        return self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, DataState] | None:
        """The newest readable checkpoint, placed as `abstract_state`'s shardings say; None if there is none.

        Raises RuntimeError when checkpoints exist but none can be read: a run never silently restarts
        from step 0.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        errors = []
        for step in steps:
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state.params),
                    opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # orbax/tensorstore raise many types for truncated or missing files
                logging.error("checkpoint at step %d is unreadable (%s: %s)", step, type(e).__name__, e)
                errors.append(f"step {step}: {type(e).__name__}: {e}")
                self._set_aside(step)
                continue
            if errors:
                logging.warning("resuming from the checkpoint at step %d instead", step)
            meta = restored["meta"]
            state = TrainState(step=jax.device_put(jax.numpy.int32(meta["step"]), abstract_state.step.sharding),
                               params=restored["params"], opt_state=restored["opt_state"])
            return state, DataState(**meta["data"])
        if errors:
            raise RuntimeError(f"no readable checkpoint in {checkpoint_dir(self.workdir)}; refusing to restart "
                               "from step 0 (move the folder away to start over):\n" + "\n".join(errors))
        return None

    def _set_aside(self, step: int) -> None:
        """Moves an unreadable checkpoint out of the manager's folder, so the step can be saved again."""
        if jax.process_index() == 0:
            target = os.path.join(self.workdir, "corrupt_checkpoints", f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(checkpoint_dir(self.workdir), str(step)), target)
            logging.warning("moved it to %s", target)
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_train_state(state_shapes: Any, shardings: TrainState) -> TrainState:
    """`jax.ShapeDtypeStruct`s of the train state carrying their target shardings (for restore)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes, shardings)

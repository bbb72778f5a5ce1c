"""Read the parameters of a `python -m train` run: the library side of the training checkpoints.

A run's workdir holds `checkpoints/<step>/` written by orbax's `CheckpointManager`, each with the items
`params` and `opt_state` (orbax PyTrees) and `meta` (JSON: the step, the data iterator's position and
the model's Hugging Face config). `flax_gpt2.from_pretrained(run_dir)` reads a run through `load_run`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from flax_gpt2.config import GPT2Config
from flax_gpt2.model import GPT2LMHeadModel

CHECKPOINT_DIR = "checkpoints"  # inside a run's workdir
ITEMS = ("params", "opt_state", "meta")


def checkpoint_dir(run_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(run_dir), CHECKPOINT_DIR)


def _reader(run_dir):
    """A CheckpointManager that only reads (orbax's `read_only` option would warn on every load)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(create=False, save_root_metadata=False)
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options, item_names=ITEMS)


def is_training_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a training run's workdir with at least one complete checkpoint."""
    folder = checkpoint_dir(path)
    if not os.path.isdir(folder):
        return False
    # orbax writes a step into a temporary folder and renames it to the bare step number when complete.
    return any(name.isdigit() and os.path.isdir(os.path.join(folder, name, "meta")) for name in os.listdir(folder))


def abstract_params(config: GPT2Config, sharding: jax.sharding.Sharding | None = None) -> Any:
    """`jax.ShapeDtypeStruct`s of GPT2LMHeadModel's params (with `sharding`, default the first device)."""
    import flax.linen as nn
    import jax.numpy as jnp

    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(GPT2LMHeadModel(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        nn.unbox(shapes["params"]))


def load_run(path: str | os.PathLike, step: int | None = None) -> tuple[GPT2Config, Any]:
    """The model config and params of a training run's checkpoint.

    Args:
      path: the run's workdir (`python -m train --workdir`).
      step: which checkpoint; default the latest complete one. An unreadable latest checkpoint is
        reported and the one before it used.

    Returns:
      `(GPT2Config, params)`: params of `GPT2LMHeadModel`, on the default device, in the dtype they were
      trained in (usually float32).

    Raises:
      FileNotFoundError: `path` has no checkpoint (or not `step`).
      RuntimeError: no checkpoint could be read.
    """
    if not is_training_run(path):
        raise FileNotFoundError(f"{os.fspath(path)} is not a training run with a complete checkpoint "
                                f"(expected {checkpoint_dir(path)}/<step>/)")
    manager = _reader(path)
    try:
        return _restore_first_readable(manager, path, _steps_to_try(manager, path, step))
    finally:
        manager.close()


def _steps_to_try(manager, path, step: int | None) -> list[int]:
    steps = sorted(manager.all_steps(), reverse=True)
    if step is None:
        return steps
    if step not in steps:
        raise FileNotFoundError(f"{os.fspath(path)} has no checkpoint at step {step}; it has {sorted(steps)}")
    return [step]


def _restore_first_readable(manager, path, steps: list[int]) -> tuple[GPT2Config, Any]:
    import orbax.checkpoint as ocp

    errors = []
    for s in steps:
        try:
            meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            config = GPT2Config.from_hf_config(meta["model_config"])
            params = manager.restore(s, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params(config))))["params"]
        except Exception as e:  # orbax/tensorstore raise many types for a truncated or missing file
            logging.warning("checkpoint %s/%d is unreadable (%s: %s)", checkpoint_dir(path), s, type(e).__name__, e)
            errors.append(f"step {s}: {type(e).__name__}: {e}")
            continue
        if errors:
            logging.warning("using the checkpoint at step %d instead", s)
        return config, params
    raise RuntimeError(f"no readable checkpoint in {checkpoint_dir(path)}:\n" + "\n".join(errors))

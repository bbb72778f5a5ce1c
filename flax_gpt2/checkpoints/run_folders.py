"""Read the parameters of a `python -m train` run: the library side of the training checkpoints.

A run's workdir holds `checkpoints/<step>/` written by orbax's `CheckpointManager`, each with the items
`params` and `opt_state` (orbax PyTrees) and `meta` (JSON: the step, the data iterator's position, the
model's Hugging Face config, the training config, a checksum of every array and a sha256 of the meta itself:
`RunMeta`, the one schema the trainer writes and this module reads).
`flax_gpt2.from_pretrained(run_dir)` reads a run through `load_run`.

A LoRA run (`lora.rank > 0` in its training config) saves only its adapters under `params` (and their
optimizer state): `load_run` refuses it, naming `run_adapters.load_run_adapter`, which reads them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.config import GPT2Config
from flax_gpt2.modeling.lora import LoRAConfig
from flax_gpt2.modeling.model import GPT2LMHeadModel
from flax_gpt2.utils import file_io

CHECKPOINT_DIR = "checkpoints"  # inside a run's workdir
RUN_CONFIG = "train_config.json"  # the run's flattened training config, in its workdir
ITEMS = ("params", "opt_state", "meta")
# In a LoRA run's training config (meta's `train_config`): the sha256 of the base weights its adapters fit.
LORA_BASE_SHA256 = "lora_base.weights_sha256"
T = TypeVar("T")


def checkpoint_dir(run_dir: str | os.PathLike) -> str:
    """`RUN/checkpoints`, as an absolute local path or a URL (orbax refuses relative paths)."""
    return file_io.join(file_io.resolve_path(run_dir), CHECKPOINT_DIR)


def orbax():
    """`orbax.checkpoint`, imported on first use: importing it logs through the root logger, which makes
    Python install a stderr handler there, and a library must not configure its users' logging at import."""
    import orbax.checkpoint as ocp

    return ocp


def item_handlers() -> dict[str, Any]:
    """orbax's handler for each item of a checkpoint (`ITEMS`), named up front so that `item_metadata` can
    describe a checkpoint (its arrays' shapes, its layout) before anything is restored."""
    return {"params": orbax().StandardCheckpointHandler(), "opt_state": orbax().StandardCheckpointHandler(),
            "meta": orbax().JsonCheckpointHandler()}


def reader(run_dir):
    """A CheckpointManager that only reads (orbax's `read_only` option would warn on every load)."""
    options = orbax().CheckpointManagerOptions(create=False, save_root_metadata=False)
    return orbax().CheckpointManager(checkpoint_dir(run_dir), options=options, item_handlers=item_handlers())


def is_training_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a training run's workdir with at least one complete checkpoint."""
    folder = file_io.epath(checkpoint_dir(path))
    if not folder.is_dir():
        return False
    # orbax writes a step into a temporary folder and renames it to the bare step number when complete.
    return any(child.name.isdigit() and (child / "meta").is_dir() for child in folder.iterdir())


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is (or is becoming) a training run's workdir: it has `checkpoints/` or
    `train_config.json`, complete checkpoint or not. No export may be written into one (see
    `flax_gpt2.save_pretrained`)."""
    return file_io.isdir(file_io.join(path, CHECKPOINT_DIR)) or file_io.exists(file_io.join(path, RUN_CONFIG))


def abstract_params(config: GPT2Config, sharding: jax.sharding.Sharding | None = None) -> Any:
    """`jax.ShapeDtypeStruct`s of GPT2LMHeadModel's params (with `sharding`, default the first device)."""

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
      `(GPT2Config, params)`: params of `GPT2LMHeadModel` with one subtree per layer (whatever layout the
      run trained in), on the default device, in the dtype they were trained in (usually float32).

    Raises:
      FileNotFoundError: `path` has no checkpoint (or not `step`).
      RuntimeError: no checkpoint could be read.
    """
    if not is_training_run(path):
        raise FileNotFoundError(f"{os.fspath(path)} is not a training run with a complete checkpoint "
                                f"(expected {checkpoint_dir(path)}/<step>/)")
    manager = reader(path)
    try:
        return _restore_first_readable(manager, path, steps_to_try(manager, path, step))
    finally:
        manager.close()


def saved_model_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The Hugging Face config dict saved with a run's newest readable checkpoint; None without one.

    Reads only the small `meta` item, so a resumed fine-tune learns its architecture without loading
    (or even reaching) the weights it started from.
    """
    if not is_training_run(path):
        return None
    manager = reader(path)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        def model_config(s: int) -> dict[str, Any]:
            return dict(read_meta(manager, s, f"checkpoint {checkpoint_dir(path)}/{s}").model_config)

        found, _ = restore_newest_intact(steps, model_config, where=checkpoint_dir(path))
    finally:
        manager.close()
    return None if found is None else found[1]


def steps_to_try(manager, path, step: int | None) -> list[int]:
    """The checkpoint steps a reader tries, newest first: all of them, or only `step` (FileNotFoundError
    naming the steps there are when the run has no such checkpoint)."""
    steps = sorted(manager.all_steps(), reverse=True)
    if step is None:
        return steps
    if step not in steps:
        raise FileNotFoundError(f"{os.fspath(path)} has no checkpoint at step {step}; it has {sorted(steps)}")
    return [step]


def _restore_first_readable(manager, path, steps: list[int]) -> tuple[GPT2Config, Any]:
    def restore(s: int) -> tuple[GPT2Config, Any]:
        where = f"checkpoint {checkpoint_dir(path)}/{s}"
        meta = read_meta(manager, s, where)  # checked before its config sizes anything
        if run_lora_config(meta.train_config) is not None:
            raise LoRARunError(
                f"{os.fspath(path)} is a LoRA training run: its checkpoints hold adapters for the base "
                f"{meta.train_config.get('init_from') or '(a random init)'}, not a whole model. Read them with "
                "flax_gpt2.checkpoints.run_adapters.load_run_adapter (or convert the run with --format peft)")
        config = GPT2Config.from_hf_config(meta.model_config)
        # A run trained with scan_layers saved its blocks stacked: read them so, return them per layer.
        scanned = saved_params_are_stacked(manager, s)
        params = manager.restore(s, args=orbax().args.Composite(
            params=orbax().args.StandardRestore(abstract_params(config.replace(scan_layers=scanned)))))["params"]
        verify(params, meta.checksums.get("params"), where)
        return config, layer_stacking.unstack_layers(params)

    restored, errors = restore_newest_intact(steps, restore, where=checkpoint_dir(path), fatal=(LoRARunError,))
    if restored is None:
        raise RuntimeError(f"no readable checkpoint in {checkpoint_dir(path)}:\n" + "\n".join(errors))
    if errors:
        logging.warning("using the checkpoint at step %d instead", restored[0])
    return restored[1]


class LoRARunError(ValueError):
    """A whole model was asked of a LoRA run, whose checkpoints hold only adapters (or the reverse)."""


def run_lora_config(train_config: dict[str, Any]) -> LoRAConfig | None:
    """The `LoRAConfig` a run trained with (from its flattened training config, `lora.*`); None for a run
    that trained the whole model (`lora.rank` 0, or a run from before LoRA existed)."""
    rank = train_config.get("lora.rank") or 0
    if not rank:
        return None
    return LoRAConfig(rank=rank, alpha=train_config.get("lora.alpha", 8.0),
                      dropout=train_config.get("lora.dropout", 0.0), targets=train_config.get("lora.targets", "c_attn"))


def restore_newest_intact(steps: list[int], restore: Callable[[int], T], *, where: str,
                          on_corrupt: Callable[[int], None] | None = None,
                          fatal: tuple[type[BaseException], ...] = ()) -> tuple[tuple[int, T] | None, list[str]]:
    """`restore(step)` for each of `steps` (newest first) until one succeeds: the one loop that both the
    run reader (`load_run`) and training's resume use to skip a corrupt checkpoint.

    Any exception but the `fatal` types (which propagate: e.g. a checkpoint that is intact but does not fit
    the config) marks that step corrupt: it is logged, `on_corrupt(step)` runs (training sets it aside),
    and the next older step is tried.

    Returns:
      `((step, restore(step)) or None if every step failed, ["step N: Error: message", ...])`.
    """
    errors = []
    for step in steps:
        try:
            result = restore(step)
        except fatal:
            raise
        except Exception as e:  # orbax/tensorstore raise many types for a truncated or missing file
            logging.error("checkpoint at step %d is corrupt or unreadable (%s/%d: %s: %s)", step, where, step,
                          type(e).__name__, e)
            errors.append(f"step {step}: {type(e).__name__}: {e}")
            if on_corrupt is not None:
                on_corrupt(step)
            continue
        return (step, result), errors
    return None, errors


# --- integrity: a checksum of every array, stored in the checkpoint's meta and verified on restore ------

_MIX = 2654435761  # Knuth's multiplicative hash constant: spreads element indices over uint32


def fingerprint(tree: Any) -> dict[str, int]:
    """`{leaf path: checksum}` of every array in `tree`, independent of how the arrays are sharded.

    Each checksum is the sum, modulo 2**32, of the array's raw bits (as uint32 words) times an odd weight
    that depends on the element's position. Wrapping integer sums are exact in any order, so the value is
    the same on one device or a pod, before a save and after a restore; any change of a single word (a
    flipped byte) changes it, and so does moving a value to another position.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = _fingerprints([x for _, x in flat])
    # Replicated scalars: read the local copy (device_get refuses arrays spanning other hosts).
    return {jax.tree_util.keystr(path): int(np.asarray(s.addressable_data(0)))
            for (path, _), s in zip(flat, sums)}


@jax.jit
def _fingerprints(leaves):
    return [_checksum(x) for x in leaves]


def _checksum(x):

    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        bits = lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    else:
        unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
        bits = lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    # The flat position of each element from per-axis iotas (no reshape: keeps the array's sharding).
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    weight = index * jnp.uint32(_MIX) | jnp.uint32(1)
    return jnp.sum(bits * weight, dtype=jnp.uint32)


class ChecksumMismatchError(RuntimeError):
    """A restored array's checksum differs from the one saved with it: the checkpoint is corrupt."""

def verify(tree: Any, expected: dict[str, int] | None, where: str) -> None:
    """Raises `ChecksumMismatchError` naming the arrays whose checksum differs from `expected` (or when there
    is no `expected` to check against)."""
    if not expected:
        raise ChecksumMismatchError(f"{where}: no checksums were saved for these arrays: the meta is corrupt")
    actual = fingerprint(tree)
    bad = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
    if bad:
        raise ChecksumMismatchError(f"{where}: {len(bad)} array(s) do not match the checksums saved with them "
                                    f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): the files are corrupt")


# --- integrity of the meta: what the array checksums do not cover (the step, the data position, configs) ----

META_CHECKSUM = "meta_sha256"


@dataclasses.dataclass(frozen=True)
class RunMeta:
    """The `meta` item of a training checkpoint: the one schema the trainer writes (`train/checkpointing.py`)
    and the library reads (`load_run`, `saved_model_config`).

    On disk it is this dataclass as a JSON object plus `meta_sha256`, the sha256 of the rest as canonical JSON,
    so that an edited step, data position or config is found on restore instead of silently changing training.
    """

    step: int
    data: dict[str, Any]  # the data iterator's position (the trainer's DataState, as a dict)
    model_config: dict[str, Any]  # the model's Hugging Face config.json
    train_config: dict[str, Any]  # the run's training config, flattened (as train_config.json holds it)
    checksums: dict[str, Any]  # {"params": fingerprint(params), "opt_state": fingerprint(opt_state)}

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        return {**body, META_CHECKSUM: _meta_digest(body)}

    @classmethod
    def from_json(cls, meta: Any, step: int, where: str) -> "RunMeta":
        """The meta read from checkpoint `step`, or `ChecksumMismatchError` unless it is intact: a JSON object
        with every field, whose `step` is the checkpoint's own and whose sha256 matches."""
        if not isinstance(meta, dict):
            raise ChecksumMismatchError(f"{where}: its meta is a {type(meta).__name__}, not an object: the files "
                                        "are corrupt")
        fields = [f.name for f in dataclasses.fields(cls)]
        missing = [f for f in (*fields, META_CHECKSUM) if f not in meta]
        if missing:
            raise ChecksumMismatchError(f"{where}: its meta lacks {', '.join(missing)}: the files are corrupt (or "
                                        "were not written by flax_gpt2's trainer)")
        if meta["step"] != step or isinstance(meta["step"], bool):
            raise ChecksumMismatchError(f"{where}: its meta says step {meta['step']!r} but the checkpoint is step "
                                        f"{step}: the meta was edited or is corrupt")
        if meta[META_CHECKSUM] != _meta_digest({k: v for k, v in meta.items() if k != META_CHECKSUM}):
            raise ChecksumMismatchError(f"{where}: its meta (step, data position, configs) does not match the "
                                        "sha256 saved with it: the meta was edited or is corrupt")
        return cls(**{f: meta[f] for f in fields})


def read_meta(manager, step: int, where: str) -> RunMeta:
    """Checkpoint `step`'s meta, checked (`RunMeta.from_json`)."""
    raw = manager.restore(step, args=orbax().args.Composite(meta=orbax().args.JsonRestore()))["meta"]
    return RunMeta.from_json(raw, step, where)


def saved_params_are_stacked(manager, step: int) -> bool:
    """Whether checkpoint `step` holds its blocks stacked (a `scan_layers` run), learned from the arrays."""
    return layer_stacking.is_stacked(manager.item_metadata(step)["params"])


def _meta_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_update_count(opt_state: Any, step: int, where: str) -> None:
    """Raises `ChecksumMismatchError` if an optimizer update counter (optax's `count` leaves: Adam's, the
    schedule's) in `opt_state` differs from `step`: every train step applies one update, so they agree in
    any intact checkpoint."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        last = path[-1] if path else None
        if getattr(last, "name", None) != "count" or np.ndim(leaf) != 0:
            continue
        count = int(np.asarray(leaf.addressable_data(0) if hasattr(leaf, "addressable_data") else leaf))
        if count != step:
            raise ChecksumMismatchError(f"{where}: the optimizer has applied {count} updates "
                                        f"({jax.tree_util.keystr(path)}) but the checkpoint says step {step}: "
                                        "the meta was edited or is corrupt")

"""`train_and_evaluate(config, workdir)`: the whole training run, from one CPU to a multi-host TPU pod.

Every process runs the same program (JAX's multi-controller SPMD): the mesh spans all devices of all
hosts, params and optimizer state are placed through the config's logical axis rules, each host reads
only the batch rows its devices hold, and one jitted step with explicit in/out shardings does the rest.
Rerunning the same command on the same workdir resumes from the newest readable checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from flax_gpt2.checkpoints import run_folders
from flax_gpt2.modeling.config import GPT2Config
from flax_gpt2.modeling.model import GPT2LMHeadModel
from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer
from flax_gpt2.utils import file_io

from . import (checkpointing, compile_cache, compile_only as compile_only_lib, config_checks, data, evals, lora_run,
               loss_mask, mesh as mesh_lib, metrics as metrics_lib, model_config as model_config_lib,
               packing as packing_lib, profiling, recipes, run_guard, signals as signals_lib, step as step_lib,
               step_loop)
from .config_checks import ConfigValueError
from .goodput import Goodput
from .watchdog import Watchdog


def _shows_progress(config) -> bool:
    """Progress bars (tokenizing, downloading, training) on process 0, unless `progress_bar=False`."""
    return bool(config.progress_bar) and jax.process_index() == 0


def _check_seq_len(seq_len: int, gpt2_config: GPT2Config) -> None:
    if seq_len > gpt2_config.n_positions:
        raise ConfigValueError(f"data.seq_len={seq_len} exceeds the model's n_positions={gpt2_config.n_positions}")


def _check_layout(config) -> tuple[Any, tuple, int, int]:
    """`(mesh, rules, micro_batch, eval_batch)`, after checking everything the config alone decides, before
    anything is written: the recipe, the schedule, the model (from scratch; `init_from`'s shape is known once
    it loads), the mesh and how it splits the batches. A bad value is a ConfigValueError (exit 2)."""
    if config.data.recipe not in recipes.RECIPES:
        raise ConfigValueError(f"config.data.recipe={config.data.recipe!r}: choose one of {recipes.RECIPES}")
    with _usage_error():  # their messages name the key
        step_lib.make_schedule(config.optimizer, config.steps)
        mesh = mesh_lib.make_mesh(config.mesh)
    with _usage_error("config.model: "):  # GPT2Config's own checks name the field (preset, n_layer, attention)
        if config.init_from:
            model_config_lib.model_fields(config)  # init_from's architecture is known once it loads
        else:
            _check_seq_len(config.data.seq_len, model_config_lib.model_config(config)[0])
    profiling.parse_window(config.profile_steps, None if config.epochs else config.steps)
    rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
    shards = mesh_lib.batch_shards(mesh, rules)
    micro = config_checks.check_batch(config, shards)
    eval_batch = config.eval_batch_size or micro
    if eval_batch % shards:
        raise ConfigValueError(f"eval_batch_size={eval_batch} is not divisible by the {shards} ways the mesh "
                               "splits the batch")
    return mesh, rules, micro, eval_batch


@contextlib.contextmanager
def _usage_error(prefix: str = ""):
    """A ValueError of the library's own checks on a config value becomes a ConfigValueError (exit 2)."""
    try:
        yield
    except ConfigValueError:
        raise
    except ValueError as e:
        raise ConfigValueError(f"{prefix}{e}") from e


def _initialize_distributed(cfg) -> None:
    if not cfg.enabled:
        return
    kwargs = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    jax.distributed.initialize(**kwargs)


def _save_tokenizer(name_or_path: str, workdir: str) -> None:
    """Writes the tokenizer's vocab.json + merges.txt into the workdir, so that the run is a model folder
    `python -m flax_gpt2.sample --model WORKDIR` can use offline."""
    import tempfile


    try:
        tokenizer = get_tokenizer(name_or_path or None, pass_folder_as=data.TOKENIZER_FLAG)
    except OSError as e:  # offline without the tokenizer files; training itself may only need cached tokens
        logging.warning("could not save the tokenizer into %s: %s", workdir, e)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for path in tokenizer.save(tmp):
            with open(path, "rb") as f:
                file_io.atomic_write(file_io.join(workdir, os.path.basename(path)), f.read())


def _prepare_workdir(workdir: str) -> None:
    """Creates the workdir; a file in its place or a folder that cannot be written is a clear error."""
    if file_io.is_url(workdir):
        file_io.makedirs(workdir)
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"--workdir {workdir} is a file; pass a folder (it is created if missing)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise OSError(f"--workdir {workdir} cannot be created: {e.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise PermissionError(f"--workdir {workdir} is not writable; choose a folder you can write to")


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run described by `config` in `workdir` (a local folder or a `gs://` URL).

    Writes `train_config.json`, `metrics.jsonl`, TensorBoard events (`tensorboard/`), checkpoints
    (`checkpoints/`) and, at the end, `loss.png`, `result.json` (and `sample.txt` if asked to sample).
    Returns the final `{"step", "loss", "eval_loss", "stopped"}` (as result.json has it), where `stopped` is
    "done", "preempted" (SIGTERM) or "interrupted" (Ctrl-C); both of the latter saved a checkpoint first. A
    figure that does not exist (no step ran in this call, no eval before a stop, no held-out data) is None,
    with the reason under `why_null`.

    Raises:
      FloatingPointError: the loss became NaN/inf; the last good state was saved first.
      run_guard.ConfigChangedError: the workdir holds a run with a config that may not change on resume.
      run_guard.WorkdirLockedError: another run is using the workdir.
    """
    workdir = file_io.resolve_path(workdir)  # orbax needs absolute paths; a later chdir must not move the run
    if config.compile_only:
        # No persistent cache here: it did not shorten a rerun for a TPU topology (measured, docs/TPU_PODS.md),
        # and compile_report.json's compile seconds are meant to be the compiler's.
        return compile_only_lib.compile_only(config, workdir)
    config_checks.check_config(config)
    _initialize_distributed(config.distributed)
    layout = _check_layout(config)
    local = jax.process_index() == 0 and not file_io.is_url(workdir)
    before = set(os.listdir(workdir)) if local and os.path.isdir(workdir) else None
    if jax.process_index() == 0:
        _prepare_workdir(workdir)
    with contextlib.ExitStack() as stack:
        # Whatever fails below, the lock is released and orbax's async threads are closed: never a hang.
        stack.enter_context(run_guard.WorkdirLock(workdir, enabled=jax.process_index() == 0))
        if local:
            stack.push(_undo_failed_start(workdir, before))  # runs while the lock is still held
        return _train(config, workdir, stack, layout)


def _undo_failed_start(workdir: str, before: set[str] | None):
    """An exit handler: a run that fails before writing anything (a bad data source, an init_from that does
    not load, a config that does not fit its model) leaves nothing new behind: its `.lock` is removed, and
    the workdir too when this run created it (`before` is None). Anything else in the folder stays."""

    def undo(exc_type, exc, tb) -> bool:
        if exc_type is None:
            return False
        try:
            if set(os.listdir(workdir)) - (before or set()) == {".lock"}:
                os.remove(os.path.join(workdir, ".lock"))
                if before is None:
                    os.rmdir(workdir)
        except OSError:
            pass  # best effort: the error being raised is what matters
        return False

    return undo


def _train(config, workdir: str, stack: contextlib.ExitStack, layout) -> dict[str, Any]:
    mesh, rules, micro, eval_batch = layout
    goodput = Goodput()
    stack.callback(goodput.close)
    lora = model_config_lib.lora_config(config)
    # A LoRA run's checkpoints hold only adapters: its base is always loaded from init_from again.
    resumed = run_folders.saved_model_config(workdir) if config.init_from and lora is None else None
    gpt2_config, pretrained = model_config_lib.model_config(config, resumed, progress=_shows_progress(config))
    seq_len = config.data.seq_len
    _check_seq_len(seq_len, gpt2_config)
    logging.info("mesh %s over %d devices on %d processes", dict(mesh.shape), mesh.size, jax.process_count())

    # Data: the token stream, its train/held-out split, and the batch placement.
    store = data.load_tokens(config.data, progress=_shows_progress(config))
    if store.meta["vocab_size"] > gpt2_config.vocab_size:
        raise ValueError(f"the tokenizer has {store.meta['vocab_size']} tokens but the model only "
                         f"{gpt2_config.vocab_size}")
    cut = data.split_point(store, config.data.val_fraction, seq_len)
    scored = loss_mask.check_corpus(config.data.loss_on, store.meta, store.folder)  # the mask rides in the ids
    train_windows = data.Windows(store, 0, cut, seq_len, scored)
    val_windows = data.Windows(store, cut, len(store), seq_len, scored)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    config = _resolve_epochs(config, train_windows.count // config.batch_size)

    # Model, optimizer and the shardings of the train state.
    model = GPT2LMHeadModel(gpt2_config)
    tx, schedule = step_lib.make_optimizer(config.optimizer, config.steps)
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    state_shardings, state_shapes = mesh_lib.train_state_shardings(
        model, tx, mesh, rules, seq_len, lora, model_config_lib.base_dtype(config))

    # The corpus's identity is kept with the config in every checkpoint: a resume on edited data is refused.
    # So is a LoRA run's base's (its weights' sha256): the adapters mean nothing on other weights.
    flat_config = {**run_guard.flatten(config), **run_guard.flatten(store.identity(), run_guard.CORPUS)}
    base, flat_config = lora_run.frozen_base(config, lora, model, pretrained, state_shardings.base, init_rng,
                                             seq_len, flat_config)
    checkpointer = checkpointing.Checkpointer(workdir, every=config.checkpoint_every, keep=config.keep_checkpoints,
                                              async_save=config.async_checkpointing, train_config=flat_config)
    stack.callback(checkpointer.close)
    stack.callback(checkpointer.wait)  # runs first: a save in flight completes before the manager closes
    saved_config = run_guard.read_saved_config(workdir)
    restored = checkpointer.restore_latest(checkpointing.abstract_train_state(state_shapes, state_shardings),
                                           allow_config_change=config.allow_config_change)
    # Only now that the workdir's run accepts this config: a refused resume leaves the workdir untouched.
    stack.enter_context(compile_cache.enabled_for_run(config.compile_cache_dir, workdir))
    if restored is not None:
        state, data_state = restored
        state = state.replace(base=base)
        logging.info("resumed from the checkpoint at step %d", int(state.step))
        changes = run_guard.config_diff(saved_config or flat_config, flat_config)
        if changes:
            logging.warning("resuming with changed config keys: %s",
                            "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    else:
        data_state = data.DataState()
        if lora is not None:
            # Adapters from a key of their own: the random base (without init_from) is drawn from init_rng.
            state = step_lib.init_lora_state(tx, state_shardings, jax.random.fold_in(init_rng, 1), base, gpt2_config,
                                             lora)
        else:
            params = None if pretrained is None else mesh_lib.place(
                jax.tree.map(lambda x: np.asarray(x, gpt2_config.param_dtype), pretrained), state_shardings.params)
            state = step_lib.init_train_state(model, tx, state_shardings, init_rng, seq_len, params)
    del pretrained
    if jax.process_index() == 0:
        # Written only now that the config is known to fit the run's checkpoints. Not config.json:
        # from_pretrained would take the workdir for a Hugging Face folder.
        file_io.atomic_write(file_io.join(workdir, "train_config.json"), config.to_json_best_effort(indent=1))
        _save_tokenizer(config.data.tokenizer, workdir)
    start_step = int(state.step)
    hf_model_config = gpt2_config.to_hf_config()

    packing = packing_lib.Packing.from_config(config.data, store.meta.get("eot_token"))
    loss_on = config.data.loss_on
    train_step = step_lib.jit_train_step(model, tx, schedule, state_shardings, batch_sharding, lora, packing, loss_on)
    eval_step = step_lib.jit_eval_step(model, state_shardings.params, batch_sharding, lora, state_shardings.base,
                                       packing, loss_on)
    # Evaluations that take the model's plain params get a LoRA run's base with the adapters merged, placed so.
    model_shardings = state_shardings.params if lora is None else state_shardings.base
    model_params = functools.partial(step_lib.full_params, lora=lora, base_shardings=model_shardings)
    batches = data.TrainBatches(train_windows, config.batch_size, micro, config.seed, batch_sharding, data_state)
    max_eval_batches = config.eval_batches if config.eval_batches > 0 else val_windows.count // eval_batch
    eval_set = data.eval_batches(val_windows, eval_batch, max_eval_batches, batch_sharding)

    hellaswag_eval = evals.hellaswag_evaluator(config, model, mesh, rules, model_shardings, eval_batch)

    def evaluate(state) -> dict[str, float]:
        """The held-out loss and perplexity (none without held-out data), and HellaSwag accuracy when configured."""
        out = {}
        if eval_set:
            base_arg = () if lora is None else (state.base,)
            out["eval_loss"] = loss_mask.combine_eval([eval_step(state.params, b, *base_arg) for b in eval_set],
                                                      loss_on)
            out["eval_perplexity"] = _exp(out["eval_loss"])
        if hellaswag_eval is not None:
            out.update(hellaswag_eval(model_params(state)))
        return out

    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step)
    stack.callback(writer.close)
    progress = metrics_lib.Progress(
        config.steps, start_step, config.batch_size * seq_len, metrics_lib.flops_per_token(gpt2_config, seq_len),
        metrics_lib.peak_flops(jax.devices(), config.cpu_peak_flops), enabled=config.progress_bar,
        causal_flops_per_token=metrics_lib.flops_per_token(gpt2_config, seq_len, causal=True))
    stack.callback(progress.close)
    profile = stack.enter_context(profiling.ProfileWindow(config.profile_steps, config.steps, workdir, start_step))
    result = {"step": start_step, "loss": math.nan, "eval_loss": math.nan, "stopped": "done"}
    # The model's activation constraints (nn.with_logical_constraint) need the rules and the mesh at trace time.
    watchdog = Watchdog(config.watchdog_seconds, workdir, jax.process_index(), exit_on_hang=config.watchdog_exit)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), signals_lib.StopSignals() as signals, watchdog:
        state, result = step_loop.run_steps(config, state, batches, train_step, evaluate, checkpointer, writer,
                                            progress, signals, hf_model_config, dropout_rng, result, profile,
                                            goodput, watchdog)
    with goodput.timed("checkpoint"):
        checkpointer.wait()
    progress.close()
    with goodput.timed("eval"):
        if config.coverage_sets and config.data.recipe == "commongen" and result["stopped"] == "done":
            result.update(evals.commongen_coverage(model, model_params(state), config, cut, workdir, writer,
                                                   result["step"]))
        if config.sample.prompt and result["stopped"] == "done":
            result["sample"] = evals.sample_after_training(model, model_params(state), config, workdir)
    result["goodput"] = goodput.summary()
    writer.write(result["step"], **{f"goodput_{k}": v for k, v in result["goodput"].items()})
    writer.close()
    result = _with_nulls(result, {
        "loss": f"no training step ran in this invocation: it started at step {start_step} and "
                + (f"the run was already done (steps={config.steps}); metrics.jsonl has the logged losses"
                   if start_step >= config.steps else f"was {result['stopped']} before its first step"),
        "eval_loss": (f"no held-out batch to evaluate (data.val_fraction={config.data.val_fraction}, {eval_batch} "
                      "sequences per eval batch)" if not eval_set else
                      f"no eval ran before the run was {result['stopped']} at step {result['step']}"
                      if result["stopped"] != "done" else "the eval loss is not a finite number")})
    if jax.process_index() == 0:
        metrics_lib.plot_losses(workdir)
        file_io.atomic_write(file_io.join(workdir, "result.json"), json.dumps(result, indent=1, allow_nan=False))
        if result["stopped"] == "done":
            print(f"done: step {result['step']}, loss {_number(result['loss'])}, eval loss "
                  f"{_number(result['eval_loss'])}; outputs in {workdir} (result.json, metrics.jsonl, loss.png, "
                  "checkpoints/)", flush=True)
    return result


def _with_nulls(result: dict[str, Any], reasons: dict[str, str]) -> dict[str, Any]:
    """`result` with every non-finite number as None (JSON's null: NaN is not JSON, and strict readers reject
    it) and, under `why_null`, why each is missing (`reasons[key]`)."""
    out = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}
    why = {k: reasons.get(k, "not a finite number") for k, v in result.items() if v is not None and out[k] is None}
    return {**out, "why_null": why} if why else out


def _number(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))  # NaN stays NaN


def _resolve_epochs(config, steps_per_epoch: int):
    """With `epochs > 0`: `steps = epochs * steps_per_epoch`, and `eval_every = 0` means every epoch."""
    if config.epochs <= 0:
        return config
    if steps_per_epoch == 0:
        return config  # TrainBatches names the problem (fewer windows than one batch)
    config = config.copy_and_resolve_references()
    config.steps = config.epochs * steps_per_epoch
    if config.eval_every <= 0:
        config.eval_every = steps_per_epoch
    logging.info("%d epochs of %d steps: steps=%d", config.epochs, steps_per_epoch, config.steps)
    return config

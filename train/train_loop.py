"""`train_and_evaluate(config, workdir)`: the whole training run, from one CPU to a multi-host TPU pod.

Every process runs the same program (JAX's multi-controller SPMD): the mesh spans all devices of all
hosts, params and optimizer state are placed through the config's logical axis rules, each host reads
only the batch rows its devices hold, and one jitted step with explicit in/out shardings does the rest.
Rerunning the same command on the same workdir resumes from the newest readable checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2.config import GPT2Config
from flax_gpt2.model import GPT2LMHeadModel
from train import checkpointing, data, mesh as mesh_lib, metrics as metrics_lib, step as step_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str, key: str):
    if name not in _DTYPES:
        raise ValueError(f"config.model.{key}={name!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def model_config(config) -> tuple[GPT2Config, Any]:
    """The `GPT2Config` to train, and the pretrained params (None when training from scratch)."""
    m = config.model
    jax_fields = dict(dtype=_dtype(m.dtype, "dtype"), param_dtype=_dtype(m.param_dtype, "param_dtype"),
                      remat=m.remat, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout)
    sizes = {k: m[k] for k in ("n_layer", "n_embd", "n_head", "n_positions") if m[k] is not None}
    if config.init_from:
        import flax_gpt2

        if sizes:
            raise ValueError(f"config.model sets {sorted(sizes)} but init_from={config.init_from!r} fixes the "
                             "architecture; drop them")
        model, params = flax_gpt2.from_pretrained(config.init_from, param_dtype=jax_fields["param_dtype"],
                                                  progress=jax.process_index() == 0)
        return model.config.replace(**jax_fields), params
    return GPT2Config.from_preset(m.preset, **sizes, **jax_fields), None


def _check_batch(config, batch_shards: int) -> int:
    micro = config.micro_batch_size or config.batch_size
    if config.batch_size <= 0 or micro <= 0 or config.batch_size % micro:
        raise ValueError(f"batch_size={config.batch_size} must be a positive multiple of "
                         f"micro_batch_size={config.micro_batch_size}")
    if micro % batch_shards:
        raise ValueError(f"the micro-batch of {micro} sequences is not divisible by the {batch_shards} ways the "
                         f"mesh splits the batch (data x fsdp); change batch_size/micro_batch_size or the mesh")
    return micro


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


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each step (single-process runs).

    Multi-process runs leave SIGTERM to JAX's preemption service instead, which makes every host stop
    at the same step (`Checkpointer.reached_preemption`).
    """

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _save_tokenizer(name_or_path: str, workdir: str) -> None:
    """Writes the tokenizer's vocab.json + merges.txt into the workdir, so that the run is a model folder
    `python -m flax_gpt2.sample --model WORKDIR` can use offline."""
    from flax_gpt2.tokenizer import get_tokenizer

    try:
        get_tokenizer(name_or_path or None).save(workdir)
    except OSError as e:  # offline without the tokenizer files; training itself may only need cached tokens
        logging.warning("could not save the tokenizer into %s: %s", workdir, e)


def _place(tree, shardings):
    """Host arrays (the same on every process) -> global arrays with `shardings`."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x[i])),
                        tree, shardings)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run described by `config` in `workdir`.

    Writes `train_config.json`, `metrics.jsonl`, TensorBoard events (`tensorboard/`), checkpoints
    (`checkpoints/`) and, at the end, `loss.png`, `result.json` (and `sample.txt` if asked to sample).
    Returns the final `{"step", "loss", "eval_loss", "stopped"}`, where `stopped` is "done" or "preempted".

    Raises:
      FloatingPointError: the loss became NaN/inf; the last good state was saved first.
    """
    _initialize_distributed(config.distributed)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        # Not config.json: from_pretrained would take the workdir for a Hugging Face folder.
        with open(os.path.join(workdir, "train_config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))
        _save_tokenizer(config.data.tokenizer, workdir)

    gpt2_config, pretrained = model_config(config)
    seq_len = config.data.seq_len
    if seq_len > gpt2_config.n_positions:
        raise ValueError(f"data.seq_len={seq_len} exceeds the model's n_positions={gpt2_config.n_positions}")
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
    micro = _check_batch(config, mesh_lib.batch_shards(mesh, rules))
    eval_batch = config.eval_batch_size or micro
    if eval_batch % mesh_lib.batch_shards(mesh, rules):
        raise ValueError(f"eval_batch_size={eval_batch} is not divisible by the {mesh_lib.batch_shards(mesh, rules)}"
                         " ways the mesh splits the batch")
    logging.info("mesh %s over %d devices on %d processes", dict(mesh.shape), mesh.size, jax.process_count())

    # Data: the token stream, its train/held-out split, and the batch placement.
    store = data.load_tokens(config.data, progress=jax.process_index() == 0)
    if store.meta["vocab_size"] > gpt2_config.vocab_size:
        raise ValueError(f"the tokenizer has {store.meta['vocab_size']} tokens but the model only "
                         f"{gpt2_config.vocab_size}")
    cut = data.split_point(store, config.data.val_fraction, seq_len)
    train_windows, val_windows = data.Windows(store, 0, cut, seq_len), data.Windows(store, cut, len(store), seq_len)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    config = _resolve_epochs(config, train_windows.count // config.batch_size)

    # Model, optimizer and the shardings of the train state.
    model = GPT2LMHeadModel(gpt2_config)
    tx, schedule = step_lib.make_optimizer(config.optimizer, config.steps)
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    state_shardings, state_shapes = mesh_lib.train_state_shardings(model, tx, mesh, rules, seq_len)

    checkpointer = checkpointing.Checkpointer(workdir, every=config.checkpoint_every, keep=config.keep_checkpoints,
                                              async_save=config.async_checkpointing)
    restored = checkpointer.restore_latest(checkpointing.abstract_train_state(state_shapes, state_shardings))
    if restored is not None:
        state, data_state = restored
        logging.info("resumed from the checkpoint at step %d", int(state.step))
    else:
        data_state = data.DataState()
        params = None
        if pretrained is not None:
            params = _place(jax.tree.map(lambda x: np.asarray(x, gpt2_config.param_dtype), pretrained),
                            state_shardings.params)
        state = step_lib.init_train_state(model, tx, state_shardings, init_rng, seq_len, params)
    del pretrained
    start_step = int(state.step)
    hf_model_config = gpt2_config.to_hf_config()

    train_step = step_lib.jit_train_step(model, tx, schedule, state_shardings, batch_sharding)
    eval_step = step_lib.jit_eval_step(model, state_shardings.params, batch_sharding)
    batches = data.TrainBatches(train_windows, config.batch_size, micro, config.seed, batch_sharding, data_state)
    max_eval_batches = config.eval_batches if config.eval_batches > 0 else val_windows.count // eval_batch
    eval_set = data.eval_batches(val_windows, eval_batch, max_eval_batches, batch_sharding)

    def evaluate(params) -> float:
        if not eval_set:
            return math.nan
        return float(np.mean([float(eval_step(params, b)) for b in eval_set]))

    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step)
    progress = metrics_lib.Progress(
        config.steps, start_step, config.batch_size * seq_len, metrics_lib.flops_per_token(gpt2_config, seq_len),
        metrics_lib.peak_flops(jax.devices(), config.cpu_peak_flops), enabled=config.progress_bar)
    result = {"step": start_step, "loss": math.nan, "eval_loss": math.nan, "stopped": "done"}
    # The model's activation constraints (nn.with_logical_constraint) need the rules and the mesh at trace time.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), _SigtermFlag() as sigterm:
        try:
            state, result = _loop(config, state, batches, train_step, evaluate, checkpointer, writer, progress,
                                  sigterm, hf_model_config, dropout_rng, result)
        finally:
            progress.close()
            checkpointer.wait()
            checkpointer.close()
            writer.close()
    if config.coverage_sets and config.data.recipe == "commongen" and result["stopped"] == "done":
        result.update(_commongen_coverage(model, state.params, config, cut, workdir, writer_step=result["step"]))
    if config.sample.prompt and result["stopped"] == "done":
        result["sample"] = sample(model, state.params, config, workdir)
    if jax.process_index() == 0:
        metrics_lib.plot_losses(workdir)
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


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


def _commongen_coverage(model, params, config, cut: int, workdir: str, writer_step: int) -> dict:
    """Coverage of held-out CommonGen concept sets; appended to metrics.jsonl and printed."""
    from train import commongen_eval

    params = jax.device_get(params)
    sets = commongen_eval.held_out_concept_sets(config.data, cut, config.coverage_sets)
    out = commongen_eval.commongen_coverage(model, params, config.data, sets,
                                            workdir if jax.process_index() == 0 else None)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": writer_step, "coverage": out["coverage"],
                                "coverage_sets": out["coverage_sets"]}) + "\n")
        print(f"CommonGen coverage on {out['coverage_sets']} held-out concept sets: {out['coverage']:.3f}", flush=True)
        for row in out["samples"]:
            print(f"  {', '.join(row['concepts'])}: {row['sentence']}  (coverage {row['coverage']:.2f})", flush=True)
    return {"coverage": out["coverage"], "coverage_sets": out["coverage_sets"]}


def sample(model: GPT2LMHeadModel, params, config, workdir: str) -> str:
    """Samples `config.sample.max_new_tokens` after `config.sample.prompt`; writes `workdir/sample.txt`."""
    from jax.experimental import multihost_utils

    from flax_gpt2.generation import generate
    from flax_gpt2.tokenizer import get_tokenizer

    if jax.process_count() > 1:  # every host generates from a full local copy
        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.device_put(params, jax.devices()[0] if jax.process_count() == 1 else jax.local_devices()[0])
    tokenizer = get_tokenizer(config.data.tokenizer or None)
    prompt = np.asarray([tokenizer.encode(config.sample.prompt)], np.int32)
    max_new = min(config.sample.max_new_tokens, model.config.n_positions - prompt.shape[1])
    tokens = generate(model, params, prompt, max_new_tokens=max_new, do_sample=True,
                      temperature=config.sample.temperature, top_k=config.sample.top_k, seed=config.seed)
    text = tokenizer.decode(np.asarray(tokens[0]).tolist())
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "sample.txt"), "w") as f:
            f.write(text + "\n")
        print(f"--- sample ---\n{text}\n---", flush=True)
    return text


def _loop(config, state, batches, train_step, evaluate, checkpointer, writer, progress, sigterm,
          hf_model_config, dropout_rng, result) -> tuple[step_lib.TrainState, dict[str, Any]]:
    step = int(state.step)
    if step >= config.steps:
        progress.write(f"already trained to step {step} (steps={config.steps})")
        result["eval_loss"] = evaluate(state.params)
        return state, result
    first = True
    started = time.perf_counter()
    progress.start_timing()
    while step < config.steps:
        data_before = batches.state
        state, m = train_step(state, next(batches), dropout_rng)
        # One scalar back to the host per step: the NaN check must see every step before the next one
        # consumes the donated state.
        loss, finite = float(m["loss"]), bool(m["finite"])
        if not finite:
            # optax.apply_if_finite skipped the update: `state` is still the last good state.
            checkpointer.save(state, data_before, hf_model_config, force=True)
            checkpointer.wait()
            raise FloatingPointError(
                f"loss is {loss} (or a gradient is not finite) at step {step + 1}; stopped, and the last good "
                f"state (step {step}) is saved in {checkpointer.workdir}. Lower optimizer.lr or raise warmup.")
        step += 1
        progress.update(loss, timed=not first)
        first = False
        result.update(step=step, loss=loss)
        if step % config.log_every == 0 or step == config.steps:
            scalars = {"loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                       "elapsed_s": time.perf_counter() - started}
            if not math.isnan(progress.tokens_per_sec):
                scalars["tokens_per_sec"] = progress.tokens_per_sec
            if not math.isnan(progress.mfu):
                scalars["mfu"] = progress.mfu
            writer.write(step, **scalars)
        paused = False
        if (config.eval_every > 0 and step % config.eval_every == 0) or step == config.steps:
            result["eval_loss"] = evaluate(state.params)
            writer.write(step, eval_loss=result["eval_loss"], eval_perplexity=_exp(result["eval_loss"]),
                         epoch=round(step / batches.batches_per_epoch, 4), elapsed_s=time.perf_counter() - started)
            progress.write(f"step {step} (epoch {step / batches.batches_per_epoch:.2f}): eval loss "
                           f"{result['eval_loss']:.4f}, perplexity {_exp(result['eval_loss']):.2f}")
            paused = True
        preempted = sigterm.raised or checkpointer.reached_preemption(step)
        paused |= checkpointer.save(state, batches.state, hf_model_config,
                                    force=preempted or step == config.steps)
        if preempted:
            checkpointer.wait()
            progress.write(f"preempted: saved step {step}; rerun the same command to resume")
            result["stopped"] = "preempted"
            break
        if paused:
            progress.start_timing()
    return state, result

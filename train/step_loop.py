"""The optimizer-step loop of a run: step, log, evaluate, checkpoint, stop on a signal, time it all.

`train_loop.train_and_evaluate` builds everything (mesh, data, state, jitted steps) and calls `run_steps`.
Every piece of wall time lands in a goodput category (train/goodput.py) and every finished step, eval or
save tells the hang watchdog (train/watchdog.py) that the run is alive.
"""

from __future__ import annotations

import math
import time
from typing import Any

from . import step as step_lib
from .goodput import Goodput
from .watchdog import Watchdog


def run_steps(config, state, batches, train_step, evaluate, checkpointer, writer, progress, signals,
              hf_model_config, dropout_rng, result, profile, goodput: Goodput,
              watchdog: Watchdog) -> tuple[step_lib.TrainState, dict[str, Any]]:
    """Trains from `state.step` to `config.steps` (or a stop signal); returns the final state and `result`."""
    step = int(state.step)
    if step >= config.steps:
        progress.write(f"already trained to step {step} (steps={config.steps})")
        with goodput.timed("eval"):
            result.update(evaluate(state))
        return state, result
    first = True
    started = time.perf_counter()
    data_wait = 0.0  # seconds waiting for batches since the last log line
    goodput.restart_done()
    progress.start_timing()
    while step < config.steps:
        data_before = batches.state
        profile.before(step + 1)
        t0 = time.perf_counter()
        with goodput.timed("data_wait"):
            batch = next(batches)
        t1 = time.perf_counter()
        data_wait += t1 - t0  # since the last log line
        with goodput.timed("step"):
            state, m = train_step(state, batch, dropout_rng)
            profile.after(step + 1, m)
            # One scalar back to the host per step: the NaN check must see every step before the next one
            # consumes the donated state.
            loss, finite = float(m["loss"]), bool(m["finite"])
        if first:
            watchdog.beat()  # the first step's compile says nothing about the step time
        else:
            watchdog.step_took(time.perf_counter() - t1)
        if not finite:
            # optax.apply_if_finite skipped the update: `state` is still the last good state.
            checkpointer.save(state, data_before, hf_model_config, force=True)
            checkpointer.wait()
            raise FloatingPointError(
                f"loss is {loss} (or a gradient is not finite) at step {step + 1}; stopped, and the last good "
                f"state (step {step}) is saved in {checkpointer.workdir}. Lower optimizer.lr or raise warmup.")
        step += 1
        progress.update(loss, timed=not first, data_wait=t1 - t0)
        first = False
        result.update(step=step, loss=loss)
        if step % config.log_every == 0 or step == config.steps:
            scalars = {"loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                       "elapsed_s": time.perf_counter() - started, "data_wait_s": data_wait}
            data_wait = 0.0
            if not math.isnan(progress.tokens_per_sec):
                scalars["tokens_per_sec"] = progress.tokens_per_sec
            if not math.isnan(progress.mfu):
                scalars.update(mfu=progress.mfu, mfu_causal=progress.mfu_causal)
            writer.write(step, **scalars)
        paused = False
        if (config.eval_every > 0 and step % config.eval_every == 0) or step == config.steps:
            with goodput.timed("eval"):
                evals = evaluate(state)
            watchdog.beat()
            if evals:  # none without held-out data or HellaSwag: no eval record, no NaN
                result.update(evals)
                writer.write(step, **evals, epoch=round(step / batches.batches_per_epoch, 4),
                             elapsed_s=time.perf_counter() - started)
                parts = ([f"eval loss {evals['eval_loss']:.4f}, perplexity {evals['eval_perplexity']:.2f}"]
                         if "eval_loss" in evals else [])
                if "hellaswag_acc_norm" in evals:
                    parts.append(f"HellaSwag acc_norm {evals['hellaswag_acc_norm']:.4f}")
                progress.write(f"step {step} (epoch {step / batches.batches_per_epoch:.2f}): {', '.join(parts)}")
            paused = True
        stop = signals.should_stop() or checkpointer.reached_preemption(step)
        with goodput.timed("checkpoint"):
            paused |= checkpointer.save(state, batches.state, hf_model_config, force=stop or step == config.steps)
        if stop:
            with goodput.timed("checkpoint"):
                checkpointer.wait()
            writer.flush()
            result["stopped"] = signals.reason
            progress.write(f"{result['stopped']}: saved step {step} in {checkpointer.workdir}; rerun the same "
                           "command to resume")
            break
        if paused:
            watchdog.beat()
            progress.start_timing()
    return state, result

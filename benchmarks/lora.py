"""LoRA vs full fine-tuning in the training app: train-step time, optimizer-state bytes, trainable parameters.

    python benchmarks/lora.py                         # gpt2 (124M) shape, B=2, T=128, fp32, on this CPU
    python benchmarks/lora.py --batch 8 --seq_len 1024 --dtype bfloat16   # on an accelerator

One process, one row per case, each the training app's real step (`train.step.jit_train_step` with the
shardings of `train.mesh.train_state_shardings`, on a one-device mesh, as `python -m train` builds them):
full fine-tuning (AdamW on every parameter) and LoRA (`--config.lora.rank=8`, the default target `c_attn`,
and all of `c_attn,c_proj,c_fc`) over a frozen base. Random gpt2-shaped weights (no download); dropout 0.
Reported per case: the median ms/step of `--steps` timed steps after `--warmup` untimed ones (the cases
stepped in turn, one step of each per round, so that other jobs' load falls on all of them alike), the
trainable parameters (the arrays of `TrainState.params`), the bytes of the optimizer state and of the whole
train state, summed over the actual arrays (`.nbytes`), and the ratios to full fine-tuning of the same run.

The multi-adapter serving section comes from `benchmarks/lora_serving.py` (`serving_rows()`) when that
module is present.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
from compile_time import cpu_name  # run as a script: benchmarks/ is on the path


def _nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def _size(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _train_config(args, rank: int, targets: str):
    """The finetune recipe's config (AdamW, clipping) with this case's LoRA keys, as `--config.*` would set them."""
    from flax_gpt2.configs import finetune

    config = finetune.get_config()
    config.lora.rank = rank
    config.lora.targets = targets
    config.model.dtype = args.dtype
    config.model.dropout = 0.0  # timing noise-free; dropout masks cost the same in both modes
    return config


class Case:
    """One case's train state and compiled step, built as `python -m train` builds them."""

    def __init__(self, args, name: str, rank: int, targets: str):
        import flax.linen as nn
        import ml_collections

        from flax_gpt2.modeling.config import GPT2Config
        from flax_gpt2.modeling.model import GPT2LMHeadModel
        from flax_gpt2.train import mesh as mesh_lib, model_config as model_config_lib, step as step_lib

        self.name = name
        config = _train_config(args, rank, targets)
        lora = model_config_lib.lora_config(config)
        jax_fields, _ = model_config_lib.model_fields(config)
        model = GPT2LMHeadModel(GPT2Config.from_preset(args.preset, **jax_fields))
        tx, schedule = step_lib.make_optimizer(config.optimizer, total_steps=1000)
        mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                                  jax.local_devices()[:1])
        rules = config.logical_axis_rules
        seq = args.seq_len
        shardings, _ = mesh_lib.train_state_shardings(model, tx, mesh, rules, seq, lora,
                                                      model_config_lib.base_dtype(config))
        batch_sharding = mesh_lib.batch_sharding(mesh, rules)
        tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, args.batch, seq + 1),
                                                   dtype=np.int32)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            if lora is None:
                self.state = step_lib.init_train_state(model, tx, shardings, jax.random.key(0), seq)
            else:  # as train_loop does without init_from: the seed's random init is the frozen base
                base = step_lib.init_base(model, shardings.base, jax.random.key(0), seq,
                                          model_config_lib.base_dtype(config))
                self.state = step_lib.init_lora_state(tx, shardings, jax.random.key(1), base, model.config, lora)
            self.tokens = jax.device_put(tokens, batch_sharding)
            train_step = step_lib.jit_train_step(model, tx, schedule, shardings, batch_sharding, lora)
            start = time.perf_counter()
            self.step = train_step.lower(self.state, self.tokens, jax.random.key(2)).compile()
            self.compile_s = time.perf_counter() - start
        self.times, self.losses = [], []

    def run_step(self, timed: bool) -> None:
        start = time.perf_counter()
        self.state, metrics = self.step(self.state, self.tokens, jax.random.key(2))
        self.losses.append(float(metrics["loss"]))  # waits for the step
        if timed:
            self.times.append(time.perf_counter() - start)

    def row(self) -> dict:
        state = self.state
        return {"case": self.name, "trainable": _size(state.params), "params_bytes": _nbytes(state.params),
                "opt_state_bytes": _nbytes(state.opt_state), "base_bytes": _nbytes(state.base),
                "state_bytes": _nbytes(state), "ms_per_step": 1e3 * statistics.median(self.times),
                "ms_min": 1e3 * min(self.times), "ms_max": 1e3 * max(self.times), "compile_s": self.compile_s,
                "loss_first": self.losses[0], "loss_last": self.losses[-1]}


CASES = (("full fine-tune (AdamW)", 0, "c_attn"),
         ("LoRA r=8 c_attn (default)", 8, "c_attn"),
         ("LoRA r=8 c_attn,c_proj,c_fc", 8, "c_attn,c_proj,c_fc"))


def _mb(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def print_table(rows: list[dict]) -> None:
    full = rows[0]
    print("| case | trainable params | % of model | opt-state MB | vs full | train-state MB | ms/step median (min) "
          "| vs full: median (min) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    model_size = full["trainable"]
    for r in rows:
        print(f"| {r['case']} | {r['trainable']:,} | {100 * r['trainable'] / model_size:.2f}% "
              f"| {_mb(r['opt_state_bytes'])} | {r['opt_state_bytes'] / full['opt_state_bytes']:.4f}x "
              f"| {_mb(r['state_bytes'])} | {r['ms_per_step']:.0f} ({r['ms_min']:.0f}) "
              f"| {r['ms_per_step'] / full['ms_per_step']:.2f}x ({r['ms_min'] / full['ms_min']:.2f}x) "
              f"| {r['compile_s']:.1f} |", flush=True)


def print_serving() -> None:
    """The multi-adapter serving section, from benchmarks/lora_serving.py when it exists."""
    print("\n## Multi-adapter serving", flush=True)
    try:
        from lora_serving import serving_rows  # benchmarks/ is this script's folder, first on sys.path
    except ImportError as e:
        print(f"(absent: benchmarks/lora_serving.py's serving_rows could not be imported: {e})")
        return
    rows = serving_rows()
    if isinstance(rows, str):
        print(rows)
        return
    rows = list(rows)
    if rows and isinstance(rows[0], dict):
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in rows:
            print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    else:
        for r in rows:
            print(r)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2", help="model shape (random weights)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (one micro-batch)")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (master params, base and optimizer state stay float32)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
    parser.add_argument("--steps", type=int, default=9, help="timed steps per case (median reported)")
    parser.add_argument("--no_serving", dest="serving", action="store_false",
                        help="skip the multi-adapter serving section")
    args = parser.parse_args(argv)
    device = jax.local_devices()[0]
    where = cpu_name() if device.platform == "cpu" else f"{device.device_kind} ({device.platform})"
    print(f"{where}; jax {jax.__version__}; Python {platform.python_version()}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    print(f"{args.preset} shape, random init, batch {args.batch} x seq {args.seq_len}, {args.dtype} compute, "
          f"float32 params/base/AdamW state, dropout 0; median of {args.steps} steps after {args.warmup} "
          "untimed\n", flush=True)
    cases = [Case(args, name, rank, targets) for name, rank, targets in CASES]
    # Round robin, one step of each case per round: a load change on this shared machine hits every case alike.
    for i in range(args.warmup + args.steps):
        for case in cases:
            case.run_step(timed=i >= args.warmup)
    rows = [case.row() for case in cases]
    print_table(rows)
    for r in rows:
        finite = np.isfinite([r["loss_first"], r["loss_last"]]).all()
        print(f"  {r['case']}: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}"
              f"{'' if finite else ' (NOT FINITE)'}; params {_mb(r['params_bytes'])} MB, "
              f"frozen base {_mb(r['base_bytes'])} MB")
    print(f"load average at the end {os.getloadavg()[0]:.1f}", flush=True)
    if args.serving:
        print_serving()
    return 0


if __name__ == "__main__":
    from flax_gpt2.utils import cli

    sys.exit(cli.run(main, prog="benchmarks/lora.py"))  # the CLI conventions (README)

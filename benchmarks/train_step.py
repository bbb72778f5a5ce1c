"""Train-step throughput of a GPT-2 124M-shaped model: flax_gpt2's sharded step vs transformers + torch AdamW.

    python benchmarks/train_step.py                       # CPU: 8x256 and 4x1024, fp32, both frameworks
    python benchmarks/train_step.py --shapes 8x1024 --dtype bfloat16 --no_torch   # on a GPU/TPU: MFU

Both sides run the same model (random init), the same batch, dropout, AdamW (betas 0.9/0.95, weight decay
0.1 on matrices), global-norm clipping at 1.0, one optimizer step per batch, in the same process. The
flax_gpt2 step is `flax_gpt2.train.step.jit_train_step` exactly as `python -m train` runs it, on a mesh of all
local devices (data parallel), with one loss value fetched per step. Tokens/s counts trained tokens;
MFU = tokens/s x (6N + 12 L D T) / peak, with the peak from train/metrics.py (CPU: `--cpu_peak`, an
estimate). The first step (compilation / warm-up) is not timed.
"""

from __future__ import annotations

import sys
import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from flax_gpt2.configs import base  # installed with flax_gpt2 (`pip install -e .`), like `train`


def _time_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def bench_flax(batch: int, seq_len: int, steps: int, dropout: float, dtype: str, remat: bool) -> dict:
    import flax.linen as nn
    import jax
    import ml_collections

    from flax_gpt2 import GPT2Config, GPT2LMHeadModel
    from flax_gpt2.train import mesh as mesh_lib, metrics, step as step_lib

    config = base.get_config()
    gpt2 = GPT2Config.from_preset("gpt2", resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                  dtype=getattr(jax.numpy, dtype), remat=remat)
    model = GPT2LMHeadModel(gpt2)
    tx, schedule = step_lib.make_optimizer(config.optimizer, total_steps=1000)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), jax.local_devices())
    rules = config.logical_axis_rules
    shardings, _ = mesh_lib.train_state_shardings(model, tx, mesh, rules, seq_len)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    tokens = np.random.default_rng(0).integers(0, gpt2.vocab_size, (1, batch, seq_len + 1), dtype=np.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = step_lib.init_train_state(model, tx, shardings, jax.random.key(0), seq_len)
        tokens = jax.device_put(tokens, batch_sharding)
        train_step = step_lib.jit_train_step(model, tx, schedule, shardings, batch_sharding)
        holder = {"state": state}

        def one():
            holder["state"], m = train_step(holder["state"], tokens, jax.random.key(1))
            holder["loss"] = float(m["loss"])

        start = time.perf_counter()
        one()
        compile_s = time.perf_counter() - start
        times = _time_steps(one, steps)
    peak = metrics.peak_flops(jax.local_devices(), ARGS.cpu_peak)
    tok_s = batch * seq_len / statistics.median(times)
    return {"framework": "flax_gpt2", "device": jax.local_devices()[0].device_kind, "devices": jax.local_device_count(),
            "tokens_per_sec": tok_s, "mfu": tok_s * metrics.flops_per_token(gpt2, seq_len) / peak if peak else None,
            "step_s": times, "first_step_s": compile_s, "loss": holder["loss"]}


def bench_torch(batch: int, seq_len: int, steps: int, dropout: float) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    config = transformers.GPT2Config(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = transformers.GPT2LMHeadModel(config).train()
    named = dict(model.named_parameters())
    decay = [p for n, p in named.items() if n.endswith(".weight") and ".ln_" not in n]
    rest = [p for n, p in named.items() if not (n.endswith(".weight") and ".ln_" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq_len + 1)))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    holder = {}

    def one():
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        holder["loss"] = loss.item()

    start = time.perf_counter()
    one()
    first = time.perf_counter() - start
    times = _time_steps(one, steps)
    tok_s = batch * seq_len / statistics.median(times)
    from flax_gpt2 import GPT2Config
    from flax_gpt2.train import metrics
    mfu = tok_s * metrics.flops_per_token(GPT2Config(), seq_len) / ARGS.cpu_peak
    return {"framework": f"transformers {transformers.__version__} + torch {torch.__version__}",
            "device": "cpu", "threads": torch.get_num_threads(), "tokens_per_sec": tok_s, "mfu": mfu,
            "step_s": times, "first_step_s": first, "loss": holder["loss"]}


def main(argv=None) -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8x256,4x1024", help="comma-separated BATCHxSEQ_LEN")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per shape (median reported)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--no_torch", dest="torch", action="store_false")
    parser.add_argument("--cpu_peak", type=float, default=base.get_config().cpu_peak_flops,
                        help="peak FLOP/s of this CPU for MFU (default: the config's estimate)")
    parser.add_argument("--json", help="also write the results here")
    ARGS = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; dropout {ARGS.dropout}, "
          f"{ARGS.dtype}, median of {ARGS.steps} steps after one untimed")
    results = []
    for shape in ARGS.shapes.split(","):
        batch, seq_len = map(int, shape.split("x"))
        row = {"batch": batch, "seq_len": seq_len,
               "flax": bench_flax(batch, seq_len, ARGS.steps, ARGS.dropout, ARGS.dtype, ARGS.remat)}
        if ARGS.torch:
            row["torch"] = bench_torch(batch, seq_len, ARGS.steps, ARGS.dropout)
        results.append(row)
        flax, torch_ = row["flax"], row.get("torch")
        line = f"{batch}x{seq_len}: flax_gpt2 {flax['tokens_per_sec']:.0f} tok/s"
        if flax["mfu"] is not None:
            line += f" (MFU {100 * flax['mfu']:.1f}%)"
        if torch_:
            line += (f" | transformers {torch_['tokens_per_sec']:.0f} tok/s (MFU {100 * torch_['mfu']:.1f}%)"
                     f" | speedup {flax['tokens_per_sec'] / torch_['tokens_per_sec']:.2f}x")
        print(line, flush=True)
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(results, f, indent=1)


ARGS = None

if __name__ == "__main__":
    from flax_gpt2.utils import cli

    sys.exit(cli.run(main, prog="benchmarks/train_step.py"))  # the CLI conventions (README)

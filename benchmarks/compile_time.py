"""Compile time of the real train step, unrolled vs scanned blocks, and the step time change.

    python benchmarks/compile_time.py                         # gpt2 and gpt2-xl on this machine's CPU
    python benchmarks/compile_time.py --presets gpt2 --step   # also time steps (gpt2, B=2, T=256)

Compiles `train.step.jit_train_step` (bf16 compute, fp32 AdamW state, T=1024, micro-batch 1) on abstract
inputs for one device of this machine, `scan_layers` off and on, and prints a table. Compiling for a TPU
topology instead is `python -m train ... --config.compile_only=v4-8` (benchmarks/TPU_MEMORY.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402



def cpu_name() -> str:
    """`lscpu`'s model name and family/model numbers: speeds differ 2x between CPUs, so every figure names its CPU."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    get = lambda k: fields.get(k, "?").strip()  # noqa: E731
    return f"{get('Model name')} (family {get('CPU family')}, model {get('Model')}, {os.cpu_count()} cores)"


def compile_seconds(preset: str, scan: bool, seq_len: int, micro: int) -> float:
    import flax.linen as nn

    from device_check import _train_setup
    from flax_gpt2.modeling.config import GPT2Config

    config = GPT2Config.from_preset(preset, dtype=jnp.bfloat16, scan_layers=scan, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0)
    model, tx, step, state, batch, *_, mesh, rules = _train_setup(config, micro, seq_len)
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step.lower(state, batch, jax.random.key(0)).compile()
    return time.perf_counter() - start


def step_seconds(preset: str, scan: bool, seq_len: int, micro: int, steps: int = 5) -> float:
    import flax.linen as nn

    from device_check import _train_setup
    from flax_gpt2.modeling.config import GPT2Config
    from flax_gpt2.train import step as step_lib

    config = GPT2Config.from_preset(preset, dtype=jnp.float32, scan_layers=scan, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0)
    model, tx, step, _, _, shardings, batch_sharding, mesh, rules = _train_setup(config, micro, seq_len)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = step_lib.init_train_state(model, tx, shardings, jax.random.key(0), seq_len)
        tokens = jax.device_put(np.random.default_rng(0).integers(0, config.vocab_size, (1, micro, seq_len + 1),
                                                                  dtype=np.int32), batch_sharding)
        state, m = step(state, tokens, jax.random.key(1))
        float(m["loss"])
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, m = step(state, tokens, jax.random.key(1))
            float(m["loss"])
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="gpt2,gpt2-xl")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--step", action="store_true", help="also time train steps of gpt2 (B=2, T=256, fp32)")
    args = parser.parse_args(argv)
    print(f"{cpu_name()}; jax {jax.__version__}; Python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print("| model | layers | unrolled compile s | scanned compile s | ratio |\n|---|---|---|---|---|", flush=True)
    from flax_gpt2.modeling.config import PRESETS
    for preset in args.presets.split(","):
        unrolled = compile_seconds(preset, False, args.seq_len, 1)
        scanned = compile_seconds(preset, True, args.seq_len, 1)
        print(f"| {preset} | {PRESETS[preset].n_layer} | "
              f"{unrolled:.1f} | {scanned:.1f} | {unrolled / scanned:.2f}x |", flush=True)
    if args.step:
        unrolled = step_seconds("gpt2", False, 256, 2)
        scanned = step_seconds("gpt2", True, 256, 2)
        print(f"\nstep time, gpt2 B=2 T=256 fp32: unrolled {unrolled:.3f} s, scanned {scanned:.3f} s "
              f"(scanned/unrolled {scanned / unrolled:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from flax_gpt2.utils import cli

    sys.exit(cli.run(main, prog="benchmarks/compile_time.py"))  # the CLI conventions (README)

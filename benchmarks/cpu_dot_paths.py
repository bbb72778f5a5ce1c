"""Which XLA CPU dot path serves GPT-2's decode step, per instruction set: a table to explain CPU figures.

    python benchmarks/cpu_dot_paths.py             # every variant below, each in its own process

A decode step at batch B multiplies [B, 768] activations by the weight matrices ([768, 3072] and friends):
it is bound by reading the weights (≈0.5 GB per step for 124M in fp32), so the figure of merit is the
weights' bytes per second. Each variant sets XLA_FLAGS before JAX starts: the machine's own ISA, and
AVX2 only (`--xla_cpu_max_isa=AVX2`: how an AVX2-only CPU such as AMD EPYC family 25 runs), with XLA's
library dot paths (YNNPACK fusions, XNNPACK, oneDNN) switched on or off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "default": "",
    "AVX2": "--xla_cpu_max_isa=AVX2",
    "AVX2, no YNNPACK fusion": "--xla_cpu_max_isa=AVX2 --xla_cpu_experimental_ynn_fusion_type=",
    "AVX2, no XNNPACK": "--xla_cpu_max_isa=AVX2 --xla_cpu_use_xnnpack=false",
    "AVX2, oneDNN": "--xla_cpu_max_isa=AVX2 --xla_cpu_use_onednn=true",
}

_CHILD = r"""
import json, time, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
import flax_gpt2
from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params

def best(f, n=20):
    f(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)

x = jnp.ones((8, 768), jnp.float32); w = jnp.ones((768, 3072), jnp.float32)
dot = jax.jit(lambda a, b: a @ b)
t_dot = best(lambda: dot(x, w).block_until_ready(), 50)
config = flax_gpt2.GPT2Config.from_preset("gpt2")
model = GPT2LMHeadModel(config)
params = init_params(model, jax.random.key(0))
ids = np.random.default_rng(0).integers(0, 50257, (8, 32), dtype=np.int32)
run = lambda n: flax_gpt2.generate(model, params, ids, max_new_tokens=n, do_sample=False)
t_short = best(lambda: run(8), 3)
t_long = best(lambda: run(72), 3)
step = (t_long - t_short) / 64
weights = config.num_params * 4
print(json.dumps({"dot_us": 1e6 * t_dot, "dot_gbs": 768 * 3072 * 4 / t_dot / 1e9, "step_ms": 1e3 * step,
                  "step_gbs": weights / step / 1e9}))
"""


def main() -> int:
    repo = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compile_time import cpu_name

    print(f"{cpu_name()}; load average {os.getloadavg()[0]:.1f}")
    print("| variant | [8,768]x[768,3072] µs | GB/s | decode step B=8 ms | weights GB/s |\n|---|---|---|---|---|")
    for name, flags in VARIANTS.items():
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
        proc = subprocess.run([sys.executable, "-c", _CHILD, repo], env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1][:80]} | | | |", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['dot_us']:.0f} | {r['dot_gbs']:.1f} | {r['step_ms']:.1f} | {r['step_gbs']:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

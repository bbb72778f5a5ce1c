"""Forward-pass speed: flax_gpt2 (jitted) vs transformers PyTorch, same random gpt2-124M-shaped model.

    python benchmarks/forward.py [--batch 8] [--length 1024] [--repeats 3] [--dtype float32]

Prints one table row per implementation and the ratio (flax_gpt2 speed / PyTorch speed), measured in the
same run. Timings on a shared 2-core machine vary by 20-40% between runs: compare the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import flax_gpt2


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_flax(config, ids: np.ndarray, repeats: int) -> tuple[float, float]:
    model = flax_gpt2.GPT2LMHeadModel(config)
    params = flax_gpt2.init_params(model, jax.random.key(0))
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    x = jnp.asarray(ids)
    start = time.perf_counter()
    forward(params, x).block_until_ready()
    compile_s = time.perf_counter() - start
    return _best_time(lambda: forward(params, x).block_until_ready(), repeats), compile_s


def bench_torch(ids: np.ndarray, repeats: int, threads: int) -> float:
    import torch
    import transformers

    torch.set_num_threads(threads)
    hf_config = transformers.GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    x = torch.from_numpy(ids.astype(np.int64))

    def run():
        with torch.inference_mode():
            model(x).logits

    run()  # warm-up
    return _best_time(run, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch_threads", type=int, default=2)
    args = parser.parse_args(argv)

    config = flax_gpt2.GPT2Config.from_preset("gpt2", dtype=jnp.dtype(args.dtype))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.length))
    tokens = args.batch * args.length
    flax_s, compile_s = bench_flax(config, ids, args.repeats)
    torch_s = bench_torch(ids, args.repeats, args.torch_threads)

    print(f"GPT-2 124M forward, B={args.batch} T={args.length}, flax_gpt2 {args.dtype} vs PyTorch fp32, "
          f"{jax.devices()[0].platform}, best of {args.repeats}")
    print(f"| implementation | seconds | tokens/s |")
    print(f"|---|---|---|")
    print(f"| flax_gpt2 (jit; compile {compile_s:.1f} s) | {flax_s:.3f} | {tokens / flax_s:,.0f} |")
    print(f"| transformers PyTorch ({args.torch_threads} threads) | {torch_s:.3f} | {tokens / torch_s:,.0f} |")
    print(f"ratio (flax_gpt2 speed / PyTorch speed): {torch_s / flax_s:.2f}x")


if __name__ == "__main__":
    from flax_gpt2.utils import cli

    sys.exit(cli.run(main, prog="benchmarks/forward.py"))  # the CLI conventions (README)

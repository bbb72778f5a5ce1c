"""Decoding speed: flax_gpt2.generate vs transformers' PyTorch `generate`, same random GPT-2 weights, one run.

    python benchmarks/decode.py                       # gpt2-124M shape, prompt 32, 128 new tokens, batch 1 and 8
    python benchmarks/decode.py --dtypes float32 bfloat16 --batch_sizes 1 8 --repeats 5

Greedy decoding with EOS disabled, so every run makes exactly `--new_tokens` tokens per row. Reported:
tokens/s (batch * new tokens / wall time of one `generate` call, best of `--repeats` after a warm-up),
flax_gpt2's compile time (the jitted prefill + decode loop, compiled ahead of time) and its first call
(compilation included), and time to first token (a warm call with one new token: prefill plus choosing
the first token). Both libraries use the same number of threads (`--threads`, default all cores). The two
models get the same weights, and the script checks that their greedy tokens agree. Other processes on the
machine skew everything, PyTorch's threads most: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2 import GPT2Config, GPT2LMHeadModel
from flax_gpt2.utils.dtypes import DTYPES
from flax_gpt2.generation import generate
from flax_gpt2.checkpoints.hf_state_dict import params_from_hf_state_dict



def best_times(runs: dict, repeats: int) -> dict:
    """Best wall time of each `runs[name]()` over `repeats` rounds, after one warm-up call each. The
    libraries alternate within a round, so that both see the same background load; the best, not the
    median, because on a shared machine other processes only ever add time."""
    for run in runs.values():
        run()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def flax_model(hf_model, dtype):
    config = GPT2Config.from_hf_config(hf_model.config.to_dict(), dtype=DTYPES[dtype], param_dtype=DTYPES[dtype])
    state = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
    params = params_from_hf_state_dict(state, config, GPT2LMHeadModel)
    return GPT2LMHeadModel(config), jax.tree.map(lambda x: jnp.asarray(x, config.param_dtype), params)


def first_and_warm_seconds(model, params, ids, new_tokens) -> tuple[float, float]:
    """Wall time of the first `generate` call for these shapes (compiles) and of the next one (warm);
    their difference is the compile time, through the public API only."""
    run = flax_runner(model, params, ids)
    start = time.perf_counter()
    run(new_tokens)
    first = time.perf_counter() - start
    start = time.perf_counter()
    run(new_tokens)
    return first, time.perf_counter() - start


def flax_runner(model, params, ids):
    return lambda n: generate(model, params, ids, max_new_tokens=n)  # returns numpy: waits for the result


def torch_runner(hf_model, ids):
    import torch

    input_ids = torch.as_tensor(ids)
    mask = torch.ones_like(input_ids)

    def run(n):
        with torch.inference_mode():
            return hf_model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                     pad_token_id=0).numpy()

    return run


def bench(runners: dict, batch: int, new_tokens: int, repeats: int) -> dict:
    """tokens/s, ms/step and time to first token per library, and the tokens each produced."""
    results = {name: {"tokens": run(new_tokens)} for name, run in runners.items()}
    full = best_times({name: lambda run=run: run(new_tokens) for name, run in runners.items()}, repeats)
    first = best_times({name: lambda run=run: run(1) for name, run in runners.items()}, repeats)
    for name, r in results.items():
        r.update(tok_s=batch * new_tokens / full[name], step_ms=1e3 * full[name] / new_tokens,
                 ttft_ms=1e3 * first[name])
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["bfloat16", "float32"],
                        help="bfloat16 is slower on CPU (XLA converts the weights to float32 every step)")
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--preset", default="gpt2", help="flax_gpt2 preset whose shape to use")
    parser.add_argument("--no_torch", action="store_true", help="skip transformers PyTorch")
    args = parser.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(**GPT2Config.from_preset(args.preset).to_hf_config())
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.generation_config.eos_token_id = None  # always make --new_tokens tokens
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); transformers {transformers.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{args.preset}: prompt {args.prompt_length}, {args.new_tokens} new tokens, greedy\n")
    print(f"{'library':<22}{'dtype':<10}{'batch':>6}{'tok/s':>9}{'ms/step':>9}{'TTFT ms':>9}"
          f"{'compile s':>11}{'1st call s':>11}{'vs torch':>10}")
    rng = np.random.default_rng(0)
    for dtype in args.dtypes:
        model, params = flax_model(hf_model, dtype)
        torch_model = hf_model if dtype == "float32" else hf_model.to(getattr(torch, dtype))
        for batch in args.batch_sizes:
            ids = rng.integers(0, hf_config.vocab_size, (batch, args.prompt_length))
            first_call_s, warm_s = first_and_warm_seconds(model, params, ids, args.new_tokens)
            compile_s = first_call_s - warm_s
            runners = {"flax_gpt2": flax_runner(model, params, ids)}
            if not args.no_torch:
                runners = {"transformers PyTorch": torch_runner(torch_model, ids), **runners}
            results = bench(runners, batch, args.new_tokens, args.repeats)
            results["flax_gpt2"].update(compile_s=compile_s, first_call_s=first_call_s)
            if not args.no_torch:
                ref, ours = results["transformers PyTorch"], results["flax_gpt2"]
                ours["vs"] = ours["tok_s"] / ref["tok_s"]
            for name, r in results.items():
                print(f"{name:<22}{dtype:<10}{batch:>6}{r['tok_s']:>9.1f}{r['step_ms']:>9.1f}{r['ttft_ms']:>9.1f}"
                      f"{r.get('compile_s', float('nan')):>11.2f}{r.get('first_call_s', float('nan')):>11.2f}"
                      + (f"{r['vs']:>9.2f}x" if "vs" in r else ""))
            if not args.no_torch:
                agree = (ours["tokens"] == ref["tokens"]).all(axis=1).mean()
                print(f"{'':<22}greedy tokens identical in {agree:.0%} of rows")
        hf_model.float()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    from flax_gpt2.utils import cli

    sys.exit(cli.run(main, prog="benchmarks/decode.py"))  # the CLI conventions (README)

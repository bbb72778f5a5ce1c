"""Multi-adapter serving throughput: requests for several LoRA adapters in one decoding batch, versus the same
requests all for one adapter, versus the base model alone.

    python benchmarks/lora_serving.py                          # gpt2-124M shape, random weights
    python benchmarks/lora_serving.py --preset gpt2 --requests 8 --adapters 4 --max_tokens 32

Drives `flax_gpt2.serve.engine.Engine` directly (no HTTP): `--requests` greedy requests (random 12-token
prompts, `--max_tokens` new tokens each) are submitted at once to an engine of `--requests` slots, so they
decode together. Rows of the table:

  base, plain engine     the engine without adapters (what `serve` runs with no --adapter)
  base, adapter engine   the same requests on an engine serving `--adapters` adapters, all for the base (row 0)
  one adapter            all requests for adapter 1
  N adapters mixed       requests spread round-robin over the N adapters

Adapters: random (init_lora, then a random B), ranks 8 and 16 alternating, half on `c_attn` alone and half
on every module (c_attn, both c_proj, c_fc), so the table is padded to rank 16 over every module: the
branch costs the same for every row, whatever adapter it has. Both engines are warmed up (compiled), each
configuration is run once untimed, then `--repeats` rounds of all of them; each one's best wall time is reported
(tokens/s = all new tokens / wall time, prefills included) with its ratio to the plain engine's.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import threading
import time

import jax
import numpy as np

from flax_gpt2 import GPT2Config, GPT2LMHeadModel, LoRAConfig, get_tokenizer, init_lora, init_params
from flax_gpt2.serve.engine import Engine
from flax_gpt2.serve.protocol import CompletionRequest
from flax_gpt2.serve.requests import Completion
from flax_gpt2.utils import cli

PROMPT_TOKENS = 12


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def make_adapters(model, params, count: int, seed: int) -> dict:
    adapters = {}
    for i in range(count):
        targets = ("c_attn",) if i % 2 == 0 else ("c_attn", "c_proj", "c_fc")
        lora = LoRAConfig(rank=8 if i % 2 == 0 else 16, alpha=16, targets=targets)
        tree = init_lora(jax.random.PRNGKey(seed + i), params, model.config, lora)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        keys = jax.random.split(jax.random.PRNGKey(seed + 100 + i), len(leaves))
        tree = jax.tree_util.tree_unflatten(treedef, [
            0.02 * jax.random.normal(k, x.shape) if p[-1].key == "lora_b" else x for k, (p, x) in zip(keys, leaves)])
        adapters[f"adapter{i + 1}"] = (tree, lora)
    return adapters


def run_requests(engine: Engine, adapter_rows: list[int], max_tokens: int, seed: int) -> tuple[float, int]:
    """Submits one greedy request per entry of `adapter_rows` (its adapter index) at once; returns (seconds, tokens)."""
    rng = np.random.RandomState(seed)
    done, lock, tokens = threading.Event(), threading.Lock(), [0]
    left = [len(adapter_rows)]

    def deliver(event):
        if event.error is not None:
            raise RuntimeError(event.error)
        if event.finish_reason is not None:
            with lock:
                tokens[0] += event.completion_tokens
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    completions = []
    for row in adapter_rows:
        ids = rng.randint(0, 50256, PROMPT_TOKENS).tolist()
        request = CompletionRequest(model="bench", prompts=[ids], max_tokens=max_tokens, temperature=0)
        completions.append(Completion(request, [ids], [""], deliver, adapter=row))
    start = time.perf_counter()
    for completion in completions:
        engine.submit(completion)
    if not done.wait(600):
        raise RuntimeError("the requests did not finish within 600 s")
    return time.perf_counter() - start, tokens[0]


def serving_rows(preset: str = "gpt2", requests: int = 8, num_adapters: int = 4, max_tokens: int = 32,
                 repeats: int = 3, seed: int = 0) -> list[dict]:
    """The table's rows: `{"config", "tokens", "seconds", "tokens_per_s", "ratio"}` (ratio to the plain engine)."""
    config = GPT2Config.from_preset(preset)
    model = GPT2LMHeadModel(config)
    params = init_params(model, jax.random.PRNGKey(seed))
    tokenizer = get_tokenizer()
    adapters = make_adapters(model, params, num_adapters, seed)
    kwargs = dict(max_batch=requests, context_length=PROMPT_TOKENS + max_tokens + 4, prompt_buckets=[16],
                  decode_steps=8)
    plain = Engine(model, params, tokenizer, **kwargs)
    served = Engine(model, params, tokenizer, adapters=adapters, **kwargs)
    cases = [("base, plain engine", plain, [0] * requests),
             ("base, adapter engine", served, [0] * requests),
             ("one adapter", served, [1] * requests),
             (f"{num_adapters} adapters mixed", served, [1 + i % num_adapters for i in range(requests)])]
    rows = []
    try:
        for engine in (plain, served):
            # Every cache size compiled: how many requests the engine admits together varies from run to run.
            engine.warm_up()
            engine.start()
        for _, engine, adapter_rows in cases:
            run_requests(engine, adapter_rows, max_tokens, seed)  # untimed
        # (Each engine counts every compile in the process after its own warm-up, the other's included.)
        compiles = plain.stats.compiles_after_warmup + served.stats.compiles_after_warmup
        # Round-robin repeats, best of each: a burst of load from other processes hits every case alike.
        times = [[run_requests(engine, adapter_rows, max_tokens, seed + 1 + r) for _, engine, adapter_rows in cases]
                 for r in range(repeats)]
        for i, (name, _, _) in enumerate(cases):
            seconds, tokens = min(t[i] for t in times)
            rows.append({"config": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds})
        if plain.stats.compiles_after_warmup + served.stats.compiles_after_warmup != compiles:
            raise RuntimeError("an engine compiled after its warm-up: the timings include compiles")
    finally:
        plain.stop()
        served.stop()
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cli.skip_absent_tpu()  # on a CPU machine with libtpu installed: the CPU, without libtpu's errors
    start = time.perf_counter()
    rows = serving_rows(args.preset, args.requests, args.adapters, args.max_tokens, args.repeats)
    print(f"{args.preset}, random weights; {args.requests} concurrent greedy requests x {args.max_tokens} new tokens "
          f"(prompt {PROMPT_TOKENS}); {cpu_name()}, {jax.device_count()} {jax.default_backend()} device(s)")
    print("| configuration | tokens | seconds | tokens/s | vs plain |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['tokens']} | {row['seconds']:.2f} | {row['tokens_per_s']:.1f} | "
              f"{row['ratio']:.2f} |")
    print(f"(benchmark run: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

"""Speculative decoding with a target/draft pair trained here on Tiny Shakespeare (not random weights): the
acceptance rate per draft position and tokens/s of plain greedy decoding vs a draft model (several k, and the
heuristic schedule) vs prompt lookup, at batch 1 and 8, greedy outputs asserted identical. One run.

    python benchmarks/speculative_trained.py                      # trains the pair once (cached), then measures
    python benchmarks/speculative_trained.py --target_layers 8 --target_width 384 --steps 400

Both models are trained by the training app (`python -m flax_gpt2.train`, configs/shakespeare.py with the
shape, steps and batch overridden) into `$FLAX_GPT2_CACHE/speculative_pair/<shape>-<steps>/`; a finished run
there (its result.json) is reused. The prompts are windows of the held-out last 10% of the play; the draft
never saw them either.

Why the pair is shaped as it is: on a CPU a decode step of a small model is dominated by reading the weights,
and for GPT-2's 50,257-token vocabulary the tied embedding is most of them (50,257 x width). A draft only
pays if it is much cheaper than the target, so the draft is narrow as well as shallow. The "draft alone" row
gives c, a draft step's cost in target steps: with acceptance rate a, k proposals cost k*c + (a (k+1)-token
target call) and yield (1 - a^(k+1)) / (1 - a) tokens, so the speed-up needs c well under a.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from compile_time import cpu_name  # run as a script: benchmarks/ is on the path
from speculative import best_seconds

import flax_gpt2
from flax_gpt2.configs import base
from flax_gpt2.generation import generate
from flax_gpt2.generation.speculative import speculative_generate
from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer
from flax_gpt2.utils.cache_root import cache_root

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "shakespeare.py")


def trained(name: str, layers: int, width: int, heads: int, steps: int, batch: int, seq_len: int) -> str:
    """The run folder of a model of this shape trained `steps` steps on Tiny Shakespeare (trained now unless a
    finished run is cached)."""
    shape = f"{name}-{layers}x{width}h{heads}-{steps}x{batch}x{seq_len}"
    workdir = os.path.join(cache_root(), "speculative_pair", shape)
    if os.path.exists(os.path.join(workdir, "result.json")):
        print(f"reusing {workdir}", flush=True)
        return workdir
    print(f"training the {name} ({layers}x{width}, {steps} steps of {batch}x{seq_len}) into {workdir}", flush=True)
    overrides = dict(n_layer=layers, n_embd=width, n_head=heads)
    argv = [sys.executable, "-m", "flax_gpt2.train", "--config", CONFIG, "--workdir", workdir,
            f"--config.steps={steps}", f"--config.batch_size={batch}", f"--config.data.seq_len={seq_len}",
            f"--config.checkpoint_every={steps}", f"--config.eval_every={steps}", "--config.sample.prompt=",
            f"--config.optimizer.warmup_steps={min(100, steps // 5)}"]
    argv += [f"--config.model.{k}={v}" for k, v in overrides.items()]
    subprocess.run(argv, check=True)
    return workdir


def add_pair_arguments(parser: argparse.ArgumentParser, *, target: tuple[int, int, int],
                       draft: tuple[int, int, int], steps: int) -> None:
    """The pair's shapes (layers, width, heads) and training flags, with these defaults."""
    for name, (layers, width, heads) in (("target", target), ("draft", draft)):
        parser.add_argument(f"--{name}_layers", type=int, default=layers)
        parser.add_argument(f"--{name}_width", type=int, default=width)
        parser.add_argument(f"--{name}_heads", type=int, default=heads)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)


def trained_pair(args: argparse.Namespace) -> tuple[str, str]:
    """The run folders of the target and the draft of `add_pair_arguments`' flags (`trained`)."""
    return tuple(trained(name, getattr(args, f"{name}_layers"), getattr(args, f"{name}_width"),
                         getattr(args, f"{name}_heads"), args.steps, args.batch_size, args.seq_len)
                 for name in ("target", "draft"))


def held_out_prompts(tokenizer, count: int, length: int) -> np.ndarray:
    """`count` windows of `length` tokens spread over the last 10% of Tiny Shakespeare (the runs' eval split)."""
    with open(base.demo_path("data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    tokens = np.array(tokenizer.encode(text[int(len(text) * 0.9):]), np.int32)
    starts = np.linspace(0, len(tokens) - length - 1, count).astype(int)
    return np.stack([tokens[s:s + length] for s in starts])


def per_position(stats: dict) -> str:
    """P(the i-th proposal is kept | a round reached it), i = 1..k, over all rows' rounds."""
    counts = stats["kept_counts"].sum(0)  # rounds that kept 0..k
    reached = counts[::-1].cumsum()[::-1]  # rounds that kept >= i
    return " ".join(f"{reached[i] / max(reached[i - 1], 1):.2f}" for i in range(1, len(counts)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_arguments(parser, target=(6, 256, 8), draft=(1, 64, 2), steps=300)
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--lookup_ngram", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    target_dir, draft_dir = trained_pair(args)
    target, target_params = flax_gpt2.from_pretrained(target_dir, progress=False)
    draft, draft_params = flax_gpt2.from_pretrained(draft_dir, progress=False)
    losses = [json.load(open(os.path.join(d, "result.json"))).get("eval_loss") for d in (target_dir, draft_dir)]
    tokenizer = get_tokenizer()
    n = args.new_tokens
    print(f"{cpu_name()}; jax {jax.__version__} on {jax.default_backend()}, load average {os.getloadavg()[0]:.2f}")
    print(f"target {args.target_layers}x{args.target_width} (eval loss {losses[0]}), draft "
          f"{args.draft_layers}x{args.draft_width} (eval loss {losses[1]}); {args.steps} steps each; prompt "
          f"{args.prompt_length} held-out tokens, {n} new tokens, greedy")
    print(f"{'batch':>5} {'proposer':<26} {'tokens/s':>9} {'ratio':>6} {'accepted':>8} {'tok/call':>8}  "
          "kept at position 1..k")
    for batch in args.batches:
        ids = held_out_prompts(tokenizer, batch, args.prompt_length)
        reference = generate(target, target_params, ids, max_new_tokens=n)
        plain = best_seconds(lambda: generate(target, target_params, ids, max_new_tokens=n), args.repeats)
        print(f"{batch:>5} {'plain greedy':<26} {batch * n / plain:9.1f} {1.0:6.2f}", flush=True)
        # The cost model of Leviathan et al.: c = a draft step's time over a target step's (both decoding alone).
        draft_alone = best_seconds(lambda: generate(draft, draft_params, ids, max_new_tokens=n), args.repeats)
        print(f"{batch:>5} {'draft alone':<26} {batch * n / draft_alone:9.1f} {plain / draft_alone:6.2f}"
              f"  (c = {draft_alone / plain:.2f} of a target step)", flush=True)
        rows = [(f"draft k={k}", dict(draft=(draft, draft_params), num_draft_tokens=k)) for k in args.ks]
        rows.append((f"draft k<={max(args.ks)} heuristic", dict(draft=(draft, draft_params),
                                                               num_draft_tokens=max(args.ks),
                                                               draft_schedule="heuristic")))
        rows += [(f"lookup n={args.lookup_ngram} k={k}", dict(prompt_lookup_ngram=args.lookup_ngram,
                                                            num_draft_tokens=k)) for k in (2, 4)]
        for name, kwargs in rows:
            out, stats = speculative_generate(target, target_params, ids, max_new_tokens=n, return_stats=True,
                                              **kwargs)
            np.testing.assert_array_equal(out, reference, err_msg=f"{name}: speculative greedy differs from plain")
            seconds = best_seconds(lambda: speculative_generate(target, target_params, ids, max_new_tokens=n,
                                                                **kwargs), args.repeats)
            rate = stats["accepted"].sum() / max(stats["proposed"].sum(), 1)
            per_call = batch * n / max(int(stats["rounds"].sum()), 1)
            print(f"{batch:>5} {name:<26} {batch * n / seconds:9.1f} {plain / seconds:6.2f} {rate:8.2f} "
                  f"{per_call:8.2f}  {per_position(stats)}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()

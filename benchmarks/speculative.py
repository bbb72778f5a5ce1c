"""Speculative decoding speed (skeleton): plain greedy `generate` vs speculative decoding with a draft model
(several k) vs prompt lookup, batch 1, random-init models, one run.

    python benchmarks/speculative.py                               # gpt2-124M-shaped target, 2-layer draft
    python benchmarks/speculative.py --target_layers 6 --n_embd 384 --new_tokens 64 --ks 2 4

Greedy, EOS disabled; every speculative run is asserted identical to plain greedy decoding. Reported per
row: tokens/s (new tokens / wall time of one call, best of `--repeats` after a warm-up), the acceptance rate
(kept / proposed drafts) and the mean tokens per target call.

Random weights are the honest caveat: an independent random draft agrees with a random target's argmax
about as often as chance (acceptance ~0), so its rows measure the cost of the mechanism (k draft steps and a
(k+1)-token verification per emitted token), not a speed-up. The "self" row (the target drafting for itself)
always accepts, which bounds what the bookkeeping allows. Prompt lookup is the one row where random models
can gain: random greedy text falls into loops that lookup predicts. A trained target/draft pair (issue 23) is
what shows real acceptance rates.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from flax_gpt2 import GPT2Config, GPT2LMHeadModel, init_params
from flax_gpt2.generation import generate
from flax_gpt2.generation.speculative import speculative_generate


def best_seconds(run, repeats: int) -> float:
    """Best wall time of `run()` over `repeats` calls after a warm-up (compilation) call: on a shared
    machine other processes only ever add time."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target_layers", type=int, default=12)
    parser.add_argument("--draft_layers", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--draft_n_embd", type=int, default=None, help="default: --n_embd")
    parser.add_argument("--vocab_size", type=int, default=50257)
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--lookup_ngram", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--init", type=float, default=0.02, help="initializer_range of both random models")
    args = parser.parse_args(argv)

    def model(layers, width, seed):
        config = GPT2Config(vocab_size=args.vocab_size, n_embd=width, n_layer=layers, n_head=args.n_head,
                            initializer_range=args.init)
        m = GPT2LMHeadModel(config)
        return m, init_params(m, jax.random.PRNGKey(seed))

    target, target_params = model(args.target_layers, args.n_embd, 0)
    draft, draft_params = model(args.draft_layers, args.draft_n_embd or args.n_embd, 1)
    ids = np.random.default_rng(0).integers(0, args.vocab_size, (1, args.prompt_length))
    n = args.new_tokens
    print(f"jax {jax.__version__} on {jax.default_backend()}, load average {os.getloadavg()[0]:.2f}; "
          f"target {args.target_layers}x{args.n_embd}, draft {args.draft_layers}x{args.draft_n_embd or args.n_embd}, "
          f"vocab {args.vocab_size}, prompt {args.prompt_length}, {n} new tokens, batch 1")

    reference = generate(target, target_params, ids, max_new_tokens=n)
    seconds = best_seconds(lambda: generate(target, target_params, ids, max_new_tokens=n), args.repeats)
    print(f"{'plain greedy':<28} {n / seconds:8.1f} tokens/s")

    rows = [(f"draft k={k}", dict(draft=(draft, draft_params), num_draft_tokens=k)) for k in args.ks]
    rows.append(("self-draft k=4 (acc. 1)", dict(draft=(target, target_params), num_draft_tokens=4)))
    rows += [(f"prompt lookup n={args.lookup_ngram} k={k}", dict(prompt_lookup_ngram=args.lookup_ngram,
                                                                 num_draft_tokens=k)) for k in args.ks]
    for name, kwargs in rows:
        out, stats = speculative_generate(target, target_params, ids, max_new_tokens=n, return_stats=True, **kwargs)
        np.testing.assert_array_equal(out, reference, err_msg=f"{name}: speculative greedy differs from plain")
        seconds = best_seconds(lambda: speculative_generate(target, target_params, ids, max_new_tokens=n, **kwargs),
                               args.repeats)
        per_call = n / max(int(stats["rounds"][0]), 1)
        print(f"{name:<28} {n / seconds:8.1f} tokens/s  acceptance {stats['acceptance_rate'][0]:.2f}  "
              f"{per_call:.2f} tokens per target call")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

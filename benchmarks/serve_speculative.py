"""`serve --draft_model` against the plain server: tokens/s of greedy requests through the engine (the server's
continuous batching, no HTTP), with a target/draft pair trained here on Tiny Shakespeare
(`speculative_trained.trained`, cached), outputs asserted identical. One run.

    python benchmarks/serve_speculative.py --new_tokens 128     # a 4x128 target, a 1x32 draft, 150 steps each

Rows: `concurrent` greedy requests submitted at once (1: one stream alone; more: they share the decoding
batch), each of `new_tokens` tokens after a held-out prompt; the same with half of them, then all, sampled
(seeded, temperature `--temperature`): they share the batch without drafting, or draft too with
`--draft_sampled` ("+sampled": the rejection rule, other samples of the same distribution, so only the greedy
texts are compared there). Tokens/s counts every request's tokens over the wall time from the first submit to
the last finish; the ratio is against the plain engine in the same run.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import jax
import numpy as np
from compile_time import cpu_name  # run as a script: benchmarks/ is on the path
from speculative_trained import add_pair_arguments, held_out_prompts, trained_pair

import flax_gpt2
from flax_gpt2.serve.engine import Engine
from flax_gpt2.serve.protocol import CompletionRequest
from flax_gpt2.serve.requests import Completion
from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer


def run_requests(engine: Engine, prompts: np.ndarray, new_tokens: int, sampled: int,
                 temperature: float) -> tuple[float, list[str]]:
    """Submits every prompt at once (the first `sampled` of them sampled with a seed, the rest greedy) and
    waits for all; returns (seconds, texts)."""
    done = [threading.Event() for _ in prompts]
    texts = [[] for _ in prompts]

    def deliver(i):
        def on_event(event):
            if event.error is not None:
                raise RuntimeError(event.error)
            texts[i].append(event.text)
            if event.finish_reason is not None:
                done[i].set()
        return on_event

    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        ids = ids.tolist()
        request = CompletionRequest(model="m", prompts=[ids], max_tokens=new_tokens,
                                    temperature=temperature if i < sampled else 0, seed=i)
        engine.submit(Completion(request, [ids], [""], deliver(i)))
    for event in done:
        assert event.wait(600), "a request did not finish"
    return time.perf_counter() - start, ["".join(t) for t in texts]


def best(engine, prompts, new_tokens, sampled, temperature, repeats):
    runs = [run_requests(engine, prompts, new_tokens, sampled, temperature) for _ in range(repeats)]
    return min(s for s, _ in runs), runs[0][1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pair_arguments(parser, target=(4, 128, 4), draft=(1, 32, 2), steps=150)
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--concurrent", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--decode_steps", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0, help="of the sampled requests")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    target_dir, draft_dir = trained_pair(args)
    target = flax_gpt2.from_pretrained(target_dir, progress=False)
    draft = flax_gpt2.from_pretrained(draft_dir, progress=False)
    tokenizer = get_tokenizer()
    context = args.prompt_length + args.new_tokens
    common = dict(max_batch=max(args.concurrent), context_length=context, prompt_buckets=[args.prompt_length],
                  decode_steps=args.decode_steps, prefix_cache_bytes=0)
    engines = {"plain": Engine(*target, tokenizer, **common)}
    for k in args.ks:
        engines[f"draft k={k}"] = Engine(*target, tokenizer, draft=draft, num_draft_tokens=k, **common)
        engines[f"k={k} +sampled"] = Engine(*target, tokenizer, draft=draft, num_draft_tokens=k, draft_sampled=True,
                                            **common)
    for engine in engines.values():  # (all warmed up before any starts watching for later compiles)
        engine.warm_up()
    for engine in engines.values():
        engine.start()
    print(f"{cpu_name()}; jax {jax.__version__} on {jax.default_backend()}, load average {os.getloadavg()[0]:.2f}")
    print(f"target {args.target_layers}x{args.target_width}, draft {args.draft_layers}x{args.draft_width}, "
          f"{args.steps} steps each on Tiny Shakespeare; prompt {args.prompt_length} held-out tokens, "
          f"{args.new_tokens} new; --decode_steps {args.decode_steps}; sampled at temperature {args.temperature}")
    print(f"{'requests':<22} {'server':<14} {'tokens/s':>9} {'ratio':>6} {'accepted':>8}")
    for n in args.concurrent:
        prompts = held_out_prompts(tokenizer, n, args.prompt_length)
        for sampled in sorted({0, n // 2, n}):
            label = f"{n} at once" + (f", {sampled} sampled" if sampled else ", greedy")
            base, texts = best(engines["plain"], prompts, args.new_tokens, sampled, args.temperature, args.repeats)
            print(f"{label:<22} {'plain':<14} {n * args.new_tokens / base:9.1f} {1.0:6.2f}", flush=True)
            for name, engine in engines.items():
                if name == "plain" or (engine.draft_sampled and not sampled):
                    continue
                before = (engine.stats.draft_proposed, engine.stats.draft_accepted)
                seconds, spec_texts = best(engine, prompts, args.new_tokens, sampled, args.temperature, args.repeats)
                compared = slice(sampled if engine.draft_sampled else 0, None)  # greedy only, with --draft_sampled
                assert spec_texts[compared] == texts[compared], f"{name}: the texts differ from the plain server's"
                proposed = engine.stats.draft_proposed - before[0]
                accepted = engine.stats.draft_accepted - before[1]
                print(f"{'':<22} {name:<14} {n * args.new_tokens / seconds:9.1f} {base / seconds:6.2f} "
                      f"{accepted / max(proposed, 1):8.2f}", flush=True)
    for engine in engines.values():
        engine.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()

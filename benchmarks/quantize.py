"""int8 weight-only quantization vs float32: decode speed at batch 1, parameter bytes, bytes read per step; one run.

    python benchmarks/quantize.py                     # gpt2-124M shape, random weights, prompt 32, 64 new tokens
    python benchmarks/quantize.py --preset gpt2-medium --new_tokens 32 --repeats 2
    python benchmarks/quantize.py --perplexity_model RUN    # also: held-out perplexity of a trained model, fp32 vs int8

Greedy decoding (`flax_gpt2.generate`, EOS disabled) of the same random GPT-2 with float32 weights and with
`quantize_params` applied (the block matrices and `wte` int8, one float32 scale per output channel / vocabulary
row). Reported per variant: tokens/s (new tokens / wall time of one `generate` call, best of `--repeats` after a
warm-up; prefill included), ms per step, the parameter bytes (measured from the arrays), the parameter bytes
one decode step reads (every array but `wpe`, of which it reads one row) and what that is per second. The
ratios int8 / float32 close the table.

A decode step at batch 1 is bound by reading the weights, so int8 pays off where the matmul reads int8 from
memory (TPU: XLA folds the convert into the dot; see `flax_gpt2.modeling.quantize`). XLA's CPU backend
converts the int8 weights to float32 in a pass of its own before its library dot (whatever int8 dot
instructions the CPU has, e.g. AVX512-VNNI, go unused), so on a CPU int8 decodes no faster than float32 and
may be slower: the table says how much. Takes about 2 minutes on a 2-core CPU.

`--perplexity_model` (a training run or model folder) adds the perplexity of that model on Tiny Shakespeare's
last 10% (the demo configs' held-out split with `data.val_fraction=0.1`), float32 vs int8, and the rate at
which both choose the same next token.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax  # noqa: E402
import numpy as np  # noqa: E402
from compile_time import cpu_name  # noqa: E402
from speculative import best_seconds  # noqa: E402

import flax_gpt2  # noqa: E402
from flax_gpt2 import GPT2Config, GPT2LMHeadModel, generate  # noqa: E402
from flax_gpt2.assets import TINYSHAKESPEARE, path as asset_path  # noqa: E402
from flax_gpt2.checkpoints.loading import model_tokenizer  # noqa: E402
from flax_gpt2.checkpoints.pretrained import resolve  # noqa: E402
from flax_gpt2.evaluation.perplexity import make_scorer, perplexity  # noqa: E402
from flax_gpt2.modeling.model import init_params  # noqa: E402
from flax_gpt2.modeling.quantize import parameter_bytes, quantize_params  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))



MB = 1e6


def int8_dot_flags() -> str:
    """The CPU's int8 dot-product instruction sets (from /proc/cpuinfo), for the note under the table."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return "unknown"
    found = [name for name in ("avx512_vnni", "avx_vnni", "amx_int8") if name in flags]
    return ", ".join(found) or "none"


def step_bytes(params, config) -> int:
    """Parameter bytes one decode step reads: everything but `wpe`, of which it reads one row."""
    wpe = params["transformer"]["wpe"]["embedding"]
    return parameter_bytes(params) - parameter_bytes(wpe) + config.n_embd * wpe.dtype.itemsize


def held_out_perplexity(name: str) -> None:
    """Prints float32 vs int8 perplexity on Tiny Shakespeare's last 10% and the greedy next-token agreement."""
    model, params = flax_gpt2.from_pretrained(name, progress=False)
    _, int8_params = flax_gpt2.from_pretrained(name, quantize="int8", progress=False)
    with open(asset_path(TINYSHAKESPEARE), encoding="utf-8") as f:
        text = f.read()
    tokens = model_tokenizer(resolve(name)).encode(text[int(0.9 * len(text)):])
    window = min(256, model.config.n_positions)
    score = make_scorer(model)
    result = {}
    for label, p in (("float32", params), ("int8", int8_params)):
        result[label] = perplexity(model, p, tokens, stride=window // 2, window_length=window, progress=False,
                                   scorer=score)["perplexity"]
    rows = len(tokens) // window
    ids = np.asarray(tokens[:rows * window], np.int32).reshape(rows, window)
    greedy = jax.jit(lambda p, x: model.apply({"params": p}, x).logits.argmax(-1))
    agree = np.mean(np.concatenate([np.asarray(greedy(params, ids[i:i + 8]) == greedy(int8_params, ids[i:i + 8]))
                                    .ravel() for i in range(0, rows, 8)]))
    print(f"{name}: Tiny Shakespeare last 10% ({len(tokens):,} tokens, window {window}, stride {window // 2}): "
          f"perplexity float32 {result['float32']:.3f}, int8 {result['int8']:.3f} "
          f"({result['int8'] / result['float32'] - 1:+.2%}); greedy next token equal at {agree:.1%} of positions\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2", help="flax_gpt2 preset whose shape to use")
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--perplexity_model", default=None, help="a trained model (run or folder) to score on "
                        "Tiny Shakespeare's last 10%%, float32 vs int8")
    args = parser.parse_args(argv)
    if args.perplexity_model:
        held_out_perplexity(args.perplexity_model)

    config = GPT2Config.from_preset(args.preset)
    model = GPT2LMHeadModel(config)
    float_params = init_params(model, jax.random.key(0))
    int8_params = quantize_params(float_params)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt_length))
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}: {cpu_name()}; int8 dot instructions: "
          f"{int8_dot_flags()}; load average {os.getloadavg()[0]:.2f}")
    print(f"{args.preset} (random weights): batch 1, prompt {args.prompt_length}, {args.new_tokens} new tokens, "
          f"greedy\n")
    print(f"{'weights':<10}{'tok/s':>8}{'ms/step':>9}{'param MB':>10}{'MB/step':>9}{'GB/s read':>11}")
    rows, tokens = {}, {}
    for name, params in (("float32", float_params), ("int8", int8_params)):
        run = lambda p=params: generate(model, p, ids, max_new_tokens=args.new_tokens,  # noqa: E731
                                        do_sample=False, eos_token_id=None)
        tokens[name] = run()
        seconds = best_seconds(run, args.repeats)
        per_step = step_bytes(params, config)
        rows[name] = dict(tok_s=args.new_tokens / seconds, ms=1e3 * seconds / args.new_tokens,
                          mb=parameter_bytes(params) / MB, step_mb=per_step / MB,
                          gbs=per_step * args.new_tokens / seconds / 1e9)
        r = rows[name]
        print(f"{name:<10}{r['tok_s']:>8.1f}{r['ms']:>9.1f}{r['mb']:>10.1f}{r['step_mb']:>9.1f}{r['gbs']:>11.2f}")
    ratio = {k: rows["int8"][k] / rows["float32"][k] for k in rows["int8"]}
    print(f"{'int8/fp32':<10}{ratio['tok_s']:>7.2f}x{ratio['ms']:>8.2f}x{ratio['mb']:>9.3f}x{ratio['step_mb']:>8.3f}x"
          f"{ratio['gbs']:>10.2f}x")
    new = slice(args.prompt_length, None)
    agree = float(np.mean(tokens["int8"][:, new] == tokens["float32"][:, new]))
    print(f"\ngreedy tokens equal to float32's at {agree:.0%} of the {args.new_tokens} positions (random weights have "
          f"near-ties: less would not mean an error); load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    from flax_gpt2.utils import cli

    sys.exit(cli.run(main, prog="benchmarks/quantize.py"))

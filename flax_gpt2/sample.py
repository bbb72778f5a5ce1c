"""Generate text from the command line.

    python -m flax_gpt2.sample --model gpt2 --prompt "Hello, I'm a language model,"
    echo "Once upon a time" | python -m flax_gpt2.sample --model gpt2 --max_new_tokens 50 --seed 1
    python -m flax_gpt2.sample --model runs/my-run --prompt "<|endoftext|> kid, room, dance:" --stop_token "."
    python -m flax_gpt2.sample --model gpt2 --adapter my-lora --prompt "Hello"    # a PEFT LoRA adapter, merged
    python -m flax_gpt2.sample --model gpt2-large --draft_model distilgpt2 --num_draft_tokens 4 --greedy
    python -m flax_gpt2.sample --model gpt2 --prompt_lookup 3 --prompt "..." --greedy    # no draft model
    python -m flax_gpt2.sample --model gpt2 --quantize int8 --prompt "Hello"    # int8 weights, ~0.26x the bytes

`--model` is a hub id, a Hugging Face folder, or a flax_gpt2 training run. Sampling (top-k 50, as
transformers' defaults) unless `--greedy`, or beam search with `--num_beams`; the same `--seed` gives the
same text. A single sequence is printed as it is generated. Models that need converting (PyTorch `.bin`,
Flax msgpack, training runs) are converted once and cached (`flax_gpt2.checkpoints.loading`), and the
compiled decode loop goes to JAX's persistent compilation cache, both under `$FLAX_GPT2_CACHE` (default
`~/.cache/flax_gpt2`), so the next start is fast.

`<|endoftext|>` is the only special token recognised in a prompt. Errors are one line on stderr (exit 2
for a bad flag, 1 otherwise); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from flax_gpt2.checkpoints.loading import load_model
from flax_gpt2.generation.options import MAX_SEED, MIN_TEMPERATURE
from flax_gpt2.generation.speculative import DRAFT_SCHEDULES
from flax_gpt2.generation.text import generate_text
from flax_gpt2.modeling.quantize import QUANTIZE_MODES
from flax_gpt2.utils import cli
from flax_gpt2.utils.compilation_cache import enable_compilation_cache
from flax_gpt2.utils.dtypes import DTYPES

PROG = "python -m flax_gpt2.sample"


_positive_int = cli.flag_type(int, lambda n: n >= 1, "a positive integer")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog="The prompt is read from stdin when --prompt is not given. "
                                            "--debug shows the traceback of an error.")
    parser.add_argument("--model", default="gpt2", help="hub id, Hugging Face folder, or training run folder")
    parser.add_argument("--adapter", default=None,
                        help="a PEFT LoRA adapter folder for --model, merged into its weights on load")
    parser.add_argument("--prompt", default=None, help="the text to continue (default: read stdin)")
    parser.add_argument("--max_new_tokens", "--length", dest="max_new_tokens", type=_positive_int, default=20,
                        help="tokens to generate (default 20)")
    parser.add_argument("--temperature", default=1.0, help="sampling temperature, at least 1e-4 (default 1.0)",
                        type=cli.flag_type(float, lambda t: t >= MIN_TEMPERATURE,
                                           f"at least {MIN_TEMPERATURE:g} (for the most likely token, use --greedy)"))
    parser.add_argument("--top_k", "--k", dest="top_k", default=50, help="0 disables (default 50)",
                        type=cli.flag_type(int, lambda k: k >= 0, "an integer >= 0 (0 disables top-k)"))
    parser.add_argument("--top_p", "--p", dest="top_p", default=1.0, help="1.0 disables (default)",
                        type=cli.flag_type(float, lambda p: 0 < p <= 1, "in (0, 1] (1 disables top-p)"))
    parser.add_argument("--repetition_penalty", default=1.0, help="> 1 discourages repeats; 1.0 disables (default)",
                        type=cli.flag_type(float, lambda x: x > 0, "a number > 0 (1 disables it)"))
    parser.add_argument("--num_return_sequences", type=_positive_int, default=1)
    parser.add_argument("--num_beams", type=_positive_int, default=1, help="> 1: beam search (no sampling)")
    parser.add_argument("--stop_token", default=None, help="cut each text just before this string")
    parser.add_argument("--seed", default=0, help="random seed, 0 to 2**32 - 1 (default 0, as generate's)",
                        type=cli.flag_type(int, lambda n: 0 <= n <= MAX_SEED, "an integer from 0 to 2**32 - 1"))
    parser.add_argument("--greedy", action="store_true", help="most likely token instead of sampling")
    parser.add_argument("--draft_model", default=None,
                        help="speculative decoding: a smaller GPT-2 with the same tokenizer proposes tokens (hub id, "
                             "folder or run); greedy output is the target's own, sampled keeps its distribution")
    parser.add_argument("--prompt_lookup", dest="prompt_lookup_ngram", default=None, metavar="N",
                        type=_positive_int, help="speculative decoding without a draft model: propose what "
                                                 "followed the last matching N-gram of the prompt and text")
    parser.add_argument("--num_draft_tokens", type=_positive_int, default=4,
                        help="tokens proposed per target step with --draft_model or --prompt_lookup (default 4; "
                             "the most, with --draft_schedule heuristic)")
    parser.add_argument("--draft_schedule", default="constant", choices=DRAFT_SCHEDULES,
                        help="with --draft_model: 'heuristic' adapts the proposals per step (1 to "
                             "--num_draft_tokens) to how many the target kept; the output is the same")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="compute dtype (bfloat16 pays off on TPU/GPU, not on CPU)")
    parser.add_argument("--param_dtype", default=None, choices=sorted(DTYPES),
                        help="dtype the weights are kept in (default: the same as --dtype)")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_MODES,
                        help="int8: int8 weight-only quantization of --model (and --draft_model) on load")
    parser.add_argument("--cache_dir", default=None, help="default $FLAX_GPT2_CACHE or ~/.cache/flax_gpt2")
    parser.add_argument("--no_progress", dest="progress", action="store_false", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.greedy and args.num_beams == 1 and args.num_return_sequences > 1:
        parser.error("--greedy gives one sequence; drop it to sample several, or use --num_beams")
    if args.draft_model is not None and args.prompt_lookup_ngram is not None:
        parser.error("--draft_model and --prompt_lookup are two ways to propose tokens: choose one")
    if args.draft_schedule != "constant" and args.draft_model is None:
        parser.error("--draft_schedule adapts a draft model's steps: it needs --draft_model")
    speculative = args.draft_model is not None or args.prompt_lookup_ngram is not None
    for flag, value, default in (("--num_beams", args.num_beams, 1),
                                 ("--num_return_sequences", args.num_return_sequences, 1),
                                 ("--repetition_penalty", args.repetition_penalty, 1.0)):
        if speculative and value != default:
            parser.error(f"{flag} does not go with speculative decoding (--draft_model / --prompt_lookup): "
                         f"drop one of them")
    if args.num_beams > 1 and args.num_return_sequences > args.num_beams:
        parser.error(f"--num_return_sequences ({args.num_return_sequences}) cannot exceed "
                     f"--num_beams ({args.num_beams})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (arguments as in `--help`, plus `--debug`); returns the exit code (see
    `flax_gpt2.utils.cli`)."""
    return cli.run(_main, argv, prog=PROG)


def _main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.progress else (lambda msg: None)
    enable_compilation_cache(args.cache_dir)
    prompt = args.prompt if args.prompt is not None else _read_stdin()
    model, params, tokenizer = load_model(args.model, dtype=args.dtype, param_dtype=args.param_dtype,
                                          cache_dir=args.cache_dir, adapter=args.adapter, quantize=args.quantize,
                                          progress=args.progress, log=log)
    speculative = {}
    if args.draft_model is not None:
        draft_model, draft_params, draft_tokenizer = load_model(
            args.draft_model, dtype=args.dtype, param_dtype=args.param_dtype, cache_dir=args.cache_dir,
            quantize=args.quantize, progress=args.progress, log=log)
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"--draft_model {args.draft_model!r} has a tokenizer of {draft_tokenizer.vocab_size} "
                             f"ids, --model {args.model!r} one of {tokenizer.vocab_size}: a draft must share the "
                             "target's tokenizer (any GPT-2 size does)")
        speculative = dict(draft=(draft_model, draft_params), num_draft_tokens=args.num_draft_tokens,
                           draft_schedule=args.draft_schedule)
    elif args.prompt_lookup_ngram is not None:
        speculative = dict(prompt_lookup_ngram=args.prompt_lookup_ngram, num_draft_tokens=args.num_draft_tokens)
    # Speculative decoding streams too: each verification round prints what it accepted.
    streaming = args.num_return_sequences == 1 and args.num_beams == 1

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    start = time.perf_counter()
    texts = generate_text(model, params, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                          do_sample=not args.greedy and args.num_beams == 1, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          num_return_sequences=args.num_return_sequences, num_beams=args.num_beams,
                          stop_token=args.stop_token, seed=args.seed, stream=write if streaming else None,
                          **speculative)
    if streaming:
        print()
    elif speculative:
        print(texts[0])
    else:
        for i, text in enumerate(texts, 1):
            print(f"=== GENERATED SEQUENCE {i} ===\n{text}")
    log(f"({time.perf_counter() - start:.1f} s, compilation included on a first run)")


def _read_stdin() -> str:
    try:
        return sys.stdin.read().rstrip("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"the prompt on stdin is not valid UTF-8 ({e.reason} at byte {e.start}); "
                         f"pass --prompt or fix the text's encoding") from None


if __name__ == "__main__":
    sys.exit(main())

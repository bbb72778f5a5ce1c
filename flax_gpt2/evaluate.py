"""Evaluate a GPT-2: sliding-window perplexity of a text, and LAMBADA last-word accuracy.

    python -m flax_gpt2.evaluate --model gpt2 --text_file wiki.test.raw [--stride 512] [--window_length 1024]
    python -m flax_gpt2.evaluate --model gpt2 --dataset wikitext-2-raw-v1        # datasets: wikitext, test split
    python -m flax_gpt2.evaluate --model gpt2 --lambada lambada_test.jsonl      # records {"text": ...}
    python -m flax_gpt2.evaluate --model gpt2 --tasks lambada_openai,hellaswag,wikitext   # lm-eval harness [eval]
    python -m flax_gpt2.evaluate --model gpt2 --adapter my-lora --text_file wiki.test.raw   # a PEFT LoRA adapter

The window follows the model: `--window_length` (tokens per scored window; HF's perplexity guide calls
it `max_length`) defaults to its `n_positions` and `--stride` to half the
window (512 for GPT-2's 1024, as in Hugging Face's perplexity guide). `<|endoftext|>` in a text is the
document separator token; no other special token is recognised. Shows a progress bar; the last line
printed is one JSON object with the figures (never NaN or Infinity: a non-finite result is an error).
Errors are one line on stderr (exit 2 for a bad flag, 1 otherwise); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from flax_gpt2.checkpoints.loading import check_vocab, model_tokenizer
from flax_gpt2.checkpoints.pretrained import from_pretrained, resolve
from flax_gpt2.evaluation import lm_eval_tasks, perplexity as eval_metrics
from flax_gpt2.tokenizer.bpe_tokenizer import USER_TEXT_SPECIAL
from flax_gpt2.utils import cli, dtypes

PROG = "python -m flax_gpt2.evaluate"


def _check_input_file(path: str, flag: str) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path!r} is a folder; pass a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")


def _decode_error(path: str, flag: str, e: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{flag} {path!r} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8")


def read_text_file(path: str) -> str:
    _check_input_file(path, "--text_file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise _decode_error(path, "--text_file", e) from None
    if not text.strip():
        raise ValueError(f"--text_file {path!r} is empty: nothing to evaluate")
    return text


def read_lambada(path: str) -> list[str]:
    """LAMBADA records, one JSON object `{"text": ...}` per line; each must end in a word after a context."""
    _check_input_file(path, "--lambada")
    try:
        return _read_lambada(path)
    except UnicodeDecodeError as e:
        raise _decode_error(path, "--lambada", e) from None


def _read_lambada(path: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise ValueError(f"{path}:{line_no}: record has no 'text' field")
            eval_metrics.split_last_word(record["text"], where=f"{path}:{line_no}")
            texts.append(record["text"])
    if not texts:
        raise ValueError(f"--lambada {path!r} holds no records")
    return texts


def read_dataset(name: str, config: str | None, split: str, field: str) -> str:
    """A `datasets` text corpus joined as HF's perplexity guide does ('\\n\\n'.join). `wikitext-2-raw-v1`
    alone is shorthand for the `wikitext` dataset with that config."""
    import datasets

    if config is None and name.startswith("wikitext-"):
        name, config = "wikitext", name
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what helps
        raise RuntimeError(f"could not load dataset {name!r} (config {config!r}, split {split!r}): {e}. "
                           "Offline? Download it once with network, or pass --text_file.") from e
    if field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {field!r}; columns: {ds.column_names}")
    return "\n\n".join(ds[field])


def evaluate(model_name: str, *, text: str | None = None, lambada_texts: list[str] | None = None,
             stride: int | None = None, window_length: int | None = None, batch_size: int = 4,
             dtype: str = "float32", param_dtype: str = "float32", progress: bool = True,
             command_line: bool = False, adapter: str | None = None) -> dict:
    """Loads `model_name` (hub id, HF folder or training run) and computes the requested figures.

    `window_length` (tokens per perplexity window) defaults to the
    model's `n_positions`, `stride` to half the window. Every
    figure returned is finite (a NaN or infinite result raises FloatingPointError). `command_line` makes
    errors name the flags (`--model DIR`) instead of the Python API. `adapter` (a PEFT LoRA folder) is
    merged into the weights on load (`from_pretrained(adapter=)`) and named in the result.
    """

    if text is None and lambada_texts is None:
        raise ValueError("nothing to evaluate: give --text_file, --dataset or --lambada")
    if window_length is not None and stride is not None and stride > window_length:
        raise ValueError(f"--stride ({stride}) must not exceed --window_length ({window_length})")
    folder = resolve(model_name, progress=progress,
                     **({"pass_folder_as": "--model DIR"} if command_line else {}))
    model, params = from_pretrained(folder, dtype=dtypes.from_name(dtype, "--dtype"),
                                    param_dtype=dtypes.from_name(param_dtype, "--param_dtype"), progress=progress,
                                    adapter=adapter)
    tokenizer = model_tokenizer(folder, command_line=command_line)
    check_vocab(model.config, tokenizer, str(model_name))
    n_positions = model.config.n_positions
    # Flag values only the model can judge: a usage error (exit 2) on the command line, a ValueError here.
    bad_flag = cli.UsageError if command_line else ValueError
    if window_length is not None and window_length > n_positions:
        raise bad_flag(f"--window_length ({window_length}) exceeds the model's n_positions ({n_positions}); "
                       f"leave it out to use the whole window")
    window_length = window_length or n_positions
    if stride is None:
        stride = max(1, window_length // 2)
    elif stride > window_length:
        raise bad_flag(f"--stride ({stride}) must not exceed the window ({window_length}, the model's "
                       f"n_positions); leave it out to use half the window")
    scorer = eval_metrics.make_scorer(model)
    result: dict = {"model": str(model_name), **({"adapter": str(adapter)} if adapter is not None else {})}
    if text is not None:
        # As HF's tokenizer does, '<|endoftext|>' in an evaluation text is the document separator token.
        ids = tokenizer.encode(text, allowed_special=USER_TEXT_SPECIAL)
        ppl = eval_metrics.perplexity(model, params, ids, stride=stride, window_length=window_length,
                                      batch_size=batch_size, progress=progress, scorer=scorer)
        result.update(ppl, text_tokens=len(ids), stride=stride, window_length=window_length)
    if lambada_texts is not None:
        lam = eval_metrics.lambada(model, params, tokenizer, lambada_texts, batch_size=batch_size,
                                   progress=progress, scorer=scorer)
        result.update({f"lambada_{k}": v for k, v in lam.items()})
        result.setdefault("accuracy", lam["accuracy"])
        if text is None:
            result["perplexity"] = lam["perplexity"]
    _check_finite(result)
    return result


def _check_finite(result: dict) -> None:
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{', '.join(f'{k}={result[k]}' for k in bad)}: the model's outputs are not finite "
                                 f"(NaN or overflowing weights?); no figures to report")


_positive_int = cli.flag_type(int, lambda n: n >= 1, "a positive integer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id, Hugging Face folder, or training run folder")
    p.add_argument("--adapter", default=None,
                   help="a PEFT LoRA adapter folder for --model, merged into its weights on load")
    src = p.add_argument_group("what to evaluate (one or more)")
    src.add_argument("--text_file", help="plain text file: sliding-window perplexity")
    src.add_argument("--dataset", help="a `datasets` name, e.g. wikitext-2-raw-v1 (shorthand) or ptb_text_only")
    src.add_argument("--dataset_config", default=None)
    src.add_argument("--split", default="test")
    src.add_argument("--text_field", default="text")
    src.add_argument("--lambada", help="jsonl of {\"text\": ...} records: last-word accuracy and perplexity")
    p.add_argument("--stride", type=_positive_int, default=None,
                   help="tokens between window starts (default: half the window)")
    window = cli.flag_type(int, lambda n: n >= 2, "an integer >= 2")
    p.add_argument("--window_length", type=window, default=None,
                   help="tokens per scored window (default: the model's n_positions)")
    p.add_argument("--batch_size", type=_positive_int, default=4)
    p.add_argument("--dtype", default="float32", choices=sorted(dtypes.DTYPES), help="compute dtype")
    p.add_argument("--param_dtype", default="float32", choices=sorted(dtypes.DTYPES),
                   help="dtype the weights are kept in")
    p.add_argument("--no_progress", action="store_true")
    lm_eval_tasks.add_task_arguments(p)
    args = p.parse_args(argv)
    if args.tasks is not None:
        if args.text_file or args.dataset or args.lambada:
            p.error("--tasks runs lm-eval tasks; give --text_file/--dataset/--lambada in a separate run")
        return args
    if args.text_file and args.dataset:
        p.error("give --text_file or --dataset, not both")
    if not (args.text_file or args.dataset or args.lambada):
        p.error("nothing to evaluate: give --text_file, --dataset, --lambada or --tasks")
    if args.stride is not None and args.window_length is not None and args.stride > args.window_length:
        p.error(f"--stride ({args.stride}) must not exceed --window_length ({args.window_length}): tokens would go "
                "unscored")
    return args


def main(argv=None) -> int:
    """The command line (arguments as in `--help`, plus `--debug`); returns the exit code (see
    `flax_gpt2.utils.cli`)."""
    return cli.run(_main, argv, prog=PROG)


def _main(argv) -> None:
    args = parse_args(argv)
    if args.tasks is not None:
        lm_eval_tasks.run_tasks(args)
        return
    text = read_text_file(args.text_file) if args.text_file else None
    if args.dataset:
        text = read_dataset(args.dataset, args.dataset_config, args.split, args.text_field)
    lambada_texts = read_lambada(args.lambada) if args.lambada else None
    result = evaluate(args.model, text=text, lambada_texts=lambada_texts, stride=args.stride,
                      window_length=args.window_length, batch_size=args.batch_size, dtype=args.dtype,
                      param_dtype=args.param_dtype, progress=not args.no_progress, command_line=True,
                      adapter=args.adapter)
    print(json.dumps(result, allow_nan=False))


if __name__ == "__main__":
    sys.exit(main())

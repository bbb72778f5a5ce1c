"""Evaluate a GPT-2: sliding-window perplexity of a text, and LAMBADA last-word accuracy.

    python -m flax_gpt2.evaluate --model gpt2 --text_file wiki.test.raw [--stride 512] [--max_length 1024]
    python -m flax_gpt2.evaluate --model gpt2 --dataset wikitext-2-raw-v1        # datasets: wikitext, test split
    python -m flax_gpt2.evaluate --model gpt2 --lambada lambada_test.jsonl      # records {"text": ...}

Shows a progress bar; the last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp

from flax_gpt2 import eval_metrics


def read_text_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--text_file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"--text_file {path!r} is empty: nothing to evaluate")
    return text


def read_lambada(path: str) -> list[str]:
    """LAMBADA records, one JSON object `{"text": ...}` per line; each must end in a word after a context."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--lambada {path!r} does not exist")
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
             stride: int = 512, max_length: int | None = None, batch_size: int = 4, dtype: str = "float32",
             progress: bool = True) -> dict:
    """Loads `model_name` (hub id, HF folder or training run) and computes the requested figures."""
    from flax_gpt2.pretrained import from_pretrained
    from flax_gpt2.tokenizer import get_tokenizer

    if text is None and lambada_texts is None:
        raise ValueError("nothing to evaluate: give --text_file, --dataset or --lambada")
    if max_length is not None and stride > max_length:
        raise ValueError(f"--stride ({stride}) must not exceed --max_length ({max_length})")
    model, params = from_pretrained(model_name, dtype=jnp.dtype(dtype), progress=progress)
    try:
        tokenizer = get_tokenizer(model_name)
    except FileNotFoundError:  # a folder without tokenizer files (e.g. a training run): GPT-2's own
        tokenizer = get_tokenizer(None)
    scorer = eval_metrics.make_scorer(model)
    result: dict = {"model": str(model_name)}
    if text is not None:
        # As HF's tokenizer does, '<|endoftext|>' in an evaluation text is the document separator token.
        ids = tokenizer.encode(text, allowed_special="all")
        ppl = eval_metrics.perplexity(model, params, ids, stride=stride, max_length=max_length,
                                      batch_size=batch_size, progress=progress, scorer=scorer)
        result.update(ppl, text_tokens=len(ids), stride=stride, max_length=max_length or model.config.n_positions)
    if lambada_texts is not None:
        lam = eval_metrics.lambada(model, params, tokenizer, lambada_texts, batch_size=batch_size,
                                   progress=progress, scorer=scorer)
        result.update({f"lambada_{k}": v for k, v in lam.items()})
        result.setdefault("accuracy", lam["accuracy"])
        if text is None:
            result["perplexity"] = lam["perplexity"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id, Hugging Face folder, or training run folder")
    src = p.add_argument_group("what to evaluate (one or more)")
    src.add_argument("--text_file", help="plain text file: sliding-window perplexity")
    src.add_argument("--dataset", help="a `datasets` name, e.g. wikitext-2-raw-v1 (shorthand) or ptb_text_only")
    src.add_argument("--dataset_config", default=None)
    src.add_argument("--split", default="test")
    src.add_argument("--text_field", default="text")
    src.add_argument("--lambada", help="jsonl of {\"text\": ...} records: last-word accuracy and perplexity")
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--max_length", type=int, default=None, help="window length (default: the model's n_positions)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if args.text_file and args.dataset:
        p.error("give --text_file or --dataset, not both")
    try:
        text = read_text_file(args.text_file) if args.text_file else None
        if args.dataset:
            text = read_dataset(args.dataset, args.dataset_config, args.split, args.text_field)
        lambada_texts = read_lambada(args.lambada) if args.lambada else None
        result = evaluate(args.model, text=text, lambada_texts=lambada_texts, stride=args.stride,
                          max_length=args.max_length, batch_size=args.batch_size, dtype=args.dtype,
                          progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokenize a corpus once into memory-mapped uint16 shards that later runs reuse.

    python -m flax_gpt2.train.tokenize_corpus SOURCE OUT_DIR [--text_field text] [--recipe text|commongen|eli5]
        [--split train] [--dataset_config NAME] [--tokenizer DIR] [--num_threads N] [--no_progress] [--debug]

SOURCE is a text file, a jsonl file (one JSON object per line, the text under `text_field`), a folder
or glob of such files, local parquet/csv/arrow files, or a `datasets` hub name. Each document (a text
file, a jsonl line, a dataset row) is followed by `<|endoftext|>`. OUT_DIR receives `tokens_NNNNN.bin`
(raw uint16) and `meta.json`, written last so that a folder with `meta.json` is complete.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import tempfile
from typing import Iterable, Iterator

import numpy as np

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SHARD_TOKENS = 1 << 28  # 512 MiB per shard
_BATCH_CHARS = 8 << 20  # text handed to one parallel tokenizer call
_CHUNK_CHARS = 1 << 20  # a large text file is cut into pieces of about this size
FORMAT_VERSION = 1


def gpt2_encoding(tokenizer: str = "", *, pass_folder_as: str | None = None):
    """The tiktoken `Encoding` of `flax_gpt2.get_tokenizer(tokenizer or None)` (a folder or hub name;
    empty is the standard GPT-2 encoding). `pass_folder_as` is the command line's way to name a folder
    (`"--tokenizer DIR"`), for the error when the tokenizer cannot be loaded offline."""
    from flax_gpt2.tokenizer import get_tokenizer

    hint = {} if pass_folder_as is None else {"pass_folder_as": pass_folder_as}
    return get_tokenizer(tokenizer or None, **hint).encoding


def split_text(text: str, chunk_chars: int = _CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces whose separate encodings concatenate to the encoding of the whole.

    GPT-2's pre-tokenizer never joins across a single newline that has a non-space character on both
    sides (`x\\nY` always splits as `x`, `\\n`, `Y`), so cutting right after such a newline is exact;
    runs of blank lines or indentation are not cut, since `\\s+(?!\\S)` can merge across them.
    """
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        cut = text.find("\n", start + chunk_chars)
        while cut != -1 and not (cut + 1 < len(text) and not text[cut - 1].isspace()
                                 and not text[cut + 1].isspace()):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def resolve_files(source: str) -> list[str] | None:
    """The local files `source` names (a file, folder or glob), or None if it is not a local path.

    Raises FileNotFoundError when `source` looks like a path (a known suffix, or starts with / . ~) but
    matches nothing.
    """
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if f.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + tuple(DATASETS_SUFFIXES)))
        if not files:
            raise FileNotFoundError(f"data folder {source!r} has no .txt, .jsonl, .parquet, .csv or .arrow files")
        return files
    if os.path.isfile(path):
        return [path]
    if glob.has_magic(path):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise FileNotFoundError(f"data source {source!r} matches no files")
        return files
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + tuple(DATASETS_SUFFIXES)
    if path.endswith(suffixes) or source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"data file not found: {source!r}")
    return None


def _jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield line_number, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number} is not valid JSON ({e.msg})") from None


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    for line_number, record in _jsonl_records(path):
        if text_field not in record:
            raise KeyError(f"{path}:{line_number} has no field {text_field!r} (set data.text_field); "
                           f"fields: {sorted(record)}")
        yield record[text_field]


def _dataset_documents(dataset, text_field: str, description: str) -> Iterator[str]:
    if text_field not in dataset.column_names:
        raise KeyError(f"{description} has no column {text_field!r} (set data.text_field); "
                       f"columns: {dataset.column_names}")
    for batch in dataset.iter(batch_size=1024):
        yield from batch[text_field]


def iter_documents(source: str, *, text_field: str = "text", split: str = "train",
                   dataset_config: str = "", recipe: str = "text") -> Iterator[list[str]]:
    """Each document of `source` as a list of text pieces to encode and concatenate.

    With a `recipe` other than "text", each record (jsonl line, dataset row, or CommonGen line pair) is
    formatted by `train.recipes` into its documents. The source is found (or the dataset loaded) right
    away, so a missing one fails here, not on first use.
    """
    if recipe != "text":
        return _recipe_documents(source, recipe, split, dataset_config)
    files = resolve_files(source)
    if files is None:
        dataset = _load_dataset(source, dataset_config, split)
        return ([text] for text in _dataset_documents(dataset, text_field, f"dataset {source!r}"))
    return _file_documents(files, text_field)


def _load_dataset(source: str, dataset_config: str, split: str):
    import datasets
    try:
        return datasets.load_dataset(source, dataset_config or None, split=split)
    except Exception as e:  # datasets raises many types; say what was tried
        raise FileNotFoundError(f"data source {source!r} is not a local file and datasets.load_dataset "
                                f"could not load it: {e}") from e


def _recipe_documents(source: str, recipe: str, split: str, dataset_config: str) -> Iterator[list[str]]:
    from flax_gpt2.train import recipes

    if recipe not in recipes.RECIPES:
        raise ValueError(f"unknown data.recipe {recipe!r}; choose one of {recipes.RECIPES}")
    files = resolve_files(source)
    if files is None:
        dataset = _load_dataset(source, dataset_config, split)
        streams = [(f"dataset {source!r}", iter(dataset))]
    else:
        streams = []
        for path in files:
            if path.endswith(".src_alpha.txt") and recipe == "commongen":
                streams.append((path, recipes.commongen_line_pairs(path)))
            elif path.endswith(".tgt.txt") and recipe == "commongen":
                continue  # read with its .src_alpha.txt
            elif os.path.splitext(path)[1] in JSONL_SUFFIXES:
                streams.append((path, (record for _, record in _jsonl_records(path))))
            else:
                raise ValueError(f"{path}: data.recipe={recipe!r} reads jsonl records"
                                 + (" or X.src_alpha.txt + X.tgt.txt pairs" if recipe == "commongen" else ""))
    return ([doc] for where, records in streams for doc in recipes.format_records(recipe, records, where))


def _file_documents(files: list[str], text_field: str) -> Iterator[list[str]]:
    for path in files:
        suffix = os.path.splitext(path)[1]
        if suffix in DATASETS_SUFFIXES:
            import datasets
            dataset = datasets.load_dataset(DATASETS_SUFFIXES[suffix], data_files=path, split="train")
            for text in _dataset_documents(dataset, text_field, path):
                yield [text]
        elif suffix in JSONL_SUFFIXES:
            for text in _jsonl_documents(path, text_field):
                yield [text]
        else:
            with open(path, encoding="utf-8") as f:
                yield split_text(f.read())


def _batches(documents: Iterable[list[str]]) -> Iterator[tuple[list[str], list[bool]]]:
    """Groups document pieces into batches for one parallel encode; marks pieces that end a document."""
    texts, ends, chars = [], [], 0
    for pieces in documents:
        for i, piece in enumerate(pieces):
            texts.append(piece)
            ends.append(i == len(pieces) - 1)
            chars += len(piece)
        if chars >= _BATCH_CHARS:
            yield texts, ends
            texts, ends, chars = [], [], 0
    if texts:
        yield texts, ends


def tokenize_corpus(source: str, out_dir: str, *, text_field: str = "text", recipe: str = "text", split: str = "train",
                    dataset_config: str = "", tokenizer: str = "", num_threads: int = 0,
                    shard_tokens: int = SHARD_TOKENS, progress: bool = True,
                    pass_folder_as: str | None = None) -> dict:
    """Tokenizes `source` into `out_dir` (created atomically: written beside it, then renamed).

    Returns the `meta.json` dict. Encoding runs `tiktoken`'s `encode_ordinary_batch` on all cores.
    `pass_folder_as` is as in `gpt2_encoding`.
    """
    documents = iter_documents(source, text_field=text_field, split=split, dataset_config=dataset_config,
                               recipe=recipe)
    encoding = gpt2_encoding(tokenizer, pass_folder_as=pass_folder_as)
    if encoding.n_vocab > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocabulary of {encoding.n_vocab} tokens does not fit uint16 shards")
    eot = encoding.eot_token
    num_threads = num_threads or os.cpu_count() or 1
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    shards, n_docs, total = [], 0, 0
    current, current_tokens = None, 0
    bar = None
    if progress:
        import tqdm
        bar = tqdm.tqdm(desc=f"tokenizing {source}", unit=" tokens", unit_scale=True)
    try:
        for texts, ends in _batches(documents):
            encoded = encoding.encode_ordinary_batch(texts, num_threads=num_threads)
            pieces = []
            for ids, end in zip(encoded, ends):
                pieces.append(np.asarray(ids, np.uint16))
                if end:
                    pieces.append(np.array([eot], np.uint16))
                    n_docs += 1
            tokens = np.concatenate(pieces)
            while len(tokens):
                if current is None:
                    name = f"tokens_{len(shards):05d}.bin"
                    current, current_tokens = open(os.path.join(tmp, name), "wb"), 0
                    shards.append({"file": name, "num_tokens": 0})
                take = tokens[:shard_tokens - current_tokens]
                current.write(take.tobytes())
                current_tokens += len(take)
                shards[-1]["num_tokens"] = current_tokens
                tokens = tokens[len(take):]
                if current_tokens == shard_tokens:
                    current.close()
                    current = None
            total = sum(s["num_tokens"] for s in shards)
            if bar is not None:
                bar.update(total - bar.n)
        if current is not None:
            current.close()
        if total == 0:
            raise ValueError(f"data source {source!r} has no text")
        meta = {"format": FORMAT_VERSION, "dtype": "uint16", "num_tokens": total, "num_documents": n_docs,
                "eot_token": eot, "vocab_size": encoding.n_vocab, "source": source, "shards": shards}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.exists(os.path.join(out_dir, "meta.json")):
                raise
            shutil.rmtree(tmp)  # another process finished the same corpus first; theirs is identical
        return meta
    except BaseException:
        if current is not None:
            current.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()


PROG = "python -m flax_gpt2.train.tokenize_corpus"


def main(argv=None) -> int:
    """The command line (flags as in `--help`, plus `--debug`); returns the exit code (`flax_gpt2.cli`)."""
    from flax_gpt2 import cli

    return cli.run(_main, argv, prog=PROG)


def _main(argv) -> None:
    from flax_gpt2 import cli
    from flax_gpt2.train.recipes import RECIPES

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="text/jsonl file, folder or glob of them, parquet/csv/arrow, or a datasets name")
    parser.add_argument("out_dir", help="the tokenized corpus folder (must not hold another corpus)")
    parser.add_argument("--text_field", default="text", help="the text column of jsonl / datasets records")
    parser.add_argument("--recipe", default="text", choices=RECIPES,
                        help="how records become documents: the text field, or a model card's fine-tuning format")
    parser.add_argument("--split", default="train", help="the datasets split")
    parser.add_argument("--dataset_config", default="", help="datasets.load_dataset(source, name=...)")
    parser.add_argument("--tokenizer", default="", help="folder with the GPT-2 BPE files (default: tiktoken's gpt2)")
    parser.add_argument("--num_threads", type=cli.flag_type(int, lambda n: n >= 0, "an integer >= 0"), default=0,
                        help="tokenizer threads; 0 = all cores")
    parser.add_argument("--no_progress", dest="progress", action="store_false", help="hide the progress bar")
    args = parser.parse_args(argv)
    meta = tokenize_corpus(args.source, args.out_dir, text_field=args.text_field, recipe=args.recipe,
                           split=args.split, dataset_config=args.dataset_config, tokenizer=args.tokenizer,
                           num_threads=args.num_threads, progress=args.progress, pass_folder_as="--tokenizer DIR")
    print(f"{meta['num_tokens']:,} tokens from {meta['num_documents']:,} documents -> {args.out_dir}")


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""Where a corpus's documents come from: text files (cut into safe pieces), JSONL records, local parquet/csv/
arrow files and Hugging Face datasets, or a recipe's records; read as batches of text for the tokenizer."""

from __future__ import annotations

import glob
import io
import json
import os
import re
from typing import Iterable, Iterator, TextIO

from . import recipes

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
BATCH_CHARS = 8 << 20  # text handed to one parallel tokenizer call
CHUNK_CHARS = 1 << 20  # a large text file is cut into pieces of about this size


# A safe place to cut a text: one whitespace character between two non-space ones. GPT-2's pre-tokenizer
# (`bpe_tokenizer.GPT2_PATTERN`) never joins across it: the token that holds the character before it ends
# there (only whitespace tokens hold whitespace, and they start with it), and the regex reads no further
# left than where it starts. So the encodings of the two sides concatenate to the encoding of the whole.
# Runs of whitespace are never cut: `\s+(?!\S)` and `\s++$` can merge across them. The cut character is
# whitespace as tiktoken's regex sees it (Unicode White_Space); Python's `\S` for the neighbours is stricter
# (it also counts U+001C..U+001F as space), which only means fewer cuts.
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SAFE_CUT = re.compile(rf"(?<=\S)[{_WHITE_SPACE}](?=\S)")


def text_pieces(stream: TextIO, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """The text of `stream` in pieces of about `chunk_chars` whose separate encodings concatenate to the
    encoding of the whole, read `chunk_chars` at a time: a text of any size costs a few chunks of memory.

    A piece ends at the first safe cut (see `_SAFE_CUT`) after `chunk_chars`; a text without one (a single
    giant word) stays one piece. Always yields at least one piece ("" for an empty text).
    """
    buffer, searched = "", chunk_chars
    for more in iter(lambda: stream.read(chunk_chars), ""):
        buffer += more
        while len(buffer) > chunk_chars:
            # The last character's right neighbour was unknown before this read: search again from it.
            cut = _SAFE_CUT.search(buffer, max(searched - 1, chunk_chars))
            if cut is None:
                searched = len(buffer)
                break
            yield buffer[:cut.start()]
            buffer, searched = buffer[cut.start():], chunk_chars
    yield buffer


def split_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """`text` cut into pieces whose separate encodings concatenate to the encoding of the whole
    (`text_pieces` of a text already in memory)."""
    return list(text_pieces(io.StringIO(text), chunk_chars))


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
    """`(line number, record)` of each non-blank line; a line that is not a JSON object is an error naming it."""
    with _open_text(path) as f:
        for line_number, line in enumerate(_utf8(f, path), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number} is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_number} holds {_json_type(record)}, not a JSON object: each "
                                     "line must be one record such as {\"text\": \"...\"}")
                yield line_number, record


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    for line_number, record in _jsonl_records(path):
        if text_field not in record:
            raise KeyError(f"{path}:{line_number} has no field {text_field!r} (set data.text_field); "
                           f"fields: {sorted(record)}")
        yield _text(record[text_field], f"{path}:{line_number}: field {text_field!r}")


def _text(value, where: str) -> str:
    """`value` if it is a string; anything else (null, a number, a list) is an error naming `where`."""
    if not isinstance(value, str):
        raise ValueError(f"{where} is {_json_type(value)}, not a string: fix the record, or point data.text_field "
                         "(--text_field) at a text field")
    return value


def _json_type(value) -> str:
    """What a JSON value is, for a message: "null", "a number (3.5)", "a list", ..."""
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float)):
        return f"a {'boolean' if isinstance(value, bool) else 'number'} ({json.dumps(value)})"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else "a string"


def _open_text(path: str) -> TextIO:
    """`path` opened as UTF-8 text the way a text source has always been read (universal newlines)."""
    return open(path, encoding="utf-8")


def _utf8(lines: Iterable[str], path: str) -> Iterator[str]:
    """`lines` (or chunks) of a file opened by `_open_text`; bytes that are not UTF-8 are an error naming it."""
    try:
        yield from lines
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} in a byte {e.object[e.start:e.start + 1]!r}): "
                         "a binary file, or text in another encoding; convert it to UTF-8 or leave it out of "
                         "the source") from None


def _dataset_documents(dataset, text_field: str, description: str) -> Iterator[str]:
    if text_field not in dataset.column_names:
        raise KeyError(f"{description} has no column {text_field!r} (set data.text_field); "
                       f"columns: {dataset.column_names}")
    row = 0
    for batch in dataset.iter(batch_size=1024):
        for text in batch[text_field]:
            yield _text(text, f"{description} row {row}: column {text_field!r}")
            row += 1


def iter_documents(source: str, *, text_field: str = "text", split: str = "train",
                   dataset_config: str = "", recipe: str = "text") -> Iterator[Iterable[str]]:
    """Each document of `source` as its text pieces to encode and concatenate (a list, or for a text file
    a stream of pieces read as they are encoded: see `text_pieces`).

    With a `recipe` other than "text", each record (jsonl line, dataset row, or CommonGen line pair) is
    formatted by `train.recipes` into its documents (a recipe with prompts: `[Prompt(prompt), completion]`).
    The source is found (or the dataset loaded) right away, so a missing one fails here, not on first use.
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

    if recipe not in recipes.RECIPES:
        raise ValueError(f"unknown data.recipe {recipe!r}; choose one of {recipes.RECIPES}")
    files = resolve_files(source)
    if files is None:
        dataset = _load_dataset(source, dataset_config, split)
        streams = [_numbered(f"dataset {source!r}", iter(dataset))]
    else:
        streams = []
        for path in files:
            if path.endswith(".src_alpha.txt") and recipe == "commongen":
                streams.append(_numbered(path, recipes.commongen_line_pairs(path)))
            elif path.endswith(".tgt.txt") and recipe == "commongen":
                continue  # read with its .src_alpha.txt
            elif os.path.splitext(path)[1] in JSONL_SUFFIXES:
                streams.append(((f"{path}:{line}", record) for line, record in _jsonl_records(path)))
            else:
                raise ValueError(f"{path}: data.recipe={recipe!r} reads jsonl records"
                                 + (" or X.src_alpha.txt + X.tgt.txt pairs" if recipe == "commongen" else ""))
    return (pieces for stream in streams for where, record in stream
            for pieces in recipes.record_pieces(recipe, record, where))


def _numbered(where: str, records: Iterator[dict]) -> Iterator[tuple[str, dict]]:
    return ((f"{where} record {i}", record) for i, record in enumerate(records))


def _file_documents(files: list[str], text_field: str) -> Iterator[Iterable[str]]:
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
            yield _text_file_pieces(path)


def _text_file_pieces(path: str) -> Iterator[str]:
    with _open_text(path) as f:
        yield from _utf8(text_pieces(f), path)


def batches(documents: Iterable[Iterable[str]], chars_per_batch: int | None = None
            ) -> Iterator[tuple[list[str], list[bool], list[bool]]]:
    """Groups document pieces into batches of about `chars_per_batch` characters for one parallel encode (a
    long document spans several); marks the pieces that end a document, and the ones scored under
    `data.loss_on="completion"` (all but a recipe's `recipes.Prompt`). `chars_per_batch` defaults to
    `BATCH_CHARS`, read at call time."""
    chars_per_batch = chars_per_batch or BATCH_CHARS
    texts, ends, scored, chars = [], [], [], 0
    for pieces in documents:
        for piece, last in _with_last(pieces):
            texts.append(piece)
            ends.append(last)
            scored.append(not isinstance(piece, recipes.Prompt))
            chars += len(piece)
            if chars >= chars_per_batch:
                yield texts, ends, scored
                texts, ends, scored, chars = [], [], [], 0
    if texts:
        yield texts, ends, scored


def _with_last(items: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """`(item, is_last)` of each item, reading one ahead (a document's pieces may be a stream)."""
    items = iter(items)
    current = next(items, None)
    for following in items:
        yield current, False
        current = following
    if current is not None:
        yield current, True

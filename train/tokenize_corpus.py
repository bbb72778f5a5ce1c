"""Tokenize a corpus once into memory-mapped uint16 shards that later runs reuse.

    python -m flax_gpt2.train.tokenize_corpus SOURCE OUT_DIR [--text_field text]
        [--recipe text|commongen|eli5|prompt_completion] [--split train] [--dataset_config NAME]
        [--tokenizer DIR] [--num_threads N] [--overwrite] [--no_progress] [--debug]
        [--coordinator_address HOST:PORT --num_processes N --process_id I | --distributed]
        [--shared_out] [--block_chars N] [--resumable]

SOURCE is a text file, a jsonl file (one JSON object per line, the text under `text_field`), a folder
or glob of such files, local parquet/csv/arrow files, or a `datasets` hub name. Each document (a text
file, a jsonl line, a dataset row) is followed by `<|endoftext|>`. OUT_DIR receives `tokens_NNNNN.bin`
(raw uint16), for a recipe with prompts (`recipes.PROMPT_RECIPES`) `mask_NNNNN.bin` (uint8 per token, 1 =
scored under `data.loss_on="completion"`), and `meta.json`, written last so that a folder with `meta.json` is
complete. OUT_DIR must be new or empty; one that holds the same corpus (same files and settings) is left as it
is; anything else needs `--overwrite`.

On several hosts (the `jax.distributed` flags, as `config.distributed.*` in training; on a TPU pod
`--distributed` alone lets JAX detect them), each host tokenizes only its share of the documents into
`part_*.bin` files in the shared OUT_DIR (`gs://`, or a folder every host mounts: `--shared_out`) and process
0 writes `meta.json` last; the token stream is the one a single host writes (`tokenize_hosts`). On one host,
`--resumable` writes that parts layout too, so an interrupted run (Ctrl-C, a lost machine, a source gone
mid-way) rerun with the same command redoes only the parts that were not finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterable

import numpy as np

from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer
from flax_gpt2.utils import cli, file_io

from . import documents
from .recipes import PROMPT_RECIPES, RECIPES

SHARD_TOKENS = 1 << 28  # 512 MiB per shard
FORMAT_VERSION = 1


def gpt2_encoding(tokenizer: str = "", *, pass_folder_as: str | None = None):
    """The tiktoken `Encoding` of `flax_gpt2.get_tokenizer(tokenizer or None)` (a folder or hub name;
    empty is the standard GPT-2 encoding). `pass_folder_as` is the command line's way to name a folder
    (`"--tokenizer DIR"`), for the error when the tokenizer cannot be loaded offline."""

    hint = {} if pass_folder_as is None else {"pass_folder_as": pass_folder_as}
    return get_tokenizer(tokenizer or None, **hint).encoding


class OutputNotEmptyError(FileExistsError):
    """`out_dir` holds something other than the corpus asked for (and `overwrite` was not given)."""

def file_stamp(path: str) -> list:
    """What identifies a local file's version: its absolute path, size and modification time."""
    return [os.path.abspath(path), os.path.getsize(path), os.path.getmtime(path)]


def corpus_inputs(source: str, *, text_field: str = "text", recipe: str = "text", split: str = "train",
                  dataset_config: str = "", tokenizer: str = "", stamps: list | None = None) -> str:
    """A sha256 of what goes into a corpus: the files (path, size, mtime) or the dataset, the fields read,
    the recipe and the tokenizer. Equal inputs make equal corpora; an edited file changes it.

    `stamps` are the files' stamps when they are not local (`gs://`); by default `source`'s local files.
    """
    if stamps is None:
        files = documents.resolve_files(source)
        stamps = None if files is None else [file_stamp(f) for f in files]
    what = ["datasets", source, dataset_config, split] if stamps is None else stamps
    tokenizer = os.path.abspath(tokenizer) if tokenizer else "gpt2"
    # A recipe with prompts writes a loss mask too: its corpora (and cache keys) differ from ones made before
    # it did, so such a corpus is never taken for one that lacks the mask. Other corpora keep their keys.
    mask = ["loss_mask"] if recipe in PROMPT_RECIPES else []
    blob = json.dumps([FORMAT_VERSION, what, text_field, tokenizer, recipe] + mask)
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenize_corpus(source: str, out_dir: str, *, text_field: str = "text", recipe: str = "text", split: str = "train",
                    dataset_config: str = "", tokenizer: str = "", num_threads: int = 0,
                    shard_tokens: int = SHARD_TOKENS, progress: bool = True, overwrite: bool = False,
                    pass_folder_as: str | None = None) -> dict:
    """Tokenizes `source` into `out_dir` (written beside it, then moved in: `meta.json` last).

    Returns the `meta.json` dict, which records the token count, a sha256 of the tokens and of the
    inputs (`corpus_inputs`). Encoding runs `tiktoken`'s `encode_ordinary_batch` on all cores; a text file
    is read a chunk at a time. `pass_folder_as` is as in `gpt2_encoding`.

    `out_dir` must be new or empty, or hold this same corpus (its meta is returned, nothing is redone),
    unless `overwrite`: then its corpus files (`meta.json` and the shards it lists) are replaced, once the
    new corpus is complete; other files in it are left alone.

    Raises:
      OutputNotEmptyError: `out_dir` holds other files or another corpus; nothing was written.
      ValueError: the source holds no text, or a record or file is not text (the message names it).
    """
    inputs = corpus_inputs(source, text_field=text_field, recipe=recipe, split=split, dataset_config=dataset_config,
                           tokenizer=tokenizer)
    same = existing_corpus(out_dir, inputs, overwrite=overwrite)
    if same is not None:
        return same
    docs = documents.iter_documents(source, text_field=text_field, split=split, dataset_config=dataset_config,
                                    recipe=recipe)
    encoding = gpt2_encoding(tokenizer, pass_folder_as=pass_folder_as)
    if encoding.n_vocab > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocabulary of {encoding.n_vocab} tokens does not fit uint16 shards")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        w = _write_shards(documents.batches(docs), encoding, tmp, shard_tokens=shard_tokens,
                          num_threads=num_threads or os.cpu_count() or 1, desc=f"tokenizing {source}",
                          progress=progress, with_mask=recipe in PROMPT_RECIPES, total_chars=text_size(source))
        if w["num_text_tokens"] == 0:
            raise ValueError(f"data source {source!r} has no text ({w['num_documents']} empty documents): "
                             "nothing to train on; check the path, data.text_field (--text_field) or the recipe")
        meta = {"format": FORMAT_VERSION, "dtype": "uint16", "num_tokens": w["num_tokens"],
                "num_documents": w["num_documents"], "eot_token": encoding.eot_token, "vocab_size": encoding.n_vocab,
                "source": source, "inputs": inputs, "sha256": w["sha256"], "shards": w["shards"]}
        if "loss_mask" in w:
            meta["loss_mask"] = w["loss_mask"]
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        _move_in(tmp, out_dir)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def existing_corpus(out_dir: str, inputs: str, *, overwrite: bool = False) -> dict | None:
    """The meta of the corpus in `out_dir` if it was made from `inputs` (and not `overwrite`); None if
    `out_dir` is new or empty, or `overwrite`; else `OutputNotEmptyError` naming the folder and the fix."""
    if not os.path.exists(out_dir):
        return None
    if not os.path.isdir(out_dir):
        raise OutputNotEmptyError(f"{out_dir} is a file; the output must be a folder (new or empty)")
    if not os.listdir(out_dir):
        return None
    meta = _read_meta_quietly(out_dir)
    if meta is not None and meta.get("inputs") == inputs and not overwrite:
        return meta
    if overwrite:
        return None
    held = (f"holds another tokenized corpus (of {meta.get('source')!r}, from other files or settings)"
            if meta is not None else "is not empty and holds no tokenized corpus")
    raise OutputNotEmptyError(f"{out_dir} {held}; nothing was written. Choose a new or empty folder, or pass "
                              "--overwrite to replace the corpus files in it (meta.json and its tokens_*.bin)")


def _read_meta_quietly(folder: str) -> dict | None:
    """`folder/meta.json` as a dict, or None when it is missing or not a JSON object."""
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def text_size(source: str) -> int | None:
    """The bytes of a local text/jsonl source (what the progress bar's ETA counts down), None when unknown
    (a `datasets` name, or parquet/csv/arrow files, whose size is not their text's)."""
    files = documents.resolve_files(source)
    if not files or not all(f.endswith(documents.TEXT_SUFFIXES + documents.JSONL_SUFFIXES) for f in files):
        return None
    return sum(os.path.getsize(f) for f in files)


class _Progress:
    """The tokenizer's progress bar: source characters done out of the source's size (so tqdm shows an ETA)
    when that is known, else tokens; documents/s and tokens/s beside it."""

    def __init__(self, desc: str, total_chars: int | None):
        import time

        import tqdm

        self._clock, self._start = time.monotonic, time.monotonic()
        self._chars = total_chars is not None
        self.bar = tqdm.tqdm(desc=desc, total=total_chars, unit="B" if self._chars else " tokens", unit_scale=True,
                             unit_divisor=1024 if self._chars else 1000)

    def update(self, chars: int, documents: int, tokens: int) -> None:
        seconds = max(self._clock() - self._start, 1e-9)
        if self._chars:
            self.bar.update(min(chars, self.bar.total) - self.bar.n)  # characters ~ bytes: never past 100%
            self.bar.set_postfix_str(f"{documents / seconds:,.0f} docs/s, {tokens / seconds:,.0f} tokens/s",
                                     refresh=False)
        else:
            self.bar.update(tokens - self.bar.n)
            self.bar.set_postfix_str(f"{documents / seconds:,.0f} docs/s", refresh=False)

    def close(self, done: bool) -> None:
        if done and self._chars:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _write_shards(batches: Iterable[tuple[list[str], list[bool], list[bool]]], encoding, folder: str, *,
                  shard_tokens: int, num_threads: int, desc: str, progress: bool, with_mask: bool = False,
                  total_chars: int | None = None) -> dict:
    """Encodes `batches` (`documents.batches`) into `folder/tokens_NNNNN.bin`; returns their `shards`,
    `num_tokens`, `sha256`, `num_documents`, and `num_text_tokens` (the tokens that are not a document's
    `<|endoftext|>`). `with_mask`: also `mask_NNNNN.bin` beside each shard (uint8, 1 where the token is in a
    scored piece or is the `<|endoftext|>` that closes a document, which the completion predicts) and
    `loss_mask` (`{"sha256", "num_scored"}`)."""
    eot = encoding.eot_token
    shards, n_docs, n_text, total, n_scored = [], 0, 0, 0, 0
    digest, mask_digest = hashlib.sha256(), hashlib.sha256()
    current = None  # the open (tokens, mask or None) files of the last shard
    bar = _Progress(desc, total_chars) if progress else None
    chars, done = 0, False
    try:
        for texts, ends, scored in batches:
            chars += sum(map(len, texts))
            pieces, flags = [], []
            for ids, end, score in zip(encoding.encode_ordinary_batch(texts, num_threads=num_threads), ends, scored):
                pieces.append(np.asarray(ids, np.uint16))
                flags.append(np.full(len(ids), score, np.uint8))
                n_text += len(ids)
                if end:
                    pieces.append(np.array([eot], np.uint16))
                    flags.append(np.ones(1, np.uint8))
                    n_docs += 1
            tokens, mask = np.concatenate(pieces), np.concatenate(flags)
            n_scored += int(mask.sum())
            while len(tokens):
                if current is None:
                    name = f"tokens_{len(shards):05d}.bin"
                    shards.append({"file": name, "num_tokens": 0})
                    if with_mask:
                        shards[-1]["mask_file"] = f"mask_{len(shards) - 1:05d}.bin"
                    current = [open(os.path.join(folder, shards[-1][k]), "wb") for k in ("file", "mask_file")
                               if k in shards[-1]]
                n = min(len(tokens), shard_tokens - shards[-1]["num_tokens"])
                raw = tokens[:n].tobytes()
                current[0].write(raw)
                digest.update(raw)
                if with_mask:
                    current[1].write(mask[:n].tobytes())
                    mask_digest.update(mask[:n].tobytes())
                shards[-1]["num_tokens"] += n
                total += n
                tokens, mask = tokens[n:], mask[n:]
                if shards[-1]["num_tokens"] == shard_tokens:
                    for f in current:
                        f.close()
                    current = None
            if bar is not None:
                bar.update(chars, n_docs, total)
        done = True
    finally:
        for f in current or ():
            f.close()
        if bar is not None:
            bar.close(done)
    out = {"shards": shards, "num_tokens": total, "sha256": digest.hexdigest(), "num_documents": n_docs,
           "num_text_tokens": n_text}
    if with_mask:
        out["loss_mask"] = {"sha256": mask_digest.hexdigest(), "num_scored": n_scored}
    return out


def _move_in(tmp: str, out_dir: str) -> None:
    """Makes the complete corpus in `tmp` the one in `out_dir`.

    A new (or empty) `out_dir` is `tmp` renamed. Otherwise (`overwrite`) the old `meta.json` goes first, so
    that the folder is never taken for a corpus while its shards are being replaced; then the new shards
    move in, the old corpus's other shards are removed, and the new `meta.json` moves in last.
    """
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.exists(os.path.join(out_dir, "meta.json")):
                raise
            # Another process finished a corpus here first: the same one (load_tokens' cache is keyed by its
            # inputs), or one that `existing_corpus` will name on the next attempt.
        return

    old = _read_meta_quietly(out_dir) or {}
    old_files = set()
    for i, shard in enumerate(old.get("shards") or []):
        for key in ("file", "mask_file") if isinstance(shard, dict) else ():
            try:
                if key == "file" or key in shard:
                    old_files.add(file_io.manifest_member(out_dir, shard.get(key), key=f"shards[{i}].{key}",
                                                          manifest=os.path.join(out_dir, "meta.json")))
            except ValueError:
                continue  # a name outside the folder: never removed
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    new_files = sorted(set(os.listdir(tmp)) - {"meta.json"})
    for name in new_files:
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    for path in old_files - {os.path.join(out_dir, name) for name in new_files}:
        if os.path.isfile(path):
            os.remove(path)
    os.replace(os.path.join(tmp, "meta.json"), meta_path)


PROG = "python -m flax_gpt2.train.tokenize_corpus"


def main(argv=None) -> int:
    """The command line (flags as in `--help`, plus `--debug`); returns the exit code (`flax_gpt2.utils.cli`)."""

    return cli.run(_main, argv, prog=PROG)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (also used by the tests that check the docs' commands)."""
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the corpus already in OUT_DIR (its meta.json and shards; other files stay)")
    parser.add_argument("--no_progress", dest="progress", action="store_false", help="hide the progress bar")
    hosts = parser.add_argument_group("several hosts, each tokenizing its share (jax.distributed)")
    hosts.add_argument("--distributed", action="store_true", help="join a jax.distributed run JAX detects (TPU pod)")
    hosts.add_argument("--coordinator_address", default="", help="HOST:PORT of process 0")
    hosts.add_argument("--num_processes", type=cli.flag_type(int, lambda n: n >= 0, "an integer >= 0"), default=0,
                       help="how many hosts run this command")
    hosts.add_argument("--process_id", type=int, default=-1, help="this host's index (default: detected)")
    hosts.add_argument("--shared_out", action="store_true", help="the local OUT_DIR is one folder all hosts mount")
    hosts.add_argument("--resumable", action="store_true",
                       help="on one host: write parts as several hosts do, so an interrupted run resumes without "
                            "redoing finished parts")
    hosts.add_argument("--block_chars", type=cli.flag_type(int, lambda n: n >= 0, "an integer >= 0"), default=0,
                       help="characters per part; 0 = about 8 parts per host")
    return parser


def _main(argv) -> None:
    args = build_parser().parse_args(argv)
    settings = dict(text_field=args.text_field, recipe=args.recipe, split=args.split,
                    dataset_config=args.dataset_config, tokenizer=args.tokenizer)
    if args.process_id >= 0 and not (args.coordinator_address and args.num_processes):
        raise cli.UsageError("--process_id needs --coordinator_address and --num_processes (or use --distributed "
                             "alone where JAX detects the hosts, as on a TPU pod)")
    if args.distributed or args.coordinator_address or args.num_processes or args.resumable:
        from . import tokenize_hosts  # imports tokenize_corpus itself; jax only here
        try:
            return tokenize_hosts.run_command(args, settings)
        except OutputNotEmptyError as e:
            raise cli.UsageError(str(e)) from None
    try:
        same = existing_corpus(args.out_dir, corpus_inputs(args.source, **settings), overwrite=args.overwrite)
    except OutputNotEmptyError as e:
        raise cli.UsageError(str(e)) from None
    if same is not None:
        print(f"{args.out_dir} already holds this corpus ({same['num_tokens']:,} tokens from "
              f"{same['num_documents']:,} documents of the same files and settings): nothing to do; pass "
              "--overwrite to tokenize it again")
        return
    meta = tokenize_corpus(args.source, args.out_dir, **settings, num_threads=args.num_threads,
                           progress=args.progress, overwrite=args.overwrite, pass_folder_as="--tokenizer DIR")
    print(f"{meta['num_tokens']:,} tokens from {meta['num_documents']:,} documents -> {args.out_dir}")


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""Tokenize one corpus once, on all the hosts that will train on it: each host encodes only its share.

Split (the same on every host, with no coordination): the documents are read in the order a 1-process
`tokenize_corpus` reads them, as text pieces (`documents.iter_documents`; a text file's pieces end at safe
cuts), and grouped into blocks of about `block_chars` characters (`documents.batches`). Block b belongs to
process `b % num_processes`. Every host reads the whole source (cheap) but encodes only its blocks (the
expensive part); round-robin keeps the shares balanced whatever the documents' sizes.

Layout (order-preserving): block b becomes `part_BBBBB.bin` (raw uint16) and then its sidecar
`part_BBBBB.json` (its token and document counts, sha256 and the corpus inputs), each written whole under its
final name (for a recipe with prompts, its loss mask `mask_BBBBB.bin` first), in the shared output folder (a
`gs://` prefix, or a folder every host mounts). After a barrier, process 0 checks every part against its
sidecar and writes `meta.json` LAST, listing the parts in block order with their (different) token counts. The
concatenated stream is byte for byte the one a 1-process tokenization writes, with the same sha256 (pieces
encode independently, `<|endoftext|>` after each document); only the shard boundaries differ, and `TokenStore`
reads shards of any length, so both layouts (and corpora written before this one) load alike: the meta format
is unchanged (FORMAT_VERSION 1).

Rerun: a part whose sidecar matches its size is not encoded again; a host that died or a source that
vanished leaves no meta.json, so the same command on every host resumes. A part shorter or longer than its
sidecar says is an error naming it and the fix.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re

import numpy as np

from flax_gpt2.utils import file_io

from . import documents, remote_source, tokenize_corpus as tc
from .recipes import PROMPT_RECIPES

BLOCK_CHARS = 64 << 20  # the most text in one part (about 16M tokens, 32 MiB)
MIN_BLOCK_CHARS = 4 << 10  # a small corpus still gets a few blocks per host
BLOCKS_PER_HOST = 8  # when the source's size is known: about this many parts per host
BARRIER_TIMEOUT_S = 24 * 3600  # hosts wait for the slowest share: hours on a large corpus
_PART = re.compile(r"(part_\d{5,}\.(bin|json)|mask_\d{5,}\.bin)$")
_barriers = itertools.count()  # barrier names: the same sequence on every process


class PartError(ValueError):
    """A part of a cooperative tokenization is damaged or missing; the message names it and the fix."""


class JaxHosts:
    """The processes of a `jax.distributed` run (already initialized), agreeing at barriers."""

    def __init__(self, timeout_s: float = BARRIER_TIMEOUT_S):
        import jax
        from jax._src import distributed

        self.process_id, self.num_processes = jax.process_index(), jax.process_count()
        self._client = distributed.global_state.client
        self._timeout_ms = int(timeout_s * 1000)

    def agree(self, name: str, error: BaseException | None) -> None:
        """A barrier at which each process reports success or its `error`: raises `error` on the process that
        had it, and on the others a RuntimeError naming the first process that failed (no host waits forever)."""
        if self.num_processes > 1:
            key = f"flax_gpt2/tokenize_hosts/{next(_barriers)}-{name}"
            status = "ok" if error is None else f"{type(error).__name__}: {error}"[:2000]
            self._client.key_value_set(f"{key}/{self.process_id}", status)
            self._client.wait_at_barrier(key, self._timeout_ms)
            if error is None:
                for p in range(self.num_processes):
                    other = self._client.blocking_key_value_get(f"{key}/{p}", self._timeout_ms)
                    if other != "ok":
                        raise RuntimeError(f"process {p} failed ({other}); nothing was finished here: fix that and "
                                           "rerun the same command on every host (finished parts are kept)")
        if error is not None:
            raise error


class OneHost:
    """This process alone (no `jax.distributed`): the parts layout on one host, so that an interrupted
    tokenization resumes without redoing its finished parts (`tokenize_corpus --resumable`)."""

    process_id, num_processes = 0, 1

    def agree(self, name: str, error: BaseException | None) -> None:
        if error is not None:
            raise error


def tokenize_on_hosts(source: str, out_dir: str, *, hosts, shared: bool, not_shared: str, text_field: str = "text",
                      recipe: str = "text", split: str = "train", dataset_config: str = "", tokenizer: str = "",
                      num_threads: int = 0, block_chars: int = 0, overwrite: bool = False, fix: str = "",
                      pass_folder_as: str | None = None) -> tuple[dict, dict | None]:
    """Tokenizes `source` into `out_dir` (local or `gs://`), each of `hosts`' processes its share (see the
    module docstring); every process calls it with the same arguments. Returns `(meta, share)`: the corpus's
    meta.json dict and this process's counts (`documents`, `tokens`, `parts`, `skipped`), None when `out_dir`
    already held this corpus.

    A local `out_dir` must be `shared` by all hosts when there are several; else `not_shared` is raised (the
    message, naming the setting and the fix) before any work. `block_chars` 0 picks a size from the
    source's size. `fix` says how to repair a damaged part. Raises `tokenize_corpus.OutputNotEmptyError`
    as `tokenize_corpus` does, and `PartError` for a damaged part.
    """
    stamps = remote_source.remote_stamps(source)
    inputs = tc.corpus_inputs(source, text_field=text_field, recipe=recipe, split=split,
                              dataset_config=dataset_config, tokenizer=tokenizer, stamps=stamps)
    meta = _existing(out_dir, inputs, overwrite)
    if meta is not None:
        return meta, None
    if hosts.num_processes > 1 and not file_io.is_url(out_dir) and not shared:
        raise ValueError(not_shared)
    local = remote_source.download_source(source, inputs[:16]) if stamps is not None else source
    encoding = tc.gpt2_encoding(tokenizer, pass_folder_as=pass_folder_as)
    block_chars = block_chars or _auto_block_chars(local, hosts.num_processes)
    error = None
    if overwrite and hosts.process_id == 0:
        error = _attempt(_clear, out_dir)
    hosts.agree("cleared", error)  # nobody writes a part before the old ones are gone
    share = {"documents": 0, "tokens": 0, "parts": 0, "skipped": 0}
    num_blocks = [0]

    def my_share():
        docs = documents.iter_documents(local, text_field=text_field, split=split, dataset_config=dataset_config,
                                        recipe=recipe)
        for block, (texts, ends, scored) in enumerate(documents.batches(docs, block_chars)):
            num_blocks[0] = block + 1
            if block % hosts.num_processes != hosts.process_id:
                continue
            side = _finished_part(out_dir, block, inputs, fix)
            share["skipped"] += side is not None
            if side is None:
                side = _write_part(out_dir, block, texts, ends, encoding, inputs, num_threads or os.cpu_count() or 1,
                                   scored if recipe in PROMPT_RECIPES else None)
            share["documents"] += side["num_documents"]
            share["tokens"] += side["num_tokens"]
            share["parts"] += 1

    hosts.agree("parts", _attempt(my_share))
    logging.info("%s", share_line(hosts, share))
    meta, error = None, None
    if hosts.process_id == 0:
        try:
            meta = _write_meta(out_dir, num_blocks[0], hosts.num_processes, source=source, inputs=inputs,
                               encoding=encoding, block_chars=block_chars, fix=fix,
                               with_mask=recipe in PROMPT_RECIPES)
        except Exception as e:  # reported to every process at the barrier
            error = e
    hosts.agree("meta", error)
    return meta or json.loads(file_io.read_text(file_io.join(out_dir, "meta.json"))), share


def share_line(hosts, share: dict) -> str:
    """What one process did, for its log."""
    return (f"process {hosts.process_id} of {hosts.num_processes}: tokenized {share['documents']:,} documents, "
            f"{share['tokens']:,} tokens in {share['parts']} parts ({share['skipped']} already done)")


def _attempt(fn, *args) -> Exception | None:
    try:
        fn(*args)
    except Exception as e:  # reported to every process at the next barrier
        return e
    return None


def _auto_block_chars(source: str, num_processes: int) -> int:
    """About `BLOCKS_PER_HOST` blocks per host of a local source's bytes; `BLOCK_CHARS` for a dataset."""
    files = documents.resolve_files(source)
    if files is None:
        return BLOCK_CHARS
    total = sum(os.path.getsize(f) for f in files)
    return int(min(BLOCK_CHARS, max(MIN_BLOCK_CHARS, total // (BLOCKS_PER_HOST * num_processes))))


def _names(folder: str) -> list[str]:
    """The entries of a local folder or `gs://` prefix ([] if there is none)."""
    if file_io.is_url(folder):
        path = file_io.epath(folder)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if os.path.isfile(folder):
        raise tc.OutputNotEmptyError(f"{folder} is a file; the output must be a folder (new or empty)")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _read_json(path: str) -> dict | None:
    try:
        value = json.loads(file_io.read_text(path))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _size(path: str) -> int | None:
    if file_io.is_url(path):
        p = file_io.epath(path)
        return int(p.stat().length) if p.exists() else None
    return os.path.getsize(path) if os.path.isfile(path) else None


def _existing(out_dir: str, inputs: str, overwrite: bool) -> dict | None:
    """The meta of this corpus when `out_dir` holds it complete (and not `overwrite`); None when the folder is
    new, empty, or holds only parts (an interrupted run to resume); else `OutputNotEmptyError`."""
    names = _names(out_dir)
    if "meta.json" in names:
        meta = _read_json(file_io.join(out_dir, "meta.json"))
        if meta is not None and meta.get("inputs") == inputs and not overwrite:
            return meta
        if not overwrite:
            raise tc.OutputNotEmptyError(
                f"{out_dir} holds another tokenized corpus (of {(meta or {}).get('source')!r}, from other files or "
                "settings); nothing was written. Choose a new or empty folder, or pass --overwrite")
        return None
    strangers = [n for n in names if not _PART.match(n) and not n.startswith(".")]
    if strangers and not overwrite:
        raise tc.OutputNotEmptyError(f"{out_dir} is not empty and holds no tokenized corpus (it holds {strangers[0]}"
                                     "); nothing was written. Choose a new or empty folder, or pass --overwrite")
    return None


def _clear(out_dir: str) -> None:
    """Removes the corpus files of `out_dir` (meta.json first, then its shards and every part)."""
    meta = _read_json(file_io.join(out_dir, "meta.json")) or {}
    listed = {s.get("file") for s in meta.get("shards") or [] if isinstance(s, dict)}
    names = _names(out_dir)
    for name in ["meta.json"] + [n for n in names if _PART.match(n) or n in listed]:
        if name in names and "/" not in name and name not in ("", ".", ".."):
            file_io.epath(file_io.join(out_dir, name)).unlink()


def _finished_part(out_dir: str, block: int, inputs: str, fix: str) -> dict | None:
    """The sidecar of block `block` when its part is finished (for this corpus); None when it is to be
    written; `PartError` when the part's size is not what its sidecar says."""
    side_path = file_io.join(out_dir, f"part_{block:05d}.json")
    side = _read_json(side_path)
    if side is None or side.get("inputs") != inputs:
        return None  # never finished, or a leftover of another corpus: written again
    part = file_io.join(out_dir, f"part_{block:05d}.bin")
    _check_size(part, side, side_path, fix)
    return side


def _check_size(part: str, side: dict, side_path: str, fix: str) -> None:
    size = _size(part)
    if size != 2 * side.get("num_tokens", -1):
        held = "is missing" if size is None else f"is {size} bytes"
        raise PartError(f"{part} {held} but {side_path} gives it {side.get('num_tokens')} tokens: a damaged part "
                        f"(a truncated copy?); {fix}")


def _write_part(out_dir: str, block: int, texts: list[str], ends: list[bool], encoding, inputs: str,
                num_threads: int, scored: list[bool] | None = None) -> dict:
    """Encodes one block into `part_BBBBB.bin` (with `scored`, a recipe with prompts: its loss mask
    `mask_BBBBB.bin` too, as `tokenize_corpus` writes it), then its sidecar (so a sidecar means a complete
    part)."""
    pieces, flags, n_docs, n_text = [], [], 0, 0
    eot = np.array([encoding.eot_token], np.uint16)
    for ids, end, score in zip(encoding.encode_ordinary_batch(texts, num_threads=num_threads), ends,
                               scored or [True] * len(texts)):
        pieces.append(np.asarray(ids, np.uint16))
        flags.append(np.full(len(ids), score, np.uint8))
        n_text += len(ids)
        if end:
            pieces.append(eot)
            flags.append(np.ones(1, np.uint8))  # the completion predicts the <|endoftext|> that closes it
            n_docs += 1
    raw = np.concatenate(pieces).tobytes() if pieces else b""
    side = {"num_tokens": len(raw) // 2, "num_documents": n_docs, "num_text_tokens": n_text,
            "sha256": hashlib.sha256(raw).hexdigest(), "inputs": inputs}
    if scored is not None:
        mask = np.concatenate(flags).tobytes() if flags else b""
        file_io.atomic_write(file_io.join(out_dir, f"mask_{block:05d}.bin"), mask)
        side["mask_sha256"], side["num_scored"] = hashlib.sha256(mask).hexdigest(), sum(mask)
    file_io.atomic_write(file_io.join(out_dir, f"part_{block:05d}.bin"), raw)
    file_io.atomic_write(file_io.join(out_dir, f"part_{block:05d}.json"), json.dumps(side))
    return side


def _write_meta(out_dir: str, num_blocks: int, num_processes: int, *, source: str, inputs: str, encoding,
                block_chars: int, fix: str, with_mask: bool = False) -> dict:
    """Checks every part against its sidecar, then writes meta.json (last) listing them in block order."""
    shards, digest, n_docs, n_text = [], hashlib.sha256(), 0, 0
    mask_digest, n_scored = hashlib.sha256(), 0
    for block in range(num_blocks):
        part, side_path = (file_io.join(out_dir, f"part_{block:05d}.{ext}") for ext in ("bin", "json"))
        side = _read_json(side_path)
        if side is None or side.get("inputs") != inputs:
            raise PartError(f"{side_path} is missing: process {block % num_processes} did not finish its share; "
                            "rerun the same command on every host (finished parts are kept)")
        _check_size(part, side, side_path, fix)
        raw = file_io.read_bytes(part)
        if hashlib.sha256(raw).hexdigest() != side.get("sha256"):
            raise PartError(f"{part} does not match the sha256 in {side_path}: a damaged part; {fix}")
        digest.update(raw)
        n_docs, n_text = n_docs + side["num_documents"], n_text + side["num_text_tokens"]
        if with_mask:
            mask_path = file_io.join(out_dir, f"mask_{block:05d}.bin")
            mask = file_io.read_bytes(mask_path) if file_io.exists(mask_path) else None
            if mask is None or hashlib.sha256(mask).hexdigest() != side.get("mask_sha256"):
                raise PartError(f"{mask_path} is missing or does not match the sha256 in {side_path}: a damaged "
                                f"loss mask; {fix}")
            mask_digest.update(mask)
            n_scored += side["num_scored"]
        if side["num_tokens"]:
            shards.append({"file": f"part_{block:05d}.bin", "num_tokens": side["num_tokens"]})
            if with_mask:
                shards[-1]["mask_file"] = f"mask_{block:05d}.bin"
    if n_text == 0:
        raise ValueError(f"data source {source!r} has no text ({n_docs} empty documents): nothing to train on; "
                         "check the path, data.text_field (--text_field) or the recipe")
    meta = {"format": tc.FORMAT_VERSION, "dtype": "uint16", "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_documents": n_docs, "eot_token": encoding.eot_token, "vocab_size": encoding.n_vocab,
            "source": source, "inputs": inputs, "sha256": digest.hexdigest(), "shards": shards,
            "layout": {"parts": num_blocks, "block_chars": block_chars, "num_processes": num_processes}}
    if with_mask:
        meta["loss_mask"] = {"sha256": mask_digest.hexdigest(), "num_scored": n_scored}
    file_io.atomic_write(file_io.join(out_dir, "meta.json"), json.dumps(meta, indent=1))
    return meta


def run_command(args, settings: dict) -> None:
    """`tokenize_corpus`'s multi-host command line: joins the `jax.distributed` run its flags name (or the
    one a TPU pod / SLURM detects), tokenizes this host's share, and prints what it did. Without those flags
    (`--resumable`), this one process tokenizes everything in the same resumable layout."""
    if args.distributed or args.coordinator_address or args.num_processes:
        import jax

        kwargs = {"coordinator_address": args.coordinator_address or None,
                  "num_processes": args.num_processes or None,
                  "process_id": args.process_id if args.process_id >= 0 else None}
        jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
        hosts = JaxHosts()
    else:  # --resumable on one host
        hosts = OneHost()
    not_shared = (f"OUT_DIR {args.out_dir} is a local folder but {hosts.num_processes} processes tokenize into it "
                  "(each would see only its own parts): give a gs:// OUT_DIR, pass --shared_out if every host "
                  "mounts it (NFS), or tokenize on one host without the multi-host flags")
    fix = "rerun with --overwrite to tokenize the corpus again"
    meta, share = tokenize_on_hosts(args.source, args.out_dir, hosts=hosts, shared=args.shared_out,
                                    not_shared=not_shared, **settings, num_threads=args.num_threads,
                                    block_chars=args.block_chars, overwrite=args.overwrite, fix=fix,
                                    pass_folder_as="--tokenizer DIR")
    if share is None:
        print(f"{args.out_dir} already holds this corpus ({meta['num_tokens']:,} tokens): nothing to do; pass "
              "--overwrite to tokenize it again")
        return
    print(share_line(hosts, share))
    if hosts.process_id == 0:
        print(f"{meta['num_tokens']:,} tokens from {meta['num_documents']:,} documents -> {args.out_dir}")

"""A `gs://` data source (one text/jsonl object or a prefix of them): its files, their stamps, a local copy."""

from __future__ import annotations

import os

from flax_gpt2.utils import file_io
from flax_gpt2.utils.cache_root import cache_root

from . import documents


def file_stamp(path: str) -> list:
    """What identifies a source file's version: its path, size and modification time (local or remote)."""
    if file_io.is_url(path):
        stat = file_io.epath(path).stat()
        return [path, int(stat.length), float(stat.mtime)]
    return [os.path.abspath(path), os.path.getsize(path), os.path.getmtime(path)]


def remote_files(source: str) -> list[str]:
    """The files a `gs://` source names: the object itself, or every text/jsonl object under the prefix."""
    path = file_io.epath(source)
    if path.is_file():
        return [source]
    suffixes = documents.TEXT_SUFFIXES + documents.JSONL_SUFFIXES
    files = sorted(str(p) for p in path.iterdir() if str(p).endswith(suffixes)) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"data source {source!r} has no .txt or .jsonl objects")
    return files


def remote_stamps(source: str) -> list | None:
    """The stamps of a `gs://` source's files (for `tokenize_corpus.corpus_inputs`); None for a local source."""
    return [file_stamp(f) for f in remote_files(source)] if file_io.is_url(source) else None


def download_source(source: str, key: str) -> str:
    """A local copy of a remote text/jsonl source (a file or a folder of them), for the tokenizer, kept in
    `$FLAX_GPT2_CACHE/remote-sources/KEY` (`key` names the source's version)."""
    target = os.path.join(cache_root(), "remote-sources", key)
    os.makedirs(target, exist_ok=True)
    for url in remote_files(source):
        local = os.path.join(target, os.path.basename(url))
        if not os.path.exists(local):
            file_io.atomic_write(local, file_io.read_bytes(url))
    return target  # a folder of the source's files, read in name order as a local folder would be

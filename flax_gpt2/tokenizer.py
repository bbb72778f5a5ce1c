"""GPT-2's byte-level BPE tokenizer: tiktoken's fast encoder, fed from Hugging Face folder files.

`get_tokenizer(name_or_path)` builds a `Tokenizer` from, in this order:

1. a local folder holding `vocab.json` + `merges.txt` (Hugging Face's names) or `encoder.json` +
   `vocab.bpe` (OpenAI's names for the same two files);
2. for a hub name: those files from the Hugging Face hub (its cache, or a download when online). For
   OpenAI's GPT-2 names (`"gpt2"`, `"openai-community/gpt2-xl"`, `"distilgpt2"`, ...) and for `None`, which
   means the standard GPT-2 encoding, tiktoken's own `gpt2` encoding stands in, and local copies (either
   cache) are tried before the network. With no network, the error says how to work offline.

Files are checked against the sha256 sums tiktoken expects for GPT-2. Files that differ only in their
JSON formatting (say, re-saved by transformers) are still the standard encoding. Files with a different
vocabulary (your own BPE) work too, through tiktoken, with a one-line warning that the ids are not
GPT-2's. vocab.json entries that no merge produces become special tokens; a GPT-2-sized vocabulary
with any of them besides `<|endoftext|>`, or any vocabulary with more than 64, is an error (merges.txt
was truncated or belongs to another tokenizer).

Special tokens: `encode` treats `<|endoftext|>` found in text as plain text by default, so text typed
by a user or found in a corpus can never inject the end-of-text id. Pass
`allowed_special=USER_TEXT_SPECIAL` (that is, `{"<|endoftext|>"}`) to encode it as id 50256, e.g. for
the CommonGen prompt `"<|endoftext|> kid, room, dance:"`, as `sample`, `pipeline` and `evaluate` do;
they never recognise a custom BPE's other special tokens in user text.
Hugging Face's GPT-2 tokenizer differs here: by default it encodes that string as 50256 (its
`split_special_tokens=True` gives our default).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import types
import warnings
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import tiktoken

from flax_gpt2 import file_io

ENDOFTEXT = "<|endoftext|>"
# The special tokens recognised in text a user types or a corpus holds (`sample`, `pipeline`, `evaluate`):
# `<|endoftext|>` only, which GPT-2 knows as its document separator (e.g. the CommonGen prompt).
USER_TEXT_SPECIAL = frozenset({ENDOFTEXT})

# GPT-2's pre-tokenizer regex, as tiktoken writes it (tiktoken_ext/openai_public.py, `r50k_pat_str`):
# equivalent to OpenAI's original r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""".
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# sha256 of OpenAI's GPT-2 `encoder.json` and `vocab.bpe`, as tiktoken checks them (Hugging Face's gpt2
# folders hold the same content as `vocab.json` and `merges.txt`).
GPT2_VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# sha256 of the vocabulary itself (see `_vocab_digest`), whatever the files' formatting.
_GPT2_VOCAB_DIGEST = "b252cf10820e12b2c6e8df336a6af85430b50d7647a8cb91700d6e1f641f211a"

# Where tiktoken downloads GPT-2 from (tiktoken_ext/openai_public.py); its cache file names derive from these.
_TIKTOKEN_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
_TIKTOKEN_SHA256 = (GPT2_MERGES_SHA256, GPT2_VOCAB_SHA256)

# Hub names whose tokenizer is the standard GPT-2 one (so tiktoken's `gpt2` encoding may stand in),
# each with the names the hub cache may hold it under.
_GPT2_HUB_NAMES = {
    **{name: (name, f"openai-community/{name}") for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
    **{f"openai-community/{name}": (f"openai-community/{name}", name)
       for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
    "distilgpt2": ("distilgpt2", "distilbert/distilgpt2"),
    "distilbert/distilgpt2": ("distilbert/distilgpt2", "distilgpt2"),
}

GPT2_VOCAB_SIZE = 50257
# Special tokens besides <|endoftext|> that a custom BPE's vocab.json may hold (entries no merge produces);
# more means merges.txt stops short of the vocabulary (see `_check_merges_cover_vocab`).
_MAX_EXTRA_SPECIAL_TOKENS = 64

# Below this many characters in all, encode_batch encodes in the calling thread (threads cost ~0.1 ms to start).
_MIN_CHARS_FOR_THREADS = 1 << 16

# The two file-name pairs a folder may use: Hugging Face's, then OpenAI's.
_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte in `vocab.json`/`merges.txt` (HF's `bytes_to_unicode`).

    Printable non-space bytes stand for themselves; the others become chr(256), chr(257), ... in byte order.
    """
    table = {b: chr(b) for b in range(256) if chr(b).isprintable() and chr(b) != " "}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


_BYTE_TO_CHAR = _byte_to_char()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _token_str(token: bytes) -> str:
    """A token's bytes as written in `vocab.json` (e.g. b" the" -> "Ġthe")."""
    return "".join(_BYTE_TO_CHAR[b] for b in token)


class Tokenizer:
    """GPT-2 byte-level BPE over a `tiktoken.Encoding`.

    Build one with `get_tokenizer`. Ids are plain ints (`encode`) or int32 numpy arrays (`encode_batch`).
    """

    def __init__(self, encoding: tiktoken.Encoding, *, name_or_path: str | None = None,
                 is_standard_gpt2: bool | None = None):
        if ENDOFTEXT not in encoding.special_tokens_set:
            raise ValueError(f"encoding {encoding.name!r} has no {ENDOFTEXT!r} special token")
        self.encoding = encoding
        self.name_or_path = name_or_path
        self._is_standard_gpt2 = is_standard_gpt2
        self._special_tokens = {t: encoding.encode_single_token(t) for t in encoding.special_tokens_set}
        self._ranks: dict[bytes, int] | None = None
        self._vocab: dict[str, int] | None = None
        self._files: tuple[str, str] | None = None  # the vocab.json + merges.txt it was read from

    def __repr__(self) -> str:
        return (f"Tokenizer({self.encoding.name!r}, vocab_size={self.vocab_size}, "
                f"name_or_path={self.name_or_path!r})")

    # ---- vocabulary ----

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot_token(self) -> int:
        """Id of `<|endoftext|>` (50256 for GPT-2): GPT-2's document separator, EOS and BOS."""
        return self._special_tokens[ENDOFTEXT]

    eos_token_id = eot_token

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def is_standard_gpt2(self) -> bool:
        """Whether this is exactly GPT-2's vocabulary, merges and special token (ids match OpenAI's models)."""
        if self._is_standard_gpt2 is None:
            digest = _vocab_digest(self._mergeable_ranks(), self._special_tokens)
            self._is_standard_gpt2 = digest == _GPT2_VOCAB_DIGEST
        return self._is_standard_gpt2

    @property
    def mergeable_ranks(self) -> types.MappingProxyType[bytes, int]:
        """Token bytes -> id for every BPE token (special tokens excluded): tiktoken's rank table, read-only."""
        return types.MappingProxyType(self._mergeable_ranks())

    def _mergeable_ranks(self) -> dict[bytes, int]:
        if self._ranks is None:
            special = set(self._special_tokens.values())
            self._ranks = {self.encoding.decode_single_token_bytes(i): i
                           for i in range(self.vocab_size) if i not in special}
        return self._ranks

    def get_vocab(self) -> dict[str, int]:
        """`vocab.json`'s dict: byte-level token strings ("Ġthe") and special tokens -> id, in id order."""
        if self._vocab is None:
            vocab = {_token_str(t): i for t, i in self._mergeable_ranks().items()}
            vocab.update(self._special_tokens)
            self._vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
        return dict(self._vocab)

    def token_to_id(self, token: str | bytes) -> int:
        """Id of a token given as in `vocab.json` ("Ġthe", "<|endoftext|>") or as raw bytes (b" the")."""
        if isinstance(token, bytes):
            if token not in self._mergeable_ranks():
                raise KeyError(f"{token!r} is not a token of this vocabulary")
            return self._mergeable_ranks()[token]
        if self._vocab is None:
            self.get_vocab()
        if token not in self._vocab:
            raise KeyError(f"{token!r} is not in the vocabulary (tokens are written as in vocab.json, e.g. 'Ġthe')")
        return self._vocab[token]

    def id_to_token(self, token_id: int) -> str:
        """The token with this id, written as in `vocab.json` ("Ġthe", "<|endoftext|>")."""
        token_id = self._check_id(token_id)
        for name, i in self._special_tokens.items():
            if i == token_id:
                return name
        return _token_str(self.encoding.decode_single_token_bytes(token_id))

    def _check_id(self, token_id) -> int:
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
            raise TypeError(f"token id must be an int, got {type(token_id).__name__}")
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {int(token_id)} is out of range [0, {self.vocab_size})")
        return int(token_id)

    # ---- encoding ----

    def _special_args(self, allowed_special, disallowed_special):
        for arg_name, arg in (("allowed_special", allowed_special), ("disallowed_special", disallowed_special)):
            if arg == "all":
                continue
            if isinstance(arg, str):
                raise TypeError(f"{arg_name} must be 'all' or a set of special tokens, e.g. {{{ENDOFTEXT!r}}}; "
                                f"got the string {arg!r}")
            unknown = sorted(set(arg) - self.encoding.special_tokens_set)
            if unknown:
                raise ValueError(f"{arg_name} names unknown special tokens {unknown}; "
                                 f"this tokenizer has {sorted(self.encoding.special_tokens_set)}")
        if allowed_special != "all":
            allowed_special = frozenset(allowed_special)
        return allowed_special, disallowed_special

    def encode(self, text: str, *, allowed_special: Literal["all"] | Collection[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = ()) -> list[int]:
        """Token ids of `text`.

        Args:
            text: the string to encode. No BOS/EOS is added.
            allowed_special: special tokens (`"all"` or e.g. `{"<|endoftext|>"}`) that, written in `text`,
                become their special id. By default none: `"<|endoftext|>"` in text is encoded as the
                ordinary pieces `<`, `|`, `end`, ... (Hugging Face's default would give 50256).
            disallowed_special: special tokens whose presence in `text` raises a ValueError, as in
                tiktoken (`"all"` means every special token not allowed). By default none.

        Returns:
            A list of ints.
        """
        if not isinstance(text, str):
            hint = "; use encode_batch for a list of strings" if isinstance(text, (list, tuple)) else ""
            raise TypeError(f"encode expects a str, got {type(text).__name__}{hint}")
        allowed_special, disallowed_special = self._special_args(allowed_special, disallowed_special)
        return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

    def encode_batch(self, texts: Sequence[str], *, max_length: int | None = None,
                     padding_side: Literal["left", "right"] = "left", pad_id: int | None = None,
                     truncation_side: Literal["left", "right"] = "right",
                     allowed_special: Literal["all"] | Collection[str] = frozenset(),
                     disallowed_special: Literal["all"] | Collection[str] = (),
                     num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encodes strings in parallel (threads over tiktoken's encoder) into one padded batch.

        Args:
            texts: the strings.
            max_length: every row's length L. Longer texts are truncated; `None` pads to the longest text.
            padding_side: "left" (the default, for generation: each prompt ends at the last column) or "right".
            pad_id: the id written in padded slots (default `eot_token`); the mask marks them anyway.
            truncation_side: which end of a too-long text to drop: "right" (keep the beginning, as in
                Hugging Face) or "left" (keep the end, closest to where generation continues).
            allowed_special, disallowed_special: as in `encode`.
            num_threads: worker threads for large batches (default: the CPU count, at most 8); small batches
                are encoded in the calling thread.

        Returns:
            `(ids, attention_mask)`, int32 numpy arrays of shape [B, L]; the mask is 1 on tokens, 0 on padding.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a list of strings (for one string, use encode or pass [text])")
        for arg_name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{arg_name} must be 'left' or 'right', got {side!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
                                       or max_length <= 0):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        pad_id = self.eot_token if pad_id is None else pad_id
        if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
            raise TypeError(f"pad_id must be an int, got {type(pad_id).__name__}")
        if not np.iinfo(np.int32).min <= pad_id <= np.iinfo(np.int32).max:
            raise ValueError(f"pad_id {pad_id} does not fit in int32")
        allowed_special, disallowed_special = self._special_args(allowed_special, disallowed_special)
        num_threads = min(8, os.cpu_count() or 1) if num_threads is None else num_threads
        rows = self._encode_many(list(texts), num_threads, allowed_special=allowed_special,
                                 disallowed_special=disallowed_special)
        length = max_length if max_length is not None else max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), length), pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), length), dtype=np.int32)
        for b, row in enumerate(rows):
            if len(row) > length:
                row = row[:length] if truncation_side == "right" else row[len(row) - length:]
            start = length - len(row) if padding_side == "left" else 0
            ids[b, start:start + len(row)] = row
            mask[b, start:start + len(row)] = 1
        return ids, mask

    def _encode_many(self, texts: list[str], num_threads: int, **special) -> list[list[int]]:
        """tiktoken's encode over threads (it releases the GIL), one contiguous chunk of texts per thread.

        tiktoken's own `encode_batch` submits one task per text: on 32,777 short lines that took 1.4 s
        against 0.19 s for a plain loop (2 cores). Chunks keep the parallelism without that overhead.
        """
        encode = functools.partial(self.encoding.encode, **special)
        if num_threads <= 1 or len(texts) < 2 or sum(map(len, texts)) < _MIN_CHARS_FOR_THREADS:
            return [encode(t) for t in texts]
        size = -(-len(texts) // num_threads)
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        with ThreadPoolExecutor(len(chunks)) as pool:
            return [row for rows in pool.map(lambda chunk: [encode(t) for t in chunk], chunks) for row in rows]

    # ---- decoding ----

    def _as_ids(self, ids, ndim: int) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.size == 0:
            return np.zeros((0,) * ndim, dtype=np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.ndim != ndim:
            hint = "; use decode_batch for a batch" if ndim == 1 and arr.ndim == 2 else ""
            raise ValueError(f"expected {ndim}-D token ids, got shape {arr.shape}{hint}")
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(arr[bad][0])} is out of range [0, {self.vocab_size})")
        return arr

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D sequence of ids (list, tuple, numpy or jax array, or one int).

        Nothing is skipped unless `skip_special_tokens=True` (which drops `<|endoftext|>`, padding included
        when it is the pad id). Bytes that do not form valid UTF-8 (e.g. half of an emoji) become U+FFFD.
        """
        if isinstance(ids, str):
            raise TypeError("decode expects token ids, got a str")
        arr = self._as_ids(ids if np.ndim(ids) != 0 else [ids], ndim=1)
        tokens = arr.tolist()
        if skip_special_tokens:
            special = set(self._special_tokens.values())
            tokens = [t for t in tokens if t not in special]
        return self.encoding.decode(tokens)

    def decode_batch(self, ids, attention_mask=None, *, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a [B, L] batch of ids; positions where `attention_mask` is 0 (padding) are dropped."""
        arr = self._as_ids(ids, ndim=2)
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.shape != arr.shape:
                raise ValueError(f"attention_mask shape {attention_mask.shape} != ids shape {arr.shape}")
        return [self.decode(row if attention_mask is None else row[attention_mask[b] != 0],
                            skip_special_tokens=skip_special_tokens) for b, row in enumerate(arr)]

    # ---- saving ----

    def merges(self) -> list[str]:
        """`merges.txt`'s lines ("Ġ t"), rebuilt from the rank table: each token's last merge is the split
        BPE reaches when only lower-ranked merges are allowed."""
        ranks = self._mergeable_ranks()
        lines = []
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(token) < 2:
                continue
            parts = _bpe(ranks, token, max_rank=rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} (id {rank}) is not the merge of two lower-ranked tokens; "
                                 f"this vocabulary cannot be written as merges.txt")
            lines.append(f"{_token_str(parts[0])} {_token_str(parts[1])}")
        return lines

    def save(self, folder: str | os.PathLike) -> tuple[str, str]:
        """Writes `vocab.json` and `merges.txt` in `folder` (created if needed), as GPT-2 hub folders have them.

        For the standard encoding both files are byte-identical to OpenAI's `encoder.json` and `vocab.bpe`.
        Existing files are replaced only once both new ones are complete (see `file_io.staged_folder`).

        Returns:
            The two paths written.
        """
        folder = Path(folder)
        # json.dumps' defaults (", ", ": ", ASCII escapes) are exactly encoder.json's formatting.
        vocab = json.dumps(self.get_vocab())
        merges = "#version: 0.2\n" + "".join(m + "\n" for m in self.merges())
        # Both files complete before either replaces an older one: a crash or a full disk never leaves a
        # truncated merges.txt, nor a new vocab.json next to a merges.txt it does not belong with.
        with file_io.staged_folder(folder) as staging:
            for name, text in (("vocab.json", vocab), ("merges.txt", merges)):
                with open(os.path.join(staging, name), "w", encoding="utf-8", newline="\n") as f:
                    f.write(text)
        return str(folder / "vocab.json"), str(folder / "merges.txt")


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair merges of `token`, lowest rank first, using only ranks below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def _vocab_digest(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> str:
    """sha256 of an encoding's content (ids, token bytes, special tokens), independent of file formatting."""
    h = hashlib.sha256()
    for token, i in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(b"%d %s\n" % (i, token.hex().encode()))
    for name, i in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        h.update(b"%d special %s\n" % (i, name.encode()))
    return h.hexdigest()


# ---- reading vocab.json + merges.txt ----


def _read_vocab(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{path} must hold a non-empty JSON object {{token: id}}, got {type(vocab).__name__}")
    for token, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"{path}: the id of {token!r} must be an int, got {i!r}")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        seen, problem = set(), None
        for i in ids:
            if i in seen:
                problem = f"id {i} is used twice"
                break
            seen.add(i)
        problem = problem or f"ids must be 0..{len(ids) - 1}, got {ids[0]}..{ids[-1]}"
        raise ValueError(f"{path}: {problem}")
    return vocab


def _decode_token(token: str, path: str, where: str) -> bytes:
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise ValueError(f"{path}{where}: {token!r} has the character {e.args[0]!r}, which is not one of "
                         f"GPT-2's byte-level stand-ins for bytes") from None


def _read_merges(path: str) -> list[tuple[str, str, int]]:
    """(left, right, line number) per merge; the "#version" header and blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8: {e}") from None
    merges = []
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{path}, line {lineno}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1], lineno))
    return merges


def _ranks_from_files(vocab_file: str, merges_file: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """tiktoken's (mergeable_ranks, special_tokens) from a Hugging Face-style vocab.json + merges.txt.

    Like tiktoken's `data_gym_to_mergeable_bpe_ranks`, with errors naming the file and line. (That
    function also copies local files into tiktoken's download cache, keyed by path, and may later read
    back a stale copy; hence our own reader.) tiktoken uses each token's id as its merge priority, so
    merged tokens' ids must increase in merges.txt order, as in every BPE trained the usual way.
    """
    vocab = _read_vocab(vocab_file)
    merges = _read_merges(merges_file)
    ranks: dict[bytes, int] = {}
    for b, char in _BYTE_TO_CHAR.items():
        if char not in vocab:
            raise ValueError(f"{vocab_file} has no entry for byte {b} ({char!r}); a byte-level BPE needs all 256")
        ranks[bytes([b])] = vocab[char]
    previous = None
    for left, right, lineno in merges:
        where = f", line {lineno}"
        for part in (left, right):
            if part not in vocab:
                raise ValueError(f"{merges_file}{where}: {part!r} is not in {vocab_file}")
        merged = left + right
        if merged not in vocab:
            raise ValueError(f"{merges_file}{where}: the merge {left!r} + {right!r} gives {merged!r}, which is "
                             f"not in {vocab_file}; the two files do not belong together")
        token = _decode_token(merged, merges_file, where)
        if token in ranks:
            raise ValueError(f"{merges_file}{where}: {merged!r} is produced by an earlier merge too")
        i = vocab[merged]
        if previous is not None and i <= previous[0]:
            raise ValueError(f"{merges_file}{where}: {merged!r} has id {i} in {vocab_file}, not above the id "
                             f"{previous[0]} of {previous[2]!r} (line {previous[1]}); tiktoken needs ids in "
                             f"merge order")
        ranks[token] = i
        previous = (i, lineno, merged)
    ranked = {_token_str(t) for t in ranks}
    special_tokens = {t: i for t, i in vocab.items() if t not in ranked}
    if ENDOFTEXT not in special_tokens:
        raise ValueError(f"{vocab_file} has no {ENDOFTEXT!r} entry (GPT-2's end-of-text token)")
    _check_merges_cover_vocab(vocab_file, merges_file, vocab, len(merges), special_tokens)
    return ranks, special_tokens


def _check_merges_cover_vocab(vocab_file: str, merges_file: str, vocab: dict[str, int], n_merges: int,
                              unmerged: dict[str, int]) -> None:
    """A ValueError when merges.txt leaves much of vocab.json unreached (a truncated or mismatched file).

    Entries that are neither a byte nor produced by a merge can only be special tokens. A BPE has a few
    (`<|endoftext|>`, maybe a pad token); a GPT-2-shaped vocabulary (50257 entries, `<|endoftext|>` last)
    has exactly one, and more than `_MAX_EXTRA_SPECIAL_TOKENS` means the merges stop short of the
    vocabulary: loading it anyway would turn ordinary tokens into special ones.
    """
    extra = sorted((i, t) for t, i in unmerged.items() if t != ENDOFTEXT)
    gpt2_shaped = len(vocab) == GPT2_VOCAB_SIZE and vocab[ENDOFTEXT] == GPT2_VOCAB_SIZE - 1
    if not extra or (not gpt2_shaped and len(extra) <= _MAX_EXTRA_SPECIAL_TOKENS):
        return
    shown = ", ".join(f"{t!r} (id {i})" for i, t in extra[:3]) + (", ..." if len(extra) > 3 else "")
    expected = f"; GPT-2's vocabulary needs {GPT2_VOCAB_SIZE - 257} merges" if gpt2_shaped else ""
    raise ValueError(f"{merges_file} ({n_merges} merges) does not cover {vocab_file}: {len(extra)} entries are "
                     f"produced by no merge ({shown}){expected}. merges.txt is truncated or belongs to another "
                     f"tokenizer; copy both files from the same source")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _from_files(vocab_file: str, merges_file: str, name_or_path: str | None) -> Tokenizer:
    """A Tokenizer from one vocab.json + merges.txt pair, checked against GPT-2's (see `get_tokenizer`)."""
    for path in (vocab_file, merges_file):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
    ranks, special_tokens = _ranks_from_files(vocab_file, merges_file)
    same_bytes = _sha256(vocab_file) == GPT2_VOCAB_SHA256 and _sha256(merges_file) == GPT2_MERGES_SHA256
    standard = same_bytes or _vocab_digest(ranks, special_tokens) == _GPT2_VOCAB_DIGEST
    if standard:
        encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=special_tokens, explicit_n_vocab=50257)
    else:
        encoding = tiktoken.Encoding(f"custom-bpe:{vocab_file}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=special_tokens)
    tokenizer = Tokenizer(encoding, name_or_path=name_or_path, is_standard_gpt2=standard)
    tokenizer._ranks = ranks  # spares reading them back from tiktoken
    tokenizer._files = (vocab_file, merges_file)
    return tokenizer


def _warn_if_custom(tokenizer: Tokenizer) -> None:
    if tokenizer.is_standard_gpt2:
        return
    vocab_file, merges_file = tokenizer._files
    special = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    shown = ", ".join(map(repr, special[:4])) + (f" and {len(special) - 4} more" if len(special) > 4 else "")
    warnings.warn(f"{vocab_file} and {merges_file} are not GPT-2's BPE files: a custom encoding of "
                  f"{tokenizer.vocab_size} tokens (special: {shown}) whose ids do not match OpenAI's GPT-2 "
                  f"checkpoints", UserWarning, stacklevel=3)


def _from_folder(folder: str) -> Tokenizer:
    for vocab_name, merges_name in _FILE_PAIRS:
        vocab_file, merges_file = os.path.join(folder, vocab_name), os.path.join(folder, merges_name)
        if os.path.isfile(vocab_file) or os.path.isfile(merges_file):
            for missing, present in ((vocab_file, merges_name), (merges_file, vocab_name)):
                if not os.path.isfile(missing):
                    raise FileNotFoundError(f"{missing} is missing: the folder has {present}, and a tokenizer "
                                            f"needs both {vocab_name} and {merges_name}")
            return _from_files(vocab_file, merges_file, name_or_path=folder)
    found = sorted(os.listdir(folder))
    raise FileNotFoundError(f"no tokenizer files in {folder}: expected vocab.json + merges.txt (or encoder.json + "
                            f"vocab.bpe); found {found[:20]}")


# ---- hub and tiktoken ----


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _tiktoken_cache_has_gpt2() -> bool:
    """Whether tiktoken can build `gpt2` without downloading (mirrors tiktoken.load.read_file_cached)."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:  # "" disables tiktoken's cache
        return False
    for url, sha in zip(_TIKTOKEN_URLS, _TIKTOKEN_SHA256):
        path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
        if not os.path.isfile(path) or _sha256(path) != sha:
            return False
    return True


def _offline_help(name: str, errors: Iterable[str]) -> str:
    tried = "".join(f"\n  - {e}" for e in errors)
    return (f"could not load the tokenizer for {name!r}; tried:{tried}\n"
            "To work offline, either pass a local folder that holds vocab.json + merges.txt (or encoder.json + "
            "vocab.bpe), e.g. get_tokenizer('/path/to/gpt2'), or point TIKTOKEN_CACHE_DIR at a folder holding "
            "tiktoken's GPT-2 files (fill it once, with network access: TIKTOKEN_CACHE_DIR=/path/to/cache "
            "python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"). "
            "Set HF_HUB_OFFLINE=1 to skip the network look-ups.")


def _from_hub(repo_id: str, name: str, errors: list[str], local_files_only: bool) -> Tokenizer | None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        errors.append("Hugging Face hub: huggingface_hub is not installed")
        return None
    try:
        files = [hf_hub_download(repo_id, f, local_files_only=local_files_only) for f in _FILE_PAIRS[0]]
    except Exception as e:  # not cached, offline, no such repo, ...: the caller tries the next source
        reason = "not in the local cache" if local_files_only else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        errors.append(f"Hugging Face hub {repo_id!r} (vocab.json + merges.txt): {reason}")
        return None
    return _from_files(*files, name_or_path=name)


def _from_tiktoken(name: str, errors: list[str]) -> Tokenizer | None:
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network, unwritable cache, ...
        errors.append(f"tiktoken 'gpt2': {type(e).__name__}: {e}")
        return None
    # tiktoken checked the files' sha256 sums itself.
    return Tokenizer(encoding, name_or_path=name, is_standard_gpt2=True)


def _from_hub_or_tiktoken(name: str) -> Tokenizer:
    errors: list[str] = []
    offline = _hub_offline()
    if name not in _GPT2_HUB_NAMES:
        tokenizer = _from_hub(name, name, errors, local_files_only=offline)
        if tokenizer is None:
            raise OSError(_offline_help(name, errors))
        return tokenizer
    # OpenAI's GPT-2 files never change, so any local copy (hub cache under either name, or tiktoken's
    # cache) is used before the network is touched: without network, huggingface_hub retries for ~20 s.
    for repo_id in _GPT2_HUB_NAMES[name]:
        if tokenizer := _from_hub(repo_id, name, errors, local_files_only=True):
            return tokenizer
    if not _tiktoken_cache_has_gpt2():
        errors.append("tiktoken 'gpt2': not in its cache (TIKTOKEN_CACHE_DIR)")
    elif tokenizer := _from_tiktoken(name, errors):
        return tokenizer
    if not offline and (tokenizer := _from_hub(_GPT2_HUB_NAMES[name][0], name, errors, local_files_only=False)
                        or _from_tiktoken(name, errors)):
        return tokenizer
    raise OSError(_offline_help(name, errors))


def get_tokenizer(name_or_path: str | os.PathLike | None = None) -> Tokenizer:
    """The GPT-2 tokenizer of a model folder, a hub model, or (`None`) the standard GPT-2 encoding.

    Args:
        name_or_path: a folder with `vocab.json` + `merges.txt` (or `encoder.json` + `vocab.bpe`); a hub
            name (`"gpt2"`, `"openai-community/gpt2-medium"`, `"user/model"`), looked up in the Hugging
            Face cache (downloaded when online) and, for OpenAI's GPT-2 names, in tiktoken's cache
            (`TIKTOKEN_CACHE_DIR`); or `None` for the standard GPT-2 encoding (same as `"gpt2"`).

    Returns:
        A `Tokenizer`. Files whose sha256 sums are the ones tiktoken expects for GPT-2, or whose vocabulary
        is GPT-2's in different JSON formatting, give the standard encoding (`is_standard_gpt2=True`). Other
        valid BPE files give a custom encoding and a UserWarning saying so.

    Raises:
        FileNotFoundError: a folder is missing one of the two files, or a path does not exist.
        ValueError: a file is malformed (the message names the file and line), or the files disagree.
        OSError: a hub name could not be loaded (e.g. no network); the message says how to work offline.
    """
    if name_or_path is None:  # never a folder that happens to be called "gpt2"
        return _from_hub_or_tiktoken("gpt2")
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        tokenizer = _from_folder(path)
    elif os.path.exists(path):
        raise ValueError(f"{path} is a file; pass the folder that holds vocab.json + merges.txt")
    elif (isinstance(name_or_path, os.PathLike) or path.startswith((".", "/", "~")) or "\\" in path
          or path.count("/") > 1):  # not a hub name ("user/model")
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    else:
        tokenizer = _from_hub_or_tiktoken(path)
    _warn_if_custom(tokenizer)
    return tokenizer


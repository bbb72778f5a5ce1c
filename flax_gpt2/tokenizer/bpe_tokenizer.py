"""GPT-2's byte-level BPE tokenizer: tiktoken's fast encoder, fed from Hugging Face folder files.

`get_tokenizer(name_or_path)` builds a `Tokenizer` from, in this order:

1. a local folder holding `vocab.json` + `merges.txt` (Hugging Face's names) or `encoder.json` +
   `vocab.bpe` (OpenAI's names for the same two files);
2. for a hub name: those files from the Hugging Face hub (its cache, or a download when online). For
   OpenAI's GPT-2 names (`"gpt2"`, `"openai-community/gpt2-xl"`, `"distilgpt2"`, ...) and for `None`, which
   means the standard GPT-2 encoding, the copy of GPT-2's files shipped in the package (`flax_gpt2.assets`)
   is used, offline; only if that copy is damaged are the caches (the hub's, tiktoken's) and then the
   network tried. With no network, the error says how to work offline.

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

This module holds the `Tokenizer` and `get_tokenizer`; reading and writing the two files (and
`tokenizer_files`, whether a folder holds them) is `flax_gpt2.tokenizer.bpe_files`, and where a name's files come
from (folder, hub, tiktoken's cache, the network) is `flax_gpt2.tokenizer.sources`.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import tiktoken

from flax_gpt2.tokenizer import bpe_files, sources
from flax_gpt2.tokenizer.bpe_files import (ENDOFTEXT, GPT2_MERGES_SHA256, GPT2_VOCAB_SHA256, GPT2_VOCAB_SIZE,
                                           tokenizer_files)

__all__ = ["ENDOFTEXT", "USER_TEXT_SPECIAL", "GPT2_PATTERN", "GPT2_VOCAB_SHA256", "GPT2_MERGES_SHA256",
           "GPT2_VOCAB_SIZE", "Tokenizer", "get_tokenizer", "tokenizer_files"]

# The special tokens recognised in text a user types or a corpus holds (`sample`, `pipeline`, `evaluate`):
# `<|endoftext|>` only, which GPT-2 knows as its document separator (e.g. the CommonGen prompt).
USER_TEXT_SPECIAL = frozenset({ENDOFTEXT})

# GPT-2's pre-tokenizer regex, as tiktoken writes it (tiktoken_ext/openai_public.py, `r50k_pat_str`):
# equivalent to OpenAI's original r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""".
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# Below this many characters in all, encode_batch encodes in the calling thread (threads cost ~0.1 ms to start).
_MIN_CHARS_FOR_THREADS = 1 << 16


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
            self._is_standard_gpt2 = bpe_files.is_gpt2_vocab(self._mergeable_ranks(), self._special_tokens)
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
            vocab = {bpe_files.token_str(t): i for t, i in self._mergeable_ranks().items()}
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
        return bpe_files.token_str(self.encoding.decode_single_token_bytes(token_id))

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
        return bpe_files.merges_lines(self._mergeable_ranks())

    def save(self, folder: str | os.PathLike) -> tuple[str, str]:
        """Writes `vocab.json` and `merges.txt` in `folder` (created if needed), as GPT-2 hub folders have them.

        For the standard encoding both files are byte-identical to OpenAI's `encoder.json` and `vocab.bpe`.
        Existing files are replaced only once both new ones are complete (see `file_io.staged_folder`).

        Returns:
            The two paths written.
        """
        return bpe_files.write_files(folder, self.get_vocab(), self.merges())


def _from_files(vocab_file: str, merges_file: str, name_or_path: str | None) -> Tokenizer:
    """A Tokenizer from one vocab.json + merges.txt pair, checked against GPT-2's (see `get_tokenizer`)."""
    for path in (vocab_file, merges_file):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
    ranks, special_tokens = bpe_files.read_ranks(vocab_file, merges_file)
    standard = (bpe_files.are_gpt2_files(vocab_file, merges_file)
                or bpe_files.is_gpt2_vocab(ranks, special_tokens))
    if standard:
        encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=special_tokens, explicit_n_vocab=GPT2_VOCAB_SIZE)
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


def get_tokenizer(name_or_path: str | os.PathLike | None = None, *,
                  pass_folder_as: str = sources.PASS_FOLDER_AS) -> Tokenizer:
    """The GPT-2 tokenizer of a model folder, a hub model, or (`None`) the standard GPT-2 encoding.

    Args:
        name_or_path: a folder with `vocab.json` + `merges.txt` (or `encoder.json` + `vocab.bpe`); a hub
            name (`"gpt2"`, `"openai-community/gpt2-medium"`, `"user/model"`), looked up in the Hugging
            Face cache (downloaded when online); or `None` for the standard GPT-2 encoding (same as
            `"gpt2"`). OpenAI's GPT-2 names load the files shipped with the package, offline.
        pass_folder_as: how the error for a tokenizer that cannot be loaded offline says to pass a local
            folder: `"get_tokenizer('/path/to/gpt2')"` by default; command lines give their flag, e.g.
            `"--config.data.tokenizer=DIR"`.

    Returns:
        A `Tokenizer`. Files whose sha256 sums are the ones tiktoken expects for GPT-2, or whose vocabulary
        is GPT-2's in different JSON formatting, give the standard encoding (`is_standard_gpt2=True`). Other
        valid BPE files give a custom encoding and a UserWarning saying so.

    Raises:
        FileNotFoundError: a folder is missing one of the two files, or a path does not exist.
        ValueError: a file is malformed (the message names the file and line), the files disagree, or a
            folder holds both pairs of names with different contents.
        OSError: a hub name could not be loaded (e.g. no network); the message says how to work offline.
    """
    source = sources.locate(name_or_path, pass_folder_as=pass_folder_as)
    name = "gpt2" if name_or_path is None else os.fspath(name_or_path)
    if isinstance(source, tiktoken.Encoding):  # tiktoken's own `gpt2`, whose files it checked itself
        return Tokenizer(source, name_or_path=name, is_standard_gpt2=True)
    tokenizer = _from_files(*source, name_or_path=name)
    _warn_if_custom(tokenizer)
    return tokenizer

"""GPT-2's two BPE files: which pair a folder holds, reading them into tiktoken's rank table, writing them.

The two files go by two pairs of names: Hugging Face's `vocab.json` + `merges.txt` and OpenAI's
`encoder.json` + `vocab.bpe`, with the same content. `vocab.json` maps each token, written with GPT-2's
printable stand-ins for bytes ("Ġthe" for b" the"), to its id; `merges.txt` holds a "#version" header and
then one merge per line ("Ġ t"), in priority order. `tokenizer_files(folder)` is the one place that
decides whether a folder holds a tokenizer.

Reading checks what tiktoken would take on trust (every error names the file and the line): all 256
bytes present, each merge producing a token of vocab.json, ids rising in merge order, and merges that
reach the whole vocabulary (see `_check_merges_cover_vocab`). vocab.json entries that no merge produces
are the special tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from flax_gpt2 import assets
from flax_gpt2.utils import file_io
from flax_gpt2.utils.file_io import file_sha256

ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257

# sha256 of OpenAI's GPT-2 `encoder.json` and `vocab.bpe`, as tiktoken checks them (Hugging Face's gpt2
# folders hold the same content as `vocab.json` and `merges.txt`).
GPT2_VOCAB_SHA256 = assets.SHA256[assets.GPT2_VOCAB]
GPT2_MERGES_SHA256 = assets.SHA256[assets.GPT2_MERGES]
# sha256 of the vocabulary itself (see `_vocab_digest`), whatever the files' formatting.
_GPT2_VOCAB_DIGEST = "b252cf10820e12b2c6e8df336a6af85430b50d7647a8cb91700d6e1f641f211a"

# The two file-name pairs a folder may use, (vocab, merges): Hugging Face's, then OpenAI's.
FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))

# Special tokens besides <|endoftext|> that a custom BPE's vocab.json may hold (entries no merge produces);
# more means merges.txt stops short of the vocabulary (see `_check_merges_cover_vocab`).
_MAX_EXTRA_SPECIAL_TOKENS = 64


def tokenizer_files(folder: str | os.PathLike) -> tuple[str, str] | None:
    """The tokenizer files in a local folder: `(vocab, merges)` paths, either naming; None if it has neither.

    `vocab.json` + `merges.txt` are looked for first, then `encoder.json` + `vocab.bpe`. Every module that
    asks "does this folder hold a tokenizer?" asks this function, so that the two namings are taken alike.
    A folder may hold both pairs only if they are the same tokenizer.

    Raises:
        FileNotFoundError: the folder holds one file of a pair without the other (a half-copied tokenizer,
            which must not quietly stand for "no tokenizer here"); the message names the missing file.
        ValueError: the folder holds both pairs and they differ (say, a 50,257-token GPT-2 pair beside a
            small custom BPE): which one belongs to the model cannot be guessed.
    """
    folder = os.fspath(folder)
    found = []
    for vocab_name, merges_name in FILE_PAIRS:
        vocab_file, merges_file = os.path.join(folder, vocab_name), os.path.join(folder, merges_name)
        if os.path.isfile(vocab_file) or os.path.isfile(merges_file):
            for missing, present in ((vocab_file, merges_name), (merges_file, vocab_name)):
                if not os.path.isfile(missing):
                    raise FileNotFoundError(f"{missing} is missing: the folder has {present}, and a tokenizer "
                                            f"needs both {vocab_name} and {merges_name}")
            found.append((vocab_file, merges_file))
    if len(found) == 2 and (contents := [_pair_content(*pair) for pair in found])[0] != contents[1]:
        pairs = " and ".join(f"{os.path.basename(vocab)} + {os.path.basename(merges)} ({len(content[0])} tokens)"
                             for (vocab, merges), content in zip(found, contents))
        raise ValueError(f"{folder} holds two different tokenizers, {pairs}; delete the pair that does not "
                         f"belong to the model")
    return found[0] if found else None


def _pair_content(vocab_file: str, merges_file: str) -> tuple[dict, list[bytes]]:
    """A pair's vocabulary and merge lines, whatever the JSON formatting, merges.txt header or line ends."""
    with open(vocab_file, "rb") as f:
        try:
            vocab = json.loads(f.read())
        except (ValueError, UnicodeDecodeError):
            vocab = {}  # a malformed file is never the same as a well-formed one; the reader names the error
    with open(merges_file, "rb") as f:
        lines = [line.rstrip(b"\r") for line in f.read().split(b"\n")]
    merges = [line for n, line in enumerate(lines) if line and not (n == 0 and line.startswith(b"#version"))]
    return (vocab if isinstance(vocab, dict) else {}), merges


# ---- GPT-2's byte <-> character table ----


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte in `vocab.json`/`merges.txt` (HF's `bytes_to_unicode`).

    Printable non-space bytes stand for themselves; the others become chr(256), chr(257), ... in byte order.
    """
    table = {b: chr(b) for b in range(256) if chr(b).isprintable() and chr(b) != " "}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def token_str(token: bytes) -> str:
    """A token's bytes as written in `vocab.json` (e.g. b" the" -> "Ġthe")."""
    return "".join(BYTE_TO_CHAR[b] for b in token)


# ---- is it GPT-2's? ----


def are_gpt2_files(vocab_file: str, merges_file: str) -> bool:
    """Whether the two files are byte for byte OpenAI's GPT-2 files (the sha256 sums tiktoken checks)."""
    return file_sha256(vocab_file) == GPT2_VOCAB_SHA256 and file_sha256(merges_file) == GPT2_MERGES_SHA256


def is_gpt2_vocab(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> bool:
    """Whether a rank table and special tokens are exactly GPT-2's, however the files were formatted."""
    return _vocab_digest(ranks, special_tokens) == _GPT2_VOCAB_DIGEST


def _vocab_digest(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> str:
    """sha256 of an encoding's content (ids, token bytes, special tokens), independent of file formatting."""
    h = hashlib.sha256()
    for token, i in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(b"%d %s\n" % (i, token.hex().encode()))
    for name, i in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        h.update(b"%d special %s\n" % (i, name.encode()))
    return h.hexdigest()


# ---- reading vocab.json + merges.txt ----


def read_ranks(vocab_file: str, merges_file: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """tiktoken's (mergeable_ranks, special_tokens) from a Hugging Face-style vocab.json + merges.txt.

    Like tiktoken's `data_gym_to_mergeable_bpe_ranks`, with errors naming the file and line. (That
    function also copies local files into tiktoken's download cache, keyed by path, and may later read
    back a stale copy; hence our own reader.) tiktoken uses each token's id as its merge priority, so
    merged tokens' ids must increase in merges.txt order, as in every BPE trained the usual way.

    Raises:
        ValueError: a file is malformed, or the two do not belong together; the message names file and line.
    """
    vocab = _read_vocab(vocab_file)
    merges = _read_merges(merges_file)
    ranks: dict[bytes, int] = {}
    for b, char in BYTE_TO_CHAR.items():
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
    ranked = {token_str(t) for t in ranks}
    special_tokens = {t: i for t, i in vocab.items() if t not in ranked}
    if ENDOFTEXT not in special_tokens:
        raise ValueError(f"{vocab_file} has no {ENDOFTEXT!r} entry (GPT-2's end-of-text token)")
    _check_merges_cover_vocab(vocab_file, merges_file, vocab, len(merges), special_tokens)
    return ranks, special_tokens


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
        return bytes(CHAR_TO_BYTE[c] for c in token)
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


# ---- writing vocab.json + merges.txt ----


def merges_lines(ranks: dict[bytes, int]) -> list[str]:
    """`merges.txt`'s lines ("Ġ t"), rebuilt from a rank table: each token's last merge is the split BPE
    reaches when only lower-ranked merges are allowed."""
    lines = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe(ranks, token, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (id {rank}) is not the merge of two lower-ranked tokens; "
                             f"this vocabulary cannot be written as merges.txt")
        lines.append(f"{token_str(parts[0])} {token_str(parts[1])}")
    return lines


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


def write_files(folder: str | os.PathLike, vocab: dict[str, int], merges: list[str]) -> tuple[str, str]:
    """Writes `vocab.json` (token -> id, in the order given) and `merges.txt` in `folder` (created if needed).

    Existing files are replaced only once both new ones are complete (see `file_io.staged_folder`).

    Returns:
        The two paths written.
    """
    folder = Path(folder)
    # json.dumps' defaults (", ", ": ", ASCII escapes) are exactly encoder.json's formatting.
    vocab_text = json.dumps(vocab)
    merges_text = "#version: 0.2\n" + "".join(m + "\n" for m in merges)
    # Both files complete before either replaces an older one: a crash or a full disk never leaves a
    # truncated merges.txt, nor a new vocab.json next to a merges.txt it does not belong with.
    vocab_name, merges_name = FILE_PAIRS[0]
    with file_io.staged_folder(folder) as staging:
        for name, text in ((vocab_name, vocab_text), (merges_name, merges_text)):
            with open(os.path.join(staging, name), "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
    return str(folder / vocab_name), str(folder / merges_name)

"""Fine-tuning recipes of the GPT-2 model cards: how their records become training documents.

A recipe turns one record of its dataset into zero or more documents (strings); the corpus tokenizer
encodes each and ends it with `<|endoftext|>`, so consecutive documents read
`<|endoftext|> doc1<|endoftext|> doc2<|endoftext|>` — exactly the CommonGen card's format.

- `commongen`: records `{"concept_set": "kid_N#room_N#dance_V", "scene": [...]}` (the CommonGen release),
  `{"concepts": [...], "target": "..."}` (the `allenai/common_gen` dataset), or the `src_alpha.txt` /
  `tgt.txt` line pairs; each scene becomes `" kid, room, dance: A kid dances in the room."`.
- `eli5`: records of `eli5_category` (`{"answers": {"text": [...]}}`) or local `{"question", "answer"}`
  json/jsonl; the document is the answers joined by spaces, as Hugging Face's causal-LM fine-tuning
  tutorial (which trained the distilgpt2 ELI5 card) does.
- `prompt_completion`: users' own jsonl records `{"prompt": "...", "completion": "..."}`; the document is the
  prompt followed by the completion.

Recipes with a prompt (`PROMPT_RECIPES`) give each document as two pieces, `[Prompt(prompt), completion]`,
so the corpus can record which tokens are the completion: `data.loss_on="completion"` scores only those
(train/loss_mask.py).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator, Mapping, Sequence

RECIPES = ("text", "commongen", "eli5", "prompt_completion")
# Recipes whose documents have a prompt: their corpora record a per-token loss mask (tokenize_corpus).
PROMPT_RECIPES = ("commongen", "prompt_completion")

_POS_SUFFIX = re.compile(r"_[A-Z]+$")


class Prompt(str):
    """A document piece the model reads but is not scored on under `data.loss_on="completion"`: the pieces of
    a document are encoded separately and concatenated, so the prompt's last token is exactly where it ends."""


def concepts_of(record: Mapping[str, Any], where: str = "record") -> list[str]:
    """The concept words of a CommonGen record, part-of-speech suffixes (`_N`, `_V`) stripped."""
    if "concept_set" in record:
        raw = _strings(record["concept_set"], where, "concept_set")[0].split("#")
    elif "concepts" in record:
        raw = record["concepts"]
        raw = raw.split() if isinstance(raw, str) else _strings(raw, where, "concepts")
    else:
        raise KeyError(f"{where}: a CommonGen record needs 'concept_set' or 'concepts'; fields: {sorted(record)}")
    concepts = [_POS_SUFFIX.sub("", c.strip()) for c in raw if c.strip()]
    if not concepts:
        raise ValueError(f"{where}: empty concept set")
    return concepts


def commongen_prompt(concepts: Sequence[str]) -> str:
    """The text after `<|endoftext|>` that asks for a sentence: `" kid, room, dance:"`."""
    return " " + ", ".join(concepts) + ":"


def commongen_documents(record: Mapping[str, Any], where: str = "record") -> list[str]:
    """The card's documents of a CommonGen record: `" kid, room, dance: A kid dances in the room."`."""
    return ["".join(pieces) for pieces in commongen_pieces(record, where)]


def commongen_pieces(record: Mapping[str, Any], where: str = "record") -> list[list[str]]:
    """`[Prompt(" kid, room, dance:"), " A kid dances in the room."]` for each scene of a CommonGen record.

    The sentence piece starts with one space before a non-space character, a safe cut for GPT-2's
    pre-tokenizer (`documents._SAFE_CUT`): the two encodings concatenate to the whole document's encoding,
    so the tokens are the same as before the recipe recorded its prompts.
    """
    concepts = concepts_of(record, where)
    scenes = record.get("scene", record.get("target", record.get("scenes")))
    if scenes is None:
        raise KeyError(f"{where}: a CommonGen record needs 'scene' or 'target'; fields: {sorted(record)}")
    scenes = _strings(scenes, where, "scene")
    return [[Prompt(commongen_prompt(concepts)), f" {s.strip()}"] for s in scenes if s.strip()]


def prompt_completion_pieces(record: Mapping[str, Any], where: str = "record") -> list[list[str]]:
    """`[Prompt(prompt), completion]` of a `{"prompt": ..., "completion": ...}` record.

    The two are encoded separately (the token boundary is the prompt's end even where a joint encoding
    would merge across it, e.g. a prompt ending in a space), as instruction-tuning collators do.
    """
    missing = [k for k in ("prompt", "completion") if k not in record]
    if missing:
        raise KeyError(f"{where}: a prompt_completion record needs string fields 'prompt' and 'completion'; "
                       f"missing {missing}; fields: {sorted(record)}")
    prompt, completion = (_string(record[k], where, k) for k in ("prompt", "completion"))
    return [[Prompt(prompt), completion]]


def _string(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {value!r:.80}")
    return value


def eli5_documents(record: Mapping[str, Any], where: str = "record") -> list[str]:
    answers = record.get("answers", record.get("answer"))
    if isinstance(answers, Mapping):  # eli5_category: {"text": [...], "score": [...], ...}
        answers = answers.get("text")
    if answers is None and "answers.text" in record:  # a flattened dataset
        answers = record["answers.text"]
    if answers is None:
        raise KeyError(f"{where}: an ELI5 record needs 'answers' (with 'text') or 'answer'; fields: {sorted(record)}")
    answers = _strings(answers, where, "answers")
    text = " ".join(answers)
    return [text] if text.strip() else []


def _strings(value: Any, where: str, field: str) -> list[str]:
    """`value` as a list of strings (a string or a list of them); anything else (null, a number, a nested
    object) is a ValueError naming the record and the field."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    bad = [v for v in items if not isinstance(v, str)] if items is not None else [value]
    if bad:
        raise ValueError(f"{where}: field {field!r} must be a string or a list of strings, got {value!r:.80}")
    return items


FORMATTERS = {"commongen": commongen_pieces, "eli5": lambda record, where: [[d] for d in eli5_documents(record, where)],
              "prompt_completion": prompt_completion_pieces}


def record_pieces(recipe: str, record: Mapping[str, Any], where: str) -> list[list[str]]:
    """Each document of `record` under `recipe` (one of RECIPES other than "text") as its pieces (a `Prompt`
    first for `PROMPT_RECIPES`); `where` names the record in errors (a file and line number)."""
    if recipe not in FORMATTERS:
        raise ValueError(f"unknown data.recipe {recipe!r}; choose one of {RECIPES}")
    return FORMATTERS[recipe](record, where)


def format_records(recipe: str, records: Iterator[Mapping[str, Any]], where: str) -> Iterator[str]:
    """Documents of `records` under `recipe` (one of RECIPES other than "text"), as whole strings."""
    for i, record in enumerate(records):
        yield from ("".join(pieces) for pieces in record_pieces(recipe, record, f"{where} record {i}"))


def commongen_line_pairs(src_path: str) -> Iterator[dict]:
    """Records from CommonGen's line-aligned text pair format: `X.src_alpha.txt` (concepts, space-separated)
    beside `X.tgt.txt` (one target sentence a line)."""
    if not src_path.endswith(".src_alpha.txt"):
        raise ValueError(f"{src_path}: the CommonGen pair format is X.src_alpha.txt + X.tgt.txt")
    tgt_path = src_path[: -len(".src_alpha.txt")] + ".tgt.txt"
    if not os.path.isfile(tgt_path):
        raise FileNotFoundError(f"{tgt_path} is missing: the targets of {src_path}")
    with open(src_path, encoding="utf-8") as src, open(tgt_path, encoding="utf-8") as tgt:
        src_lines, tgt_lines = src.read().splitlines(), tgt.read().splitlines()
    if len(src_lines) != len(tgt_lines):
        raise ValueError(f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}")
    for concepts, target in zip(src_lines, tgt_lines):
        yield {"concepts": concepts.split(), "target": target}


def read_commongen_sets(path: str) -> list[list[str]]:
    """The distinct concept sets of a CommonGen file (jsonl, or the src_alpha/tgt pair), in file order."""
    if path.endswith(".src_alpha.txt"):
        records = list(commongen_line_pairs(path))
    else:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    seen, sets = set(), []
    for i, record in enumerate(records):
        concepts = concepts_of(record, f"{path} record {i}")
        if tuple(concepts) not in seen:
            seen.add(tuple(concepts))
            sets.append(concepts)
    return sets


def _stems(word: str) -> set[str]:
    """A light stemmer, enough to see 'dance' in 'dances'/'dancing'/'danced' (CommonGen's scorer lemmatizes
    with spaCy; this approximates it without that dependency)."""
    out = {word}
    for suffix in ("ing", "ed", "es", "s", "er", "ers"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            base = word[: -len(suffix)]
            out |= {base, base + "e"}
            if len(base) >= 4 and base[-1] == base[-2]:  # running -> run
                out.add(base[:-1])
            if base.endswith("i"):  # carries -> carry
                out.add(base[:-1] + "y")
    return out


def coverage(concepts: Sequence[str], sentence: str) -> float:
    """Fraction of `concepts` that appear in `sentence` (inflections allowed)."""
    words = re.findall(r"[a-z]+", sentence.lower())
    stems = set().union(*(_stems(w) for w in words)) if words else set()
    hits = sum(1 for c in concepts if _stems(c.lower()) & stems)
    return hits / len(concepts)

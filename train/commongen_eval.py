"""CommonGen coverage after fine-tuning: generate one sentence for held-out concept sets, count the concepts
that appear in it (see `train.recipes.coverage`)."""

from __future__ import annotations

import json

import numpy as np

from flax_gpt2.generation import generate
from flax_gpt2.tokenizer.bpe_tokenizer import ENDOFTEXT, USER_TEXT_SPECIAL, get_tokenizer
from flax_gpt2.utils import file_io

from . import documents, recipes, tokenize_corpus as tc
from .data import TOKENIZER_FLAG


def held_out_concept_sets(data_config, cut: int, limit: int) -> list[list[str]]:
    """Concept sets whose every example lies in the held-out part of the token stream (from token `cut`).

    The stream is the recipe's documents in order, each followed by `<|endoftext|>`, so re-encoding them
    gives each document's start; a set is held out when its first example starts at or after `cut`.
    """
    encoding = tc.gpt2_encoding(data_config.tokenizer, pass_folder_as=TOKENIZER_FLAG)
    docs = ["".join(d) for d in documents.iter_documents(data_config.source, split=data_config.split,
                                                       dataset_config=data_config.dataset_config, recipe="commongen")]
    lengths = [len(ids) + 1 for ids in encoding.encode_ordinary_batch(docs)]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    first_start: dict[tuple[str, ...], int] = {}
    for doc, start in zip(docs, starts):
        first_start.setdefault(tuple(doc.split(":", 1)[0].strip().split(", ")), int(start))
    return [list(c) for c, start in first_start.items() if start >= cut][:limit]


def commongen_coverage(model, params, data_config, concept_sets: list[list[str]], workdir: str | None,
                       max_new_tokens: int = 32, batch_size: int = 16) -> dict:
    """Greedy sentences for `concept_sets` from the card's prompt, cut after the first '.'; returns the mean
    coverage and writes `workdir/commongen_samples.jsonl` (concepts, sentence, coverage)."""
    tokenizer = get_tokenizer(data_config.tokenizer or None, pass_folder_as=TOKENIZER_FLAG)
    eot = tokenizer.eot_token
    rows = []
    for i in range(0, len(concept_sets), batch_size):
        chunk = concept_sets[i:i + batch_size]
        # The card's prompt "<|endoftext|> kid, room, dance:", left-padded (with <|endoftext|>) as generate expects.
        ids, mask = tokenizer.encode_batch([ENDOFTEXT + recipes.commongen_prompt(c) for c in chunk],
                                           padding_side="left", pad_id=eot, allowed_special=USER_TEXT_SPECIAL)
        width = ids.shape[1]
        out = generate(model, params, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=eot)
        for concepts, new in zip(chunk, np.asarray(out)[:, width:]):
            text = tokenizer.decode([t for t in new.tolist() if t != eot])
            sentence = text[: text.find(".") + 1] if "." in text else text
            rows.append({"concepts": concepts, "sentence": sentence.strip(),
                         "coverage": recipes.coverage(concepts, sentence)})
    if workdir:
        file_io.atomic_write(file_io.join(workdir, "commongen_samples.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    return {"coverage": float(np.mean([r["coverage"] for r in rows])) if rows else float("nan"),
            "coverage_sets": len(rows), "samples": rows[:5]}

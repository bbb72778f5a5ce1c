"""HellaSwag accuracy, the nanoGPT / llm.c way (and lm-eval's, on request), for evaluations during training.

    examples = hellaswag.load("hellaswag_val.jsonl", tokenizer)           # tokenized once
    loss_fn = hellaswag.make_loss_fn(model)                              # jitted; or your sharded one
    hellaswag.evaluate(params, examples, loss_fn)  # {"acc": ..., "acc_norm": ..., "num_examples": ...}

Each example is a context and 4 endings. Every ending becomes one row, context + ending; the model's
next-token loss over the ending's tokens scores it:

- `acc`: the ending with the lowest summed loss (highest log-likelihood) is the answer.
- `acc_norm`: the ending with the lowest *mean* loss per token is the answer, as build-nanogpt's
  `hellaswag.py` and llm.c's `dev/data/hellaswag.py` compute it (style "nanogpt", the default): the
  record's `ctx`, then `" " + ending`, each encoded on its own.

Style "harness" reproduces lm-eval's `hellaswag` task instead: the prompt is
`preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`, the endings are preprocessed the
same way (WikiHow's `[title]`/`[step]` markers removed), the continuation is tokenized as part of
context + ending, and `acc_norm` divides the log-likelihood by the ending's length in *characters*.
The two styles give different numbers for the same model (for GPT-2 124M, build-nanogpt's `hellaswag.py`
quotes `acc_norm` 0.2955 completion style and 0.3114 from lm-eval); docs/EVALUATION.md explains.

Shapes: rows are padded to one length (`seq_len`, default the longest row rounded up to a multiple of
64, at most the model's window) and `4 * batch_size` rows go into every call (a short last batch is
padded with empty rows), so the loss function compiles once.

Files: the official `hellaswag_val.jsonl` (github.com/rowanz/hellaswag, `label` an int) or rows of the
Hugging Face `Rowan/hellaswag` dataset saved as jsonl (`label` a string); both have `ctx`, `ctx_a`,
`ctx_b`, `activity_label`, `endings`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flax_gpt2.tokenizer.bpe_tokenizer import USER_TEXT_SPECIAL, get_tokenizer
from flax_gpt2.utils import file_io

STYLES = ("nanogpt", "harness")
NUM_ENDINGS = 4


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized HellaSwag example: context tokens, the 4 endings' tokens, the right ending's index, and
    each ending's length in characters (lm-eval's `acc_norm` divides by it)."""

    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]
    label: int
    ending_chars: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Examples:
    """Tokenized examples of one style (the style fixes how `acc_norm` normalizes)."""

    style: str
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)


def read_records(path: str | os.PathLike, limit: int = 0) -> list[dict]:
    """HellaSwag records from a jsonl file, local or `gs://` (the first `limit` if > 0), each checked for a
    context, 4 endings and a label in 0..3. A record without `ctx` gets `ctx_a + " " + ctx_b` (the dataset's
    definition)."""

    path = os.fspath(path)
    if not file_io.exists(path) or file_io.isdir(path):
        raise FileNotFoundError(f"HellaSwag file {path!r} does not exist")
    try:
        text = file_io.read_text(path)  # a local path or a gs:// URL (one file for every host of a pod)
    except UnicodeDecodeError as e:
        raise ValueError(f"HellaSwag file {path!r} is not UTF-8 text ({e.reason})") from None
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if limit and len(records) >= limit:
            break
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
        records.append(_check_record(record, where))
    if not records:
        raise ValueError(f"HellaSwag file {path!r} holds no records")
    return records


def _check_record(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a HellaSwag record must be a JSON object")
    endings = record.get("endings")
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS
            and all(isinstance(e, str) and e for e in endings)):
        raise ValueError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} non-empty strings")
    label = record.get("label")
    try:
        label = int(label)
    except (TypeError, ValueError):
        label = None
    if label is None or not 0 <= label < NUM_ENDINGS:
        raise ValueError(f"{where}: 'label' must be 0..{NUM_ENDINGS - 1} (the test split has no labels), "
                         f"got {record.get('label')!r}")
    record = dict(record, label=label)
    if "ctx" not in record and "ctx_a" in record:
        ctx_b = record.get("ctx_b") or ""
        record["ctx"] = record["ctx_a"] + (" " + ctx_b if ctx_b else "")
    if not isinstance(record.get("ctx"), str) or not record["ctx"].strip():
        raise ValueError(f"{where}: the record has no context ('ctx', or 'ctx_a' and 'ctx_b')")
    return record


def harness_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (lm_eval/tasks/hellaswag/utils.py): WikiHow markers removed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def make_examples(records: Sequence[dict], tokenizer, style: str = "nanogpt") -> Examples:
    """Tokenizes checked records (see `read_records`) in `style` ("nanogpt" or "harness")."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")

    examples = []
    for record in records:
        if style == "nanogpt":
            context = tokenizer.encode(record["ctx"])
            endings = [record["endings"][i] for i in range(NUM_ENDINGS)]
            ending_ids = [tokenizer.encode(" " + e) for e in endings]
        else:
            # lm-eval: encode context + continuation together and split at the context's length (HF's
            # tokenizer knows <|endoftext|> in text as the special token, hence allowed_special).
            def encode(text):
                return tokenizer.encode(text, allowed_special=USER_TEXT_SPECIAL)

            ctx = record.get("ctx_a", record["ctx"]) + " " + (record.get("ctx_b") or "").capitalize()
            prompt = harness_preprocess(record.get("activity_label", "") + ": " + ctx)
            endings = [harness_preprocess(e) for e in record["endings"]]
            # lm-eval moves the context's trailing spaces (a removed "[step]" can leave one) into the
            # continuation before encoding.
            stripped = prompt.rstrip()
            moved = prompt[len(stripped):]
            context = encode(stripped)
            ending_ids = [encode(stripped + moved + " " + e)[len(context):] for e in endings]
        if not context or not all(ending_ids):
            raise ValueError(f"a HellaSwag record encodes to an empty context or ending: {record['ctx'][:60]!r}")
        examples.append(Example(tuple(context), tuple(tuple(e) for e in ending_ids), int(record["label"]),
                                tuple(len(e) for e in endings)))
    return Examples(style, tuple(examples))


def load(path: str | os.PathLike, tokenizer, *, style: str = "nanogpt", limit: int = 0) -> Examples:
    """`make_examples(read_records(path, limit), tokenizer, style)`."""
    return make_examples(read_records(path, limit), tokenizer, style)


def token_losses(model, params, tokens: jax.Array) -> jax.Array:
    """`[N, T]` float32 next-token losses `-log p(tokens[:, t + 1] | tokens[:, :t + 1])` of rows
    `tokens [N, T + 1]` (the layout of the train loop's eval batches), without dropout."""
    logits = model.apply({"params": params}, tokens[:, :-1], deterministic=True).logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]


def make_loss_fn(model, params_sharding: Any = None, rows_sharding: jax.sharding.NamedSharding | None = None
                 ) -> Callable:
    """`loss_fn(params, tokens: np.ndarray [N, T + 1]) -> [N, T]`: `token_losses`, jitted once.

    With `rows_sharding` (a `NamedSharding` of the `[N, T + 1]` rows, e.g. split over the mesh axes the train
    batch uses) and `params_sharding` (the params' shardings), every device scores its share of the rows:
    each process supplies only the rows its devices hold (the same host array everywhere, as `evaluate`
    builds it), and the losses come back replicated. `N = 4 * batch_size` must divide by the number of
    row shards.
    """
    fn = functools.partial(token_losses, model)
    if rows_sharding is None:
        return jax.jit(fn)
    replicated = jax.sharding.NamedSharding(rows_sharding.mesh, jax.sharding.PartitionSpec())
    shardings = {} if params_sharding is None else {"in_shardings": (params_sharding, rows_sharding)}
    jitted = jax.jit(fn, out_shardings=replicated, **shardings)  # unspecified: as the arguments are placed

    def loss_fn(params, tokens):
        tokens = np.asarray(tokens, np.int32)
        return jitted(params, jax.make_array_from_callback(tokens.shape, rows_sharding, lambda index: tokens[index]))

    loss_fn.jitted = jitted  # for inspection (e.g. `loss_fn.jitted._cache_size()`)
    return loss_fn


def rows_length(examples: Examples, context_length: int) -> int:
    """The padded row length (in model inputs) `evaluate` uses by default: the longest row, rounded up to a
    multiple of 64, capped at `context_length` (the model's window, `n_positions`)."""
    longest = max(len(e.context) + max(len(x) for x in e.endings) - 1 for e in examples.examples)
    return min(context_length, -(-longest // 64) * 64)


def score(params, examples: Examples, loss_fn: Callable, *, seq_len: int, batch_size: int = 16,
          progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`(sum_loss [E, 4], num_tokens [E, 4])`: each ending's summed next-token loss (float64) and its token
    count, given its context. A row longer than `seq_len + 1` tokens loses context tokens from the left
    (as lm-eval truncates); an ending longer than `seq_len` is an error."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    n = len(examples)
    sums = np.zeros((n, NUM_ENDINGS), np.float64)
    counts = np.zeros((n, NUM_ENDINGS), np.int64)
    rows = NUM_ENDINGS * batch_size
    bar = tqdm(total=n, desc="hellaswag", unit="example", disable=not progress)
    for start in range(0, n, batch_size):
        chunk = examples.examples[start:start + batch_size]
        tokens = np.zeros((rows, seq_len + 1), np.int32)
        spans = []
        for i, example in enumerate(chunk):
            for j, ending in enumerate(example.endings):
                if len(ending) > seq_len:
                    raise ValueError(f"a HellaSwag ending of {len(ending)} tokens does not fit seq_len={seq_len}")
                row = (example.context + ending)[-(seq_len + 1):]
                tokens[NUM_ENDINGS * i + j, :len(row)] = row
                # losses[:, t] scores row[t + 1]: the ending's tokens are the last len(ending) of the row.
                spans.append((i, j, len(row) - 1 - len(ending), len(row) - 1))
        losses = np.asarray(loss_fn(params, tokens), np.float64)
        for i, j, lo, hi in spans:
            sums[start + i, j] = losses[NUM_ENDINGS * i + j, lo:hi].sum()
            counts[start + i, j] = hi - lo
        bar.update(len(chunk))
    bar.close()
    return sums, counts


def accuracy(examples: Examples, sum_loss: np.ndarray, num_tokens: np.ndarray) -> dict:
    """`acc` (lowest summed loss) and `acc_norm` (lowest mean loss per token for style "nanogpt"; highest
    log-likelihood per character for "harness"), and `num_examples`. Ties go to the first ending."""
    labels = np.array([e.label for e in examples.examples])
    if examples.style == "nanogpt":
        normalized = sum_loss / num_tokens
    else:
        normalized = sum_loss / np.array([e.ending_chars for e in examples.examples], np.float64)
    return {"acc": float(np.mean(np.argmin(sum_loss, axis=1) == labels)),
            "acc_norm": float(np.mean(np.argmin(normalized, axis=1) == labels)),
            "num_examples": len(labels)}


def evaluate(params, examples: Examples, loss_fn: Callable, *, batch_size: int = 16, seq_len: int | None = None,
             context_length: int = 1024, progress: bool = False) -> dict:
    """HellaSwag `acc`, `acc_norm` and `num_examples` of the model behind `loss_fn` (see `make_loss_fn`).

    Args:
      params: the model's parameters, as `loss_fn` takes them.
      examples: from `load` (or `make_examples`).
      loss_fn: `loss_fn(params, tokens [4 * batch_size, seq_len + 1]) -> losses [4 * batch_size, seq_len]`.
      batch_size: examples per call (4 rows each); with a sharded `loss_fn`, make `4 * batch_size` divisible
        by the number of batch shards.
      seq_len: model inputs per row; default `rows_length(examples, context_length)`.
      context_length: the model's window (`config.n_positions`), the cap of the default `seq_len`.
    """
    if not len(examples):
        raise ValueError("no HellaSwag examples to evaluate")
    seq_len = seq_len or rows_length(examples, context_length)
    sums, counts = score(params, examples, loss_fn, seq_len=seq_len, batch_size=batch_size, progress=progress)
    if not np.all(np.isfinite(sums)):
        raise FloatingPointError("HellaSwag losses are not finite: the model's outputs are NaN or overflow")
    return accuracy(examples, sums, counts)


def evaluate_model(model, params, path_or_examples: str | os.PathLike | Examples, tokenizer=None, *,
                   style: str = "nanogpt", limit: int = 0, batch_size: int = 16, progress: bool = False) -> dict:
    """One-off convenience: `evaluate` with a fresh `make_loss_fn(model)` (compiles on every call; in a loop,
    build the loss function and the examples once and call `evaluate`). `tokenizer` defaults to GPT-2's."""
    if isinstance(path_or_examples, Examples):
        examples = path_or_examples
    else:
        if tokenizer is None:
            tokenizer = get_tokenizer(None)
        examples = load(path_or_examples, tokenizer, style=style, limit=limit)
    return evaluate(params, examples, make_loss_fn(model), batch_size=batch_size,
                    context_length=model.config.n_positions, progress=progress)

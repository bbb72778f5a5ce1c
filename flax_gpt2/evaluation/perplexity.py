"""Evaluation metrics: sliding-window perplexity (HF's perplexity guide) and LAMBADA last-word accuracy
(as the GPT-2 paper / lm-eval-harness `lambada_openai` compute it).

Both run one jitted scoring function over right-padded batches whose length is rounded up to a bucket, so
a handful of shapes compile, not one per document.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

_BUCKET = 64


def make_scorer(model) -> Callable:
    """`score(params, ids [B, T]) -> (logprob [B, T-1], is_greedy [B, T-1])` for next tokens ids[:, 1:].

    Right padding needs no mask: causal attention keeps positions before the padding unaffected.
    """

    @jax.jit
    def score(params, ids):
        logits = model.apply({"params": params}, ids).logits[:, :-1]  # [B, T-1, V]
        targets = ids[:, 1:]
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        token_logprob = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
        return token_logprob, jnp.argmax(logits, axis=-1) == targets

    return score


def _padded_batch(rows: Sequence[Sequence[int]], batch_size: int, longest: int) -> np.ndarray:
    """`[batch_size, T]` ids, T the longest row rounded up to a bucket (fewer compiles), at most `longest`."""
    length = min(longest, -(-max(len(r) for r in rows) // _BUCKET) * _BUCKET)
    ids = np.zeros((batch_size, length), np.int32)  # unused rows/positions are never read back
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids


@dataclasses.dataclass(frozen=True)
class Window:
    """One sliding window: tokens [begin, end) fed to the model, of which [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int


def sliding_windows(num_tokens: int, window_length: int, stride: int) -> list[Window]:
    """Windows of HF's perplexity guide (its `max_length`): start every `stride` tokens, at most
    `window_length` tokens long; each window scores only the tokens the previous one did not (after the
    first, the last `stride` tokens). The very first token is never scored (nothing predicts it)."""
    if stride <= 0 or window_length <= 1:
        raise ValueError(f"need stride > 0 and window_length > 1, got stride={stride}, "
                         f"window_length={window_length}")
    if stride > window_length:
        raise ValueError(f"stride ({stride}) must not exceed window_length ({window_length}): "
                         "tokens would go unscored")
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to compute perplexity, got {num_tokens}")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window_length, num_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def perplexity(model, params, token_ids: Sequence[int], *, stride: int = 512,
               window_length: int | None = None, batch_size: int = 4, progress: bool = True,
               scorer: Callable | None = None) -> dict:
    """Sliding-window perplexity of one token stream.

    `window_length` (HF's guide calls it `max_length`) is the tokens each window feeds the model; default
    the model's `n_positions`. Every token is scored at most once, with at least `window_length - stride`
    tokens of context (all before it, in the first window). With `stride < window_length` that is every
    token after the first; with `stride == window_length` (no overlap) each window's first token has no
    context and is not scored, as in HF's guide. Returns `perplexity`, `nll` (mean nats/token),
    `num_tokens` (scored) and `num_windows`.

    The mean is over scored tokens exactly; HF's guide weights each window by `valid - 1` tokens, which
    differs from this in the last decimals for multi-window texts.
    """
    window_length = window_length or model.config.n_positions
    if window_length > model.config.n_positions:
        raise ValueError(f"window_length ({window_length}) exceeds the model's n_positions "
                         f"({model.config.n_positions})")
    tokens = np.asarray(token_ids, np.int64)
    _check_ids(tokens, model.config.vocab_size)
    tokens = tokens.astype(np.int32)
    windows = sliding_windows(len(tokens), window_length, stride)
    score = scorer or make_scorer(model)
    nll_sum, count = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        ids = _padded_batch([tokens[w.begin:w.end] for w in chunk], batch_size, window_length)
        logprob = np.asarray(score(params, jnp.asarray(ids))[0], np.float64)
        for row, w in enumerate(chunk):
            # logprob[row, j] scores token begin + j + 1.
            lo, hi = w.score_from - w.begin - 1, w.end - w.begin - 1
            nll_sum -= logprob[row, lo:hi].sum()
            count += hi - lo
        bar.update(len(chunk))
        bar.set_postfix(ppl=f"{_exp(nll_sum / max(count, 1)):.3f}")
    bar.close()
    nll = nll_sum / count
    return {"perplexity": _finite_exp(nll, "perplexity"), "nll": nll, "num_tokens": count,
            "num_windows": len(windows)}


def _check_ids(tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids range from {tokens.min()} to {tokens.max()}, but the model has "
                         f"{vocab_size} tokens: the tokenizer does not belong to the model")


def _exp(x: float) -> float:
    """math.exp that gives inf instead of raising OverflowError."""
    return math.exp(x) if x < 709.0 else math.inf


def _finite_exp(nll: float, name: str) -> float:
    """exp(nll), or FloatingPointError when the model's log-probabilities are NaN/inf or it overflows."""
    value = _exp(nll) if math.isfinite(nll) else math.nan
    if not math.isfinite(value):
        raise FloatingPointError(f"{name} is not finite (mean negative log-likelihood {nll} nats/token): the "
                                 f"model's outputs are NaN or overflow; check its weights")
    return value


def split_last_word(text: str, where: str = "record") -> tuple[str, str]:
    """LAMBADA's split as in lm-eval-harness: context = text up to the last space, target = ' ' + last word."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    context, sep, word = text.rstrip().rpartition(" ")
    if not sep or not word or not context.strip():
        raise ValueError(f"{where}: text has no final word after a context (needs 'context ... word'): {text[:80]!r}")
    return context, " " + word


def lambada(model, params, tokenizer, texts: Iterable[str], *, batch_size: int = 8, progress: bool = True,
            scorer: Callable | None = None) -> dict:
    """LAMBADA last-word prediction: `accuracy` (every token of the final word is the greedy prediction)
    and `perplexity` = exp(-mean over examples of log p(final word | context)), as lm-eval-harness reports it.
    """
    context_length = model.config.n_positions
    examples = []
    for i, text in enumerate(texts):
        context, target = split_last_word(text, where=f"example {i}")
        # lm-eval-harness: encode context+target together and take the target's tokens from the whole, so
        # BPE merges across the boundary match how the text is really tokenized.
        whole = tokenizer.encode(context + target)
        ctx = tokenizer.encode(context)
        target_ids = whole[len(ctx):]
        if not target_ids:
            raise ValueError(f"example {i}: the final word encodes to no tokens")
        if len(target_ids) > context_length - 1:
            raise ValueError(f"example {i}: the final word is {len(target_ids)} tokens, more than the "
                             f"{context_length - 1} the model's window (n_positions={context_length}) can score "
                             f"after one token of context: {target.strip()[:40]!r}")
        ids = (ctx + target_ids)[-context_length:]  # the scorer predicts ids[1:]: keep the whole window
        _check_ids(np.asarray(ids), model.config.vocab_size)
        examples.append((ids, len(target_ids)))
    if not examples:
        raise ValueError("no LAMBADA examples to evaluate")
    score = scorer or make_scorer(model)
    logprob_sums, correct, scored_tokens = [], 0, 0
    bar = tqdm(total=len(examples), desc="lambada", unit="example", disable=not progress)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        rows = [ids for ids, _ in chunk]
        batch = jnp.asarray(_padded_batch(rows, batch_size, context_length))
        logprob, greedy = (np.asarray(a) for a in score(params, batch))
        for row, (ids, n) in enumerate(chunk):
            sl = slice(len(ids) - 1 - n, len(ids) - 1)  # the last n next-token predictions
            logprob_sums.append(float(logprob[row, sl].astype(np.float64).sum()))
            correct += bool(greedy[row, sl].all())
            scored_tokens += n
        bar.update(len(chunk))
        bar.set_postfix(acc=f"{correct / len(logprob_sums):.3f}")
    bar.close()
    n = len(logprob_sums)
    return {"accuracy": correct / n, "perplexity": _finite_exp(-sum(logprob_sums) / n, "LAMBADA perplexity"),
            "num_examples": n, "num_target_tokens": scored_tokens}

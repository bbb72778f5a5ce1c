"""Which predicted tokens the loss scores: `data.loss_on` = "all" (every token) or "completion".

With "completion", a fine-tuning recipe with prompts (`recipes.PROMPT_RECIPES`: CommonGen's `" kid, room, dance:"`
before its sentence, a `prompt_completion` jsonl's `prompt`) is trained and evaluated only on what follows the
prompt. The corpus records a per-token mask (`mask_NNNNN.bin` beside each token shard, 1 = scored: the completion's
tokens and the `<|endoftext|>` that closes it, so the model learns where a completion ends), and the mask is
target-side: the prediction of token t+1 counts when token t+1 is scored. The loss is the masked mean
sum(mask * nll) / sum(mask) over the whole batch: micro-batches are summed and divided by the batch's mask
count, not averaged, so gradient accumulation gives the full batch's masked mean (windows hold different numbers
of scored tokens). Eval losses are the same masked mean over all held-out batches.

How the mask travels: `data.Windows` ORs it into bit `SCORED_BIT` of the int32 token ids (ids of uint16 shards are
below 2**16), so a batch stays one `[A, B, T+1]` int32 array: the same shapes, sharding, per-host row reads,
resume state and compiled program inputs as without a mask (the alternative, a second array beside the tokens,
would change every jitted signature, the compile-only plans and the multi-host callback). The step splits it
back (`split`) before anything reads the tokens. With "all" nothing is packed and the step is the old program.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

LOSS_ON = ("all", "completion")
SCORED_BIT = 16  # above every uint16 token id, below int32's sign bit


def check_loss_on(loss_on) -> None:
    """A ValueError naming `data.loss_on` unless it is one of `LOSS_ON`."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"data.loss_on={loss_on!r}: choose one of {LOSS_ON} ('completion' scores only the "
                         "tokens after a recipe's prompt)")


def check_corpus(loss_on: str, meta: dict, folder: str) -> bool:
    """Whether batches carry the mask: True for "completion" on a corpus that records one; "completion" on a
    corpus without one is a one-line ValueError naming `data.loss_on` and the fix."""
    check_loss_on(loss_on)
    if loss_on == "all":
        return False
    if "loss_mask" not in meta:
        raise ValueError(f"data.loss_on='completion' needs a corpus that records where each prompt ends, and "
                         f"{folder} has no loss mask: tokenize it with a recipe that has prompts "
                         "(data.recipe='commongen' or 'prompt_completion'), or set data.loss_on='all'")
    return True


def pack(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int32 `tokens` with the 0/1 `mask` in bit `SCORED_BIT` (module docstring)."""
    return tokens | (mask.astype(np.int32) << SCORED_BIT)


def split(batch):
    """`(tokens, scored)` of a packed batch: the ids and a float32 0/1 array of the same shape."""
    return batch & ((1 << SCORED_BIT) - 1), (batch >> SCORED_BIT).astype(jnp.float32)


def combine_eval(values: list, loss_on: str) -> float:
    """The eval loss from the eval step's per-batch values: their mean ("all": equal-sized batches), or
    ("completion": each value is `[sum of scored nll, scored count]`) the masked mean over all batches."""
    if loss_on == "all":
        return float(np.mean([float(v) for v in values]))
    sums = np.sum([np.asarray(v, np.float64) for v in values], axis=0)
    return float(sums[0] / max(sums[1], 1.0))

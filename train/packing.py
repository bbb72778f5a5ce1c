"""Document masking for packed windows: segment ids and restarting positions, computed inside the step.

Training windows pack documents end to end, each document preceded by `<|endoftext|>` (the corpus writes one
after every document, so every document but a window's first starts right after one). With
`data.document_mask=True` a token attends only to earlier tokens of its own document; with
`data.reset_positions=True` position ids restart at 0 where each document starts. The window's first tokens
(the tail of a document cut by the window) are a document of their own, at positions from 0.

Where `<|endoftext|>` belongs: to the document AFTER it, which it starts. So the separator is the one token a
document's first word is predicted from, as when GPT-2 samples unconditionally (its prompt is `<|endoftext|>`)
and as the CommonGen recipe's prompt `<|endoftext|> kid, room, dance:` reads; and a document's last token
predicts the `<|endoftext|>` that ends it from its own document alone. Every prediction is then made within one
document: no target is predicted from another document's tokens.

The ids are derived from the window's tokens by a cumulative sum over `<|endoftext|>` flags inside the jitted
step, so the batches (their shapes, sharding and the data order a resume restores) are the same with or without
masking. `reset_positions` without `document_mask` is allowed (Megatron-LM's `reset_position_ids` and
`reset_attention_mask` are independent too): each document gets positions from 0, but still sees the ones
before it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

GPT2_EOT = 50256  # `<|endoftext|>` in GPT-2's vocabulary: the separator of corpora that do not record theirs


@dataclasses.dataclass(frozen=True)
class Packing:
    """How a step feeds packed windows to the model (module docstring). The default changes nothing."""

    document_mask: bool = False  # attention stays within each document
    reset_positions: bool = False  # position ids restart at 0 at each document start
    eot_token: int = GPT2_EOT  # the token that starts each document

    @classmethod
    def from_config(cls, data_config, eot_token: int | None = None) -> "Packing":
        """From a training config's `data` section; `eot_token` is the corpus's separator (None: GPT-2's)."""
        return cls(document_mask=bool(data_config.document_mask), reset_positions=bool(data_config.reset_positions),
                   eot_token=GPT2_EOT if eot_token is None else int(eot_token))

    def model_inputs(self, inputs: jax.Array) -> dict[str, jax.Array]:
        """The model's keyword arguments for windows `inputs [B, T]`: `segment_ids` and/or `position_ids`, or
        nothing (the model's defaults, the same program as without packing)."""
        if not (self.document_mask or self.reset_positions):
            return {}
        starts = inputs == self.eot_token  # each document starts at its <|endoftext|>
        out = {}
        if self.document_mask:
            out["segment_ids"] = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
        if self.reset_positions:
            index = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
            # the index of the latest document start at or before each token (0 for a window's first document)
            start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
            out["position_ids"] = index - start
        return out

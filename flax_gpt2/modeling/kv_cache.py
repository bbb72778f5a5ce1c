"""The explicit key/value cache that the model takes in and hands back during decoding."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from flax_gpt2.modeling.config import GPT2Config


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values for S cache slots, plus how many slots are filled.

    `keys[l]` and `values[l]` are `[B, H, S, K]` (heads before slots, so that attention reads them without
    a transpose). Every row shares `index` (the next slot to write); prompts of different lengths are
    left-padded and the padding masked with `attention_mask`.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    index: jax.Array  # int32 scalar

    @classmethod
    def init(cls, config: GPT2Config, batch_size: int, cache_length: int, dtype=None, scratch: int = 0) -> "KVCache":
        """An empty cache of `cache_length` slots S (the tokens it can hold: prompt + new tokens, padding
        included; at most `config.n_positions` plus `scratch`, slots written past the last position by
        speculative decoding and never kept)."""
        if cache_length - scratch > config.n_positions:
            raise ValueError(f"cache length {cache_length - scratch} exceeds the model's n_positions="
                             f"{config.n_positions}")
        shape = (batch_size, config.n_head, cache_length, config.head_dim)
        dtype = dtype or config.dtype
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
        return cls(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)),
                   index=jnp.zeros((), jnp.int32))

    @property
    def cache_length(self) -> int:
        """S, the number of slots."""
        return self.keys[0].shape[2]

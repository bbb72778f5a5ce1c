"""JAX's persistent compilation cache under the cache root, so a second start skips compiling."""

from __future__ import annotations

import os

import jax

from flax_gpt2.utils.cache_root import cache_root


def enable_compilation_cache(cache_dir: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache in `cache_root(cache_dir)/jax`; returns that folder."""
    path = os.path.join(cache_root(cache_dir), "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the small helpers add up too
    return path

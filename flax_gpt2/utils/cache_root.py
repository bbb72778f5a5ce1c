"""The one folder every cache of flax_gpt2 lives under: converted models, compiled code, remote mirrors,
tokenized corpora."""

from __future__ import annotations

import os

ENV = "FLAX_GPT2_CACHE"
DEFAULT = "~/.cache/flax_gpt2"


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    """`cache_dir` if given, else `$FLAX_GPT2_CACHE`, else ~/.cache/flax_gpt2 (user-expanded).

    An empty or blank `$FLAX_GPT2_CACHE` counts as unset: `FLAX_GPT2_CACHE= python ...` must not put caches
    in the current directory.
    """
    chosen = os.fspath(cache_dir) if cache_dir else (os.environ.get(ENV) or "").strip() or DEFAULT
    return os.path.expanduser(chosen)

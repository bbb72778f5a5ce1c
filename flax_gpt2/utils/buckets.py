"""The one ladder of padded lengths: prompts, caches and scored rows are padded up to a rung, so compiled code
is reused across lengths (generation, evaluation, lm-eval and the server all pad the same way).

Rungs: powers of two from 16 up to 256, then multiples of 128. Small lengths waste little in absolute terms;
past 256 a doubling would waste up to half the row, a multiple of 128 at most 127 tokens (and 128 is the TPU's
tile along the sequence).
"""

from __future__ import annotations

MIN_BUCKET = 16


def bucket_length(n: int, cap: int | None = None) -> int:
    """The rung for `n` tokens, at most `cap` (but never below `n`: a length past the cap is its own bucket)."""
    rung = max(MIN_BUCKET, 1 << (n - 1).bit_length()) if n <= 256 else -(-n // 128) * 128
    return rung if cap is None else max(n, min(rung, cap))


def buckets_up_to(last: int) -> list[int]:
    """Every rung below `last`, then `last` itself: the prompt lengths the server compiles a prefill for."""
    rungs, n = [], MIN_BUCKET
    while n < last:
        rungs.append(n)
        n = bucket_length(n + 1)
    return rungs + [last]


def doubling(first: int, last: int) -> list[int]:
    """`first`, `2 * first`, ... while below `last`, then `last` (the server's cache row counts)."""
    sizes = []
    while first < last:
        sizes.append(first)
        first *= 2
    return sizes + [last]

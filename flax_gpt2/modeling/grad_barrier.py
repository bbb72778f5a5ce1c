"""`grad_barrier(x)`: the identity, whose cotangent XLA must write to memory instead of recomputing it.

Why: XLA's CPU fusion recomputes the residual stream's cotangent (every later layer's LayerNorm backward)
inside each consumer instead of storing it, which is quadratic in depth: without a barrier after each block,
GPT-2 124M's backward pass is ~1.5x slower on CPU (41 vs 31 GB of memory traffic per step; see
benchmarks/README.md). GPU/TPU fusion does not have the problem, and the conditional costs there, so the
model applies it only when `GPT2Config.block_grad_barrier` is set (the training step sets it on CPU).

It is a `jax.custom_vjp`: reverse mode only (`jax.jvp` through it is an error, as for any custom_vjp).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def grad_barrier(x: jax.Array) -> jax.Array:
    return x


def _forward(x):
    return x, None


def _backward(_, g):
    # A conditional the compiler cannot remove makes XLA write this cotangent to memory instead of fusing
    # its computation into every consumer. A cotangent whose first element is NaN becomes all-NaN (a NaN
    # there reaches every element within a layer anyway, and the train loop stops on it).
    return (jax.lax.cond(jnp.isnan(g.reshape(-1)[0]), lambda v: jnp.full_like(v, jnp.nan), lambda v: v, g),)


grad_barrier.defvjp(_forward, _backward)

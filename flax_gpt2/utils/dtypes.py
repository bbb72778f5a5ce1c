"""The dtype names every interface accepts (command-line flags, training configs, `load_model`): one table."""

from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def from_name(name: str, what: str = "dtype"):
    """The jnp dtype called `name`; ValueError naming `what` (a flag or config key) and the choices."""
    if name not in DTYPES:
        raise ValueError(f"{what}={name!r}: choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]

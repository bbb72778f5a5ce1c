"""Old names kept working: a keyword argument renamed, with a DeprecationWarning that names the new one.

Names users call are a contract, so a rename keeps the old spelling as an alias; the warning (not an error)
tells them what to write instead. Command-line flags get the same treatment in `flax_gpt2.utils.cli.renamed_flag`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable


def renamed_kwargs(**renames: str) -> Callable:
    """Decorator: `@renamed_kwargs(max_length="window_length")` accepts `max_length=` as the deprecated
    spelling of `window_length=` (a DeprecationWarning; passing both is a TypeError)."""

    def wrap(func: Callable) -> Callable:
        @functools.wraps(func)
        def call(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{func.__qualname__}() got both {new}= and its deprecated name {old}=")
                    warnings.warn(f"{func.__qualname__}({old}=...) is deprecated; use {new}=", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return call

    return wrap


def renamed_attributes(module: str, **renames: tuple[str, Any]) -> Callable[[str], Any]:
    """A module's `__getattr__` that serves old attribute names with a DeprecationWarning:
    `__getattr__ = renamed_attributes(__name__, SamplingParams=("GenerationConfig", GenerationConfig))`."""

    def module_getattr(name: str) -> Any:
        if name in renames:
            new, value = renames[name]
            warnings.warn(f"{module}.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return module_getattr

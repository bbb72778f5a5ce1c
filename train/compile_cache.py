"""JAX's persistent compilation cache for a training run, on by default on TPU and GPU in `WORKDIR/compile_cache`.

A preempted or resumed run would otherwise compile its train and eval steps again (minutes for a large
model on a pod). With the cache in the workdir (`gs://` too), the new VM that resumes the run loads the
executables instead. The cache key covers the program, the compile options, the devices and the jax/XLA
versions, so a changed config or a different slice simply compiles (and adds an entry).

On CPU it is off unless `compile_cache_dir` names a folder: CPU compiles take seconds, not the minutes a pod's
do, and the cache's files would only fill the run folder.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache

from flax_gpt2.utils import file_io

OFF = "none"


def cache_dir_for(setting: str, workdir: str, backend: str | None = None) -> str | None:
    """The folder `config.compile_cache_dir=setting` names for a run in `workdir` on `backend` (default: JAX's);
    None when off: "none", or "" on CPU (see the module docstring)."""
    if setting.strip().lower() == OFF:
        return None
    if not setting and (backend or jax.default_backend()) == "cpu":
        return None
    return file_io.resolve_path(setting) if setting else file_io.join(workdir, "compile_cache")


@contextlib.contextmanager
def enabled_for_run(setting: str, workdir: str) -> Iterator[str | None]:
    """Within the block, JAX's persistent compilation cache is the run's cache folder (`cache_dir_for`); the
    process's previous setting comes back after it, so that later work in the same process (a notebook, the
    tests) does not write into this run's folder. Yields the folder (None when off)."""
    path = cache_dir_for(setting, workdir)
    if path is None:
        if not setting:
            logging.info("persistent compilation cache: off on CPU by default (compile_cache_dir=DIR turns it on)")
        yield None
        return
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    _point_at(path, 0)  # the eval step, init and the small helpers add up to seconds on every restart too
    logging.info("persistent compilation cache: %s", path)
    try:
        yield path
    finally:
        _point_at(*before)


def _point_at(path: str | None, min_seconds: float) -> None:
    # JAX opens its cache once per process, at the first compile: reset it so the new folder is used.
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)

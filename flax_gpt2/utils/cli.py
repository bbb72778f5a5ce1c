"""One convention for every command line of the project (`sample`, `evaluate`, `convert`, `train`, ...).

A user's mistake (a missing file, a bad flag value, a corrupt checkpoint) is one line on stderr that names
the file or flag and the fix, with exit code 2 for usage errors and 1 for runtime errors; the traceback is
shown only with `--debug`. A bug in the project (any other exception) keeps its traceback.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import math
import os
import sys
from typing import Callable, Sequence

import jax

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A bad command line (flag value, missing flag): exit code 2."""

def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe something the user can fix; printed as one line, exit code 1."""
    errors: list[type[BaseException]] = [OSError, ValueError, RuntimeError, FloatingPointError, KeyError,
                                         json.JSONDecodeError, UnicodeDecodeError, ImportError]
    try:
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *, prog: str = "") -> int:
    """Calls `main(argv)` with the `--debug` flag removed and turns exceptions into exit codes.

    Returns the exit code: `main`'s own (None = 0), 2 for `UsageError` (and argparse's own usage
    errors), 1 for user errors, 130 for Ctrl-C.
    """
    skip_absent_tpu()
    argv = [_underscored(a) for a in (sys.argv[1:] if argv is None else argv)]
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    prefix = f"{prog}: " if prog else ""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: 2 for usage errors, 0 for --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except UsageError as e:
        if debug:
            raise
        print(f"{prefix}error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors() as e:
        if debug:
            raise
        logging.debug("error", exc_info=True)
        print(f"{prefix}error: {one_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_RUNTIME
    return 0 if code is None else int(code)


# What says a TPU may be attached: its device files (/dev/accel* on v2-v4, /dev/vfio/N on v5+), or the
# variables TPU VMs and pods set (and JAX_FORCE_TPU_INIT). A GPU: the device files JAX itself looks for.
_TPU_ENV = ("TPU_NAME", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_CHIPS_PER_HOST_BOUNDS",
            "JAX_FORCE_TPU_INIT")
_GPU_FILES = ("/dev/nvidia*", "/dev/dxg", "/dev/kfd")


def tpu_attached() -> bool:
    """Whether this machine may have a TPU: its device files exist, or a TPU environment variable is set."""
    vfio = os.listdir("/dev/vfio") if os.path.isdir("/dev/vfio") else []
    return bool(glob.glob("/dev/accel*") or any(name.isdigit() for name in vfio)
                or any(os.environ.get(v) for v in _TPU_ENV))


def skip_absent_tpu() -> None:
    """Keeps JAX off libtpu on a CPU machine that has it installed (every command calls this first).

    With the `[tpu]` extra (which compile_only also uses), JAX loads libtpu on first use, and on a machine
    without a TPU libtpu prints five lines of errors about host bounds and worker hostnames on every
    command. There JAX is told to use the CPU (`jax_platforms="cpu"`, as JAX_PLATFORMS=cpu would). Nothing
    changes when JAX_PLATFORMS is set (the user chose), when a TPU or a GPU may be attached (GPU machines
    keep JAX's own choice), or when libtpu is not installed. compile_only loads libtpu itself for a
    topology description, which needs no TPU backend.
    """
    if ("JAX_PLATFORMS" in os.environ or tpu_attached() or any(glob.glob(f) for f in _GPU_FILES)
            or importlib.util.find_spec("libtpu") is None):
        return

    if not jax.config.jax_platforms:  # read before any backend starts; a later update is ignored by jax
        jax.config.update("jax_platforms", "cpu")


def flag_type(convert: Callable[[str], object], ok: Callable[[object], bool], requirement: str) -> Callable:
    """An argparse `type=` that converts a flag's text and checks it: `flag_type(int, lambda n: n > 0,
    "a positive integer")` makes `--batch_size 0` a usage error (exit 2) that names the flag and the range.

    NaN and ±inf never pass (argparse's `float` accepts them); `requirement` completes "must be ...".
    """

    def parse(text: str):
        try:
            value = convert(text)
            good = ok(value) and (not isinstance(value, float) or math.isfinite(value))
        except (ValueError, TypeError, OverflowError):
            good = False
        if not good:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    parse.__name__ = requirement
    return parse


def _underscored(arg: str) -> str:
    """`--no-progress` -> `--no_progress`: flags are spelled with underscores, dashes are accepted too.
    Only the flag's name changes (`--stop-token=a-b` -> `--stop_token=a-b`)."""
    if not arg.startswith("--") or len(arg) < 3:
        return arg
    name, sep, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + sep + value


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages are joined; the type named if it says nothing)."""
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = f"missing key {error.args[0]!r}"
    return text or type(error).__name__

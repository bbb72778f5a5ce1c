"""The command line: `--config FILE` (a Python file with `get_config()`), `--workdir DIR`, and
ml_collections dotted overrides `--config.KEY=VALUE` (`--config.optimizer.lr=3e-4`), typed by the
config's own values. Unknown keys, bad values and stray arguments are errors.

`--config` may also name a shipped config, `tiny` or `configs/tiny.py`, when no such file exists where the
command runs: pip users have the configs inside the installed package (flax_gpt2/configs), not beside them.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


from flax_gpt2.cli import UsageError  # noqa: E402  (re-exported: a bad command line, exit code 2)


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
    """`(config, workdir)` from `argv` (including the program name, as in `sys.argv`)."""
    argv = _with_shipped_config(list(argv))
    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file("config", None, "training config file (configs/<name>.py)",
                                                  flag_values=fv, lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logs go (resumes if it has a run)",
                        flag_values=fv)
    try:
        rest = fv(list(argv))
    except (AttributeError, KeyError) as e:  # ml_collections' report of an unknown --config.KEY
        raise UsageError(_unknown_key_message(argv, e)) from e
    except flags.Error as e:
        raise UsageError(str(e)) from e
    except Exception as e:  # the config file itself failed: a syntax error, a bad import, an error in get_config
        raise UsageError(f"cannot load the config file: {type(e).__name__}: {e}") from e
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments: {rest[1:]}")
    if fv["config"].present == 0:
        raise UsageError("--config is required (e.g. --config configs/tiny.py)")
    config = config_flag.value
    try:
        config.keys()  # a config file that failed to load is an object that raises on any use
    except OSError as e:  # the config file could not be read
        raise UsageError(f"cannot load the config file: {' '.join(str(e).split())}") from e
    if not fv["workdir"].value:
        raise UsageError("--workdir is required")
    return config, fv["workdir"].value


def shipped_configs() -> dict[str, str]:
    """The configs installed with the package: `{"tiny": ".../flax_gpt2/configs/tiny.py", ...}`."""
    from flax_gpt2 import configs

    folder = os.path.dirname(configs.__file__)
    return {name[:-3]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.endswith(".py") and name not in ("__init__.py", "base.py")}


def _with_shipped_config(argv: list[str]) -> list[str]:
    """`argv` with a `--config` value that names no file but a shipped config replaced by that file's path
    (any `:ARGS` suffix kept); any other value is left for the loader to report."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            index, value, prefix = i + 1, argv[i + 1], ""
        elif arg.startswith("--config="):
            index, value, prefix = i, arg[len("--config="):], "--config="
        else:
            continue
        path, colon, args = value.partition(":")
        if not path or os.path.exists(path):
            return argv
        name = os.path.basename(path)
        name = name[:-3] if name.endswith(".py") else name
        shipped = shipped_configs()
        if path not in (name, f"{name}.py", f"configs/{name}.py") or name not in shipped:
            hint = f"no such file; shipped configs: {', '.join(shipped)}"
            raise UsageError(f"--config {value}: {hint}")
        logging.info("config %s: the shipped %s", value, shipped[name])
        argv = list(argv)
        argv[index] = prefix + shipped[name] + colon + args
        return argv
    return argv


def _unknown_key_message(argv: Sequence[str], error: Exception) -> str:
    """Names the override whose key the config lacks (ml_collections names only the bad part)."""
    detail = str(error.args[0] if error.args else error).strip("'\"").replace("\\n", "\n").replace("\\'", "'")
    part, _, hint = detail.partition("\n")
    part = part.strip("'\"")
    keys = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
    key = next((k for k in keys if part in k.split(".")), part)
    return f"unknown config key {key!r}" + (f" ({hint.strip()})" if hint else "")

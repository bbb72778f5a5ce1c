"""The command line: `--config FILE` (a Python file with `get_config()`), `--workdir DIR`, and
ml_collections dotted overrides `--config.KEY=VALUE` (`--config.optimizer.lr=3e-4`), typed by the
config's own values. Unknown keys, bad values and stray arguments are errors; `--help` prints the usage.

What the command line says explicitly beats a config's default: `--config.steps=N` on a config that counts
`epochs` (the fine-tuning recipes) trains N steps; giving both `--config.steps` and `--config.epochs` is an
error.

`--config` may also name a shipped config, `tiny` or `configs/tiny.py`, when no such file exists where the
command runs: pip users have the configs inside the installed package (flax_gpt2/configs), not beside them.
"""

from __future__ import annotations

import ast
import logging
import os
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from flax_gpt2 import configs
from flax_gpt2.configs import base
from flax_gpt2.utils.cli import UsageError  # noqa: E402  (re-exported: a bad command line, exit code 2)

HELP_FLAGS = ("--help", "-h", "-help", "--helpshort", "--helpfull")


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
    """`(config, workdir)` from `argv` (including the program name, as in `sys.argv`).

    `--help` prints `usage()` and raises `SystemExit(0)`, as argparse does.
    """
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(usage())
        raise SystemExit(0)
    argv = _with_shipped_config(list(argv))
    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file("config", None, "training config file (configs/<name>.py)",
                                                  flag_values=fv, lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logs go (resumes if it has a run)",
                        flag_values=fv)
    try:
        rest = fv(list(argv))
    except (AttributeError, KeyError) as e:  # ml_collections' report of an unknown --config.KEY
        _check_is_config(_load_without_overrides(argv), argv)  # (or of a get_config() that returned no ConfigDict)
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
    except AttributeError:
        pass  # not a ConfigDict: named just below
    _check_is_config(config, argv)
    if not fv["workdir"].value:
        raise UsageError("--workdir is required")
    _explicit_steps_win(config, config_flags.get_override_values(fv["config"]))
    return config, fv["workdir"].value


def usage() -> str:
    """The `--help` text: the command line, the shipped configs and where the config keys are documented."""
    shipped = shipped_configs()
    width = max(map(len, shipped)) + 2
    listing = "\n".join(f"  {name:<{width}}{_first_line(path)}" for name, path in shipped.items())

    base = os.path.join(os.path.dirname(configs.__file__), "base.py")
    return f"""usage: python -m flax_gpt2.train --config CONFIG --workdir DIR [--config.KEY=VALUE ...] [--debug]
       (also flax-gpt2-train ...; from a checkout, python -m train --config configs/NAME.py ...)

Trains a GPT-2, or resumes the run already in DIR (rerun the same command after a stop or a preemption).

  --config CONFIG     a shipped config by name (tiny), or a Python file whose get_config() returns an
                      ml_collections.ConfigDict built on flax_gpt2.configs.base.get_config()
  --workdir DIR       the run's folder (local or gs://): checkpoints, metrics.jsonl, result.json, loss.png
  --config.KEY=VALUE  override any config key: --config.steps=100 --config.optimizer.lr=3e-4
                      --config.data.source=my.jsonl --config.progress_bar=False (an unknown key is an error)
  --debug             show the traceback of an error
  --help              this text

shipped configs:
{listing}

config keys: every key, its default and what it means are in {base}
(the shipped configs only override it); README.md, section "Training", describes a run's outputs."""


def _first_line(path: str) -> str:
    """The first line of a config file's docstring (read, not imported: the help runs no config code)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, ValueError):
        return ""
    return doc.split("\n")[0]


def _check_is_config(config, argv: Sequence[str]) -> None:
    """A config must be a ConfigDict with every key of `configs/base.py` (the run reads them all)."""
    found = _config_arg(argv)
    if found is None:
        return  # no --config: parse_args says it is required
    path = found[1].partition(":")[0]
    fix = "return flax_gpt2.configs.base.get_config() with your overrides (as the shipped configs do)"
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(f"{path}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict; "
                         f"{fix}")

    missing = sorted(set(_dotted_keys(base.get_config())) - set(_dotted_keys(config)))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UsageError(f"{path}: get_config() lacks the config keys {shown}; {fix}")


def _load_without_overrides(argv: Sequence[str]):
    """The config file's own `get_config()` (None if it cannot be loaded), for naming what failed."""
    found = _config_arg(argv)
    if found is None:
        return None
    argv = ["train", "--config", found[1]]
    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    try:
        fv(argv)
        return config_flag.value
    except Exception:  # noqa: BLE001 - the caller reports the original error
        return None


def _dotted_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys += (_dotted_keys(value, f"{prefix}{key}.") if isinstance(value, ml_collections.ConfigDict)
                 else [f"{prefix}{key}"])
    return keys


def _explicit_steps_win(config, overrides: dict) -> None:
    """`--config.steps=N` beats a config's `epochs` (which would otherwise set `steps`); both given is an error."""
    if "steps" not in overrides or config.epochs <= 0:
        return
    if "epochs" in overrides:
        raise UsageError(f"--config.steps={config.steps} and --config.epochs={config.epochs} both set the length of "
                         "the run; give one of them")
    logging.info("--config.steps=%d given: it replaces the config's epochs=%d", config.steps, config.epochs)
    config.epochs = 0


def shipped_configs() -> dict[str, str]:
    """The configs installed with the package: `{"tiny": ".../flax_gpt2/configs/tiny.py", ...}`."""

    folder = os.path.dirname(configs.__file__)
    return {name[:-3]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.endswith(".py") and name not in ("__init__.py", "base.py")}


def _with_shipped_config(argv: list[str]) -> list[str]:
    """`argv` with a `--config` value that names no file but a shipped config replaced by that file's path
    (any `:ARGS` suffix kept); any other value is left for the loader to report."""
    found = _config_arg(argv)
    if found is not None:
        index, value, prefix = found
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


def _config_arg(argv: Sequence[str]) -> tuple[int, str, str] | None:
    """`(index, value, prefix)` of the `--config` value in `argv` (`--config X` or `--config=X`), or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return i + 1, argv[i + 1], ""
        if arg.startswith("--config="):
            return i, arg[len("--config="):], "--config="
    return None


def _unknown_key_message(argv: Sequence[str], error: Exception) -> str:
    """Names the override whose key the config lacks (ml_collections names only the bad part)."""
    detail = str(error.args[0] if error.args else error).strip("'\"").replace("\\n", "\n").replace("\\'", "'")
    part, _, hint = detail.partition("\n")
    part = part.strip("'\"")
    keys = [a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")]
    key = next((k for k in keys if part in k.split(".")), part)
    return f"unknown config key {key!r}" + (f" ({hint.strip()})" if hint else "")

"""lm-evaluation-harness tasks from `python -m flax_gpt2.evaluate --tasks ...`.

    python -m flax_gpt2.evaluate --model PATH --tasks lambada_openai,hellaswag,wikitext \\
        [--batch_size N] [--limit N] [--num_fewshot K] [--output_path results.json] [--include_path DIR]

`lm_eval` is an optional extra (`pip install -e ".[eval]"`): this module imports nothing of it until a
function here needs it.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from flax_gpt2.evaluation.lm_eval_registration import MODEL_NAME, require_lm_eval

# --- local task files ----------------------------------------------------------------------------------

# Where lm-eval keeps the standard tasks the GPT-2 card's table uses (relative to lm_eval/tasks); other
# tasks are looked up by file name, then in lm-eval's task index.
_STANDARD_TASK_FILES = {"lambada_openai": "lambada/lambada_openai.yaml",
                        "lambada_standard": "lambada/lambada_standard.yaml",
                        "hellaswag": "hellaswag/hellaswag.yaml", "wikitext": "wikitext/wikitext.yaml"}


def standard_task_yaml(task: str) -> str:
    """The path of lm-eval's own YAML for `task` (e.g. "hellaswag")."""
    require_lm_eval()
    import glob

    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    root = os.path.dirname(lm_eval.tasks.__file__)
    if task in _STANDARD_TASK_FILES:
        return os.path.join(root, _STANDARD_TASK_FILES[task])
    for path in sorted(glob.glob(os.path.join(root, "**", f"{glob.escape(task)}.yaml"), recursive=True)):
        try:
            if load_yaml(path, resolve_func=False).get("task") == task:
                return path
        except Exception:  # noqa: BLE001 - a YAML lm-eval itself cannot read is simply not the one
            continue
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index.get(task)
    if entry is None or entry.yaml_path is None or "task" not in (entry.cfg or {}):
        raise ValueError(f"lm-eval has no single task named {task!r} defined by a YAML file")
    return str(entry.yaml_path)


def write_local_task(folder: str | os.PathLike, task: str, data_file: str | os.PathLike, *, name: str | None = None,
                     cache_dir: str | os.PathLike | None = None) -> str:
    """Writes `FOLDER/NAME.yaml`: lm-eval's `task` reading its documents from a local json/jsonl file
    instead of the hub, for `--include_path FOLDER`. Returns the YAML's path.

    The YAML includes lm-eval's own task YAML (prompts, metrics, `process_docs` stay lm-eval's) and
    overrides only the data: `dataset_path: json`, `data_files` for the split the task evaluates, the
    other splits unset (few-shot examples then come from that split). `name` defaults to `task`, which
    makes `--tasks TASK --include_path FOLDER` read the local file under the standard name. The records
    must have the columns the task reads: `text` (lambada_openai), `page` (wikitext), HellaSwag's
    `activity_label`, `ctx_a`, `ctx_b`, `endings`, `label` (hellaswag; the official `hellaswag_val.jsonl`
    and the `Rowan/hellaswag` rows both have them).
    """
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    base = standard_task_yaml(task)
    cfg = load_yaml(base, resolve_func=False)
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise ValueError(f"lm-eval's {task} evaluates no test or validation split")
    data_file = os.path.abspath(os.fspath(data_file))
    if not os.path.isfile(data_file):
        raise FileNotFoundError(f"no such data file: {data_file}")
    override: dict[str, Any] = {"include": base, "task": name or task, "dataset_path": "json", "dataset_name": None,
                                "dataset_kwargs": {"data_files": {split: data_file}}}
    if cache_dir is not None:
        override["dataset_kwargs"]["cache_dir"] = os.path.abspath(os.fspath(cache_dir))
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(key) not in (None, split):
            override[key] = None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.fspath(folder), f"{name or task}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# lm-eval's {task} reading {os.path.basename(data_file)} "
                f"(flax_gpt2.evaluation.lm_eval_tasks.write_local_task)\n")
        yaml.safe_dump(override, f, sort_keys=False)
    return path


# --- the command line ----------------------------------------------------------------------------------

def _limit(text: str) -> int | float:
    """lm-eval's --limit: a number of examples per task, or a fraction (< 1) of each task."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples or a fraction < 1, got {text!r}") from None
    if not 0 < value < float("inf"):  # NaN and inf too: int(inf) would raise OverflowError, a traceback
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    if value >= 1:
        if value != int(value):
            raise argparse.ArgumentTypeError(f"a limit >= 1 is a number of examples (an integer), got {text!r}")
        return int(value)
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive integer, got 0")
    return value


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `--tasks`, `--batch_size` (unless the parser has one), `--limit`, `--num_fewshot`, `--output_path`,
    `--include_path` and `--bootstrap_iters` (lm-eval's flags of the same names)."""
    g = parser.add_argument_group("lm-evaluation-harness tasks (the optional [eval] extra)")
    g.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks or groups, e.g. lambada_openai,hellaswag,wikitext; "
                        "runs lm_eval.simple_evaluate and prints lm-eval's table")
    try:
        g.add_argument("--batch_size", type=_positive_int, default=8, help="sequences per model call")
    except argparse.ArgumentError:
        pass  # the parser's own --batch_size serves both
    g.add_argument("--limit", type=_limit, default=None,
                   help="examples per task (or a fraction < 1 of each); for quick checks only")
    g.add_argument("--num_fewshot", type=_non_negative_int, default=None,
                   help="few-shot examples per prompt (default: each task's own setting, else 0)")
    g.add_argument("--output_path", default=None,
                   help="write lm-eval's results (with per-sample logs) to this .json file, or into this folder")
    g.add_argument("--include_path", default=None,
                   help="a folder of extra task YAMLs, e.g. tasks reading local files "
                        "(dataset_path: json, dataset_kwargs.data_files); see docs/EVALUATION.md")
    g.add_argument("--bootstrap_iters", type=_non_negative_int, default=100_000,
                   help="bootstrap resamples for the stderr of non-mean metrics such as perplexity "
                        "(lm-eval's default 100000; 0 skips stderr)")


def _options(args: Any, kwargs: dict) -> dict:
    if args is None:
        opts = {}
    elif isinstance(args, argparse.Namespace):
        opts = vars(args).copy()
    elif isinstance(args, dict):
        opts = dict(args)
    else:
        raise TypeError(f"run_tasks takes an argparse.Namespace or a dict, got {type(args).__name__}")
    opts.update(kwargs)
    return opts


def run_tasks(args: argparse.Namespace | dict | None = None, /, **kwargs) -> dict:
    """Runs lm-eval tasks on a flax_gpt2 model and prints lm-eval's results table.

    Args:
      args: the parsed `python -m flax_gpt2.evaluate` arguments (or a dict); keyword arguments override
        them. Used: `model` (hub id, Hugging Face folder or training run), `adapter` (a PEFT LoRA folder),
        `tasks` (a comma-separated string or a list), `batch_size`, `dtype`, `limit`, `num_fewshot`, `output_path`, `include_path`,
        `bootstrap_iters`, `no_progress`.
    Returns:
      lm-eval's results dict (`results`, `versions`, `n-shot`, `config`, ...), without per-sample logs.
    Raises:
      ModuleNotFoundError: lm_eval is not installed (the message names the [eval] extra).
      ValueError: no tasks, or task names lm-eval does not know.
    """
    opts = _options(args, kwargs)
    require_lm_eval()
    tasks = opts.get("tasks")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty: name lm-eval tasks, e.g. --tasks lambada_openai,hellaswag,wikitext")
    include_path = opts.get("include_path")
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"--include_path {include_path!r} is not a folder")
    if not opts.get("model"):
        raise ValueError("give --model: a hub id, a Hugging Face folder or a training run")

    import lm_eval
    from lm_eval.utils import make_table

    # lm_eval (the optional [eval] extra) is imported only when tasks run; importing the model registers its class.
    from flax_gpt2.evaluation import lm_eval_model  # noqa: F401

    task_manager = _task_manager(tasks, include_path)
    # Names may be globs (`lambada_*`) or task YAML files, as on lm-eval's own command line.
    names, unknown = [], []
    for task in tasks:
        matched = [task] if os.path.isfile(task) else task_manager.match_tasks([task])
        names += [m for m in matched if m not in names]
        if not matched:
            unknown.append(task)
    if unknown:
        where = f" (nor in --include_path {include_path})" if include_path else ""
        raise ValueError(f"unknown lm-eval task{'s' * (len(unknown) > 1)} {', '.join(unknown)}{where}; "
                         f"`lm_eval ls tasks` lists them")
    output_path = opts.get("output_path")
    model_args = {"pretrained": os.fspath(opts["model"]), "dtype": opts.get("dtype") or "float32",
                  "progress": not opts.get("no_progress", False)}
    if opts.get("adapter"):
        model_args["adapter"] = os.fspath(opts["adapter"])
    results = lm_eval.simple_evaluate(
        model=MODEL_NAME, model_args=model_args, tasks=names, batch_size=opts.get("batch_size") or 8,
        num_fewshot=opts.get("num_fewshot"), limit=opts.get("limit"), task_manager=task_manager,
        bootstrap_iters=opts.get("bootstrap_iters", 100_000), log_samples=bool(output_path))
    if results is None:  # a non-zero rank of a distributed run
        return {}
    if output_path:
        _write_results(output_path, results)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    results.pop("samples", None)
    return results


def _task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager; when every task is defined under `include_path`, without indexing lm-eval's
    thousands of standard task YAMLs (about 15 s)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(os.path.isfile(t) or t in local.all_subtasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def _write_results(output_path: str, results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    path = os.path.join(output_path, "results.json") if os.path.isdir(output_path) or output_path.endswith(
        os.sep) else output_path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        f.write("\n")
    return path

"""Checkpoint conversion: any GPT-2 checkpoint `from_pretrained` reads in, one chosen format out.

    # A hub id, a Hugging Face folder in any format (safetensors, sharded, pytorch_model.bin,
    # flax_model.msgpack), a training run or gs://... -> a Hugging Face folder in safetensors that
    # flax_gpt2.from_pretrained loads fast (memory-mapped) and transformers reads unchanged:
    python -m flax_gpt2.convert --model gpt2 --out ~/models/gpt2 [--dtype bfloat16]
    python -m flax_gpt2.convert --model runs/my-run --out ~/models/my-gpt2

    # The same, with the weights in transformers' old Flax layout (flax_model.msgpack), which
    # transformers <= 4.x's FlaxGPT2LMHeadModel.from_pretrained reads:
    python -m flax_gpt2.convert --model runs/my-run --out ~/models/my-gpt2-flax --format msgpack

`--format` names what is written (`safetensors`, the default, or `msgpack`); the input format is found
from the folder. Every input is loaded through flax_gpt2's strict rename table, so a converted folder is
known to fit the model. With `--overwrite`, every new file is complete before an old one is replaced, so
a full disk or a crash leaves the previous folder loadable.
Errors are one line on stderr (exit 2 for a bad flag, 1 otherwise); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from flax_gpt2.utils import cli
from flax_gpt2.checkpoints import run_folders as run_checkpoint
from flax_gpt2.tokenizer.bpe_files import tokenizer_files
from flax_gpt2.modeling.config import GPT2Config, read_hf_json
from flax_gpt2.checkpoints.pretrained import (MODEL_CLASSES, SAVE_FORMATS, check_output_folder, check_save_format,
                                  from_pretrained, resolve, save_pretrained)

from flax_gpt2.utils.dtypes import DTYPES  # noqa: E402  (one table for every interface)
PROG = "python -m flax_gpt2.convert"
FORMATS = SAVE_FORMATS


def convert(model: str, out: str, *, format: str = "safetensors", revision: str | None = None,
            dtype: str = "float32", overwrite: bool = False, progress: bool = True,
            pass_folder_as: str = "convert('DIR', ...)") -> str:
    """Reads a GPT-2 checkpoint from anywhere `from_pretrained` reads, checks it, and writes it to `out`.

    Args:
      model: hub id, Hugging Face folder (any weights format), flax_gpt2 training run, or gs://... path.
      out: output folder (must be empty or new unless `overwrite`).
      format: what is written: "safetensors" (a Hugging Face folder) or "msgpack" (the same folder with
        transformers' old Flax `flax_model.msgpack` as its weights; not for GPT2DoubleHeadsModel).
      revision: hub branch, tag or commit.
      dtype: "float32", "bfloat16" or "float16": the dtype the weights are stored in.
      overwrite: allow writing into a non-empty folder.
      progress: show progress bars.
      pass_folder_as: how the error for an unreachable hub says to pass a downloaded folder.

    Returns:
      `out`.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_output_folder(os.fspath(out), overwrite)  # before anything is read
    folder = resolve(model, revision=revision, progress=progress, pass_folder_as=pass_folder_as)
    model_class = _saved_model_class(folder)
    check_save_format(format, model_class)  # before the weights are read
    loaded, params = from_pretrained(folder, model_class=model_class, param_dtype=DTYPES[dtype], progress=progress)
    has_tokenizer = tokenizer_files(folder) is not None  # vocab.json + merges.txt or encoder.json + vocab.bpe
    return save_pretrained(out, loaded, params, tokenizer=folder if has_tokenizer else True, dtype=DTYPES[dtype],
                           overwrite=overwrite, format=format, progress=progress)


def _saved_model_class(folder: str) -> type:
    """The model class named in the folder's config.json `architectures` (GPT2LMHeadModel if none).

    The whole config.json is checked first, so a field of the wrong JSON type is the config's one-line
    error naming the file and the field, before anything is read or written.
    """
    path = os.path.join(folder, "config.json")
    if os.path.isfile(path):
        GPT2Config.from_hf_config(path)
        for name in read_hf_json(path).get("architectures") or ():
            if name in MODEL_CLASSES:
                return MODEL_CLASSES[name]
    return MODEL_CLASSES["GPT2LMHeadModel"]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (arguments as in `--help`, plus `--debug`); returns the exit code (see `flax_gpt2.utils.cli`)."""
    return cli.run(_main, argv, prog=PROG)


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="what to read: hub id, Hugging Face folder (any weights format), training run folder, "
                             "or gs://...")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", default="safetensors", choices=FORMATS,
                        help="what to write: safetensors (a Hugging Face folder, default) or msgpack "
                             "(flax_model.msgpack, transformers <= 4.x Flax models)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output folder (its old files stay until the new ones are "
                             "complete)")
    parser.add_argument("--no_progress", dest="progress", action="store_false", help="hide progress bars")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file; pass a folder (new, empty, or with --overwrite)")
    if os.path.isdir(args.out) and run_checkpoint.is_run_folder(args.out):
        raise cli.UsageError(f"--out {args.out} is a flax_gpt2 training run: sample, evaluate and serve would load the "
                             f"export instead of the run's newest checkpoint; write it to a folder of its own (e.g. "
                             f"--out {args.out.rstrip(os.sep)}-export)")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        parser.error(f"--out {args.out} is not empty; pass --overwrite to replace the files a conversion writes")
    out = convert(args.model, args.out, format=args.format, revision=args.revision, dtype=args.dtype,
                  overwrite=args.overwrite, progress=args.progress, pass_folder_as="--model DIR")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

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

from flax_gpt2.checkpoints import run_folders
from flax_gpt2.checkpoints.conversion import FORMATS, convert
from flax_gpt2.utils import cli
from flax_gpt2.utils.dtypes import DTYPES  # noqa: E402  (one table for every interface)

PROG = "python -m flax_gpt2.convert"


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (arguments as in `--help`, plus `--debug`); returns the exit code (see
    `flax_gpt2.utils.cli`)."""
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
    if os.path.isdir(args.out) and run_folders.is_run_folder(args.out):
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

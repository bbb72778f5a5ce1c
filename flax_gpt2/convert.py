"""Checkpoint conversion in both directions.

    # Hub id or any HF folder (safetensors, sharded, pytorch_model.bin, flax_model.msgpack) -> a local
    # folder that flax_gpt2.from_pretrained loads fast (and transformers too):
    python -m flax_gpt2.convert hf-to-flax --model gpt2 --out ~/models/gpt2 [--dtype bfloat16]

    # A flax_gpt2 training run (or any folder from_pretrained reads) -> a Hugging Face folder:
    python -m flax_gpt2.convert flax-to-hf --model runs/my-run --out ~/models/my-gpt2

Both load the weights through flax_gpt2's strict rename table, so a converted folder is known to fit
the model. The output is the Hugging Face layout in safetensors: it memory-maps, needs no renaming
beyond reshapes, and `transformers` reads it unchanged. With `--overwrite`, every new file is complete
before an old one is replaced, so a full disk or a crash leaves the previous folder loadable.
Errors are one line on stderr (exit 2 for a bad flag, 1 otherwise); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import jax.numpy as jnp

from flax_gpt2 import cli
from flax_gpt2.pretrained import MODEL_CLASSES, from_pretrained, resolve, save_pretrained

from flax_gpt2.dtypes import DTYPES  # noqa: E402  (one table for every interface)
PROG = "python -m flax_gpt2.convert"


def hf_to_flax(model: str, out: str, *, revision: str | None = None, dtype: str = "float32",
               overwrite: bool = False, progress: bool = True, pass_folder_as: str = "hf_to_flax('DIR', ...)") -> str:
    """Fetches (if a hub id) and checks a Hugging Face GPT-2, and writes it to `out` as safetensors.

    Args:
      model: hub id or local Hugging Face folder.
      out: output folder (must be empty or new unless `overwrite`).
      revision: hub branch, tag or commit.
      dtype: "float32", "bfloat16" or "float16": the dtype the weights are stored in.
      overwrite: allow writing into a non-empty folder.
      progress: show progress bars.
      pass_folder_as: how the error for an unreachable hub says to pass a downloaded folder.

    Returns:
      `out`.
    """
    folder = resolve(model, revision=revision, progress=progress, pass_folder_as=pass_folder_as)
    return _convert(folder, out, dtype=dtype, overwrite=overwrite, progress=progress)


def flax_to_hf(model: str, out: str, *, dtype: str = "float32", overwrite: bool = False,
               progress: bool = True, pass_folder_as: str = "flax_to_hf('DIR', ...)") -> str:
    """Writes a flax_gpt2 training run (or any folder `from_pretrained` reads) as a Hugging Face folder.

    Args and returns as `hf_to_flax`.
    """
    folder = resolve(model, progress=progress, pass_folder_as=pass_folder_as)
    return _convert(folder, out, dtype=dtype, overwrite=overwrite, progress=progress)


def _convert(folder: str, out: str, *, dtype: str, overwrite: bool, progress: bool) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model_class = _saved_model_class(folder)
    model, params = from_pretrained(folder, model_class=model_class, param_dtype=DTYPES[dtype], progress=progress)
    has_tokenizer = all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt"))
    return save_pretrained(out, model, params, tokenizer=folder if has_tokenizer else True, dtype=DTYPES[dtype],
                           overwrite=overwrite, progress=progress)


def _saved_model_class(folder: str) -> type:
    """The model class named in the folder's config.json `architectures` (GPT2LMHeadModel if none)."""
    path = os.path.join(folder, "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for name in json.load(f).get("architectures") or ():
                if name in MODEL_CLASSES:
                    return MODEL_CLASSES[name]
    return MODEL_CLASSES["GPT2LMHeadModel"]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (arguments as in `--help`, plus `--debug`); returns the exit code (see `flax_gpt2.cli`)."""
    return cli.run(_main, argv, prog=PROG)


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_flax = commands.add_parser("hf-to-flax", help="hub id or Hugging Face folder -> fast-loading local folder")
    to_hf = commands.add_parser("flax-to-hf", help="training run or flax_gpt2 folder -> Hugging Face folder")
    for sub in (to_flax, to_hf):
        sub.add_argument("--model", required=True, help="hub id, Hugging Face folder or training run folder")
        sub.add_argument("--out", required=True, help="output folder")
        sub.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
        sub.add_argument("--overwrite", action="store_true",
                         help="write into a non-empty output folder (its old files stay until the new ones are "
                              "complete)")
        sub.add_argument("--no_progress", dest="progress", action="store_false", help="hide progress bars")
    to_flax.add_argument("--revision", default=None, help="hub branch, tag or commit")
    args = parser.parse_args(argv)
    sub = commands.choices[args.command]
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        sub.error(f"--out {args.out} is a file; pass a folder (new, empty, or with --overwrite)")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        sub.error(f"--out {args.out} is not empty; pass --overwrite to replace the files a conversion writes")
    if args.command == "hf-to-flax":
        out = hf_to_flax(args.model, args.out, revision=args.revision, dtype=args.dtype, overwrite=args.overwrite,
                         progress=args.progress, pass_folder_as="--model DIR")
    else:
        out = flax_to_hf(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=args.progress,
                         pass_folder_as="--model DIR")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoint conversion: any GPT-2 checkpoint `from_pretrained` reads in, one chosen format out.

    # A hub id, a Hugging Face folder in any format (safetensors, sharded, pytorch_model.bin,
    # flax_model.msgpack), a training run or gs://... -> a Hugging Face folder in safetensors that
    # flax_gpt2.from_pretrained loads fast (memory-mapped) and transformers reads unchanged:
    python -m flax_gpt2.convert --model gpt2 --out ~/models/gpt2 [--dtype bfloat16]
    python -m flax_gpt2.convert --model runs/my-run --out ~/models/my-gpt2

    # The same, with the weights in transformers' old Flax layout (flax_model.msgpack), which
    # transformers <= 4.x's FlaxGPT2LMHeadModel.from_pretrained reads:
    python -m flax_gpt2.convert --model runs/my-run --out ~/models/my-gpt2-flax --format msgpack

    # A PEFT LoRA adapter of the base, merged into the weights: a plain Hugging Face GPT-2 folder with
    # the adapted model's logits (transformers needs no peft to load it):
    python -m flax_gpt2.convert --model gpt2 --adapter my-lora --merge --out ~/models/gpt2-my-lora

    # The adapter alone, checked against its base and written as a PEFT folder (adapter_config.json +
    # adapter_model.safetensors, with the base's weight hash) that peft.PeftModel.from_pretrained loads:
    python -m flax_gpt2.convert --model gpt2 --adapter my-lora --format peft --out ~/adapters/my-lora

    # A LoRA training run's newest adapter (python -m train --config.lora.rank=R), for its init_from base:
    python -m flax_gpt2.convert --model runs/my-lora-run --format peft --out ~/adapters/my-lora

`--format` names what is written (`safetensors`, the default, `msgpack`, or `peft` for an adapter alone);
the input format is found from the folder. `--adapter` needs `--merge` or `--format peft`. Every input is
loaded through flax_gpt2's strict rename table, so a converted folder is known to fit the model. With
`--overwrite`, every new file is complete before an old one is replaced, so a full disk or a crash leaves
the previous folder loadable.
Errors are one line on stderr (exit 2 for a bad flag, 1 otherwise); `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from flax_gpt2.checkpoints import run_folders
from flax_gpt2.checkpoints.conversion import (ADAPTER_FORMAT, FORMATS, convert, export_adapter,
                                              export_run_adapter)
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
    parser.add_argument("--format", default="safetensors", choices=(*FORMATS, ADAPTER_FORMAT),
                        help="what to write: safetensors (a Hugging Face folder, default), msgpack "
                             "(flax_model.msgpack, transformers <= 4.x Flax models), or peft (the --adapter alone, "
                             "as a PEFT LoRA folder)")
    parser.add_argument("--adapter", default=None,
                        help="a PEFT LoRA adapter folder for --model: merged into the weights with --merge, or "
                             "written alone with --format peft")
    parser.add_argument("--merge", action="store_true",
                        help="write --model with --adapter folded into its weights (a full model)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output folder (its old files stay until the new ones are "
                             "complete)")
    parser.add_argument("--no_progress", dest="progress", action="store_false", help="hide progress bars")
    args = parser.parse_args(argv)
    _check_adapter_flags(parser, args)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file; pass a folder (new, empty, or with --overwrite)")
    if os.path.isdir(args.out) and run_folders.is_run_folder(args.out):
        raise cli.UsageError(f"--out {args.out} is a flax_gpt2 training run: sample, evaluate and serve would load the "
                             f"export instead of the run's newest checkpoint; write it to a folder of its own (e.g. "
                             f"--out {args.out.rstrip(os.sep)}-export)")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        parser.error(f"--out {args.out} is not empty; pass --overwrite to replace the files a conversion writes")
    if args.format == ADAPTER_FORMAT and args.adapter is None:  # a LoRA training run (checked above)
        out = export_run_adapter(args.model, args.out, overwrite=args.overwrite)
    elif args.format == ADAPTER_FORMAT:
        out = export_adapter(args.model, args.adapter, args.out, revision=args.revision, overwrite=args.overwrite,
                             progress=args.progress, pass_folder_as="--model DIR")
    else:
        out = convert(args.model, args.out, format=args.format, revision=args.revision, dtype=args.dtype,
                      overwrite=args.overwrite, progress=args.progress, pass_folder_as="--model DIR",
                      adapter=args.adapter)
    print(f"wrote {out}")


def _check_adapter_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) for --adapter, --merge and --format peft that do not go together."""
    if args.merge and args.adapter is None:
        parser.error("--merge folds a LoRA adapter into --model: pass --adapter DIR (a PEFT LoRA folder)")
    if args.format == ADAPTER_FORMAT:
        if args.adapter is None and not run_folders.is_run_folder(args.model):
            parser.error("--format peft writes a LoRA adapter: pass --adapter DIR (a PEFT LoRA folder for --model), "
                         "or --model a LoRA training run")
        if args.merge:
            parser.error("--merge writes a full model, --format peft the adapter alone: pass one of them")
        if args.dtype != "float32":
            parser.error(f"--dtype {args.dtype} applies to full models; --format peft writes the adapter as it "
                         "is read (float32)")
    elif args.adapter is not None and not args.merge:
        parser.error(f"--adapter with --format {args.format} needs --merge (the adapter folded into the weights); "
                     "or pass --format peft to write the adapter alone")


if __name__ == "__main__":
    sys.exit(main())

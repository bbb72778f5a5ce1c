"""CommonGen with `data.loss_on="all"` vs `"completion"`: eval loss on the sentences, on all tokens, coverage.

    python benchmarks/commongen_loss_on.py                      # tiny preset, 300 steps each, on this CPU
    python benchmarks/commongen_loss_on.py --steps 1000 --out runs/loss_on

Trains `configs/finetune_commongen.py` twice on the local dev file (`../shared/data/commongen/commongen.dev.jsonl`,
the last 10% held out) with the tiny preset from a random init, once per setting, everything else equal; then
evaluates both final models on the same held-out windows with both masks (`train.loss_mask`), and reports the
coverage each run computed on 50 held-out concept sets. Writes `OUT/table.json`; docs/FINETUNING.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from flax_gpt2.checkpoints.pretrained import from_pretrained
from flax_gpt2.train import config_cli, data, loss_mask, step as step_lib, train_loop

SHARED = os.environ.get("FLAX_GPT2_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
EVAL_ROWS = 16  # held-out windows per eval batch (the same for both runs)


def run(loss_on: str, steps: int, out: str) -> dict:
    """Trains one setting into `out/cg-tiny-<loss_on>`; its held-out losses under both masks and its coverage."""
    workdir = os.path.join(out, f"cg-tiny-{loss_on}")
    overrides = ["--config.init_from=", "--config.model.preset=tiny", "--config.model.dtype=float32",
                 "--config.progress_bar=False", "--config.checkpoint_every=100000",
                 f"--config.data.source={SHARED}/data/commongen/commongen.dev.jsonl",
                 f"--config.data.tokenizer={SHARED}/gpt2-bpe", f"--config.data.cache_dir={out}/cache",
                 "--config.data.seq_len=64", "--config.data.val_fraction=0.1", "--config.batch_size=8",
                 f"--config.steps={steps}", "--config.epochs=0", "--config.eval_every=0", "--config.log_every=50",
                 "--config.optimizer.lr=1e-3", "--config.optimizer.warmup_steps=20", "--config.coverage_sets=50",
                 f"--config.data.loss_on={loss_on}", "--config.seed=0"]
    config, _ = config_cli.parse_args(["train", "--config", "configs/finetune_commongen.py", "--workdir", workdir,
                                       *overrides])
    start = time.time()
    result = train_loop.train_and_evaluate(config, workdir)
    row = {"run": workdir, "steps": steps, "wall_s": round(time.time() - start, 1), "coverage": result.get("coverage")}
    model, params = from_pretrained(workdir, progress=False)
    store = data.load_tokens(config.data, progress=False)
    cut = data.split_point(store, config.data.val_fraction, config.data.seq_len)
    for mode in loss_mask.LOSS_ON:
        windows = data.Windows(store, cut, len(store), config.data.seq_len, scored=mode == "completion")
        eval_step = jax.jit(step_lib.make_eval_step(model, loss_on=mode))
        values = [eval_step(params, windows.read(np.arange(i, i + EVAL_ROWS))[None])
                  for i in range(0, windows.count - EVAL_ROWS + 1, EVAL_ROWS)]
        row[f"eval_loss_{mode}_tokens"] = loss_mask.combine_eval(values, mode)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/commongen_loss_on")
    args = parser.parse_args()
    rows = {}
    for loss_on in loss_mask.LOSS_ON:
        rows[loss_on] = run(loss_on, args.steps, args.out)
        print(json.dumps(rows[loss_on]), flush=True)
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

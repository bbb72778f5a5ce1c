"""Fine-tune GPT-2 on CommonGen, as the CommonGen GPT-2 model card: concepts in, one sentence out.

    python -m train --config configs/finetune_commongen.py --workdir runs/commongen
    python -m train --config configs/finetune_commongen.py --workdir runs/cg-dev \
        --config.data.source=../shared/data/commongen/commongen.dev.jsonl
    python -m flax_gpt2.sample --model runs/commongen --prompt "<|endoftext|> kid, room, dance:" --stop_token "."

Every example is `<|endoftext|> kid, room, dance: A kid dances in the room.<|endoftext|>` (part-of-speech
suffixes stripped; see train/recipes.py). Sources: the `allenai/common_gen` dataset (default), or local
files: the CommonGen release's jsonl (`concept_set` + `scene`) or its `X.src_alpha.txt` + `X.tgt.txt` pair.
After training, the run generates a sentence for held-out concept sets and reports their coverage (the
share of concepts that appear) next to the eval loss.

The card scores every token (`data.loss_on="all"`, kept here); `--config.data.loss_on=completion` trains and
evaluates on the sentences only (after `concepts:`). What each changes, measured: docs/FINETUNING.md.
"""

from flax_gpt2.configs import base


def get_config():
    c = base.get_config()
    c.init_from = "gpt2"  # or any from_pretrained name/folder, or a run's workdir
    c.model.dropout = 0.1
    c.data.recipe = "commongen"
    c.data.source = "allenai/common_gen"
    c.data.seq_len = 128  # examples are ~20 tokens; windows pack several, separated by <|endoftext|>
    c.data.val_fraction = 0.05
    c.batch_size = 32
    c.epochs = 3
    c.optimizer.lr = 5e-5
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_steps = 100
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.0
    c.log_every = 10
    c.eval_every = 200
    c.checkpoint_every = 500
    c.coverage_sets = 50  # held-out concept sets to generate for after training (0 = skip)
    return c

"""Demo: a small GPT-2 trained from scratch on Tiny Shakespeare, then sampled.

    python -m train --config configs/shakespeare.py --workdir runs/shakespeare
    python -m train --config configs/shakespeare.py --workdir runs/mine --config.data.source=my.txt

The text and GPT-2's BPE files ship with the package (flax_gpt2/assets), so this runs offline with no
setup; `$FLAX_GPT2_SHARED/data/tinyshakespeare.txt` is read instead when that variable names a folder that
has it. `data.source` may be any text/jsonl file or `datasets` name. Sized for a laptop CPU; see
benchmarks/TRAIN.md for the loss against time. It trains at the model's whole context (256 tokens), so
sampling, evaluation and serving at the default length use only positions it has learned.
"""

from flax_gpt2.configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "tiny"  # 4 layers of width 128 below: ~0.8M block params + 6.4M embedding
    c.model.n_layer = 4
    c.model.n_embd = 128
    c.model.n_head = 4
    c.model.dropout = 0.1  # ~300k training tokens: regularize
    c.model.dtype = "float32"  # bf16 matmuls are slower than fp32 on CPUs
    c.data.source = base.demo_path("data", "tinyshakespeare.txt")
    c.data.seq_len = 256  # the tiny preset's n_positions: the model's whole context is trained
    c.data.val_fraction = 0.1  # the last 10% of the play text
    c.batch_size = 8  # 8 x 256 = 2,048 tokens a step
    c.steps = 600
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.1
    c.log_every = 10
    c.eval_every = 50
    c.eval_batches = 16
    c.checkpoint_every = 200
    c.sample.prompt = "ROMEO:"
    return c

"""Demo: a small GPT-2 trained from scratch on Tiny Shakespeare, then sampled.

    python -m train --config configs/shakespeare.py --workdir runs/shakespeare
    python -m train --config configs/shakespeare.py --workdir runs/mine --config.data.source=my.txt

The text is `$FLAX_GPT2_SHARED/data/tinyshakespeare.txt` when that variable is set (the tests and the
README's demo command set it to `../shared`), else `--config.data.source=input.txt`; `data.source` may be
any text/jsonl file or `datasets` name. Sized for a laptop CPU: on 2 shared cores the held-out loss is
below 6.0 nats/token after ~4 minutes and ~5.0 after 600 steps (~16 minutes); see benchmarks/TRAIN.md.
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
    c.data.source = base.shared_path("data", "tinyshakespeare.txt")
    c.data.tokenizer = base.shared_path("gpt2-bpe")
    c.data.seq_len = 128
    c.data.val_fraction = 0.1  # the last 10% of the play text
    c.batch_size = 16
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

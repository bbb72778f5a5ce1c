"""Fine-tune pretrained GPT-2 weights (from `flax_gpt2.from_pretrained`) on a text corpus.

    python -m train --config configs/finetune.py --workdir runs/ft --config.init_from=gpt2-medium \
        --config.data.source=my_corpus.jsonl

`init_from` is a hub name or a Hugging Face folder (or a previous run's workdir); the architecture comes
from there. Small constant learning rate, a little dropout, few steps (nanoGPT's finetune_shakespeare).
"""

from flax_gpt2.configs import base


def get_config():
    c = base.get_config()
    c.init_from = "gpt2"
    c.model.dropout = 0.1
    c.data.source = base.demo_path("data", "tinyshakespeare.txt")
    c.data.val_fraction = 0.1
    c.batch_size = 32
    c.micro_batch_size = 8  # 4 accumulated micro-batches of 8 x 1024 tokens
    c.steps = 200
    c.optimizer.lr = 3e-5
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    c.optimizer.weight_decay = 0.0
    c.log_every = 5
    c.eval_every = 50
    c.checkpoint_every = 100
    c.sample.prompt = "ROMEO:"
    return c

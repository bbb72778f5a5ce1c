"""GPT-2 small (124M) pretraining as in the original setup: 1024-token sequences, batch 512.

    python -m train --config configs/gpt2_124m.py --workdir gs://.../gpt2_124m \
        --config.data.source=/data/openwebtext_tokens --config.distributed.enabled=True

Batch arithmetic: 512 sequences x 1024 tokens = 524,288 tokens per step; on 256 TPU v3 cores that is
2 sequences per core, no accumulation. 600k steps = 315B tokens (nanoGPT reaches ~2.85 val loss on
OpenWebText). Learning rate, warmup and cosine decay to 10% follow GPT-3's table for this size.
Tokenize OpenWebText once with `python -m train.tokenize_corpus openwebtext /data/openwebtext_tokens`.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2"
    c.data.source = "openwebtext"
    c.steps = 600_000
    c.optimizer.lr = 6e-4
    return c

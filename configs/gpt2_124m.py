"""GPT-2 small (124M) pretraining as in the original setup: 1024-token sequences, batch 512.

    python -m train --config configs/gpt2_124m.py --workdir gs://.../gpt2_124m \
        --config.data.source=/data/openwebtext_tokens --config.distributed.enabled=True

Batch arithmetic: 512 sequences x 1024 tokens = 524,288 tokens per step, as 8 accumulated micro-batches
of 64: 8 sequences per chip on a v3-8 (per core) or a v5litepod-8, 16 per chip on a v4-8. The whole
batch at once needs ~140 GiB per v4 chip, most of it the float32 [B, T, V] logits and attention
probabilities; 64 fits all three 8-chip slices with room to spare (benchmarks/TPU_MEMORY.md, from
`--config.compile_only=v4-8`). On a bigger slice make `micro_batch_size` a multiple of the device count
(e.g. 256 on a v3-256: 1 sequence per core). 600k steps = 315B tokens (nanoGPT reaches ~2.85 val loss on
OpenWebText). Learning rate, warmup and cosine decay to 10% follow GPT-3's table for this size.
Tokenize OpenWebText once with `python -m train.tokenize_corpus openwebtext /data/openwebtext_tokens`.
"""

from flax_gpt2.configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2"
    c.data.source = "openwebtext"
    c.micro_batch_size = 64
    c.steps = 600_000
    c.optimizer.lr = 6e-4
    return c

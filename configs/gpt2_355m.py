"""GPT-2 medium (355M) pretraining: T=1024, batch 512, lr 3e-4 (GPT-3's table for this size).

Params + AdamW moments in fp32 are 16 bytes/param = 5.7 GB, kept whole on every chip (pure data
parallel). With rematerialization, 8 accumulated micro-batches of 64 sequences (8 per v3 core or v5e
chip, 16 per v4 chip) fit a v3-8, a v4-8 and a v5litepod-8 (benchmarks/TPU_MEMORY.md, from
`--config.compile_only=<topology>`). On a bigger slice make `micro_batch_size` a multiple of the device
count.
"""

from flax_gpt2.configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2-medium"
    c.model.remat = True
    c.data.source = "openwebtext"
    c.micro_batch_size = 64
    c.steps = 600_000
    c.optimizer.lr = 3e-4
    return c

"""GPT-2 medium (355M) pretraining: T=1024, batch 512, lr 3e-4 (GPT-3's table for this size).

Params + AdamW moments in fp32 are 16 bytes/param = 5.7 GB: fits a 16 GB v3 core next to 2 sequences
of activations with rematerialization, so the mesh stays pure data parallel.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2-medium"
    c.model.remat = True
    c.data.source = "openwebtext"
    c.steps = 600_000
    c.optimizer.lr = 3e-4
    return c

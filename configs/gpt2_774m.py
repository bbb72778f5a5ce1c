"""GPT-2 large (774M) pretraining: T=1024, batch 512, lr 2.5e-4 (GPT-3's table for this size).

Params + AdamW moments are 12.4 GB in fp32: sharded 8 ways (fsdp=8) that is 1.5 GB per core.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2-large"
    c.model.remat = True
    c.data.source = "openwebtext"
    c.steps = 600_000
    c.optimizer.lr = 2.5e-4
    c.mesh.fsdp = 8
    return c

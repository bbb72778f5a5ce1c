"""GPT-2 XL (1558M) pretraining: T=1024, batch 512, lr 2e-4 (GPT-3's table for 1.3B).

Params + AdamW moments are 25 GB in fp32: fsdp=16 leaves 1.6 GB per core (n_embd 1600 = 16 * 100
divides evenly); data parallel over the rest.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2-xl"
    c.model.remat = True
    c.data.source = "openwebtext"
    c.steps = 600_000
    c.optimizer.lr = 2e-4
    c.mesh.fsdp = 16
    return c

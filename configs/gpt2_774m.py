"""GPT-2 large (774M) pretraining: T=1024, batch 512, lr 2.5e-4 (GPT-3's table for this size).

Params + AdamW moments are 12.4 GB in fp32: more than a 16 GB v3 core or v5e chip can hold beside the
activations, so they are sharded over every device of the slice (fsdp = all, data = 1: 1.5 GB per v3
core, 3.1 GB per v4 chip). With rematerialization and the blocks under `nn.scan`, 8 accumulated
micro-batches of 64 sequences fit a v3-8,
a v4-8 and a v5litepod-8 (benchmarks/TPU_MEMORY.md, from `--config.compile_only=<topology>`). n_embd
1280 splits up to 256 ways; on a bigger slice set `--config.mesh.fsdp=8 --config.mesh.data=-1` and a
`micro_batch_size` that is a multiple of the device count.
"""

from flax_gpt2.configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2-large"
    c.model.remat = True
    # nn.scan over the blocks: compiled for a v4-8 in 22 s instead of 310 s, with 0.6 GiB less HBM per chip
    # and 1.8 instead of 14.9 GB of host RAM (benchmarks/TPU_MEMORY.md, before and after).
    c.model.scan_layers = True
    c.data.source = "openwebtext"
    c.micro_batch_size = 64
    c.steps = 600_000
    c.optimizer.lr = 2.5e-4
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c

"""GPT-2 XL (1558M) pretraining: T=1024, batch 512, lr 2e-4 (GPT-3's table for 1.3B).

Params + AdamW moments are 25 GB in fp32: sharded over every device of the slice (fsdp = all, data = 1:
3.1 GB per v3 core or v5e chip, 6.2 GB per v4 chip). With rematerialization and the blocks under
`nn.scan`, 8 accumulated micro-batches of 64 sequences fit a v3-8, a v4-8 and a v5litepod-8
(benchmarks/TPU_MEMORY.md, from `--config.compile_only=<topology>`; unrolled, they needed 16.5 GiB of a
v5e chip's 15.75).
n_embd 1600 splits up to 64 ways; on a bigger slice set `--config.mesh.fsdp=16 --config.mesh.data=-1`
and a `micro_batch_size` that is a multiple of the device count.
"""

from flax_gpt2.configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2-xl"
    c.model.remat = True
    # nn.scan over the blocks: on a v4-8 (micro-batch 32) the train step compiled in 24 s instead of 152 s,
    # with 2.9 GB less HBM per chip and 1.9 instead of 8.4 GiB of host RAM (benchmarks/README.md, compile
    # time); the memory saved lets micro-batches of 64 fit a v5e chip.
    c.model.scan_layers = True
    c.data.source = "openwebtext"
    c.micro_batch_size = 64
    c.steps = 600_000
    c.optimizer.lr = 2e-4
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c

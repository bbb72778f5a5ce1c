"""Seconds-fast smoke run (tests, CI): the `tiny` preset (2 layers, width 64) on a text file."""

from flax_gpt2.configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.data.source = base.demo_path("data", "tinyshakespeare.txt")
    c.data.seq_len = 64
    c.data.val_fraction = 0.05
    c.batch_size = 8
    c.steps = 20
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 5
    c.log_every = 5
    c.eval_every = 10
    c.eval_batches = 2
    c.checkpoint_every = 10
    return c

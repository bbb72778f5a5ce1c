"""GPT-2 small (124M) in 10B tokens, the llm.c / build-nanogpt recipe: FineWeb-Edu `sample-10BT`.

    python -m train --config configs/gpt2_124m_fineweb.py --workdir gs://.../gpt2_124m_fineweb \
        --config.distributed.enabled=True

Batch arithmetic: 512 sequences x 1024 tokens = 524,288 tokens (2**19) per step, as 8 accumulated
micro-batches of 64 (as configs/gpt2_124m.py: 8 sequences per chip on a v5litepod-8, 16 on a v4-8).
19,073 steps x 524,288 = 10.0B tokens, about one pass over `sample-10BT`. Learning rate 6e-4 after 715
linear warmup steps, cosine decay to 10% (6e-5) at the last step; AdamW (0.9, 0.95), weight decay 0.1 on
matrices and embeddings, gradient clipping at 1.0: build-nanogpt's `train_gpt2.py` and llm.c's
`train_gpt2cu` 124M run. Differences: the vocabulary is GPT-2's 50,257 (build-nanogpt pads to 50,304), and
the held-out split is the stream's last 0.05% (~5M tokens; build-nanogpt holds out its first 100M-token
shard), of which each eval reads 20 batches of 64 x 1024 tokens, as build-nanogpt does every 250 steps.

Expected result (from llm.c, not run here): a FineWeb val loss of about 3.27-3.29 and HellaSwag
`acc_norm` about 0.29-0.30 (completion style, flax_gpt2.evaluation.hellaswag's default) after 10B tokens; FineWeb-Edu's
own val loss is a different number (another text distribution); `--config.data.source=HuggingFaceFW/fineweb`
trains on classic FineWeb's `sample-10BT` for the comparable one. docs/EVALUATION.md has the evaluation.

The corpus is tokenized once into the cache (`data.cache_dir`) on first use: `datasets` downloads the
sample's parquet files (tens of GB) and 10B uint16 tokens take 20 GB. On a pod, `data.cache_dir` must be a
`gs://` path (every host tokenizes its share there), or tokenize beforehand on all hosts: docs/TPU_PODS.md,
"End to end", walks this run through. Memory per chip of a v4-8 or a v5litepod-8
without the hardware (compile only): `--config.compile_only=v4-8` (or `v5litepod-8`) writes
compile_report.json; the model and batch are configs/gpt2_124m.py's, see benchmarks/TPU_MEMORY.md.
"""

from flax_gpt2.configs import base


def get_config():
    c = base.get_config()
    c.model.preset = "gpt2"
    c.data.source = "HuggingFaceFW/fineweb-edu"
    c.data.dataset_config = "sample-10BT"
    c.data.split = "train"
    c.batch_size = 512
    c.micro_batch_size = 64
    c.steps = 19_073
    c.optimizer.lr = 6e-4
    c.optimizer.warmup_steps = 715
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.1
    c.optimizer.grad_clip = 1.0
    c.eval_every = 250
    c.eval_batches = 20
    c.checkpoint_every = 1000
    # HellaSwag (validation, 10,042 examples) at every eval: point this at github.com/rowanz/hellaswag's
    # data/hellaswag_val.jsonl (local or gs://), e.g. --config.eval_hellaswag=hellaswag_val.jsonl.
    c.eval_hellaswag = ""
    return c

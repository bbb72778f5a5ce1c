"""Defaults for every training run; the run configs beside this file only override them.

`python -m train --config configs/<name>.py --workdir DIR --config.KEY=VALUE` (from a checkout) or
`python -m flax_gpt2.train --config <name> ...` (installed) loads `get_config()` from the file and applies
dotted overrides (`--config.optimizer.lr=3e-4`, `--config.mesh.fsdp=4`); a key that
is not defined here is an error.
"""

import os

import ml_collections
from ml_collections import config_dict

from flax_gpt2 import assets
from flax_gpt2.modeling import sharding


def demo_path(*parts: str) -> str:
    """A demo input shipped in the package (`flax_gpt2.assets`: `"data", "tinyshakespeare.txt"` or
    `"gpt2-bpe"`), checked against its sha256; or the same path under `$FLAX_GPT2_SHARED` when that variable
    names a folder that has it (an optional override; the repository's tests point it at ../shared).

    Never a guess relative to this file: installed, it lives in site-packages.
    """
    root = os.environ.get("FLAX_GPT2_SHARED", "")
    if root:
        path = os.path.normpath(os.path.join(os.path.expanduser(root), *parts))
        if os.path.exists(path):
            return path
    return assets.path("/".join(parts))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Model: a flax_gpt2 preset, optionally resized. `None` keeps the preset's value.
    c.model = ml_collections.ConfigDict()
    c.model.preset = "gpt2"
    c.model.n_layer = config_dict.placeholder(int)
    c.model.n_embd = config_dict.placeholder(int)
    c.model.n_head = config_dict.placeholder(int)
    c.model.n_positions = config_dict.placeholder(int)
    c.model.dropout = 0.0  # resid/embd/attn dropout; 0 is best for pretraining (nanoGPT), try 0.1 to fine-tune
    c.model.dtype = "bfloat16"  # compute dtype; master params and optimizer state stay in param_dtype
    c.model.param_dtype = "float32"
    c.model.remat = False  # recompute each block in the backward pass: less activation memory, ~30% more FLOPs
    # nn.scan over the blocks: compile time independent of depth (see benchmarks/README.md for the
    # measured trade-off); checkpoints of either layout resume in either.
    c.model.scan_layers = False
    c.model.attention = "auto"  # "xla", "dot_product" (cuDNN flash on GPU), "splash" (TPU), "auto" by platform
    # Start from pretrained weights: a Hugging Face folder or hub name, or a training run's workdir, read
    # by `flax_gpt2.from_pretrained`. Empty trains from scratch. The architecture then comes from there.
    c.init_from = ""
    # LoRA fine-tuning (flax_gpt2/modeling/lora.py): `rank` > 0 freezes the model and trains low-rank adapters
    # on `targets` (PEFT's target_modules names, comma-separated: c_attn, c_proj, c_fc, attn.c_proj, mlp.c_proj).
    # Only the adapters get gradients and optimizer state, and checkpoints hold only them (plus the base's
    # identity: init_from and a sha256 of its weights, checked on resume). The base is `init_from`; without one
    # it is the seed's random init (legal, for tests and experiments; no warning). `base_dtype` stores the frozen
    # base in another dtype ("" = model.param_dtype; "bfloat16" halves its memory), adapters stay in param_dtype.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = off (full fine-tuning)
    c.lora.alpha = 8.0  # the update is scaled by alpha / rank (PEFT's default alpha)
    c.lora.dropout = 0.0  # on the adapters' input features (lora.py's docstring: how it differs from PEFT's)
    c.lora.targets = "c_attn"
    c.lora.base_dtype = ""

    # Data: see train/data.py for what `source` may be.
    c.data = ml_collections.ConfigDict()
    c.data.source = ""
    # How records become documents: "text" (the `text_field`), or a model-card recipe, "commongen" / "eli5"
    # (train/recipes.py).
    c.data.recipe = "text"
    c.data.text_field = "text"  # the text column of jsonl / `datasets` sources
    c.data.dataset_config = ""  # `datasets.load_dataset(source, name=...)`
    c.data.split = "train"  # the `datasets` split that is tokenized (the held-out split is cut from it)
    c.data.tokenizer = ""  # a folder with BPE files; empty is the standard GPT-2 tokenizer (shipped, offline)
    c.data.cache_dir = ""  # where tokenized corpora are kept; empty: $FLAX_GPT2_CACHE or ~/.cache/flax_gpt2
    # A local cache_dir that every host mounts (NFS): several hosts may tokenize into it, each its share
    # (train/tokenize_hosts.py). gs:// is always shared; a local one is taken as each host's own.
    c.data.cache_shared = False
    # How a tokenized corpus on gs:// (data.source, or a gs:// cache_dir) is read (train/remote_store.py): "range"
    # fetches only the blocks of the shards each host's rows touch, on demand; "mirror" copies the whole corpus
    # to every host's local disk before the first step (start-up time and disk grow with the corpus).
    c.data.remote_reads = "range"
    # The bound on the in-memory block cache of "range" reads, per host (LRU; a block is re-read when dropped).
    c.data.remote_cache_bytes = 2 << 30
    # The block size of "range" reads: shuffled 2 KiB windows each cost one or two blocks (remote_store.py).
    c.data.remote_block_bytes = 4096
    c.data.seq_len = 1024
    c.data.val_fraction = 0.0005  # the last fraction of the token stream is held out for eval
    c.data.num_threads = 0  # tokenizer threads; 0 = all cores
    # Packed windows (train/packing.py): attention stays within each document (split at <|endoftext|>, which
    # starts the document after it), and/or position ids restart at 0 at each document start. Both change the
    # math of a step; the batches are the same.
    c.data.document_mask = False
    c.data.reset_positions = False
    # Which predicted tokens the loss (and eval loss) scores (train/loss_mask.py): "all", or "completion": only
    # the tokens after a recipe's prompt (data.recipe "commongen" or "prompt_completion") and its <|endoftext|>.
    c.data.loss_on = "all"

    # Batch: `batch_size` sequences per optimizer step, computed as `batch_size // micro_batch_size`
    # accumulated micro-batches (0 = no accumulation). Both are global, across all devices and hosts.
    c.batch_size = 512
    c.micro_batch_size = 0
    c.steps = 600_000  # total optimizer steps
    c.epochs = 0  # > 0: train this many passes over the training split instead (sets `steps`)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 6e-4
    c.optimizer.schedule = "cosine"  # after warmup: "cosine" (to lr * min_lr_ratio), "linear" (to 0), "constant"
    c.optimizer.warmup_steps = 2000  # linear warmup from 0, then cosine decay
    c.optimizer.decay_steps = 0  # length of warmup + cosine; 0 = `steps`
    c.optimizer.min_lr_ratio = 0.1  # the cosine ends at lr * min_lr_ratio (Chinchilla, nanoGPT)
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1  # on matrices and embeddings only; never on biases or LayerNorm
    c.optimizer.grad_clip = 1.0  # global-norm clipping; 0 disables

    # Device mesh (data, fsdp, tensor); -1 takes the devices the other two leave.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical axis names of the model's params and activations -> mesh axes, first match wins:
    # (batch -> data+fsdp, embed -> fsdp, heads and mlp -> tensor; the vocabulary divides by no mesh size,
    # so the tied embedding is split on `embed`). The library's default, which `serve --mesh` uses too.
    c.logical_axis_rules = sharding.DEFAULT_RULES

    # Multi-host: `jax.distributed.initialize`. On TPU pods and SLURM, enabled=True is enough.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    c.log_every = 10
    c.eval_every = 1000
    c.eval_batches = 20  # held-out batches of `eval_batch_size` per eval
    c.eval_batch_size = 0  # 0 = micro_batch_size
    # HellaSwag accuracy every eval_every steps (llm.c / build-nanogpt definition, flax_gpt2/evaluation/hellaswag.py):
    # a hellaswag_val.jsonl, local or gs://; "" = off. `_limit` > 0 scores only the first N examples.
    c.eval_hellaswag = ""
    c.eval_hellaswag_limit = 0
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3  # at least 1
    # Resuming a run under a config that differs from its checkpoints' is refused, naming the keys, unless
    # the keys are harmless (cadence, steps, mesh, ...: train/run_guard.py) or this is True (lr, data, ...).
    # Keys that fix the params' shapes (model sizes, param_dtype) can never change on resume.
    c.allow_config_change = False
    c.async_checkpointing = True
    # "START:END": a jax.profiler trace of those optimizer steps (1-based) in WORKDIR/profile/, for TensorBoard's
    # profile plugin or xprof (train/profiling.py); "" = none.
    c.profile_steps = ""
    # Hang watchdog (train/watchdog.py): when no step finishes for max(watchdog_seconds, 10 x the median step
    # time), every host writes all its threads' stacks to its log and WORKDIR/hangs/process_N.txt; with
    # watchdog_exit the process then exits with status 75, which `scripts/tpu_pod.py babysit` restarts.
    c.watchdog_seconds = 600.0
    c.watchdog_exit = False
    # JAX's persistent compilation cache, so a resumed or preempted run does not compile again:
    # "" = WORKDIR/compile_cache on TPU/GPU (off on CPU), a folder or gs:// URL, or "none" (off).
    c.compile_cache_dir = ""
    c.progress_bar = True
    # A Cloud TPU topology (`v4-8`, `v5litepod-8`, ...): compile the train and eval steps for it on this
    # machine, write compile_report.json (memory per chip, FLOPs) and exit without training.
    c.compile_only = ""
    # Peak fp32 FLOP/s of one CPU host, for MFU on CPU (accelerators are looked up in train/metrics.py):
    # cores x clock x FLOP/cycle of your machine (the dev machine's estimate is in benchmarks/TRAIN.md).
    c.cpu_peak_flops = 300e9

    # CommonGen recipe: after training, generate for this many held-out concept sets and report coverage.
    c.coverage_sets = 0
    # After training: sample from the final model (empty prompt = no sample).
    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = ""
    c.sample.max_new_tokens = 200
    c.sample.temperature = 0.8
    c.sample.top_k = 200
    return c

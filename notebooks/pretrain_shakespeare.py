# ---
# jupyter:
#   accelerator: TPU
#   colab:
#     gpuType: V5E1
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab,kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Train a small GPT-2 from scratch on Tiny Shakespeare
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/flax-gpt2/flax_gpt2/blob/main/notebooks/pretrain_shakespeare.ipynb)
#
# The project's training application (`flax_gpt2.train.train_loop.train_and_evaluate`, what `python -m flax_gpt2.train` runs)
# trains a 4-layer, 128-wide GPT-2 (GPT-2's tokenizer, 7.3M parameters) on Tiny Shakespeare with one
# sharded, jitted train step across every device of the runtime. You will see the device mesh and where
# each parameter lives, interrupt training (it saves a checkpoint and stops), resume it from that
# checkpoint, and sample from the result.
#
# **Runtime:** written for a Colab **TPU v5e-1**; also runs on v6e-1, a T4/L4/A100 GPU or CPU (on a 2-core
# CPU the 600 steps take about 16 minutes: README, Training). Run the cells from the top.

# %% [markdown]
# ## Parameters
# Replaced by [papermill](https://papermill.readthedocs.io) when the notebook runs headless (CI runs it
# tiny: `-p steps 40 -p n_layer 2 ...`).

# %% tags=["parameters"]
data_path = "tinyshakespeare.txt"  # downloaded from data_url when missing
data_url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
tokenizer = ""  # a folder with vocab.json + merges.txt; empty: GPT-2's BPE, downloaded once
workdir = "runs/shakespeare"  # checkpoints, metrics.jsonl, ...; rerunning on the same folder resumes
n_layer = 4
n_embd = 128
n_head = 4
seq_len = 128
batch_size = 16  # sequences per step, split over the devices
steps = 600
learning_rate = 2e-3
warmup_steps = 100
compute_dtype = "auto"  # "bfloat16" on TPUs and Ampere+ GPUs, "float32" on T4 and CPU; or name one
log_every = 10
eval_every = 50
eval_batches = 16
checkpoint_every = 200
press_stop_at = 300  # interrupt the first training cell once this step is logged (None: press Stop yourself)
plot_every_s = 3.0  # how often the live loss curve is redrawn
sample_tokens = 200
repo_dir = ""  # a checkout of flax_gpt2 to import (CI); empty: install it from git

# %% [markdown]
# ## Install
# `pip install`s this repository (the `flax_gpt2` library and its training application, `flax_gpt2.train`) from git with the
# JAX build for this runtime: the `[tpu]` extra on a TPU VM, `[cuda]` on an NVIDIA GPU, none on CPU. JAX is
# not imported before the install, so no restart is needed. Does nothing when `flax_gpt2` is importable.

# %%
import glob
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

REPO = "https://github.com/flax-gpt2/flax_gpt2"  # PLACEHOLDER: set to this repository's git URL

if repo_dir:
    sys.path.insert(0, os.path.abspath(repo_dir))


def detect_accelerator() -> str:
    """'cuda', 'tpu' or 'cpu', found without importing JAX (an import before the install needs a restart)."""
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        return "cuda"
    # TPU chips on the PCI bus (Google's vendor id; device ids of TPU v2/v3, v4, v5p, v5e, v6e, as JAX's own
    # check in jax/_src/hardware_utils.py), or their device files: /dev/accel* (v2-v4), /dev/vfio/N (v5+).
    for device in glob.glob("/sys/bus/pci/devices/*"):
        try:
            with open(f"{device}/vendor") as vendor, open(f"{device}/device") as device_id:
                if vendor.read().strip() == "0x1ae0" and device_id.read().strip() in (
                        "0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f"):
                    return "tpu"
        except OSError:
            continue
    vfio = os.listdir("/dev/vfio") if os.path.isdir("/dev/vfio") else []
    return "tpu" if os.path.exists("/dev/accel0") or any(name.isdigit() for name in vfio) else "cpu"


accelerator = detect_accelerator()
if importlib.util.find_spec("flax_gpt2") is None:
    extra = {"tpu": "[tpu]", "cuda": "[cuda]", "cpu": ""}[accelerator]
    print(f"{accelerator} runtime: installing flax_gpt2{extra} from {REPO} ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"flax_gpt2{extra} @ git+{REPO}"], check=True)
    importlib.invalidate_caches()
    from importlib import metadata

    # A module imported before the install keeps its old version until a restart: say so if that happened.
    stale = [name for name in ("numpy", "jax", "flax", "optax", "ml_dtypes") if name in sys.modules
             and getattr(sys.modules[name], "__version__", None) not in (None, metadata.version(name))]
    if stale:
        print(f"Restart the session (Runtime > Restart session) and run all cells again: {', '.join(stale)} "
              "were imported before the install upgraded them.")
else:
    print(f"flax_gpt2 is already importable ({accelerator} runtime): nothing to install")

# %% [markdown]
# ## The runtime

# %%
import platform
from importlib import metadata

import jax
import numpy as np

import flax_gpt2

print(f"Python {platform.python_version()}, jax {jax.__version__}, flax {metadata.version('flax')}, "
      f"flax_gpt2 {metadata.version('flax_gpt2')}")
print(f"backend: {jax.default_backend()}, {jax.device_count()} device(s):")
for device in jax.devices():
    print(f"  {device} ({device.device_kind})")
if compute_dtype == "auto":  # bf16 matmuls are fast on TPUs and Ampere+ GPUs, emulated (slow) on T4 and CPUs
    slow_bf16 = jax.default_backend() == "cpu" or "T4" in jax.devices()[0].device_kind
    compute_dtype = "float32" if slow_bf16 else "bfloat16"
print("compute dtype:", compute_dtype)

# %% [markdown]
# ## The data
# Tiny Shakespeare (40,000 lines of the plays, 1.1 MB). The last 10% is held out for the eval loss. The
# training app tokenizes the text once into a memory-mapped cache (`~/.cache/flax_gpt2/tokens`).

# %%
import urllib.request

if not os.path.exists(data_path):
    try:
        os.makedirs(os.path.dirname(data_path) or ".", exist_ok=True)
        urllib.request.urlretrieve(data_url, data_path)
    except OSError as e:
        raise OSError(f"could not download {data_url} ({e}). Download that file on a machine with network, put "
                      f"it where this runtime can read it (Colab: the Files panel) and set data_path to it in "
                      f"the Parameters cell.") from None
with open(data_path, encoding="utf-8") as f:
    text = f.read()
print(f"{data_path}: {len(text):,} characters")
print(text[:300])

# %% [markdown]
# ## The run's config
# `configs/shakespeare.py` (what `python -m flax_gpt2.train --config shakespeare` uses), with this
# notebook's parameters. The mesh puts every device on the `fsdp` axis: each device holds a slice of the
# parameters and optimizer state and a slice of every batch (ZeRO-3 data parallelism).

# %%
from flax_gpt2.configs import shakespeare
from flax_gpt2.train import data as data_lib
from flax_gpt2.train.train_loop import train_and_evaluate

config = shakespeare.get_config()
config.data.source = os.path.abspath(data_path)
config.data.tokenizer = tokenizer
config.model.n_layer, config.model.n_embd, config.model.n_head = n_layer, n_embd, n_head
config.model.dtype = compute_dtype
config.data.seq_len = seq_len
config.batch_size = batch_size
config.steps = steps
config.optimizer.lr = learning_rate
config.optimizer.warmup_steps = warmup_steps
config.log_every, config.eval_every, config.eval_batches = log_every, eval_every, eval_batches
config.checkpoint_every = checkpoint_every
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1  # -1: all devices
config.progress_bar = False  # the live loss curve below shows the progress
config.sample.prompt = ""  # sampled at the end of this notebook instead

try:
    store = data_lib.load_tokens(config.data)  # tokenizes into the cache (once)
except OSError as e:
    raise OSError(f"{e}\n\nIn this notebook: set `tokenizer` in the Parameters cell to a folder with GPT-2's "
                  "vocab.json + merges.txt (any Hugging Face GPT-2 folder has them).") from None
print(f"{len(store):,} tokens; {batch_size} x {seq_len} tokens per step; {steps} steps")
print(f"workdir: {os.path.abspath(workdir)}")

# %% [markdown]
# ## The mesh, and where the parameters live
# `train_and_evaluate` builds this mesh, names every parameter axis (`vocab`, `embed`, `heads`, `kv`,
# `mlp`) and maps the names to mesh axes with `config.logical_axis_rules`. Here the same functions place a
# fresh train state so you can see the result: each parameter's partition spec, and which device holds
# which slice.

# %%
from flax_gpt2.train import mesh as mesh_lib
from flax_gpt2.train import step as step_lib
from flax_gpt2.train.model_config import model_config

gpt2_config, _ = model_config(config)
model = flax_gpt2.GPT2LMHeadModel(gpt2_config)
mesh = mesh_lib.make_mesh(config.mesh)
rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
tx, _ = step_lib.make_optimizer(config.optimizer, config.steps)
shardings, _ = mesh_lib.train_state_shardings(model, tx, mesh, rules, seq_len)
state = step_lib.init_train_state(model, tx, shardings, jax.random.key(0), seq_len)

print(f"mesh {dict(mesh.shape)} over {mesh.size} device(s); {gpt2_config.num_params / 1e6:.1f}M parameters")
print(f"{'parameter':<44} {'shape':>14} {'partition spec':>24} {'per device':>14}")
for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.startswith("transformer/h_") and not name.startswith("transformer/h_0/"):
        continue  # every block is placed like block 0
    print(f"{name:<44} {str(x.shape):>14} {str(x.sharding.spec):>24} {str(x.sharding.shard_shape(x.shape)):>14}")

wte = state.params["transformer"]["wte"]["embedding"]
print("\nthe token embedding (tied with the output layer), shard by shard:")
for shard in wte.addressable_shards:
    print(f"  {shard.device}: rows {shard.index[0].start or 0}:{shard.index[0].stop or wte.shape[0]}, "
          f"columns {shard.index[1].start or 0}:{shard.index[1].stop or wte.shape[1]}")
placement = {"mesh": dict(mesh.shape), "wte_spec": str(wte.sharding.spec), "wte_shards": len(wte.addressable_shards)}
del state  # the run builds its own

# %% [markdown]
# ## A live loss curve
# `train_and_evaluate` appends a record to `WORKDIR/metrics.jsonl` every `log_every` steps. While it runs
# in a cell, a background thread redraws that file's loss curve in the cell's output (one display, updated
# in place). The same helper can press **Stop** for you: `press_stop_at` sends the kernel SIGINT once the
# run logs that step, which is exactly what the notebook's Stop (interrupt) button sends.

# %%
import contextvars
import io
import json
import signal
import threading

from IPython.display import Image, Markdown, display
from flax_gpt2.train import metrics


def read_metrics(workdir):
    """The run's metrics.jsonl records so far ([] before the first one; a line being written is skipped)."""
    return metrics.read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []


class LiveLossCurve:
    """`with LiveLossCurve(workdir): train_and_evaluate(...)` redraws the run's loss curve every `every_s`."""

    def __init__(self, workdir, every_s=3.0, press_stop_at=None, mark_step=None):
        self.workdir, self.every_s, self.press_stop_at, self.mark_step = workdir, every_s, press_stop_at, mark_step
        self.pressed_at = None
        self._done = threading.Event()
        self._handle = display(Markdown("*compiling, then training: the loss curve appears here*"), display_id=True)

    def draw(self):
        records = read_metrics(self.workdir)
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        if not train:
            return records
        last = records[-1]
        speed = f", {last['tokens_per_sec']:,.0f} tokens/s" if "tokens_per_sec" in last else ""
        png = metrics.loss_png(records, title=f"step {train[-1][0]}: loss {train[-1][1]:.3f}{speed}",
                               mark_step=self.mark_step, dpi=90, size=(7, 3.5))
        self._handle.update(Image(png))
        return records

    def _watch(self, first_step):
        while not self._done.wait(self.every_s):
            records = self.draw()
            step = records[-1]["step"] if records else 0
            if self.press_stop_at is not None and self.pressed_at is None and first_step < self.press_stop_at <= step:
                self.pressed_at = step
                os.kill(os.getpid(), signal.SIGINT)  # what the Stop button sends

    def __enter__(self):
        records = read_metrics(self.workdir)
        # The thread runs in a copy of this cell's context: its display updates go to this cell.
        self._thread = threading.Thread(target=contextvars.copy_context().run, daemon=True,
                                        args=(self._watch, records[-1]["step"] if records else 0))
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.draw()


# %% [markdown]
# ## Train, and interrupt
# Press **Stop** (■) while this cell runs, or let `press_stop_at` press it: the training loop takes Ctrl-C
# (SIGINT) as *save a checkpoint after this step, then stop*, and returns `stopped="interrupted"` instead
# of raising. (A preemption, SIGTERM, is handled the same way; a second Stop aborts at once.) Each call
# first compiles the train and eval steps.

# %%
with LiveLossCurve(workdir, every_s=plot_every_s, press_stop_at=press_stop_at):
    first_run = train_and_evaluate(config, workdir)
print(first_run)

# %% [markdown]
# ## Resume from the checkpoint
# The same call on the same `workdir` restores the newest checkpoint (parameters, optimizer state and the
# position in the data, so the batches are the ones an uninterrupted run would draw) and trains on to
# `steps`. Records logged after that checkpoint are dropped from `metrics.jsonl`, so the curve reads as one
# run. (On the command line: rerun the same `python -m flax_gpt2.train ...` command.)

# %%
checkpoint_steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
print("checkpoints:", checkpoint_steps)
with LiveLossCurve(workdir, every_s=plot_every_s, mark_step=checkpoint_steps[-1]):
    resumed = train_and_evaluate(config, workdir)
print(resumed)

# %% [markdown]
# ## Sample
# A training run's folder is also a model folder: `from_pretrained` loads its newest checkpoint, and the
# run saved the tokenizer beside it. (On the command line:
# `python -m flax_gpt2.sample --model runs/shakespeare --prompt "ROMEO:"`.)

# %%
trained, trained_params = flax_gpt2.from_pretrained(workdir, progress=False)
run_tokenizer = flax_gpt2.get_tokenizer(workdir)
prompt_ids = np.array([run_tokenizer.encode("ROMEO:")], np.int32)
new = min(sample_tokens, trained.config.n_positions - prompt_ids.shape[1])
tokens = flax_gpt2.generate(trained, trained_params, prompt_ids, max_new_tokens=new, do_sample=True,
                            temperature=0.8, top_k=200, seed=0)
sample = run_tokenizer.decode(tokens[0])
print(sample)

# %% [markdown]
# ## Summary
# What this notebook produced (CI checks these values).

# %% tags=["summary"]
records = read_metrics(workdir)
summary = {
    "devices": [str(d) for d in jax.devices()],
    "placement": placement,
    "first_run": first_run,
    "checkpoint_steps": checkpoint_steps,
    "resumed": resumed,
    "steps_logged": [r["step"] for r in records if "loss" in r],
    "losses": [r["loss"] for r in records if "loss" in r],
    "eval_losses": [r["eval_loss"] for r in records if "eval_loss" in r],
    "sample": sample,
}
print(json.dumps(summary, indent=1))

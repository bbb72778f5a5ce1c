# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
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
# # Fine-tune GPT-2 on CommonGen
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/flax-gpt2/flax_gpt2/blob/main/notebooks/finetune_commongen.ipynb)
#
# The CommonGen recipe of the GPT-2 model card: concepts in, one everyday sentence out. Every training
# example reads `<|endoftext|> kid, room, dance: A kid dances in the room.<|endoftext|>`; after fine-tuning,
# the prompt `<|endoftext|> kid, room, dance:` continued up to the first `.` is the model's sentence, and
# *coverage* is the share of the concepts it uses. This notebook fine-tunes `gpt2` with the project's
# training application (`configs/finetune_commongen.py`: 3 epochs, batch 32, lr 5e-5 with linear decay) on
# a data-parallel mesh over all the runtime's devices, draws the loss curve as it trains, generates for
# held-out concept sets, and exports a Hugging Face folder that `transformers` loads.
#
# With `lora_rank > 0` it fine-tunes with **LoRA** instead (`configs/finetune_commongen_lora.py`): the model
# stays frozen, low-rank adapters on every attention and MLP projection are the only trained weights, and
# the export is the adapter alone in Hugging Face PEFT's format, loaded back onto the base by `flax_gpt2`
# and (when installed) by `peft`.
#
# **Runtime:** written for a Colab **T4 GPU**; faster on L4/A100 and TPU v5e-1 / v6e-1. On CPU, set
# `steps` to a few hundred. Run the cells from the top.

# %% [markdown]
# ## Parameters
# Replaced by [papermill](https://papermill.readthedocs.io) when the notebook runs headless (CI runs it on a
# tiny model and the local CommonGen files).

# %% tags=["parameters"]
model_name = "gpt2"  # a hub id or a local Hugging Face folder to start from
data_source = "allenai/common_gen"  # the hub dataset, or a local CommonGen file: X.jsonl or X.src_alpha.txt
tokenizer = ""  # a folder with vocab.json + merges.txt; empty: GPT-2's BPE, downloaded once
workdir = "runs/commongen"  # the run: checkpoints, metrics.jsonl, ...; rerunning on it resumes
export_dir = "gpt2-commongen"  # the Hugging Face folder written at the end (with LoRA: the PEFT adapter folder)
lora_rank = 0  # 0: full fine-tuning; > 0: LoRA adapters of this rank, the rest of the model frozen
epochs = 3  # the model card's 3 epochs ...
steps = 0  # ... or, if > 0, this many steps
batch_size = 32
seq_len = 128  # windows of packed examples (each ~20 tokens)
learning_rate = 0.0  # 0: the recipe's, 5e-5 for full fine-tuning and 2e-4 with LoRA
warmup_steps = 100
compute_dtype = "auto"  # "bfloat16" on TPUs and Ampere+ GPUs, "float32" on T4 and CPU; or name one
log_every = 10
eval_every = 200
num_coverage_sets = 50  # held-out concept sets to generate for
plot_every_s = 5.0
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
import json
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
# ## The recipe's config
# `configs/finetune_commongen.py`, what `python -m flax_gpt2.train --config finetune_commongen` runs, with
# this notebook's parameters. The mesh is data parallel over every device (`mesh.data = -1`): each holds a
# copy of the parameters and `batch_size / devices` sequences of every batch.
#
# With `lora_rank > 0`: `configs/finetune_commongen_lora.py`, the same recipe with the model frozen and
# LoRA adapters (`--config.lora.rank=R`, on `c_attn,c_proj,c_fc`, alpha 2R) trained at a LoRA learning
# rate. Only the adapters get gradients and AdamW moments, and the run's checkpoints hold only them.

# %%
from flax_gpt2.configs import finetune_commongen, finetune_commongen_lora
from flax_gpt2.train import data as data_lib
from flax_gpt2.train import mesh as mesh_lib
from flax_gpt2.train.train_loop import train_and_evaluate

if lora_rank > 0:
    config = finetune_commongen_lora.get_config()
    config.lora.rank = lora_rank
    config.lora.alpha = 2.0 * lora_rank  # the recipe's scale, alpha / rank = 2, at any rank
else:
    config = finetune_commongen.get_config()
config.init_from = model_name
config.data.source = os.path.abspath(data_source) if os.path.exists(data_source) else data_source
config.data.tokenizer = tokenizer
config.data.seq_len = seq_len
config.batch_size = batch_size
if steps > 0:
    config.epochs, config.steps = 0, steps
else:
    config.epochs = epochs
if learning_rate > 0:
    config.optimizer.lr = learning_rate
config.optimizer.warmup_steps = warmup_steps
config.model.dtype = compute_dtype
config.log_every, config.eval_every = log_every, eval_every
config.coverage_sets = 0  # coverage is computed below, in the notebook
config.progress_bar = False  # the live loss curve shows the progress

mesh = mesh_lib.make_mesh(config.mesh)
print(f"mesh {dict(mesh.shape)}: {batch_size // mesh.size} of the {batch_size} sequences of a batch on each "
      f"of {mesh.size} device(s)")
print(f"LoRA rank {config.lora.rank} on {config.lora.targets}, lr {config.optimizer.lr}" if lora_rank > 0
      else f"full fine-tuning, lr {config.optimizer.lr}")

# %% [markdown]
# ## The data
# From the Hugging Face hub (`allenai/common_gen`, needs network), or local CommonGen files: the release's
# `commongen.*.jsonl` (`concept_set` + `scene`) or its `X.src_alpha.txt` + `X.tgt.txt` pair. The recipe
# (`train/recipes.py`) turns each record into examples, the training app tokenizes them once into a cache
# and holds out the last 5% of the token stream.

# %%
try:
    store = data_lib.load_tokens(config.data)
except (OSError, ValueError) as e:
    raise RuntimeError(
        f"{e}\n\nCould not load the CommonGen data from {data_source!r}. Without network access to the hub: "
        "download the CommonGen files on a machine with network (`hf download allenai/common_gen --repo-type "
        "dataset --local-dir common_gen`, or the release's commongen.train.jsonl from "
        "https://github.com/INK-USC/CommonGen), put them where this runtime can read them (Colab: the Files "
        "panel) and set data_source to the file in the Parameters cell. If the tokenizer could not be "
        "downloaded, set tokenizer to a folder with GPT-2's vocab.json + merges.txt.") from None
cut = data_lib.split_point(store, config.data.val_fraction, seq_len)
run_tokenizer = flax_gpt2.get_tokenizer(tokenizer or None)
print(f"{len(store):,} tokens, {cut:,} for training; the first examples:")
print(run_tokenizer.decode(store.read(0, 80)))

# %% [markdown]
# ## The model before fine-tuning
# `from_pretrained` downloads `gpt2` from the hub (or reads a local folder). `flax_gpt2.generation.generate_text`
# is what `python -m flax_gpt2.sample --stop_token "."` runs: the continuation ends before the stop string.

# %%
from flax_gpt2.generation import generate_text

CARD_PROMPT = "<|endoftext|> kid, room, dance:"


def sentence(model, params, concepts_prompt):
    """The greedy continuation of a CommonGen prompt, up to its first '.' (not included)."""
    text = generate_text(model, params, run_tokenizer, concepts_prompt, max_new_tokens=32, do_sample=False,
                         stop_token=".")[0]
    return text[len(concepts_prompt):].strip()


try:
    base_model, base_params = flax_gpt2.from_pretrained(model_name)
except OSError as e:
    raise OSError(f"{e}\n\nIn this notebook: put that folder where this runtime can read it (Colab: the Files "
                  "panel, or mount Google Drive) and set model_name to its path in the Parameters cell.") from None
before = sentence(base_model, base_params, CARD_PROMPT)
print(f"{model_name} before fine-tuning: {CARD_PROMPT}{before}")
del base_model, base_params  # the run loads its own copy (config.init_from)

# %% [markdown]
# ## A live loss curve
# `train_and_evaluate` appends a record to `WORKDIR/metrics.jsonl` every `log_every` steps; while it runs,
# a background thread redraws that file's loss curve in the cell's output (one display, updated in place).

# %%
import contextvars
import threading

from IPython.display import Image, Markdown, display
from flax_gpt2.train import metrics


def read_metrics(workdir):
    """The run's metrics.jsonl records so far ([] before the first one; a line being written is skipped)."""
    return metrics.read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []


class LiveLossCurve:
    """`with LiveLossCurve(workdir): train_and_evaluate(...)` redraws the run's loss curve every `every_s`."""

    def __init__(self, workdir, every_s=5.0):
        self.workdir, self.every_s = workdir, every_s
        self._done = threading.Event()
        self._handle = display(Markdown("*loading, compiling, then training: the loss curve appears here*"),
                               display_id=True)

    def draw(self):
        records = read_metrics(self.workdir)
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        if not train:
            return
        last = records[-1]
        speed = f", {last['tokens_per_sec']:,.0f} tokens/s" if "tokens_per_sec" in last else ""
        png = metrics.loss_png(records, title=f"step {train[-1][0]}: loss {train[-1][1]:.3f}{speed}",
                               mark_step=None, dpi=90, size=(7, 3.5))
        self._handle.update(Image(png))

    def _watch(self):
        while not self._done.wait(self.every_s):
            self.draw()

    def __enter__(self):
        # The thread runs in a copy of this cell's context: its display updates go to this cell.
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._watch,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.draw()


# %% [markdown]
# ## Fine-tune
# One jitted, sharded train step over the mesh above; an eval on the held-out tokens every `eval_every`
# steps; checkpoints in `workdir`. Stop (■) saves a checkpoint and stops; running the cell again resumes.

# %%
with LiveLossCurve(workdir, every_s=plot_every_s):
    result = train_and_evaluate(config, workdir)
print(result)

# %% [markdown]
# ## Sentences for held-out concept sets
# Concept sets whose examples all lie in the held-out 5% (never trained on), each prompted as
# `<|endoftext|> c1, c2, c3:` and continued greedily up to the first `.`; coverage counts the concepts
# that appear (inflections allowed: `train/recipes.py`; CommonGen's official scorer lemmatizes with spaCy).

# %%
import html

from IPython.display import HTML
from flax_gpt2.checkpoints.run_adapters import load_run_adapter
from flax_gpt2.train import commongen_eval, recipes

adapter_weights = None
if lora_rank > 0:
    # A LoRA run's checkpoints hold only the adapters: its newest adapter merged into the base's kernels.
    adapters, lora, _ = load_run_adapter(workdir)
    model, base_params = flax_gpt2.from_pretrained(model_name, progress=False)
    params = flax_gpt2.merge_adapter(base_params, adapters, lora)
    adapter_weights = sum(x.size for x in jax.tree.leaves(adapters))
    print(f"{adapter_weights:,} adapter weights (rank {lora.rank}) over "
          f"{sum(x.size for x in jax.tree.leaves(base_params)):,} frozen ones")
else:
    model, params = flax_gpt2.from_pretrained(workdir, progress=False)  # the run's newest checkpoint
after = sentence(model, params, CARD_PROMPT)
print(f"before: {CARD_PROMPT}{before}\nafter:  {CARD_PROMPT}{after}\n")

held_out = commongen_eval.held_out_concept_sets(config.data, cut, num_coverage_sets)
rows = []
for concepts in held_out:
    text = sentence(model, params, "<|endoftext|>" + recipes.commongen_prompt(concepts))
    rows.append({"concepts": concepts, "sentence": text, "coverage": recipes.coverage(concepts, text)})
coverage = float(np.mean([r["coverage"] for r in rows])) if rows else float("nan")
print(f"mean coverage over {len(rows)} held-out concept sets: {coverage:.3f}")
display(HTML("<table><tr><th>concepts</th><th>sentence</th><th>coverage</th></tr>" + "".join(
    f"<tr><td>{html.escape(', '.join(r['concepts']))}</td><td>{html.escape(r['sentence'])}</td>"
    f"<td>{r['coverage']:.2f}</td></tr>"
    for r in rows[:20]) + "</table>"))

# %% [markdown]
# ## Export to a Hugging Face folder
# `save_pretrained` writes `config.json`, `model.safetensors`, `generation_config.json` and the tokenizer,
# which `transformers` (PyTorch) and `flax_gpt2` both load: upload it to the hub, or serve it anywhere.
# (From a command line: `python -m flax_gpt2.convert --model runs/commongen --out DIR`.) If
# `transformers` and `torch` are installed (they are on Colab), the cell loads the export back with them and
# checks that both libraries compute the same logits and the same greedy sentence.
#
# With LoRA the export is the adapter alone, a PEFT folder (`adapter_config.json` +
# `adapter_model.safetensors`, with the hash of the base weights it was trained on): what
# `python -m flax_gpt2.convert --model runs/commongen --format peft --out DIR` writes. `flax_gpt2` loads it onto
# the base with `from_pretrained(model_name, adapter=DIR)` (the hash is checked), and `peft.PeftModel` onto
# `transformers`' GPT-2 (when `peft` is installed: `pip install peft`).

# %%
from flax_gpt2.checkpoints.conversion import export_run_adapter

if lora_rank > 0:
    export_run_adapter(workdir, export_dir, overwrite=True)
    exported, exported_params = flax_gpt2.from_pretrained(model_name, adapter=export_dir, progress=False)
else:
    flax_gpt2.save_pretrained(export_dir, model, params, tokenizer=run_tokenizer, overwrite=True, progress=False)
    exported, exported_params = flax_gpt2.from_pretrained(export_dir, progress=False)  # float32, as saved
print(export_dir, sorted(os.listdir(export_dir)))
ids = np.array([run_tokenizer.encode(CARD_PROMPT, allowed_special="all")])
our_logits = np.asarray(exported.apply({"params": exported_params}, ids).logits)
# The reloaded export computes what the model of the run did (above): the same logits.
reload_max_abs_diff = float(np.max(np.abs(our_logits - np.asarray(model.apply({"params": params}, ids).logits))))
print(f"reloaded export vs the run's model: largest logit difference {reload_max_abs_diff:.2e}")

hf_check = None
try:
    import torch
    import transformers

    if lora_rank > 0:
        import peft
except ImportError:
    print("transformers/torch" + ("/peft" if lora_rank > 0 else "") + " are not installed here: "
          f"`pip install transformers torch{' peft' if lora_rank > 0 else ''}` to load the export with them")
else:
    if lora_rank > 0:  # the base from its own folder (or the hub), the adapter on top
        hf_model = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(model_name),
                                                  export_dir).eval()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_name)
    else:
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(export_dir).eval()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    with torch.no_grad():
        hf_logits = hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
        hf_tokens = hf_model.generate(input_ids=torch.from_numpy(ids),
                                      attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                      max_new_tokens=16, do_sample=False,
                                      pad_token_id=run_tokenizer.eot_token).numpy()
    our_tokens = flax_gpt2.generate(exported, exported_params, ids, max_new_tokens=16)[:, :hf_tokens.shape[1]]
    hf_check = {"max_abs_logit_diff": float(np.max(np.abs(hf_logits - our_logits))),
                "same_greedy_tokens": bool(np.array_equal(hf_tokens, our_tokens)),
                "same_token_ids": hf_tokenizer(CARD_PROMPT)["input_ids"] == ids[0].tolist(),
                "transformers_text": hf_tokenizer.decode(hf_tokens[0, ids.shape[1]:], skip_special_tokens=True)}
    print(f"transformers {transformers.__version__}{' + peft ' + peft.__version__ if lora_rank > 0 else ''}: "
          f"{CARD_PROMPT}{hf_check['transformers_text']}")
    print(f"largest logit difference {hf_check['max_abs_logit_diff']:.2e}; same greedy tokens: "
          f"{hf_check['same_greedy_tokens']}; same tokenizer: {hf_check['same_token_ids']}")

# %% [markdown]
# ## Summary
# What this notebook produced (CI checks these values).

# %% tags=["summary"]
records = read_metrics(workdir)
summary = {
    "devices": [str(d) for d in jax.devices()],
    "mesh": dict(mesh.shape),
    "result": result,
    "losses": [r["loss"] for r in records if "loss" in r],
    "eval_losses": [r["eval_loss"] for r in records if "eval_loss" in r],
    "before": before,
    "after": after,
    "coverage": coverage,
    "samples": rows,
    "export_files": sorted(os.listdir(export_dir)),
    "reload_max_abs_diff": reload_max_abs_diff,
    "lora_rank": config.lora.rank,
    "adapter_weights": adapter_weights,
    "hf_check": hf_check,
}
print(json.dumps(summary, indent=1))

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
# # flax_gpt2 quickstart: GPT-2 in JAX
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/flax-gpt2/flax_gpt2/blob/main/notebooks/quickstart.ipynb)
#
# Load OpenAI's GPT-2 (124M) from the Hugging Face hub into JAX, tokenize, generate (greedy, top-k/top-p
# sampling, beam search, a repetition penalty), use the `pipeline` of the GPT-2 model card, stream tokens as
# they come, plot the next-token distribution, and measure sliding-window perplexity.
#
# **Runtime:** written for a Colab **T4 GPU**; runs unchanged on CPU (slower), L4/A100 and TPU v5e-1 / v6e-1
# (*Runtime ▸ Change runtime type*). Run the cells from the top: the install cell picks the right JAX for
# the runtime it finds, and needs no restart.

# %% [markdown]
# ## Parameters
# The same notebook runs full-size on Colab and tiny in CI: [papermill](https://papermill.readthedocs.io)
# replaces the values of this cell (`papermill quickstart.ipynb out.ipynb -p model_name /path/to/model`).

# %% tags=["parameters"]
model_name = "gpt2"  # a hub id (gpt2, gpt2-medium, distilgpt2, ...) or a local Hugging Face model folder
prompt = "Hello, I'm a language model,"
max_new_tokens = 40
plot_prompt = "The Eiffel Tower is located in the city of"
ppl_window = 128  # sliding-window perplexity: tokens per window ...
ppl_stride = 64  # ... and how far each window moves
repo_dir = ""  # a checkout of flax_gpt2 to import (CI); empty: install it from git

# %% [markdown]
# ## Install
# `pip install`s this repository from git with the JAX build for this runtime: the `[tpu]` extra on a TPU
# VM, `[cuda]` on an NVIDIA GPU, none on CPU. JAX is not imported before the install, so no restart is
# needed. When `flax_gpt2` is already importable (a local checkout, CI, a second run) the cell does nothing.

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
import jax.numpy as jnp
import numpy as np

import flax_gpt2


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


print(f"Python {platform.python_version()}, jax {jax.__version__}, jaxlib {version('jaxlib')}, "
      f"flax {version('flax')}, optax {version('optax')}, flax_gpt2 {version('flax_gpt2')}")
print(f"backend: {jax.default_backend()}, {jax.device_count()} device(s):")
for device in jax.devices():
    print(f"  {device} ({device.device_kind})")

# %% [markdown]
# ## Load GPT-2
# `from_pretrained` takes a hub id or a local folder (`model.safetensors`, `pytorch_model.bin` or
# `flax_model.msgpack`) and returns a Flax module and its parameters. The hub needs network access; without
# it the error says how to download the folder elsewhere and pass it here.

# %%
try:
    model, params = flax_gpt2.from_pretrained(model_name)
    tokenizer = flax_gpt2.get_tokenizer(model_name)
except OSError as e:
    raise OSError(f"{e}\n\nIn this notebook: put that folder where this runtime can read it (Colab: the Files "
                  "panel, or mount Google Drive) and set model_name to its path in the Parameters cell.") from None

config = model.config
n_params = sum(x.size for x in jax.tree.leaves(params))
print(f"{model_name}: {n_params / 1e6:.1f}M parameters, {config.n_layer} layers, width {config.n_embd}, "
      f"{config.n_head} heads, context {config.n_positions}, vocabulary {config.vocab_size}")

# %% [markdown]
# ## Tokenize
# GPT-2's byte-level BPE (tiktoken's encoder; ids identical to Hugging Face's GPT-2 tokenizer).

# %%
ids = tokenizer.encode(prompt)
print(ids)
print([tokenizer.decode([i]) for i in ids])
assert tokenizer.decode(ids) == prompt

input_ids = np.array([ids], np.int32)  # [batch=1, prompt_length]
logits = model.apply({"params": params}, input_ids).logits  # [1, T, vocab]
print("logits:", logits.shape, logits.dtype)

# %% [markdown]
# ## Generate
# `generate` runs the prefill and the whole decode loop as one compiled computation over a preallocated KV
# cache (the first call of each kind compiles; later calls are fast). It returns the prompt followed by the
# new tokens.

# %%
def continuation(tokens, row=0):
    """The new text of one returned row (the prompt is cut off, <|endoftext|> dropped)."""
    return tokenizer.decode(tokens[row, len(ids):], skip_special_tokens=True)


eos = tokenizer.eot_token
outputs = {}
greedy = flax_gpt2.generate(model, params, input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos)
outputs["greedy"] = continuation(greedy)
sampled = flax_gpt2.generate(model, params, input_ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=50,
                             top_p=0.95, temperature=0.8, num_return_sequences=3, eos_token_id=eos, seed=0)
outputs["top-k 50 + top-p 0.95 sampling"] = [continuation(sampled, r) for r in range(3)]
beams = flax_gpt2.generate(model, params, input_ids, max_new_tokens=max_new_tokens, num_beams=4,
                           num_return_sequences=2, no_repeat_ngram_size=3, eos_token_id=eos)
outputs["beam search (4 beams, no repeated 3-grams)"] = [continuation(beams, r) for r in range(2)]
penalized = flax_gpt2.generate(model, params, input_ids, max_new_tokens=max_new_tokens, repetition_penalty=1.3,
                               eos_token_id=eos)
outputs["greedy + repetition penalty 1.3"] = continuation(penalized)

for name, texts in outputs.items():
    print(f"--- {name}")
    for text in [texts] if isinstance(texts, str) else texts:
        print(prompt + text)

# %% [markdown]
# Several prompts of different lengths go in one batch, left-padded; each row equals generating it alone.

# %%
batch, mask = tokenizer.encode_batch([prompt, "The king"], padding_side="left")
tokens = flax_gpt2.generate(model, params, batch, mask, max_new_tokens=20, do_sample=True, top_k=50, seed=1)
for text in tokenizer.decode_batch(tokens[:, batch.shape[1]:]):
    print(repr(text))

# %% [markdown]
# ## `pipeline`, as in the GPT-2 model card
# The card's example (`transformers.pipeline` + `set_seed(42)`), with `flax_gpt2` in place of `transformers`.
# The samples differ from the card's: the random numbers come from JAX, not PyTorch.

# %%
from flax_gpt2 import pipeline, set_seed

generator = pipeline("text-generation", model=model_name)
set_seed(42)
card_outputs = generator("Hello, I'm a language model,", max_length=30, num_return_sequences=5)
card_outputs

# %% [markdown]
# ## Streaming
# `generate_stream` yields new tokens as they are produced (the loop stays compiled; only the new tokens come
# back to the host). Text is printed as soon as it is complete: a token can end in half of a UTF-8 character.

# %%
stream_args = dict(max_new_tokens=max_new_tokens, do_sample=True, top_k=50, top_p=0.95, seed=3, eos_token_id=eos)
streamed, printed = [], ""
print(prompt, end="", flush=True)
for new_tokens in flax_gpt2.generate_stream(model, params, input_ids, tokens_per_chunk=2, **stream_args):
    streamed.extend(new_tokens[0].tolist())
    text = tokenizer.decode([t for t in streamed if t != eos])
    if text.endswith("\ufffd"):  # wait for the rest of the character
        text = text[:-1]
    if len(text) > len(printed):
        print(text[len(printed):], end="", flush=True)
        printed = text
print()
# The streamed tokens are exactly what `generate` returns for the same arguments.
generated = flax_gpt2.generate(model, params, input_ids, **stream_args)[0, len(ids):]
stream_equals_generate = bool(np.array_equal(np.array(streamed), generated[:len(streamed)]))
print("same tokens as generate:", stream_equals_generate)

# %% [markdown]
# ## The next-token distribution
# The model's probabilities for the token after `plot_prompt`: the 20 most likely.

# %%
import matplotlib.pyplot as plt

plot_ids = np.array([tokenizer.encode(plot_prompt)], np.int32)
next_logits = model.apply({"params": params}, plot_ids).logits[0, -1]  # [vocab]
probs = np.asarray(jax.nn.softmax(next_logits.astype(jnp.float32)))
top = np.argsort(probs)[::-1][:20]
top_tokens = [tokenizer.decode([int(i)]) for i in top]

fig, ax = plt.subplots(figsize=(8, 5))
ax.barh([repr(t) for t in top_tokens][::-1], probs[top][::-1])
ax.set_xlabel("probability")
ax.set_title(f"next token after {plot_prompt!r}\n(top 20 hold {probs[top].sum():.0%} of the probability)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Perplexity of a paragraph
# Sliding-window perplexity as in Hugging Face's
# [perplexity guide](https://huggingface.co/docs/transformers/perplexity): windows of `ppl_window` tokens
# move by `ppl_stride`; after the first window only the last `stride` tokens of each are scored, so every
# token is predicted with at least `window - stride` tokens of context. Non-overlapping windows
# (`stride == window`) give less context and a higher perplexity; the full context gives the lowest.

# %%
from flax_gpt2.evaluation.perplexity import perplexity

paragraph = (
    "The lighthouse stood at the end of a long stone pier, and for more than a hundred years its lamp had "
    "turned through every night of the year. The keepers lived in a small white house at the foot of the "
    "tower. They trimmed the wick, polished the great glass lens, and wrote down the weather in a book that "
    "was kept on a shelf by the door. In winter the sea broke over the pier and the spray reached the "
    "windows of the lamp room. Ships passing in the dark counted the flashes to know where they were: two "
    "short and one long, every fifteen seconds. When the light was finally automated, the last keeper "
    "locked the door, handed the key to the harbour master, and walked back along the pier without "
    "looking round. The book of weather is now in the town museum, open at the page of his final entry."
)
paragraph_ids = tokenizer.encode(paragraph)
window = min(ppl_window, config.n_positions)
ppl = {
    f"sliding window {window}, stride {ppl_stride}": perplexity(model, params, paragraph_ids, window_length=window,
                                                                 stride=ppl_stride, progress=False),
    f"non-overlapping windows of {window}": perplexity(model, params, paragraph_ids, window_length=window,
                                                         stride=window, progress=False),
}
full = min(len(paragraph_ids), config.n_positions)
ppl[f"one window of {full}"] = perplexity(model, params, paragraph_ids, window_length=full, stride=full,
                                          progress=False)
print(f"{len(paragraph_ids)} tokens")
for name, r in ppl.items():
    print(f"{name:>36}: perplexity {r['perplexity']:8.2f} "
          f"({r['num_tokens']} tokens scored, {r['num_windows']} windows)")

# %% [markdown]
# ## Summary
# What this notebook produced (CI checks these values).

# %% tags=["summary"]
import json

summary = {
    "devices": [str(d) for d in jax.devices()],
    "generations": outputs,
    "pipeline": [o["generated_text"] for o in card_outputs],
    "stream": printed,
    "stream_equals_generate": stream_equals_generate,
    "top_tokens": top_tokens,
    "top_probs": [float(p) for p in probs[top]],
    "perplexity": {name: r["perplexity"] for name, r in ppl.items()},
}
print(json.dumps(summary, indent=1))

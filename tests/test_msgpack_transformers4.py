"""`convert --format msgpack` against the real reader it is for: transformers 4.x (which had Flax), installed
into a throwaway venv that also sees this interpreter's packages (and this checkout). Slow (a pip install); skipped when the package
registry cannot be reached."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import venv_beside_this_interpreter

pytestmark = pytest.mark.slow

TRANSFORMERS_WITH_FLAX = "transformers==4.46.3"
REPO = Path(__file__).resolve().parents[1]

# Runs inside the venv: transformers 4.x writes a random GPT-2, flax_gpt2 converts it to msgpack, and both
# transformers 4.x's Flax model and its PyTorch `from_flax` loader read the msgpack back.
CHECK = r"""
import json, os, sys
import numpy as np, torch
from flax import serialization, traverse_util
from transformers import FlaxGPT2LMHeadModel, GPT2Config, GPT2LMHeadModel
from flax_gpt2.convert import convert

root, tied = sys.argv[1], sys.argv[2] == "tied"
torch.manual_seed(0)
ref = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64,
                                 tie_word_embeddings=tied))
with torch.no_grad():
    for p in ref.parameters():
        p.normal_(0, 0.1)
ref.eval().save_pretrained(f"{root}/ref")
convert(f"{root}/ref", f"{root}/ours", format="msgpack", progress=False)
FlaxGPT2LMHeadModel.from_pretrained(f"{root}/ref", from_pt=True).save_pretrained(f"{root}/theirs")
read = lambda d: traverse_util.flatten_dict(serialization.msgpack_restore(open(f"{d}/flax_model.msgpack", "rb").read()))
ours, theirs = read(f"{root}/ours"), read(f"{root}/theirs")
ids = np.array([[1, 5, 9, 200, 7, 0, 511]])
want = ref(torch.tensor(ids)).logits.detach().numpy()
flax_logits = np.asarray(FlaxGPT2LMHeadModel.from_pretrained(f"{root}/ours")(ids).logits)
torch_logits = GPT2LMHeadModel.from_pretrained(f"{root}/ours", from_flax=True).eval()(torch.tensor(ids)).logits
print(json.dumps({
    "same_keys": sorted(map(str, ours)) == sorted(map(str, theirs)),
    "max_tree_diff": max(float(np.abs(np.asarray(ours[k], np.float32) - np.asarray(theirs[k], np.float32)).max())
                         for k in theirs if k in ours),
    "flax_diff": float(np.abs(flax_logits - want).max()),
    "from_flax_diff": float(np.abs(torch_logits.detach().numpy() - want).max()),
}))
"""


@pytest.fixture(scope="module")
def transformers4(tmp_path_factory):
    env_dir = tmp_path_factory.mktemp("transformers4") / "venv"
    # flax_gpt2 from this checkout; the venv's own transformers 4.x before this interpreter's packages.
    python = venv_beside_this_interpreter(env_dir, extra_paths=(str(REPO),))
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              TRANSFORMERS_WITH_FLAX, "huggingface_hub<1", "tokenizers<0.21"],
                             capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        pytest.skip(f"could not install {TRANSFORMERS_WITH_FLAX}: {install.stderr.strip()[-300:]}")
    return python


@pytest.mark.parametrize("tying", ["tied", "untied"])
def test_msgpack_is_what_transformers4_flax_writes_and_reads(transformers4, tmp_path, tying):
    proc = subprocess.run([str(transformers4), "-c", CHECK, str(tmp_path), tying], capture_output=True, text=True,
                          timeout=600, env={"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_keys"], result
    assert result["max_tree_diff"] == 0.0, result  # bit for bit what transformers 4.x itself saves
    assert result["flax_diff"] <= 1e-5 and result["from_flax_diff"] <= 1e-5, result

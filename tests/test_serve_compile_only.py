"""`python -m flax_gpt2.serve --compile_only TOPOLOGY`: the server's prefill and decode programs compiled for a TPU
chip on this CPU host from the model's config alone, and the report. Compiles run in child processes (libtpu
reads its environment when it loads, once per process); the models are tiny, with a long context and a small
vocabulary so that the largest batch that fits (and so the batches compiled to check it) stays small."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from flax_gpt2.modeling.config import GPT2Config
from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params
from flax_gpt2.modeling.quantize import parameter_bytes, quantize_params
from flax_gpt2.serve import compile_only as co
from flax_gpt2.serve.__main__ import main
from flax_gpt2.utils import topologies

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 8192
# Two wide blocks, a long context (KV 2 * 2 * 2048 * 8192 * 4 bytes = 256 MiB per slot) and 512 ids (small logits):
# a v5e chip holds a few dozen slots, so the batches compiled to check the largest stay small (a decode step's
# compile time grows with its batch).
LONG = {"model_type": "gpt2", "vocab_size": 512, "n_positions": CONTEXT, "n_embd": 2048, "n_layer": 2, "n_head": 16}

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install 'jax[tpu]==<the installed jax>')")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long_model")
    (folder / "config.json").write_text(json.dumps(LONG))
    return folder


def _serve(*args):
    return subprocess.Popen([sys.executable, "-m", "flax_gpt2.serve", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# --- no compile ---

def test_an_unknown_topology_exits_2_listing_the_known_ones(capsys):
    assert main(["--model", "tiny", "--compile_only", "v9-8"]) == 2
    err = capsys.readouterr().err
    assert "--compile_only" in err and "v9-8" in err and "v5litepod-8" in err and "v4-8" in err


def test_int8_weights_take_a_quarter_to_a_third_of_float32():
    for name in ("tiny", "gpt2"):
        config = GPT2Config.from_preset(name)
        ratio = parameter_bytes(co.abstract_params(config, "int8")) / parameter_bytes(co.abstract_params(config))
        assert 0.25 <= ratio <= 0.35, (name, ratio)


def test_abstract_params_are_the_real_ones():
    config = GPT2Config.from_hf_config(LONG)
    real = init_params(GPT2LMHeadModel(config), jax.random.key(0))
    abstract = co.abstract_params(config)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype), real)
    assert parameter_bytes(co.abstract_params(config, "int8")) == sum(
        np.asarray(x).nbytes for x in jax.tree.leaves(quantize_params(real)))


def test_bandwidth_is_in_the_table_for_every_target():
    for name in ("v4-8", "v5litepod-1", "v5p-8", "v6e-8", "v3-8", "a100x1", "h100x8", "v100x1"):
        bandwidth = topologies.lookup(name).hbm_bandwidth_per_device
        assert 100e9 < bandwidth < 4e12, name
    assert topologies.lookup("v5litepod-8").hbm_bandwidth_per_device == 819e9


def test_a_model_without_a_config_is_refused():
    with pytest.raises(ValueError, match="preset name"):
        co.model_config("no/such-model")


# --- compiles (minutes on a 2-core CPU: the prefill at the largest bucket and the decode step, three times) ---

@pytest.mark.slow
@needs_libtpu
def test_report_numbers_and_refusals(long_model, tmp_path):
    """4 slots fit and the report's numbers agree with the model's; 100,000 slots of the int8 model do not (exit
    1 naming --max_batch and how many fit); weights bigger than a chip are refused naming --quantize int8."""
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(dict(LONG, n_embd=4096, n_head=32, n_layer=64)))
    runs = {
        "fits": _serve("--model", long_model, "--compile_only", "v5litepod-1", "--max_batch", 4,
                       "--report", tmp_path / "fits.json"),
        "too_many": _serve("--model", long_model, "--compile_only", "v5e-8", "--max_batch", 100000, "--quantize",
                           "int8", "--report", tmp_path / "too_many.json"),
        "too_big": _serve("--model", big, "--compile_only", "v5litepod-1", "--report", tmp_path / "too_big.json"),
    }
    done = {name: _finish(proc) for name, proc in runs.items()}
    config = GPT2Config.from_hf_config(LONG)
    real = init_params(GPT2LMHeadModel(config), jax.random.key(0))
    bandwidth = 819e9

    code, out, err = done["fits"]
    assert code == 0, err
    r = json.loads((tmp_path / "fits.json").read_text())
    assert "fits: True" in out and r["replicas"] == 1
    assert r["params_bytes"] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(real))
    head = 2048 * 512 * 4  # the output projection the engine keeps beside the params: wte transposed, [D, V]
    assert r["head_bytes"] == head and r["weights_bytes"] == r["params_bytes"] + head
    assert r["kv_bytes_per_slot"] == 2 * 2 * 16 * 128 * CONTEXT * 4  # 2 * L * H * S * K * float32
    assert r["kv_bytes"] == 4 * r["kv_bytes_per_slot"] and r["context_length"] == CONTEXT
    decode = r["decode"]["memory"]
    assert r["decode"]["batch"] == 4
    # the decode step takes the weights and the slots (and a few hundred bytes of settings)
    assert r["weights_bytes"] + r["slots_bytes"] <= decode["arguments"] <= 1.05 * (r["weights_bytes"]
                                                                                + r["slots_bytes"])
    assert r["weights_bytes"] + r["slots_bytes"] < r["peak_bytes_per_chip"] <= r["usable_hbm_bytes_per_chip"]
    assert r["hbm_bandwidth_bytes_per_s"] == bandwidth
    # The largest batch was compiled, fits, and 5% more would not (its buffers scaled with the batch).
    n = r["largest_max_batch"]
    assert 10 < n < 100 and r["largest_batch_checked"] == n
    prefill = r["prefill"]["memory"]["total"] - r["prefill"]["memory"]["arguments"]
    extra = r["decode_extra_bytes"][str(n)]
    assert r["weights_bytes"] + n * r["slot_bytes"] + max(extra, prefill) <= r["usable_hbm_bytes_per_chip"]
    more = math.ceil(1.05 * n) + 1
    assert r["weights_bytes"] + more * r["slot_bytes"] + max(extra * more / n, prefill) > r[
        "usable_hbm_bytes_per_chip"]
    bound = r["decode_bound"]["max_batch"]
    assert bound["bytes_per_step"] == r["weights_read_per_step_bytes"] + 4 * r["kv_bytes_per_slot"]
    assert math.isclose(bound["tokens_per_s_per_chip"], 4 * bandwidth / bound["bytes_per_step"], rel_tol=1e-3)

    code, out, err = done["too_many"]
    assert code == 1, err
    r8 = json.loads((tmp_path / "too_many.json").read_text())
    assert not r8["fits"] and r8["replicas"] == 8 and r8["largest_max_batch"] >= n  # int8: more room for slots
    assert r8["params_bytes"] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(quantize_params(real)))
    most = r8["largest_batch_checked"] or r8["largest_max_batch"]
    assert f"--max_batch 100000 does not fit a v5litepod-8 chip: at most {most} slots" in err
    assert len(err.strip().splitlines()) == 1
    slice_bound = r8["decode_bound"]["largest_max_batch"]
    assert math.isclose(slice_bound["tokens_per_s_per_slice"], 8 * slice_bound["tokens_per_s_per_chip"], rel_tol=1e-3)

    code, out, err = done["too_big"]
    assert code == 1, err
    assert "the weights alone" in err and "--quantize int8" in err and "prefill" not in json.loads(
        (tmp_path / "too_big.json").read_text())


def test_compile_only_with_an_adapter_is_a_usage_error(capsys, tmp_path):
    assert main(["--model", "tiny", "--compile_only", "v5litepod-1", "--adapter", f"a={tmp_path}"]) == 2
    assert "--compile_only with --adapter" in capsys.readouterr().err


def test_xla_refusals_are_read_in_bytes():
    """Both ways XLA's TPU compiler says how much a refused program needed (train and serve read them alike)."""
    used = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
            "Used 20.1G of 15.75G hbm.")
    temps = "RESOURCE_EXHAUSTED: Program hbm requirement 34.4G: HLO temporaries (34.40G) exceed 15.75G"
    assert topologies.refused_memory(used) == {"used": int(20.1 * (1 << 30))}
    assert topologies.refused_memory(temps) == {"temporaries": int(34.40 * (1 << 30))}
    assert topologies.refused_memory("Used 512M of 16G hbm; HLO temporaries (3K)") == {"used": 512 << 20,
                                                                                       "temporaries": 3 << 10}
    assert topologies.refused_memory("out of memory") == {}

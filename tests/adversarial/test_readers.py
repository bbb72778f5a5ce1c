"""Bad checkpoint and config files fail clearly, run nothing, and cost little memory (cases: bad_files.py).

For every case: the expected exception type (a ValueError or OSError, which the CLIs print as one line),
a message that names the file and what is wrong, no payload run (no `pwned` marker, the unpickler's
allowed functions untouched), and, measured in fresh subprocesses, a peak memory growth under 64 MiB.
"""

import collections
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import flax_gpt2
from flax_gpt2.checkpoints import formats as checkpoint_files
from flax_gpt2.checkpoints.formats import torch_bin
from flax_gpt2.utils import cli

from . import bad_files

MEMORY_LIMIT = 64 << 20
CASES = bad_files.CASES
TESTS_DIR = Path(__file__).resolve().parents[1]
REPO = TESTS_DIR.parent


def test_case_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every case built into its own folder: {name: (target, file the error must name)}."""
    root = tmp_path_factory.mktemp("bad_files")
    return {c.name: bad_files.build(c, root / c.name) for c in CASES}


def _process_state():
    """What a pickle payload could change for the rest of the process: the allowed callables' attributes."""
    functions = (torch_bin._rebuild_tensor_v2, torch_bin._rebuild_parameter)
    return ([(f.__defaults__, f.__kwdefaults__, dict(f.__dict__), f.__code__) for f in functions],
            sorted(vars(collections.OrderedDict)))


def _zip_contents(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return b"".join(zf.read(name) for name in zf.namelist())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_file_fails_clearly(case, corpus):
    target, named = corpus[case.name]
    if case.marker:  # the payload is real: it names the marker it would create
        assert str(named.parent / bad_files.MARKER).encode() in _zip_contents(target)
    before = _process_state()
    with pytest.raises(case.error) as info:
        bad_files.run(case, target)
    message = cli.one_line(info.value)
    assert re.search(case.match, message), message
    assert str(named) in message, f"the message does not name {named}: {message}"
    assert isinstance(info.value, (ValueError, OSError))
    if case.call != "from_pretrained":  # a checkpoint that does not fit the model lists each problem on a line
        assert "\n" not in str(info.value), str(info.value)
    folder = named.parent
    assert not (folder / bad_files.MARKER).exists(), "the payload ran"
    assert _process_state() == before


# --- memory: every case once more, in fresh processes, measuring the peak resident set ---------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import gc, json, resource, sys
    from pathlib import Path

    sys.path.insert(0, sys.argv[1])
    from adversarial import bad_files
    import flax_gpt2
    from flax_gpt2.checkpoints import formats as checkpoint_files

    def peak():  # bytes (ru_maxrss is KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    jobs = json.loads(Path(sys.argv[2]).read_text())
    for folder in jobs["warm_up"]:  # imports, JAX's CPU backend, one good read of every format
        flax_gpt2.from_pretrained(folder, progress=False)
    gc.collect()
    baseline = peak()
    growth = {}
    for name, target in jobs["cases"]:
        case = next(c for c in bad_files.CASES if c.name == name)
        try:
            bad_files.run(case, Path(target))
        except Exception:
            pass
        gc.collect()
        growth[name] = peak() - baseline
    print(json.dumps(growth))
""")


@pytest.fixture(scope="module")
def memory_growth(corpus, tmp_path_factory) -> dict[str, int]:
    """{case: peak RSS growth in bytes over a warmed-up process}.

    The peak only rises, and memory a case frees can be reused by the next one unseen, so a process's
    number bounds its case and every case before it. Hence the `memory` cases (bombs, and the most a
    file may cost) each get a fresh process; the others share one.
    """
    root = tmp_path_factory.mktemp("memory")
    warm_up = []
    state = bad_files.tiny_state()
    for name, write in [("st", lambda f: bad_files.safetensors_file(f / "model.safetensors", state)),
                        ("bin", lambda f: bad_files.torch_bin(f / "pytorch_model.bin", state)),
                        ("msgpack", lambda f: bad_files.msgpack_file(f / "flax_model.msgpack",
                                                                     bad_files.hf_flax_tree(state)))]:
        folder = root / name
        folder.mkdir()
        bad_files.write_config(folder)
        write(folder)
        warm_up.append(str(folder))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}
    groups = [[c.name] for c in CASES if c.memory] + [[c.name for c in CASES if not c.memory]]
    growth = {}
    for i, names in enumerate(groups):
        jobs = root / f"jobs{i}.json"
        jobs.write_text(json.dumps({"warm_up": warm_up, "cases": [[n, str(corpus[n][0])] for n in names]}))
        result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(TESTS_DIR), str(jobs)], env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        growth.update(json.loads(result.stdout.strip().splitlines()[-1]))
    return growth


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_file_costs_little_memory(case, memory_growth):
    assert memory_growth[case.name] < MEMORY_LIMIT, f"{case.name} grew the peak by {memory_growth[case.name] >> 20} MiB"


# --- the good files next to the bad ones read right -----------------------------------------------------------

def test_assembled_bin_is_what_torch_reads(tmp_path):
    """bad_files' pickle assembler writes what torch.save writes: torch loads it, and so do we."""
    torch = pytest.importorskip("torch")
    state = bad_files.tiny_state()
    path = bad_files.torch_bin(tmp_path / "pytorch_model.bin", state)
    theirs = torch.load(path, weights_only=True)
    ours = checkpoint_files.read_weights(path, progress=False)
    assert sorted(theirs) == sorted(ours) == sorted(state)
    for key, value in state.items():
        assert np.array_equal(theirs[key].numpy(), value) and np.array_equal(ours[key], value), key


def test_big_endian_bin(tmp_path):
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int32),
             "c": np.linspace(-1, 1, 5).astype(np.float16)}
    got = checkpoint_files.read_torch_bin(str(bad_files.torch_bin(tmp_path / "x.bin", state, byteorder="big")),
                                          progress=False)
    for key, value in state.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


def test_bin_tensors_are_lazy_read_only_views(tmp_path):
    """Tensors map the file: two keys over one storage share memory, and nothing is copied out up front."""
    pkl = bad_files.p_state_dict({k: bad_files.p_tensor("FloatStorage", "0", 12, 0, (3, 4), (4, 1))
                                  for k in ("tied_a", "tied_b")})
    path = bad_files.torch_zip(tmp_path / "x.bin", pkl, {"0": np.arange(12, dtype="<f4").tobytes()})
    got = checkpoint_files.read_torch_bin(str(path), progress=False)
    assert np.shares_memory(got["tied_a"], got["tied_b"]) and not got["tied_a"].flags.writeable
    assert np.array_equal(got["tied_a"], np.arange(12, dtype=np.float32).reshape(3, 4))


def test_sharded_bin_loads(tmp_path):
    state = bad_files.tiny_state()
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:5], "pytorch_model-00002-of-00002.bin": keys[5:]}
    for name, names in shards.items():
        bad_files.torch_bin(tmp_path / name, {k: state[k] for k in names})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, names in shards.items() for k in names}}))
    bad_files.write_config(tmp_path)
    got = checkpoint_files.read_weights(tmp_path / "pytorch_model.bin.index.json", progress=False)
    assert got.file_of(keys[0]).endswith("pytorch_model-00001-of-00002.bin")
    assert all(np.array_equal(got[k], state[k]) for k in keys)
    model, params = flax_gpt2.from_pretrained(tmp_path, progress=False)
    assert np.array_equal(np.asarray(params["transformer"]["wte"]["embedding"]), state["transformer.wte.weight"])


@pytest.mark.parametrize("raw", [
    dict(layer_norm_epsilon=1), dict(resid_pdrop=0, embd_pdrop=0.0, attn_pdrop=0.999), dict(n_inner=None),
    dict(n_inner=20), dict(bos_token_id=[50256, 1], eos_token_id=None), dict(initializer_range=0),
    dict(summary_activation=None), dict(scale_attn_weights=False),
])
def test_edge_values_that_are_valid(tmp_path, raw):
    bad_files.write_config(tmp_path, **raw)
    config = flax_gpt2.GPT2Config.from_hf_config(tmp_path)
    for key, value in raw.items():
        if key == "bos_token_id":
            assert config.bos_token_id == 50256
        elif value is not None:
            assert getattr(config, key) == value


@pytest.mark.parametrize("field,value,match", [
    ("n_head", True, r"n_head must be a positive integer, got True"),
    ("remat", "yes", r"remat must be true or false"),
    ("dtype", "int32", r"dtype must be a floating-point dtype"),
    ("param_dtype", None, r"param_dtype must be a floating-point dtype"),
    ("layer_norm_epsilon", -1e-5, r"layer_norm_epsilon must be a finite number > 0"),
])
def test_config_fields_are_checked_in_python_too(field, value, match):
    with pytest.raises(ValueError, match=match):
        flax_gpt2.GPT2Config(**{field: value})
    with pytest.raises(ValueError, match=match):
        flax_gpt2.GPT2Config.from_preset("tiny").replace(**{field: value})

"""LoRA fine-tuning in the training app (`--config.lora.rank=R`): config checks, the frozen-base train step
(only adapters trained and in the optimizer, step 0 = the base exactly, a bfloat16 base), adapter-only
checkpoints that resume exactly and refuse another base, the run's adapter read back for PEFT, and meshes.

Meshes of 8 simulated CPU devices need `XLA_FLAGS` before JAX starts, so they run in a subprocess: this
file run as a script (`python tests/test_lora_training.py worker OUT`) writes its comparisons to OUT.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_hf_model, tiny_train_config

REPO = Path(__file__).resolve().parents[1]
SEQ = 32
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
TOL = 1e-5


def _lora(**kwargs):
    from flax_gpt2 import LoRAConfig

    return LoRAConfig(**{"rank": 4, "targets": ("c_attn", "c_fc"), **kwargs})


def _setup(mesh_shape, devices, *, lora, scan_layers=False, base_dtype=None, dropout=0.0):
    """Model, optimizer, mesh, rules and LoRA train-state shardings of the tiny model."""
    import ml_collections

    from flax_gpt2 import GPT2Config, GPT2LMHeadModel
    from flax_gpt2.configs import base
    from flax_gpt2.train import mesh as mesh_lib, step as step_lib

    config = base.get_config()
    config.optimizer.warmup_steps = 2
    config.optimizer.lr = 1e-2  # adapters move visibly in a few steps
    gpt2 = GPT2Config.from_preset("tiny", scan_layers=scan_layers, resid_pdrop=dropout, embd_pdrop=dropout,
                                  attn_pdrop=dropout)
    model = GPT2LMHeadModel(gpt2)
    tx, schedule = step_lib.make_optimizer(config.optimizer, total_steps=10)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_shape))), devices)
    rules = config.logical_axis_rules
    shardings, shapes = mesh_lib.train_state_shardings(model, tx, mesh, rules, SEQ, lora, base_dtype)
    return model, tx, schedule, mesh, rules, shardings, shapes


def _random_base(model, shardings, dtype=None):
    """The tiny model's random init (per-layer order, stacked if scanned), in `dtype`, placed as the base."""
    import jax
    import jax.numpy as jnp

    from flax_gpt2.train import step as step_lib

    return step_lib.init_base(model, shardings.base, jax.random.key(0), SEQ, dtype or jnp.float32)


def _lora_run(mesh_shape, devices, tokens, *, lora, scan_layers=False, base_dtype=None, n_steps=3):
    """`n_steps` LoRA train steps on `tokens` [A, B, SEQ+1]: (losses, adapters, base before, base after,
    opt_state, eval loss, c_attn lora_a spec)."""
    import flax.linen as nn
    import jax

    from flax_gpt2.train import mesh as mesh_lib, step as step_lib

    model, tx, schedule, mesh, rules, shardings, _ = _setup(mesh_shape, devices, lora=lora, scan_layers=scan_layers,
                                                             base_dtype=base_dtype)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        base = _random_base(model, shardings, base_dtype)
        before = jax.tree.map(np.asarray, base)
        state = step_lib.init_lora_state(tx, shardings, jax.random.key(1), base, model.config, lora)
        batch = jax.make_array_from_callback(tokens.shape, batch_sharding, lambda i: tokens[i])
        train_step = step_lib.jit_train_step(model, tx, schedule, shardings, batch_sharding, lora)
        eval_step = step_lib.jit_eval_step(model, shardings.params, batch_sharding, lora, shardings.base)
        losses = []
        for _ in range(n_steps):
            state, metrics = train_step(state, batch, jax.random.key(2))
            losses.append(float(metrics["loss"]))
        eval_loss = float(eval_step(state.params, batch[:1], state.base))
        first = state.params["transformer"]["h" if scan_layers else "h_0"]["attn"]["c_attn"]["lora_a"]
        spec = [a if a is None or isinstance(a, str) else list(a) for a in first.sharding.spec]
    to_np = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    return losses, to_np(state.params), before, to_np(state.base), to_np(state.opt_state), eval_loss, spec


def _tokens(shape=(2, 4, SEQ + 1), seed=0):
    return np.random.default_rng(seed).integers(0, 50257, size=shape, dtype=np.int32)


def _max_diff(a, b) -> float:
    import jax

    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64)
                                                                             - np.asarray(y, np.float64)))), a, b)))


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("lora.rank", -1), ("lora.targets", "q_proj"), ("lora.targets", "c_attn,"),
    ("lora.alpha", 0.0), ("lora.dropout", 1.0), ("lora.base_dtype", "int8"),
])
def test_bad_lora_values_are_config_errors_before_anything_is_written(tmp_path, key, value):
    from flax_gpt2.train.config_checks import ConfigValueError
    from flax_gpt2.train.train_loop import train_and_evaluate

    config = tiny_train_config(tmp_path / "cache", **{"lora.rank": 4, key: value})
    with pytest.raises(ConfigValueError, match=f"config.{key}="):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_rank_0_is_full_training_and_the_lora_config_follows_the_keys():
    from flax_gpt2.configs import base
    from flax_gpt2.train import model_config

    config = base.get_config()
    assert model_config.lora_config(config) is None and model_config.base_dtype(config) is None
    config.lora.rank, config.lora.targets, config.lora.alpha = 8, "c_attn, mlp.c_proj", 16
    lora = model_config.lora_config(config)
    assert lora.rank == 8 and lora.targets == ("c_attn", "mlp.c_proj") and lora.scale == 2.0
    assert model_config.base_dtype(config).__name__ == "float32"
    config.lora.base_dtype = "bfloat16"
    assert model_config.base_dtype(config).__name__ == "bfloat16"


def test_resume_refuses_other_base_weights_even_when_changes_are_allowed():
    from flax_gpt2.checkpoints.run_folders import LORA_BASE_SHA256
    from flax_gpt2.configs import base
    from flax_gpt2.train import run_guard

    saved = dict(run_guard.flatten(base.get_config()), **{"lora.rank": 4, "init_from": "/models/a",
                                                          LORA_BASE_SHA256: "a" * 64})
    same = dict(saved, init_from="/models/copy_of_a")  # moved weights: a training key, allowed on request
    assert set(run_guard.check_resume_config(saved, same, allow_change=True, workdir="w")) == {"init_from"}
    other = dict(saved, **{LORA_BASE_SHA256: "b" * 64})
    with pytest.raises(run_guard.ConfigChangedError, match=r"other base weights.*aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        run_guard.check_resume_config(saved, other, allow_change=True, workdir="w")


def test_a_run_from_before_lora_existed_resumes_under_the_lora_off_defaults():
    from flax_gpt2.configs import base
    from flax_gpt2.train import run_guard

    current = run_guard.flatten(base.get_config())
    older = {k: v for k, v in current.items() if not k.startswith("lora.")}
    assert run_guard.check_resume_config(older, current, allow_change=False, workdir="w") == {}
    with pytest.raises(run_guard.ConfigChangedError, match=r"lora\.rank: '<absent>' -> 4"):
        run_guard.check_resume_config(older, dict(current, **{"lora.rank": 4}), allow_change=True, workdir="w")


# --- the train step -------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_only_adapters_train_and_step_0_is_the_base_exactly(base_dtype):
    import jax
    import jax.numpy as jnp

    from flax_gpt2.train import step as step_lib

    dtype = jnp.dtype(base_dtype)
    lora = _lora()
    tokens = _tokens((1, 4, SEQ + 1))
    losses, adapters, before, after, opt_state, _, _ = _lora_run((1, 1, 1), jax.devices()[:1], tokens, lora=lora,
                                                                 base_dtype=dtype, n_steps=3)
    # The base is stored in its dtype and is bit-identical after the steps.
    assert {x.dtype for x in jax.tree.leaves(after)} == {dtype}
    jax.tree.map(np.testing.assert_array_equal, before, after)
    # Step 0's loss is the base model's own loss on that batch, exactly (B = 0).
    model, *_ = _setup((1, 1, 1), jax.devices()[:1], lora=lora, base_dtype=dtype)
    base_loss = float(jax.jit(step_lib.make_loss_fn(model))(jax.tree.map(jnp.asarray, before), tokens[0],
                                                            jax.random.key(0)))
    assert losses[0] == base_loss
    assert losses[-1] < losses[0]  # and the adapters learn
    # Only adapter-shaped arrays are trained and held by the optimizer (Adam's moments), nothing base-sized.
    adapter_shapes = {x.shape for x in jax.tree.leaves(adapters)}
    assert adapter_shapes == {(64, 4), (4, 3, 4, 16), (4, 256)}  # c_attn A, c_attn B; c_fc A is (64, 4) too
    moments = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert moments and {x.shape for x in moments} <= adapter_shapes
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(adapters))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(adapters))


def test_lora_weight_decay_covers_the_adapters():
    from flax_gpt2.train import step as step_lib

    mask = step_lib.decay_mask({"h_0": {"attn": {"c_attn": {"lora_a": 0, "lora_b": 0, "kernel": 0, "bias": 0}}}})
    assert mask["h_0"]["attn"]["c_attn"] == {"lora_a": True, "lora_b": True, "kernel": True, "bias": False}


def test_scanned_layers_and_accumulation_give_the_same_lora_steps():
    """Scanned blocks, and 4 micro-batches of 2 rows, equal per-layer blocks and one batch of 8 (1 device)."""
    import jax

    from flax_gpt2.modeling import layer_stacking

    lora = _lora(dropout=0.0)
    tokens = _tokens((1, 8, SEQ + 1), seed=3)
    reference = _lora_run((1, 1, 1), jax.devices()[:1], tokens, lora=lora)
    scanned = _lora_run((1, 1, 1), jax.devices()[:1], tokens, lora=lora, scan_layers=True)
    accumulated = _lora_run((1, 1, 1), jax.devices()[:1], tokens.reshape(4, 2, SEQ + 1), lora=lora)
    for other in (scanned, accumulated):
        assert max(abs(a - b) for a, b in zip(other[0], reference[0])) <= TOL
        adapters = layer_stacking.unstack_layers(other[1])
        assert _max_diff(adapters, reference[1]) <= TOL
    assert reference[0][-1] < reference[0][0] - 1e-3  # the adapters did move


def test_adapter_dropout_trains_and_differs_from_no_dropout():
    import jax

    tokens = _tokens((1, 4, SEQ + 1))
    plain = _lora_run((1, 1, 1), jax.devices()[:1], tokens, lora=_lora(), n_steps=3)
    dropped = _lora_run((1, 1, 1), jax.devices()[:1], tokens, lora=_lora(dropout=0.5), n_steps=3)
    assert dropped[0][0] == plain[0][0]  # B = 0 at step 0: dropout on A's rows changes nothing yet
    assert dropped[0][2] != plain[0][2]  # (the warmup's learning rate is 0 at the first update)


# --- runs: adapter-only checkpoints, exact resume, the base's identity, PEFT export ---------------------

STEPS = 8
LORA_KEYS = {"lora.rank": 4, "lora.targets": "c_attn,c_fc", "lora.alpha": 16.0}


def _run_config(cache_dir, base_folder, **overrides):
    """configs/tiny.py's data and cadence, LoRA on the tiny HF base; `decay_steps` fixed, so a shorter run
    is the same schedule and `steps` may grow on resume."""
    keys = {"init_from": str(base_folder), "steps": STEPS, "checkpoint_every": 4, "eval_every": 4, "data.seq_len": 32,
            "optimizer.decay_steps": STEPS, **LORA_KEYS}
    return tiny_train_config(cache_dir, **{**keys, **overrides})


def _losses(workdir, key="loss"):
    with open(Path(workdir) / "metrics.jsonl") as f:
        return {r["step"]: r[key] for r in map(json.loads, filter(str.strip, f)) if key in r}


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the lock file aside): what 'nothing changed' compares."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, shared_dir):
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny random transformers GPT-2 folder (every parameter random), the base of the LoRA runs."""
    return make_hf_model(tmp_path_factory, "lora_train_base", randomize=True)[1]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir, hf_base):
    """An uninterrupted LoRA run of STEPS steps."""
    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir = tmp_path_factory.mktemp("lora_reference")
    result = train_and_evaluate(_run_config(cache_dir, hf_base), str(workdir))
    assert result["step"] == STEPS and result["stopped"] == "done"
    return workdir


def test_a_lora_run_checkpoints_only_adapters_and_the_base_identity(reference_run, hf_base):
    import jax

    import flax_gpt2
    from flax_gpt2.checkpoints import run_adapters, run_folders
    from flax_gpt2.checkpoints.peft_adapters import base_weights_sha256

    losses = _losses(reference_run)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    adapters, lora, base = run_adapters.load_run_adapter(reference_run)
    assert lora.rank == 4 and lora.targets == ("c_attn", "c_fc") and lora.alpha == 16.0
    _, base_params = flax_gpt2.from_pretrained(str(hf_base), progress=False)
    assert base["init_from"] == str(hf_base) and base["weights_sha256"] == base_weights_sha256(base_params)
    assert base["model_config"]["n_embd"] == 64
    assert set(adapters["transformer"]) == {"h_0", "h_1"}
    assert {x.shape for x in jax.tree.leaves(adapters)} == {(64, 4), (4, 3, 4, 16), (4, 256)}
    # The checkpoint (adapters, Adam's moments, meta, orbax's files) is tiny beside the base's weights.
    checkpoint = reference_run / "checkpoints" / str(STEPS)
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    base_bytes = (hf_base / "model.safetensors").stat().st_size
    assert checkpoint_bytes * 20 < base_bytes, (checkpoint_bytes, base_bytes)
    # A LoRA run is not a whole model: the readers of whole models say what it is instead.
    with pytest.raises(run_folders.LoRARunError, match="LoRA training run.*load_run_adapter"):
        flax_gpt2.from_pretrained(str(reference_run), progress=False)


def test_a_stopped_lora_run_resumes_exactly(reference_run, cache_dir, hf_base, tmp_path):
    """Stopped at its checkpoint of step 4 (a shorter run of the same schedule), then resumed to STEPS: the
    losses and the adapters equal the uninterrupted run's."""
    from flax_gpt2.checkpoints import run_adapters
    from flax_gpt2.train.train_loop import train_and_evaluate

    assert train_and_evaluate(_run_config(cache_dir, hf_base, steps=4), str(tmp_path))["step"] == 4
    result = train_and_evaluate(_run_config(cache_dir, hf_base), str(tmp_path))
    assert result["step"] == STEPS
    expected = _losses(reference_run)
    np.testing.assert_allclose([_losses(tmp_path)[s] for s in expected], list(expected.values()), rtol=1e-6)
    expected_eval = _losses(reference_run, "eval_loss")
    np.testing.assert_allclose([_losses(tmp_path, "eval_loss")[s] for s in expected_eval],
                               list(expected_eval.values()), rtol=1e-6)
    resumed, reference = run_adapters.load_run_adapter(tmp_path)[0], run_adapters.load_run_adapter(reference_run)[0]
    assert _max_diff(resumed, reference) <= 1e-6


def test_a_lora_run_resumes_in_the_other_layer_layout(reference_run, cache_dir, hf_base, tmp_path):
    """Per-layer adapters and their moments restore into scanned blocks (`model.scan_layers` is harmless on
    resume): the finished run's eval loss is the same."""
    import shutil

    from flax_gpt2.train.train_loop import train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(reference_run, workdir)
    result = train_and_evaluate(_run_config(cache_dir, hf_base, **{"model.scan_layers": True}), str(workdir))
    assert result["step"] == STEPS
    assert abs(result["eval_loss"] - _losses(reference_run, "eval_loss")[STEPS]) <= 1e-5


def test_resuming_on_other_base_weights_is_refused_naming_them(reference_run, cache_dir, tmp_path_factory, tmp_path):
    import shutil

    from flax_gpt2.train import run_guard
    from flax_gpt2.train.train_loop import train_and_evaluate

    other = make_hf_model(tmp_path_factory, "lora_other_base", seed=5, randomize=True)[1]
    workdir = tmp_path / "run"
    shutil.copytree(reference_run, workdir)
    before = _snapshot(workdir)
    for allow in (False, True):
        with pytest.raises(run_guard.ConfigChangedError, match=f"other base weights than init_from='{other}'"):
            train_and_evaluate(_run_config(cache_dir, other, allow_config_change=allow), str(workdir))
    assert _snapshot(workdir) == before


def test_the_run_adapter_loads_in_peft_with_equal_logits(reference_run, hf_base, tmp_path):
    import jax.numpy as jnp
    import peft
    import torch
    import transformers

    import flax_gpt2
    from flax_gpt2 import apply_lora, convert
    from flax_gpt2.checkpoints import peft_adapters, run_adapters

    adapters, lora, base = run_adapters.load_run_adapter(reference_run)
    model, params = flax_gpt2.from_pretrained(base["init_from"], progress=False)
    # `convert --format peft` of the run: the adapter for its init_from base, with that base's weight hash.
    assert convert.main(["--model", str(reference_run), "--out", str(tmp_path), "--format", "peft",
                         "--no_progress"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
        assert f.metadata()[peft_adapters.BASE_HASH_KEY] == peft_adapters.base_weights_sha256(params)
    reference = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(hf_base).eval(),
                                               tmp_path).eval()
    ids = np.random.default_rng(0).integers(0, 50257, (2, 16))
    ours = np.asarray(model.apply({"params": apply_lora(params, adapters, lora)}, jnp.asarray(ids)).logits)
    with torch.no_grad():
        theirs = reference(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    plain = np.asarray(model.apply({"params": params}, jnp.asarray(ids)).logits)
    assert np.abs(ours - plain).max() > 1e-3  # the trained adapter does change the model


def test_compile_only_sizes_a_lora_run_without_optimizer_state_for_the_base(tmp_path):
    """`--config.compile_only` compiles a LoRA run for a TPU chip on this host: the train state is the base
    plus small adapters and their moments (full training: params and two moments, 3x the base)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'jax[tpu]==<the installed jax>')")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir", str(tmp_path),
                           "--config.compile_only=v5litepod-1", "--config.lora.rank=4",
                           "--config.lora.targets=c_attn,c_fc", "--config.lora.base_dtype=bfloat16"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "compile_report.json").read_text())
    assert report["fits"] and report["lora"] == {"rank": 4, "targets": "c_attn,c_fc", "base_dtype": "bfloat16"}
    base_bytes = 2 * report["model"]["num_params"]  # bfloat16
    assert base_bytes < report["state_bytes_per_chip"] < 1.1 * base_bytes
    assert "LoRA rank 4 on c_attn,c_fc over a frozen bfloat16 base" in proc.stdout


def _cli(workdir, cache_dir):
    """`python -m train` of a LoRA run on the tiny model's random init (no init_from)."""
    return [sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir", str(workdir),
            f"--config.steps={STEPS}", "--config.checkpoint_every=4", "--config.log_every=1", "--config.eval_every=4",
            f"--config.data.cache_dir={cache_dir}", "--config.lora.rank=4", "--config.lora.targets=c_attn,c_proj"]


@pytest.mark.slow
def test_sigterm_then_resume_reproduces_the_lora_run(cache_dir, tmp_path):
    """As tests/test_train_run.py: SIGTERM once step 2 is logged saves where it stopped; the same command
    resumes; the losses equal an uninterrupted run's."""
    import signal
    import time

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))

    def run(workdir):
        proc = subprocess.run(_cli(workdir, cache_dir), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "reference")
    workdir = tmp_path / "stopped"
    proc = subprocess.Popen(_cli(workdir, cache_dir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and max(_losses(workdir) or [0]) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = json.loads((workdir / "result.json").read_text())
    assert stopped["stopped"] == "preempted" and stopped["step"] < STEPS
    run(workdir)
    expected = _losses(tmp_path / "reference")
    np.testing.assert_allclose([_losses(workdir)[s] for s in expected], list(expected.values()), rtol=1e-6)


# --- meshes (subprocess) ----------------------------------------------------------------------------------


def _worker(out_path):
    import jax

    lora = _lora()
    results = {}
    for scan in (False, True):
        for accumulation in (1, 2):
            tokens = _tokens((accumulation, 16 // accumulation, SEQ + 1), seed=1)  # micro-batches split 8 ways
            reference = _lora_run((1, 1, 1), jax.devices()[:1], tokens, lora=lora, scan_layers=scan)
            for shape in MESHES:
                losses, adapters, _, after, _, eval_loss, spec = _lora_run(shape, jax.devices(), tokens, lora=lora,
                                                                           scan_layers=scan)
                results[f"{shape} scan={scan} accumulation={accumulation}"] = {
                    "loss": max(abs(a - b) for a, b in zip(losses, reference[0])),
                    "eval_loss": abs(eval_loss - reference[5]),
                    "adapters": _max_diff(adapters, reference[1]),
                    "base": _max_diff(after, reference[3]),
                    "lora_a_spec": spec,
                }
    with open(out_path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_mesh") / "results.json"
    # As conftest.run_device_worker, keeping the caller's PYTHONPATH after the repository.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, __file__, "worker", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scan"])
@pytest.mark.parametrize("accumulation", [1, 2], ids=["batch", "accumulated"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_lora_steps_equal_one_device(mesh_results, shape, scan, accumulation):
    r = mesh_results[f"{shape} scan={scan} accumulation={accumulation}"]
    assert r["loss"] <= TOL and r["eval_loss"] <= TOL and r["adapters"] <= TOL
    assert r["base"] == 0.0


@pytest.mark.slow
def test_adapters_are_sharded_like_their_kernels(mesh_results):
    # c_attn's A is (embed, rank): embed -> fsdp, the rank replicated; a stacked tree leads with layers.
    assert mesh_results["(2, 4, 1) scan=False accumulation=1"]["lora_a_spec"] == ["fsdp", None]
    assert mesh_results["(2, 2, 2) scan=True accumulation=1"]["lora_a_spec"] == [None, "fsdp", None]


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2])

"""Scan over layers computes the same numbers as the unrolled model: logits, hidden states, KV-cache decoding,
gradients (remat included); weights convert between the layouts everywhere (from_pretrained, save_pretrained,
training checkpoints); splash runs per shard under a mesh. (Each backend against "xla": test_attention_backends.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_gpt2
from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.kv_cache import KVCache
from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _random_params(model, seed=0):
    """Every parameter random (biases and LayerNorm affine too), so that no mix-up can hide."""
    params = init_params(model, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module", params=[{}, {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}],
                ids=["default", "inverse_layer_idx"])
def models(request):
    config = flax_gpt2.GPT2Config.from_preset("tiny", n_layer=3, **request.param)
    unrolled = GPT2LMHeadModel(config)
    scanned = GPT2LMHeadModel(config.replace(scan_layers=True))
    params = _random_params(unrolled)
    return unrolled, scanned, params, layer_stacking.stack_layers(params)


def _inputs(config, b=2, t=12):
    ids = jax.random.randint(jax.random.key(7), (b, t), 0, config.vocab_size)
    mask = jnp.ones((b, t), jnp.int32).at[0, :3].set(0)  # a left-padded row
    return ids, mask


def test_scanned_params_are_stacked_on_a_layers_axis(models):
    unrolled, scanned, _, _ = models
    boxed = jax.eval_shape(scanned.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    kernel = boxed["transformer"]["h"]["attn"]["c_attn"]["kernel"]
    assert kernel.names == ("layers", "embed", None, "heads", "kv")
    assert kernel.value.shape[0] == unrolled.config.n_layer


def test_scan_equals_unrolled_forward_hidden_states_and_cache(models):
    unrolled, scanned, params, stacked = models
    ids, mask = _inputs(unrolled.config)
    a = unrolled.apply({"params": params}, ids, attention_mask=mask, output_hidden_states=True)
    b = scanned.apply({"params": stacked}, ids, attention_mask=mask, output_hidden_states=True)
    assert _max_diff(a.logits, b.logits) <= TOL
    assert len(b.hidden_states) == unrolled.config.n_layer + 1 and _max_diff(a.hidden_states, b.hidden_states) <= TOL
    cache = KVCache.init(unrolled.config, 2, 16)
    full_mask = jnp.concatenate([mask, jnp.ones((2, 4), jnp.int32)], axis=1)
    a = unrolled.apply({"params": params}, ids, attention_mask=full_mask, cache=cache)
    b = scanned.apply({"params": stacked}, ids, attention_mask=full_mask, cache=cache)
    assert _max_diff(a.cache, b.cache) <= TOL and int(b.cache.index) == 12


def test_scan_equals_unrolled_in_generation(models):
    unrolled, scanned, params, stacked = models
    ids, mask = _inputs(unrolled.config)
    greedy = [np.asarray(flax_gpt2.generate(m, p, np.asarray(ids), np.asarray(mask), max_new_tokens=8, do_sample=False))
              for m, p in ((unrolled, params), (scanned, stacked))]
    np.testing.assert_array_equal(*greedy)
    beams = [np.asarray(flax_gpt2.generate(m, p, np.asarray(ids), np.asarray(mask), max_new_tokens=6, num_beams=3))
             for m, p in ((unrolled, params), (scanned, stacked))]
    np.testing.assert_array_equal(*beams)


@pytest.mark.parametrize("remat", [False, True])
def test_scan_equals_unrolled_gradients(models, remat):
    unrolled, scanned, params, stacked = models
    ids, _ = _inputs(unrolled.config)
    scanned = GPT2LMHeadModel(scanned.config.replace(remat=remat))

    def grads(model, p):
        return jax.grad(lambda q: jnp.mean(model.apply({"params": q}, ids).logits ** 2))(p)

    assert _max_diff(layer_stacking.stack_layers(grads(unrolled, params)), grads(scanned, stacked)) <= TOL


def test_layouts_round_trip():
    config = flax_gpt2.GPT2Config.from_preset("tiny")
    params = init_params(GPT2LMHeadModel(config), jax.random.key(0))
    back = layer_stacking.unstack_layers(layer_stacking.stack_layers(params))
    assert jax.tree.structure(back) == jax.tree.structure(params) and _max_diff(back, params) == 0


def test_backend_without_dropout_refuses_attention_dropout():
    config = flax_gpt2.GPT2Config.from_preset("tiny", attention="dot_product", attn_pdrop=0.1)
    model = GPT2LMHeadModel(config)
    params = init_params(model, jax.random.key(0))
    with pytest.raises(ValueError, match="no attention dropout"):
        model.apply({"params": params}, jnp.zeros((1, 8), jnp.int32), deterministic=False,
                    rngs={"dropout": jax.random.key(1)})
    model.apply({"params": params}, jnp.zeros((1, 8), jnp.int32))  # inference has no dropout: fine


def test_from_pretrained_in_either_form_and_export_is_bitwise_equal(hf_tiny, tmp_path):
    import torch

    hf_model, folder = hf_tiny
    model, params = flax_gpt2.from_pretrained(folder, scan_layers=True, attention="dot_product", progress=False)
    assert model.config.scan_layers and model.config.attention == "dot_product"
    assert layer_stacking.is_stacked(params)
    ids = np.random.default_rng(0).integers(0, 50257, (2, 10))
    with torch.no_grad():
        reference = hf_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)).logits)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)

    unrolled, unrolled_params = flax_gpt2.from_pretrained(folder, progress=False)
    flax_gpt2.save_pretrained(tmp_path / "scanned", model, params, tokenizer=False, progress=False)
    flax_gpt2.save_pretrained(tmp_path / "unrolled", unrolled, unrolled_params, tokenizer=False, progress=False)
    assert ((tmp_path / "scanned" / "model.safetensors").read_bytes()
            == (tmp_path / "unrolled" / "model.safetensors").read_bytes())
    with pytest.raises(TypeError, match="cannot override n_layer"):
        flax_gpt2.from_pretrained(folder, n_layer=3, progress=False)
    assert flax_gpt2.from_pretrained(folder, model_class="GPT2Model", progress=False)[0].__class__.__name__ == "GPT2Model"


def _train(workdir, steps, *extra, cache):
    args = [sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir", str(workdir),
            f"--config.steps={steps}", "--config.checkpoint_every=3", "--config.log_every=1", "--config.eval_every=100",
            "--config.progress_bar=False", "--config.optimizer.decay_steps=9", f"--config.data.cache_dir={cache}", *extra]
    proc = subprocess.run(args, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_training_switches_layout_on_resume_and_exports_the_same(tmp_path, shared_dir):
    """Same seed, same weights in both layouts; a run resumes across a scan_layers change with the losses of an
    uninterrupted run (to float rounding: the scanned program sums in another order), and a scanned run's
    checkpoint exports to the same bytes whichever layout it is loaded in."""
    from safetensors.numpy import load_file

    cache = tmp_path / "cache"
    _train(tmp_path / "unrolled", 9, cache=cache)
    _train(tmp_path / "mixed", 3, "--config.model.scan_layers=True", cache=cache)
    _train(tmp_path / "mixed", 6, cache=cache)
    _train(tmp_path / "mixed", 9, "--config.model.scan_layers=True", cache=cache)
    mixed, unrolled = _losses(tmp_path / "mixed"), _losses(tmp_path / "unrolled")
    assert sorted(mixed) == list(range(1, 10)) and mixed[1] == unrolled[1]
    np.testing.assert_allclose([mixed[s] for s in range(1, 10)], [unrolled[s] for s in range(1, 10)], rtol=1e-6)
    for name, kwargs in (("per-layer", {}), ("stacked", {"scan_layers": True})):
        model, params = flax_gpt2.from_pretrained(tmp_path / "mixed", progress=False, **kwargs)
        flax_gpt2.save_pretrained(tmp_path / name, model, params, tokenizer=False, progress=False)
    assert (tmp_path / "per-layer" / "model.safetensors").read_bytes() == (
        tmp_path / "stacked" / "model.safetensors").read_bytes()
    model, params = flax_gpt2.from_pretrained(tmp_path / "unrolled", progress=False)
    flax_gpt2.save_pretrained(tmp_path / "unrolled-hf", model, params, tokenizer=False, progress=False)
    a, b = load_file(tmp_path / "stacked" / "model.safetensors"), load_file(tmp_path / "unrolled-hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)


def test_splash_runs_per_shard_under_a_mesh(tmp_path):
    """On a (data=2, tensor=2) mesh the Pallas kernel runs under shard_map (XLA cannot partition it) and equals
    the einsum path, loss and gradients (4 simulated CPU devices, in a subprocess)."""
    script = tmp_path / "check.py"
    script.write_text('''
import jax, jax.numpy as jnp, flax.linen as nn
import flax_gpt2
from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params
from jax.sharding import NamedSharding, PartitionSpec as P
cfg = flax_gpt2.GPT2Config.from_preset("tiny", n_layer=1, n_positions=256)
mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("kv", None),
         ("vocab", None), ("length", None))
xla, splash = (GPT2LMHeadModel(cfg.replace(attention=a)) for a in ("xla", "splash"))
params = init_params(xla, jax.random.key(0))
ids = jax.random.randint(jax.random.key(1), (4, 128), 0, cfg.vocab_size)
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    ids = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"), None)))
    run = lambda m: jax.jit(lambda p, i: jax.value_and_grad(lambda q: m.apply({"params": q}, i).logits.mean())(p))(
        params, ids)
    (la, ga), (lb, gb) = run(xla), run(splash)
assert abs(float(la) - float(lb)) <= 1e-7, (la, lb)
assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb))) <= 1e-6
print("ok")
''')
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                                   XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]

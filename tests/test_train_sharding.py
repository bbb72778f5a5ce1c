"""The sharded train step equals the single-device one, and gradient accumulation equals the big batch.

Meshes of 8 simulated CPU devices need `XLA_FLAGS` before JAX starts, so they run in a subprocess: this
file run as a script (`python tests/test_train_sharding.py worker OUT`) writes its comparisons to OUT.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_device_worker

REPO = Path(__file__).resolve().parents[1]
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
TOL = 1e-5


def _setup(mesh_shape, devices, dropout=0.1, seq_len=32):
    """Model, optimizer and shardings of the tiny model on a (data, fsdp, tensor) mesh of `devices`."""
    import ml_collections

    from flax_gpt2.configs import base
    from flax_gpt2 import GPT2Config, GPT2LMHeadModel
    from flax_gpt2.train import mesh as mesh_lib, step as step_lib

    # GPT-2's optimizer (lr 6e-4, AdamW, clipping) with its warmup shortened from 2000 to 10 steps. AdamW's
    # first update of an entry is ~lr * g / (|g| + eps): for entries whose gradient is near zero, fp32
    # rounding differences of ~1e-8 between two reduction orders move that update by up to ~2% of lr.
    # During warmup lr is small, as in real training.
    config = base.get_config()
    config.optimizer.warmup_steps = 10
    gpt2 = GPT2Config.from_preset("tiny", resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = GPT2LMHeadModel(gpt2)
    tx, schedule = step_lib.make_optimizer(config.optimizer, total_steps=10)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_shape))), devices)
    rules = config.logical_axis_rules
    shardings, _ = mesh_lib.train_state_shardings(model, tx, mesh, rules, seq_len)
    return model, tx, schedule, mesh, rules, shardings


def _run(mesh_shape, devices, tokens, n_steps=3):
    """Grads of the first micro-batch, then `n_steps` train steps:
    (losses, grad_norms, grads, final params, c_fc kernel spec, initial params)."""
    import flax.linen as nn
    import jax

    from flax_gpt2.train import mesh as mesh_lib, step as step_lib

    model, tx, schedule, mesh, rules, shardings = _setup(mesh_shape, devices, seq_len=tokens.shape[-1] - 1)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = step_lib.init_train_state(model, tx, shardings, jax.random.key(0), tokens.shape[-1] - 1)
        initial = jax.tree.map(np.asarray, state.params)
        batch = jax.make_array_from_callback(tokens.shape, batch_sharding, lambda i: tokens[i])
        grad_fn = jax.jit(jax.grad(step_lib.make_loss_fn(model)), out_shardings=shardings.params)
        grads = grad_fn(state.params, batch[0], jax.random.key(1))
        train_step = step_lib.jit_train_step(model, tx, schedule, shardings, batch_sharding)
        losses, norms = [], []
        for _ in range(n_steps):
            state, metrics = train_step(state, batch, jax.random.key(1))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        # the params really are sharded as the rules say
        spec = state.params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"].sharding.spec
    to_np = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    return losses, norms, to_np(grads), to_np(state.params), list(spec), initial


def _max_diff(a, b) -> float:
    import jax
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def _worker(out_path):
    import jax

    from flax_gpt2.train import train_loop

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=(2, 8, 33), dtype=np.int32)  # 2 micro-batches of 8 rows
    reference = _run((1, 1, 1), jax.devices()[:1], tokens)
    results = {}
    for shape in MESHES:
        losses, norms, grads, params, spec, _ = _run(shape, jax.devices(), tokens)
        results[str(shape)] = {
            "loss": max(abs(a - b) for a, b in zip(losses, reference[0])),
            "grad_norm": max(abs(a - b) for a, b in zip(norms, reference[1])),
            "grads": _max_diff(grads, reference[2]),
            "params": _max_diff(params, reference[3]),
            "params_moved": _max_diff(params, reference[5]),
            "c_fc_spec": spec,
        }
    # A micro-batch the mesh cannot split evenly is a clear error before any work.
    config = _tiny_train_config()
    config.batch_size = 4
    config.mesh.data = 8
    try:
        train_loop.train_and_evaluate(config, os.path.join(os.path.dirname(out_path), "bad_batch"))
        results["bad_batch_error"] = None
    except ValueError as e:
        results["bad_batch_error"] = str(e)
    with open(out_path, "w") as f:
        json.dump(results, f)


def _tiny_train_config():
    from flax_gpt2.configs import tiny
    return tiny.get_config()


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    return run_device_worker(__file__, out, devices=8, timeout=600)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_step_equals_single_device(sharded_results, shape):
    r = sharded_results[str(shape)]
    assert r["loss"] <= TOL and r["grad_norm"] <= TOL
    assert r["grads"] <= TOL
    assert r["params"] <= TOL
    assert r["params_moved"] > 1e-5  # the steps did update the params


def test_params_are_sharded_by_the_rules(sharded_results):
    # c_fc kernel is (embed, mlp) -> (fsdp, tensor)
    assert sharded_results[str((2, 2, 2))]["c_fc_spec"] == ["fsdp", "tensor"]
    assert sharded_results[str((2, 4, 1))]["c_fc_spec"] == ["fsdp", "tensor"]


def test_batch_not_divisible_by_mesh_is_an_error(sharded_results):
    message = sharded_results["bad_batch_error"]
    assert message == ("the micro-batch of 4 sequences is not divisible by the 8 ways the mesh splits the batch "
                       "(data x fsdp); change batch_size/micro_batch_size or the mesh"), message


def test_gradient_accumulation_equals_big_batch():
    """4 micro-batches of 2 rows give the loss, grads and update of one batch of 8 (fp32, 1 device)."""
    import jax

    from flax_gpt2.train import mesh as mesh_lib, step as step_lib

    tokens = np.random.default_rng(1).integers(0, 50257, size=(8, 33), dtype=np.int32)
    model, tx, schedule, mesh, rules, shardings = _setup((1, 1, 1), jax.devices()[:1], dropout=0.0)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    train_step = step_lib.jit_train_step(model, tx, schedule, shardings, batch_sharding)
    out = {}
    for accum in (1, 4):
        state = step_lib.init_train_state(model, tx, shardings, jax.random.key(0), 32)
        state, metrics = train_step(state, tokens.reshape(accum, 8 // accum, 33), jax.random.key(1))
        out[accum] = (float(metrics["loss"]), float(metrics["grad_norm"]), jax.tree.map(np.asarray, state.params))
    assert abs(out[1][0] - out[4][0]) <= TOL
    assert abs(out[1][1] - out[4][1]) <= TOL
    assert _max_diff(out[1][2], out[4][2]) <= TOL


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2])

"""Per-layer <-> stacked (`scan_layers`) conversion of the params *and* the optimizer state on a 2-device
`fsdp` mesh: the restore targets' shapes and shardings, the arrays' values and placement, and a training run
that resumes in the other layout with the losses of an uninterrupted run.

Two simulated CPU devices need `XLA_FLAGS` before JAX starts, so the checks run in a subprocess: this file
run as a script (`python tests/test_layer_stacking.py worker OUT`) writes its findings to OUT as JSON.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_device_worker

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def _train_config(workdir_cache, scan_layers):
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_train_config

    return tiny_train_config(workdir_cache, **{
        "steps": STEPS, "checkpoint_every": 2, "eval_every": 100, "keep_checkpoints": 5, "async_checkpointing": False,
        "data.seq_len": 32, "mesh.data": 1, "mesh.fsdp": 2, "model.scan_layers": scan_layers})


def _layouts(config, mesh, rules):
    """{scan_layers: (model, shardings, abstract state)} of the run's model in both layouts."""
    from flax_gpt2 import GPT2LMHeadModel
    from flax_gpt2.train import checkpointing, mesh as mesh_lib, model_config, step as step_lib

    gpt2_config, _ = model_config.model_config(config)
    tx, _ = step_lib.make_optimizer(config.optimizer, config.steps)
    out = {}
    for scan in (False, True):
        model = GPT2LMHeadModel(gpt2_config.replace(scan_layers=scan))
        shardings, shapes = mesh_lib.train_state_shardings(model, tx, mesh, rules, config.data.seq_len)
        out[scan] = (model, tx, shardings, checkpointing.abstract_train_state(shapes, shardings))
    return out


def _abstract_mismatches(converted, target) -> list[str]:
    """Leaves whose shape, dtype or sharding differ between two trees of ShapeDtypeStructs."""
    import jax

    a, b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (converted, target))
    if [p for p, _ in a] != [p for p, _ in b]:
        return ["tree structure differs"]
    return [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(a, b)
            if x.shape != y.shape or x.dtype != y.dtype or not x.sharding.is_equivalent_to(y.sharding, len(y.shape))]


def _placement_mismatches(tree, shardings) -> list[str]:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for (p, x), s in zip(flat, jax.tree.leaves(shardings))
            if not x.sharding.is_equivalent_to(s, x.ndim)]


def _worker(out_path):
    import flax.linen as nn
    import jax

    from flax_gpt2.modeling import layer_stacking
    from flax_gpt2.train import checkpointing, mesh as mesh_lib, run_guard, step as step_lib, train_loop

    tmp = Path(out_path).parent
    results = {"devices": len(jax.devices())}
    config = _train_config(tmp / "cache", False)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    layouts = _layouts(config, mesh, rules)

    # 1. The restore target in the other layout (what checkpointing asks orbax for) has the shapes and the
    #    shardings the other layout's model itself uses, for the params and every optimizer moment.
    for src, dst in ((False, True), (True, False)):
        abstract = layouts[src][3]
        convert = lambda tree: layer_stacking.convert_tree(  # noqa: E731
            tree, dst, stack=layer_stacking.abstract_stack, take=layer_stacking.abstract_take)
        results[f"abstract {src}->{dst}"] = {k: _abstract_mismatches(convert(getattr(abstract, k)),
                                                                     getattr(layouts[dst][3], k))
                                             for k in ("params", "opt_state")}
    kernel = layouts[True][2].params["transformer"]["h"]["mlp"]["c_fc"]["kernel"]
    results["stacked_c_fc_spec"] = [str(a) for a in kernel.spec]

    # 2. Concrete arrays after a train step (non-zero AdamW moments), converted both ways.
    model, tx, shardings, _ = layouts[False]
    tokens = np.random.default_rng(0).integers(0, 50257, size=(1, 8, 33), dtype=np.int32)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = step_lib.init_train_state(model, tx, shardings, jax.random.key(0), 32)
        batch = jax.make_array_from_callback(tokens.shape, batch_sharding, lambda i: tokens[i])
        state, _ = step_lib.jit_train_step(model, tx, lambda s: 1e-3, shardings, batch_sharding)(
            state, batch, jax.random.key(1))
    stacked_shardings = layouts[True][2]
    stacked = {k: jax.device_put(layer_stacking.convert_tree(getattr(state, k), True), getattr(stacked_shardings, k))
               for k in ("params", "opt_state")}
    per_layer = jax.tree.map(np.asarray, {k: getattr(state, k) for k in ("params", "opt_state")})
    back = jax.tree.map(np.asarray, {k: layer_stacking.convert_tree(stacked[k], False) for k in stacked})
    results["round_trip_equal"] = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(per_layer),
                                                                          jax.tree.leaves(back)))
    results["layers_match"] = [_layers_match(per_layer[k], jax.tree.map(np.asarray, stacked[k]))
                               for k in ("params", "opt_state")]
    c_fc = stacked["params"]["transformer"]["h"]["mlp"]["c_fc"]["kernel"]
    results["c_fc_shards"] = sorted([list(s.data.shape), s.device.id] for s in c_fc.addressable_shards)

    # 3. A run checkpointed per layer resumes stacked on the same mesh: restored arrays placed as the stacked
    #    model's shardings say, then the losses of the uninterrupted run.
    reference = tmp / "reference"
    train_loop.train_and_evaluate(config, str(reference))
    resumed = tmp / "resumed"
    shutil.copytree(reference, resumed)
    shutil.move(resumed / "checkpoints" / str(STEPS), tmp / "later_checkpoint")
    saved = run_guard.flatten(json.loads((reference / "train_config.json").read_text()))
    for scan in (True, False):
        checkpointer = checkpointing.Checkpointer(str(resumed), every=2, keep=5, async_save=False,
                                                  train_config=dict(saved, **{"model.scan_layers": scan}))
        try:
            restored, data_state = checkpointer.restore_latest(layouts[scan][3])
        finally:
            checkpointer.close()
        results[f"restored scan={scan}"] = {
            "step": int(restored.step), "data_position": data_state.position,
            "placement": {k: _placement_mismatches(getattr(restored, k), getattr(layouts[scan][2], k))
                          for k in ("params", "opt_state")}}
        if scan:
            restored_stacked = jax.tree.map(np.asarray, {k: getattr(restored, k) for k in ("params", "opt_state")})
        else:
            results["restored_layers_match"] = [
                _layers_match(jax.tree.map(np.asarray, getattr(restored, k)), restored_stacked[k])
                for k in ("params", "opt_state")]
    train_loop.train_and_evaluate(_train_config(tmp / "cache", True), str(resumed))
    results["losses"] = {name: _losses(folder) for name, folder in (("reference", reference), ("resumed", resumed))}
    Path(out_path).write_text(json.dumps(results))


def _layers_match(per_layer, stacked) -> bool:
    """Every block array of layer i in the per-layer tree equals row i of the stacked tree, wherever the two
    layouts keep their blocks (params, or an AdamW moment); found by path, independently of layer_stacking."""
    import re

    import jax

    rows = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(stacked)[0]}
    compared = 0
    for path, x in jax.tree_util.tree_flatten_with_path(per_layer)[0]:
        name = jax.tree_util.keystr(path)
        match = re.search(r"\['h_(\d+)'\]", name)
        if match is None:
            if not np.array_equal(x, rows[name]):
                return False
            continue
        compared += 1
        if not np.array_equal(x, rows[name.replace(match.group(0), "['h']")][int(match.group(1))]):
            return False
    return compared > 0


def _losses(workdir):
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if line]
    return {str(r["step"]): r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def results(tmp_path_factory, shared_dir):
    out = tmp_path_factory.mktemp("layer_stacking") / "results.json"
    return run_device_worker(__file__, out, devices=2, timeout=900)


def test_restore_targets_have_the_other_layouts_shapes_and_shardings(results):
    assert results["devices"] == 2
    for direction in ("False->True", "True->False"):
        assert results[f"abstract {direction}"] == {"params": [], "opt_state": []}, direction
    assert results["stacked_c_fc_spec"] == ["None", "fsdp", "tensor"]  # [L, embed, mlp]: layers never split


def test_params_and_adam_moments_convert_with_values_and_placement(results):
    assert results["round_trip_equal"]
    assert results["layers_match"] == [True, True]
    # [L=2, D=64, 4D=256] split on D over the two devices, one half each
    assert results["c_fc_shards"] == [[[2, 32, 256], 0], [[2, 32, 256], 1]]


def test_a_per_layer_checkpoint_restores_in_either_layout_placed_by_its_shardings(results):
    for scan in (True, False):
        r = results[f"restored scan={scan}"]
        assert r["step"] == 2 and r["data_position"] > 0
        assert r["placement"] == {"params": [], "opt_state": []}, scan
    assert results["restored_layers_match"] == [True, True]


def test_a_run_resumes_stacked_with_the_uninterrupted_runs_losses(results):
    reference, resumed = results["losses"]["reference"], results["losses"]["resumed"]
    assert sorted(resumed, key=int) == [str(s) for s in range(1, STEPS + 1)]
    # to float rounding: the scanned program sums in another order (as in tests/test_scan_attention.py)
    np.testing.assert_allclose([resumed[str(s)] for s in range(1, STEPS + 1)],
                               [reference[str(s)] for s in range(1, STEPS + 1)], rtol=1e-6)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2])

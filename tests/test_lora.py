"""LoRA adapters against the real Hugging Face PEFT: both directions of the file format, logits at 1e-5,
gradients, merging, both parameter layouts, and a clear error for every adapter flax_gpt2 cannot apply."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

import flax_gpt2
from conftest import make_hf_model
from flax_gpt2 import LoRAConfig, apply_lora, init_lora, load_peft_adapter, merge_adapter, save_peft_adapter
from flax_gpt2.checkpoints.peft_adapters import base_weights_sha256
from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.lora import frozen_base_loss, logical_axes

TINY = dict(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)
TARGET_SETS = [("c_attn",), ("c_attn", "c_proj"), ("c_fc", "mlp.c_proj"), ("attn.c_proj",)]
IDS = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 11))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(HF folder, flax model, per-layer params) of a tiny GPT-2 with every parameter random."""
    _, folder = make_hf_model(tmp_path_factory, "lora_base", randomize=True, tokenizer_files=False, **TINY)
    model, params = flax_gpt2.from_pretrained(folder, progress=False)
    return folder, model, params


@pytest.fixture(scope="module")
def logits_fn(base):
    """Jitted flax logits of the base model's shape: one compilation serves every adapter (merged weights)."""
    model = base[1]
    return jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(IDS)).logits)


def _torch_base(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _randomize_b(adapters, seed, std=0.5):
    """Non-zero B (as after training), so that the adapters change the logits."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [std * jax.random.normal(k, x.shape, x.dtype) if path[-1].key == "lora_b" else x
           for k, (path, x) in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


# --- LoRAConfig ------------------------------------------------------------------------------------------

def test_config_targets_resolve_as_peft_suffix_matching():
    assert LoRAConfig(rank=4).modules == ("attn.c_attn",)
    assert LoRAConfig(rank=4).alpha == 8.0  # PEFT's default lora_alpha
    assert LoRAConfig(rank=4, targets="c_attn, c_proj").targets == ("c_attn", "c_proj")
    assert LoRAConfig(rank=4, targets="c_proj").modules == ("attn.c_proj", "mlp.c_proj")
    assert LoRAConfig(rank=4, targets=("mlp.c_proj", "c_fc")).modules == ("mlp.c_fc", "mlp.c_proj")
    assert LoRAConfig(rank=4, alpha=8, use_rslora=True).scale == 4.0
    assert LoRAConfig(rank=4, alpha=8).scale == 2.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be an integer > 0"),
    (dict(rank=-2), "rank must be an integer > 0"),
    (dict(rank=2.5), "rank must be an integer > 0"),
    (dict(rank=True), "rank must be an integer > 0"),
    (dict(rank=4, targets="c_attn,q_proj"), r"unknown LoRA target\(s\) 'q_proj'.*c_attn, attn.c_attn, c_proj"),
    (dict(rank=4, targets=""), "targets must be non-empty"),
    (dict(rank=4, targets=()), "targets must be non-empty"),
    (dict(rank=4, alpha=0), "alpha must be a finite number > 0"),
    (dict(rank=4, alpha=float("nan")), "alpha must be a finite number > 0"),
    (dict(rank=4, dropout=1.0), r"dropout must be a number in \[0, 1\)"),
    (dict(rank=4, dropout=-0.1), r"dropout must be a number in \[0, 1\)"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


# --- init, apply, merge ------------------------------------------------------------------------------------

def test_init_is_peft_init_and_step_0_is_the_base_exactly(base, logits_fn):
    _, model, params = base
    lora = LoRAConfig(rank=5, targets="c_attn,c_proj,c_fc")
    adapters = init_lora(jax.random.PRNGKey(0), params, model.config, lora)
    layer = adapters["transformer"]["h_1"]
    assert layer["attn"]["c_attn"]["lora_a"].shape == (32, 5)
    assert layer["attn"]["c_attn"]["lora_b"].shape == (5, 3, 4, 8)
    assert layer["attn"]["c_proj"]["lora_a"].shape == (4, 8, 5)
    assert layer["mlp"]["c_proj"]["lora_a"].shape == (128, 5)
    # kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)); B zero.
    a = np.asarray(layer["mlp"]["c_proj"]["lora_a"])
    assert np.abs(a).max() <= 1 / math.sqrt(128) and np.abs(a).max() > 0.8 / math.sqrt(128)
    assert all(not np.any(np.asarray(x["lora_b"])) for x in (layer["attn"]["c_attn"], layer["mlp"]["c_fc"]))
    np.testing.assert_array_equal(logits_fn(apply_lora(params, adapters, lora)), logits_fn(params))


def test_scanned_layout_equals_per_layer(base, logits_fn):
    folder, model, params = base
    scan_model, scan_params = flax_gpt2.from_pretrained(folder, progress=False, scan_layers=True)
    lora = LoRAConfig(rank=3, targets="c_attn,c_proj,c_fc", alpha=6)
    per_layer = init_lora(jax.random.PRNGKey(1), params, model.config, lora)
    stacked = init_lora(jax.random.PRNGKey(1), scan_params, scan_model.config, lora)
    jax.tree.map(np.testing.assert_array_equal, stacked, layer_stacking.to_layout(per_layer, True))
    per_layer = _randomize_b(per_layer, 2)
    stacked = layer_stacking.to_layout(per_layer, True)
    scan_logits = scan_model.apply({"params": apply_lora(scan_params, stacked, lora)}, jnp.asarray(IDS)).logits
    np.testing.assert_allclose(scan_logits, logits_fn(apply_lora(params, per_layer, lora)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="different layouts"):
        apply_lora(scan_params, per_layer, lora)
    with pytest.raises(ValueError, match="scan_layers=False"):
        init_lora(jax.random.PRNGKey(0), scan_params, model.config, lora)


def test_logical_axes_name_every_adapter_axis_like_its_kernel(base):
    folder, model, params = base
    lora = LoRAConfig(rank=2, targets="c_attn,c_proj,c_fc")
    scan_model, scan_params = flax_gpt2.from_pretrained(folder, progress=False, scan_layers=True)
    for p, config in ((params, model.config), (scan_params, scan_model.config)):
        adapters = init_lora(jax.random.PRNGKey(0), p, config, lora)
        axes = logical_axes(adapters)
        for x, spec in zip(jax.tree.leaves(adapters), jax.tree.leaves(axes)):
            assert len(spec) == x.ndim
    assert axes["transformer"]["h"]["attn"]["c_attn"]["lora_b"] == P("layers", None, None, "heads", "kv")
    assert axes["transformer"]["h"]["attn"]["c_proj"]["lora_a"] == P("layers", "heads", "kv", None)
    assert axes["transformer"]["h"]["mlp"]["c_fc"]["lora_b"] == P("layers", None, "mlp")


def test_merge_adapter_writes_a_model_transformers_loads_with_the_adapters_logits(base, logits_fn, tmp_path):
    folder, model, params = base
    lora = LoRAConfig(rank=3, alpha=5, targets="c_attn,c_proj,c_fc")
    adapters = _randomize_b(init_lora(jax.random.PRNGKey(3), params, model.config, lora), 3)
    merged = merge_adapter(params, adapters, lora)
    unmerged_logits = logits_fn(apply_lora(params, adapters, lora))
    np.testing.assert_array_equal(logits_fn(merged), unmerged_logits)
    assert np.abs(unmerged_logits - logits_fn(params)).max() > 1e-2  # the adapter does something
    flax_gpt2.save_pretrained(tmp_path / "merged", model, merged, tokenizer=False, progress=False)
    np.testing.assert_allclose(_torch_logits(_torch_base(tmp_path / "merged")), unmerged_logits, atol=1e-5, rtol=0)


def test_bfloat16_base_keeps_its_dtype_and_gets_a_rounded_float32_update(base):
    _, model, params = base
    lora = LoRAConfig(rank=2, targets="c_fc")
    adapters = _randomize_b(init_lora(jax.random.PRNGKey(4), params, model.config, lora), 4)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = jax.jit(apply_lora, static_argnames="lora")(bf16, adapters, lora=lora)  # LoRAConfig is hashable
    kernel = out["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    exact = apply_lora(params, adapters, lora)["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]
    np.testing.assert_array_equal(kernel, (bf16["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"].astype(jnp.float32)
                                           + (exact - params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"])
                                           ).astype(jnp.bfloat16))


def test_dropout_drops_whole_input_rows_of_a_in_training_only(base):
    _, model, params = base
    lora = LoRAConfig(rank=3, dropout=0.5, targets="c_fc")
    adapters = _randomize_b(init_lora(jax.random.PRNGKey(5), params, model.config, lora), 5)
    kernel = params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]
    delta = apply_lora(params, adapters, lora)["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"] - kernel
    dropped = apply_lora(params, adapters, lora, dropout_rng=jax.random.PRNGKey(0), deterministic=False)
    dropped_delta = dropped["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"] - kernel
    kept = np.abs(np.asarray(dropped_delta)).sum(axis=1) > 0  # [D]: which input features the branch sees
    assert 0 < kept.sum() < kept.size
    np.testing.assert_allclose(dropped_delta[kept], 2 * delta[kept], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        apply_lora(params, adapters, lora, deterministic=False)


# --- flax_gpt2 -> PEFT ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 3, 5])
@pytest.mark.parametrize("targets", TARGET_SETS, ids=",".join)
def test_flax_adapter_loads_in_peft_with_equal_logits(base, logits_fn, tmp_path, targets, rank):
    folder, model, params = base
    lora = LoRAConfig(rank=rank, alpha=7, dropout=0.1, targets=targets, use_rslora=rank == 5)
    adapters = _randomize_b(init_lora(jax.random.PRNGKey(rank), params, model.config, lora), rank)
    save_peft_adapter(tmp_path, adapters, lora, base_model_name_or_path=str(folder), base_params=params)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == list(targets) and config["r"] == rank
    assert config["fan_in_fan_out"] is True and config["bias"] == "none"
    reference = peft.PeftModel.from_pretrained(_torch_base(folder), tmp_path).eval()
    flax_logits = logits_fn(apply_lora(params, adapters, lora))
    np.testing.assert_allclose(_torch_logits(reference), flax_logits, atol=1e-5, rtol=0)
    assert np.abs(flax_logits - logits_fn(params)).max() > 1e-2
    # And back: the same arrays and config.
    loaded, lora_back = load_peft_adapter(tmp_path, params, model.config)
    assert lora_back == lora
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=0), loaded, adapters)


def test_peft_key_names_match_what_peft_writes(base, tmp_path):
    folder, model, params = base
    lora = LoRAConfig(rank=3, targets="c_proj")
    save_peft_adapter(tmp_path / "ours", init_lora(jax.random.PRNGKey(0), params, model.config, lora), lora,
                      base_model_name_or_path=None)
    peft_model = peft.get_peft_model(_torch_base(folder), peft.LoraConfig(r=3, target_modules=["c_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# --- PEFT -> flax_gpt2 ------------------------------------------------------------------------------------

def _peft_adapter(folder, out, seed=0, safe_serialization=True, **lora_kwargs):
    """A PEFT LoRA model on the torch base with every lora_A/lora_B redrawn, saved to `out`."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(_torch_base(folder), peft.LoraConfig(**lora_kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=safe_serialization)
    return model


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per_layer", "scanned"])
@pytest.mark.parametrize("lora_kwargs", [
    dict(r=3, lora_alpha=16, target_modules=["c_attn"]),
    dict(r=5, lora_alpha=4, target_modules=["c_proj", "c_fc"], use_rslora=True, lora_dropout=0.2),
    dict(r=1, target_modules=["attn.c_proj"]),
    dict(r=2, lora_alpha=3, target_modules=r".*\.h\.\d+\.mlp\.c_fc"),  # PEFT's regex form
], ids=["c_attn", "c_proj,c_fc+rslora", "attn.c_proj", "regex"])
def test_peft_adapter_loads_here_with_equal_logits(base, logits_fn, tmp_path, lora_kwargs, scan_layers):
    folder, model, params = base
    reference = _peft_adapter(folder, tmp_path, **lora_kwargs)
    if scan_layers:
        model, params = flax_gpt2.from_pretrained(folder, progress=False, scan_layers=True)
        logits_fn = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(IDS)).logits)
    adapters, lora = load_peft_adapter(tmp_path, params, model.config)
    assert lora.rank == lora_kwargs["r"] and lora.alpha == lora_kwargs.get("lora_alpha", 8)
    assert layer_stacking.is_stacked(adapters) == scan_layers
    np.testing.assert_allclose(logits_fn(apply_lora(params, adapters, lora)), _torch_logits(reference),
                               atol=1e-5, rtol=0)


def test_older_peft_pickle_adapter_loads_without_torch(base, logits_fn, tmp_path):
    """adapter_model.bin (PEFT's torch.save format before safetensors), read by the project's safe reader."""
    folder, model, params = base
    reference = _peft_adapter(folder, tmp_path, safe_serialization=False, r=3, target_modules=["c_fc"])
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    adapters, lora = load_peft_adapter(tmp_path, params, model.config)
    np.testing.assert_allclose(logits_fn(apply_lora(params, adapters, lora)), _torch_logits(reference),
                               atol=1e-5, rtol=0)


def test_adapter_gradients_equal_peft_and_optimizer_state_holds_only_adapters(base, tmp_path):
    folder, model, params = base
    reference = _peft_adapter(folder, tmp_path, r=3, lora_alpha=6, target_modules=["c_attn", "mlp.c_proj"])
    adapters, lora = load_peft_adapter(tmp_path, params, model.config)
    ids = jnp.asarray(IDS)

    def loss(p, ids):
        logits = model.apply({"params": p}, ids).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    adapted_loss = jax.jit(frozen_base_loss(loss, lora))
    value, grads = jax.value_and_grad(adapted_loss)(adapters, params, ids)
    reference.zero_grad()
    torch_loss = reference(torch.tensor(IDS), labels=torch.tensor(IDS)).loss
    torch_loss.backward()
    np.testing.assert_allclose(value, torch_loss.item(), rtol=1e-6)
    torch_grads = {n: p.grad.numpy() for n, p in reference.named_parameters() if "lora_" in n}
    assert len(torch_grads) == 2 * 2 * 2
    for (i, block, name) in [(0, "attn", "c_attn"), (1, "mlp", "c_proj")]:
        g = grads["transformer"][f"h_{i}"][block][name]
        prefix = f"base_model.model.transformer.h.{i}.{block}.{name}"
        np.testing.assert_allclose(g["lora_a"].reshape(-1, 3).T, torch_grads[f"{prefix}.lora_A.default.weight"],
                                   rtol=1e-4, atol=1e-6)  # grads ~0.3: float32 rounding
        np.testing.assert_allclose(g["lora_b"].reshape(3, -1).T, torch_grads[f"{prefix}.lora_B.default.weight"],
                                   rtol=1e-4, atol=1e-6)  # grads ~0.3: float32 rounding
    # The base gets no gradient even when differentiating with respect to it.
    base_grads = jax.grad(adapted_loss, argnums=1)(adapters, params, ids)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(base_grads))

    optimizer = optax.adamw(1e-2)
    state = optimizer.init(adapters)
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(adapters))
    array_leaves = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
    assert sorted(x.shape for x in array_leaves) == sorted(adapter_shapes * 2)  # mu and nu, nothing of the base
    updates, state = optimizer.update(grads, state, adapters)
    assert adapted_loss(optax.apply_updates(adapters, updates), params, ids) < value


# --- bad adapters -----------------------------------------------------------------------------------------

def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_bad_adapter_folders_are_named_errors(base, tmp_path, tmp_path_factory):
    folder, model, params = base
    load = lambda d, **kw: load_peft_adapter(d, params, model.config, **kw)  # noqa: E731
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder: it has no adapter_config.json"):
        load(tmp_path / "empty")

    good = tmp_path / "good"
    _peft_adapter(folder, good, r=3, target_modules=["c_attn"])

    def variant(name, **changes):
        d = tmp_path / name
        shutil.copytree(good, d)
        _edit_config(d, **changes)
        return d

    no_weights = variant("no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter weights"):
        load(no_weights)
    cases = [
        (variant("rank0", r=0), r"r=0; a LoRA adapter needs an integer rank r > 0"),
        (variant("unknown_target", target_modules=["c_attn", "q_proj"]), r"unknown LoRA target\(s\) 'q_proj'"),
        (variant("rank_mismatch", r=4), r"lora_A.weight has shape \[3, 32\], but r=4 on this base .* needs \[4, 32\]"),
        (variant("more_targets", target_modules=["c_attn", "c_fc"]),
         "lora_A/lora_B weights are missing for h.0.mlp.c_fc"),
        (variant("fewer_targets", target_modules=["c_fc"]), "adapts h.0.attn.c_attn, .* which target_modules"),
        (variant("pattern", rank_pattern={"c_attn": 2}), "rank_pattern=.* is not supported"),
        (variant("layers", layers_to_transform=[0]), "layers_to_transform=.* adapts only some layers"),
        (variant("pissa", init_lora_weights="pissa"), "rewrites the base weights"),
        (variant("bad_regex", target_modules=r".*\.h\.0\.attn\.c_attn"), "different modules in different layers"),
    ]
    for d, match in cases:
        with pytest.raises(ValueError, match=match):
            load(d)

    # Adapters PEFT itself writes for what flax_gpt2 does not apply.
    ia3 = tmp_path / "ia3"
    peft.get_peft_model(_torch_base(folder), peft.IA3Config(target_modules=["c_attn"], feedforward_modules=[])
                        ).save_pretrained(ia3)
    with pytest.raises(ValueError, match="peft_type is 'IA3'; flax_gpt2 loads only LoRA"):
        load(ia3)
    dora = tmp_path / "dora"
    _peft_adapter(folder, dora, r=2, target_modules=["c_attn"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load(dora)
    bias = tmp_path / "bias"
    _peft_adapter(folder, bias, r=2, target_modules=["c_attn"], bias="all")
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        load(bias)

    # An adapter for another base: wider (shapes), deeper (layers), or the same shapes with other weights (hash).
    _, wide_folder = make_hf_model(tmp_path_factory, "lora_wide", tokenizer_files=False, **{**TINY, "n_embd": 64})
    wide = tmp_path / "wide"
    _peft_adapter(wide_folder, wide, r=2, target_modules=["c_attn"])
    with pytest.raises(ValueError, match=r"shape \[2, 64\], but r=2 on this base \(n_embd=32\) needs \[2, 32\]"):
        load(wide)
    _, deep_folder = make_hf_model(tmp_path_factory, "lora_deep", tokenizer_files=False, **{**TINY, "n_layer": 3})
    deep = tmp_path / "deep"
    _peft_adapter(deep_folder, deep, r=2, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="weights for layer 2, but this base has 2 layers"):
        load(deep)
    _, other_folder = make_hf_model(tmp_path_factory, "lora_other", seed=7, randomize=True, tokenizer_files=False,
                                    **TINY)
    _, other_params = flax_gpt2.from_pretrained(other_folder, progress=False)
    lora = LoRAConfig(rank=2)
    hashed = tmp_path / "hashed"
    save_peft_adapter(hashed, init_lora(jax.random.PRNGKey(0), other_params, model.config, lora), lora,
                      base_model_name_or_path="other-base", base_params=other_params)
    with pytest.raises(ValueError, match="saved for other base weights .*'other-base'"):
        load(hashed)
    assert load(hashed, check_base=False)[1] == lora

    # A key that is not LoRA of a GPT-2 module.
    unknown = variant("unknown_key")
    tensors = load_file(unknown / "adapter_model.safetensors")
    tensors["base_model.model.transformer.h.0.attn.q_proj.lora_A.weight"] = np.zeros((3, 32), np.float32)
    save_file(tensors, unknown / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="not LoRA weights of GPT-2's modules .*h.0.attn.q_proj.lora_A.weight"):
        load(unknown)


def test_base_hash_ignores_layout_class_and_bfloat16_storage(base):
    folder, model, params = base
    _, scan_params = flax_gpt2.from_pretrained(folder, progress=False, scan_layers=True)
    _, bf16_params = flax_gpt2.from_pretrained(folder, progress=False, param_dtype=jnp.bfloat16)
    _, bare = flax_gpt2.from_pretrained(folder, progress=False, model_class="GPT2Model")
    digest = base_weights_sha256(params)
    assert digest == base_weights_sha256(scan_params) == base_weights_sha256(bf16_params) == base_weights_sha256(bare)
    changed = jax.tree.map(lambda x: x, params)
    changed["transformer"]["ln_f"]["bias"] = changed["transformer"]["ln_f"]["bias"] + 1
    assert base_weights_sha256(changed) != digest

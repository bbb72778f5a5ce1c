"""Weights in and out: the rename table, every checkpoint format, round trips, the converter, bad inputs."""

import json
import logging
import os
import pickle
import shutil
import sys
import zipfile

import flax.linen
import flax.serialization
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import flax_gpt2
from conftest import make_hf_model
from flax_gpt2.checkpoints import formats as checkpoint_files, hf_state_dict as weights
from flax_gpt2 import convert
from flax_gpt2.checkpoints.pretrained import from_pretrained, save_pretrained



@pytest.fixture(autouse=True, scope="module")
def _torch_no_grad():
    """The reference model only runs forward here; scoped to this module so training tests keep autograd."""
    with torch.no_grad():
        yield


def _flat(params):
    return {k: np.asarray(v) for k, v in weights.flatten(params).items()}


def _assert_bitwise(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k


def _hf_folder_copy(src, dst):
    """A new folder `dst` holding only src's config.json (the caller adds weights)."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    return dst


@pytest.fixture(scope="module")
def hf_untied(tmp_path_factory):
    return make_hf_model(tmp_path_factory, "untied", seed=11, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_double(tmp_path_factory):
    return make_hf_model(tmp_path_factory, "double", "GPT2DoubleHeadsModel", seed=12)


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    return make_hf_model(tmp_path_factory, "base", "GPT2Model", seed=13)


# --- the rename table ------------------------------------------------------------------------------------

@pytest.mark.parametrize("which,model_class", [
    ("hf_tiny", flax_gpt2.GPT2LMHeadModel), ("hf_untied", flax_gpt2.GPT2LMHeadModel),
    ("hf_double", flax_gpt2.GPT2DoubleHeadsModel), ("hf_base", flax_gpt2.GPT2Model)])
def test_hf_to_flax_to_hf_is_bitwise_identical(request, which, model_class):
    """Every tensor transformers saved comes back bit for bit, under the same key."""
    _, folder = request.getfixturevalue(which)
    saved = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
    config = flax_gpt2.GPT2Config.from_hf_config(folder)
    params = weights.params_from_hf_state_dict(saved, config, model_class)
    _assert_bitwise(saved, weights.hf_state_dict_from_params(params, config, model_class))
    # The table's shapes are the shapes model.init makes.
    abstract = jax.eval_shape(model_class(config).init, jax.random.PRNGKey(0),
                              jnp.zeros((1, 2, 4) if model_class is flax_gpt2.GPT2DoubleHeadsModel else (1, 4),
                                        jnp.int32))
    init_shapes = {k: v.shape for k, v in weights.flatten(flax.linen.unbox(abstract["params"])).items()}
    assert init_shapes == {k: v.shape for k, v in _flat(params).items()}


def test_every_tensor_lands_where_transformers_uses_it(hf_tiny_random):
    """A round trip cannot see two table rows swapped (the swap undoes itself); logits and every gradient of a
    checkpoint whose every tensor is random (biases and LayerNorm affine included) can: each HF tensor must
    play in our model the role it plays in transformers."""
    hf, folder = hf_tiny_random
    model, params = from_pretrained(folder, progress=False)
    config = model.config
    ids = np.random.default_rng(5).integers(0, 50257, (2, 11))

    def loss(p):
        logits = model.apply({"params": p}, jnp.asarray(ids)).logits
        nll = jax.nn.logsumexp(logits[:, :-1], -1) - jnp.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0]
        return jnp.mean(nll), logits

    (ours, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    with torch.enable_grad():
        hf.zero_grad()
        out = hf(torch.as_tensor(ids), labels=torch.as_tensor(ids))
        out.loss.backward()
    np.testing.assert_allclose(np.asarray(logits), out.logits.detach().numpy(), atol=1e-5, rtol=0)
    assert float(ours) == pytest.approx(out.loss.item(), abs=1e-5)
    # Our gradients, written out through the rename table, are transformers' gradients under the same keys.
    ours_by_key = weights.hf_state_dict_from_params(grads, config)
    theirs = {k: p.grad.numpy() for k, p in hf.named_parameters()}
    assert sorted(ours_by_key) == sorted(theirs)
    for key, grad in theirs.items():
        np.testing.assert_allclose(ours_by_key[key], grad, atol=2e-5, rtol=1e-4, err_msg=key)
    hf.zero_grad()


def test_save_pretrained_writes_what_transformers_writes(hf_double, tmp_path, bpe_dir):
    """HF folder -> from_pretrained -> save_pretrained: same tensors bitwise, same config, generation config."""
    _, folder = hf_double
    model, params = from_pretrained(folder, model_class=flax_gpt2.GPT2DoubleHeadsModel, progress=False)
    save_pretrained(tmp_path, model, params, tokenizer=bpe_dir, progress=False)
    _assert_bitwise(safetensors.numpy.load_file(folder / "model.safetensors"),
                    safetensors.numpy.load_file(tmp_path / "model.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "merges.txt",
                                            "model.safetensors", "vocab.json"]
    ours = json.loads((tmp_path / "config.json").read_text())
    theirs = json.loads((folder / "config.json").read_text())
    for key, value in theirs.items():
        if key not in ("transformers_version", "pad_token_id", "add_cross_attention", "id2label", "label2id"):
            assert ours[key] == value, key
    assert ours["architectures"] == ["GPT2DoubleHeadsModel"]
    gen = transformers.GenerationConfig.from_pretrained(tmp_path)
    ref = transformers.GenerationConfig.from_pretrained(folder)
    assert (gen.bos_token_id, gen.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (50256, 50256)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)("Hello world")["input_ids"] == [15496, 995]
    # tokenizer= took OpenAI's encoder.json + vocab.bpe and wrote the same bytes under Hugging Face's names.
    assert (tmp_path / "vocab.json").read_bytes() == (bpe_dir / "encoder.json").read_bytes()
    assert (tmp_path / "merges.txt").read_bytes() == (bpe_dir / "vocab.bpe").read_bytes()


def test_loaded_params_are_jax_arrays_in_param_dtype(hf_tiny):
    _, folder = hf_tiny
    model, params = from_pretrained(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, progress=False)
    assert model.config.dtype == jnp.bfloat16 and model.config.param_dtype == jnp.bfloat16
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.bfloat16 for x in leaves)
    saved = safetensors.numpy.load_file(folder / "model.safetensors")
    wte = np.asarray(params["transformer"]["wte"]["embedding"])
    assert np.array_equal(wte, saved["transformer.wte.weight"].astype(ml_dtypes.bfloat16))


def test_save_pretrained_dtype(hf_tiny, tmp_path):
    _, folder = hf_tiny
    model, params = from_pretrained(folder, param_dtype=jnp.bfloat16, progress=False)
    save_pretrained(tmp_path / "f32", model, params, tokenizer=False, progress=False)
    assert {v.dtype for v in safetensors.numpy.load_file(tmp_path / "f32" / "model.safetensors").values()} == {
        np.dtype(np.float32)}
    save_pretrained(tmp_path / "bf16", model, params, tokenizer=False, dtype=jnp.bfloat16, progress=False)
    saved = safetensors.numpy.load_file(tmp_path / "bf16" / "model.safetensors")
    assert {v.dtype for v in saved.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "bf16")
    assert hf.transformer.wte.weight.dtype == torch.bfloat16


# --- checkpoint formats ----------------------------------------------------------------------------------

def test_sharded_safetensors(hf_tiny, tmp_path):
    hf, folder = hf_tiny
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="1MB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    _, single = from_pretrained(folder, progress=False)
    model, sharded = from_pretrained(tmp_path / "hf_sharded", progress=False)
    _assert_bitwise(_flat(single), _flat(sharded))

    save_pretrained(tmp_path / "ours", model, sharded, tokenizer=False, max_shard_size="1MB", progress=False)
    names = sorted(os.listdir(tmp_path / "ours"))
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert len([n for n in names if n.startswith("model-")]) > 1
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").state_dict()
    for key, value in hf.state_dict().items():
        assert torch.equal(reloaded[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pytorch_bin_equals_safetensors(hf_tiny, tmp_path, dtype):
    """torch.save'd state dict (shared tied storage included) loads like the same weights in safetensors."""
    hf, folder = hf_tiny
    state = {k: v.to(dtype) for k, v in hf.state_dict().items()}
    state["transformer.wte.weight"] = hf.state_dict()["transformer.wte.weight"].to(dtype)
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: one storage, two keys
    bin_folder = _hf_folder_copy(folder, tmp_path / "bin")
    torch.save(state, bin_folder / "pytorch_model.bin")
    st_folder = _hf_folder_copy(folder, tmp_path / "st")
    import safetensors.torch
    safetensors.torch.save_file({k: v for k, v in state.items() if k != "lm_head.weight"},
                                st_folder / "model.safetensors", metadata={"format": "pt"})
    _, from_bin = from_pretrained(bin_folder, progress=False)
    _, from_st = from_pretrained(st_folder, progress=False)
    _assert_bitwise(_flat(from_bin), _flat(from_st))
    expected = state["transformer.h.1.mlp.c_fc.weight"].float().numpy()
    assert np.array_equal(np.asarray(from_bin["transformer"]["h_1"]["mlp"]["c_fc"]["kernel"]), expected)


def test_pytorch_bin_strided_offset_and_shared_storages(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {"plain": base, "transposed": base.t(), "offset": base[2:, 3:7], "strided": base[::2, ::3],
             "half_view": base.half()[1:3], "bf16": base.bfloat16().t()[1:4], "ints": torch.arange(5),
             "param": torch.nn.Parameter(torch.ones(3)), "scalar": torch.tensor(2.5)}
    torch.save(state, tmp_path / "x.bin")
    got = checkpoint_files.read_torch_bin(str(tmp_path / "x.bin"), progress=False)
    assert sorted(got) == sorted(state)
    for key, value in state.items():
        value = value.detach()
        ref = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
        assert got[key].shape == ref.shape, key
        assert np.array_equal(got[key].astype(ref.dtype), ref), key
    assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["half_view"].dtype == np.float16


def _zip_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


def test_pytorch_bin_with_malicious_global_is_rejected(tmp_path):
    marker = tmp_path / "pwned"
    # GLOBAL os.system, called with a shell command by REDUCE: what a malicious checkpoint looks like.
    payload = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    _zip_pickle(tmp_path / "pytorch_model.bin", payload)
    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        checkpoint_files.read_torch_bin(str(tmp_path / "pytorch_model.bin"), progress=False)
    assert not marker.exists()

    # The same through from_pretrained, with a builtins global hidden inside an otherwise valid state dict.
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(flax_gpt2.GPT2Config.from_preset("tiny").to_hf_config()))
    _zip_pickle(folder / "pytorch_model.bin", b"\x80\x02ccollections\nOrderedDict\n)R(Vx\ncbuiltins\neval\n"
                b"(Vprint(1)\ntRu.")
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        from_pretrained(folder, progress=False)


def test_pytorch_bin_out_of_bounds_tensor_is_rejected(tmp_path):
    torch.save({"a": torch.zeros(4)}, tmp_path / "ok.bin")
    with zipfile.ZipFile(tmp_path / "ok.bin") as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    root = next(n for n in entries if n.endswith("/data.pkl"))[: -len("data.pkl")]
    # Claim a [100] tensor over the 4-element storage: must not read past the buffer.
    entries[root + "data.pkl"] = entries[root + "data.pkl"].replace(b"K\x04\x85", b"Kd\x85", 1)
    with zipfile.ZipFile(tmp_path / "bad.bin", "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    with pytest.raises(pickle.UnpicklingError, match="overruns its storage"):
        checkpoint_files.read_torch_bin(str(tmp_path / "bad.bin"), progress=False)


def test_legacy_pytorch_bin_format_is_a_clear_error(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"legacy pickle .*Re-save it in the zip format"):
        checkpoint_files.read_torch_bin(str(tmp_path / "pytorch_model.bin"), progress=False)


def _hf_flax_layout(state: dict, with_prefix: bool) -> dict:
    """transformers' (<= 4.x) FlaxGPT2LMHeadModel params, built by hand from a PyTorch state dict.

    FlaxConv1D's kernel is [out, in] (it computes x @ kernel.T), the transpose of PyTorch Conv1D's
    [in, out] weight; nn.Dense (lm_head) has kernel [in, out], the transpose of nn.Linear's weight.
    """
    sd = {k.removeprefix("transformer."): v.numpy() for k, v in state.items()}
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("h."))
    ln = lambda p: {"scale": sd[p + ".weight"], "bias": sd[p + ".bias"]}  # noqa: E731
    conv = lambda p: {"kernel": sd[p + ".weight"].T, "bias": sd[p + ".bias"]}  # noqa: E731
    h = {str(i): {"ln_1": ln(f"h.{i}.ln_1"), "ln_2": ln(f"h.{i}.ln_2"),
                  "attn": {"c_attn": conv(f"h.{i}.attn.c_attn"), "c_proj": conv(f"h.{i}.attn.c_proj")},
                  "mlp": {"c_fc": conv(f"h.{i}.mlp.c_fc"), "c_proj": conv(f"h.{i}.mlp.c_proj")}}
         for i in range(n_layer)}
    transformer = {"wte": {"embedding": sd["wte.weight"]}, "wpe": {"embedding": sd["wpe.weight"]}, "h": h,
                   "ln_f": ln("ln_f")}
    if not with_prefix:
        return transformer
    tree = {"transformer": transformer}
    if "lm_head.weight" in sd:
        tree["lm_head"] = {"kernel": sd["lm_head.weight"].T}
    return tree


@pytest.mark.parametrize("which,with_prefix", [("hf_tiny", True), ("hf_untied", True), ("hf_tiny", False)])
def test_flax_msgpack_layout(request, tmp_path, which, with_prefix):
    hf, folder = request.getfixturevalue(which)
    state = {k: v for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        del state["lm_head.weight"]
    msgpack_folder = _hf_folder_copy(folder, tmp_path / "flax")
    (msgpack_folder / "flax_model.msgpack").write_bytes(
        flax.serialization.msgpack_serialize(_hf_flax_layout(state, with_prefix)))
    model, params = from_pretrained(msgpack_folder, progress=False)
    _, reference = from_pretrained(folder, progress=False)
    _assert_bitwise(_flat(reference), _flat(params))
    ids = np.random.default_rng(0).integers(0, 50257, (1, 6))
    ref = hf(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model.apply({"params": params}, jnp.asarray(ids)).logits) - ref).max() <= 1e-5


def test_safetensors_preferred_over_other_formats(hf_tiny, tmp_path):
    _, folder = hf_tiny
    both = tmp_path / "both"
    shutil.copytree(folder, both)
    (both / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    (both / "flax_model.msgpack").write_bytes(b"not a checkpoint")
    assert checkpoint_files.find_weights(both).endswith("model.safetensors")
    from_pretrained(both, progress=False)


# --- heads and buffers -----------------------------------------------------------------------------------

def test_lm_checkpoint_into_double_heads_warns_and_initializes_head(hf_tiny):
    hf, folder = hf_tiny
    with pytest.warns(UserWarning, match=r"multiple_choice_head\.summary\.bias.*multiple_choice_head\.summary\.weight"):
        model, params = from_pretrained(folder, model_class=flax_gpt2.GPT2DoubleHeadsModel, progress=False)
    kernel = np.asarray(params["multiple_choice_head"]["summary"]["kernel"])
    assert kernel.shape == (64, 1) and 0 < kernel.std() < 0.1
    ids = np.random.default_rng(1).integers(0, 50257, (1, 2, 5))
    out = model.apply({"params": params}, jnp.asarray(ids))
    ref = hf(torch.as_tensor(ids[0])).logits.numpy()
    assert np.abs(np.asarray(out.logits[0]) - ref).max() <= 1e-5


def test_double_heads_checkpoint_into_lm_drops_head_with_note(hf_double, caplog):
    _, folder = hf_double
    with caplog.at_level(logging.INFO, logger="flax_gpt2.checkpoints.hf_state_dict"):
        _, params = from_pretrained(folder, progress=False)
    assert "multiple_choice_head" not in params
    assert "multiple_choice_head.summary.weight" in caplog.text


def test_base_model_checkpoint_into_lm_and_back(hf_base, hf_tiny):
    hf, folder = hf_base
    model, params = from_pretrained(folder, progress=False)  # keys without the "transformer." prefix
    ids = np.random.default_rng(2).integers(0, 50257, (1, 5))
    logits = model.apply({"params": params}, jnp.asarray(ids)).logits
    hidden = hf(torch.as_tensor(ids)).last_hidden_state
    ref = hidden.numpy() @ hf.wte.weight.numpy().T
    assert np.abs(np.asarray(logits) - ref).max() <= 1e-5
    _, base = from_pretrained(hf_tiny[1], model_class=flax_gpt2.GPT2Model, progress=False)
    assert "wte" in base and "transformer" not in base


def test_ignores_causal_mask_buffers(hf_tiny):
    hf, folder = hf_tiny
    state = safetensors.numpy.load_file(folder / "model.safetensors")
    config = flax_gpt2.GPT2Config.from_hf_config(folder)
    plain = weights.params_from_hf_state_dict(state, config)
    state["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), bool))
    state["transformer.h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied copy some checkpoints keep
    _assert_bitwise(_flat(plain), _flat(weights.params_from_hf_state_dict(state, config)))


# --- bad inputs ------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_state(hf_tiny):
    _, folder = hf_tiny
    return safetensors.numpy.load_file(folder / "model.safetensors"), flax_gpt2.GPT2Config.from_hf_config(folder)


def test_missing_key_is_named(tiny_state):
    state, config = tiny_state
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing checkpoint tensors: h\.1\.mlp\.c_fc\.bias \[256\]"):
        weights.params_from_hf_state_dict(state, config)


def test_unexpected_key_is_named(tiny_state):
    state, config = tiny_state
    state["transformer.h.0.attn.q_attn.weight"] = np.zeros((64, 64), np.float32)
    state["transformer.h.2.ln_1.weight"] = np.zeros(64, np.float32)  # a layer the config does not have
    with pytest.raises(ValueError, match=r"unexpected checkpoint tensors: h\.0\.attn\.q_attn\.weight \[64, 64\], "
                                         r"h\.2\.ln_1\.weight"):
        weights.params_from_hf_state_dict(state, config)


def test_misshapen_key_is_named(tiny_state):
    state, config = tiny_state
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"].T
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.weight has shape \[192, 64\], expected \[64, 192\]"):
        weights.params_from_hf_state_dict(state, config)
    with pytest.raises(ValueError, match=r"wte\.weight has shape \[50257, 64\], expected \[50000, 64\]"):
        weights.params_from_hf_state_dict(state, config.replace(vocab_size=50000))


def test_untied_config_needs_lm_head(tiny_state):
    state, config = tiny_state
    with pytest.raises(ValueError, match=r"missing checkpoint tensors: lm_head\.weight \[50257, 64\]"):
        weights.params_from_hf_state_dict(state, config.replace(tie_word_embeddings=False))


def test_params_that_do_not_fit_are_named(hf_tiny):
    _, folder = hf_tiny
    model, params = from_pretrained(folder, progress=False)
    params = jax.tree.map(lambda x: x, params)
    del params["transformer"]["h_1"]["ln_2"]["bias"]
    params["transformer"]["h_0"]["attn"]["c_proj"]["kernel"] = jnp.zeros((64, 64))
    with pytest.raises(ValueError, match=r"missing parameters: transformer/h_1/ln_2/bias \[64\]\n.*"
                                         r"transformer/h_0/attn/c_proj/kernel has shape \[64, 64\], "
                                         r"expected \[4, 16, 64\]"):
        weights.hf_state_dict_from_params(params, model.config)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(flax_gpt2.GPT2Config.from_preset("tiny").to_hf_config()))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"no GPT-2 weights in .*model\.safetensors.*notes\.txt"):
        from_pretrained(tmp_path, progress=False)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_pretrained(tmp_path, progress=False)


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        from_pretrained(tmp_path / "does" / "not" / "exist", progress=False)


def test_hub_id_without_network_says_how_to_use_a_folder():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(OSError, match=r"cannot be reached.*hf download .*from_pretrained\('DIR'\)"):
        from_pretrained("flax-gpt2-tests/no-such-model", progress=False)


def test_hub_download_fetches_one_weights_format(hf_tiny, monkeypatch):
    """With the hub reachable (mocked), only config, tokenizer and the preferred weights are fetched."""
    import huggingface_hub

    _, folder = hf_tiny
    calls = []
    listing = ["config.json", "vocab.json", "merges.txt", "tokenizer.json", "README.md", "tf_model.h5",
               "flax_model.msgpack", "pytorch_model.bin", "model.safetensors", "onnx/decoder_model.onnx"]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: listing)
    from flax_gpt2.utils import hub

    monkeypatch.setattr(hub, "hub_unreachable", lambda: "")  # HF_HUB_OFFLINE and the probe say "reachable"

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    from_pretrained("openai-community/gpt2", revision="v1", progress=False)
    assert calls == [("openai-community/gpt2", dict(revision="v1", allow_patterns=[
        "config.json", "vocab.json", "merges.txt", "tokenizer.json", "model.safetensors"]))]

    calls.clear()
    listing[:] = ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                  "pytorch_model-00002-of-00002.bin", "flax_model.msgpack"]
    from_pretrained("gpt2-xl", progress=False)
    assert calls[0][1]["allow_patterns"] == ["config.json", "pytorch_model.bin.index.json",
                                             "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]


def test_hub_unreachable_uses_the_hub_cache(hf_tiny, monkeypatch):
    import huggingface_hub

    _, folder = hf_tiny

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    def cached(repo_id, **kwargs):
        assert kwargs["local_files_only"]
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    model, _ = from_pretrained("gpt2", progress=False)
    assert model.config.n_embd == 64


def test_save_pretrained_never_overwrites_user_files(hf_tiny, tmp_path):
    _, folder = hf_tiny
    model, params = from_pretrained(folder, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not empty \(holds notes\.txt\); pass overwrite=True"):
        save_pretrained(out, model, params, tokenizer=False, progress=False)
    assert os.listdir(out) == ["notes.txt"]
    # With overwrite=True, stale shards go, the user's file stays.
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (out / "model.safetensors.index.json").write_text("{}")
    save_pretrained(out, model, params, tokenizer=False, overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


# --- the converter ---------------------------------------------------------------------------------------

def test_convert_cli(hf_untied, tmp_path, bpe_dir, capsys):
    hf, folder = hf_untied
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    torch.save(hf.state_dict(), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()  # convert from the pickle format
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_dir / {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}[name], src / name)

    assert convert.main(["--model", str(src), "--out", str(tmp_path / "fast"), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert {"model.safetensors", "config.json", "vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "fast"))
    _, reference = from_pretrained(folder, progress=False)
    _, fast = from_pretrained(tmp_path / "fast", progress=False)
    _assert_bitwise(_flat(reference), _flat(fast))

    assert convert.main(["--model", str(tmp_path / "fast"), "--out", str(tmp_path / "hf"), "--format", "safetensors",
                         "--dtype", "bfloat16", "--no-progress"]) == 0
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert reloaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(reloaded.lm_head.weight, hf.lm_head.weight.bfloat16())

    capsys.readouterr()
    # A second run into the same folder is a usage error that names the flag.
    code = convert.main(["--model", str(tmp_path / "fast"), "--out", str(tmp_path / "hf"), "--no-progress"])
    assert code == 2
    assert "pass --overwrite" in capsys.readouterr().err
    code = convert.main(["--model", str(tmp_path / "fast"), "--out", str(tmp_path / "x"), "--format", "onnx"])
    assert code == 2 and "--format" in capsys.readouterr().err


@pytest.mark.parametrize("which,model_class,with_prefix", [
    ("hf_tiny", "GPT2LMHeadModel", True), ("hf_untied", "GPT2LMHeadModel", True), ("hf_base", "GPT2Model", False)])
def test_convert_to_flax_msgpack(request, tmp_path, which, model_class, with_prefix):
    """`--format msgpack` writes transformers' Flax layout exactly (the tree `_hf_flax_layout` builds by hand,
    bit for bit), and from_pretrained reads it back to the same logits."""
    hf, folder = request.getfixturevalue(which)
    out = tmp_path / "flax"
    assert convert.main(["--model", str(folder), "--out", str(out), "--format", "msgpack", "--no_progress"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "flax_model.msgpack", "generation_config.json", "merges.txt",
                                       "vocab.json"]
    assert json.loads((out / "config.json").read_text())["architectures"] == [model_class]
    state = dict(hf.state_dict())
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    written = flax.serialization.msgpack_restore((out / "flax_model.msgpack").read_bytes())
    expected = {k: np.ascontiguousarray(v) for k, v in weights.flatten(_hf_flax_layout(state, with_prefix)).items()}
    _assert_bitwise(expected, weights.flatten(written))

    model, params = from_pretrained(out, model_class=model_class, progress=False)
    _, reference = from_pretrained(folder, model_class=model_class, progress=False)
    _assert_bitwise(_flat(reference), _flat(params))
    ids = np.random.default_rng(0).integers(0, 50257, (1, 6))
    ours = model.apply({"params": params}, jnp.asarray(ids))
    ref = hf(torch.as_tensor(ids))
    if model_class == "GPT2Model":
        assert np.abs(np.asarray(ours.last_hidden_state) - ref.last_hidden_state.numpy()).max() <= 1e-5
    else:
        assert np.abs(np.asarray(ours.logits) - ref.logits.numpy()).max() <= 1e-5


def test_convert_to_msgpack_replaces_weights_that_would_shadow_it(hf_tiny, tmp_path):
    """find_weights prefers safetensors and .bin to msgpack: after an --overwrite msgpack save they must go."""
    _, folder = hf_tiny
    out = tmp_path / "out"
    convert.convert(str(folder), str(out), progress=False)
    (out / "pytorch_model.bin").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    convert.convert(str(folder), str(out), format="msgpack", dtype="bfloat16", overwrite=True, progress=False)
    assert checkpoint_files.find_weights(out).endswith("flax_model.msgpack")
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(out))
    assert (out / "notes.txt").read_text() == "mine"
    _, params = from_pretrained(out, param_dtype=jnp.bfloat16, progress=False)
    _, reference = from_pretrained(folder, param_dtype=jnp.bfloat16, progress=False)
    _assert_bitwise(_flat(reference), _flat(params))


def test_convert_double_heads_to_msgpack_is_refused(hf_double, tmp_path, capsys):
    _, folder = hf_double
    code = convert.main(["--model", str(folder), "--out", str(tmp_path / "o"), "--format", "msgpack"])
    err = capsys.readouterr().err
    assert code == 1 and "no double-heads model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.filterwarnings("ignore:the GPT-2 tokenizer could not be loaded")  # offline, no tiktoken cache
def test_training_run_folder(tmp_path, bpe_dir):
    from conftest import write_run_checkpoint

    config = flax_gpt2.GPT2Config.from_preset("tiny", n_layer=1, vocab_size=50257)
    model = flax_gpt2.GPT2LMHeadModel(config)
    params = flax_gpt2.init_params(model, jax.random.PRNGKey(3))
    write_run_checkpoint(tmp_path / "run", 5, config, params)

    _, loaded = from_pretrained(tmp_path / "run", progress=False)
    _assert_bitwise(_flat(params), _flat(loaded))
    convert.convert(str(tmp_path / "run"), str(tmp_path / "hf"), progress=False)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(4).integers(0, 50257, (1, 6))
    ref = hf(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model.apply({"params": params}, jnp.asarray(ids)).logits) - ref).max() <= 1e-5

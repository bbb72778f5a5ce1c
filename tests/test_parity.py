"""Numerical parity with transformers' PyTorch GPT-2 through from_pretrained / save_pretrained."""

import functools

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import flax_gpt2
from conftest import make_hf_model
from flax_gpt2.checkpoints.pretrained import from_pretrained, save_pretrained



@pytest.fixture(autouse=True, scope="module")
def _torch_no_grad():
    """The reference model only runs forward here; scoped to this module so training tests keep autograd."""
    with torch.no_grad():
        yield

VOCAB = 50257


def _padded_batch(seed=0, length=12):
    """Three rows: full, left-padded by 4, right-padded by 5. Returns ids, mask, position_ids (numpy)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (3, length))
    mask = np.ones((3, length), np.int64)
    mask[1, :4] = 0
    mask[2, -5:] = 0
    ids[mask == 0] = 50256
    # Left padding needs explicit positions (both models count from the first real token).
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions


def _hf(model, ids, mask=None, positions=None, **kw):
    t = lambda a: None if a is None else torch.as_tensor(a)  # noqa: E731
    return model(input_ids=t(ids), attention_mask=t(mask), position_ids=t(positions), **kw)


def _ours(model, params, ids, mask=None, positions=None, **kw):
    j = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
    return model.apply({"params": params}, j(ids), attention_mask=j(mask), position_ids=j(positions), **kw)


def _max_diff(ref, got, mask=None):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if mask is not None:
        ref, got = ref[mask.astype(bool)], got[mask.astype(bool)]
    return float(np.abs(ref - got).max())


VARIANTS = {
    "default": {},
    "gelu": dict(activation_function="gelu"),
    "gelu_pytorch_tanh": dict(activation_function="gelu_pytorch_tanh"),
    "relu": dict(activation_function="relu"),
    "silu": dict(activation_function="silu"),
    "n_inner": dict(n_inner=96),
    "layer_norm_epsilon": dict(layer_norm_epsilon=1e-2),
    "no_scale_attn_weights": dict(scale_attn_weights=False),
    "scale_attn_by_inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "reorder_and_upcast_attn": dict(reorder_and_upcast_attn=True),
    "untied": dict(tie_word_embeddings=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lm_logits_match_transformers(tmp_path_factory, variant):
    hf, folder = make_hf_model(tmp_path_factory, variant, seed=1, randomize=True, **VARIANTS[variant])
    if variant == "reorder_and_upcast_attn":
        hf.set_attn_implementation("eager")  # transformers honours the flag only in eager attention
    model, params = from_pretrained(folder, progress=False)
    assert model.config.to_hf_config()["activation_function"] == hf.config.activation_function
    ids, mask, positions = _padded_batch()
    ref = _hf(hf, ids, mask, positions).logits.numpy()
    got = _ours(model, params, ids, mask, positions).logits
    assert got.shape == (3, 12, VOCAB)
    assert _max_diff(ref, got, mask) <= 1e-5


def test_lm_logits_without_mask(hf_tiny):
    hf, folder = hf_tiny
    model, params = from_pretrained(folder, progress=False)
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, 9))
    assert _max_diff(_hf(hf, ids).logits, _ours(model, params, ids).logits) <= 1e-5


def test_gpt2model_hidden_states_match_transformers(tmp_path_factory):
    hf, folder = make_hf_model(tmp_path_factory, "base", "GPT2Model", seed=2, randomize=True, n_layer=3)
    model, params = from_pretrained(folder, model_class=flax_gpt2.GPT2Model, progress=False)
    ids, mask, positions = _padded_batch(seed=1)
    ref = _hf(hf, ids, mask, positions, output_hidden_states=True)
    got = _ours(model, params, ids, mask, positions, output_hidden_states=True)
    # transformers 5 returns n_layer + 1 states: the embeddings, each block's input, and the final
    # state after ln_f in last place (it equals last_hidden_state).
    assert len(ref.hidden_states) == len(got.hidden_states) == 4
    assert _max_diff(ref.last_hidden_state, got.last_hidden_state, mask) <= 1e-5
    for r, g in zip(ref.hidden_states, got.hidden_states):
        assert _max_diff(r, g, mask) <= 1e-5


def test_lm_hidden_states_match_transformers(hf_tiny):
    hf, folder = hf_tiny
    model, params = from_pretrained(folder, progress=False)
    ids = np.random.default_rng(4).integers(0, VOCAB, (2, 7))
    ref = _hf(hf, ids, output_hidden_states=True).hidden_states
    got = _ours(model, params, ids, output_hidden_states=True).hidden_states
    assert len(ref) == len(got) == 3
    assert max(_max_diff(r, g) for r, g in zip(ref, got)) <= 1e-5


def _mc_inputs(seed=0, batch=2, choices=3, length=6):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, choices, length))
    mc_token_ids = rng.integers(0, length, (batch, choices))
    return ids, mc_token_ids


@pytest.mark.parametrize("summary", [
    dict(),
    dict(summary_activation="tanh"),
    dict(summary_proj_to_labels=False),
    dict(summary_use_proj=False),
    dict(summary_activation="tanh", summary_proj_to_labels=False),
], ids=["default", "tanh", "proj_to_hidden", "no_proj", "tanh_proj_to_hidden"])
def test_double_heads_match_transformers(tmp_path_factory, summary):
    hf, folder = make_hf_model(tmp_path_factory, "dh", "GPT2DoubleHeadsModel", seed=3, randomize=True, **summary)
    model, params = from_pretrained(folder, model_class=flax_gpt2.GPT2DoubleHeadsModel, progress=False)
    ids, mc_token_ids = _mc_inputs()
    ref = hf(input_ids=torch.as_tensor(ids), mc_token_ids=torch.as_tensor(mc_token_ids))
    got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mc_token_ids))
    assert got.logits.shape == (2, 3, 6, VOCAB)
    assert got.mc_logits.shape == ref.mc_logits.shape
    assert _max_diff(ref.logits, got.logits) <= 1e-5
    assert _max_diff(ref.mc_logits, got.mc_logits) <= 1e-5


def test_double_heads_default_mc_token_is_last(tmp_path_factory):
    hf, folder = make_hf_model(tmp_path_factory, "dh_last", "GPT2DoubleHeadsModel", seed=4)
    model, params = from_pretrained(folder, model_class=flax_gpt2.GPT2DoubleHeadsModel, progress=False)
    ids, _ = _mc_inputs(seed=1)
    ref = hf(input_ids=torch.as_tensor(ids))
    got = model.apply({"params": params}, jnp.asarray(ids))
    assert _max_diff(ref.mc_logits, got.mc_logits) <= 1e-5


@pytest.mark.parametrize("summary_type", ["last", "first", "mean"])
def test_double_heads_other_summary_types(tmp_path_factory, summary_type):
    # transformers' GPT2DoubleHeadsModel applies these three summaries to [B, C, T, D] as if it were
    # [B, T, D], reducing over the choices (its mc_logits come out [B, T]). flax_gpt2 summarizes each
    # choice's sequence, which is what its own GPT2SequenceSummary computes on [B * C, T, D]: compare to that.
    hf, folder = make_hf_model(tmp_path_factory, "dh_" + summary_type, "GPT2DoubleHeadsModel", seed=5,
                               summary_type=summary_type, summary_activation="tanh")
    model, params = from_pretrained(folder, model_class=flax_gpt2.GPT2DoubleHeadsModel, progress=False)
    ids, _ = _mc_inputs(seed=2)
    hidden = hf.transformer(input_ids=torch.as_tensor(ids).view(-1, ids.shape[-1])).last_hidden_state
    ref = hf.multiple_choice_head(hidden).view(*ids.shape[:2], -1).squeeze(-1)
    got = model.apply({"params": params}, jnp.asarray(ids))
    assert got.mc_logits.shape == (2, 3)
    assert _max_diff(ref, got.mc_logits) <= 1e-5


def _random_params(model, seed):
    """Random values (non-zero biases, non-unit LayerNorm scales) in the shapes `model.init` makes."""
    shape = (1, 2, 4) if isinstance(model, flax_gpt2.GPT2DoubleHeadsModel) else (1, 4)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape, jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, a):
        center = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(center + rng.normal(0, 0.1, a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(fill, flax.linen.unbox(abstract))


@pytest.mark.parametrize("model_class,tie", [
    ("GPT2LMHeadModel", True), ("GPT2LMHeadModel", False), ("GPT2DoubleHeadsModel", True), ("GPT2Model", True),
])
def test_flax_init_saved_loads_in_transformers(tmp_path, bpe_dir, model_class, tie):
    config = flax_gpt2.GPT2Config.from_preset("tiny", n_layer=2, tie_word_embeddings=tie)
    model = getattr(flax_gpt2, model_class)(config)
    params = _random_params(model, seed=7)
    save_pretrained(tmp_path, model, params, tokenizer=bpe_dir, progress=False)
    hf = getattr(transformers, model_class).from_pretrained(tmp_path).eval()
    assert hf.config.architectures == [model_class]
    if model_class == "GPT2DoubleHeadsModel":
        ids, mc_token_ids = _mc_inputs(seed=3)
        ref = hf(input_ids=torch.as_tensor(ids), mc_token_ids=torch.as_tensor(mc_token_ids))
        got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mc_token_ids))
        assert _max_diff(ref.logits, got.logits) <= 1e-5
        assert _max_diff(ref.mc_logits, got.mc_logits) <= 1e-5
        return
    ids, mask, positions = _padded_batch(seed=5)
    ref, got = _hf(hf, ids, mask, positions), _ours(model, params, ids, mask, positions)
    if model_class == "GPT2Model":
        assert _max_diff(ref.last_hidden_state, got.last_hidden_state, mask) <= 1e-5
    else:
        assert _max_diff(ref.logits, got.logits, mask) <= 1e-5


def test_full_size_gpt2_architecture(tmp_path_factory):
    """The full GPT-2 124M architecture with random weights, at 1e-4."""
    hf, folder = make_hf_model(tmp_path_factory, "gpt2_124m", seed=0, n_positions=1024, n_embd=768, n_layer=12,
                               n_head=12)
    model, params = from_pretrained(folder, progress=False)
    assert sum(x.size for x in jax.tree.leaves(params)) == flax_gpt2.GPT2Config.from_preset("gpt2").num_params
    ids, mask, positions = _padded_batch(seed=6, length=32)
    ref = _hf(hf, ids, mask, positions).logits
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                               position_ids=jnp.asarray(positions)).logits
    assert _max_diff(ref, got, mask) <= 1e-4


def test_token_type_ids_match_transformers(hf_tiny_random):
    """`token_type_ids` are embedded with `wte` and added, as transformers does (every parameter random)."""
    hf, folder = hf_tiny_random
    model, params = from_pretrained(folder, progress=False)
    ids, mask, positions = _padded_batch(seed=7)
    token_types = np.random.default_rng(8).integers(0, 3, ids.shape)
    ref = _hf(hf, ids, mask, positions, token_type_ids=torch.as_tensor(token_types)).logits
    got = _ours(model, params, ids, mask, positions, token_type_ids=jnp.asarray(token_types)).logits
    assert _max_diff(ref, got, mask) <= 1e-5
    # and they matter: without them the logits are different
    assert _max_diff(ref, _ours(model, params, ids, mask, positions).logits, mask) > 1e-2


# bf16 compute (fp32 parameters) against fp32, in units of the fp32 logits' standard deviation: mean |error|
# <= 2%, worst entry <= 20%. bf16 keeps 8 significant bits (rounding ~0.4%); rounded activations and matmul
# inputs over two layers give ~0.7% mean and ~7% worst on this model: the bounds leave a 3x margin.
BF16_MEAN_TOL, BF16_MAX_TOL = 0.02, 0.2


def test_bf16_compute_forward_is_finite_and_close_to_fp32(hf_tiny_random):
    hf, folder = hf_tiny_random
    model32, params = from_pretrained(folder, progress=False)
    model16 = flax_gpt2.GPT2LMHeadModel(model32.config.replace(dtype=jnp.bfloat16))
    ids, mask, positions = _padded_batch(seed=9)
    ref = np.asarray(jax.jit(model32.apply)({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                            position_ids=jnp.asarray(positions)).logits)
    apply16 = jax.jit(functools.partial(model16.apply, output_hidden_states=True))
    out = apply16({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                  position_ids=jnp.asarray(positions))
    assert out.logits.dtype == jnp.float32 and out.hidden_states[1].dtype == jnp.bfloat16  # bf16 really ran
    got = np.asarray(out.logits)
    real = mask.astype(bool)
    assert np.isfinite(got).all()
    spread = ref[real].std()
    assert np.abs(got - ref)[real].mean() <= BF16_MEAN_TOL * spread
    assert np.abs(got - ref)[real].max() <= BF16_MAX_TOL * spread

"""Document masking in the model: with `segment_ids` (and positions restarting per document), a packed row of
documents gives each document the logits it has alone, through every attention backend, scanned and unrolled,
beside padding; without them, attention crosses documents. Splash runs in Pallas interpret mode on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_gpt2
from flax_gpt2.modeling import layer_stacking
from flax_gpt2.modeling.kv_cache import KVCache
from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params

T = 128  # splash tiles the sequence in 128-token blocks
LENGTHS = (37, 50, 41)  # three documents filling one row: 37 + 50 + 41 = 128
PAD = 9  # the second row: left padding, then the same documents cut to fit
TOL = 1e-5


def _config(**kwargs):
    return flax_gpt2.GPT2Config.from_preset("tiny", n_embd=32, n_head=4, vocab_size=512, **kwargs)


def _random_params(model, seed=0):
    """Every parameter random (biases and LayerNorm affine too), so that no mix-up can hide."""
    params = init_params(model, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _packed_row(docs):
    """`(ids, segment_ids, position_ids)` of documents laid end to end, positions restarting at 0 per document."""
    ids = np.concatenate(docs)
    segments = np.concatenate([np.full(len(d), i, np.int32) for i, d in enumerate(docs)])
    positions = np.concatenate([np.arange(len(d), dtype=np.int32) for d in docs])
    return ids, segments, positions


@pytest.fixture(scope="module")
def case():
    """The packed batch, its padding mask, the params, and each document's logits computed alone (xla)."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 512, n).astype(np.int32) for n in LENGTHS]
    cut = [docs[0][:LENGTHS[0] - PAD], docs[1], docs[2]]  # row 1: PAD padding tokens, then 28 + 50 + 41 tokens
    row0, row1 = _packed_row(docs), _packed_row(cut)
    # Row 1's padding carries the segment id and positions of the first document it precedes, so only the
    # attention mask keeps that document from seeing it.
    row1 = [np.concatenate([np.full(PAD, r[0]), r]) for r in row1]
    ids, segments, positions = (jnp.asarray(np.stack([a, b])) for a, b in zip(row0, row1))
    mask = jnp.ones((2, T), jnp.int32).at[1, :PAD].set(0)
    model = GPT2LMHeadModel(_config(attention="xla"))
    params = _random_params(model)
    alone = [[np.asarray(model.apply({"params": params}, jnp.asarray(d)[None]).logits[0]) for d in row_docs]
             for row_docs in (docs, cut)]
    # The packed rows' expected logits: each document's own; padding positions are not compared.
    expected = np.stack([np.concatenate(alone[0]), np.concatenate([np.zeros((PAD, 512), np.float32)] + alone[1])])
    return dict(ids=ids, segments=segments, positions=positions, mask=mask, params=params, expected=expected)


def _max_diff_on_tokens(logits, case):
    real = np.asarray(case["mask"], bool)[:, :, None]
    return float(np.max(np.abs(np.where(real, np.asarray(logits) - case["expected"], 0.0))))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("backend", ["xla", "dot_product", "splash"])
def test_a_packed_row_gives_each_document_its_logits_alone(case, backend, scan_layers):
    model = GPT2LMHeadModel(_config(attention=backend, scan_layers=scan_layers))
    params = layer_stacking.to_layout(case["params"], scan_layers)
    logits = jax.jit(lambda p: model.apply({"params": p}, case["ids"], attention_mask=case["mask"],
                                           position_ids=case["positions"], segment_ids=case["segments"]).logits)(params)
    assert _max_diff_on_tokens(logits, case) <= TOL


def test_rematerialized_blocks_take_segment_ids_too(case):
    model = GPT2LMHeadModel(_config(attention="xla", remat=True))
    logits = model.apply({"params": case["params"]}, case["ids"], attention_mask=case["mask"],
                         position_ids=case["positions"], segment_ids=case["segments"]).logits
    assert _max_diff_on_tokens(logits, case) <= TOL


@pytest.mark.parametrize("backend", ["xla", "splash"])
def test_without_segment_ids_attention_crosses_documents(case, backend):
    """The same packed rows and positions without `segment_ids`: the later documents see the earlier ones."""
    model = GPT2LMHeadModel(_config(attention=backend))
    logits = model.apply({"params": case["params"]}, case["ids"], attention_mask=case["mask"],
                         position_ids=case["positions"]).logits
    first = LENGTHS[0]
    # The first document has nothing before it; the others differ from their logits alone.
    np.testing.assert_allclose(np.asarray(logits)[0, :first], case["expected"][0, :first], atol=TOL)
    assert _max_diff_on_tokens(logits, case) > 1e-2


def test_segment_ids_with_a_cache_or_of_another_shape_are_refused(case):
    config = _config(attention="xla")
    model = GPT2LMHeadModel(config)
    ids = case["ids"][:, :4]
    cache = KVCache.init(config, batch_size=2, cache_length=8)
    with pytest.raises(ValueError, match="segment_ids.*KV cache"):
        model.apply({"params": case["params"]}, ids, segment_ids=jnp.zeros((2, 4), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 5\); expected \(2, 4\)"):
        model.apply({"params": case["params"]}, ids, segment_ids=jnp.zeros((2, 5), jnp.int32))

"""Decoding strategies on fake logits, checked against transformers' logits processors; seeded sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from flax_gpt2 import GPT2Config, GPT2LMHeadModel, init_params
from flax_gpt2.generation import (GenerationConfig, apply_temperature, generate, no_repeat_ngram, repetition_penalty,
                                  top_k_filter, top_p_filter)
from flax_gpt2.generation.logits_processors import ChoiceSettings, ChoiceStages, argmax, choose_tokens


@pytest.fixture(autouse=True, scope="module")
def _torch_no_grad():
    """The reference model only runs forward here; scoped to this module so training tests keep autograd."""
    with torch.no_grad():
        yield


def fake_logits(batch=4, vocab=1000, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32) * scale


def hf_apply(processor, logits, input_ids=None):
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if input_ids is None else torch.as_tensor(input_ids)
    return processor(ids, torch.as_tensor(logits)).numpy()


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("k", [1, 5, 50, 999, 5000])
def test_top_k_matches_transformers(k):
    logits = fake_logits()
    np.testing.assert_array_equal(top_k_filter(jnp.asarray(logits), k), hf_apply(hf.TopKLogitsWarper(k), logits))


def test_top_k_per_row_matches_transformers_row_by_row():
    """One k per row (the server's requests; 0 = off) filters each row as transformers does with that k."""
    logits = fake_logits(batch=4)
    ks = [3, 0, 50, 999]
    got = np.asarray(top_k_filter(jnp.asarray(logits), jnp.asarray(ks)))
    for row, k in enumerate(ks):
        expected = logits[row:row + 1] if k == 0 else hf_apply(hf.TopKLogitsWarper(k), logits[row:row + 1])
        np.testing.assert_array_equal(got[row:row + 1], expected)


def test_top_k_keeps_ties_with_the_kth_value():
    logits = jnp.asarray([[3.0, 1.0, 2.0, 2.0, 0.0]])
    np.testing.assert_array_equal(top_k_filter(logits, 2), [[3.0, -np.inf, 2.0, 2.0, -np.inf]])


def test_sampling_with_top_k_never_leaves_the_top_k():
    logits = jnp.asarray(fake_logits(batch=2, scale=0.5))  # flat: many tokens outside the top k are likely
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    params = GenerationConfig.create(do_sample=True, top_k=5)
    choose = jax.jit(jax.vmap(lambda key: params.choose(logits, None, None, 0, key)))
    drawn = np.asarray(choose(jax.random.split(jax.random.PRNGKey(0), 2000)))  # [draws, B]
    for row in range(2):
        assert set(drawn[:, row]) == set(top5[row])  # all of the top 5 drawn, nothing else


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_top_p_matches_transformers(p):
    logits = fake_logits(vocab=5000)
    ours = np.asarray(top_p_filter(jnp.asarray(logits), p))
    np.testing.assert_array_equal(ours, hf_apply(hf.TopPLogitsWarper(p), logits))


@pytest.mark.parametrize("p", [0.1, 0.6, 0.95])
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(p):
    logits = fake_logits(vocab=2000, seed=1)
    kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), p)))
    probs = softmax(logits)
    for row in range(logits.shape[0]):
        kept_probs = np.sort(probs[row, kept[row]])
        # the kept tokens are the most likely ones, with mass >= p, and dropping the least likely of them
        # would go below p
        assert probs[row, ~kept[row]].max(initial=0) <= kept_probs[0]
        assert kept_probs.sum() >= p - 1e-6
        assert kept_probs.sum() - kept_probs[0] < p


def test_top_p_min_tokens_to_keep_matches_transformers():
    logits = fake_logits(scale=10.0)  # peaked: p=0.1 keeps a single token unless told otherwise
    np.testing.assert_array_equal(top_p_filter(jnp.asarray(logits), 0.1, min_tokens_to_keep=2),
                                  hf_apply(hf.TopPLogitsWarper(0.1, min_tokens_to_keep=2), logits))


def test_temperature_matches_transformers():
    logits = fake_logits()
    np.testing.assert_allclose(apply_temperature(jnp.asarray(logits), 0.7),
                               hf_apply(hf.TemperatureLogitsWarper(0.7), logits), rtol=1e-6)


@pytest.mark.parametrize("top_k", [0, 40])
def test_temperature_to_zero_is_greedy(top_k):
    logits = jnp.asarray(fake_logits(batch=8, vocab=5000, scale=1.0))
    params = GenerationConfig.create(do_sample=True, temperature=1e-4, top_k=top_k)
    for key in jax.random.split(jax.random.PRNGKey(0), 20):
        np.testing.assert_array_equal(params.choose(logits, None, None, 0, key), np.argmax(logits, -1))


def test_temperature_to_zero_is_greedy_end_to_end(tiny):
    model, params = tiny
    greedy = generate(model, params, [[1, 2, 3], [9, 8, 7]], max_new_tokens=24)
    cold = generate(model, params, [[1, 2, 3], [9, 8, 7]], max_new_tokens=24, do_sample=True, temperature=1e-4,
                    seed=11)
    np.testing.assert_array_equal(cold, greedy)


def test_argmax_takes_the_first_of_ties():
    np.testing.assert_array_equal(argmax(jnp.asarray([[1.0, 3.0, 3.0], [-np.inf, -np.inf, -np.inf]])), [1, 0])


def test_sampling_follows_the_softmax():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0, -np.inf]])
    params = GenerationConfig.create(do_sample=True)
    choose = jax.jit(jax.vmap(lambda key: params.choose(logits, None, None, 0, key)))
    drawn = np.asarray(choose(jax.random.split(jax.random.PRNGKey(1), 20000)))[:, 0]
    freq = np.bincount(drawn, minlength=5) / len(drawn)
    np.testing.assert_allclose(freq, softmax(np.asarray(logits))[0], atol=0.015)
    assert freq[4] == 0


def padded_history(seed=0, batch=3, length=12, vocab=30):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    tokens[mask == 0] = 7
    return tokens, mask


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    tokens, mask = padded_history()
    logits = fake_logits(batch=3, vocab=30)
    # HF 5.x skips the left padding through prompt_ignore_length (the first real position of each row).
    processor = hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=torch.as_tensor(mask.argmax(1)))
    ours = repetition_penalty(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask, bool), penalty)
    np.testing.assert_allclose(ours, hf_apply(processor, logits, tokens), rtol=1e-6)
    # token 7 sits only in row 1's padding there (not among its real tokens): it is not penalized
    assert 7 not in tokens[1, 4:] and ours[1, 7] == logits[1, 7]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(n):
    tokens, _ = padded_history(vocab=3, length=14)  # a small vocabulary repeats n-grams
    logits = fake_logits(batch=3, vocab=3)
    length = 10  # the buffer holds 14 slots; only the first 10 are written
    valid = np.arange(14)[None, :] < length
    ours = no_repeat_ngram(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(np.broadcast_to(valid, tokens.shape)),
                           length, n)
    expected = hf_apply(hf.NoRepeatNGramLogitsProcessor(n), logits, tokens[:, :length])
    np.testing.assert_array_equal(ours, expected)
    assert np.isinf(expected).any()


def test_no_repeat_ngram_ignores_left_padding():
    # Row: [pad pad | 5 6 5]: the n-gram (pad, 5) is padding, so nothing follows "5" yet except 6.
    tokens = jnp.asarray([[5, 5, 5, 6, 5, 0]])
    valid = jnp.asarray([[False, False, True, True, True, False]])
    logits = jnp.zeros((1, 8))
    banned = np.isinf(np.asarray(no_repeat_ngram(logits, tokens, valid, 5, 2)))[0]
    assert banned.tolist() == [i == 6 for i in range(8)]


def test_processor_chain_matches_transformers():
    tokens, mask = padded_history(vocab=50)
    logits = fake_logits(batch=3, vocab=50)
    params = GenerationConfig.create(do_sample=True, temperature=0.8, top_k=20, top_p=0.7, repetition_penalty=1.2,
                                   no_repeat_ngram_size=2)
    chain = hf.LogitsProcessorList([
        hf.RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=torch.as_tensor(mask.argmax(1))),
        hf.NoRepeatNGramLogitsProcessor(2), hf.TemperatureLogitsWarper(0.8), hf.TopKLogitsWarper(20),
        hf.TopPLogitsWarper(0.7)])
    ours = params.process(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask, bool), tokens.shape[1])
    expected = hf_apply(chain, logits, tokens)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    np.testing.assert_allclose(np.where(np.isinf(expected), 0, ours), np.where(np.isinf(expected), 0, expected),
                               rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    model = GPT2LMHeadModel(GPT2Config.from_preset("tiny"))
    return model, init_params(model, jax.random.PRNGKey(0))


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=True),
    dict(do_sample=True, top_p=0.8),
    dict(do_sample=True, num_beams=3, num_return_sequences=2),
], ids=["plain", "top-p", "beam-sample"])
def test_a_seed_reproduces_the_output(tiny, kwargs):
    model, params = tiny
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    first = np.asarray(generate(model, params, prompts, max_new_tokens=16, seed=7, **kwargs))
    np.testing.assert_array_equal(generate(model, params, prompts, max_new_tokens=16, seed=7, **kwargs), first)
    other = np.asarray(generate(model, params, prompts, max_new_tokens=16, seed=8, **kwargs))
    assert (other != first).any()


def hf_warpers(temperature, top_k, top_p):
    """transformers' sampling warpers in its order: temperature first, then top-k, then top-p."""
    chain = [hf.TemperatureLogitsWarper(temperature)]
    if top_k:
        chain.append(hf.TopKLogitsWarper(top_k))
    if top_p < 1:
        chain.append(hf.TopPLogitsWarper(top_p))
    return hf.LogitsProcessorList(chain)


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("top_k", [0, 3, 40])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_choose_draws_from_what_process_keeps(temperature, top_k, top_p):
    """The one token choice (`choose`: top-k, nucleus, an inverse-transform draw) samples the distribution that
    `process` (= transformers' warpers) hands to a sampler: nothing outside its kept set, and each kept token
    about as often as its probability."""
    logits = fake_logits(batch=2, vocab=200, seed=3, scale=1.5)
    config = GenerationConfig.create(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    processed = np.asarray(config.process(jnp.asarray(logits), None, None, 0))
    expected = hf_apply(hf_warpers(temperature, top_k, top_p), logits)
    np.testing.assert_array_equal(np.isinf(processed), np.isinf(expected))
    np.testing.assert_allclose(np.where(np.isinf(expected), 0, processed), np.where(np.isinf(expected), 0, expected),
                               rtol=1e-6)
    draws = 4000
    choose = jax.jit(jax.vmap(lambda key: config.choose(jnp.asarray(logits), None, None, 0, key)))
    drawn = np.asarray(choose(jax.random.split(jax.random.PRNGKey(5), draws)))  # [draws, B]
    probs = softmax(expected)
    for row in range(2):
        assert set(drawn[:, row]) <= set(np.flatnonzero(np.isfinite(expected[row]))), row
        freq = np.bincount(drawn[:, row], minlength=200) / draws
        np.testing.assert_allclose(freq, probs[row], atol=0.03)


def test_temperature_comes_before_the_filters():
    """A sharpening temperature shrinks the nucleus: filtering the untempered logits (then dividing) would
    keep, and draw, tokens that transformers' order drops."""
    logits = fake_logits(batch=2, vocab=200, seed=3, scale=1.5)
    config = GenerationConfig.create(do_sample=True, temperature=0.5, top_k=40, top_p=0.5)
    tempered_first = np.isfinite(hf_apply(hf_warpers(0.5, 40, 0.5), logits))
    filtered_first = np.isfinite(hf_apply(hf_warpers(1.0, 40, 0.5), logits))
    assert tempered_first.sum() < filtered_first.sum()  # the order matters for these logits
    np.testing.assert_array_equal(np.isfinite(config.process(jnp.asarray(logits), None, None, 0)), tempered_first)
    choose = jax.jit(jax.vmap(lambda key: config.choose(jnp.asarray(logits), None, None, 0, key)))
    drawn = np.asarray(choose(jax.random.split(jax.random.PRNGKey(6), 3000)))
    for row in range(2):
        assert set(drawn[:, row]) == set(np.flatnonzero(tempered_first[row]))


def test_generate_with_every_warper_draws_what_transformers_keeps(tiny):
    """Each token `generate` samples with repetition penalty, temperature, top-k and top-p lies in the set
    transformers' processors keep for the model's logits over the sequence so far (scored by one full forward
    pass per sequence); a different seed draws differently, the same seed identically."""
    model, params = tiny
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    kwargs = dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.9, repetition_penalty=1.2)
    out = np.asarray(generate(model, params, prompts, max_new_tokens=16, seed=7, **kwargs))
    np.testing.assert_array_equal(generate(model, params, prompts, max_new_tokens=16, seed=7, **kwargs), out)
    assert (np.asarray(generate(model, params, prompts, max_new_tokens=16, seed=8, **kwargs)) != out).any()
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(out)).logits, np.float32)
    chain = hf.LogitsProcessorList([hf.RepetitionPenaltyLogitsProcessor(1.2), *hf_warpers(0.7, 10, 0.9)])
    for t in range(4, out.shape[1]):
        kept = np.isfinite(hf_apply(chain, logits[:, t - 1], out[:, :t]))
        assert kept.sum(1).max() <= 10
        assert kept[np.arange(2), out[:, t]].all(), t


def test_per_row_settings_choose_what_each_row_alone_chooses():
    """The server's slots run `choose_tokens` with one setting per row ([B] arrays, per-row top-k by
    bisection, stages decided at run time) and one key per row; each row's token equals `generate`'s
    choice (`GenerationConfig.choose`, static top-k) for that row alone with the same key."""
    logits = fake_logits(batch=5, vocab=300, seed=9, scale=2.0)
    rows = [dict(do_sample=False), dict(do_sample=True, temperature=0.7, top_k=20, top_p=1.0),
            dict(do_sample=True, temperature=1.3, top_k=0, top_p=0.6),
            dict(do_sample=True, temperature=0.9, top_k=5, top_p=0.8), dict(do_sample=True, temperature=1.0)]
    settings = ChoiceSettings(
        greedy=jnp.asarray([not r["do_sample"] for r in rows]),
        temperature=jnp.asarray([r.get("temperature", 1.0) for r in rows], jnp.float32),
        top_k=jnp.asarray([r.get("top_k", 0) for r in rows], jnp.int32),
        top_p=jnp.asarray([r.get("top_p", 1.0) for r in rows], jnp.float32))
    stages = ChoiceStages(sample=jnp.bool_(True), top_k=jnp.bool_(True), top_p=jnp.bool_(True))
    together = jax.jit(lambda keys: choose_tokens(jnp.asarray(logits), keys, None, None, 0, settings, stages))
    for seed in range(20):
        keys = jax.random.split(jax.random.PRNGKey(seed), len(rows))
        got = np.asarray(together(keys))
        for i, row in enumerate(rows):
            alone = GenerationConfig.create(**row).choose(jnp.asarray(logits[i:i + 1]), None, None, 0, keys[i])
            assert got[i] == int(alone[0]), (seed, i, row)

"""The decode loop: parity with transformers' greedy and beam search, cache vs. full recompute, left padding,
EOS handling, bucketing, streaming, and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import make_hf_model, left_padded
from flax_gpt2 import GPT2Config, GPT2DoubleHeadsModel, GPT2LMHeadModel, init_params
from flax_gpt2.generation import generate, generate_stream, sampling
from flax_gpt2.generation.model_step import forward, output_projection, prefill
from flax_gpt2.checkpoints.pretrained import from_pretrained



@pytest.fixture(autouse=True, scope="module")
def _torch_no_grad():
    """The reference model only runs forward here; scoped to this module so training tests keep autograd."""
    with torch.no_grad():
        yield

EOT = 50256
PROMPTS = [[464, 2068, 7586, 21831], [40, 588, 257, 3290, 290, 262, 1110, 318, 1049], [EOT]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, our model, our params) with the same weights. A large initializer_range makes
    the random model's next-token distribution peaked and varied, so greedy output is not one repeated
    token and argmax ties are far apart."""
    hf, folder = make_hf_model(tmp_path_factory, "hf_generation", n_positions=256, initializer_range=0.3)
    model, params = from_pretrained(folder, progress=False)
    return hf, model, params


@pytest.fixture(scope="module")
def tiny():
    model = GPT2LMHeadModel(GPT2Config.from_preset("tiny", initializer_range=0.3))
    return model, init_params(model, jax.random.PRNGKey(0))


def left_pad(prompts, pad=EOT):
    return left_padded(prompts, pad)


def hf_generate(hf, ids, mask, **kwargs):
    kwargs.setdefault("pad_token_id", EOT)
    return hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **kwargs).numpy()


def assert_same_tokens(ours, ref, pad):
    """transformers stops when every row is done; past its length our rows must be padding."""
    ours = np.asarray(ours)
    assert ours.shape[0] == ref.shape[0] and ours.shape[1] >= ref.shape[1]
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == pad).all()


@pytest.mark.parametrize("prompt", PROMPTS, ids=["4-tokens", "9-tokens", "endoftext"])
def test_greedy_matches_transformers(pair, prompt):
    hf, model, params = pair
    ids, mask = left_pad([prompt])
    ref = hf_generate(hf, ids, mask, do_sample=False, max_new_tokens=128, eos_token_id=EOT)
    ours = generate(model, params, ids, mask, max_new_tokens=128, eos_token_id=EOT)
    assert ours.shape == (1, len(prompt) + 128)
    assert_same_tokens(ours, ref, EOT)
    assert len(set(ref[0, len(prompt):].tolist())) > 20  # a real test, not one token repeated


def test_greedy_left_padded_batch_and_penalties_match_transformers(pair):
    hf, model, params = pair
    ids, mask = left_pad(PROMPTS)
    kwargs = dict(max_new_tokens=32, repetition_penalty=1.3, no_repeat_ngram_size=2, eos_token_id=EOT)
    ref = hf_generate(hf, ids, mask, do_sample=False, **kwargs)
    assert_same_tokens(generate(model, params, ids, mask, **kwargs), ref, EOT)


@pytest.mark.parametrize("num_return_sequences, length_penalty", [(1, 1.0), (4, 0.5), (2, 0.0), (2, 2.0)])
def test_beam_search_matches_transformers(pair, num_return_sequences, length_penalty):
    hf, model, params = pair
    ids, mask = left_pad(PROMPTS[:2])
    kwargs = dict(max_new_tokens=24, num_beams=4, num_return_sequences=num_return_sequences,
                  length_penalty=length_penalty, pad_token_id=2)  # not 0: HF's beam search fills `pad or eos`
    # Make a token of the best beam the EOS, so that hypotheses finish at different lengths and the
    # finished-hypothesis bookkeeping, the length penalty and the early-stopping heuristic matter.
    eos = int(np.asarray(generate(model, params, ids, mask, **kwargs))[0, ids.shape[1] + 5])
    # early_stopping=False (transformers' default): stop a prompt once no running beam, scored at its current
    # length, beats the worst finished hypothesis; that bound carries the length penalty's exponent.
    ref = hf_generate(hf, ids, mask, do_sample=False, eos_token_id=eos, early_stopping=False, **kwargs)
    ours = np.asarray(generate(model, params, ids, mask, eos_token_id=eos, **kwargs))
    assert ours.shape == (2 * num_return_sequences, ids.shape[1] + 24)
    assert_same_tokens(ours, ref, 2)
    if length_penalty < 1:  # short hypotheses win: some returned ones end in EOS
        assert (ours[:, ids.shape[1]:] == eos).any()
    if length_penalty > 1:
        # Long hypotheses win, and when to stop changes the result here: stopping as soon as num_beams
        # hypotheses have finished (early_stopping=True) returns other sequences than the bound does.
        eager = hf_generate(hf, ids, mask, do_sample=False, eos_token_id=eos, early_stopping=True, **kwargs)
        assert eager.shape != ref.shape or not np.array_equal(eager, ref)


def test_beam_search_with_penalties_matches_transformers(pair):
    hf, model, params = pair
    ids, mask = left_pad(PROMPTS)
    kwargs = dict(max_new_tokens=20, num_beams=3, repetition_penalty=1.5, no_repeat_ngram_size=3,
                  eos_token_id=EOT)
    ref = hf_generate(hf, ids, mask, do_sample=False, **kwargs)
    assert_same_tokens(generate(model, params, ids, mask, **kwargs), ref, EOT)


# bf16 compute against fp32 on the same tokens: relative L2 error of the logits <= 4%, mean |error| <= 3% and
# worst <= 50% of the fp32 logits' standard deviation. Measured on this model (large weights, peaked
# outputs): 1.3%, 1.0% and 20%; bf16 rounds to 8 significant bits.
BF16_REL_TOL, BF16_MEAN_TOL, BF16_MAX_TOL = 0.04, 0.03, 0.5


def test_bf16_generate_follows_its_logits_and_stays_close_to_fp32(pair):
    """generate with bf16 compute (fp32 params, a bf16 KV cache): each new token is the argmax of the bf16
    model's own full-sequence logits (where not within rounding of a tie), and those logits are finite and
    close to fp32's on the same tokens. (The greedy paths themselves may part at a near tie.)"""
    _, model, params = pair
    bf16 = GPT2LMHeadModel(model.config.replace(dtype=jnp.bfloat16))
    ids, mask = left_pad(PROMPTS)
    t, new = ids.shape[1], 24
    out = np.asarray(generate(bf16, params, ids, mask, max_new_tokens=new))
    seq_mask = np.pad(mask, ((0, 0), (0, new)), constant_values=1)
    positions = np.maximum(np.cumsum(seq_mask, 1) - 1, 0)

    def logits(m):
        apply = jax.jit(m.apply)
        return np.asarray(apply({"params": params}, jnp.asarray(out), attention_mask=jnp.asarray(seq_mask),
                                position_ids=jnp.asarray(positions)).logits)[:, t - 1:-1]  # predict new tokens

    ours, ref = logits(bf16), logits(model)
    assert np.isfinite(ours).all()
    spread = ref.std()
    assert np.linalg.norm(ours - ref) <= BF16_REL_TOL * np.linalg.norm(ref)
    assert np.abs(ours - ref).mean() <= BF16_MEAN_TOL * spread
    assert np.abs(ours - ref).max() <= BF16_MAX_TOL * spread
    top2 = np.sort(ours, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 0.05 * spread
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(out[:, t:][clear], ours.argmax(-1)[clear])


def test_cached_decoding_equals_full_forward(tiny):
    model, params = tiny
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], pad=0)
    b, t = ids.shape
    new = 12
    step = jax.jit(forward, static_argnums=0)
    head = output_projection(model, params)
    # The cached path, one token at a time, feeding the greedy token back.
    logits, cache, full_mask, lengths = prefill(model, params, head, jnp.asarray(ids), jnp.asarray(mask), t + new)
    seq, cached_logits = np.pad(ids, ((0, 0), (0, new))), [logits]
    for i in range(new - 1):
        seq[:, t + i] = np.argmax(cached_logits[-1], axis=-1)
        logits, cache = step(model, params, head, jnp.asarray(seq[:, t + i:t + i + 1]), full_mask,
                             (lengths + i)[:, None], cache)
        cached_logits.append(logits)

    # Recompute the whole sequence at every step. The not-yet-generated slots are masked padding on the
    # right (a causal model's logits cannot depend on them), which keeps one shape and one compilation.
    @jax.jit
    def full_forward(seq, length):
        seq_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, new)), constant_values=1)) * (jnp.arange(t + new) < length)
        positions = jnp.maximum(jnp.cumsum(seq_mask, 1) - 1, 0)
        logits = model.apply({"params": params}, seq, attention_mask=seq_mask, position_ids=positions).logits
        return jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)

    for i, logits in enumerate(cached_logits):
        np.testing.assert_allclose(logits, full_forward(jnp.asarray(seq), t + i), atol=2e-5, rtol=1e-5)
    # And generate's jitted loop produces the same greedy tokens.
    seq[:, -1] = np.argmax(cached_logits[-1], axis=-1)
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=new), seq)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(repetition_penalty=1.4, no_repeat_ngram_size=2),
    dict(num_beams=3, num_return_sequences=2, eos_token_id=EOT),
], ids=["greedy", "penalties", "beam"])
def test_left_padded_batch_equals_one_at_a_time(tiny, kwargs):
    model, params = tiny
    prompts = [[1, 2, 3, 4, 5, 6, 7], [300, 301], [42, 43, 44, 45]]
    ids, mask = left_pad(prompts, pad=0)
    batch = np.asarray(generate(model, params, ids, mask, max_new_tokens=16, **kwargs))
    n = kwargs.get("num_return_sequences", 1)
    for i, p in enumerate(prompts):
        alone = np.asarray(generate(model, params, [p], max_new_tokens=16, **kwargs))
        np.testing.assert_array_equal(batch[i * n:(i + 1) * n, ids.shape[1] - len(p):], alone)


def test_eos_stops_the_row_and_pads_the_rest(tiny):
    model, params = tiny
    ids, mask = left_pad([[1, 2, 3], [7, 8, 9, 10]], pad=0)
    free = np.asarray(generate(model, params, ids, mask, max_new_tokens=10))
    eos = int(free[0, ids.shape[1] + 3])  # row 0's 4th new token
    out = np.asarray(generate(model, params, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=1))
    for row in range(2):
        new = free[row, ids.shape[1]:]
        hit = np.flatnonzero(new == eos)
        end = hit[0] + 1 if hit.size else len(new)
        np.testing.assert_array_equal(out[row, :ids.shape[1] + end], free[row, :ids.shape[1] + end])
        assert (out[row, ids.shape[1] + end:] == 1).all()
    assert (out[0, ids.shape[1] + 4:] == 1).all()


def test_prompt_lengths_in_one_bucket_share_the_compiled_loop(tiny):
    model, params = tiny
    generate(model, params, [[1, 2, 3, 4, 5]], max_new_tokens=20)
    compiled = sampling.generate_tokens._cache_size()
    generate(model, params, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], max_new_tokens=20)
    generate(model, params, [[9, 8, 7]], max_new_tokens=30, do_sample=False, seed=5)
    assert sampling.generate_tokens._cache_size() == compiled


def test_empty_prompt_starts_from_endoftext(tiny):
    model, params = tiny
    out = generate(model, params, np.zeros((2, 0), np.int32), max_new_tokens=5)
    np.testing.assert_array_equal(out, generate(model, params, [[EOT], [EOT]], max_new_tokens=5))
    assert out.shape == (2, 6)


@pytest.mark.parametrize("tokens_per_chunk", [1, 4])
def test_stream_yields_what_generate_returns(tiny, tokens_per_chunk):
    model, params = tiny
    ids, mask = left_pad([[1, 2, 3], [7, 8, 9, 10]], pad=0)
    kwargs = dict(max_new_tokens=9, do_sample=True, top_k=20, seed=3)
    chunks = list(generate_stream(model, params, ids, mask, tokens_per_chunk=tokens_per_chunk, **kwargs))
    assert all(0 < c.shape[1] <= tokens_per_chunk for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks, 1), generate(model, params, ids, mask, **kwargs)[:, 4:])


def test_stream_stops_when_every_row_has_ended(tiny):
    model, params = tiny
    free = np.asarray(generate(model, params, [[1, 2, 3]], max_new_tokens=10))
    eos = int(free[0, 5])  # the 3rd new token
    chunks = list(generate_stream(model, params, [[1, 2, 3]], max_new_tokens=10, eos_token_id=eos))
    np.testing.assert_array_equal(np.concatenate(chunks, 1)[0], free[0, 3:6])


def test_num_return_sequences_samples_each_prompt(tiny):
    model, params = tiny
    out = np.asarray(generate(model, params, [[1, 2, 3], [4, 5, 6]], max_new_tokens=12, do_sample=True,
                              num_return_sequences=3, seed=1))
    assert out.shape == (6, 15)
    np.testing.assert_array_equal(out[:3, :3], [[1, 2, 3]] * 3)
    np.testing.assert_array_equal(out[3:, :3], [[4, 5, 6]] * 3)
    assert len({tuple(r) for r in out[:3, 3:].tolist()}) > 1


ERRORS = [
    (dict(input_ids=[1, 2, 3]), ValueError, r"input_ids must be \[batch, length\]"),
    (dict(input_ids=[[1, 2, 50257]]), ValueError, r"input_ids must lie in \[0, 50257\)"),
    (dict(input_ids=[[1.5, 2.0]]), TypeError, "input_ids must be an integer array"),
    (dict(attention_mask=[[1, 1]]), ValueError, "attention_mask has shape"),
    (dict(attention_mask=[[1, 1, 0]]), ValueError, "must be left-padded"),
    (dict(attention_mask=[[1, 2, 1]]), ValueError, "only 0 .padding. and 1"),
    (dict(input_ids=[[1, 2], [3, 4]], attention_mask=[[1, 1], [0, 0]]), ValueError, r"rows \[1\] .* all padding"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=254), ValueError, r"prompt length 3 \+ max_new_tokens 254 = 257 exceeds .*n_positions=256"),
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature must be > 0"),
    # Non-finite or overflowing numbers used to give degenerate tokens instead of an error.
    (dict(do_sample=True, temperature=1e-39), ValueError, "temperature must be > 0 and at least 0.0001"),
    (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature must be"),
    (dict(do_sample=True, top_p=float("nan")), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=float("inf")), ValueError, "repetition_penalty must be > 0 and finite"),
    (dict(num_beams=2, length_penalty=float("nan")), ValueError, "length_penalty must be a finite number"),
    (dict(seed=99999999999), ValueError, r"seed must be an integer in \[0, 2\*\*32 - 1\]"),
    (dict(seed=-1), ValueError, r"seed must be an integer in \[0, 2\*\*32 - 1\]"),
    (dict(seed=1.5), ValueError, "seed must be an integer"),
    (dict(do_sample=True, top_k=-1), ValueError, "top_k must be an integer >= 0"),
    (dict(do_sample=True, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty must be > 0"),
    (dict(no_repeat_ngram_size=-2), ValueError, "no_repeat_ngram_size must be an integer >= 0"),
    (dict(num_beams=0), ValueError, "num_beams must be a positive integer"),
    (dict(num_beams=2, num_return_sequences=3), ValueError, r"num_return_sequences \(3\) cannot exceed num_beams"),
    (dict(num_return_sequences=2), ValueError, "greedy decoding returns a single sequence"),
    (dict(eos_token_id=50257), ValueError, r"eos_token_id must be None or a token id"),
    (dict(pad_token_id=-1), ValueError, r"pad_token_id must be None or a token id"),
]


@pytest.mark.parametrize("kwargs, error, match", ERRORS, ids=[m for _, _, m in ERRORS])
def test_bad_arguments_are_clear_errors(tiny, kwargs, error, match):
    model, params = tiny
    kwargs = {"input_ids": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=match):
        generate(model, params, **kwargs)


def test_seeds_use_all_32_bits(tiny):
    model, params = tiny
    kwargs = dict(max_new_tokens=6, do_sample=True)
    high = generate(model, params, [[1, 2, 3]], seed=2**32 - 1, **kwargs)
    np.testing.assert_array_equal(generate(model, params, [[1, 2, 3]], seed=2**32 - 1, **kwargs), high)
    assert not np.array_equal(generate(model, params, [[1, 2, 3]], seed=2**31 - 1, **kwargs), high)


def test_generate_needs_a_language_model():
    model = GPT2DoubleHeadsModel(GPT2Config.from_preset("tiny"))
    with pytest.raises(TypeError, match="needs a GPT2LMHeadModel"):
        generate(model, {}, [[1, 2]], max_new_tokens=2)


def test_the_length_ladder():
    """One ladder for prompts, caches, scored rows and the server's prompt buckets (utils/buckets.py)."""
    from flax_gpt2.utils.buckets import bucket_length, buckets_up_to

    assert [bucket_length(n) for n in (1, 16, 17, 100, 256, 257, 384, 385, 1000)] == \
        [16, 16, 32, 128, 256, 384, 384, 512, 1024]
    assert bucket_length(300, cap=320) == 320 and bucket_length(300, cap=350) == 350
    assert bucket_length(330, cap=320) == 330  # never below the length itself
    assert buckets_up_to(1024) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]
    assert buckets_up_to(100) == [16, 32, 64, 100] and buckets_up_to(16) == [16]


def test_generate_options_travel_as_one_object(tiny):
    """`options=` carries every setting; keywords override its fields; the result equals plain keywords."""
    from flax_gpt2.generation import GenerateOptions

    model, params = tiny
    ids, mask = left_pad(PROMPTS)
    options = GenerateOptions(max_new_tokens=6, do_sample=True, temperature=0.8, seed=3, eos_token_id=EOT)
    by_keywords = generate(model, params, ids, mask, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=5,
                           seed=3, eos_token_id=EOT)
    np.testing.assert_array_equal(generate(model, params, ids, mask, options=options, top_k=5), by_keywords)
    assert not np.array_equal(generate(model, params, ids, mask, options=options), by_keywords)  # top_k matters
    with pytest.raises(TypeError, match="unknown generation option.*tok_k"):
        generate(model, params, ids, mask, max_new_tokens=2, tok_k=5)
    with pytest.raises(TypeError, match="max_new_tokens"):
        generate(model, params, ids, mask)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, params, ids, mask, options=options.replace(top_p=float("nan")))

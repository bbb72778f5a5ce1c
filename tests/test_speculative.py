"""Speculative decoding: greedy output identical to `generate` (draft models of other depths/widths, both
layer layouts, prompt lookup, left-padded batches, EOS, several max_new_tokens and k), a draft equal to the
target keeps every proposal, sampling keeps the target's distribution (and a wrong acceptance rule is caught),
one compilation per bucket, and argument errors."""

import jax
import numpy as np
import pytest
from conftest import left_padded
from scipy import stats as scipy_stats

from flax_gpt2 import GPT2Config, GPT2LMHeadModel, init_params
from flax_gpt2.generation import generate, generate_stream, speculative
from flax_gpt2.generation.logits_processors import GenerationConfig
from flax_gpt2.generation.speculative import lookup_proposals, speculative_generate

VOCAB = 96
PROMPTS = [[5, 17, 3], [40, 2, 2, 71, 9, 33, 12, 8, 50], [7], [11, 60, 4, 4, 90, 23]]


def make(seed, *, n_layer, n_embd, n_head, vocab=VOCAB, n_positions=128, init=0.3, scan_layers=False):
    """A random-init model; a large initializer_range makes the next-token distribution peaked and varied,
    so greedy text is not one repeated token and argmax ties are far apart."""
    config = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        initializer_range=init, scan_layers=scan_layers)
    model = GPT2LMHeadModel(config)
    return model, init_params(model, jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def models():
    """Target and draft per layer layout: per-layer target with a 1-layer, 32-wide draft; scanned target
    with a scanned 2-layer, 48-wide draft (another depth, width and head count)."""
    return {
        "per_layer": (make(0, n_layer=3, n_embd=64, n_head=4), make(1, n_layer=1, n_embd=32, n_head=2)),
        "scan": (make(0, n_layer=3, n_embd=64, n_head=4, scan_layers=True),
                 make(2, n_layer=2, n_embd=48, n_head=3, scan_layers=True)),
    }


def left_pad(prompts, pad=0):
    return left_padded(prompts, pad)


def eos_mid_text(reference, prompt_len):
    """A token that some row produces after a few new tokens but not as its first: so EOS cuts that row
    mid-way while the others go on."""
    new = reference[:, prompt_len:]
    for token in new[:, 3:].ravel():
        if not (new[:, :2] == token).any():
            return int(token)
    raise AssertionError("no candidate EOS token in the reference text")


@pytest.mark.parametrize("layout,k", [("per_layer", 1), ("per_layer", 3), ("per_layer", 4), ("scan", 1), ("scan", 4)])
def test_greedy_equals_generate(models, layout, k):
    (model, params), (draft, draft_params) = models[layout]
    ids, mask = left_pad(PROMPTS)
    for max_new_tokens in (1, 7, 24):
        reference = generate(model, params, ids, mask, max_new_tokens=max_new_tokens)
        assert len(set(reference[:, ids.shape[1]:].ravel().tolist())) > min(max_new_tokens, 8)
        eos_cases = [None] if max_new_tokens < 7 else [None, eos_mid_text(reference, ids.shape[1])]
        for eos in eos_cases:
            if eos is not None:
                reference = generate(model, params, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                     pad_token_id=1)
                assert (reference[:, ids.shape[1]:] == eos).any()
            ours = speculative_generate(model, params, ids, mask, max_new_tokens=max_new_tokens,
                                        draft=(draft, draft_params), num_draft_tokens=k, eos_token_id=eos,
                                        pad_token_id=None if eos is None else 1)
            assert ours.shape == reference.shape
            np.testing.assert_array_equal(ours, reference, err_msg=f"max_new_tokens={max_new_tokens} eos={eos}")


@pytest.mark.parametrize("ngram,k", [(2, 3), (1, 4), (3, 1)])
def test_prompt_lookup_greedy_equals_generate(models, ngram, k):
    (model, params), _ = models["per_layer"]
    # Prompts that repeat themselves, so lookup finds matches (and one row never does: a single token).
    prompts = [[5, 17, 3, 8, 5, 17], [40, 2, 2, 71, 40, 2, 2, 71, 40], [7], PROMPTS[3]]
    ids, mask = left_pad(prompts)
    reference = generate(model, params, ids, mask, max_new_tokens=30)
    eos = eos_mid_text(reference, ids.shape[1])
    for eos_token_id in (None, eos):
        reference = generate(model, params, ids, mask, max_new_tokens=30, eos_token_id=eos_token_id)
        ours, stats = speculative_generate(model, params, ids, mask, max_new_tokens=30, prompt_lookup_ngram=ngram,
                                           num_draft_tokens=k, eos_token_id=eos_token_id, return_stats=True)
        np.testing.assert_array_equal(ours, reference)
    # Random greedy text falls into loops, which lookup predicts: proposals were made and most kept.
    assert stats["proposed"].sum() > 0 and stats["accepted"].sum() > stats["proposed"].sum() / 2


def test_lookup_proposals_follow_the_most_recent_match():
    tokens = np.array([[0, 1, 2, 3, 1, 2, 4, 1, 2, 0, 0], [9, 9, 5, 6, 7, 5, 6, 0, 0, 0, 0]])
    real = np.array([[False] + [True] * 10, [False, False] + [True] * 9])
    last = np.array([8, 6])  # rows end with "1 2" and "5 6"
    proposals, count = lookup_proposals(tokens, real, last, 2, 3)
    # Row 0: "1 2" last occurred ending at column 5 -> 4 1 2. Row 1: ending at column 3 -> 7 5 6.
    np.testing.assert_array_equal(proposals, [[4, 1, 2], [7, 5, 6]])
    np.testing.assert_array_equal(count, [3, 3])
    # A match whose continuation reaches the current token proposes only the known tokens;
    # padding never matches.
    proposals, count = lookup_proposals(np.array([[3, 3, 3, 3, 3]]), np.array([[False, True, True, True, True]]),
                                        np.array([4]), 2, 3)
    np.testing.assert_array_equal(count, [1])
    assert proposals[0, 0] == 3
    # In a loop shorter than k, an older occurrence with k tokens after it wins over the latest one.
    proposals, count = lookup_proposals(np.array([[5, 6, 5, 6, 5, 6, 0]]), np.ones((1, 7), bool), np.array([5]), 2, 3)
    np.testing.assert_array_equal(proposals, [[5, 6, 5]])
    np.testing.assert_array_equal(count, [3])
    _, count = lookup_proposals(tokens, real, np.array([2, 3]), 2, 3)
    np.testing.assert_array_equal(count, [0, 0])


def test_draft_equal_to_target_keeps_every_proposal(models):
    (model, params), _ = models["per_layer"]
    ids, mask = left_pad(PROMPTS)
    reference = generate(model, params, ids, mask, max_new_tokens=20)
    ours, stats = speculative_generate(model, params, ids, mask, max_new_tokens=20, draft=(model, params),
                                       num_draft_tokens=3, return_stats=True)
    np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(stats["accepted"], stats["proposed"])
    np.testing.assert_array_equal(stats["rounds"], 5)  # 20 tokens, 4 per round
    np.testing.assert_array_equal(stats["acceptance_rate"], 1.0)
    np.testing.assert_array_equal(stats["kept_counts"], [[0, 0, 0, 5]] * len(PROMPTS))


@pytest.mark.parametrize("layout,k", [("per_layer", 4), ("scan", 6)])
def test_heuristic_schedule_greedy_equals_generate(models, layout, k):
    """`draft_schedule="heuristic"`: a draft that keeps failing is asked for fewer tokens (k, k-1, ... 1), one
    that always succeeds stays at k; the output is the target's greedy decoding either way (EOS included),
    also streamed."""
    (model, params), (draft, draft_params) = models[layout]
    ids, mask = left_pad(PROMPTS)
    reference = generate(model, params, ids, mask, max_new_tokens=24)
    eos = eos_mid_text(reference, ids.shape[1])
    for eos_token_id in (None, eos):
        reference = generate(model, params, ids, mask, max_new_tokens=24, eos_token_id=eos_token_id, pad_token_id=1)
        spec = dict(max_new_tokens=24, eos_token_id=eos_token_id, pad_token_id=1, num_draft_tokens=k,
                    return_stats=True)
        constant, c_stats = speculative_generate(model, params, ids, mask, draft=(draft, draft_params), **spec)
        ours, stats = speculative_generate(model, params, ids, mask, draft=(draft, draft_params),
                                           draft_schedule="heuristic", **spec)
        np.testing.assert_array_equal(ours, reference)
        np.testing.assert_array_equal(constant, reference)
        # A random draft is rarely right: the constant schedule proposes k every round, the heuristic one
        # quickly drops to 1 per round.
        np.testing.assert_array_equal(c_stats["proposed"], k * c_stats["rounds"])
        np.testing.assert_array_equal(c_stats["kept_counts"].sum(1), c_stats["rounds"])
        np.testing.assert_array_equal(c_stats["kept_counts"] @ np.arange(k + 1), c_stats["accepted"])
        assert stats["proposed"].sum() < 0.6 * c_stats["proposed"].sum()
        assert (stats["proposed"] >= stats["rounds"]).all()
        chunks = list(generate_stream(model, params, ids, mask, max_new_tokens=24, eos_token_id=eos_token_id,
                                      pad_token_id=1, num_draft_tokens=k, draft=(draft, draft_params),
                                      draft_schedule="heuristic"))
        np.testing.assert_array_equal(np.concatenate(chunks, axis=1), reference[:, ids.shape[1]:])
    # The target drafting for itself keeps everything: the schedule stays at k.
    ours, stats = speculative_generate(model, params, ids, mask, max_new_tokens=20, draft=(model, params),
                                       num_draft_tokens=3, draft_schedule="heuristic", return_stats=True)
    np.testing.assert_array_equal(ours, generate(model, params, ids, mask, max_new_tokens=20))
    np.testing.assert_array_equal(stats["rounds"], 5)
    np.testing.assert_array_equal(stats["proposed"], 15)


# --- sampling: the output distribution is the target's -----------------------------------------------

SMALL_VOCAB = 12
SAMPLE_PROMPT = [3, 7, 1, 3, 7]  # lookup proposes "1 3 7" after the last "3 7"


@pytest.fixture(scope="module")
def small_models():
    """A tiny-vocabulary target (its first two tokens spread over 90 cells that hold >= 5 expected samples
    unwarped, 47 warped) and a draft whose distribution differs clearly from it."""
    target = make(0, n_layer=3, n_embd=64, n_head=4, vocab=SMALL_VOCAB, n_positions=16, init=0.2)
    draft = make(5, n_layer=1, n_embd=32, n_head=2, vocab=SMALL_VOCAB, n_positions=16, init=0.3)
    return target, draft


def exact_pair_distribution(model, params, prompt, strategy):
    """`[V, V]` probability of the first two new tokens, from full forward passes and the same warpers."""
    v = model.config.vocab_size
    first = strategy.warp(model.apply({"params": params}, np.array([prompt])).logits[:, -1])
    seqs = np.concatenate([np.tile(prompt, (v, 1)), np.arange(v)[:, None]], axis=1)
    second = strategy.warp(model.apply({"params": params}, seqs).logits[:, -1])
    return np.asarray(jax.nn.softmax(first, -1)[0][:, None] * jax.nn.softmax(second, -1), np.float64)


def sample_pairs(target, proposer, options, acceptance, rows=4096, calls=3):
    """Counts `[V, V]` of the first two new tokens over `rows * calls` samples (batches of identical rows)."""
    (model, params) = target
    ids = np.tile(SAMPLE_PROMPT, (rows, 1))
    counts = np.zeros((SMALL_VOCAB, SMALL_VOCAB), np.int64)
    for seed in range(calls):
        out = speculative._generate(model, params, ids, max_new_tokens=2, seed=seed, do_sample=True,
                                    acceptance=acceptance, **proposer, **options)
        np.add.at(counts, (out[:, -2], out[:, -1]), 1)
    return counts


def chi_square_p(counts, probs):
    """Chi-square goodness of fit, pooling the cells expected to hold fewer than 5 samples."""
    n = counts.sum()
    expected = probs.ravel() * n
    observed = counts.ravel()
    if (observed[probs.ravel() == 0] > 0).any():
        return 0.0  # a token the target can never produce
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return scipy_stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


SAMPLING_CASES = {
    "plain": dict(temperature=1.0),
    "warped": dict(temperature=1.5, top_k=8, top_p=0.95),
}


@pytest.mark.parametrize("proposer_name", ["draft", "lookup"])
@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_keeps_the_target_distribution(small_models, case, proposer_name):
    target, draft = small_models
    options = SAMPLING_CASES[case]
    proposer = (dict(draft=draft, num_draft_tokens=3) if proposer_name == "draft"
                else dict(prompt_lookup_ngram=2, num_draft_tokens=3))
    strategy = GenerationConfig.create(do_sample=True, **options)
    probs = exact_pair_distribution(*target, SAMPLE_PROMPT, strategy)
    counts = sample_pairs(target, proposer, options, "rejection")
    tv = 0.5 * np.abs(counts / counts.sum() - probs).sum()
    assert chi_square_p(counts, probs) > 1e-3
    assert tv < 0.04
    if case != "warped":  # (the wrong rules below once per proposer: they only cost time)
        return
    # The same test catches a wrong rule: keeping every proposal samples the proposer's distribution.
    wrong = sample_pairs(target, proposer, options, "always", calls=1)
    assert chi_square_p(wrong, probs) < 1e-3
    assert 0.5 * np.abs(wrong / wrong.sum() - probs).sum() > 0.1
    if proposer_name == "draft":
        # And a subtle one: the right test, but a rejected token drawn from p instead of max(0, p - q).
        wrong = sample_pairs(target, proposer, options, "resample_target", calls=2)
        assert chi_square_p(wrong, probs) < 1e-3


# --- compilation and errors ------------------------------------------------------------------------------

def test_no_recompilation_for_new_prompts_in_the_same_bucket(models):
    (model, params), (draft, draft_params) = models["per_layer"]
    compiles = []

    def listener(event, *_, **__):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    kwargs = dict(draft=(draft, draft_params), num_draft_tokens=3, do_sample=True)
    speculative_generate(model, params, *left_pad(PROMPTS), max_new_tokens=10, temperature=0.9, **kwargs)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(0)
        # Other prompt lengths in the same bucket, other max_new_tokens in the same cache bucket, other
        # temperatures and seeds (so other acceptance lengths): the same compiled loop.
        for length, max_new_tokens, seed in ((5, 10, 1), (12, 9, 2), (16, 12, 3)):
            prompts = [rng.integers(0, VOCAB, n).tolist() for n in (length, 1, length // 2 + 1, 3)]
            speculative_generate(model, params, *left_pad(prompts), max_new_tokens=max_new_tokens, seed=seed,
                                 temperature=0.5 + seed / 10, **kwargs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_draft_with_a_larger_vocabulary_and_vocab_limit(models):
    (model, params), _ = models["per_layer"]
    draft, draft_params = make(4, n_layer=1, n_embd=32, n_head=2, vocab=VOCAB + 8)
    ids, mask = left_pad([[t % (VOCAB - 6) for t in p] for p in PROMPTS])
    reference = generate(model, params, ids, mask, max_new_tokens=8, vocab_limit=VOCAB - 6)
    ours = speculative_generate(model, params, ids, mask, max_new_tokens=8, draft=(draft, draft_params),
                                num_draft_tokens=2, vocab_limit=VOCAB - 6)
    np.testing.assert_array_equal(ours, reference)


def test_argument_errors(models):
    (model, params), (draft, draft_params) = models["per_layer"]
    ids, mask = left_pad(PROMPTS)
    with pytest.raises(ValueError, match="exactly one proposer"):
        speculative_generate(model, params, ids, mask, max_new_tokens=4)
    with pytest.raises(ValueError, match="exactly one proposer"):
        speculative_generate(model, params, ids, mask, max_new_tokens=4, draft=(draft, draft_params),
                             prompt_lookup_ngram=2)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        speculative_generate(model, params, ids, mask, max_new_tokens=4, prompt_lookup_ngram=2, num_draft_tokens=0)
    with pytest.raises(ValueError, match="prompt_lookup_ngram"):
        speculative_generate(model, params, ids, mask, max_new_tokens=4, prompt_lookup_ngram=0)
    with pytest.raises(ValueError, match="draft must be a pair"):
        speculative_generate(model, params, ids, mask, max_new_tokens=4, draft=draft)
    small_vocab, small_params = make(3, n_layer=1, n_embd=32, n_head=2, vocab=VOCAB - 1)
    with pytest.raises(ValueError, match="vocab_limit"):
        speculative_generate(model, params, ids, mask, max_new_tokens=4, draft=(small_vocab, small_params))
    short, short_params = make(3, n_layer=1, n_embd=32, n_head=2, n_positions=16)
    with pytest.raises(ValueError, match="n_positions"):
        speculative_generate(model, params, ids, mask, max_new_tokens=20, draft=(short, short_params))
    with pytest.raises(ValueError, match="draft_schedule must be one of"):
        speculative_generate(model, params, ids, mask, max_new_tokens=4, draft=(draft, draft_params),
                             draft_schedule="adaptive")
    with pytest.raises(ValueError, match="prompt lookup's proposals cost nothing"):
        speculative_generate(model, params, ids, mask, max_new_tokens=4, prompt_lookup_ngram=2,
                             draft_schedule="heuristic")
    with pytest.raises(ValueError, match="max_new_tokens"):  # generate's own checks apply
        speculative_generate(model, params, ids, mask, max_new_tokens=0, prompt_lookup_ngram=2)


def test_generate_dispatches_to_speculative(models):
    (model, params), (draft, draft_params) = models["per_layer"]
    ids, mask = left_pad(PROMPTS)
    reference = generate(model, params, ids, mask, max_new_tokens=24)
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=24, draft=(draft, draft_params),
                                           num_draft_tokens=3), reference)
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=24, prompt_lookup_ngram=2,
                                           num_draft_tokens=3), reference)
    for unsupported in (dict(num_beams=2), dict(repetition_penalty=1.2), dict(no_repeat_ngram_size=2),
                        dict(num_return_sequences=2, do_sample=True)):
        with pytest.raises(ValueError, match="speculative decoding"):
            generate(model, params, ids, mask, max_new_tokens=4, prompt_lookup_ngram=2, **unsupported)


@pytest.mark.parametrize("proposer", ["draft", "lookup"])
def test_generate_stream_yields_accepted_tokens_that_add_up_to_generate(models, proposer):
    """Streamed speculative decoding: chunks of varying length (what each round accepted for every row) that
    concatenate to `generate`'s new tokens exactly, EOS and left padding included; the rounds compile once."""
    (model, params), _ = models["per_layer"]
    ids, mask = left_pad(PROMPTS)
    # The target as its own draft accepts every proposal; lookup follows the loops random greedy text falls into.
    spec = dict(draft=(model, params)) if proposer == "draft" else dict(prompt_lookup_ngram=1)
    reference = generate(model, params, ids, mask, max_new_tokens=24)
    eos = eos_mid_text(reference, ids.shape[1])
    for eos_token_id in (None, eos):
        reference = generate(model, params, ids, mask, max_new_tokens=24, eos_token_id=eos_token_id, pad_token_id=1)
        chunks = list(generate_stream(model, params, ids, mask, max_new_tokens=24, eos_token_id=eos_token_id,
                                      pad_token_id=1, num_draft_tokens=3, **spec))
        np.testing.assert_array_equal(np.concatenate(chunks, axis=1), reference[:, ids.shape[1]:])
        assert all(c.shape[1] >= 1 for c in chunks)
        assert len(chunks) <= (7 if proposer == "draft" else 20)  # rounds accepted several tokens at once
    compiles = []

    def listener(event, *_, **__):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        list(generate_stream(model, params, ids, mask, max_new_tokens=20, num_draft_tokens=3, seed=1, **spec))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []  # another max_new_tokens in the same cache bucket: no new program per chunk
    with pytest.raises(ValueError, match="tokens_per_chunk"):
        next(generate_stream(model, params, ids, mask, max_new_tokens=4, tokens_per_chunk=0, **spec))
    with pytest.raises(ValueError, match="does not support num_beams"):
        next(generate_stream(model, params, ids, mask, max_new_tokens=4, num_beams=2, **spec))

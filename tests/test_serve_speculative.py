"""`serve --draft_model`: speculative decoding in the server, driven by the official `openai` client against the
real server. The draft is the target cut to its first layer (the same embeddings), so it agrees with the target
on some tokens and not on others: both the kept and the rejected paths run. Greedy requests (plain, streamed,
with stop strings) equal `generate`'s tokens; sampled and logprob requests, which share the batch without
drafting, equal what the plain server gives them. With `--draft_sampled` sampled requests draft too, and the
rounds' tokens follow the model's own distribution (a chi-square test of the slots on a tiny vocabulary)."""

import concurrent.futures
import http.client

import numpy as np
import openai
import pytest
from conftest import make_hf_model
from serve_process import server_process

from flax_gpt2 import from_pretrained, generate, get_tokenizer
from flax_gpt2.serve.__main__ import parse_args

EOT = 50256


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """`(target_folder, draft_folder)`: a random 3-layer target and its first layer as the draft."""
    import transformers

    torch_model, folder = make_hf_model(tmp_path_factory, "spec_target", n_positions=128, n_layer=3,
                                        initializer_range=0.3)
    draft = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**torch_model.config.to_dict(), "n_layer": 1}))
    missing = draft.load_state_dict(torch_model.state_dict(), strict=False).missing_keys
    assert not missing  # every draft weight is the target's (its layers 1 and 2 are dropped)
    draft_folder = tmp_path_factory.mktemp("spec_draft")
    draft.save_pretrained(draft_folder)
    return folder, draft_folder


def _serve(pair, tmp_path_factory, *flags):
    folder, draft_folder = pair
    args = ["--model", str(folder), "--served_model_name", "tiny", "--max_batch", "8", "--context_length", "128",
            "--prompt_buckets", "16,64", "--decode_steps", "4", "--prefix_block", "8", "--prefill_chunk", "16",
            "--draft_model", str(draft_folder), "--num_draft_tokens", "3", *flags]
    return server_process(args, tmp_path_factory)


@pytest.fixture(scope="module")
def served(pair, tmp_path_factory, bpe_dir):
    with _serve(pair, tmp_path_factory) as (port, _):
        yield port, from_pretrained(pair[0], progress=False)


def _client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)


def _text(reference, ids, max_tokens, **kwargs):
    model, params = reference
    tokens = generate(model, params, [ids], max_new_tokens=max_tokens, **kwargs)[0, len(ids):].tolist()
    return get_tokenizer().decode(tokens[:tokens.index(EOT)] if EOT in tokens else tokens)


def _metrics(port) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}


def test_greedy_requests_equal_generate_while_sampled_ones_share_the_batch(served):
    """Nine requests at once: greedy ones of prompt lengths 1 to 70 (some streamed, one with `n=2`), sampled
    ones (seeded, with top_p) and a greedy one with logprobs. Every greedy text is `generate`'s, every sampled
    one `generate(do_sample=True, seed=...)`'s; the draft's proposals were both kept and rejected, and nothing
    compiled after warm-up."""
    port, reference = served
    client = _client(port)
    rng = np.random.RandomState(3)
    greedy = [(rng.randint(0, EOT, n).tolist(), m) for n, m in ((1, 40), (5, 33), (12, 60), (30, 17), (70, 50))]
    sampled = [(rng.randint(0, EOT, n).tolist(), m) for n, m in ((4, 30), (9, 25))]
    before = _metrics(port)

    def complete(ids, max_tokens, stream):
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0, stream=True))
        out = client.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0, n=2)
        assert out.choices[0].text == out.choices[1].text
        return out.choices[0].text

    def sample(ids, max_tokens):
        return client.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, seed=7,
                                         top_p=0.9).choices[0].text

    def with_logprobs(ids):
        return client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, logprobs=2)

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        greedy_out = [pool.submit(complete, ids, m, i % 2 == 0) for i, (ids, m) in enumerate(greedy)]
        sampled_out = [pool.submit(sample, ids, m) for ids, m in sampled]
        scored = pool.submit(with_logprobs, greedy[1][0])
        greedy_out = [f.result() for f in greedy_out]
        sampled_out = [f.result() for f in sampled_out]
        scored = scored.result()
    assert greedy_out == [_text(reference, ids, m) for ids, m in greedy]
    assert sampled_out == [_text(reference, ids, m, do_sample=True, seed=7, top_p=0.9) for ids, m in sampled]
    assert scored.choices[0].text == _text(reference, greedy[1][0], 12)
    assert len(scored.choices[0].logprobs.tokens) == 12
    after = _metrics(port)
    proposed = after["flax_gpt2_draft_tokens_proposed_total"] - before["flax_gpt2_draft_tokens_proposed_total"]
    accepted = after["flax_gpt2_draft_tokens_accepted_total"] - before["flax_gpt2_draft_tokens_accepted_total"]
    assert 0 < accepted < proposed
    assert after["flax_gpt2_compiles_after_warmup_total"] == 0


def test_a_drafting_row_stops_at_its_stop_string_and_max_tokens(served):
    """A greedy request that keeps several tokens per round still ends exactly at its stop string or
    `max_tokens`: the text is `generate`'s cut there, and the usage counts the tokens actually returned."""
    port, reference = served
    client = _client(port)
    ids = np.random.RandomState(11).randint(0, EOT, 6).tolist()
    full = _text(reference, ids, 40)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=40, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == full[:full.index(stop)]
    for m in (1, 2, 3, 4, 5, 7):
        out = client.completions.create(model="tiny", prompt=ids, max_tokens=m, temperature=0)
        assert out.choices[0].text == _text(reference, ids, m) and out.usage.completion_tokens == m


@pytest.mark.parametrize("flags", [["--mesh", "tensor=2"], ["--adapter", "a=/nowhere"],
                                   ["--compile_only", "v5litepod-1"]])
def test_draft_model_refuses_what_it_does_not_serve_with(flags, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "gpt2", "--draft_model", "distilgpt2", *flags])
    assert e.value.code == 2
    assert f"--draft_model with {flags[0]} is not supported" in capsys.readouterr().err


def test_draft_sampled_needs_a_draft_model(capsys):
    from flax_gpt2.serve.engine import Engine

    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "gpt2", "--draft_sampled"])
    assert e.value.code == 2
    assert "--draft_sampled needs --draft_model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="draft_sampled needs a draft model"):
        Engine(*_tiny(), get_tokenizer(), context_length=64, draft_sampled=True)


def _tiny(**overrides):
    import flax.linen as nn
    import jax

    from flax_gpt2.modeling.config import GPT2Config
    from flax_gpt2.modeling.model import GPT2LMHeadModel

    config = GPT2Config(**{**dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2), **overrides})
    model = GPT2LMHeadModel(config)
    return model, nn.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 2), np.int32))["params"])


@pytest.mark.parametrize("draft_overrides,k,message", [
    (dict(n_positions=32), 4, "the draft's n_positions (32) is shorter than the served context (64)"),
    (dict(vocab_size=1000), 4, "the draft's vocab_size (1000) is smaller than the target's 50257 ids"),
    (dict(), 0, "num_draft_tokens must be an integer >= 1, got 0"),
])
def test_an_unfit_draft_is_refused_before_anything_compiles(draft_overrides, k, message):
    from flax_gpt2.serve.engine import Engine

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Engine(*_tiny(), get_tokenizer(), context_length=64, draft=_tiny(**draft_overrides), num_draft_tokens=k)


# --- sampled requests: the rejection rule in the slots ----------------------------------------------------


@pytest.fixture(scope="module")
def small_pair():
    """test_speculative's tiny-vocabulary target and draft (their distributions differ clearly)."""
    from test_speculative import SMALL_VOCAB, make

    target = make(0, n_layer=3, n_embd=64, n_head=4, vocab=SMALL_VOCAB, n_positions=16, init=0.2)
    draft = make(5, n_layer=1, n_embd=32, n_head=2, vocab=SMALL_VOCAB, n_positions=16, init=0.3)
    return target, draft


def _slot_pairs(target, draft, options, rows, seed, k=3):
    """The first two tokens `[rows, 2]` that `rows` copies of test_speculative's sample prompt get from the
    server's speculative rounds (a sampled row each, seeds `seed * rows + row`), as the engine runs them."""
    from test_speculative import SAMPLE_PROMPT

    from flax_gpt2.generation.model_step import output_projection
    from flax_gpt2.serve import slots as device, speculative_slots as spec

    (model, params), (draft_model, draft_params) = target, draft
    vocab = model.config.vocab_size
    head, draft_head = output_projection(model, params, vocab), output_projection(draft_model, draft_params, vocab)
    p = len(SAMPLE_PROMPT)
    ids, mask = np.array([SAMPLE_PROMPT], np.int32), np.ones((1, p), np.int32)
    slots = device.init_slots(model, 1, p + 2 + k + 1, vocab, draft_model, scratch=k + 1)
    slots = device.insert(slots, np.int32(0), np.int32(p), np.int32(p), ids,
                          *device.prefill_prompt(model, params, head, ids, mask))
    slots = device.insert_draft(slots, np.int32(0), np.int32(p),
                                *device.prefill_prompt(draft_model, draft_params, draft_head, ids, mask)[1:])
    slots = device.resize(slots, np.zeros(rows, np.int32))
    every = lambda value, dtype: np.full(rows, value, dtype)  # noqa: E731
    settings = device.RowSettings.empty(rows).replace(
        active=every(True, bool), greedy=every(False, bool), seed=np.arange(rows, dtype=np.uint32) + seed * rows,
        temperature=every(options.get("temperature", 1.0), np.float32), top_k=every(options.get("top_k", 0), np.int32),
        top_p=every(options.get("top_p", 1.0), np.float32), stop=every(p + 2, np.int32), draft=every(True, bool))
    slots, _, counts, _ = spec.speculative_steps(model, params, head, draft_model, draft_params, draft_head, slots,
                                                 settings, device.StepWork.of(settings), k=k, num_rounds=2,
                                                 sampled=True)
    assert (np.asarray(slots.pos) >= p + 2).all()
    return np.asarray(slots.tokens)[:, p:p + 2], np.asarray(counts)


@pytest.mark.parametrize("case", ["plain", "warped"])
def test_sampled_rows_keep_the_target_distribution(small_pair, case):
    """Sampled requests draft too: 12,288 rows of one prompt, each with its own seed, take their first two
    tokens from the server's speculative rounds (draft proposals kept by the rejection rule, a rejected one
    replaced by a draw from max(0, p - q)). Their joint distribution is the target's own (chi-square and total
    variation against the exact one, with temperature, top-k and top-p), while proposals were kept."""
    from test_speculative import SAMPLE_PROMPT, SAMPLING_CASES, SMALL_VOCAB, chi_square_p, exact_pair_distribution

    from flax_gpt2.generation.logits_processors import GenerationConfig

    target, draft = small_pair
    options = SAMPLING_CASES[case]
    probs = exact_pair_distribution(*target, SAMPLE_PROMPT, GenerationConfig.create(do_sample=True, **options))
    counts = np.zeros((SMALL_VOCAB, SMALL_VOCAB), np.int64)
    kept = 0
    for seed in range(3):
        pairs, made = _slot_pairs(target, draft, options, 4096, seed)
        np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
        kept += int(np.sum(made[0] > 1))
    assert kept > 1000  # the first round kept proposals in many rows: the rule ran, not just the plain step
    assert chi_square_p(counts, probs) > 1e-3
    assert 0.5 * np.abs(counts / counts.sum() - probs).sum() < 0.04


@pytest.fixture(scope="module")
def served_sampling(pair, tmp_path_factory, bpe_dir):
    with _serve(pair, tmp_path_factory, "--draft_sampled") as (port, _):
        yield port, from_pretrained(pair[0], progress=False)


def test_with_draft_sampled_sampled_requests_draft_too(served_sampling):
    """`--draft_sampled`: sampled requests (seeded, with top_p; `n=3`) draft, and proposals are kept. Each
    drafted text is the same when sent again alone (a row draws with its own seed, whatever shares the batch);
    greedy requests still equal `generate`, and a sampled request with logprobs, which does not draft, equals
    `generate(do_sample=True, seed=...)`; nothing compiled after warm-up. (That the drafted tokens follow the
    model's distribution: `test_sampled_rows_keep_the_target_distribution`.)"""
    port, reference = served_sampling
    client = _client(port)
    rng = np.random.RandomState(4)
    sampled = [(rng.randint(0, EOT, n).tolist(), m) for n, m in ((4, 30), (9, 25), (20, 40))]
    greedy = (rng.randint(0, EOT, 7).tolist(), 30)
    before = _metrics(port)

    def sample(ids, max_tokens, **kwargs):
        out = client.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, seed=7, top_p=0.9, **kwargs)
        return [c.text for c in out.choices]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        drafted = [pool.submit(sample, ids, m) for ids, m in sampled]
        several = pool.submit(sample, *sampled[0], n=3)
        scored = pool.submit(sample, *sampled[1], logprobs=1)
        plain = pool.submit(lambda: client.completions.create(model="tiny", prompt=greedy[0], max_tokens=greedy[1],
                                                              temperature=0).choices[0].text)
        drafted = [f.result() for f in drafted]
        several, scored, plain = several.result(), scored.result(), plain.result()
    assert plain == _text(reference, *greedy)
    assert scored == [_text(reference, *sampled[1], do_sample=True, seed=7, top_p=0.9)]
    assert several[0] == drafted[0][0] and len(set(several)) > 1  # choice 0 is the lone request's; others differ
    after = _metrics(port)
    proposed = after["flax_gpt2_draft_tokens_proposed_total"] - before["flax_gpt2_draft_tokens_proposed_total"]
    accepted = after["flax_gpt2_draft_tokens_accepted_total"] - before["flax_gpt2_draft_tokens_accepted_total"]
    assert 0 < accepted < proposed
    assert [sample(ids, m) for ids, m in sampled] == drafted
    assert _metrics(port)["flax_gpt2_compiles_after_warmup_total"] == 0

"""`serve --draft_model`: speculative decoding in the server, driven by the official `openai` client against the
real server. The draft is the target cut to its first layer (the same embeddings), so it agrees with the target
on some tokens and not on others: both the kept and the rejected paths run. Greedy requests (plain, streamed,
with stop strings) equal `generate`'s tokens; sampled and logprob requests, which share the batch without
drafting, equal what the plain server gives them."""

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
def served(tmp_path_factory, bpe_dir):
    import transformers

    torch_model, folder = make_hf_model(tmp_path_factory, "spec_target", n_positions=128, n_layer=3,
                                        initializer_range=0.3)
    draft = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**torch_model.config.to_dict(), "n_layer": 1}))
    missing = draft.load_state_dict(torch_model.state_dict(), strict=False).missing_keys
    assert not missing  # every draft weight is the target's (its layers 1 and 2 are dropped)
    draft_folder = tmp_path_factory.mktemp("spec_draft")
    draft.save_pretrained(draft_folder)
    args = ["--model", str(folder), "--served_model_name", "tiny", "--max_batch", "8", "--context_length", "128",
            "--prompt_buckets", "16,64", "--decode_steps", "4", "--prefix_block", "8", "--prefill_chunk", "16",
            "--draft_model", str(draft_folder), "--num_draft_tokens", "3"]
    with server_process(args, tmp_path_factory) as (port, _):
        yield port, from_pretrained(folder, progress=False)


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

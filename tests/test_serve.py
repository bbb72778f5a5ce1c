"""The completions server end to end: a real server in a subprocess, driven by the official `openai` client
and by raw HTTP, on a tiny random GPT-2 with the real vocabulary; results checked against `generate`."""

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import openai  # the `test` extra installs it, and the `serve` extra's starlette and uvicorn
import pytest
from conftest import make_hf_model
from serve_process import server_process

from flax_gpt2 import from_pretrained, generate, get_tokenizer
from flax_gpt2.generation.logits_processors import kth_largest

API_KEY = "sk-test-key"
CONTEXT_LENGTH = 128
MAX_BATCH = 4
MAX_QUEUE = 24
MAX_BODY = 65536
EOT = 50256


def _get(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def _post(port, body, headers=None, path="/v1/completions"):
    """Raw POST; `body` is sent as is when bytes, else as JSON. Returns (status, headers, parsed JSON or bytes)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, data, {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
                                      **(headers or {})})
    response = conn.getresponse()
    raw = response.read()
    try:
        raw = json.loads(raw)
    except ValueError:
        pass
    return response.status, {k.lower(): v for k, v in response.getheaders()}, raw


def _scrape(port) -> dict:
    """`GET /metrics` parsed by prometheus-client's own parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = _get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def _health(port) -> dict:
    status, _, body = _get(port, "/health")
    assert status == 200
    return json.loads(body)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, bpe_dir):
    # A large initializer_range gives peaked, varied greedy continuations instead of one repeated token.
    _, folder = make_hf_model(tmp_path_factory, "serve_tiny", n_positions=CONTEXT_LENGTH, initializer_range=0.3)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_folder):
    model, params = from_pretrained(tiny_folder, progress=False)
    return model, params, get_tokenizer(str(tiny_folder))


@pytest.fixture(scope="module")
def torch_reference(tiny_folder):
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(tiny_folder).eval()


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    args = ["--model", str(tiny_folder), "--served_model_name", "tiny", "--max_batch", str(MAX_BATCH),
            "--context_length", str(CONTEXT_LENGTH), "--prompt_buckets", "16,64", "--max_queue", str(MAX_QUEUE),
            "--max_body_bytes", str(MAX_BODY), "--api_key", API_KEY,
            # Small prefix blocks and prefill chunks: prompts over 16 tokens that arrive while others run are
            # prefilled in chunks, so every exactness test here (32 clients with disconnects too) covers it.
            "--prefix_block", "8", "--prefill_chunk", "16"]
    with server_process(args, tmp_path_factory) as (port, _):
        yield port


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _expected_text(tokenizer, tokens):
    tokens = list(tokens)
    return tokenizer.decode(tokens[:tokens.index(EOT)] if EOT in tokens else tokens)


def _generate_text(reference, ids, max_tokens, **kwargs):
    model, params, tokenizer = reference
    out = generate(model, params, [ids], max_new_tokens=max_tokens, **kwargs)[0, len(ids):]
    return _expected_text(tokenizer, out.tolist())


def _prompt(n, seed=0):
    return np.random.RandomState(seed).randint(0, EOT, n).tolist()


# ---- the OpenAI client ----

def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = _health(server)
    assert health["max_batch"] == MAX_BATCH and health["context_length"] == CONTEXT_LENGTH
    assert health["prompt_buckets"] == [16, 64, CONTEXT_LENGTH]


def test_metrics_count_what_the_clients_saw(client, server):
    """/metrics (Prometheus text, read with prometheus-client's parser) moves by exactly what these requests
    did: responses by status, prompt and completion tokens (the usage the client got), one time-to-first-token
    per request, and an idle server shows an empty queue and no running slots."""
    before = _scrape(server)
    outs = [client.completions.create(model="tiny", prompt=_prompt(3 + s, seed=s), max_tokens=6, temperature=0)
            for s in range(3)]
    chunks = list(client.completions.create(model="tiny", prompt=_prompt(4, seed=9), max_tokens=5, temperature=0.8,
                                            seed=1, stream=True, stream_options={"include_usage": True}))
    usages = [o.usage for o in outs] + [chunks[-1].usage]
    assert _post(server, {"model": "tiny", "prompt": "x", "max_tokens": -1})[0] == 400
    after = _scrape(server)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    ok, bad = {"path": "/v1/completions", "status": "200"}, {"path": "/v1/completions", "status": "400"}
    assert (moved("flax_gpt2_http_requests_total", **ok), moved("flax_gpt2_http_requests_total", **bad)) == (4, 1)
    assert moved("flax_gpt2_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert moved("flax_gpt2_completion_tokens_total") == sum(u.completion_tokens for u in usages)
    assert moved("flax_gpt2_time_to_first_token_seconds_count") == 4
    assert moved("flax_gpt2_inter_token_latency_seconds_count") > 0
    assert after[("flax_gpt2_queue_depth", ())] == 0 and after[("flax_gpt2_running_slots", ())] == 0


def test_greedy_completion_equals_generate(client, reference):
    _, _, tokenizer = reference
    prompt = "The quick brown fox"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    ids = tokenizer.encode(prompt)
    assert out.object == "text_completion" and out.model == "tiny" and len(out.choices) == 1
    assert out.choices[0].text == _generate_text(reference, ids, 24)
    assert len(set(tokenizer.encode(out.choices[0].text))) > 5  # a varied continuation, not one token repeated
    assert out.choices[0].finish_reason == "length"
    usage = out.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), 24, len(ids) + 24)


def test_lone_request_decodes_several_steps_per_device_call(client, server, reference):
    """With nothing waiting, one device call runs `--decode_steps` (8) steps: 37 tokens take 4 calls of 8
    and 5 of 1, where one step per call would take 37, and the text is still `generate`'s. A stop string
    met inside a group of steps ends the text there."""
    _, _, tokenizer = reference
    ids = _prompt(9, seed=3)
    before = _health(server)
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=37, temperature=0)
    after = _health(server)
    expected = _generate_text(reference, ids, 37)
    assert out.choices[0].text == expected
    assert after["steps"] - before["steps"] == 37 and after["dispatches"] - before["dispatches"] == 4 + 5
    words = expected.split()
    stop = next(w for w in words[3:] if len(w) > 2)
    cut = client.completions.create(model="tiny", prompt=ids, max_tokens=37, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected[:expected.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("length,max_tokens", [(1, 20), (17, 40), (70, 50), (100, 28)])
def test_token_prompts_equal_generate_up_to_the_context(client, reference, length, max_tokens):
    """Prompt lengths in every bucket, including prompts whose bucket leaves no room for the completion."""
    ids = _prompt(length, seed=length)
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0)
    assert out.choices[0].text == _generate_text(reference, ids, max_tokens)
    assert out.usage.prompt_tokens == length


def test_sampling_equals_generate_and_seeds_reproduce(client, reference):
    """Choice 0 of a sampled request without top_k draws as generate(do_sample=True, seed=seed) does."""
    ids = _prompt(9, seed=1)
    for kwargs in (dict(), dict(top_p=0.9), dict(temperature=0.7), dict(temperature=0.6, top_p=0.8)):
        out = client.completions.create(model="tiny", prompt=ids, max_tokens=30, seed=7, **kwargs)
        assert out.choices[0].text == _generate_text(reference, ids, 30, do_sample=True, seed=7, **kwargs)
    again = [client.completions.create(model="tiny", prompt=ids, max_tokens=30, seed=11, extra_body={"top_k": 40})
             .choices[0].text for _ in range(2)]
    other = client.completions.create(model="tiny", prompt=ids, max_tokens=30, seed=12, extra_body={"top_k": 40})
    assert again[0] == again[1] != other.choices[0].text


def test_top_k_1_is_greedy_and_repetition_penalty_equals_generate(client, reference):
    ids = _prompt(12, seed=2)
    greedy = client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0).choices[0].text
    top1 = client.completions.create(model="tiny", prompt=ids, max_tokens=20, seed=3, extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy
    penalized = client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0,
                                          extra_body={"repetition_penalty": 1.5})
    assert penalized.choices[0].text == _generate_text(reference, ids, 20, repetition_penalty=1.5)


def _torch_greedy(torch_model, ids, n, presence=0.0, frequency=0.0):
    """Greedy decoding by full forward passes of the transformers model, with OpenAI's penalties applied to
    the logits: `logit[j] - count[j] * frequency - (count[j] > 0) * presence`, counts over generated tokens."""
    import torch

    tokens, counts = list(ids), np.zeros(50257)
    for _ in range(n):
        with torch.no_grad():
            logits = torch_model(torch.tensor([tokens])).logits[0, -1].double().numpy()
        token = int(np.argmax(logits - frequency * counts - presence * (counts > 0)))
        tokens.append(token)
        counts[token] += 1
        if token == EOT:
            break
    return tokens[len(ids):]


# Negative (encouraging repeats): this peaked model seldom repeats a token on its own, and only repeats tell
# the formulas apart.
PENALTY = -1.5
PENALTY_PROMPT = _prompt(3, seed=3)


@pytest.fixture(scope="module")
def penalty_references(torch_reference):
    """Greedy continuations of PENALTY_PROMPT with no penalty and with each penalty alone at PENALTY."""
    return {name: _torch_greedy(torch_reference, PENALTY_PROMPT, 30, **kwargs) for name, kwargs in (
        ("none", {}), ("frequency_penalty", {"frequency": PENALTY}), ("presence_penalty", {"presence": PENALTY}))}


@pytest.mark.parametrize("name", ["frequency_penalty", "presence_penalty"])
def test_each_penalty_alone_follows_openais_formula(client, reference, penalty_references, name):
    """Each penalty on its own, against a logits-level reference; the value is such that the two formulas
    (counts versus presence) and no penalty give three different texts, so a swap or a no-op shows."""
    _, _, tokenizer = reference
    assert len({tuple(tokens) for tokens in penalty_references.values()}) == 3
    out = client.completions.create(model="tiny", prompt=PENALTY_PROMPT, max_tokens=30, temperature=0,
                                    **{name: PENALTY})
    assert out.choices[0].text == _expected_text(tokenizer, penalty_references[name])
    plain = client.completions.create(model="tiny", prompt=PENALTY_PROMPT, max_tokens=30, temperature=0)
    assert plain.choices[0].text == _expected_text(tokenizer, penalty_references["none"])


def test_list_prompt_and_n(client, reference):
    _, _, tokenizer = reference
    prompts = ["Hello there", "Once upon a time, in a"]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        expected = _generate_text(reference, tokenizer.encode(prompt), 12)
        assert out.choices[2 * p].text == out.choices[2 * p + 1].text == expected  # greedy copies
    assert out.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert out.usage.completion_tokens == 4 * 12
    sampled = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, n=3, seed=5)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({c.text for c in sampled.choices}) == 3
    assert sampled.choices[0].text == _generate_text(reference, tokenizer.encode("Hello there"), 12, do_sample=True,
                                                     seed=5)


def test_stream(client, reference):
    _, _, tokenizer = reference
    prompt = "Streaming works"
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _generate_text(reference, tokenizer.encode(prompt), 20)
    assert len([c for c in chunks if c.choices]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_stream_ends_with_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 3,
                                                        "stream": True}),
                 {"Authorization": f"Bearer {API_KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [e for e in response.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings(client, reference):
    ids = _prompt(6, seed=4)
    full = client.completions.create(model="tiny", prompt=ids, max_tokens=40, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=40, temperature=0, stop=[stop, "\x00never"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=ids, max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    chunks = [c.choices[0] for c in streamed]
    assert "".join(c.text for c in chunks) == cut and chunks[-1].finish_reason == "stop"


def test_echo_and_logprobs_equal_the_model(client, reference):
    model, params, tokenizer = reference
    prompt = "Scores of the prompt"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=3)
    choice = out.choices[0]
    assert choice.text.startswith(prompt)
    ids = tokenizer.encode(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 6 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[:2] == [0, len(tokenizer.decode(ids[:1]))]
    # Teacher-forced log-probabilities of prompt + completion from one full forward pass.
    full = np.asarray(ids + _generated_ids(reference, ids, 6))
    logits = model.apply({"params": params}, jnp.asarray(full[None])).logits[0]
    expected = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for i in range(1, len(full)):
        assert lp.token_logprobs[i] == pytest.approx(float(expected[i - 1, full[i]]), abs=1e-4)
        top = dict(sorted(lp.top_logprobs[i].items(), key=lambda kv: -kv[1])[:3])
        best = np.argsort(-expected[i - 1])[:3]
        assert list(top.values()) == pytest.approx([float(expected[i - 1, t]) for t in best], abs=1e-4)
    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(ids)], abs=1e-6)


def _generated_ids(reference, ids, n):
    model, params, _ = reference
    return generate(model, params, [ids], max_new_tokens=n)[0, len(ids):].tolist()


def _token_ids(tokenizer, token_strings):
    """The ids behind the logprobs' token strings (OpenAI's form: the text, or `bytes:\\xNN...`), which name
    one token each."""
    names = {}
    for i in range(tokenizer.vocab_size):
        data = tokenizer.encoding.decode_single_token_bytes(i)
        try:
            names[data.decode("utf-8")] = i
        except UnicodeDecodeError:
            names["bytes:" + "".join(f"\\x{b:02x}" for b in data)] = i
    return [names[t] for t in token_strings]


def test_sampled_logprobs_are_the_returned_tokens_teacher_forced(client, reference):
    """A sampled request (temperature, top-k, a penalty) reports for each token it returns that token's
    log-probability under the model, as one full forward pass over prompt + completion scores it, and the
    model's top alternatives: not the processed distribution's, and not the most likely token's."""
    model, params, tokenizer = reference
    ids = _prompt(7, seed=8)
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=24, seed=3, temperature=1.3, logprobs=3,
                                    frequency_penalty=0.5, extra_body={"top_k": 50, "repetition_penalty": 1.2})
    lp = out.choices[0].logprobs
    generated = _token_ids(tokenizer, lp.tokens)
    assert len(generated) == 24 and out.choices[0].text == _expected_text(tokenizer, generated)
    full = np.asarray(ids + generated)
    logits = model.apply({"params": params}, jnp.asarray(full[None])).logits[0]
    expected = np.asarray(jax.nn.log_softmax(logits, axis=-1))[len(ids) - 1:-1]  # row i scores generated[i]
    assert (expected.argmax(-1) != generated).sum() >= 5  # sampled: often not the most likely token
    np.testing.assert_allclose(lp.token_logprobs, expected[np.arange(24), generated], atol=1e-4, rtol=0)
    for i, top in enumerate(lp.top_logprobs):
        best = np.argsort(-expected[i])[:3]
        # the top 3 in order, then the returned token when it is not among them (OpenAI always includes it)
        assert _token_ids(tokenizer, list(top)) == list(dict.fromkeys([*best.tolist(), generated[i]]))
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(expected[i, best].tolist(), abs=1e-4)


def test_endoftext_in_a_prompt_is_the_special_token(client, reference):
    """README's CommonGen prompt: `<|endoftext|>` typed in the prompt is id 50256, as `generate` is given it."""
    _, _, tokenizer = reference
    prompt = "<|endoftext|> kid, room, dance:"
    ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})
    assert ids[0] == EOT and len(ids) == 7
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, echo=True)
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].text == prompt + _generate_text(reference, ids, 16)


def test_an_empty_stop_string_is_ignored(client):
    """OpenAI's API accepts "" in `stop`; it matches nowhere (it would otherwise cut every text to nothing)."""
    ids = _prompt(6, seed=4)
    full = client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0).choices[0]
    for stop in ("", [""], ["", "\x00never"]):
        out = client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0, stop=stop).choices[0]
        assert (out.text, out.finish_reason) == (full.text, "length"), stop
    streamed = list(client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0, stop=[""],
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full.text


def test_empty_prompt_starts_from_endoftext(client, reference):
    out = client.completions.create(model="tiny", prompt="", max_tokens=10, temperature=0)
    assert out.choices[0].text == _generate_text(reference, [EOT], 10)
    assert out.usage.prompt_tokens == 1


def test_concurrent_mixed_requests_equal_their_solo_results(client, server, reference):
    """16 requests of mixed prompt lengths, lengths and settings at once (4 slots): each equals its result
    alone, greedy ones equal generate, and the engine really ran them batched."""
    requests = []
    for i in range(16):
        kwargs = dict(model="tiny", prompt=_prompt(1 + 7 * i, seed=100 + i), max_tokens=8 + 5 * (i % 5))
        if i % 2 == 0:
            kwargs["temperature"] = 0
        else:
            kwargs.update(seed=i, temperature=0.9, top_p=0.95 if i % 3 else 1.0)
            if i % 4 == 1:
                kwargs["extra_body"] = {"top_k": 30}
            if i == 7:
                kwargs["n"] = 2
        requests.append(kwargs)
    before = _health(server)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda kw: [c.text for c in client.completions.create(**kw).choices], requests))
    after = _health(server)
    assert after["peak_busy_slots"] == MAX_BATCH
    assert after["batched_steps"] - before["batched_steps"] > 20
    for kwargs, texts in zip(requests, together):
        alone = [c.text for c in client.completions.create(**kwargs).choices]
        assert texts == alone, kwargs
        if kwargs.get("temperature") == 0:
            assert texts[0] == _generate_text(reference, kwargs["prompt"], kwargs["max_tokens"])
    assert _health(server)["busy_slots"] == 0


# ---- bad input, overload, disconnects ----

def _error(status, body):
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body,param", [
    ({"prompt": _prompt(100), "max_tokens": 29}, "prompt"),  # 129 > 128 tokens
    ({"prompt": "hi", "max_tokens": CONTEXT_LENGTH}, "prompt"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "temperature": 1e-6}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "hi", "n": True}, "n"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": "hi", "stop": 5}, "stop"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "hi", "seed": 1.5}, "seed"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [50257]}, "prompt"),
    ({"prompt": [[1, 2], [-1]]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "suffix": "x"}, "suffix"),
    ({"prompt": "hi", "logit_bias": {"50256": -100}}, "logit_bias"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "frobnicate": 1}, "frobnicate"),
])
def test_bad_requests_are_400(server, body, param):
    status, _, out = _post(server, {"model": "tiny", **body})
    assert status == 400, out
    error = _error(status, out)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if param == "frobnicate":
        assert error["message"] == "Unrecognized request argument supplied: frobnicate"


@pytest.mark.parametrize("data,code", [
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', "invalid_encoding"),
    (b'{"model": "tiny", "prompt": ', "invalid_json"),
    (b'{"model": "tiny", "prompt": "a", "temperature": NaN}', "invalid_json"),
    (b'["model", "tiny"]', None),
    (b"", "invalid_json"),
])
def test_malformed_bodies_are_400(server, data, code):
    status, _, out = _post(server, data)
    assert status == 400 and _error(status, out)["code"] == code


def test_other_errors(server):
    status, _, out = _post(server, {"model": "gpt-4", "prompt": "hi"})
    assert status == 404 and _error(status, out)["code"] == "model_not_found"
    status, _, out = _post(server, {"model": "tiny", "prompt": "x" * (MAX_BODY + 1)})
    assert status == 413 and _error(status, out)["code"] == "request_too_large"
    status, _, out = _post(server, {"model": "tiny", "prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
    assert status == 401 and _error(status, out)["code"] == "invalid_api_key"
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    conn.request("GET", "/v1/models")
    response = conn.getresponse()
    assert response.status == 401 and _error(401, json.loads(response.read()))
    status, _, out = _get(server, "/v1/nothing", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 404 and _error(status, json.loads(out))
    status, _, out = _get(server, "/v1/completions", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 405 and _error(status, json.loads(out))
    assert _health(server)["status"] == "ok"
    status, _, out = _post(server, {"model": "tiny", "prompt": "still fine", "max_tokens": 3})
    assert status == 200 and out["usage"]["completion_tokens"] == 3


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt=_prompt(120), max_tokens=20)
    bad_key = openai.OpenAI(base_url=str(client.base_url), api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.completions.create(model="tiny", prompt="hi")


def test_overload_is_503_with_retry_after(server):
    body = {"model": "tiny", "prompt": "flood", "max_tokens": 120, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        results = list(pool.map(lambda _: _post(server, body), range(48)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) == {200, 503}, statuses
    status, headers, out = next(r for r in results if r[0] == 503)
    assert headers["retry-after"] == "1" and _error(status, out)["code"] == "overloaded"
    texts = {out["choices"][0]["text"] for status, _, out in results if status == 200}
    assert len(texts) == 1  # the accepted ones were unaffected by the rejected ones
    assert _health(server)["busy_slots"] == 0


def test_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = _health(server)
    sock = socket.create_connection(("127.0.0.1", server), timeout=60)
    body = json.dumps({"model": "tiny", "prompt": "bye", "max_tokens": 120, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    received = b""
    while b"data: " not in received:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    sock.close()
    deadline = time.time() + 30
    while _health(server)["busy_slots"] and time.time() < deadline:
        time.sleep(0.05)
    after = _health(server)
    assert after["busy_slots"] == 0
    assert after["tokens"] - before["tokens"] < 120  # stopped early: the slot was freed, not run to the end


def _hang_up_after_first_token(port, body) -> bool:
    """Streams `body` over a raw socket and closes it after the first event; False if the server said 503."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: " + str(len(data)).encode()
                 + b"\r\n\r\n" + data)
    received = b""
    try:
        while b"data: " not in received and b" 503 " not in received.split(b"\r\n", 1)[0]:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    finally:
        sock.close()
    return b" 503 " not in received.split(b"\r\n", 1)[0]


def test_32_concurrent_mixed_clients_with_disconnects_stay_exact(client, server, reference):
    """32 clients at once on 4 slots and a queue of 24 (any told 503 retries, as the Retry-After says):
    greedy streamed and not, sampled, and 8 that hang up after their first streamed token. Every answer equals
    generate (greedy) or the same request alone (sampled), the hung-up streams free their slots, and nothing is
    left running or waiting."""

    def retrying(call):
        for _ in range(600):
            try:
                return call()
            except openai.APIStatusError as e:
                assert e.status_code == 503 and e.response.headers["retry-after"] == "1", e
                time.sleep(0.1)
        raise AssertionError("never admitted")

    def one(i):
        kwargs = dict(model="tiny", prompt=_prompt(2 + 3 * (i % 12), seed=300 + i), max_tokens=6 + 3 * (i % 6))
        kind = ("stream", "plain", "sampled", "hang_up")[i % 4]
        if kind == "hang_up":
            body = {**kwargs, "max_tokens": 80, "stream": True, "temperature": 0}  # long: it hangs up first
            for _ in range(600):
                if _hang_up_after_first_token(server, body):
                    return kind, kwargs, None
                time.sleep(0.1)
            raise AssertionError("never admitted")
        if kind == "stream":
            chunks = retrying(lambda: list(client.completions.create(**kwargs, temperature=0, stream=True)))
            return kind, kwargs, "".join(c.choices[0].text for c in chunks)
        if kind == "plain":
            return kind, kwargs, retrying(lambda: client.completions.create(**kwargs, temperature=0)).choices[0].text
        kwargs.update(temperature=0.9, top_p=0.9, seed=i)
        return kind, kwargs, retrying(lambda: client.completions.create(**kwargs)).choices[0].text

    chunks_before = _health(server)["prefill_chunks"]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert _health(server)["prefill_chunks"] > chunks_before  # prompts over 16 tokens were chunked among the others
    for kind, kwargs, text in results:
        if kind in ("stream", "plain"):
            assert text == _generate_text(reference, kwargs["prompt"], kwargs["max_tokens"]), (kind, kwargs)
        elif kind == "sampled":
            assert text == client.completions.create(**kwargs).choices[0].text, kwargs
    deadline = time.time() + 60
    while (_health(server)["busy_slots"] or _health(server)["queued"]) and time.time() < deadline:
        time.sleep(0.05)
    health = _health(server)
    assert health["busy_slots"] == 0 and health["queued"] == 0, health


def test_no_compiles_after_warm_up(server):
    """Runs last: every request above reused the start-up compiles."""
    assert _health(server)["compiles_after_warmup"] == 0


# ---- pieces and the command line ----

class _Collector:
    """A request's `deliver`: gathers the engine's events; `wait` returns them once every choice has ended."""

    def __init__(self, choices=1):
        self.events, self.choices, self.done = [], choices, threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.error is not None or sum(len(e.choices) for e in self.events if e.finish_reason) >= self.choices:
            self.done.set()

    def wait(self):
        assert self.done.wait(120), self.events
        return self.events


def _engine_request(engine, ids, max_tokens):
    from flax_gpt2.serve.protocol import CompletionRequest
    from flax_gpt2.serve.requests import Completion

    collector = _Collector()
    engine.submit(Completion(CompletionRequest(model="tiny", prompts=[ids], max_tokens=max_tokens, temperature=0),
                             [ids], [""], collector))
    return collector


@pytest.fixture
def engine(reference):
    """An engine in this process (one slot, 8 steps per call when nothing waits), not yet started."""
    from flax_gpt2.serve.engine import Engine

    model, params, tokenizer = reference
    engine = Engine(model, params, tokenizer, max_batch=1, context_length=64, prompt_buckets=[16], decode_steps=8)
    yield engine
    engine.stop()


def test_a_waiting_request_makes_the_running_one_step_once_per_call(engine, reference):
    """While a request waits for the only slot, the running one decodes one step per device call (the waiting
    one is admitted as soon as the slot frees, not up to 7 steps late); alone, the second runs 8 per call.
    Both texts are `generate`'s."""
    ids = [_prompt(5, seed=21), _prompt(9, seed=22)]
    first, second = (_engine_request(engine, p, 20) for p in ids)
    engine.start()
    for collector, p in zip((first, second), ids):
        events = collector.wait()
        assert "".join(e.text for e in events) == _generate_text(reference, p, 20)
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 20
    assert engine.stats.steps == 40
    assert engine.stats.dispatches == 20 + (2 + 4)  # 20 single steps while the second waited; then 8, 8, 1 x 4


def test_a_failed_step_fails_every_request_then_the_engine_serves_again(engine, reference, monkeypatch):
    """A device step that raises (here: injected once) ends the running request and the waiting one with an
    `engine_error` 500 each; the engine starts again from fresh slots and the next request is `generate`'s."""
    from flax_gpt2.serve import slots

    real_steps, calls = slots.steps, []

    def failing_once(*args, **kwargs):
        calls.append(kwargs.get("num_steps"))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real_steps(*args, **kwargs)

    monkeypatch.setattr(slots, "steps", failing_once)
    running, waiting = _engine_request(engine, _prompt(5, seed=23), 10), _engine_request(engine, _prompt(6, seed=24), 10)
    engine.start()
    for collector in (running, waiting):
        (event,) = collector.wait()
        assert event.error.status == 500 and event.error.code == "engine_error" and "device lost" in str(event.error)
    ids = _prompt(7, seed=25)
    events = _engine_request(engine, ids, 12).wait()
    assert "".join(e.text for e in events) == _generate_text(reference, ids, 12)
    assert engine.stats.busy_slots == 0 and not any(engine._running) and len(calls) > 1


def test_no_compiles_after_warm_up_without_the_prefix_cache(reference):
    """With the prefix cache off, a lone request, then four at once (the slots grow from 1 row to 4) run only
    the programs warm-up compiled, with weights committed to the device as a restored checkpoint's are. (The
    1 -> 4 resize and an insert into 4 rows once compiled here: warm-up resized fresh, uncommitted slots while
    the server resized committed ones, and jit compiles the two apart. The slots are now created committed.)"""
    from flax_gpt2.serve.engine import Engine

    model, params, tokenizer = reference
    params = jax.device_put(params, jax.local_devices()[0])  # committed, as a restored checkpoint's are
    engine = Engine(model, params, tokenizer, max_batch=4, context_length=64, prompt_buckets=[16], decode_steps=8,
                    prefix_cache_bytes=0)
    assert len(engine.cache_sizes) > 2
    prompts = [_prompt(4 + i, seed=31 + i) for i in range(5)]
    expected = [_generate_text(reference, p, 6) for p in prompts]  # (before warm-up: its compiles count after)
    engine.warm_up()
    engine.start()
    try:
        collectors = [_engine_request(engine, prompts[0], 6)]
        collectors[0].wait()
        with engine._lock:  # (a reentrant lock: the four are queued before the engine looks, so it grows 1 -> 4)
            collectors += [_engine_request(engine, p, 6) for p in prompts[1:]]
        assert ["".join(e.text for e in c.wait()) for c in collectors] == expected
        assert engine.stats.resizes > 0 and engine.stats.compiles_after_warmup == 0
    finally:
        engine.stop()


def test_kth_largest_matches_a_sort():
    rng = np.random.RandomState(0)
    logits = rng.randn(6, 300).astype(np.float32)
    logits[1, :50] = -np.inf
    logits[2, 10:20] = logits[2, 5]  # ties
    k = np.array([1, 7, 12, 300, 299, 40], np.int32)
    got = np.asarray(kth_largest(jnp.asarray(logits), jnp.asarray(k)))[:, 0]
    expected = -np.sort(-logits, axis=1)[np.arange(6), k - 1]
    np.testing.assert_array_equal(got, expected)


def test_cli_errors_are_one_line():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    bad = subprocess.run([sys.executable, "-m", "flax_gpt2.serve", "--model", "x", "--max_batch", "0"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--max_batch" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "flax_gpt2.serve", "--model", "x", "--drain_seconds", "-1"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--drain_seconds: must be a number of seconds >= 0" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "flax_gpt2.serve", "--model", "x", "--port", str(port)],
                              capture_output=True, text=True, env=env, timeout=120)
    assert busy.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr and "Traceback" not in busy.stderr


def test_sigterm_drains_running_requests_refuses_new_ones_and_exits_0(tiny_folder, tmp_path_factory):
    """SIGTERM while a long stream runs: new completions get 503 `shutting_down` and /health 503 `draining`
    (the port stays open), the running stream still ends normally with all its tokens, and the process exits
    0 (uvicorn alone re-raised the signal: exit status 143)."""
    procs = []
    args = ["--model", str(tiny_folder), "--served_model_name", "tiny", "--max_batch", "2", "--context_length",
            str(CONTEXT_LENGTH), "--prompt_buckets", "16", "--decode_steps", "1", "--drain_seconds", "120"]
    with server_process(args, tmp_path_factory, procs=procs) as (port, log_path):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        stream = client.completions.create(model="tiny", prompt=_prompt(4), max_tokens=CONTEXT_LENGTH - 4,
                                           temperature=0, stream=True)
        chunks = [next(iter(stream))]
        procs[0].send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        while _get(port, "/health")[0] != 503:  # the signal is handled on the server's main thread
            assert time.time() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.01)
        status, _, body = _post(port, {"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert (status, body["error"]["code"]) == (503, "shutting_down")
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert len("".join(c.choices[0].text for c in chunks)) > 0
        assert procs[0].wait(timeout=60) == 0, log_path.read_text()[-2000:]
        assert "drained in" in log_path.read_text()

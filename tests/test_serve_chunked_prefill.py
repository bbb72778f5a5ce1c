"""Chunked prefill end to end (`serve --prefill_chunk`): long prompts arrive while other requests stream; they
are prefilled in chunks between the streams' decoding steps, and every completion, streamed or not, equals
`generate`'s. Driven by the official `openai` client against the real server."""

import concurrent.futures
import http.client
import os
import subprocess
import sys
import threading

import numpy as np
import openai
import pytest
from conftest import make_hf_model
from serve_process import server_process

from flax_gpt2 import from_pretrained, generate

EOT = 50256
CHUNK = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory, bpe_dir):
    _, folder = make_hf_model(tmp_path_factory, "chunked_tiny", n_positions=128, initializer_range=0.3)
    args = ["--model", str(folder), "--served_model_name", "tiny", "--max_batch", "8", "--context_length", "128",
            "--prompt_buckets", "16,64", "--decode_steps", "1", "--prefix_block", "8", "--prefill_chunk", str(CHUNK)]
    with server_process(args, tmp_path_factory) as (port, _):
        yield port, from_pretrained(folder, progress=False)


def _text(reference, ids, max_tokens):
    from flax_gpt2 import get_tokenizer

    model, params = reference
    tokens = generate(model, params, [ids], max_new_tokens=max_tokens)[0, len(ids):].tolist()
    return get_tokenizer().decode(tokens[:tokens.index(EOT)] if EOT in tokens else tokens)


def _metric(port, name) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    return next(s.value for f in text_string_to_metric_families(body) for s in f.samples if s.name == name)


def test_long_prompts_are_prefilled_in_chunks_between_the_streams_steps(served):
    """Three streams run (one token per step); then four long prompts (41 to 120 tokens: 2 to 7 chunks each)
    arrive together. The server prefills their chunks between decoding steps (`prefill_chunks` counts them),
    compiles nothing, and all seven completions equal `generate`."""
    port, reference = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    rng = np.random.RandomState(5)
    short = [rng.randint(0, EOT, n).tolist() for n in (3, 4, 5)]
    long = [rng.randint(0, EOT, n).tolist() for n in (41, 60, 97, 120)]
    chunks_before = _metric(port, "flax_gpt2_prefill_chunks_total")
    streaming = [threading.Event() for _ in short]

    def stream(i):
        text = ""
        for chunk in client.completions.create(model="tiny", prompt=short[i], max_tokens=120, temperature=0,
                                               stream=True):
            text += chunk.choices[0].text
            streaming[i].set()
        return text

    def complete(ids):
        return client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream, i) for i in range(len(short))]
        for event in streaming:
            assert event.wait(120)
        answers = list(pool.map(complete, long))
        streamed = [s.result() for s in streams]
    assert streamed == [_text(reference, ids, 120) for ids in short]
    assert answers == [_text(reference, ids, 8) for ids in long]
    assert _metric(port, "flax_gpt2_prefill_chunks_total") > chunks_before
    assert _metric(port, "flax_gpt2_compiles_after_warmup_total") == 0


def test_a_lone_long_prompt_is_prefilled_at_once_and_equals_generate(served):
    """With nothing else running there is no one to keep streaming: no chunks, the same text."""
    port, reference = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    ids = np.random.RandomState(6).randint(0, EOT, 77).tolist()
    before = _metric(port, "flax_gpt2_prefill_chunks_total")
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0).choices[0].text \
        == _text(reference, ids, 10)
    assert _metric(port, "flax_gpt2_prefill_chunks_total") == before


@pytest.mark.parametrize("argv, message", [
    (["--prefill_chunk", "12", "--prefix_block", "8"], "--prefill_chunk 12 must be a multiple of --prefix_block 8"),
    (["--prefill_chunk", "64", "--prefix_cache_bytes", "0"], "--prefill_chunk needs the prefix cache"),
    (["--prefill_chunk", "-1"], "--prefill_chunk: must be a number of tokens >= 0"),
])
def test_bad_chunk_flags_are_one_line_usage_errors(argv, message, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "flax_gpt2.serve", "--model", str(tmp_path / "none"), *argv],
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]

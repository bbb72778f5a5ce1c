"""Prefix caching end to end: the real server with the cache on, off, and bounded to a few blocks, driven by
the official `openai` client; greedy completions of prompts that share long prefixes, interleaved with
unrelated ones, are the same on all three and equal `generate`'s."""

import concurrent.futures
import contextlib
import http.client
import json
import os
import subprocess
import sys

import numpy as np
import openai
import pytest
from conftest import make_hf_model
from serve_process import server_process

from flax_gpt2 import from_pretrained, generate

CONTEXT = 128
BLOCK = 16
BLOCK_BYTES = BLOCK * 2 * 2 * 64 * 4  # tokens x (keys, values) x layers x n_embd x float32
TINY_BOUND = 4 * BLOCK_BYTES
EOT = 50256


@pytest.fixture(scope="module")
def folder(tmp_path_factory, bpe_dir):
    # A large initializer_range gives peaked, varied greedy continuations (no near-ties between runs).
    return make_hf_model(tmp_path_factory, "prefix_tiny", n_positions=CONTEXT, initializer_range=0.3)[1]


def _start(folder, tmp_path_factory, *extra):
    args = ["--model", str(folder), "--served_model_name", "tiny", "--max_batch", "2", "--context_length",
            str(CONTEXT), "--prompt_buckets", "16,64", "--prefix_block", str(BLOCK), *extra]
    return server_process(args, tmp_path_factory)


@pytest.fixture(scope="module")
def servers(folder, tmp_path_factory):
    """Ports of three servers of one model: the cache on (default bound), off, and bounded to 4 blocks; started
    side by side (their loading and warm-up overlap)."""
    flags = {"on": (), "off": ("--prefix_cache_bytes", "0"), "tiny": ("--prefix_cache_bytes", str(TINY_BOUND))}
    starts = {name: _start(folder, tmp_path_factory, *extra) for name, extra in flags.items()}
    with contextlib.ExitStack() as stack:
        with concurrent.futures.ThreadPoolExecutor(len(starts)) as pool:
            entered = {name: pool.submit(start.__enter__) for name, start in starts.items()}
        for name, future in entered.items():  # every started server is stopped, even when another failed
            if future.exception() is None:
                stack.push(starts[name].__exit__)
        yield {name: future.result()[0] for name, future in entered.items()}


def _get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    return conn.getresponse().read()


def _metrics(port) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for f in text_string_to_metric_families(_get(port, "/metrics").decode())
            for s in f.samples if s.name.startswith("flax_gpt2_prefix_cache")}


def _complete(port, ids, max_tokens):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    return client.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0).choices[0].text


def _ids(n, seed):
    return np.random.RandomState(seed).randint(0, EOT, n).tolist()


def _workload(seed):
    """Prompts that share a 70-token prefix (different tails), prompts that share another 40-token one, and
    unrelated prompts, interleaved; with their max_tokens (prompt + completion within the context)."""
    shared, other = _ids(70, seed), _ids(40, seed + 1)
    prompts = []
    for i in range(4):
        prompts.append(shared + _ids(2 + 3 * i, seed + 10 + i))
        prompts.append(_ids(20 + 9 * i, seed + 20 + i))
        prompts.append(other + _ids(1 + 2 * i, seed + 30 + i))
    return [(p, min(12, CONTEXT - len(p))) for p in prompts]


@pytest.fixture(scope="module")
def expected(folder):
    model, params = from_pretrained(folder, progress=False)

    def text(ids, max_tokens):
        from flax_gpt2 import get_tokenizer

        out = generate(model, params, [ids], max_new_tokens=max_tokens)[0, len(ids):].tolist()
        return get_tokenizer(str(folder)).decode(out[:out.index(EOT)] if EOT in out else out)

    return text


def test_interleaved_shared_prefixes_are_exact_with_the_cache_on_off_and_tiny(servers, expected):
    """One after another: every greedy text is the same on the three servers and equals `generate`'s; the
    cached server reused the shared prefixes (hits counted, by whole blocks), the bounded one evicted and
    never held more than its bound, the uncached one holds nothing."""
    work = _workload(seed=100)
    before = {name: _metrics(port) for name, port in servers.items()}
    for ids, max_tokens in work:
        texts = {name: _complete(port, ids, max_tokens) for name, port in servers.items()}
        assert texts["on"] == texts["off"] == texts["tiny"] == expected(ids, max_tokens), (len(ids), texts)
    after = {name: _metrics(port) for name, port in servers.items()}

    def moved(name, metric):
        return after[name][metric] - before[name].get(metric, 0)

    # The 70-token prefix: 4 blocks reused by its 3 later prompts; the 40-token one: 2 blocks, by 3 (the
    # first of them, 41 tokens, caches both: 40 tokens are 2 complete blocks and leave one to prefill).
    assert moved("on", "flax_gpt2_prefix_cache_hits_total") == 6
    assert moved("on", "flax_gpt2_prefix_cache_hit_tokens_total") == 3 * 4 * BLOCK + 3 * 2 * BLOCK
    assert after["on"]["flax_gpt2_prefix_cache_bytes"] > 0
    assert after["on"]["flax_gpt2_prefix_cache_bytes"] == after["on"]["flax_gpt2_prefix_cache_blocks"] * BLOCK_BYTES
    assert moved("tiny", "flax_gpt2_prefix_cache_evictions_total") > 0
    assert 0 < after["tiny"]["flax_gpt2_prefix_cache_bytes"] <= TINY_BOUND
    assert moved("off", "flax_gpt2_prefix_cache_hits_total") == 0 and after["off"]["flax_gpt2_prefix_cache_bytes"] == 0


def test_concurrent_shared_prefixes_are_exact(servers, expected):
    """All at once (two slots, the rest queued): the same texts on the three servers, `generate`'s."""
    work = _workload(seed=200) * 2
    hits = _metrics(servers["on"])["flax_gpt2_prefix_cache_hits_total"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for name, port in servers.items():
            texts = list(pool.map(lambda w: _complete(port, *w), work))
            assert texts == [expected(*w) for w in work], name
    assert _metrics(servers["on"])["flax_gpt2_prefix_cache_hits_total"] > hits


def test_no_compiles_after_warm_up(servers):
    """Runs last: hits, misses, evictions and every tail length reused the start-up compiles."""
    for name, port in servers.items():
        assert json.loads(_get(port, "/health"))["compiles_after_warmup"] == 0, name


def test_negative_prefix_cache_bytes_is_a_one_line_usage_error():
    bad = subprocess.run([sys.executable, "-m", "flax_gpt2.serve", "--model", "x", "--prefix_cache_bytes", "-1"],
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    last = bad.stderr.strip().splitlines()[-1]  # argparse's usage, then the one line that says what is wrong
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert last.endswith("error: argument --prefix_cache_bytes: must be a number of bytes >= 0, got '-1'")

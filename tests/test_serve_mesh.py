"""`serve --mesh`: one server's weights and KV cache sharded over 8 simulated CPU devices, driven by the official
`openai` client; every greedy completion equals single-device `generate` token for token, and nothing compiles
after warm-up. Two layouts: heads split over `tensor` (with `fsdp` on the embedding), and heads that `tensor`
does not divide (GPT-2 XL's case: 25 heads), where the KV cache is split on the head dimension and the slots
over `data`."""

import concurrent.futures
import os
import subprocess
import sys

import numpy as np
import openai
import pytest
from conftest import make_hf_model
from serve_process import server_process

from flax_gpt2 import from_pretrained, generate, get_tokenizer

EOT = 50256
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
LAYOUTS = {  # id: (model config, --mesh)
    "heads_over_tensor": (dict(n_head=4, n_embd=64), "tensor=4,fsdp=2"),
    "head_dim_over_tensor": (dict(n_head=6, n_embd=96), "data=2,tensor=4"),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def served(request, tmp_path_factory, bpe_dir):
    config, mesh = LAYOUTS[request.param]
    _, folder = make_hf_model(tmp_path_factory, f"mesh_{request.param}", n_positions=128, initializer_range=0.3,
                              **config)
    args = ["--model", str(folder), "--served_model_name", "tiny", "--max_batch", "4", "--context_length", "128",
            "--prompt_buckets", "16,64", "--decode_steps", "4", "--mesh", mesh]
    with server_process(args, tmp_path_factory, env=EIGHT_DEVICES) as (port, log_path):
        model, params = from_pretrained(folder, progress=False)
        yield port, log_path, (model, params, get_tokenizer(str(folder))), mesh


def _generate_text(reference, ids, max_tokens):
    model, params, tokenizer = reference
    tokens = generate(model, params, [ids], max_new_tokens=max_tokens)[0, len(ids):].tolist()
    return tokenizer.decode(tokens[:tokens.index(EOT)] if EOT in tokens else tokens)


def _scrape(port) -> dict:
    import http.client

    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(body) for s in family.samples}


def test_sharded_server_equals_single_device_generate(served):
    """Eight concurrent greedy requests (more than the 4 slots: the cache grows, compacts and refills on the
    mesh), one of them streamed, each equal to `generate` on one device; the log names the mesh."""
    port, log_path, reference, mesh = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    prompts = [np.random.RandomState(seed).randint(0, EOT, n).tolist()
               for seed, n in enumerate((3, 9, 16, 20, 5, 40, 12, 7))]
    lengths = [24, 9, 30, 16, 40, 12, 20, 33]

    def one(i):
        if i == 0:
            chunks = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                               temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                         temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    for i, text in enumerate(texts):
        assert text == _generate_text(reference, prompts[i], lengths[i]), i
    assert len(set(texts)) == 8
    metrics = _scrape(port)
    assert metrics["flax_gpt2_compiles_after_warmup_total"] == 0
    log = log_path.read_text()
    sizes = dict(part.split("=") for part in mesh.split(","))
    assert "mesh: {'data': %s, 'fsdp': %s, 'tensor': %s}" % tuple(sizes.get(a, "1") for a in ("data", "fsdp", "tensor")) \
        in log


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "tensor=16"], "--mesh tensor=16 needs 16 devices but this host has 8"),
    (["--mesh", "heads=2"], "--mesh: must be AXIS=SIZE[,AXIS=SIZE] with AXIS data, fsdp or tensor"),
    (["--mesh", "tensor=0"], "--mesh: must be AXIS=SIZE"),
    (["--mesh", "tensor=2", "--quantize", "int8"], "--quantize int8 with --mesh is not supported"),
])
def test_bad_mesh_is_a_one_line_usage_error(argv, message, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **EIGHT_DEVICES)
    bad = subprocess.run([sys.executable, "-m", "flax_gpt2.serve", "--model", str(tmp_path / "none"), *argv],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert message in bad.stderr and "Traceback" not in bad.stderr

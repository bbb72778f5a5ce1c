"""Serving throughput: N concurrent clients against `python -m flax_gpt2.serve`, versus one at a time.

    python benchmarks/serve.py                                 # gpt2-124M random weights, prompt 32, 64 new tokens
    python benchmarks/serve.py --clients 1 4 8 16 --requests_per_client 2 --max_batch 8 --context_length 128

Writes a random-init GPT-2 124M folder (GPT-2's tokenizer from ../shared/gpt2-bpe), starts the server on a
free 127.0.0.1 port, and sends greedy completions over raw HTTP (one connection per client): every request
has its own random 32-token prompt (token ids) and asks for 64 tokens. First the baseline, the same kind of
requests served one at a time (one client, `--baseline_requests` of them); then, for each N in
`--clients`, N clients each sending `--requests_per_client` requests back to back. Reported per run:
aggregate completion tokens/s (all tokens / wall time), p50 and p95 request latency, the speed-up over
the one-at-a-time throughput, the mean number of busy slots per decoding step and the mean wall time of a
decoding step (the server's counters). For reference, `flax_gpt2.generate` alone at batch 1 on the same
weights (in this process, while the server idles; its ms/step is per token, prefill included).
The load average is printed before and after: other processes on the machine skew everything.

    python benchmarks/serve.py --prefix_ttft 900               # time to first token, 900-token prefix cached or not

With `--prefix_ttft N`, only the prefix cache is measured, on its own server (`--context_length 1024`, prompt
buckets 64 and 1024, one slot): for each of `--prefix_repeats` fresh N-token prefixes, a streamed greedy
request of that prefix and a 20-token tail (a miss: the whole prompt is prefilled, and its blocks cached), then
one of the same prefix and another tail (a hit: only the tail is prefilled); the median time to the first
streamed token of each kind.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLAX_GPT2_SHARED", REPO.parent / "shared"))


def write_model(folder: Path, preset: str, seed: int) -> None:
    import jax

    from flax_gpt2 import GPT2Config, GPT2LMHeadModel, init_params, save_pretrained

    model = GPT2LMHeadModel(GPT2Config.from_preset(preset))
    params = init_params(model, jax.random.PRNGKey(seed))
    save_pretrained(folder, model, params, tokenizer=str(SHARED / "gpt2-bpe"), overwrite=True, progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def wait_until_up(server: subprocess.Popen, port: int, log_path: Path) -> None:
    """Returns once the server answers /health; exits with its log's tail if it exits first."""
    while True:
        try:
            get(port, "/health")
            return
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the server exited:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)


class Client:
    """One keep-alive connection sending completions one after another."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def complete(self, prompt: list[int], max_tokens: int) -> tuple[float, int]:
        body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        start = time.perf_counter()
        self.conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        out = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {out}")
        return time.perf_counter() - start, out["usage"]["completion_tokens"]


def run_clients(port: int, clients: int, per_client: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    rng = np.random.RandomState(seed)
    prompts = [[rng.randint(0, 50256, prompt_len).tolist() for _ in range(per_client)] for _ in range(clients)]
    before = get(port, "/health")

    def client(i):
        c = Client(port)
        return [c.complete(p, new_tokens) for p in prompts[i]]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    after = get(port, "/health")
    latencies = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    steps = max(1, after["steps"] - before["steps"])
    return dict(clients=clients, requests=len(results), tokens=tokens, wall_s=wall, tok_s=tokens / wall,
                p50_s=float(np.percentile(latencies, 50)), p95_s=float(np.percentile(latencies, 95)),
                mean_busy=(after["tokens"] - before["tokens"]) / steps,
                step_ms=1000 * (after["step_seconds"] - before["step_seconds"]) / steps,
                compiles=after["compiles_after_warmup"])


def first_token_seconds(port: int, prompt: list[int], max_tokens: int = 4) -> float:
    """Seconds from sending a streamed greedy completion to receiving its first token's chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True})
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]}")
    while not response.readline().startswith(b"data: {"):
        pass
    elapsed = time.perf_counter() - start
    response.read()
    conn.close()
    return elapsed


def prefix_ttft(port: int, prefix_len: int, repeats: int) -> dict:
    """Median time to first token of a request whose `prefix_len`-token prefix is not cached, then cached."""
    rng = np.random.RandomState(7)
    miss, hit = [], []
    for _ in range(repeats):
        prefix = rng.randint(0, 50256, prefix_len).tolist()
        before = get(port, "/health")["prefix_hits"]
        miss.append(first_token_seconds(port, prefix + rng.randint(0, 50256, 20).tolist()))
        hit.append(first_token_seconds(port, prefix + rng.randint(0, 50256, 20).tolist()))
        if get(port, "/health")["prefix_hits"] != before + 1:
            raise RuntimeError("the second request of a prefix did not hit the prefix cache")
    return dict(miss=float(np.median(miss)), hit=float(np.median(hit)), health=get(port, "/health"))


def generate_alone(folder: Path, prompt_len: int, new_tokens: int, repeats: int) -> float:
    """tokens/s of `flax_gpt2.generate` at batch 1, greedy, best of `repeats` warm calls."""
    from flax_gpt2 import from_pretrained, generate

    model, params = from_pretrained(folder, progress=False)
    ids = np.random.RandomState(0).randint(0, 50256, (1, prompt_len))
    generate(model, params, ids, max_new_tokens=new_tokens)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, params, ids, max_new_tokens=new_tokens)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests_per_client", type=int, default=2)
    parser.add_argument("--baseline_requests", type=int, default=8, help="requests served one at a time")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--max_batch", type=int, default=8)
    parser.add_argument("--decode_steps", type=int, default=8, help="the server's --decode_steps")
    parser.add_argument("--context_length", type=int, default=128,
                        help="the server's --context_length: prompt + completion tokens per slot")
    parser.add_argument("--preset", default="gpt2", help="model size (random weights)")
    parser.add_argument("--model_dir", default=None, help="reuse (or create) the random model here")
    parser.add_argument("--generate_repeats", type=int, default=3)
    parser.add_argument("--prefix_ttft", type=int, default=0, metavar="N",
                        help="measure only the prefix cache: time to first token with an N-token prefix cached "
                             "or not (e.g. 900)")
    parser.add_argument("--prefix_repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.prefix_ttft:
        args.context_length, args.max_batch, args.decode_steps = 1024, 1, 1

    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.model_dir or Path(tmp.name) / "model")
    if not (folder / "config.json").is_file():
        print(f"writing a random {args.preset} to {folder}", flush=True)
        write_model(folder, args.preset, seed=0)
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    log = open(Path(tmp.name) / "server.log", "w")
    command = [sys.executable, "-m", "flax_gpt2.serve", "--model", str(folder), "--served_model_name", "bench",
               "--port", str(port), "--max_batch", str(args.max_batch), "--context_length", str(args.context_length),
               "--decode_steps", str(args.decode_steps),
               "--max_queue", str(max(64, max(args.clients) * args.requests_per_client))]
    if args.prefix_ttft:
        command += ["--prompt_buckets", "64,1024"]
    print(" ".join(command[1:]), flush=True)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    started = time.perf_counter()
    try:
        wait_until_up(server, port, Path(tmp.name) / "server.log")
        print(f"server ready after {time.perf_counter() - started:.1f} s (load, warm-up compiles)", flush=True)
        print(f"load average before: {os.getloadavg()}", flush=True)
        Client(port).complete([1, 2, 3], 4)  # first request: nothing left to compile, but warms caches
        if args.prefix_ttft:
            return print_prefix_ttft(args, prefix_ttft(port, args.prefix_ttft, args.prefix_repeats))
        rows = [dict(run_clients(port, 1, args.baseline_requests, args.prompt_len, args.new_tokens, seed=1),
                     name="one at a time")]
        base = rows[0]["tok_s"]
        for n in args.clients:
            rows.append(dict(run_clients(port, n, args.requests_per_client, args.prompt_len, args.new_tokens,
                                         seed=10 + n), name=f"{n} concurrent"))
        alone = generate_alone(folder, args.prompt_len, args.new_tokens, args.generate_repeats)
        print(f"load average after: {os.getloadavg()}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    print(f"\nprompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; --max_batch {args.max_batch} "
          f"--context_length {args.context_length} --decode_steps {args.decode_steps}\n")
    print("| clients | requests | tokens | wall s | aggregate tok/s | vs one at a time | p50 latency s | "
          "p95 latency s | mean busy slots | ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base:.2f}× | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['mean_busy']:.1f} | "
              f"{r['step_ms']:.1f} |")
    print(f"| `generate` alone, batch 1 | | | | {alone:.1f} | {alone / base:.2f}× | | | | "
          f"{1000 / alone:.1f} |")
    print(f"\ncompiles after warm-up: {rows[-1]['compiles']}")


def print_prefix_ttft(args, r: dict) -> None:
    from compile_time import cpu_name  # run as a script: benchmarks/ is on the path

    print(f"load average after: {os.getloadavg()}")
    print(f"\n{args.preset} (random weights) on {cpu_name()}, --context_length 1024, one slot; prompt = "
          f"{args.prefix_ttft}-token prefix + 20 tokens, median of {args.prefix_repeats}\n")
    print("| prefix | time to first token s |\n|---|---|")
    print(f"| not cached (full prefill, blocks cached) | {r['miss']:.3f} |")
    print(f"| cached ({r['health']['prefix_hit_tokens'] // max(1, r['health']['prefix_hits'])} tokens reused) | "
          f"{r['hit']:.3f} |")
    print(f"| speed-up | {r['miss'] / r['hit']:.1f}x |")
    print(f"\ncompiles after warm-up: {r['health']['compiles_after_warmup']}")


if __name__ == "__main__":
    from flax_gpt2.utils import cli

    sys.exit(cli.run(main, prog="benchmarks/serve.py"))  # the CLI conventions (README)

"""Chunked prefill: inter-token latency of running streams while long prompts arrive, with and without chunks.

    python benchmarks/serve_chunked_prefill.py                      # gpt2 shape, 8 streams, 1000-token prompts
    python benchmarks/serve_chunked_prefill.py --chunks 0 256 --streams 8 --long_prompts 3

For each `--prefill_chunk` in `--chunks` (0: off), a fresh `python -m flax_gpt2.serve` on a random-init model
(`--context_length 1024`, the default prompt buckets, `--decode_steps 1`: every token streams as it is made).
`--streams` clients each stream a greedy completion of `--stream_tokens` tokens from a short prompt; once all
of them are streaming,
`--long_prompts` requests with `--long_len`-token prompts (1 new token each) arrive one after another, each
as soon as the one before has its token. Reported per server: the gaps between consecutive streamed tokens of
the running streams while the long prompts are served (p50, p99, max), the long prompts' time to first token
(median), and the total wall time. Every server gets the same prompts; the load average is printed before and
after (other processes on the machine skew everything).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from serve import first_token_seconds, free_port, get, wait_until_up, write_model  # run as a script: benchmarks/ is on the path

REPO = Path(__file__).resolve().parents[1]


def stream_gaps(port: int, prompt: list[int], max_tokens: int, started: threading.Event) -> list[tuple[float, float]]:
    """Streams one greedy completion; returns (arrival time, gap since the previous token) per token after the
    first (`time.perf_counter()` clock). Sets `started` at the first token."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]}")
    arrivals = []
    while True:
        line = response.readline()
        if not line or line.startswith(b"data: [DONE]"):
            break
        if line.startswith(b"data: {"):
            arrivals.append(time.perf_counter())
            started.set()
    conn.close()
    return [(t, t - s) for s, t in zip(arrivals, arrivals[1:])]


def run_server(folder: Path, chunk: int, args, prompts, long_prompts, log_path: Path) -> dict:
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    command = [sys.executable, "-m", "flax_gpt2.serve", "--model", str(folder), "--served_model_name", "bench",
               "--port", str(port), "--max_batch", str(args.streams + 2), "--context_length", "1024",
               "--decode_steps", "1", "--prefill_chunk", str(chunk)]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            wait_until_up(server, port, log_path)
            first_token_seconds(port, [1, 2, 3])  # warms the host-side caches
            events = [threading.Event() for _ in prompts]
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
                streams = [pool.submit(stream_gaps, port, p, args.stream_tokens, e) for p, e in zip(prompts, events)]
                for e in events:
                    e.wait(600)
                window_start = time.perf_counter()
                ttfts = [first_token_seconds(port, p, max_tokens=1) for p in long_prompts]
                window_end = time.perf_counter()
                gaps = [g for s in streams for g in s.result()]
            wall = time.perf_counter() - start
            health = get(port, "/health")
        finally:
            server.terminate()
            server.wait(timeout=30)
    during = np.array([gap for t, gap in gaps if window_start <= t <= window_end + 1e-3]) * 1000
    everything = np.array([gap for _, gap in gaps]) * 1000
    return dict(chunk=chunk, p50=float(np.percentile(during, 50)), p99=float(np.percentile(during, 99)),
                max=float(during.max()), all_p50=float(np.percentile(everything, 50)), gaps=len(during),
                ttft=float(np.median(ttfts)), wall=wall, compiles=health["compiles_after_warmup"],
                chunks=health.get("prefill_chunks", 0))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 128, 256], help="--prefill_chunk values (0: off)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream_tokens", type=int, default=160)
    parser.add_argument("--long_prompts", type=int, default=3)
    parser.add_argument("--long_len", type=int, default=1000)
    parser.add_argument("--preset", default="gpt2", help="model size (random weights)")
    parser.add_argument("--model_dir", default=None, help="reuse (or create) the random model here")
    args = parser.parse_args(argv)
    from compile_time import cpu_name

    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.model_dir or Path(tmp.name) / "model")
    if not (folder / "config.json").is_file():
        print(f"writing a random {args.preset} to {folder}", flush=True)
        write_model(folder, args.preset, seed=0)
    rng = np.random.RandomState(3)
    prompts = [rng.randint(0, 50256, 16).tolist() for _ in range(args.streams)]
    long_prompts = [rng.randint(0, 50256, args.long_len).tolist() for _ in range(args.long_prompts)]
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = []
    for chunk in args.chunks:
        rows.append(run_server(folder, chunk, args, prompts, long_prompts, Path(tmp.name) / f"server_{chunk}.log"))
        print(rows[-1], flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(f"\n{args.preset} (random weights) on {cpu_name()}; {args.streams} streams of {args.stream_tokens} tokens "
          f"(--decode_steps 1), {args.long_prompts} prompts of {args.long_len} tokens arriving one after another\n")
    print("| --prefill_chunk | inter-token ms p50 | p99 | max | long prompt TTFT s (median) | chunks | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['chunk'] or 'off'} | {r['p50']:.0f} | {r['p99']:.0f} | {r['max']:.0f} | {r['ttft']:.2f} | "
              f"{r['chunks']} | {r['wall']:.1f} |")
    print(f"\ninter-token gaps measured while the long prompts were served: {[r['gaps'] for r in rows]}; "
          f"compiles after warm-up: {[r['compiles'] for r in rows]}")


if __name__ == "__main__":
    from flax_gpt2.utils import cli

    sys.exit(cli.run(main, prog="benchmarks/serve_chunked_prefill.py"))

"""A tokenized corpus on gs://: time to the first batch and bytes read per host, `data.remote_reads` "mirror" vs
"range", measured against the local GCS emulator (tests/gcs_emulator.py).

    python benchmarks/remote_corpus.py                          # 32M tokens, 2 hosts, 10 steps of 512 x 1025
    python benchmarks/remote_corpus.py --tokens 64000000 --steps 20

The corpus is Tiny Shakespeare's GPT-2 tokens repeated to `--tokens`, written straight into the bucket as a
tokenized corpus (`--shard_tokens` per shard). Each of `--hosts` simulated hosts then opens it as training does
(`data.load_tokens` with `data.source=gs://...`, a fresh local cache each), and reads its share of the rows of
`--steps` shuffled global batches (host h of H: rows [h*B/H, (h+1)*B/H) of each batch, as
`make_array_from_callback` asks a host for its devices' rows). Hosts run one after another against one emulator.
The emulator is a single-threaded Python server on localhost: absolute times are not GCS's (no network latency,
slower bandwidth), the bytes are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.compile_time import cpu_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the emulator launcher the tests use
import gcs_emulator  # noqa: E402  isort:skip




def _write_corpus(url: str, tokens: int, shard_tokens: int, text: str) -> int:
    """Tiny Shakespeare's tokens tiled to `tokens`, as shards + meta.json at `url`; returns the bytes written."""
    from flax_gpt2.train import tokenize_corpus as tc
    from flax_gpt2.utils import file_io

    encoding = tc.gpt2_encoding()
    base = np.asarray(encoding.encode_ordinary(text) + [encoding.eot_token], np.uint16)
    stream = np.resize(base, tokens)
    shards = []
    for i, start in enumerate(range(0, tokens, shard_tokens)):
        part = stream[start:start + shard_tokens]
        shards.append({"file": f"tokens_{i:05d}.bin", "num_tokens": int(len(part))})
        file_io.atomic_write(f"{url}/{shards[-1]['file']}", part.tobytes())
    meta = {"dtype": "uint16", "num_tokens": tokens, "vocab_size": encoding.n_vocab, "eot_token": encoding.eot_token,
            "shards": shards}
    file_io.atomic_write(f"{url}/meta.json", json.dumps(meta))
    return 2 * tokens


def _host(url: str, how: str, block: int, host: int, hosts: int, steps: int, batch: int, seq_len: int,
          cache: str) -> dict:
    """One host: open the corpus as training does, read its rows of `steps` batches; times and bytes."""
    from flax_gpt2.configs import base
    from flax_gpt2.train import data

    shutil.rmtree(cache, ignore_errors=True)
    os.environ["FLAX_GPT2_CACHE"] = cache
    config = base.get_config().data
    config.source, config.remote_reads, config.remote_block_bytes = url, how, block
    t0 = time.perf_counter()
    store = data.load_tokens(config, progress=False)
    opened = time.perf_counter() - t0
    windows = data.Windows(store, 0, data.split_point(store, config.val_fraction, seq_len), seq_len)
    order = np.random.default_rng([0, 0]).permutation(windows.count)
    rows = batch // hosts
    first = None
    for step in range(steps):
        ids = order[step * batch:(step + 1) * batch][host * rows:(host + 1) * rows]
        windows.read(ids.reshape(1, -1))
        first = first or time.perf_counter() - t0
    total = time.perf_counter() - t0
    if how == "range":
        read = store.start_bytes + store.cache.bytes_read
        disk, requests = 0, store.cache.requests
    else:
        disk = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
        read, requests = disk, None
    return {"open_s": opened, "first_batch_s": first, "total_s": total, "bytes_read": read, "local_disk": disk,
            "requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32_000_000)
    parser.add_argument("--shard_tokens", type=int, default=4_000_000)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=512, help="global batch (windows) per step")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--blocks", default="4096,65536", help="data.remote_block_bytes values for 'range' reads")
    parser.add_argument("--text", default=str(REPO / "flax_gpt2" / "data" / "tinyshakespeare.txt"))
    args = parser.parse_args()
    text = Path(args.text).read_text() if Path(args.text).exists() else Path("/work/shared/data/tinyshakespeare.txt")\
        .read_text()

    work = Path(tempfile.mkdtemp(prefix="remote_corpus_"))
    emulator = gcs_emulator.Emulator(gcs_emulator.BUCKET, work, gcs_emulator._emulator_pythonpath(work / "pkg"))
    env = None
    try:
        env = gcs_emulator._InProcessEnv(gcs_emulator.emulator_env(emulator.start()))
        url = f"gs://{gcs_emulator.BUCKET}/corpus"
        t0 = time.perf_counter()
        size = _write_corpus(url, args.tokens, args.shard_tokens, text)
        print(f"corpus: {args.tokens:,} tokens, {size / 2**20:.0f} MiB in {-(-args.tokens // args.shard_tokens)} "
              f"shards, uploaded in {time.perf_counter() - t0:.1f} s; CPU: {cpu_name()}", flush=True)
        print(f"{args.hosts} hosts, {args.steps} steps of {args.batch} x {args.seq_len + 1} tokens "
              f"({args.batch // args.hosts} rows per host per step)")
        useful = args.steps * (args.batch // args.hosts) * (args.seq_len + 1) * 2
        print(f"the rows themselves: {useful / 2**20:.1f} MiB per host")
        print("| reads | host | open s | first batch s | all steps s | MiB read | local disk MiB | request rounds |")
        print("|---|---|---|---|---|---|---|---|")
        runs = [("mirror", 4096)] + [("range", int(b)) for b in args.blocks.split(",")]
        for how, block in runs:
            for host in range(args.hosts):
                r = _host(url, how, block, host, args.hosts, args.steps, args.batch, args.seq_len, str(work / "cache"))
                name = how if how == "mirror" else f"range, {block // 1024} KiB blocks"
                print(f"| {name} | {host} | {r['open_s']:.2f} | {r['first_batch_s']:.2f} | {r['total_s']:.2f} | "
                      f"{r['bytes_read'] / 2**20:.1f} | {r['local_disk'] / 2**20:.0f} | {r['requests'] or '-'} |",
                      flush=True)
    finally:
        if env is not None:
            env.restore()
        emulator.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

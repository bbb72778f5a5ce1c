"""What the persistent compilation cache saves a restarted training run: compile seconds, first start vs restart.

    python benchmarks/compile_cache.py                    # configs/tiny.py, 3 rounds
    python benchmarks/compile_cache.py --config configs/shakespeare.py --steps 3

Each round starts the same run twice in fresh processes: once with an empty `compile_cache_dir` (a first
start) and once with the cache the first filled (a restart on a new VM with the workdir's cache). Both read
`result.json["goodput"]["compile_s"]` (tracing, lowering and compiling or loading from the cache, as the run
itself measures it) and the wall time. Rounds alternate so that load on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.compile_time import cpu_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))



def _start(config: str, steps: int, workdir: Path, cache: Path, source: str) -> dict:
    args = [sys.executable, "-m", "train", "--config", config, "--workdir", str(workdir), f"--config.steps={steps}",
            "--config.progress_bar=False", f"--config.compile_cache_dir={cache}", "--config.eval_every=0",
            f"--config.data.source={source}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads((workdir / "result.json").read_text())["goodput"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source", default=str(REPO / "flax_gpt2" / "assets" / "data" / "tinyshakespeare.txt"))
    args = parser.parse_args()
    rows = {"first start (empty cache)": [], "restart (cache filled)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            cache = Path(tmp) / f"cache{i}"
            for name in rows:
                workdir = Path(tmp) / f"run{i}_{len(rows[name])}_{name[:5]}"
                rows[name].append(_start(args.config, args.steps, workdir, cache, args.source))
                shutil.rmtree(workdir)
    print(f"{args.config}, {args.steps} steps, {args.rounds} rounds; {cpu_name()}")
    print("| start | compile s (median) | wall s (median) | compile vs first start |")
    print("|---|---|---|---|")
    first = statistics.median(r["compile_s"] for r in rows["first start (empty cache)"])
    for name, results in rows.items():
        compile_s = statistics.median(r["compile_s"] for r in results)
        wall = statistics.median(r["wall_s"] for r in results)
        print(f"| {name} | {compile_s:.2f} | {wall:.2f} | {compile_s / first:.2f}x |")


if __name__ == "__main__":
    main()

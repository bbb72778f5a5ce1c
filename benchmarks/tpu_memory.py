"""The TPU memory table: each GPT-2 size's shipped config compiled for 8-chip slices, on this CPU host.

    python benchmarks/tpu_memory.py                    # every cell not yet in the results file, then the table
    python benchmarks/tpu_memory.py --only gpt2_124m@v4-8 --redo
    python benchmarks/tpu_memory.py --render           # only rewrite benchmarks/TPU_MEMORY.md
    python benchmarks/tpu_memory.py --extra=--config.model.attention=xla   # an override for every cell

Each cell runs `python -m train --config configs/<size>.py --workdir TMP --config.compile_only=<topology>`
(train/compile_only.py) under `nice`, one at a time (a compile takes one to five CPU-minutes and up to
~11 GB of host RAM for 355M, 2 GB for the scanned 774M and 1558M), keeps its `compile_report.json` in
`benchmarks/tpu_memory_results.json`
as soon as it finishes, and renders `benchmarks/TPU_MEMORY.md` from what is there. A cell whose host RAM
estimate exceeds the memory available now is skipped and marked so. Nothing in the table is typed by
hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "tpu_memory_results.json")
TABLE = os.path.join(HERE, "TPU_MEMORY.md")

SIZES = ["gpt2_124m", "gpt2_355m", "gpt2_774m", "gpt2_1558m"]
TOPOLOGIES = ["v3-8", "v4-8", "v5litepod-8"]
# Overrides for every cell of a topology (none needed now).
TOPOLOGY_OVERRIDES: dict[str, tuple[str, ...]] = {}
# Extra cells: (size, topology, overrides). A pod slice goes here where a size does not fit on 8 chips.
EXTRA: list[tuple[str, str, tuple[str, ...]]] = []
# Peak host RAM of one compile (GiB), measured on the 2-core dev machine with libtpu 0.0.42.1; a cell is
# skipped when MemAvailable is below this plus 1 GiB.
HOST_RAM_GIB = {"gpt2_124m": 5, "gpt2_355m": 11, "gpt2_774m": 3, "gpt2_1558m": 3}  # the last two scanned
GiB = float(1 << 30)


def cell_key(size: str, topology: str, overrides: tuple[str, ...] = ()) -> str:
    return "@".join([size, topology, *overrides])


def mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return float("inf")


def run_cell(size: str, topology: str, overrides: tuple[str, ...], timeout: float) -> dict:
    """One compile in a child process; its report plus exit code, wall and CPU time, and peak RSS."""
    with tempfile.TemporaryDirectory(prefix="tpu_memory_") as workdir:
        cmd = ["nice", sys.executable, "-m", "train", "--config", os.path.join(ROOT, "configs", f"{size}.py"),
               "--workdir", workdir, f"--config.compile_only={topology}", *overrides]
        started = time.perf_counter()
        log_path = os.path.join(workdir, "log.txt")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            deadline = started + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(1.0)
        code = os.waitstatus_to_exitcode(status)
        with open(log_path) as f:
            tail = [line.rstrip() for line in f if not line[:2] in ("W0", "I0", "E0")][-12:]
        report_path = os.path.join(workdir, "compile_report.json")
        report = json.load(open(report_path)) if os.path.exists(report_path) else None
    return {"report": report, "exit_code": code, "wall_seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "host_peak_rss_gib": round(usage.ru_maxrss / (1 << 20), 2), "command": " ".join(cmd[1:]),
            "log_tail": tail, "date": datetime.date.today().isoformat(), "host": platform.node()}


def load_results() -> dict:
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            return json.load(f)
    return {}


def save_results(results: dict) -> None:
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, RESULTS)


def cells() -> list[tuple[str, str, tuple[str, ...]]]:
    return [(s, t, TOPOLOGY_OVERRIDES.get(t, ())) for s in SIZES for t in TOPOLOGIES] + list(EXTRA)


def _gib(n) -> str:
    return "" if n is None else f"{n / GiB:.1f}"


def _row(size: str, topology: str, overrides, entry: dict) -> str:
    extra = tuple(overrides) + tuple(entry.get("extra_args", ()))
    label = size.removeprefix("gpt2_").upper() + "".join(f" `{a.removeprefix('--config.')}`" for a in extra)
    if entry.get("skipped"):
        return f"| {label} | {topology} | skipped: {entry['skipped']} |||||||||"
    r = entry.get("report")
    if r is None:
        why = (entry.get("log_tail") or ["no report"])[-1][:160].replace("|", "/")
        return f"| {label} | {topology} | failed (exit {entry.get('exit_code')}): {why} |||||||||"
    mesh = "×".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    micro = f"{r['micro_batch_size']} ({r['micro_batch_per_chip']}/chip) × {r['accumulation_steps']}"
    mem = f"{_gib(r.get('bytes_per_chip'))} / {_gib(r['xla_available_hbm_bytes_per_chip'])}"
    if r.get("eval_bytes_per_chip"):
        mem += f" (eval {_gib(r['eval_bytes_per_chip'])})"
    step = f"{r['step_seconds_at_50_mfu']:.2f}" if r.get("step_seconds_at_50_mfu") else ""
    tps = f"{r['tokens_per_second_at_50_mfu']:,.0f}" if r.get("tokens_per_second_at_50_mfu") else ""
    ratio = f"{r['xla_to_model_flops']:.2f}" if r.get("xla_to_model_flops") else ""
    fits = "yes" if r["fits"] else "**no**"
    layers = f"{r['model']['remat']} / {r['model'].get('scan_layers', False)}"
    return (f"| {label} | {topology} ({r['chips']} chips) | {mesh} | {micro} | {layers} | {mem} | "
            f"{fits} | {step} | {tps} | {ratio} | {r['compile_seconds']:.0f} s / {entry['cpu_seconds']:.0f} CPU-s, "
            f"{entry['host_peak_rss_gib']:.1f} GB |")


def render(results: dict) -> str:
    lines = [
        "# GPT-2 on 8-chip TPU slices: memory and step time from the compiler",
        "",
        "Generated by `python benchmarks/tpu_memory.py` (do not edit by hand): every row is the shipped",
        "`configs/<size>.py` (batch 512 × 1024 tokens, bf16 compute, fp32 params and AdamW moments) compiled",
        "by `python -m train --config configs/<size>.py --workdir DIR --config.compile_only=<topology>` on a",
        "CPU-only host with libtpu's description of the slice. Memory is XLA's own buffer assignment for one",
        "chip (a TensorCore on v3), arguments + outputs − donated + temporaries + code, against the HBM XLA",
        "offers (\"eval\": the eval step with the whole train state resident). Step time and tokens/s assume 50%",
        "MFU of 6N + 12·L·D·T FLOPs per token; \"XLA/model\" is XLA's cost analysis (its accumulation-loop body",
        "multiplied by the number of micro-batches) over that count: rematerialization's recomputed forward",
        "pass shows there, and so do two things XLA's count misses: splash attention (a Pallas kernel, opaque to",
        "it: the 12·L·D·T attention share is missing, 0.87 for 124M) and loops XLA makes itself (collective",
        "matmuls over the fsdp shards, counted once): each report's `xla_flops_note` says which apply.",
        "\"remat / scan\": rematerialized blocks, and `nn.scan` over them (XLA counts a scanned layer's FLOPs",
        "once, so that ratio is left empty there).",
        "",
        "| size | topology | mesh | micro-batch × steps | remat / scan | GiB per chip / usable | fits | s/step at 50% MFU "
        "| tokens/s at 50% MFU | XLA/model FLOPs | compile (host) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for size, topology, overrides in cells():
        entry = results.get(cell_key(size, topology, overrides))
        if entry is None:
            lines.append(f"| {size.removeprefix('gpt2_').upper()} | {topology} | not run yet |||||||||")
            continue
        lines.append(_row(size, topology, overrides, entry))
        if entry.get("report") and not entry["report"]["fits"]:
            notes.append(f"- {size} on {topology}: {entry['report'].get('error', '')} "
                         f"Suggested: {'; '.join(entry['report'].get('suggestions', []))}")
    entries = [e for e in results.values() if e.get("report")]
    if entries:
        e = entries[0]
        compiler = e["report"].get("compiler") or f"libtpu {e['report'].get('libtpu')}"
        lines += ["", f"Compiled with jax {e['report']['jax']}, {compiler}; compile times "
                      f"are wall and CPU seconds on a 2-core CPU host shared with other jobs, with peak host RSS."]
    if notes:
        lines += ["", "Cells that do not fit:", *notes]
    done = [results.get(cell_key(*c)) for c in cells()]
    if all(e and e.get("report") and e["report"]["fits"] for e in done):
        lines += ["", "Every size fits every 8-chip slice, so no pod slice is needed. On a bigger slice, make",
                  "`micro_batch_size` a multiple of its device count (the batch is split over all of them)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="cells to run, as size@topology")
    parser.add_argument("--redo", action="store_true", help="rerun cells that already have results")
    parser.add_argument("--render", action="store_true", help="only rewrite the table from the results file")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
    parser.add_argument("--extra", action="append", default=[],
                        help="a --config.KEY=VALUE override for every cell run now (shown in the table)")
    args = parser.parse_args(argv)

    results = load_results()
    if not args.render:
        for size, topology, overrides in cells():
            key = cell_key(size, topology, overrides)
            if args.only is not None and key not in args.only:
                continue
            if key in results and not args.redo and not results[key].get("skipped"):
                continue
            need, have = HOST_RAM_GIB.get(size, 8) + 1, mem_available_gib()
            if have < need:
                results[key] = {"skipped": f"needs ~{need} GB of host RAM, {have:.0f} GB available"}
                print(f"{key}: skipped ({results[key]['skipped']})", flush=True)
            else:
                print(f"{key}: compiling ...", flush=True)
                results[key] = run_cell(size, topology, overrides + tuple(args.extra), args.timeout)
                results[key]["extra_args"] = list(args.extra)
                r = results[key]["report"]
                print(f"{key}: exit {results[key]['exit_code']}, "
                      + (f"{_gib(r.get('bytes_per_chip'))} GiB per chip, fits={r['fits']}" if r else "no report")
                      + f", {results[key]['cpu_seconds']} CPU-s, {results[key]['host_peak_rss_gib']} GB RSS", flush=True)
            save_results(results)
            with open(TABLE, "w") as f:
                f.write(render(results))
    with open(TABLE, "w") as f:
        f.write(render(results))
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    from flax_gpt2.utils import cli

    sys.exit(cli.run(main, prog="benchmarks/tpu_memory.py"))  # the CLI conventions (README)

"""The text of a `--compile_only` report (`serve.compile_only`): the table printed after compiling."""

from __future__ import annotations

from typing import Any

GiB = float(1 << 30)


def format_report(report: dict[str, Any]) -> str:
    """The report as the few lines a person reads."""
    m = report["model"]

    lines = [
        f"serve compile-only for {report['topology']} ({report['device_kind']}): {report['serving']}, "
        f"{report['replicas']} replicas",
        f"  model {m['name']}: {m['num_params'] / 1e6:.0f}M params, {m['dtype']}"
        + (f", {m['quantize']} weights" if m["quantize"] else ""),
        f"  weights per chip: {gib(report['weights_bytes'])} (params {gib(report['params_bytes'])} + output "
        f"projection {gib(report['head_bytes'])})",
        f"  KV per slot at {report['context_length']} tokens: {gib(report['kv_bytes_per_slot'])}; "
        f"{report['max_batch']} slots: KV {gib(report['kv_bytes'])}, all slot state {gib(report['slots_bytes'])}",
    ]
    for name in ("prefill", "decode"):
        part = report.get(name)
        if part is None:
            continue
        what = f"prompt {part['prompt_length']}" if name == "prefill" else f"batch {part['batch']}"
        if "memory" in part:
            mem = part["memory"]
            lines.append(f"  {name} ({what}, compiled in {part['seconds']} s): arguments {gib(mem['arguments'])}, "
                         f"outputs {gib(mem['outputs'])}, temporaries {gib(mem['temporaries'])}, "
                         f"code {gib(mem['generated_code'])}")
        else:
            lines.append(f"  {name} ({what}): XLA refused it: {part['error']}")
    lines.append(f"  peak per chip: {gib(report.get('peak_bytes_per_chip'))} of {gib(report['hbm_bytes_per_chip'])} "
                 f"HBM ({gib(report['usable_hbm_bytes_per_chip'])} usable); the prefix cache takes up to "
                 f"{gib(report['prefix_cache_bytes'])} more of what is left (--prefix_cache_bytes), dropped first "
                 "when memory runs out")
    if "largest_max_batch" in report:
        lines.append(f"  largest --max_batch at --context_length {report['context_length']}: "
                     f"{report['largest_max_batch']} (estimated from the compiled batches"
                     + (f"; compiled at {report['largest_batch_checked']}: fits)" if report["largest_batch_checked"]
                        else ")"))
    bound = report.get("decode_bound")
    if bound:
        lines.append(f"  decode bound at {report['hbm_bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s (an upper bound, "
                     "not a measurement):")
        for key in ("single_stream", "max_batch", "largest_max_batch"):
            if key in bound:
                b = bound[key]
                lines.append(f"    batch {b['batch']}: {b['step_ms']} ms per step, {b['tokens_per_s_per_chip']:,.0f} "
                             f"tokens/s per chip, {b['tokens_per_s_per_slice']:,.0f} per {report['topology']}")
    lines.append(f"  fits: {report['fits']}" + (f" ({report['refusal']})" if report.get("refusal") else ""))
    return "\n".join(lines)


def gib(n: Any) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"

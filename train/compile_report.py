"""The text of a compile_only report: the summary printed after compiling, and the error when it does not fit."""

from __future__ import annotations

GiB = float(1 << 30)


def gib(n) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


def does_not_fit_message(report: dict) -> str:
    where = "train step" if report.get("error") or report["bytes_per_chip"] > report["xla_available_hbm_bytes_per_chip"] \
        else "eval step (with the train state resident)"
    needed = report["bytes_per_chip"] if where == "train step" else report.get("eval_bytes_per_chip")
    buffers = "; ".join(f"{gib(b['bytes'])} {b['shape']} ({b['op']})"
                        for b in report.get("largest_buffers", [])[:4])
    text = (f"the {where} does not fit a {report['topology']}: it needs {gib(needed)} per chip of "
            f"{gib(report['xla_available_hbm_bytes_per_chip'])} usable HBM")
    if buffers:
        text += f"; largest buffers: {buffers}"
    if report.get("suggestions"):
        text += "; try " + " or ".join(s.split(" (")[0] for s in report["suggestions"])
    return text


def format_report(report: dict) -> str:
    """The report as the few lines a person reads."""
    mem = report.get("memory", {})
    m = report["model"]
    lines = [
        f"compile-only for {report['topology']} ({report['topology_name']}): {report['chips']} chips, "
        f"{report['devices']} devices of {report['device_kind']}",
        f"  model: {m['num_params'] / 1e6:.0f}M params, L={m['n_layer']} D={m['n_embd']}, {m['dtype']} compute, "
        f"{m['param_dtype']} params, remat={m['remat']}" + (
            f"; LoRA rank {report['lora']['rank']} on {report['lora']['targets']} over a frozen "
            f"{report['lora']['base_dtype']} base" if report.get("lora") else ""),
        f"  mesh {report['mesh']}; batch {report['batch_size']} x {report['seq_len']} tokens = "
        f"{report['accumulation_steps']} micro-batches of {report['micro_batch_size']} "
        f"({report['micro_batch_per_chip']} per chip)",
        "  memory per chip: " + ", ".join(f"{k} {gib(mem[k])}" for k in
                                          ("arguments", "outputs", "aliased", "temporaries", "generated_code")
                                          if k in mem)
        + f"; total {gib(report.get('bytes_per_chip'))} of {gib(report['hbm_bytes_per_chip'])} HBM "
          f"({gib(report['xla_available_hbm_bytes_per_chip'])} usable)",
    ]
    if "eval_bytes_per_chip" in report:
        lines.append(f"  eval step (batch {report['eval_batch_size']}) with the train state resident: "
                     f"{gib(report['eval_bytes_per_chip'])} per chip")
    flops = f"  FLOPs per step: model 6N+12LDT {report['model_flops_per_step']:.3e}"
    if "xla_flops_per_step" in report:
        flops += (f"; XLA {report['xla_flops_per_step']:.3e} (its count of {report['xla_flops_counted_once']:.3e} "
                  f"has the accumulation loop body once: x{report['accumulation_steps']}), "
                  f"ratio {report['xla_to_model_flops']}")
        if "xla_flops_note" in report:
            flops += f" ({report['xla_flops_note']})"
    elif "xla_flops_note" in report:
        flops += f"; XLA {report['xla_flops_counted_once']:.3e} with {report['xla_flops_note']}"
    elif report["platform"] == "gpu":
        flops += "; XLA's GPU compiler gives no cost analysis"
    lines.append(flops)
    if "step_seconds_at_50_mfu" in report:
        lines.append(f"  at 50% MFU: {report['step_seconds_at_50_mfu']:.3g} s per step, "
                     f"{report['tokens_per_second_at_50_mfu']:,.0f} tokens/s")
    lines.append(f"  compile: train step {report['compile_seconds']} s"
                 + (f", eval step {report['eval_compile_seconds']} s" if "eval_compile_seconds" in report else ""))
    if report.get("error"):
        lines.append(f"  XLA: {report['error']}")
    for b in report.get("largest_buffers", []):
        lines.append(f"    {gib(b['bytes']):>11}  {b['shape']}  {b['op']}")
    lines.append(f"  fits: {report['fits']}")
    for s in report.get("suggestions", []):
        lines.append(f"  try {s}")
    return "\n".join(lines)

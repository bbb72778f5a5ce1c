"""One command that measures what matters on an accelerator: train MFU, decode speed, compile times.

    python benchmarks/device_check.py                 # full: GPT-2 124M, T=1024 (≤ 8 minutes on one GPU/TPU chip)
    python benchmarks/device_check.py --tiny          # reduced: the tiny preset, seconds on a CPU (CI)

Whatever accelerator JAX sees (one chip: the first device):
- train: the real `train.step.jit_train_step` (bf16 compute, fp32 master params, AdamW), for every attention
  backend the platform offers x scan_layers on/off. The micro-batch is the largest power of two whose
  compiled step fits the chip's memory by XLA's memory analysis (searched by compiling, never by running
  out of memory). Reports tokens/s per chip and MFU = tokens/s x (6N + 12LDT) / the chip's dense bf16 peak
  (train/metrics.py's table).
- decode: greedy GPT-2 bf16, prompt 32, 128 new tokens, B=1 and B=64: tokens/s, ms per step, time to
  first token (prefill + first step); against transformers PyTorch `generate` on the same device when
  torch with CUDA is importable (otherwise that column is empty).
- decode int8: the same at B=1 with int8 weights (`flax_gpt2.modeling.quantize`, bf16 compute): tokens/s
  against the bf16 row, and the parameter bytes of both (a decode step at B=1 reads them all but `wpe`).
- speculative: greedy B=1 with speculative decoding, k=4, against the plain bf16 row: prompt lookup (n=2), a
  2-layer draft of the same width (random weights: it measures the mechanism's cost, acceptance ~0), and the
  target drafting for itself (every proposal accepted: the upper bound the bookkeeping allows); tokens/s, the
  ratio to plain greedy and the acceptance rate. Every output is asserted equal to plain greedy.
Writes `device_check.json` (or `--out`) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: `train/` is not installed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _now() -> float:
    return time.perf_counter()


def _device_memory(device) -> int | None:
    stats = getattr(device, "memory_stats", lambda: None)()
    return (stats or {}).get("bytes_limit")


def _opt_config():
    import ml_collections

    c = ml_collections.ConfigDict()
    c.lr, c.schedule, c.warmup_steps, c.decay_steps, c.min_lr_ratio = 6e-4, "cosine", 10, 1000, 0.1
    c.b1, c.b2, c.eps, c.weight_decay, c.grad_clip = 0.9, 0.95, 1e-8, 0.1, 1.0
    return c


def _train_setup(config, micro: int, seq_len: int):
    """(jitted step, abstract args, mesh) for one chip: state shardings from the model's logical axes."""
    from flax_gpt2.modeling.model import GPT2LMHeadModel
    from flax_gpt2.train import mesh as mesh_lib, step as step_lib

    device = jax.devices()[:1]
    mesh = jax.make_mesh((1, 1, 1), mesh_lib.MESH_AXES, devices=device,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
             ("kv", None), ("vocab", None), ("length", None), ("layers", None))
    model = GPT2LMHeadModel(config)
    tx, schedule = step_lib.make_optimizer(_opt_config(), 1000)
    shardings, shapes = mesh_lib.train_state_shardings(model, tx, mesh, rules, seq_len)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    step = step_lib.jit_train_step(model, tx, schedule, shardings, batch_sharding)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    batch = jax.ShapeDtypeStruct((1, micro, seq_len + 1), jnp.int32, sharding=batch_sharding)
    return model, tx, step, abstract_state, batch, shardings, batch_sharding, mesh, rules


def _fits(config, micro: int, seq_len: int, memory: int | None) -> tuple[bool, float, object]:
    import flax.linen as nn

    model, tx, step, state, batch, *_, mesh, rules = _train_setup(config, micro, seq_len)
    start = _now()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = step.lower(state, batch, jax.random.key(0)).compile()
    seconds = _now() - start
    analysis = compiled.memory_analysis()
    need = sum(getattr(analysis, k, 0) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                 "temp_size_in_bytes", "generated_code_size_in_bytes"))
    need -= getattr(analysis, "alias_size_in_bytes", 0)  # donated state: inputs and outputs share buffers
    return (memory is None or need <= 0.9 * memory), seconds, compiled


def train_case(preset: str, seq_len: int, attention: str, scan: bool, max_micro: int, steps: int) -> dict:
    import flax.linen as nn

    from flax_gpt2.modeling.config import GPT2Config
    from flax_gpt2.train import metrics, step as step_lib

    # Dropout 0, as pretraining runs use (and the fused kernels require).
    config = GPT2Config.from_preset(preset, dtype=jnp.bfloat16, param_dtype=jnp.float32, attention=attention,
                                    scan_layers=scan, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    memory = _device_memory(jax.devices()[0])
    micro, compile_s = None, math.nan
    candidate = max_micro
    while candidate >= 1:  # the largest power of two that fits, by the compiled program's memory analysis
        ok, seconds, _ = _fits(config, candidate, seq_len, memory)
        if ok:
            micro, compile_s = candidate, seconds
            break
        candidate //= 2
    if micro is None:
        return {"attention": attention, "scan_layers": scan, "error": "no micro-batch fits"}
    model, tx, step, _, _, shardings, batch_sharding, mesh, rules = _train_setup(config, micro, seq_len)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = step_lib.init_train_state(model, tx, shardings, jax.random.key(0), seq_len)
        tokens = jax.device_put(np.random.default_rng(0).integers(0, config.vocab_size, (1, micro, seq_len + 1),
                                                                  dtype=np.int32), batch_sharding)
        state, m = step(state, tokens, jax.random.key(1))  # warm-up
        float(m["loss"])
        start = _now()
        for _ in range(steps):
            state, m = step(state, tokens, jax.random.key(1))
        float(m["loss"])
        seconds = (_now() - start) / steps
    tokens_per_s = micro * seq_len / seconds
    peak = metrics.peak_flops(jax.devices()[:1], cpu_peak_flops=float("nan"))
    mfu = tokens_per_s * metrics.flops_per_token(config, seq_len) / peak if peak and math.isfinite(peak) else None
    return {"attention": attention, "scan_layers": scan, "micro_batch": micro, "step_s": seconds,
            "tokens_per_s": tokens_per_s, "mfu": mfu, "compile_s": compile_s}


def decode_case(preset: str, batch: int, prompt: int, new: int, int8: bool = False) -> dict:
    import flax_gpt2
    from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params
    from flax_gpt2.modeling.quantize import parameter_bytes, quantize_params

    config = flax_gpt2.GPT2Config.from_preset(preset, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = GPT2LMHeadModel(config)
    params = init_params(model, jax.random.key(0))
    if int8:
        params = quantize_params(params)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt), dtype=np.int32)
    start = _now()
    flax_gpt2.generate(model, params, ids, max_new_tokens=new, do_sample=False)  # compile + run
    compile_s = _now() - start
    flax_gpt2.generate(model, params, ids, max_new_tokens=1, do_sample=False)  # its own compile, if any
    start = _now()
    flax_gpt2.generate(model, params, ids, max_new_tokens=1, do_sample=False)
    ttft = _now() - start
    start = _now()
    flax_gpt2.generate(model, params, ids, max_new_tokens=new, do_sample=False)
    seconds = _now() - start
    row = {"batch": batch, "tokens_per_s": batch * new / seconds, "ms_per_step": 1000 * seconds / new,
           "ttft_ms": 1000 * ttft, "first_call_s": compile_s, "param_bytes": parameter_bytes(params)}
    if not int8:
        row.update(_torch_decode(preset, batch, ids, new))
    return row


def speculative_case(preset: str, prompt: int, new: int, proposer: str, k: int = 4) -> dict:
    """Greedy B=1 decoding with speculative decoding (`proposer`: "lookup", "draft" or "self"), checked equal to
    plain greedy; tokens/s of the second call and the acceptance rate."""
    import flax_gpt2
    from flax_gpt2.generation.speculative import speculative_generate
    from flax_gpt2.modeling.model import GPT2LMHeadModel, init_params

    config = flax_gpt2.GPT2Config.from_preset(preset, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = GPT2LMHeadModel(config)
    params = init_params(model, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt), dtype=np.int32)
    if proposer == "lookup":
        spec = dict(prompt_lookup_ngram=2)
    elif proposer == "self":
        spec = dict(draft=(model, params))
    else:
        draft = GPT2LMHeadModel(config.replace(n_layer=2))
        spec = dict(draft=(draft, init_params(draft, jax.random.key(1))))
    plain = flax_gpt2.generate(model, params, ids, max_new_tokens=new, do_sample=False)
    ours, stats = speculative_generate(model, params, ids, max_new_tokens=new, num_draft_tokens=k, return_stats=True,
                                       **spec)  # compile + run
    assert (ours == plain).all(), f"speculative ({proposer}) greedy output differs from plain greedy"
    start = _now()
    speculative_generate(model, params, ids, max_new_tokens=new, num_draft_tokens=k, **spec)
    seconds = _now() - start
    return {"proposer": proposer, "k": k, "tokens_per_s": new / seconds,
            "acceptance_rate": float(stats["acceptance_rate"][0])}


def _torch_decode(preset: str, batch: int, ids: np.ndarray, new: int) -> dict:
    try:
        import torch
        import transformers
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    from flax_gpt2.modeling.config import GPT2Config

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2Config.from_preset(preset).to_hf_config()))
    hf = hf.to("cuda", torch.bfloat16).eval()
    inputs = torch.tensor(ids, device="cuda")
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=50256)
    with torch.no_grad():
        hf.generate(inputs, **kwargs)
        torch.cuda.synchronize()
        start = _now()
        hf.generate(inputs, **kwargs)
        torch.cuda.synchronize()
        seconds = _now() - start
    return {"torch_tokens_per_s": batch * new / seconds, "speedup_vs_torch": None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="reduced sizes (CI, CPU)")
    parser.add_argument("--out", default="device_check.json")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    platform_name = device.platform
    if args.tiny:
        preset, seq_len, max_micro, steps, prompt, new, batches = "tiny", 64, 8, 2, 8, 8, (1, 4)
    else:
        preset, seq_len, max_micro, steps, prompt, new, batches = "gpt2", 1024, 64, 10, 32, 128, (1, 64)
    backends = ["xla", "dot_product"] + (["splash"] if platform_name == "tpu" else [])
    cases = [(a, scan) for a in backends for scan in (False, True)]
    if args.tiny:  # CI: every code path once, not every combination
        cases = [("xla", False), ("xla", True), ("dot_product", False)]
    report = {"date": time.strftime("%Y-%m-%d"), "device": device.device_kind, "platform": platform_name,
              "devices": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
              "preset": preset, "seq_len": seq_len, "train": [], "decode": [], "decode_int8": [],
              "speculative": []}
    started = _now()
    for attention, scan in cases:
        row = train_case(preset, seq_len, attention, scan, max_micro, steps)
        report["train"].append(row)
        print(f"train  {attention:12s} scan={scan!s:5s} " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            if k not in ("attention", "scan_layers")), flush=True)
    for batch in batches:
        row = decode_case(preset, batch, prompt, new)
        if row.get("torch_tokens_per_s"):
            row["speedup_vs_torch"] = row["tokens_per_s"] / row["torch_tokens_per_s"]
        report["decode"].append(row)
        print(f"decode B={batch:<3d} " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in row.items() if k != "batch"), flush=True)
    row = decode_case(preset, 1, prompt, new, int8=True)
    bf16 = report["decode"][0]
    row.update(vs_bf16=row["tokens_per_s"] / bf16["tokens_per_s"],
               bytes_vs_bf16=row["param_bytes"] / bf16["param_bytes"])
    report["decode_int8"].append(row)
    print("decode int8 B=1 " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items() if k != "batch"), flush=True)
    for proposer in ("lookup", "draft", "self"):
        row = speculative_case(preset, prompt, new, proposer)
        row["vs_plain"] = row["tokens_per_s"] / bf16["tokens_per_s"]
        report["speculative"].append(row)
        print(f"speculative {proposer} k={row['k']}: tokens/s={row['tokens_per_s']:.4g}, vs plain "
              f"{row['vs_plain']:.2f}x, acceptance {row['acceptance_rate']:.2f}", flush=True)
    report["wall_s"] = _now() - started
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(_table(report))
    return 0


def _table(report: dict) -> str:
    lines = [f"\n{report['device']} ({report['platform']}), jax {report['jax']}, {report['preset']} T={report['seq_len']}",
             "| attention | scan | micro-batch | tokens/s/chip | MFU | step compile s |", "|---|---|---|---|---|---|"]
    for r in report["train"]:
        if "error" in r:
            lines.append(f"| {r['attention']} | {r['scan_layers']} | {r['error']} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        lines.append(f"| {r['attention']} | {r['scan_layers']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{r['compile_s']:.1f} |")
    lines += ["", "| decode batch | tokens/s | ms/step | TTFT ms | torch tokens/s | speed-up |", "|---|---|---|---|---|---|"]
    for r in report["decode"]:
        torch_tps = f"{r['torch_tokens_per_s']:,.0f}" if r.get("torch_tokens_per_s") else "n/a"
        speed = f"{r['speedup_vs_torch']:.2f}x" if r.get("speedup_vs_torch") else "n/a"
        lines.append(f"| {r['batch']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | {r['ttft_ms']:.1f} | "
                     f"{torch_tps} | {speed} |")
    lines += ["", "| int8 weights, decode batch | tokens/s | ms/step | TTFT ms | vs bf16 | param MB (vs bf16) |",
              "|---|---|---|---|---|---|"]
    for r in report.get("decode_int8", []):
        lines.append(f"| {r['batch']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | {r['ttft_ms']:.1f} | "
                     f"{r['vs_bf16']:.2f}x | {r['param_bytes'] / 1e6:,.1f} ({r['bytes_vs_bf16']:.2f}x) |")
    lines += ["", "| speculative greedy B=1 | k | tokens/s | vs plain | acceptance |", "|---|---|---|---|---|"]
    for r in report.get("speculative", []):
        lines.append(f"| {r['proposer']} | {r['k']} | {r['tokens_per_s']:,.0f} | {r['vs_plain']:.2f}x | "
                     f"{r['acceptance_rate']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from flax_gpt2.utils import cli

    sys.exit(cli.run(main, prog="benchmarks/device_check.py"))  # the CLI conventions (README)

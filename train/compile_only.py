"""`--config.compile_only=v4-8`: compile the run's train and eval steps for a TPU slice (or a GPU server,
`h100x8`), on a CPU-only host.

    python -m train --config configs/gpt2_124m.py --workdir DIR --config.compile_only=v4-8

builds the run exactly as `train_and_evaluate` would (model, optimizer, mesh, shardings, batch layout)
but from abstract shapes only: no parameter is allocated and no data is read. The devices come from
libtpu's description of the slice (`jax.experimental.topologies.get_topology_desc`, names mapped in
flax_gpt2/utils/topologies.py), so XLA's TPU compiler lays out, fuses and schedules the program as it would on
the real slice, and refuses it when it does not fit in HBM. GPU targets compile through jax-cuda12-plugin
with XLA's description of the card; XLA does not refuse a GPU program that is too big, so its memory is
compared here with what JAX's allocator takes of the card (75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says
otherwise), and XLA's GPU compiler has no cost analysis (no XLA FLOPs in the report).

It prints and writes `DIR/compile_report.json`: the mesh, the micro-batch and accumulation, per-chip
memory (arguments, outputs, temporaries, generated code) against HBM, FLOPs per step (the model's
6N + 12·L·D·T and XLA's cost analysis), the step time at 50% MFU and the compile time. When the step
does not fit it names the largest buffers, suggests what to change, and raises `DoesNotFit` (the
command exits non-zero).

FLOPs: XLA's cost analysis counts a loop body once, so the gradient-accumulation `lax.scan` over A
micro-batches is counted as one micro-batch; `xla_flops_per_step` multiplies it by A. Without
rematerialization it is then 1.0-1.15x 6N + 12·L·D·T (XLA also counts the softmax over the vocabulary,
LayerNorm, GELU and AdamW's elementwise work, which the model count ignores: ~0.3% for GPT-2 124M at
T=1024, ~7% for the tiny test model); rematerialization adds the recomputed forward pass, up to ~1.35x.
What XLA's count misses: a Pallas kernel (splash attention, `model.attention` "auto" on TPU v4+) is an
opaque custom call, so its 12·L·D·T attention FLOPs are missing (0.87x for 124M at T=1024); loops XLA
makes itself are counted once too (under fsdp, all-gather + matmul can become a "windowed einsum" loop
over the shards: 124M with fsdp=8 on a v5litepod-8 reads 0.72x); and with `model.scan_layers` the layer
scan's body is counted once, so no ratio is given. The report's `xla_flops_note` says which apply.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import tempfile
import time
from importlib import metadata
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from flax_gpt2.modeling.model import GPT2LMHeadModel
from flax_gpt2.utils import file_io, topologies

from . import (compile_report, config_checks, mesh as mesh_lib, metrics as metrics_lib,
               model_config as model_config_lib, packing as packing_lib, step as step_lib)
from .compile_report import GiB

MFU = 0.5  # the utilization the step-time prediction assumes


class DoesNotFit(RuntimeError):
    """The train (or eval) step needs more memory per chip than the target has."""

@dataclasses.dataclass
class _Plan:
    """The run's jitted steps and their abstract arguments, built as `train_and_evaluate` builds them."""
    gpt2_config: Any
    mesh: Any
    rules: tuple
    micro: int
    accumulation: int
    eval_batch: int
    train_step: Any
    eval_step: Any
    train_args: tuple
    eval_args: tuple
    state_bytes: int  # per device: params + optimizer state


def compile_only(config, workdir: str) -> dict[str, Any]:
    """Compiles the run of `config` for the topology `config.compile_only`; returns (and writes) the report.

    Raises:
      ValueError: an unknown topology name, or a mesh / batch the topology cannot take.
      DoesNotFit: the step needs more HBM per chip than the topology has (the report is written first).
    """

    config_checks.check_config(config)
    target = topologies.lookup(config.compile_only)
    _prepare_jax(target)
    devices = topologies.devices(target)
    plan = _plan(config, devices)

    report = _describe(config, target, plan)
    train = _compile(plan.train_step, plan.train_args, plan.mesh, plan.rules)
    report["compile_seconds"] = round(train["seconds"], 1)
    if train["error"] is None:
        report["memory"] = topologies.compiled_memory(train["compiled"])
        report["bytes_per_chip"] = report["memory"]["total"]
        report.update(_flops(train["compiled"], report, plan, train["kernels"]))
        evaluation = _compile(plan.eval_step, plan.eval_args, plan.mesh, plan.rules)
        report["eval_compile_seconds"] = round(evaluation["seconds"], 1)
        if evaluation["error"] is None:
            eval_memory = topologies.compiled_memory(evaluation["compiled"])
            # During an eval the whole train state stays resident beside the eval step's own buffers.
            eval_total = plan.state_bytes + eval_memory["total"] - eval_memory["arguments"] + _shard_bytes(
                plan.eval_args[1])
            report["eval_memory"] = dict(eval_memory, total_with_train_state=eval_total)
            report["eval_bytes_per_chip"] = eval_total
        else:
            report["eval_error"] = _first_line(evaluation["error"])
    else:
        report["error"] = _first_line(train["error"])
        report["memory"] = _memory_from_error(train["error"], plan)
        report["bytes_per_chip"] = report["memory"].get("total")
        report["largest_buffers"] = _largest_buffers(plan.train_step, plan.train_args, plan.mesh, plan.rules)
        report.update(_flops(None, report, plan))

    limit = report["xla_available_hbm_bytes_per_chip"]
    report["fits"] = fits(report)
    if train["error"] is None and report["bytes_per_chip"] > limit:
        # Compiled, yet too big: XLA's GPU compiler never refuses, and its TPU check weighs the temporaries
        # alone (1558M at 8 per v5e chip: 14.0 GiB of temporaries pass, 16.5 GiB with the arguments do not).
        report["largest_buffers"] = _largest_buffers(plan.train_step, plan.train_args, plan.mesh, plan.rules)
    if not report["fits"]:
        report["suggestions"] = _suggestions(config, report, plan, target)

    file_io.makedirs(workdir)
    file_io.atomic_write(file_io.join(workdir, "compile_report.json"), json.dumps(report, indent=1) + "\n")
    print(compile_report.format_report(report), flush=True)
    if not report["fits"]:
        raise DoesNotFit(compile_report.does_not_fit_message(report))
    return report


def fits(report: dict[str, Any]) -> bool:
    """Whether a report's steps fit its target: both compiled, and the train step, and the eval step with the
    train state resident, each need at most the HBM per chip that XLA leaves usable (less than the chip's
    nominal total: libtpu keeps some for itself, JAX's GPU allocator takes a fraction)."""
    limit = report["xla_available_hbm_bytes_per_chip"]
    return ("error" not in report and "eval_error" not in report and report["bytes_per_chip"] <= limit
            and report.get("eval_bytes_per_chip", 0) <= limit)


def _prepare_jax(target) -> None:
    """libtpu's (or the CUDA plugin's) environment, and JAX kept on the CPU, before any backend starts
    (users need not set them)."""
    topologies.prepare_environment(target)
    jax.config.update("jax_platforms", "cpu")  # JAX_PLATFORMS is read at import; this counts until backends start


def _plan(config, devices) -> _Plan:


    gpt2_config = model_config_lib.architecture(config)
    seq_len = config.data.seq_len
    if seq_len > gpt2_config.n_positions:
        raise ValueError(f"data.seq_len={seq_len} exceeds the model's n_positions={gpt2_config.n_positions}")
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
    shards = mesh_lib.batch_shards(mesh, rules)
    micro = config_checks.check_batch(config, shards)
    eval_batch = config.eval_batch_size or micro
    if eval_batch % shards:
        raise ValueError(f"eval_batch_size={eval_batch} is not divisible by the {shards} ways the mesh splits the batch")

    model = GPT2LMHeadModel(gpt2_config)
    tx, schedule = step_lib.make_optimizer(config.optimizer, config.steps)
    lora = model_config_lib.lora_config(config)  # LoRA: the state is adapters + their moments + the frozen base
    state_shardings, state_shapes = mesh_lib.train_state_shardings(model, tx, mesh, rules, seq_len, lora,
                                                                   model_config_lib.base_dtype(config))
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    packing = packing_lib.Packing.from_config(config.data)  # the separator's id is a constant: any corpus's compiles
    loss_on = config.data.loss_on  # the loss mask rides in the int32 ids: the inputs' shapes are the same
    train_step = step_lib.jit_train_step(model, tx, schedule, state_shardings, batch_sharding, lora, packing, loss_on)
    eval_step = step_lib.jit_eval_step(model, state_shardings.params, batch_sharding, lora, state_shardings.base,
                                       packing, loss_on)

    def abstract(shape, sharding):
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)

    state = jax.tree.map(abstract, state_shapes, state_shardings)
    accumulation = config.batch_size // micro
    tokens = jax.ShapeDtypeStruct((accumulation, micro, seq_len + 1), jnp.int32, sharding=batch_sharding)
    key = jax.eval_shape(lambda: jax.random.split(jax.random.key(config.seed))[1])
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
    eval_tokens = jax.ShapeDtypeStruct((1, eval_batch, seq_len + 1), jnp.int32, sharding=batch_sharding)
    state_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(state))
    eval_args = (state.params, eval_tokens) + (() if lora is None else (state.base,))
    return _Plan(gpt2_config, mesh, rules, micro, accumulation, eval_batch, train_step, eval_step,
                 (state, tokens, rng), eval_args, state_bytes)


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of `x` (without TPU tile padding)."""
    return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def _compile(jitted, args, mesh, rules, compiler_options=None) -> dict:
    """`{"compiled", "seconds", "error"}`; an out-of-memory refusal is returned, not raised."""

    started = time.perf_counter()
    # The model's activation constraints need the rules and the mesh at trace time, as in the train loop.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jitted.lower(*args)
    kernels = lowered.as_text().count("@tpu_custom_call")  # Pallas (Mosaic) kernels, e.g. splash attention
    try:
        compiled, error = lowered.compile(compiler_options or {}), None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, error = None, str(e)
    return {"compiled": compiled, "seconds": time.perf_counter() - started, "error": error, "kernels": kernels}


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0]


def _memory_from_error(error: str, plan: _Plan) -> dict[str, int]:
    """What an out-of-memory refusal tells: the temporaries it wanted, plus the arguments (the train state
    and the batch, which we size ourselves)."""
    arguments = plan.state_bytes + _shard_bytes(plan.train_args[1])
    out = {"arguments": arguments}
    said = topologies.refused_memory(error)
    if "temporaries" in said:
        out["temporaries"] = said["temporaries"]
        out["total"] = arguments + said["temporaries"]
    else:
        out["total"] = said.get("used", arguments)
    return out


def _largest_buffers(jitted, args, mesh, rules, count: int = 8) -> list[dict]:
    """Compiles again with XLA's dumps on and names the largest buffers of its buffer assignment (a TPU
    compile dumps it before it refuses the program): one row per piece of memory (values that take turns
    in it counted in `values`), with the shape and JAX operation of its largest value."""
    with tempfile.TemporaryDirectory(prefix="compile_only_dump_") as folder:
        _compile(jitted, args, mesh, rules, {"xla_dump_to": folder, "xla_dump_hlo_as_text": True})
        found = sorted(glob.glob(os.path.join(folder, "*jit_train_step*after_optimizations-buffer-assignment.txt")))
        optimized = sorted(glob.glob(os.path.join(folder, "*jit_train_step*after_optimizations.txt")))
        if not found:
            return []
        with open(found[0]) as f:
            assignment = f.read()
        op_names = {}
        if optimized:
            with open(optimized[0]) as f:
                for line in f:
                    hit = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]+)"', line)
                    if hit:
                        op_names[hit.group(1)] = hit.group(2)
    slots: dict[tuple, list] = {}  # (allocation, offset) -> [(size, value name, shape)]
    allocation = None
    for line in assignment.splitlines():
        hit = re.match(r"allocation (\d+): size \d+", line)
        if hit:
            allocation = hit.group(1)
            continue
        hit = re.match(r"\s*value: <\d+ (\S+?) @\S+> \(size=(\d+),offset=(\d+)\): (\S+)", line)
        if hit and allocation is not None:
            slots.setdefault((allocation, hit.group(3)), []).append((int(hit.group(2)), hit.group(1), hit.group(4)))
    out = []
    for values in slots.values():
        size, name, shape = max(values)
        base = re.sub(r"(\.remat\d*)+$", "", re.sub(r"\{.*\}$", "", name))
        op = re.sub(r"^jit\(\w+\)/(while/body/)?(closed_call/)?", "", op_names.get(base, "")) or base
        out.append({"bytes": size, "shape": re.sub(r"\{.*\}$", "", shape), "op": op, "values": len(values)})
    return sorted(out, key=lambda b: -b["bytes"])[:count]


def _flops(compiled, report: dict, plan: _Plan, kernels: int = 0) -> dict:

    tokens = report["batch_size"] * report["seq_len"]
    model_flops = metrics_lib.flops_per_token(plan.gpt2_config, report["seq_len"]) * tokens
    out = {"model_flops_per_step": model_flops}
    if compiled is not None:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and cost.get("flops"):
            once = float(cost["flops"]) * report["devices"]  # cost analysis is of one device's program
            out["xla_flops_counted_once"] = once
            if getattr(plan.gpt2_config, "scan_layers", False):
                # The layer scan's body (one block of L) is counted once too: no fair comparison.
                out["xla_flops_note"] = ("loop bodies counted once: the accumulation scan (x{}) and the layer "
                                         "scan (x{})".format(plan.accumulation, plan.gpt2_config.n_layer))
            else:
                out["xla_flops_per_step"] = once * plan.accumulation
                out["xla_to_model_flops"] = round(out["xla_flops_per_step"] / model_flops, 3)
                notes = []
                if kernels:
                    # A Pallas kernel is one opaque custom call to XLA's cost analysis: splash attention's
                    # 12·L·D·T share is missing from XLA's count (6N / (6N + 12LDT): 0.87 for 124M, T=1024).
                    notes.append(f"{kernels} Pallas kernel calls (splash attention) are not in XLA's count: "
                                 "expect about 6N / (6N + 12LDT) without remat")
                # Under fsdp, XLA may turn all-gather + matmul into a loop over the shards (a "windowed
                # einsum"); its body is counted once too (124M with fsdp=8 on a v5litepod-8: 0.72, not 0.87).
                windowed = len(set(re.findall(r"body=%([\w.\-]*windowed_dot_general_body[\w.\-]*)",
                                              compiled.as_text())))
                if windowed:
                    notes.append(f"{windowed} collective-matmul loops XLA made (windowed einsums over the fsdp "
                                 "shards) are counted once, not once per shard: the ratio drops")
                if notes:
                    out["xla_flops_note"] = "; ".join(notes)
    peak = metrics_lib.peak_flops(plan.mesh.devices.flat, 0.0)
    if peak:
        out["peak_flops"] = peak
        out["step_seconds_at_50_mfu"] = model_flops / (MFU * peak)
        out["tokens_per_second_at_50_mfu"] = tokens / out["step_seconds_at_50_mfu"]
    return out


def _describe(config, target, plan: _Plan) -> dict:

    g = plan.gpt2_config
    compiler = "jax-cuda12-pjrt" if target.platform == "gpu" else "libtpu"
    return {
        "topology": target.name,
        "platform": target.platform,
        "topology_name": target.topology_name,  # as libtpu / jax-cuda12-plugin take it
        "device_kind": target.device_kind,
        "chips": target.chips,
        "devices": target.num_devices,
        "mesh": {k: int(v) for k, v in plan.mesh.shape.items()},
        "batch_size": config.batch_size,
        "micro_batch_size": plan.micro,
        "accumulation_steps": plan.accumulation,
        "micro_batch_per_chip": plan.micro // _batch_shards(plan),
        "eval_batch_size": plan.eval_batch,
        "seq_len": config.data.seq_len,
        "model": {"n_layer": g.n_layer, "n_embd": g.n_embd, "n_head": g.n_head, "num_params": g.num_params,
                  "dtype": config.model.dtype, "param_dtype": config.model.param_dtype, "remat": g.remat,
                  "scan_layers": g.scan_layers},
        "lora": ({"rank": config.lora.rank, "targets": config.lora.targets,
                  "base_dtype": config.lora.base_dtype or config.model.param_dtype} if config.lora.rank else None),
        "hbm_bytes_per_chip": target.hbm_bytes_per_device,
        "xla_available_hbm_bytes_per_chip": target.usable_hbm_bytes_per_device,
        "state_bytes_per_chip": plan.state_bytes,
        "jax": jax.__version__,
        "compiler": f"{compiler} {metadata.version(compiler)}",
    }


def _batch_shards(plan: _Plan) -> int:

    return mesh_lib.batch_shards(plan.mesh, plan.rules)


def _suggestions(config, report: dict, plan: _Plan, target) -> list[str]:
    """Knobs that shrink the step, cheapest first: smaller micro-batches, remat, sharding the state."""
    limit = report["xla_available_hbm_bytes_per_chip"]
    memory = report["memory"]
    state = plan.state_bytes
    out = []
    activations = max(memory.get("total", state) - state, 1)
    shards = _batch_shards(plan)
    per_chip = plan.micro // shards
    if per_chip > 1 and state < 0.8 * limit:
        # Temporaries scale about linearly with the micro-batch; leave 20% headroom.
        room = 0.8 * limit - state
        want = max(1, min(per_chip - 1, int(per_chip * room / activations)))
        while want > 1 and config.batch_size % (want * shards):
            want -= 1
        out.append(f"--config.micro_batch_size={want * shards} ({want} sequences per chip, "
                   f"{config.batch_size // (want * shards)} accumulation steps)")
    if not config.model.remat:
        out.append("--config.model.remat=True (recompute each block in the backward pass: far fewer "
                   "activations kept, ~30% more FLOPs)")
    if state > 0.25 * limit:
        fsdp = plan.mesh.shape["fsdp"]
        more = [n for n in (2, 4, 8, 16, 32) if n > fsdp and report["devices"] % n == 0
                and plan.gpt2_config.n_embd % n == 0]
        if more:
            out.append(f"--config.mesh.fsdp={more[0]} (params and AdamW moments, {state / GiB:.1f} GiB per chip "
                       f"now, sharded {more[0]} ways)")
        else:
            out.append(f"a bigger slice than {target.name}: the train state alone is {state / GiB:.1f} GiB per chip")
    return out

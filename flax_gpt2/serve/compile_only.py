"""`--compile_only TOPOLOGY`: compile the server's prefill and decode programs for a TPU chip (or a GPU) on this
host, and say what one replica needs there, without loading a weight.

    python -m flax_gpt2.serve --model gpt2-xl --compile_only v5litepod-8 --max_batch 64 --context_length 1024

The model is built from its config alone (a preset name such as `gpt2-xl`, or a local folder's `config.json` /
a training run's saved config); its parameters are abstract (`jax.eval_shape`), int8 ones too (`--quantize`).
The programs are the engine's own (`slots.prefill_prompt` for the largest prompt bucket, `--context_length`
tokens, and `slots.steps` over `--max_batch` slots of `--context_length` columns, `--decode_steps` steps per
call), compiled by XLA's TPU compiler for the target's devices (`utils.topologies`, as `train`'s compile_only).

One replica per chip: the plan is for a server without `--mesh` (the whole model and its slots on one device),
so every number is per chip, and a slice of C chips runs C replicas side by side. (`serve --mesh tensor=N`
shards one replica over N chips instead; this plan does not cover it.)

The report (`serve_compile_report.json`, and a table on stdout):
- weights per chip: the params plus the output projection the engine keeps beside them (`wte` transposed);
- KV per slot (2 * L * H * S * K * itemsize) and the slots of `--max_batch` (KV, token ids, masks, logits);
- XLA's memory analysis of both programs (arguments, outputs, temporaries, code);
- the peak: weights + slots + the larger of the decode step's and the prefill's own buffers (a prefill runs
  while the slots are resident), against the HBM XLA leaves usable;
- the largest `--max_batch` that fits at this `--context_length`: estimated from the decode step's own bytes
  (a line through the batches compiled), then compiled at the estimate (twice at most) to refine it;
  `largest_batch_checked` is the largest batch that compiled and fits;
- a decode tokens/s bound: every step reads the block weights, the output projection and the whole KV cache
  of the batch (each slot attends over all S columns), so at the chip's peak HBM bandwidth a replica makes at
  most `max_batch * bandwidth / bytes_per_step` tokens/s. An upper bound, not a measurement.

What the compiles showed on a v5e (libtpu 0.0.42.1): the decode loop of `--decode_steps` > 1 (a `lax.scan`)
keeps copies of the cache, temporaries of ~2.7x the slots' KV for gpt2 at 8 steps against ~0.1x at 1 step;
`decode_extra_bytes` shows it, and a refusal says so.

A configuration that does not fit raises `DoesNotFit` (exit 1) naming the knob to turn, after writing the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from importlib import metadata
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_gpt2.generation.model_step import output_projection
from flax_gpt2.modeling.config import PRESETS, GPT2Config
from flax_gpt2.modeling.model import GPT2LMHeadModel
from flax_gpt2.modeling.quantize import check_quantize, parameter_bytes, quantize_params
from flax_gpt2.serve import slots as device
from flax_gpt2.serve.compile_report import GiB, format_report
from flax_gpt2.utils import file_io, topologies
from flax_gpt2.utils.dtypes import DTYPES

GPT2_VOCAB = 50257  # the GPT-2 tokenizer's ids: the engine's logits never cover a padded vocabulary's extra ids
class DoesNotFit(RuntimeError):
    """The server's programs need more memory per chip than the target has (the message names the knob)."""


@dataclasses.dataclass(frozen=True)
class ServeShape:
    """What the server is asked to hold: `max_batch` slots of `context_length` tokens, `decode_steps` per call."""
    max_batch: int
    context_length: int | None = None  # None: the model's n_positions
    decode_steps: int = 8
    prefix_cache_bytes: int | None = None  # None: the server's default, the KV of max_batch full contexts


def model_config(model: str, dtype: str = "float32") -> GPT2Config:
    """The `GPT2Config` of `--model` without its weights: a preset name (`gpt2-xl`, also as
    `openai-community/gpt2-xl`), a Hugging Face folder's `config.json`, or a training run's saved config."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    kinds = dict(dtype=DTYPES[dtype], param_dtype=DTYPES[dtype])  # as `load_model` serves: params in --dtype
    name = model[len("openai-community/"):] if model.startswith("openai-community/") else model
    if name in PRESETS:
        return GPT2Config.from_preset(name, **kinds)
    if os.path.isdir(model):
        if os.path.isfile(os.path.join(model, "config.json")):
            return GPT2Config.from_hf_config(model, **kinds)
        # Deferred: orbax (behind run_folders) costs seconds to import and only a run folder needs it.
        from flax_gpt2.checkpoints.run_folders import saved_model_config
        saved = saved_model_config(model)
        if saved is not None:
            return GPT2Config.from_hf_config(saved, **kinds)
    raise ValueError(f"--model {model!r}: --compile_only builds the model from its config alone; give a preset "
                     f"name ({', '.join(PRESETS)}) or a local folder holding config.json or a training run")


def abstract_params(config: GPT2Config, quantize: str | None = None) -> Any:
    """The params of `config` as `jax.ShapeDtypeStruct`s (nothing allocated), int8 ones with `quantize="int8"`."""
    check_quantize(quantize)
    model = GPT2LMHeadModel(config)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    return jax.eval_shape(quantize_params, params) if quantize else params


def kv_bytes_per_slot(config: GPT2Config, context_length: int) -> int:
    """Keys and values of one slot of `context_length` columns: 2 * L * H * S * K * itemsize."""
    return (2 * config.n_layer * config.n_head * context_length * config.head_dim
            * jnp.dtype(config.dtype).itemsize)


def _bytes(tree: Any) -> int:
    return parameter_bytes(tree)


def _read_per_step(params: Any, head: Any) -> int:
    """Weight bytes a decode step reads whole: every array but the embeddings (gathered a row per token) and an
    untied `lm_head` (the step reads its copy, `head`), plus `head`."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    skipped = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for path, x in flat
                  if any(getattr(k, "key", None) in ("wte", "wpe", "lm_head") for k in path))
    return _bytes(params) - skipped + _bytes(head)


def _on(tree: Any, sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _compile(jitted, *args, **kwargs) -> dict[str, Any]:
    """`{"memory", "seconds"}`, or `{"error", "seconds"}` (and what the error tells of the memory) when XLA's TPU
    compiler refuses the program for want of memory."""
    started = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"error": str(e).strip().splitlines()[0], "seconds": round(time.perf_counter() - started, 1),
                **topologies.refused_memory(str(e))}
    return {"memory": topologies.compiled_memory(compiled), "seconds": round(time.perf_counter() - started, 1)}


class _Programs:
    """The engine's programs for one model on one device, compiled from abstract arguments."""

    def __init__(self, config: GPT2Config, quantize: str | None, target_device, decode_steps: int):
        self.model = GPT2LMHeadModel(config)
        self.vocab = min(config.vocab_size, GPT2_VOCAB)
        self.sharding = jax.sharding.SingleDeviceSharding(target_device)
        params = abstract_params(config, quantize)
        head = jax.eval_shape(lambda p: output_projection(self.model, p, self.vocab), params)
        self.params, self.head = _on(params, self.sharding), _on(head, self.sharding)
        self.decode_steps = decode_steps

    def slots(self, n: int, context_length: int) -> Any:
        return _on(jax.eval_shape(lambda: device.init_slots(self.model, n, context_length, self.vocab)),
                   self.sharding)

    def prefill(self, length: int) -> dict[str, Any]:
        ids = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=self.sharding)
        adapter = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.sharding)
        return _compile(device.prefill_prompt, self.model, self.params, self.head, ids, ids, None, adapter)

    def decode(self, n: int, context_length: int) -> dict[str, Any]:
        settings = _on(device.RowSettings.empty(n), self.sharding)
        work = _on(device.StepWork.everything(), self.sharding)
        return _compile(device.steps, self.model, self.params, self.head, self.slots(n, context_length), settings,
                        work, self.decode_steps)


def _decode_extra(result: dict[str, Any], resident: int) -> int | None:
    """The decode step's own bytes beyond the weights and slots it takes (`resident`): temporaries, outputs not
    aliased, code; from XLA's memory analysis, or from what its out-of-memory refusal says it used."""
    if "memory" in result:
        return result["memory"]["total"] - result["memory"]["arguments"]
    if "used" in result:
        return max(result["used"] - resident, 0)
    return result.get("temporaries")


def compile_only(model: str, topology: str, shape: ServeShape, *, dtype: str = "float32",
                 quantize: str | None = None, report_path: str | None = "serve_compile_report.json",
                 check_largest: bool = True, prepare: bool = True) -> dict[str, Any]:
    """Compiles the server's programs for `--model` on one device of `topology`; returns (and writes to
    `report_path`, and prints) the report the module docstring describes.

    `check_largest` compiles the decode step again at the estimated largest batch (up to two more compiles) to
    check it; `prepare` points JAX at the CPU and libtpu at the target first (a fresh process must; a test that
    already did may skip it).

    Raises:
      ValueError: an unknown topology or model, or a `context_length` past the model's n_positions.
      DoesNotFit: the weights, one slot, or `max_batch` slots do not fit a chip (the report is written first).
    """
    target = topologies.lookup(topology)
    config = model_config(model, dtype)
    context = shape.context_length or config.n_positions
    if context > config.n_positions:
        raise ValueError(f"--context_length {context} exceeds the model's n_positions={config.n_positions}")
    if prepare:
        topologies.prepare_environment(target)
        jax.config.update("jax_platforms", "cpu")  # JAX_PLATFORMS is read at import; this counts until backends start
    target_device = topologies.devices(target)[0]
    programs = _Programs(config, quantize, target_device, shape.decode_steps)

    usable = target.usable_hbm_bytes_per_device
    weights = _bytes(programs.params) + _bytes(programs.head)
    slot_row = _bytes(programs.slots(1, context))  # every Slots field has one row per slot
    kv_slot = kv_bytes_per_slot(config, context)
    compiler = "jax-cuda12-pjrt" if target.platform == "gpu" else "libtpu"
    report: dict[str, Any] = {
        "topology": target.name, "platform": target.platform, "device_kind": target.device_kind,
        "chips": target.chips, "devices": target.num_devices,
        "replicas": target.num_devices,
        "serving": "one replica per chip (the whole model and its slots on each device)",
        "model": {"name": model, "n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
                  "num_params": config.num_params, "dtype": dtype, "quantize": quantize},
        "max_batch": shape.max_batch, "context_length": context, "decode_steps": shape.decode_steps,
        "hbm_bytes_per_chip": target.hbm_bytes_per_device, "usable_hbm_bytes_per_chip": usable,
        "hbm_bandwidth_bytes_per_s": target.hbm_bandwidth_per_device,
        "params_bytes": _bytes(programs.params), "head_bytes": _bytes(programs.head), "weights_bytes": weights,
        "kv_bytes_per_slot": kv_slot, "slot_bytes": slot_row, "kv_bytes": kv_slot * shape.max_batch,
        "slots_bytes": slot_row * shape.max_batch,
        # The prefix cache is dropped whole when the device runs out of memory (`prefix_prefill`): not in the peak.
        "prefix_cache_bytes": (kv_slot * shape.max_batch if shape.prefix_cache_bytes is None
                               else shape.prefix_cache_bytes),
        "jax": jax.__version__, "compiler": f"{compiler} {metadata.version(compiler)}",
    }
    try:
        _fill(report, programs, shape.max_batch, context, check_largest)
    finally:
        if report_path:
            file_io.atomic_write(report_path, json.dumps(report, indent=1) + "\n")
        print(format_report(report), flush=True)
    if not report["fits"]:
        raise DoesNotFit(report["refusal"])
    return report


def _fill(report: dict[str, Any], programs: _Programs, batch: int, context: int, check_largest: bool) -> None:
    shape_steps = programs.decode_steps
    usable, weights, slot_row = report["usable_hbm_bytes_per_chip"], report["weights_bytes"], report["slot_bytes"]
    report["fits"] = False
    if weights > usable:
        report["refusal"] = _weights_refusal(report)
        return
    prefill = programs.prefill(context)
    report["prefill"] = {"prompt_length": context, **prefill}
    if "memory" not in prefill:
        report["refusal"] = (f"the prefill of a {context}-token prompt does not fit a {report['topology']} chip "
                             f"beside the weights: lower --context_length ({prefill['error']})")
        return
    prefill_extra = prefill["memory"]["total"] - prefill["memory"]["arguments"]

    def peak(n: int, decode_extra: int) -> int:
        return weights + n * slot_row + max(decode_extra, prefill_extra)

    # Compile the decode step at --max_batch unless its weights and slots alone are already too big.
    probe = batch if peak(batch, 0) <= usable else (usable - weights - prefill_extra) // slot_row
    if probe < 1:
        report["refusal"] = (f"one slot of --context_length {context} does not fit a {report['topology']} chip "
                             f"beside the weights ({weights / GiB:.2f} GiB) and the prefill: lower "
                             "--context_length, or use --quantize int8 / a bigger chip")
        return
    decode = programs.decode(probe, context)
    report["decode"] = {"batch": probe, **decode}
    points = {}  # batch -> decode extra bytes
    extra = _decode_extra(decode, weights + probe * slot_row)
    if extra is not None:
        points[probe] = extra
    if probe == batch and "memory" in decode:
        report["peak_bytes_per_chip"] = peak(batch, extra)
        report["fits"] = report["peak_bytes_per_chip"] <= usable

    compiled = {probe} if "memory" in decode else set()
    largest = _largest(points, weights, slot_row, prefill_extra, usable)
    for _ in range(2 if check_largest else 0):  # compile at the estimate; refit the line through the points
        if largest < 1 or largest in points:
            break
        result = programs.decode(largest, context)
        got = _decode_extra(result, weights + largest * slot_row)
        if got is None:
            break
        points[largest] = got
        if "memory" in result:
            compiled.add(largest)
        largest = _largest(points, weights, slot_row, prefill_extra, usable)
    report["largest_max_batch"] = max(largest, 0)
    # The largest batch compiled (not refused) whose peak fits: the estimate itself once the line has converged.
    fitting = [n for n in compiled if n <= max(largest, 0) and peak(n, points[n]) <= usable]
    report["largest_batch_checked"] = max(fitting, default=None)
    report["decode_extra_bytes"] = {str(n): b for n, b in sorted(points.items())}
    _throughput(report, programs, batch, context)
    if not report["fits"]:
        needed = report.get("peak_bytes_per_chip") or peak(batch, points.get(batch, 0))
        most = report["largest_batch_checked"] or report["largest_max_batch"]
        hints = []
        if report["model"]["dtype"] == "float32":
            hints.append("--dtype bfloat16 halves the KV per slot")
        kv = report["kv_bytes_per_slot"]
        if shape_steps > 1 and points and max(points[n] / (n * kv) for n in points) > 1:
            # Measured on a v5e: the lax.scan over decode steps keeps copies of the cache (~2.7x its KV for
            # gpt2 at 8 steps), one step per call ~0.1x.
            hints.append(f"the loop of --decode_steps {shape_steps} holds copies of the cache: --decode_steps 1 "
                         "needs far less")
        report["refusal"] = (f"--max_batch {batch} does not fit a {report['topology']} chip: at most {most} slots "
                             f"fit at this --context_length {context} ({needed / GiB:.2f} GiB needed of "
                             f"{usable / GiB:.2f} GiB usable)" + "".join(f"; {h}" for h in hints))


def _largest(points: dict[int, int], weights: int, slot_row: int, prefill_extra: int, usable: int) -> int:
    """The most slots whose peak fits `usable`, with the decode step's own bytes a line through the compiled
    `points` (batch -> bytes): through the origin from one point (every byte counted per slot: conservative
    above it), through the two largest batches otherwise."""
    room = usable - weights
    if not points:
        return int((room - prefill_extra) // slot_row)
    ns = sorted(points)[-2:]
    if len(ns) == 1 or ns[0] == ns[1]:
        slope, base = points[ns[-1]] / ns[-1], 0.0
    else:
        slope = max((points[ns[1]] - points[ns[0]]) / (ns[1] - ns[0]), 0.0)
        base = points[ns[1]] - slope * ns[1]
    by_decode = math.floor((room - base) / (slot_row + slope))
    by_prefill = (room - prefill_extra) // slot_row
    return int(min(by_decode, by_prefill))


def _throughput(report: dict[str, Any], programs: _Programs, batch: int, context: int) -> None:
    """Decode tokens/s upper bounds from the chip's HBM bandwidth (see the module docstring)."""
    bandwidth = report["hbm_bandwidth_bytes_per_s"]
    weights_read = _read_per_step(programs.params, programs.head)
    report["weights_read_per_step_bytes"] = weights_read

    def bound(n: int) -> dict[str, float]:
        per_step = weights_read + n * report["kv_bytes_per_slot"]
        per_chip = n * bandwidth / per_step
        return {"batch": n, "bytes_per_step": per_step, "step_ms": round(1e3 * per_step / bandwidth, 3),
                "tokens_per_s_per_chip": round(per_chip, 1),
                "tokens_per_s_per_slice": round(per_chip * report["replicas"], 1)}

    report["decode_bound"] = {"note": "upper bound from peak HBM bandwidth: weights + the batch's whole KV cache "
                                      "read once per step; not a measurement",
                              "single_stream": bound(1), "max_batch": bound(batch)}
    if report.get("largest_max_batch", 0) >= 1:
        report["decode_bound"]["largest_max_batch"] = bound(report["largest_max_batch"])


def _weights_refusal(report: dict[str, Any]) -> str:
    fixes = []
    if not report["model"]["quantize"]:
        fixes.append("--quantize int8")
    if report["model"]["dtype"] == "float32":
        fixes.append("--dtype bfloat16")
    fixes.append("a chip with more HBM")
    return (f"the weights alone ({report['weights_bytes'] / GiB:.2f} GiB per chip) exceed the "
            f"{report['usable_hbm_bytes_per_chip'] / GiB:.2f} GiB usable HBM of a {report['topology']} chip: use "
            + " or ".join(fixes))

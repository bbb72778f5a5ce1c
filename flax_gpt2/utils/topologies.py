"""Cloud TPU names (`v4-8`, `v5litepod-256`, ...) and GPU servers (`h100x8`) -> the compile-only devices
of `jax.experimental.topologies.get_topology_desc`.

`python -m train ... --config.compile_only=v4-8` compiles the train step for a topology without its hardware
(train/compile_only.py), `python -m flax_gpt2.serve ... --compile_only v5litepod-8` the server's prefill and
decode programs (serve/compile_only.py); both read this table, so it lives in the library. libtpu itself only
takes `generation:AxBxC` chip grids (`v4:2x2x1`), and some need more: a real v4-8 is 4 chips, each one
"megacore" device (plain `v4:2x2x1` would give 8 devices, one per TensorCore); a 1-chip v5e/v6e needs host
bounds of one chip. This module keeps that in one table, like MaxText's `accelerator_to_spec_map.py`, whose
spellings it follows.

Names count what Google Cloud counts: TensorCores for v2, v3, v4, v5p and TPU7x (`v4-8` = 4 chips of 2
cores), chips for v5e and v6e (`v5litepod-8` = 8 chips). A JAX device is a chip on v4, v5p, v5e and v6e,
and a TensorCore on v2, v3 and TPU7x; "per chip" in compile reports means per JAX device.

GPU targets (`a100x8`, `h100x8`, `h100x16` = two 8-GPU hosts, `v100x1` = one 16 GB card) go through
jax-cuda12-plugin (no GPU or CUDA needed to compile) with XLA's description of the card, a
`GpuTargetConfigProto` as in openxla's `xla/tools/hlo_opt/gpu_specs/`. Volta (v100, sm_70) needs a CUDA 12
`ptxas` (`pip install nvidia-cuda-nvcc-cu12`, first on PATH): CUDA 13's dropped Volta.
"""

from __future__ import annotations

import dataclasses
import os
import re

from jax.experimental import topologies

GiB = 1 << 30
GB = 10 ** 9  # bandwidths are quoted in decimal gigabytes per second


@dataclasses.dataclass(frozen=True)
class Generation:
    libtpu: str  # the generation as libtpu spells it in a topology name ("v4", "v5e", ...)
    device_kind: str  # `jax.Device.device_kind` of its devices
    cores_per_name_unit: int  # the Cloud name counts cores (2 per chip) or chips (1)
    devices_per_chip: int
    hbm_bytes_per_device: int  # nominal HBM of one JAX device
    xla_usable_hbm_bytes: int  # what XLA's out-of-memory check offers of it (libtpu 0.0.42.1)
    megacore: bool  # the two TensorCores of a chip are one device ("megacore" chip config)
    hbm_bandwidth_per_device: int  # peak HBM bytes/s of one JAX device (the chip's, halved where a device is a core)
    # Slice size in chips -> chip grid, for the sizes Cloud TPU offers.
    shapes: dict[int, str]


_GRID_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


def _gib(x: float) -> int:
    return int(x * GiB)


# Cloud name prefix -> generation. The usable HBM is what XLA's own out-of-memory message offers ("exceeds
# available HBM (30.75G)" on a v4, whose chips have 32 GiB), measured with libtpu 0.0.42.1.
# Peak HBM bandwidth per chip, from Google Cloud's pages of each version (cloud.google.com/tpu/docs/v3, /v4,
# /v5e, /v5p, /v6e, /tpu7x): v3 900 GB/s, v4 1,200 GB/s, v5e 819 GB/s, v5p 2,765 GB/s, v6e 1,640 GB/s, TPU7x
# 7,370 GB/s (Google's Ironwood announcement); v2 700 GB/s (Jouppi et al., "A Domain-Specific Supercomputer for
# Training Deep Neural Networks", CACM 2020, which the v2 page cites). Halved where a JAX device is one of a
# chip's two TensorCores (v2, v3, TPU7x).
GENERATIONS = {
    "v2": Generation("v2", "TPU v2", 2, 2, _gib(8), _gib(7.48), False, 700 * GB // 2,
                     {4: "2x2", 16: "4x4", 64: "8x8", 128: "8x16", 256: "16x16"}),
    "v3": Generation("v3", "TPU v3", 2, 2, _gib(16), _gib(15.48), False, 900 * GB // 2,
                     {4: "2x2", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16", 512: "16x32",
                      1024: "32x32"}),
    "v4": Generation("v4", "TPU v4", 2, 1, _gib(32), _gib(30.75), True, 1200 * GB, dict(_GRID_3D)),
    "v5p": Generation("v5", "TPU v5", 2, 1, _gib(96), _gib(95.74), True, 2765 * GB, dict(_GRID_3D)),
    "v5litepod": Generation("v5e", "TPU v5 lite", 1, 1, _gib(16), _gib(15.75), False, 819 * GB,
                            {1: "1x1", **_GRID_2D}),
    "v6e": Generation("v6e", "TPU v6 lite", 1, 1, _gib(32), _gib(31.25), False, 1640 * GB, {1: "1x1", **_GRID_2D}),
    "tpu7x": Generation("tpu7x", "TPU7x", 2, 2, _gib(96), _gib(94.75), False, 7370 * GB // 2,
                        {1: "1x1x1", **{k: v for k, v in _GRID_3D.items() if k <= 1024}}),
}
ALIASES = {"v5e": "v5litepod"}  # `v5e-8` is `v5litepod-8`


@dataclasses.dataclass(frozen=True)
class Topology:
    """One Cloud TPU slice and how to ask libtpu for its devices."""
    name: str  # the Cloud name, e.g. "v4-8"
    generation: Generation
    chips: int
    topology_name: str  # libtpu's, e.g. "v4:2x2x1"
    chip_config_name: str | None
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]  # torus links per dimension (full-size dimensions of big slices)

    @property
    def platform(self) -> str:
        return "tpu"

    @property
    def num_devices(self) -> int:
        return self.chips * self.generation.devices_per_chip

    @property
    def device_kind(self) -> str:
        return self.generation.device_kind

    @property
    def hbm_bytes_per_device(self) -> int:
        return self.generation.hbm_bytes_per_device

    @property
    def usable_hbm_bytes_per_device(self) -> int:
        return self.generation.xla_usable_hbm_bytes

    @property
    def hbm_bandwidth_per_device(self) -> int:
        """Peak HBM bytes per second of one device (Google Cloud's figure for the chip)."""
        return self.generation.hbm_bandwidth_per_device

    def topology_kwargs(self) -> dict:
        """Keyword arguments of `jax.experimental.topologies.get_topology_desc`."""
        kwargs = dict(topology_name=self.topology_name, platform="tpu",
                      chips_per_host_bounds=self.chips_per_host_bounds, wrap=self.wrap)
        if self.chip_config_name:
            kwargs["chip_config_name"] = self.chip_config_name
        return kwargs


def _wrap(prefix: str, grid: str) -> tuple[bool, bool, bool]:
    dims = [int(d) for d in grid.split("x")] + [1] * (3 - len(grid.split("x")))
    if prefix in ("v5litepod", "v6e"):  # a v5e/v6e 16-wide dimension is a torus
        return tuple(d == 16 for d in dims[:2]) + (False,)
    # v4/v5p/TPU7x: cubes of 4x4x4 chips and up are tori in every dimension
    return (True, True, True) if len(dims) == 3 and min(dims) >= 4 else (False, False, False)


def _table() -> dict[str, Topology]:
    table = {}
    for prefix, gen in GENERATIONS.items():
        for chips, grid in gen.shapes.items():
            count = chips * gen.cores_per_name_unit
            name = f"{prefix}-{count}"
            host = (1, 1, 1) if chips == 1 else (2, 2, 1)
            table[name] = Topology(name, gen, chips, f"{gen.libtpu}:{grid}", "megacore" if gen.megacore else None,
                                   host, _wrap(prefix, grid))
    return table


TOPOLOGIES: dict[str, Topology] = _table()


# XLA's descriptions of GPUs (`GpuTargetConfigProto`), from openxla's xla/tools/hlo_opt/gpu_specs/
# (a100_sxm_80.txtpb, h100_sxm.txtpb, v100.txtpb): what the compiler needs to know of the card without one.
# v100 is the 16 GB card (Colab's other 16 GB GPU, the T4, has no spec file there). Their memory_bandwidth is
# NVIDIA's datasheet figure (nvidia.com A100: 2,039 GB/s for the 80GB SXM; H100 SXM: 3.35 TB/s; V100 SXM2:
# 900 GB/s), which `hbm_bandwidth_per_device` reports.
_GPU_DEVICE_INFO = {
    "a100": dict(shared_memory_per_core=167936, core_count=108, fpus_per_core=64, memory_bandwidth=2039040000000,
                 l2_cache_size=41943040, clock_rate_ghz=1.41, device_memory_size=85100068864,
                 shared_memory_per_block_optin=166912, major=8, description="NVIDIA A100-SXM4-80GB"),
    "h100": dict(shared_memory_per_core=233472, core_count=132, fpus_per_core=128, memory_bandwidth=3352320000000,
                 l2_cache_size=52428800, clock_rate_ghz=1.98, device_memory_size=84978434048,
                 shared_memory_per_block_optin=232448, major=9, description="NVIDIA H100 80GB HBM3"),
    "v100": dict(shared_memory_per_core=98304, core_count=80, fpus_per_core=64, memory_bandwidth=898048000000,
                 l2_cache_size=6291456, clock_rate_ghz=1.53, device_memory_size=16935419904,
                 shared_memory_per_block_optin=98304, major=7, description="Tesla V100-SXM2-16GB"),
}


def gpu_target_config(gpu: str) -> str:
    """The `GpuTargetConfigProto` text of `gpu` ("a100", "h100" or "v100")."""
    d = _GPU_DEVICE_INFO[gpu]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {d["shared_memory_per_core"]}
  threads_per_core_limit: 2048
  core_count: {d["core_count"]}
  fpus_per_core: {d["fpus_per_core"]}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {d["memory_bandwidth"]}
  l2_cache_size: {d["l2_cache_size"]}
  clock_rate_ghz: {d["clock_rate_ghz"]}
  device_memory_size: {d["device_memory_size"]}
  shared_memory_per_block_optin: {d["shared_memory_per_block_optin"]}
  cuda_compute_capability {{ major: {d["major"]} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{d["description"]}"
"""


GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """`count` GPUs of one kind, 8 to a host (`h100x16` is two hosts)."""
    name: str  # e.g. "h100x8"
    gpu: str  # a key of _GPU_DEVICE_INFO
    count: int

    platform = "gpu"

    @property
    def chips(self) -> int:
        return self.count

    @property
    def num_devices(self) -> int:
        return self.count

    @property
    def topology_name(self) -> str:
        """jax-cuda12-plugin's `slices x hosts x devices per host`."""
        per_host = min(self.count, GPUS_PER_HOST)
        return f"1x{self.count // per_host}x{per_host}"

    @property
    def device_kind(self) -> str:
        return _GPU_DEVICE_INFO[self.gpu]["description"]

    @property
    def hbm_bytes_per_device(self) -> int:
        return _GPU_DEVICE_INFO[self.gpu]["device_memory_size"]

    @property
    def hbm_bandwidth_per_device(self) -> int:
        """Peak memory bytes per second of one card (NVIDIA's datasheet figure, as XLA's spec has it)."""
        return _GPU_DEVICE_INFO[self.gpu]["memory_bandwidth"]

    @property
    def usable_hbm_bytes_per_device(self) -> int:
        """XLA does not refuse a GPU program that is too big; JAX's allocator takes this fraction of the card
        (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set)."""
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
        return int(self.hbm_bytes_per_device * fraction)


def canonical_name(name: str) -> str:
    prefix, _, count = name.strip().lower().rpartition("-")
    return f"{ALIASES.get(prefix, prefix)}-{count}"


def lookup(name: str) -> Topology | GpuTarget:
    """The target a user names (`v4-8`, `v5e-8`, `V5LITEPOD-8`, `h100x8`); an unknown name is an error
    listing the accepted ones."""
    gpu = re.fullmatch(r"([a-z0-9]+)x(\d+)", name.strip().lower())
    if gpu and gpu.group(1) in _GPU_DEVICE_INFO:
        count = int(gpu.group(2))
        if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
            raise ValueError(f"{name!r}: 1 to {GPUS_PER_HOST} GPUs, or a multiple of {GPUS_PER_HOST} (whole hosts)")
        return GpuTarget(name.strip().lower(), gpu.group(1), count)
    topology = TOPOLOGIES.get(canonical_name(name))
    if topology is None:
        raise ValueError(f"unknown TPU topology {name!r}; accepted: {', '.join(accepted_names())} "
                         f"(and {', '.join(f'{a}-N for {p}-N' for a, p in ALIASES.items())}; "
                         f"GPUs: {', '.join(f'{g}xN' for g in _GPU_DEVICE_INFO)})")
    return topology


def accepted_names() -> list[str]:
    return list(TOPOLOGIES)


def prepare_environment(target: Topology | GpuTarget) -> None:
    """What libtpu / the CUDA plugin read when they load, set so that users need not (call before they do).

    No TPU or GPU is opened: JAX stays on the CPU (else it spends ~10 s looking for a TPU). For TPUs, the
    host list and worker id silence libtpu's complaints about host bounds, and ALLOW_MULTIPLE_LIBTPU_LOAD
    lets two compiles run at once (the second would otherwise fail on /tmp/libtpu_lockfile). For GPUs,
    sharded autotuning is off (it can hang ahead-of-time compiles, MaxText notes).
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    if isinstance(target, GpuTarget):
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_gpu_shard_autotuning" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_shard_autotuning=false").strip()
        return
    os.environ["TPU_ACCELERATOR_TYPE"] = target.name
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def devices(target: Topology | GpuTarget) -> list:
    """The compile-only devices of `target` (no hardware needed; libtpu or jax-cuda12-plugin must be installed)."""

    if isinstance(target, GpuTarget):
        try:
            desc = topologies.get_topology_desc(target.gpu, "cuda", target_config=gpu_target_config(target.gpu),
                                                topology=target.topology_name)
        except NotImplementedError as e:
            raise RuntimeError(f"compiling for {target.name} needs the CUDA plugin (no GPU needed): "
                               "pip install 'jax-cuda12-plugin==<your jax version>'") from e
    else:
        try:
            desc = topologies.get_topology_desc(**target.topology_kwargs())
        except RuntimeError as e:
            if "TPU support not installed" in str(e):
                raise RuntimeError(f"compiling for {target.name} needs libtpu: pip install 'jax[tpu]=="
                                   "<your jax version>'") from e
            raise
    found = list(desc.devices)
    if len(found) != target.num_devices:
        raise RuntimeError(f"got {len(found)} devices for {target.name} ({target.topology_name}), "
                           f"expected {target.num_devices}")
    return found


def compiled_memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program from XLA's buffer assignment (`total` counts donated arguments
    once): what `train` and `serve` compile-only reports show."""
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
           "generated_code": int(m.generated_code_size_in_bytes)}
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["generated_code"]
    return out


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def refused_memory(error: str) -> dict[str, int]:
    """What XLA's out-of-memory refusal of a program says it needed, in bytes: `used` ("Used 20.1G of 15.75G
    hbm": everything) and/or `temporaries` ("HLO temporaries (34.40G)"), each only where the message has it."""
    out = {}
    patterns = {"used": r"Used ([\d.]+)([KMGT]?) of", "temporaries": r"HLO temporaries \(([\d.]+)([KMGT]?)\)"}
    for key, pattern in patterns.items():
        found = re.search(pattern, error)
        if found:
            out[key] = int(float(found.group(1)) * _UNITS[found.group(2)])
    return out

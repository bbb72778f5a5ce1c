"""`--config.compile_only=TOPOLOGY`: the run's steps compiled for a TPU slice on this CPU host (libtpu's
topology descriptions), and the report it writes. Every compile runs in a child process: libtpu reads its
environment when it loads, once per process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flax_gpt2.utils import topologies

REPO = Path(__file__).resolve().parents[1]
GiB = float(1 << 30)

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install 'jax[tpu]==<the installed jax>')")


def _has_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


needs_cuda_plugin = pytest.mark.skipif(not _has_cuda_plugin(),
                                       reason="jax-cuda12-plugin is not installed (pip install "
                                              "'jax-cuda12-plugin==<the installed jax>'; no GPU needed)")


def _command(workdir, topology, *extra, config="configs/tiny.py"):
    return [sys.executable, "-m", "train", "--config", config, "--workdir", str(workdir),
            f"--config.compile_only={topology}", *extra]


def _launch(workdir, topology, *extra, config="configs/tiny.py"):
    return subprocess.Popen(_command(workdir, topology, *extra, config=config), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _model_flops(n_layer, n_embd, num_params, seq_len, batch):
    return (6 * num_params + 12 * n_layer * n_embd * seq_len) * seq_len * batch


# --- the topology table (no compile) ---

def test_cloud_names_map_to_libtpu_topologies():
    v4 = topologies.lookup("v4-8")
    assert (v4.topology_name, v4.chip_config_name, v4.chips, v4.num_devices) == ("v4:2x2x1", "megacore", 4, 4)
    assert topologies.lookup("v5e-8") == topologies.lookup("v5litepod-8") == topologies.lookup(" V5LITEPOD-8 ")
    assert topologies.lookup("v5litepod-8").topology_name == "v5e:2x4"
    assert topologies.lookup("v5litepod-1").chips_per_host_bounds == (1, 1, 1)
    v3 = topologies.lookup("v3-32")
    assert (v3.topology_name, v3.chip_config_name, v3.chips, v3.num_devices) == ("v3:4x4", None, 16, 32)
    assert topologies.lookup("v6e-8").topology_name == "v6e:2x4"
    assert topologies.lookup("v5p-8").topology_name == "v5:2x2x1"


def test_unknown_topology_lists_the_accepted_names():
    with pytest.raises(ValueError, match="unknown TPU topology 'v9-8'.*v4-8.*v5litepod-256"):
        topologies.lookup("v9-8")


def test_a_16gb_gpu_target_describes_xla_s_v100_spec():
    """`v100x1`: one 16 GB Volta card (sm_70), as openxla's gpu_specs/v100.txtpb describes it to XLA."""
    v100 = topologies.lookup("V100x1")
    assert (v100.platform, v100.num_devices, v100.topology_name) == ("gpu", 1, "1x1x1")
    assert v100.device_kind == "Tesla V100-SXM2-16GB" and 15 * GiB < v100.hbm_bytes_per_device < 16 * GiB
    proto = topologies.gpu_target_config("v100")
    assert "cuda_compute_capability { major: 7 }" in proto and "core_count: 80" in proto
    assert f"device_memory_size: {v100.hbm_bytes_per_device}" in proto
    assert topologies.lookup("v100x8").topology_name == "1x1x8"


# --- the "fits" decision at its threshold (no compile) ---

def _sized_report(target_name, train_bytes, eval_bytes):
    """The fields `fits` reads, for a real topology's HBM numbers."""
    target = topologies.lookup(target_name)
    return {"topology": target.name, "hbm_bytes_per_chip": target.hbm_bytes_per_device,
            "xla_available_hbm_bytes_per_chip": target.usable_hbm_bytes_per_device,
            "bytes_per_chip": train_bytes, "eval_bytes_per_chip": eval_bytes}


@pytest.mark.parametrize("target_name", ["v5litepod-8", "v4-8", "h100x8", "v100x1"])
def test_fits_is_decided_against_usable_hbm_not_the_total(target_name):
    from flax_gpt2.train import compile_only as co

    target = topologies.lookup(target_name)
    usable, total = target.usable_hbm_bytes_per_device, target.hbm_bytes_per_device
    assert 0 < usable < total
    small = usable // 2
    assert co.fits(_sized_report(target_name, usable, small))  # exactly the usable HBM: fits
    assert co.fits(_sized_report(target_name, small, usable))
    # one byte over the usable HBM (and still under the chip's total): does not fit, train or eval step
    assert not co.fits(_sized_report(target_name, usable + 1, small))
    assert not co.fits(_sized_report(target_name, small, usable + 1))
    assert not co.fits(_sized_report(target_name, (usable + total) // 2, small))
    assert not co.fits(dict(_sized_report(target_name, small, small), error="RESOURCE_EXHAUSTED: ..."))
    assert not co.fits(dict(_sized_report(target_name, small, small), eval_error="RESOURCE_EXHAUSTED: ..."))
    no_eval = _sized_report(target_name, usable, None)
    del no_eval["eval_bytes_per_chip"]
    assert co.fits(no_eval)


def test_the_does_not_fit_message_names_the_step_over_the_usable_hbm():
    from flax_gpt2.train import compile_report

    usable = topologies.lookup("v5litepod-8").usable_hbm_bytes_per_device
    train_over = compile_report.does_not_fit_message(_sized_report("v5litepod-8", usable + 1, 1))
    eval_over = compile_report.does_not_fit_message(_sized_report("v5litepod-8", usable, usable + 1))
    assert train_over.startswith("the train step does not fit a v5litepod-8")
    assert eval_over.startswith("the eval step (with the train state resident) does not fit a v5litepod-8")
    assert f"{usable / GiB:.2f} GiB usable HBM" in eval_over


# --- compiles (each ~10-30 s of CPU) ---

@needs_libtpu
def test_tiny_compiles_for_two_topologies_and_reports(tmp_path):
    """v4-8 with two accumulated micro-batches (1 per chip) and v5litepod-8 without, compiled at once (two
    libtpu loads side by side); both fit, and XLA's FLOPs agree with 6N + 12LDT and with each other."""
    runs = {"v4-8": _launch(tmp_path / "v4", "v4-8", "--config.micro_batch_size=4"),
            "v5litepod-8": _launch(tmp_path / "v5e", "v5litepod-8")}
    reports = {}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert "fits: True" in out
        workdir = tmp_path / ("v4" if name == "v4-8" else "v5e")
        reports[name] = json.loads((workdir / "compile_report.json").read_text())

    v4, v5e = reports["v4-8"], reports["v5litepod-8"]
    assert (v4["topology"], v4["chips"], v4["devices"], v4["device_kind"]) == ("v4-8", 4, 4, "TPU v4")
    assert (v5e["chips"], v5e["devices"], v5e["device_kind"]) == (8, 8, "TPU v5 lite")
    assert v4["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and v5e["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert (v4["micro_batch_size"], v4["accumulation_steps"], v4["micro_batch_per_chip"]) == (4, 2, 1)
    assert (v5e["micro_batch_size"], v5e["accumulation_steps"]) == (8, 1)
    for r in (v4, v5e):
        mem = r["memory"]
        assert r["fits"] is True
        assert mem["total"] == r["bytes_per_chip"] == (mem["arguments"] + mem["outputs"] - mem["aliased"]
                                                       + mem["temporaries"] + mem["generated_code"])
        assert 0 < r["bytes_per_chip"] <= r["xla_available_hbm_bytes_per_chip"] < r["hbm_bytes_per_chip"]
        assert 0 < r["eval_bytes_per_chip"] <= r["xla_available_hbm_bytes_per_chip"]
        # The train state (fp32 params + 2 AdamW moments, replicated) is an argument of every chip.
        assert mem["arguments"] >= 3 * 4 * r["model"]["num_params"]
        m = r["model"]
        assert r["model_flops_per_step"] == _model_flops(m["n_layer"], m["n_embd"], m["num_params"], r["seq_len"],
                                                         r["batch_size"])
        # Documented in train/compile_only.py: without remat XLA counts 1.0-1.15x the model's FLOPs.
        assert 1.0 <= r["xla_to_model_flops"] <= 1.15, r["xla_to_model_flops"]
        assert r["xla_flops_per_step"] == pytest.approx(r["xla_flops_counted_once"] * r["accumulation_steps"])
        assert r["step_seconds_at_50_mfu"] == pytest.approx(r["model_flops_per_step"] / (0.5 * r["peak_flops"]))
        assert r["compile_seconds"] > 0
    # The accumulation loop body is counted once by XLA: times A, the two programs do the same work.
    assert v4["xla_flops_per_step"] == pytest.approx(v5e["xla_flops_per_step"], rel=0.05)


@needs_libtpu
def test_a_step_that_does_not_fit_exits_non_zero_naming_buffers_and_knobs(tmp_path):
    # 8192 sequences on one 16 GiB v5e chip: the logits alone are ~100 GiB.
    proc = _launch(tmp_path, "v5e-1", "--config.batch_size=8192")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "does not fit a v5litepod-1" in err and "largest buffers" in err
    assert "--config.micro_batch_size=" in err and "--config.model.remat=True" in err
    report = json.loads((tmp_path / "compile_report.json").read_text())
    assert report["fits"] is False and "RESOURCE_EXHAUSTED" in report["error"]
    assert report["bytes_per_chip"] > report["xla_available_hbm_bytes_per_chip"]
    biggest = report["largest_buffers"][0]
    assert biggest["bytes"] > GiB and "50257" in biggest["shape"]  # the [B, T, V] logits
    assert "fits: False" in out


def test_unknown_topology_is_a_one_line_error(tmp_path):
    proc = _launch(tmp_path, "v4-7")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "unknown TPU topology 'v4-7'" in err and "v5litepod-8" in err and "Traceback" not in err


@needs_cuda_plugin
def test_tiny_compiles_for_a_gpu_server(tmp_path):
    """h100x8 through jax-cuda12-plugin: XLA's GPU compiler sizes the buffers but has no cost analysis."""
    proc = _launch(tmp_path, "h100x8")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    r = json.loads((tmp_path / "compile_report.json").read_text())
    assert (r["platform"], r["topology_name"], r["devices"], r["device_kind"]) == ("gpu", "1x1x8", 8,
                                                                                   "NVIDIA H100 80GB HBM3")
    assert r["fits"] and 0 < r["bytes_per_chip"] <= r["xla_available_hbm_bytes_per_chip"] < r["hbm_bytes_per_chip"]
    assert "xla_flops_per_step" not in r and r["step_seconds_at_50_mfu"] > 0
    assert "no cost analysis" in out


_PLATFORM_PROBE = r"""
import sys
import jax
from flax_gpt2.train import compile_only as co
from flax_gpt2.utils import topologies
from flax_gpt2.train.config_cli import parse_args

config, _ = parse_args(["train", "--config", "configs/tiny.py", "--workdir", "/nonexistent"])
target = topologies.lookup("v4-8")
co._prepare_jax(target)
for name, devices in (("tpu", topologies.devices(target)), ("cpu", jax.devices())):
    plan = co._plan(config, devices)
    import flax.linen as nn
    with jax.set_mesh(plan.mesh), nn.logical_axis_rules(plan.rules):
        text = plan.train_step.lower(*plan.train_args).as_text()
    print(name, text.count("stablehlo.case"))
"""


@needs_libtpu
def test_cpu_only_workaround_stays_out_of_a_tpu_program():
    """make_loss_fn's CPU workaround (a conditional per block gradient) follows the devices compiled for,
    not the host's default backend."""
    proc = subprocess.run([sys.executable, "-c", _PLATFORM_PROBE], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = dict(line.split() for line in proc.stdout.strip().splitlines()[-2:])
    # One conditional per block (tiny has 2) on CPU only; the rest (optax's) is in both.
    assert int(counts["cpu"]) - int(counts["tpu"]) == 2, proc.stdout


@pytest.mark.slow
@needs_libtpu
def test_gpt2_124m_fits_a_v4_8(tmp_path):
    """The shipped 124M config on the slice its docs name (~5 CPU-minutes)."""
    proc = _launch(tmp_path, "v4-8", config="configs/gpt2_124m.py")
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads((tmp_path / "compile_report.json").read_text())
    assert report["fits"] and report["batch_size"] == 512 and report["seq_len"] == 1024
    assert report["bytes_per_chip"] <= report["xla_available_hbm_bytes_per_chip"]
    m = report["model"]
    if "Pallas" in report.get("xla_flops_note", ""):  # splash attention: its 12LDT FLOPs are invisible to XLA
        attention = 12 * m["n_layer"] * m["n_embd"] * report["seq_len"]
        expected = 6 * m["num_params"] / (6 * m["num_params"] + attention)
        assert report["xla_to_model_flops"] == pytest.approx(expected, abs=0.03)
    else:
        assert 1.0 <= report["xla_to_model_flops"] <= 1.15

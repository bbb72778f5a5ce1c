"""`benchmarks/device_check.py --tiny` runs on CPU and writes every field the accelerator table needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_check_reduced_mode(tmp_path):
    out = tmp_path / "device_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_check.py"), "--tiny", "--out", str(out)],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"date", "device", "platform", "jax", "preset", "seq_len", "train", "decode", "wall_s"} <= set(report)
    assert [(r["attention"], r["scan_layers"]) for r in report["train"]] == [("xla", False), ("xla", True),
                                                                          ("dot_product", False)]
    for row in report["train"]:
        assert row["micro_batch"] >= 1 and row["tokens_per_s"] > 0 and row["compile_s"] > 0
    assert [r["batch"] for r in report["decode"]] == [1, 4]
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["ttft_ms"] > 0 for r in report["decode"])
    assert "| attention | scan |" in proc.stdout and "| decode batch |" in proc.stdout
    (int8,) = report["decode_int8"]
    assert int8["batch"] == 1 and int8["tokens_per_s"] > 0 and int8["vs_bf16"] > 0
    assert int8["bytes_vs_bf16"] <= 0.6  # int8 + per-channel scales vs bfloat16: 0.53x for the tiny preset
    assert "| int8 weights, decode batch |" in proc.stdout
    assert [r["proposer"] for r in report["speculative"]] == ["lookup", "draft", "self"]
    assert all(r["tokens_per_s"] > 0 and r["vs_plain"] > 0 for r in report["speculative"])
    assert report["speculative"][2]["acceptance_rate"] == 1.0  # the target drafting for itself keeps everything
    assert "| speculative greedy B=1 |" in proc.stdout

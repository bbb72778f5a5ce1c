"""A training run whose workdir is on Cloud Storage, against a real local GCS server (tests/gcs_emulator.py):
preempted mid-run, resumed with the same losses, sampled from `gs://`, and never a local `gs:` folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gcs_emulator import gcs_bucket, gcs_workdir  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def _args(workdir, cache_dir):
    return [sys.executable, "-m", "train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(workdir),
            f"--config.steps={STEPS}", "--config.checkpoint_every=4", "--config.log_every=1", "--config.eval_every=4",
            "--config.progress_bar=False", f"--config.data.cache_dir={cache_dir}"]


def _losses(text: str) -> dict[int, float]:
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _remote_metrics(workdir: str) -> str:
    from flax_gpt2.utils import file_io

    path = file_io.join(workdir, "metrics.jsonl")
    return file_io.read_text(path) if file_io.exists(path) else ""


def _no_local_gs_folder(*roots: Path) -> None:
    for root in roots:
        assert not [p for p in root.rglob("gs:*")], f"a local folder was made from a URL under {root}"


def test_run_on_gcs_survives_preemption_and_samples(gcs_bucket, gcs_workdir, tmp_path):  # noqa: F811
    _, gcs_env = gcs_bucket
    env = dict(os.environ, **gcs_env, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               FLAX_GPT2_CACHE=str(tmp_path / "cache"))
    cache = tmp_path / "token_cache"

    reference = subprocess.run(_args(tmp_path / "local", cache), cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _losses((tmp_path / "local" / "metrics.jsonl").read_text())

    proc = subprocess.Popen(_args(gcs_workdir, cache), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    from flax_gpt2.utils import file_io

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if file_io.exists(file_io.join(gcs_workdir, "checkpoints", "4", "meta")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be preempted:\n" + proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "preempted: saved step" in out, err[-3000:]
    stopped = json.loads(file_io.read_text(file_io.join(gcs_workdir, "result.json")))
    assert stopped["stopped"] == "preempted" and 4 <= stopped["step"] < STEPS

    resumed = subprocess.run(_args(gcs_workdir, cache), cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from the checkpoint at step {stopped['step']}" in resumed.stderr
    got = _losses(_remote_metrics(gcs_workdir))
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-6)
    for name in ("train_config.json", "result.json", "loss.png", "vocab.json", "merges.txt"):
        assert file_io.exists(file_io.join(gcs_workdir, name)), name
    assert file_io.epath(file_io.join(gcs_workdir, "tensorboard")).is_dir()

    sampled = subprocess.run([sys.executable, "-m", "flax_gpt2.sample", "--model", gcs_workdir, "--prompt", "ROMEO:",
                              "--max_new_tokens", "4", "--seed", "0"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert sampled.returncode == 0 and "ROMEO:" in sampled.stdout, sampled.stderr[-3000:]
    _no_local_gs_folder(tmp_path, REPO)


def test_gs_path_without_gcsfs_names_the_extra(tmp_path):
    """Without the [gcs] extra, a gs:// workdir is a one-line error that says what to install."""
    code = ("import sys, importlib.util as u; real = u.find_spec; "
            "u.find_spec = lambda name, *a: None if name == 'gcsfs' else real(name, *a); "
            "sys.argv = ['train', '--config', sys.argv[1], '--workdir', 'gs://bucket/run']; "
            "from flax_gpt2.train.__main__ import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "configs" / "tiny.py")], cwd=tmp_path,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "flax_gpt2[gcs]" in proc.stderr and "Traceback" not in proc.stderr
    _no_local_gs_folder(tmp_path)


def test_data_source_token_cache_and_init_from_on_gcs(gcs_bucket, gcs_workdir, tmp_path, shared_dir,  # noqa: F811
                                                      monkeypatch):
    """The run's inputs on Cloud Storage too: the text, the tokenized-shard cache, and the weights to start from."""
    from flax_gpt2.configs import tiny
    from flax_gpt2.train.train_loop import train_and_evaluate
    from flax_gpt2.utils import file_io

    monkeypatch.setenv("FLAX_GPT2_CACHE", str(tmp_path / "local-cache"))
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text()[:60_000]
    file_io.atomic_write(f"{gcs_workdir}/data/plays.txt", text)

    def config(**overrides):
        c = tiny.get_config()
        c.steps, c.checkpoint_every, c.eval_every, c.log_every, c.progress_bar = 2, 2, 2, 1, False
        c.data.source = f"{gcs_workdir}/data/plays.txt"
        c.data.cache_dir = f"{gcs_workdir}/token-cache"
        for key, value in overrides.items():
            setattr(c, key, value)
        return c

    first = train_and_evaluate(config(), f"{gcs_workdir}/first")
    assert first["step"] == 2
    cached = list(file_io.epath(f"{gcs_workdir}/token-cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "meta.json").exists()  # uploaded, meta.json last
    # init_from on gs:// loads the first run's last checkpoint: the second run starts from those weights.
    second = train_and_evaluate(config(init_from=f"{gcs_workdir}/first", seed=1), f"{gcs_workdir}/second")
    assert second["step"] == 2
    import flax_gpt2
    _, start = flax_gpt2.from_pretrained(f"{gcs_workdir}/first", progress=False)
    _, fresh = flax_gpt2.from_pretrained(f"{gcs_workdir}/second", progress=False)
    wte = lambda p: np.asarray(p["transformer"]["wte"]["embedding"])  # noqa: E731
    # Two AdamW steps at lr <= 1e-3 move each weight by at most ~2e-3 from where the run started.
    assert np.max(np.abs(wte(fresh) - wte(start))) < 5e-3
    _no_local_gs_folder(tmp_path, Path.cwd())


def test_corpus_on_gcs_trains_the_same_read_in_place_or_mirrored(gcs_workdir, tmp_path, shared_dir,  # noqa: F811
                                                                  monkeypatch):
    """data.source = a tokenized corpus on gs://: "range" reads (no local copy) give the losses of "mirror"."""
    from flax_gpt2.configs import tiny
    from flax_gpt2.train import remote_store, tokenize_corpus as tc
    from flax_gpt2.train.train_loop import train_and_evaluate

    monkeypatch.setenv("FLAX_GPT2_CACHE", str(tmp_path / "local-cache"))
    (tmp_path / "plays.txt").write_text((shared_dir / "data" / "tinyshakespeare.txt").read_text()[:60_000])
    tc.tokenize_corpus(str(tmp_path / "plays.txt"), str(tmp_path / "corpus"), shard_tokens=4000, progress=False)
    remote_store.upload(str(tmp_path / "corpus"), f"{gcs_workdir}/corpus")

    losses = {}
    for how in ("mirror", "range"):
        c = tiny.get_config()
        c.steps, c.checkpoint_every, c.eval_every, c.log_every, c.progress_bar = 3, 3, 3, 1, False
        c.data.source, c.data.remote_reads = f"{gcs_workdir}/corpus", how
        train_and_evaluate(c, str(tmp_path / how))
        losses[how] = _losses((tmp_path / how / "metrics.jsonl").read_text())
        mirrored = tmp_path / "local-cache" / "remote"
        assert mirrored.is_dir() == (how == "mirror"), how  # "range" copies nothing to local disk
        shutil.rmtree(mirrored, ignore_errors=True)
    assert sorted(losses["range"]) == [1, 2, 3]
    np.testing.assert_allclose([losses["range"][s] for s in (1, 2, 3)], [losses["mirror"][s] for s in (1, 2, 3)],
                               rtol=1e-6)
    _no_local_gs_folder(tmp_path, Path.cwd())

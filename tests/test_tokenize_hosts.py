"""Two real processes joined by `jax.distributed` tokenize one corpus, each its share (train/tokenize_hosts.py),
into a shared folder (local or on the GCS emulator): the token stream equals a 1-process tokenization byte for
byte; reruns skip finished parts; a damaged part and a local output on several hosts are one-line errors."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import gcs_emulator  # tests/ is on sys.path
import numpy as np
import pytest
from conftest import prompt_completion_jsonl

gcs_bucket, gcs_workdir = gcs_emulator.gcs_bucket, gcs_emulator.gcs_workdir  # the fixtures, used by name
REPO = Path(__file__).resolve().parents[1]
NUM_DOCS = 300
SHARE = r"process (\d) of 2: tokenized ([\d,]+) documents, ([\d,]+) tokens in (\d+) parts \((\d+) already done\)"


def _write_source(folder: Path) -> Path:
    """A folder with a jsonl of NUM_DOCS - 1 documents of random lengths and a text file (one more)."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog ROMEO: thou art\n é 日本 1234".split(" ")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "a.jsonl", "w") as f:
        for _ in range(NUM_DOCS - 1):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(0, 80)))}) + "\n")
    (folder / "b.txt").write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 40)
    return folder


def _env(tmp_path, **extra) -> dict:
    return dict(os.environ, **extra, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                FLAX_GPT2_CACHE=str(tmp_path / "flax-cache"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tokenize(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.tokenize_corpus", *map(str, args), "--no_progress"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def _pair(env, *args) -> list[subprocess.CompletedProcess]:
    """The tokenize_corpus command on two processes of one jax.distributed run."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "train.tokenize_corpus", *map(str, args),
                               "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                               "--process_id", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _shares(runs) -> list[tuple[int, int, int, int]]:
    """(documents, tokens, parts, already done) each process printed, in process order."""
    import re

    shares = {}
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
        pid, docs, tokens, parts, done = re.search(SHARE, run.stdout).groups()
        shares[int(pid)] = (int(docs.replace(",", "")), int(tokens.replace(",", "")), int(parts), int(done))
    return [shares[0], shares[1]]


def _stream(folder) -> tuple[np.ndarray, dict]:
    from flax_gpt2.train.data import TokenStore

    store = TokenStore(str(folder))
    return store.read(0, len(store)), store.meta


def _losses(workdir) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _same_losses(single, multi, steps: int = 10) -> None:
    """The multi-process run logged the single-process run's losses at every step (<= 1e-6)."""
    one, two = _losses(single), _losses(multi)
    assert sorted(two) == sorted(one) == list(range(1, steps + 1))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=0, atol=1e-6)


def _check_halves(shares, meta) -> None:
    """Each process tokenized about half of the documents, and together all of them."""
    assert sum(s[0] for s in shares) == meta["num_documents"] == NUM_DOCS
    assert sum(s[1] for s in shares) == meta["num_tokens"]
    assert all(0.3 * NUM_DOCS < s[0] < 0.7 * NUM_DOCS for s in shares), shares


def test_two_hosts_into_a_shared_folder_equal_one_host(tmp_path):
    env = _env(tmp_path)
    source = _write_source(tmp_path / "src")
    one = _tokenize(env, source, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    want, want_meta = _stream(tmp_path / "one")

    out = tmp_path / "two"
    runs = _pair(env, source, out, "--shared_out", "--block_chars", 1500)
    shares = _shares(runs)
    got, meta = _stream(out)
    assert got.tobytes() == want.tobytes() and meta["sha256"] == want_meta["sha256"]
    assert meta["inputs"] == want_meta["inputs"]  # the same corpus, so training's cache key is the same too
    assert len(meta["shards"]) == sum(s[2] for s in shares) > 4  # several parts per host, of various sizes
    _check_halves(shares, meta)
    assert all(s[3] == 0 for s in shares)


def test_rerun_skips_finished_parts_and_names_a_damaged_one(tmp_path):
    env = _env(tmp_path)
    source = _write_source(tmp_path / "src")
    out = tmp_path / "two"
    shares = _shares(_pair(env, source, out, "--shared_out", "--block_chars", 1500))
    want, _ = _stream(out)

    # An interrupted run resumes: no meta.json, process 1 died before finishing block 1 (a part without its
    # sidecar) and block 5: only those two are encoded again, every finished part is kept.
    (out / "meta.json").unlink()
    for name in ("part_00001.json", "part_00005.bin", "part_00005.json"):
        (out / name).unlink()
    redone = ("part_00001", "part_00005")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part_*") if not p.name.startswith(redone)}
    resumed = _shares(_pair(env, source, out, "--shared_out", "--block_chars", 1500))
    assert [(s[2], s[3]) for s in resumed] == [(shares[0][2], shares[0][2]), (shares[1][2], shares[1][2] - 2)]
    assert kept == {p.name: p.stat().st_mtime_ns for p in out.glob("part_*") if not p.name.startswith(redone)}
    assert _stream(out)[0].tobytes() == want.tobytes()  # and the first run's stream equals one host's (above)

    # A damaged part (shorter than its sidecar says) is named, with the fix; --overwrite tokenizes again.
    (out / "meta.json").unlink()
    damaged = out / "part_00003.bin"
    damaged.write_bytes(damaged.read_bytes()[:-2])
    failed = _pair(env, source, out, "--shared_out", "--block_chars", 1500)
    for run in failed:
        assert run.returncode == 1 and "Traceback" not in run.stderr
        assert "part_00003.bin" in run.stderr and "--overwrite" in run.stderr, run.stderr[-2000:]
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (out / "meta.json").exists()
    redone = _shares(_pair(env, source, out, "--shared_out", "--block_chars", 1500, "--overwrite"))
    assert all(s[3] == 0 for s in redone)
    assert _stream(out)[0].tobytes() == want.tobytes()


def test_one_host_resumable_keeps_finished_parts_after_an_interruption(tmp_path):
    """`--resumable` on one host (no jax.distributed): the parts layout, so a run interrupted mid-way (here:
    meta.json and the last parts gone) redoes only what was missing; the stream equals the plain layout's."""
    env = _env(tmp_path)
    source = _write_source(tmp_path / "src")
    plain = _tokenize(env, source, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    out = tmp_path / "resumable"
    first = _tokenize(env, source, out, "--resumable", "--block_chars", 1500)
    parts = sorted(out.glob("part_*.bin"))
    assert first.returncode == 0 and "process 0 of 1" in first.stdout and len(parts) > 4, first.stderr[-3000:]
    # Interrupted while writing the second-last part (its sidecar, written last, missing) and before the last.
    (out / "meta.json").unlink()
    for name in (parts[-2].with_suffix(".json"), parts[-1], parts[-1].with_suffix(".json")):
        name.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in parts[:-2]}
    again = _tokenize(env, source, out, "--resumable", "--block_chars", 1500)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"in {len(parts)} parts ({len(parts) - 2} already done)" in again.stdout, again.stdout
    assert kept == {p.name: p.stat().st_mtime_ns for p in parts[:-2]}
    assert _stream(out)[0].tobytes() == _stream(tmp_path / "plain")[0].tobytes()


def test_local_output_on_two_hosts_is_an_error_unless_shared_or_done(tmp_path):
    env = _env(tmp_path)
    source = _write_source(tmp_path / "src")
    out = tmp_path / "local"
    for run in _pair(env, source, out):
        assert run.returncode == 1 and "Traceback" not in run.stderr
        assert "--shared_out" in run.stderr and "gs://" in run.stderr and str(out) in run.stderr, run.stderr[-2000:]
    assert not out.exists()  # before any work
    assert _tokenize(env, source, out).returncode == 0  # tokenized beforehand (on each host): fine
    assert all(r.returncode == 0 and "already holds this corpus" in r.stdout for r in _pair(env, source, out))


def test_two_hosts_on_gcs_equal_one_host(tmp_path, gcs_bucket, gcs_workdir):
    from flax_gpt2.train import remote_store
    from flax_gpt2.utils import file_io

    _, gcs_env = gcs_bucket
    env = _env(tmp_path, **gcs_env)
    source = _write_source(tmp_path / "src")
    for name in ("a.jsonl", "b.txt"):
        file_io.atomic_write(f"{gcs_workdir}/src/{name}", (source / name).read_bytes())
    one = _tokenize(env, source, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    want, _ = _stream(tmp_path / "one")

    out = f"{gcs_workdir}/corpus"
    shares = _shares(_pair(env, f"{gcs_workdir}/src", out, "--block_chars", 1500))
    got, meta = _stream(remote_store.mirror(out, str(tmp_path / "mirror")))
    assert got.tobytes() == want.tobytes()
    _check_halves(shares, meta)
    assert meta["source"] == f"{gcs_workdir}/src"
    assert not [p for p in tmp_path.rglob("gs:*")] and not [p for p in REPO.rglob("gs:*")]


@pytest.mark.slow
def test_two_hosts_tokenize_then_train_like_one(tmp_path):
    """Training on two processes with a shared, empty token cache: the hosts tokenize it together (each its
    share), then train 10 steps with the losses of a 1-process run; a local unshared cache is an error."""
    source = _write_source(tmp_path / "src")
    common = ["--config", "configs/tiny.py", "--config.steps=10", "--config.log_every=1", "--config.eval_every=100",
              "--config.checkpoint_every=100", f"--config.data.source={source}", "--config.progress_bar=False"]

    def launch(workdir, devices, *extra):
        env = _env(tmp_path, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        return subprocess.Popen([sys.executable, "-m", "train", "--workdir", str(workdir), *common, *extra],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def pair(workdir, *extra):
        port = _free_port()
        procs = [launch(workdir, 2, "--config.distributed.enabled=True", *extra,
                        f"--config.distributed.coordinator_address=localhost:{port}",
                        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}")
                 for i in range(2)]
        return [(p, *p.communicate(timeout=900)) for p in procs]

    for proc, _, err in pair(tmp_path / "unshared", f"--config.data.cache_dir={tmp_path / 'local-cache'}"):
        assert proc.returncode != 0 and "data.cache_dir" in err and "cache_shared" in err, err[-3000:]
    assert not list((tmp_path / "local-cache").glob("*/part_*"))

    shared = tmp_path / "shared-cache"
    for proc, _, err in pair(tmp_path / "multi", f"--config.data.cache_dir={shared}",
                             "--config.data.cache_shared=True"):
        assert proc.returncode == 0, err[-4000:]
        assert "tokenized" in err and "already done" in err, err[-4000:]
    (corpus,) = shared.iterdir()
    assert len(list(corpus.glob("part_*.bin"))) > 2
    single = launch(tmp_path / "single", 4, f"--config.data.cache_dir={tmp_path / 'single-cache'}")
    _, err = single.communicate(timeout=900)
    assert single.returncode == 0, err[-4000:]
    _same_losses(tmp_path / "single", tmp_path / "multi")
    assert _stream(corpus)[0].tobytes() == _stream(next((tmp_path / "single-cache").iterdir()))[0].tobytes()


@pytest.mark.slow
def test_two_hosts_tokenize_a_gcs_source_into_a_gcs_cache_and_train_like_one(tmp_path, gcs_bucket, gcs_workdir):
    """The issue's run: a gs:// source on the GCS emulator, an empty gs:// token cache, two training processes.
    Each host tokenizes about half of the documents (their logged counts), the cache holds the stream a single
    host writes, and the two hosts then train (reading the corpus in place) with the losses of a 1-process
    run over 10 steps (<= 1e-6)."""
    import re

    from flax_gpt2.train import remote_store
    from flax_gpt2.utils import file_io

    _, gcs_env = gcs_bucket
    local_source = _write_source(tmp_path / "src")
    fs, path = file_io.filesystem(f"{gcs_workdir}/src")
    fs.put(str(local_source) + "/", path + "/", recursive=True)
    source, cache = f"{gcs_workdir}/src", f"{gcs_workdir}/tokens"
    common = ["--config", "configs/tiny.py", "--config.steps=10", "--config.log_every=1", "--config.eval_every=100",
              "--config.checkpoint_every=100", f"--config.data.source={source}", "--config.progress_bar=False"]

    def launch(workdir, devices, *extra):
        env = _env(tmp_path, **gcs_env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        return subprocess.Popen([sys.executable, "-m", "train", "--workdir", str(workdir), *common, *extra],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    port = _free_port()
    procs = [launch(tmp_path / "multi", 2, f"--config.data.cache_dir={cache}", "--config.distributed.enabled=True",
                    f"--config.distributed.coordinator_address=localhost:{port}",
                    "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}") for i in range(2)]
    docs = {}
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        pid, count = re.search(r"process (\d) of 2: tokenized ([\d,]+) documents", err).groups()
        docs[int(pid)] = int(count.replace(",", ""))
    assert sum(docs.values()) == NUM_DOCS and all(0.3 * NUM_DOCS < n < 0.7 * NUM_DOCS for n in docs.values()), docs
    single = launch(tmp_path / "single", 4, f"--config.data.cache_dir={tmp_path / 'single-cache'}")
    _, err = single.communicate(timeout=900)
    assert single.returncode == 0, err[-4000:]
    _same_losses(tmp_path / "single", tmp_path / "multi")
    (corpus,) = [str(p) for p in file_io.epath(cache).iterdir()]
    mirrored = remote_store.mirror(corpus, str(tmp_path / "mirror"))
    assert _stream(mirrored)[0].tobytes() == _stream(next((tmp_path / "single-cache").iterdir()))[0].tobytes()
    assert not [p for p in tmp_path.rglob("gs:*")] and not [p for p in REPO.rglob("gs:*")]


def test_two_hosts_write_the_loss_mask_of_a_recipe_with_prompts(tmp_path):
    """The prompt_completion recipe on two hosts: tokens and loss mask (data.loss_on="completion") equal one
    host's, byte for byte."""
    env = _env(tmp_path)
    source = prompt_completion_jsonl(tmp_path / "pc.jsonl", 120, seed=1)
    one = _tokenize(env, source, tmp_path / "one", "--recipe", "prompt_completion")
    assert one.returncode == 0, one.stderr[-3000:]
    runs = _pair(env, source, tmp_path / "two", "--recipe", "prompt_completion", "--shared_out", "--block_chars", 800)
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    from flax_gpt2.train.data import TokenStore

    want, got = TokenStore(str(tmp_path / "one")), TokenStore(str(tmp_path / "two"))
    assert len(got.shards) > 2 and got.meta["loss_mask"] == want.meta["loss_mask"]
    assert got.read(0, len(got)).tobytes() == want.read(0, len(want)).tobytes()
    got_mask, want_mask = got.read(0, len(got), got.masks), want.read(0, len(want), want.masks)
    assert got_mask.tobytes() == want_mask.tobytes() and 0 < want_mask.sum() < len(want)

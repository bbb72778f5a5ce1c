"""Checkpoints and model folders that lie, stall or sit where they should not: each fails in one clear line,
in bounded time and memory, and touches nothing.

- a config.json whose n_layer (10,000,000) the weights do not have: refused before anything is sized by it
  (in a subprocess under a 4 GiB address-space limit, so a regression cannot eat the machine);
- a checkpoint meta whose step or data position was edited: caught as corruption (the meta's sha256, the
  step cross-checked against the checkpoint folder and the optimizer's update count), the reader and the
  resume fall back to the checkpoint before it;
- an export written into a training run: refused (convert, save_pretrained), and a run folder that holds an
  older export is an error, not a silent choice;
- a gs:// model whose server stalls mid-download, or cannot be reached: one line after
  $FLAX_GPT2_GCS_TIMEOUT seconds, no gcsfs tracebacks;
- convert on a config.json with fields of the wrong JSON type: one line naming the file and the field.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gcs_emulator import gcs_bucket  # noqa: F401  (the project's GCS emulator, a session fixture)

from . import bad_files

REPO = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


def _one_line_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The command's stderr, checked to be one `error:` line (no traceback) and the exit `code`."""
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr[-3000:]
    return lines[0]


def _tiny_hf_folder(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    bad_files.write_config(folder, **config)
    bad_files.safetensors_file(folder / "model.safetensors", bad_files.tiny_state())
    return folder


# --- a config.json that claims ten million layers ------------------------------------------------------------

_BOUNDED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
import flax_gpt2
try:
    flax_gpt2.from_pretrained(sys.argv[1], progress=False)
except ValueError as e:
    print("ValueError:", e)
"""


def test_config_n_layer_ten_million_fails_before_sizing_anything(tmp_path):
    """Was: 19.9 GB and killed, memory growing with n_layer, before the mismatch was reported."""
    folder = _tiny_hf_folder(tmp_path / "model", n_layer=10_000_000)
    proc = subprocess.run([sys.executable, "-c", _BOUNDED, str(folder)], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"ValueError: checkpoint {folder / 'model.safetensors'} does not fit GPT2LMHeadModel with this config: "
            "the config has n_layer=10000000 but the weights hold 1 (blocks 0 to 0)") in proc.stdout, proc.stdout


# --- a training run: its meta edited, an export written into it ---------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny training run of 4 steps with checkpoints at 2 and 4."""
    from conftest import tiny_train_config
    from flax_gpt2.train.train_loop import train_and_evaluate

    cache = tmp_path_factory.mktemp("token_cache")
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_train_config(cache, steps=4, checkpoint_every=2, eval_every=4)
    result = train_and_evaluate(config, str(workdir))
    return workdir, config, result


def _meta_file(workdir: Path, step: int) -> Path:
    (path,) = [p for p in (workdir / "checkpoints" / str(step) / "meta").rglob("*")
               if p.is_file() and p.read_bytes().lstrip().startswith(b"{")]
    return path


def _edit_meta(workdir: Path, step: int, edit) -> None:
    path = _meta_file(workdir, step)
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: m["data"].update(position=m["data"]["position"] + 3), id="data_position"),
    pytest.param(lambda m: m.update(step=2), id="step"),
    # A meta without its sha256 (whatever else was edited) is corrupt.
    pytest.param(lambda m: (m.pop("meta_sha256"), m.update(step=2)), id="step_without_sha256"),
])
def test_an_edited_checkpoint_meta_is_corruption(run, tmp_path, caplog, edit):
    """Was: the run resumed at the edited data position (or step) silently; the array checksums do not
    cover the meta."""
    from flax_gpt2.checkpoints import run_folders as run_checkpoint
    from flax_gpt2.train.train_loop import train_and_evaluate

    base, config, _ = run
    workdir = tmp_path / "run"
    shutil.copytree(base, workdir)
    _edit_meta(workdir, 4, edit)

    with caplog.at_level("WARNING"):  # the reader skips it (and moves nothing)
        run_checkpoint.load_run(workdir)
    assert "ChecksumMismatchError" in caplog.text and "using the checkpoint at step 2 instead" in caplog.text
    assert (workdir / "checkpoints" / "4").is_dir()

    caplog.clear()
    with caplog.at_level("WARNING"):
        result = train_and_evaluate(config, str(workdir))
    assert "checkpoint at step 4 is corrupt" in caplog.text and "resuming from the checkpoint at step 2" in caplog.text
    assert len(list((workdir / "corrupt_checkpoints").iterdir())) == 1  # set aside, never deleted
    assert result["step"] == 4


def test_an_intact_meta_passes_its_checks(run):
    from flax_gpt2.checkpoints import run_folders as run_checkpoint

    base, _, _ = run
    meta = json.loads(_meta_file(base, 4).read_text())
    assert meta["step"] == 4 and meta[run_checkpoint.META_CHECKSUM]
    assert run_checkpoint.RunMeta.from_json(meta, 4, "here").step == 4
    run_checkpoint.load_run(base, step=4)


def test_convert_refuses_to_write_into_a_run(run, tmp_path):
    """Was: `convert --model RUN --out RUN --overwrite` wrote HF files into the run, after which every
    reader loaded that frozen export instead of the run's newest checkpoint."""
    import flax_gpt2
    from flax_gpt2 import convert

    base, _, _ = run
    workdir = tmp_path / "run"
    shutil.copytree(base, workdir)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "flax_gpt2.convert", "--model", str(workdir), "--out", str(workdir),
                           "--overwrite", "--no_progress"], env=_env(), capture_output=True, text=True, timeout=300)
    line = _one_line_error(proc, code=2)
    assert f"--out {workdir} is a flax_gpt2 training run" in line and f"--out {workdir}-export" in line
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before

    model, params = flax_gpt2.from_pretrained(workdir, progress=False)
    with pytest.raises(FileExistsError, match=r"is a flax_gpt2 training run: an export written into it would be"):
        flax_gpt2.save_pretrained(workdir, model, params, tokenizer=False, overwrite=True)
    with pytest.raises(FileExistsError, match=r"is a flax_gpt2 training run"):
        convert.convert(str(workdir), str(workdir), overwrite=True, progress=False)
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def test_a_run_that_holds_an_old_export_is_ambiguous(run, tmp_path):
    """A run folder an older version exported into: neither the export nor the checkpoints are guessed."""
    import flax_gpt2

    base, _, _ = run
    workdir = tmp_path / "run"
    shutil.copytree(base, workdir)
    bad_files.write_config(workdir)
    bad_files.safetensors_file(workdir / "model.safetensors", bad_files.tiny_state())
    with pytest.raises(ValueError, match=r"holds both a training run .* and a Hugging Face export .* ambiguous"):
        flax_gpt2.from_pretrained(workdir, progress=False)


# --- convert on a config.json of the wrong JSON types ---------------------------------------------------------

@pytest.mark.parametrize("raw,match", [
    (dict(architectures=5), r"config\.json: architectures must be a list of class names .*got 5"),
    (dict(architectures=[["GPT2LMHeadModel"]]), r"config\.json: architectures must be a list of class names"),
    (dict(n_layer="1"), r"config\.json: n_layer must be a positive integer, got '1'"),
])
def test_convert_names_a_config_field_of_the_wrong_type(tmp_path, raw, match):
    """Was: AttributeError/TypeError tracebacks from reading `architectures`."""
    import re

    folder = _tiny_hf_folder(tmp_path / "model", **raw)
    proc = subprocess.run([sys.executable, "-m", "flax_gpt2.convert", "--model", str(folder), "--out",
                           str(tmp_path / "out"), "--no_progress"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    line = _one_line_error(proc)
    assert re.search(match, line) and str(folder / "config.json") in line, line
    assert not (tmp_path / "out").exists()


def test_convert_names_a_config_that_is_not_an_object(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2]")
    proc = subprocess.run([sys.executable, "-m", "flax_gpt2.convert", "--model", str(folder), "--out",
                           str(tmp_path / "out"), "--no_progress"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert f"{folder / 'config.json'} holds a JSON list, not an object" in _one_line_error(proc)


# --- gs:// servers that stall or cannot be reached -------------------------------------------------------------

class _StallingProxy:
    """A TCP proxy to the GCS emulator that forwards every request but downloads (`alt=media`), which it
    accepts and never answers: a server that stalls mid-download. Each request gets `Connection: close`, so
    a kept-alive connection cannot carry a download past the check."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stalled: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(65536)
            if not data:
                conn.close()
                return
            head += data
        if b"alt=media" in head.split(b"\r\n", 1)[0]:
            self.stalled.append(conn)  # held open, never answered
            return
        first, rest = head.split(b"\r\n", 1)
        rest = b"\r\n".join(line for line in rest.split(b"\r\n") if not line.lower().startswith(b"connection:"))
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        upstream.sendall(first + b"\r\nConnection: close\r\n" + rest)
        threading.Thread(target=self._pipe, args=(conn, upstream), daemon=True).start()
        self._pipe(upstream, conn)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.server.close()
        for conn in self.stalled:
            conn.close()


def _gcs_env(port: int, tmp_path: Path, timeout: str = "5") -> dict[str, str]:
    from gcs_emulator import emulator_env

    return _env(**emulator_env(port), FLAX_GPT2_GCS_TIMEOUT=timeout, FLAX_GPT2_CACHE=str(tmp_path / "cache"))


def _convert_gs(url: str, tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flax_gpt2.convert", "--model", url, "--out", str(tmp_path / "out"),
                           "--no_progress"], env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - started


def test_a_gs_download_that_stalls_times_out_in_one_line(gcs_bucket, tmp_path):  # noqa: F811
    """Was: a download from a stalled server never ended (killed at 300 s)."""
    from etils import epath

    bucket, env = gcs_bucket
    url = f"{bucket}/stall-{os.getpid()}"
    local = _tiny_hf_folder(tmp_path / "model")
    for path in local.iterdir():
        epath.Path(f"{url}/{path.name}").write_bytes(path.read_bytes())
    port = int(env["STORAGE_EMULATOR_HOST"].rsplit(":", 1)[1])
    proxy = _StallingProxy(port)
    try:
        proc, took = _convert_gs(url, tmp_path, _gcs_env(proxy.port, tmp_path))
    finally:
        proxy.close()
    line = _one_line_error(proc)
    assert f"reading {url}/" in line and "did not answer within 5 s" in line and "FLAX_GPT2_GCS_TIMEOUT" in line, line
    assert proxy.stalled, "the download never reached the stalling proxy"
    assert took < 60, took  # the command's own start-up (imports) included
    assert not list((tmp_path / "cache").rglob("*.part")), "a partial download was left behind"


def test_an_unreachable_gs_server_fails_fast_in_one_line(tmp_path):
    """Was: several gcsfs tracebacks, then one line after ~37 s of retries."""
    pytest.importorskip("gcsfs")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, took = _convert_gs("gs://flax-gpt2-test/model", tmp_path, _gcs_env(port, tmp_path))
    line = _one_line_error(proc)
    assert "gs://flax-gpt2-test/model" in line and "did not answer within 5 s" in line, line
    assert took < 30, took


def test_gcs_timeout_setting_is_checked(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flax_gpt2.convert", "--model", "gs://flax-gpt2-test/model",
                           "--out", str(tmp_path / "out")], env=_env(FLAX_GPT2_GCS_TIMEOUT="soon"),
                          capture_output=True, text=True, timeout=120)
    assert "FLAX_GPT2_GCS_TIMEOUT='soon' must be a number of seconds > 0" in _one_line_error(proc)


# --- no network, HF_HUB_OFFLINE unset --------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:  # a port nothing listens on: the hub "cannot be reached", at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_network_env(tmp_path: Path) -> dict[str, str]:
    env = _env(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf_home"),
               TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken_cache"), FLAX_GPT2_CACHE=str(tmp_path / "cache"))
    env.pop("HF_HUB_OFFLINE", None)
    return env


_TIMED = """
import sys, time
import flax_gpt2
started = time.monotonic()
try:
    {call}
except OSError as e:
    print("OSError:", " ".join(str(e).split()))
print("took", time.monotonic() - started)
"""


def _took(stdout: str) -> float:
    return float(stdout.strip().splitlines()[-1].split()[-1])


def test_offline_hub_lookup_fails_after_one_short_probe(tmp_path):
    """Was: ~40 s of huggingface_hub retries (five 'Retrying in ...' lines) before the one-line error."""
    proc = subprocess.run([sys.executable, "-c", _TIMED.format(call='flax_gpt2.from_pretrained("gpt2", progress=False)')],
                          env=_no_network_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OSError: 'gpt2' is not a local folder, the Hugging Face hub cannot be reached" in proc.stdout, proc.stdout
    assert "did not answer a 3 s probe" in proc.stdout and "Retrying" not in proc.stderr, proc.stderr[-2000:]
    assert _took(proc.stdout) < 10, proc.stdout


def test_offline_tokenizer_lookup_fails_after_one_short_probe(tmp_path):
    """Was: ~20 s of hub retries, then tiktoken's download, before the error. (Not GPT-2's own name: its
    files ship with the package and load offline.)"""
    call = 'from flax_gpt2.tokenizer.bpe_tokenizer import get_tokenizer; get_tokenizer("someone/their-bpe")'
    proc = subprocess.run([sys.executable, "-c", _TIMED.format(call=call)], env=_no_network_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OSError: could not load the tokenizer for 'someone/their-bpe'" in proc.stdout, proc.stdout
    assert "downloads: not tried (127.0.0.1:" in proc.stdout and "did not answer a 3 s probe" in proc.stdout
    assert _took(proc.stdout) < 10, proc.stdout


def _custom_tokenizer(folder: Path) -> None:
    """A byte-level BPE that is not GPT-2's (256 bytes, one merge, <|endoftext|>)."""
    from flax_gpt2.tokenizer import bpe_files

    vocab = {bpe_files.BYTE_TO_CHAR[b]: b for b in range(256)}
    vocab["ab"], vocab[bpe_files.ENDOFTEXT] = 256, 257
    bpe_files.write_files(folder, vocab, ["a b"])


_SAVE_AGAIN = """
import flax_gpt2
model, params = flax_gpt2.from_pretrained(sys.argv[1], progress=False)
flax_gpt2.save_pretrained(sys.argv[2], model, params)
"""


def test_save_pretrained_copies_the_loaded_folders_tokenizer_offline(tmp_path):
    """The README's `save_pretrained(out, model, params)` after `from_pretrained(folder)`: was ~25 s of hub
    retries, then a warning and no tokenizer files at all (or GPT-2's, not the folder's own)."""
    source = _tiny_hf_folder(tmp_path / "model")
    _custom_tokenizer(source)
    out = tmp_path / "out"
    script = _SAVE_AGAIN.replace("import flax_gpt2\n", "")
    call = "exec(" + repr(script) + ")"
    proc = subprocess.run([sys.executable, "-c", _TIMED.format(call=call), str(source), str(out)],
                          env=_no_network_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OSError" not in proc.stdout, proc.stdout + proc.stderr[-3000:]
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert _took(proc.stdout) < 10, proc.stdout


def test_offline_init_from_names_the_training_flag(tmp_path, shared_dir):
    """Was: the hint named the Python call `from_pretrained('DIR')` to a user of the command line."""
    proc = subprocess.run([sys.executable, "-m", "flax_gpt2.train", "--config", "tiny", "--workdir",
                           str(tmp_path / "run"), "--config.init_from=gpt2", "--config.steps=1",
                           "--config.progress_bar=False", f"--config.data.cache_dir={tmp_path / 'tokens'}"],
                          env=_no_network_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "Retrying" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "error:" in line]  # after train's INFO log lines
    assert "the Hugging Face hub cannot be reached" in line and "--config.init_from=DIR" in line, line
    assert "from_pretrained('DIR')" not in line


# --- a checkpoint save that fails on a full disk ----------------------------------------------------------------

def _file_size_limit(limit: int):
    def apply():  # in the child: writes past `limit` bytes fail with EFBIG, as a full disk's fail with ENOSPC
        import resource
        import signal

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def test_a_checkpoint_save_that_cannot_write_is_one_line(tmp_path):
    """Was: a dozen orbax background-thread tracebacks and 'Event loop is closed' ones around the error.
    The 4 MiB file-size limit lets the token cache and metrics be written, not the first checkpoint's
    arrays (a real full disk: the same failed write in tensorstore's background threads)."""
    proc = subprocess.run([sys.executable, "-m", "flax_gpt2.train", "--config", "tiny", "--workdir", str(tmp_path / "run"),
                           "--config.steps=4", "--config.checkpoint_every=2", "--config.eval_every=4",
                           "--config.progress_bar=False", f"--config.data.cache_dir={tmp_path / 'tokens'}"],
                          env=_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=_file_size_limit(4 << 20))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-5000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line or "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("train: error:") and "File too large" in errors[0], errors
    assert str(tmp_path / "run" / "checkpoints") in errors[0]

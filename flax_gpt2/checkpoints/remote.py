"""Model folders on remote storage (`gs://...`): what `from_pretrained` and the CLIs read there.

- A training run's checkpoints are read where they are (orbax reads `gs://` directly); its small files
  (tokenizer, `train_config.json`) are copied to a local mirror folder that also names the run's URL and
  its checkpoint steps, so tokenizers and caches keyed on a folder's contents work unchanged.
- A Hugging Face folder (config.json, weights, tokenizer files) is copied file by file into the mirror;
  files whose size and date are unchanged are not copied again.
Mirrors live under `$FLAX_GPT2_CACHE/remote` (default `~/.cache/flax_gpt2/remote`).

Every request to the storage server (a listing, a stat, each 8 MiB of a download) must answer within
`$FLAX_GPT2_GCS_TIMEOUT` seconds (default 60): a server that stalls, or cannot be reached while gcsfs
retries with back-off, is one OSError naming the URL and the setting, not a hang or a page of gcsfs
tracebacks. A file is downloaded beside its mirror copy and renamed over it only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from typing import Any, Callable, Iterator, TypeVar

from flax_gpt2.checkpoints import run_folders
from flax_gpt2.tokenizer import bpe_files
from flax_gpt2.utils import file_io
from flax_gpt2.utils.cache_root import cache_root

RUN_POINTER = "remote_run.json"  # in a mirror of a training run: {"url": ..., "steps": [...]}
_SMALL_RUN_FILES = (*(name for pair in bpe_files.FILE_PAIRS for name in pair), "train_config.json")
TIMEOUT_ENV = "FLAX_GPT2_GCS_TIMEOUT"
_DEFAULT_TIMEOUT_S = 60.0
_CHUNK_BYTES = 8 << 20
T = TypeVar("T")


class RemoteTimeoutError(TimeoutError):
    """The storage server did not answer one request within `$FLAX_GPT2_GCS_TIMEOUT` seconds."""

def timeout_s() -> float:
    """Seconds one storage request may take: `$FLAX_GPT2_GCS_TIMEOUT` (a number > 0), default 60."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return _DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds > 0 (e.g. {TIMEOUT_ENV}=120)")
    return value


def mirror_root() -> str:
    return os.path.join(cache_root(), "remote")


# --- model folders and runs on remote storage ------------------------------------------------------------

def local_folder(url: str, *, progress: bool = True) -> str:
    """A local folder standing for the model folder or training run at `url` (see the module docstring)."""

    file_io.resolve_path(url)  # unsupported schemes and missing dependencies get their own message
    url = url.rstrip("/")
    remote = file_io.epath(url)
    limit = timeout_s()
    if url.startswith("gs://"):  # imported outside the deadline, which is for the server's answers
        with contextlib.suppress(ImportError):
            import gcsfs  # noqa: F401
    ask = lambda call, what: _answer_within(call, limit, f"{what} {url}")  # noqa: E731
    found = ask(remote.is_dir, "listing")
    if not found:
        raise FileNotFoundError(f"no such folder: {url} (or it cannot be reached with the current credentials)")
    target = os.path.join(mirror_root(), hashlib.sha256(url.encode()).hexdigest()[:20])
    os.makedirs(target, exist_ok=True)
    if ask(lambda: run_folders.is_training_run(url), "listing"):
        steps = ask(lambda: sorted(int(p.name) for p in file_io.epath(run_folders.checkpoint_dir(url)).iterdir()
                                   if p.name.isdigit()), "listing")
        for name in _SMALL_RUN_FILES:
            _copy_if_changed(remote / name, os.path.join(target, name), limit)
        _write_if_changed(os.path.join(target, RUN_POINTER), json.dumps({"url": url, "steps": steps}))
        return target
    for child in ask(lambda: [c for c in remote.iterdir() if c.is_file()], "listing"):
        # A listing is a manifest too: a name that is not a plain file name in the folder is refused.
        file_io.manifest_member(target, child.name, manifest=url, key="a listed file")
        _copy_if_changed(child, os.path.join(target, child.name), limit)
    return target


def run_url(folder: str) -> str | None:
    """The URL of the remote training run a mirror folder stands for, else None."""
    pointer = os.path.join(folder, RUN_POINTER)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        return json.load(f)["url"]


def _answer_within(call: Callable[[], T], limit: float, what: str) -> T:
    """`call()`, or RemoteTimeoutError once it has taken `limit` seconds; any other failure is an OSError
    naming `what`. The call runs in a daemon thread (a stalled socket cannot be interrupted; the thread is
    left behind and cannot keep the process alive), with gcsfs's per-retry tracebacks silenced."""
    result: dict[str, Any] = {}
    done = threading.Event()

    def target():
        try:
            result["value"] = call()
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e
        finally:
            done.set()

    with _quiet_gcsfs():
        threading.Thread(target=target, daemon=True, name="flax_gpt2-remote").start()
        if not done.wait(limit):
            raise RemoteTimeoutError(f"{what}: the storage server did not answer within {limit:g} s (it stalls or "
                                     f"cannot be reached); check the network, or set {TIMEOUT_ENV} to wait longer")
    error = result.get("error")
    if error is None:
        return result["value"]
    if isinstance(error, (FileNotFoundError, RemoteTimeoutError)):
        raise error
    raise OSError(f"{what}: {type(error).__name__}: {' '.join(str(error).split())[:500]}") from error


@contextlib.contextmanager
def _quiet_gcsfs() -> Iterator[None]:
    """gcsfs logs a full traceback for every retry (logger.exception); the one error raised here says it all."""
    logger = logging.getLogger("gcsfs")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _copy_if_changed(remote, local: str, limit: float) -> None:
    what = f"reading {remote}"
    if not _answer_within(remote.exists, limit, what):
        return
    stat = _answer_within(remote.stat, limit, what)
    stamp = f"{stat.length}:{stat.mtime}"
    stamp_file = os.path.join(os.path.dirname(local), f".{os.path.basename(local)}.stamp")
    if os.path.exists(local) and os.path.exists(stamp_file) and open(stamp_file).read() == stamp:
        return
    partial = f"{local}.part"
    try:
        with open(partial, "wb") as out:
            source = _answer_within(lambda: remote.open("rb"), limit, what)
            try:
                while chunk := _answer_within(lambda: source.read(_CHUNK_BYTES), limit, what):
                    out.write(chunk)
            finally:
                with contextlib.suppress(Exception):
                    _answer_within(source.close, limit, what)
        os.replace(partial, local)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    file_io.atomic_write(stamp_file, stamp)


def _write_if_changed(path: str, text: str) -> None:
    if os.path.exists(path) and open(path, encoding="utf-8").read() == text:
        return
    file_io.atomic_write(path, text)

"""Model folders on remote storage (`gs://...`): what `from_pretrained` and the CLIs read there.

- A training run's checkpoints are read where they are (orbax reads `gs://` directly); its small files
  (tokenizer, `train_config.json`) are copied to a local mirror folder that also names the run's URL and
  its checkpoint steps, so tokenizers and caches keyed on a folder's contents work unchanged.
- A Hugging Face folder (config.json, weights, tokenizer files) is copied file by file into the mirror;
  files whose size and date are unchanged are not copied again.
Mirrors live under `$FLAX_GPT2_CACHE/remote` (default `~/.cache/flax_gpt2/remote`).
"""

from __future__ import annotations

import hashlib
import json
import os

from flax_gpt2 import bpe_files, file_io

RUN_POINTER = "remote_run.json"  # in a mirror of a training run: {"url": ..., "steps": [...]}
_SMALL_RUN_FILES = (*(name for pair in bpe_files.FILE_PAIRS for name in pair), "train_config.json")


def mirror_root() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("FLAX_GPT2_CACHE") or "~/.cache/flax_gpt2"), "remote")


def local_folder(url: str, *, progress: bool = True) -> str:
    """A local folder standing for the model folder or training run at `url` (see the module docstring)."""
    from flax_gpt2 import run_checkpoint

    file_io.resolve_path(url)  # unsupported schemes and missing dependencies get their own message
    url = url.rstrip("/")
    remote = file_io.epath(url)
    try:
        found = remote.is_dir()
    except Exception as e:  # gcsfs/fsspec raise many types for auth, network and permission problems
        raise OSError(f"cannot read {url}: {type(e).__name__}: {e}") from e
    if not found:
        raise FileNotFoundError(f"no such folder: {url} (or it cannot be reached with the current credentials)")
    target = os.path.join(mirror_root(), hashlib.sha256(url.encode()).hexdigest()[:20])
    os.makedirs(target, exist_ok=True)
    if run_checkpoint.is_training_run(url):
        steps = sorted(int(p.name) for p in file_io.epath(run_checkpoint.checkpoint_dir(url)).iterdir()
                       if p.name.isdigit())
        for name in _SMALL_RUN_FILES:
            _copy_if_changed(remote / name, os.path.join(target, name))
        _write_if_changed(os.path.join(target, RUN_POINTER), json.dumps({"url": url, "steps": steps}))
        return target
    for child in remote.iterdir():
        if child.is_file():
            _copy_if_changed(child, os.path.join(target, child.name))
    return target


def run_url(folder: str) -> str | None:
    """The URL of the remote training run a mirror folder stands for, else None."""
    pointer = os.path.join(folder, RUN_POINTER)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        return json.load(f)["url"]


def _copy_if_changed(remote, local: str) -> None:
    if not remote.exists():
        return
    stat = remote.stat()
    stamp = f"{stat.length}:{stat.mtime}"
    stamp_file = os.path.join(os.path.dirname(local), f".{os.path.basename(local)}.stamp")
    if os.path.exists(local) and os.path.exists(stamp_file) and open(stamp_file).read() == stamp:
        return
    file_io.atomic_write(local, remote.read_bytes())
    file_io.atomic_write(stamp_file, stamp)


def _write_if_changed(path: str, text: str) -> None:
    if os.path.exists(path) and open(path, encoding="utf-8").read() == text:
        return
    file_io.atomic_write(path, text)

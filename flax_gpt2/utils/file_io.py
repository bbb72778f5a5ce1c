"""Paths and safe writes: one place that knows local folders and `gs://` URLs, and never half-writes a file.

Every file the project writes over an existing one goes through `atomic_write` (a temp file in the same
folder, fsynced, then renamed over the target) or `staged_folder` (every new file complete before any
old one is replaced), so a crash or a full disk leaves the previous version, never a truncated one.
`gs://` paths (and other URLs) go through etils `epath`, as orbax and Flax do, and are never turned into
local folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from typing import Iterator

URL_SCHEMES = ("gs://", "s3://", "az://", "hf://")
GCS_EXTRA = 'pip install "flax_gpt2[gcs]" (or [tpu])'


class MissingDependencyError(ImportError):
    """A path needs an optional dependency that is not installed; the message names the extra."""


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names remote storage (`gs://bucket/x`), as opposed to a local path."""
    return "://" in _as_text(path)


def resolve_path(path: str | os.PathLike) -> str:
    """An absolute local path (`~` expanded, relative to the current folder), or a URL unchanged.

    Resolve user paths once, at the entry point: orbax refuses relative checkpoint paths, and a later
    `chdir` must not move the run.
    """
    text = _as_text(path)
    if is_url(text):
        _check_scheme(text)
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


def epath(path: str | os.PathLike):
    """An `etils.epath.Path` for a local path or a URL (with its dependencies checked)."""
    from etils import epath as _epath

    text = _as_text(path)
    if is_url(text):
        _check_scheme(text)
    return _epath.Path(text)


def join(path: str | os.PathLike, *parts: str) -> str:
    """`os.path.join` that keeps a URL's `//`."""
    text = _as_text(path)
    if is_url(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(text, *parts)


class UnsafeManifestName(ValueError):
    """A file name read from a manifest (a corpus `meta.json`, a checkpoint meta, a shard index) is not a
    plain relative name inside its folder."""


def manifest_member(folder: str | os.PathLike, name: object, *, manifest: str, key: str = "file") -> str:
    """The path of the file `name` that `manifest` lists, inside `folder`; refuses anything else.

    Every file name read from a manifest (a corpus `meta.json`, a checkpoint meta, a safetensors or
    `pytorch_model.bin` shard index, a run folder's listing) goes through here before any byte is read or
    written: an absolute name, a `..` part, a drive, a backslash, an empty name, a NUL byte or a non-string
    would let a downloaded manifest (a bucket's, a hub's) read or write files anywhere on the host.
    Sub-folders (`a/b.bin`) are allowed; they stay inside `folder`.

    Args:
      folder: the folder that holds the manifest's files (local path or URL).
      name: the name as the manifest spells it.
      manifest: the manifest's path, named in the error.
      key: what the name is in the manifest (e.g. `shards[3].file`), named in the error.
    Returns:
      `join(folder, name)`.
    Raises:
      UnsafeManifestName: naming the manifest, the key and the name.
    """
    problem = _unsafe_name_problem(name)
    if problem:
        raise UnsafeManifestName(f"{manifest}: {key} is {name!r}, {problem}; a manifest may only name files "
                                 f"inside its own folder (a plain relative name such as 'shard_00000.bin')")
    return join(folder, name)  # type: ignore[arg-type]


def _unsafe_name_problem(name: object) -> str:
    if not isinstance(name, str):
        return f"not a string but {type(name).__name__}"
    if not name or name.strip() != name:
        return "empty or padded with spaces"
    if "\x00" in name or any(ord(c) < 32 for c in name):
        return "a name with control characters"
    if "\\" in name:
        return "a name with a backslash"
    if "://" in name:
        return "a URL"
    if name.startswith(("/", "~")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "a path that leaves its folder (or has empty, '.' or '..' parts)"
    return ""


def exists(path: str | os.PathLike) -> bool:
    return epath(path).exists() if is_url(_as_text(path)) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    return epath(path).is_dir() if is_url(_as_text(path)) else os.path.isdir(path)


def read_text(path: str | os.PathLike) -> str:
    return epath(path).read_text(encoding="utf-8")


def read_bytes(path: str | os.PathLike) -> bytes:
    return epath(path).read_bytes()


def filesystem(url: str):
    """`(fsspec filesystem, path)` of a URL, for what `epath` lacks: byte-range reads (`fs.cat_file(path, start,
    end)`) and one-call listings with sizes (`fs.find(path, detail=True)`)."""
    import fsspec

    _check_scheme(url)
    return fsspec.core.url_to_fs(url)


def makedirs(path: str | os.PathLike) -> None:
    epath(path).mkdir(parents=True, exist_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes `data` to `path` so that readers see the old file or the complete new one, never a part.

    Local: a temp file in the same folder, fsynced, renamed over `path` (rename is atomic within a file
    system). URL: one object upload, which object stores make visible only once complete.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    text = _as_text(path)
    if is_url(text):
        epath(text).write_bytes(raw)
        return
    _replace_local(text, lambda f: f.write(raw))


def _replace_local(target: str, write) -> None:
    """`write(file)` into a temp file beside `target`, fsync, give it `target`'s mode, rename it over `target`."""
    folder = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _set_mode(tmp, target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike) -> Iterator[str]:
    """Yields an empty staging folder inside `folder`; the files written there replace their namesakes
    in `folder` only when the block finishes without an error.

    On an error (a full disk, a crash in a converter) the staging folder is removed and `folder` is as it
    was. Files of `folder` that the block did not write are left alone. Each file is fsynced and then
    renamed into place, so each one is always either the old or the new version.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    staging = os.path.join(folder, f".staging-{uuid.uuid4().hex[:12]}")
    os.makedirs(staging)
    try:
        yield staging
        names = sorted(os.listdir(staging))
        for name in names:
            _fsync_file(os.path.join(staging, name))
        for name in names:
            target = os.path.join(folder, name)
            if os.path.isdir(target) and not os.path.islink(target):
                raise IsADirectoryError(f"{target} is a folder; not replacing it with a file")
            os.replace(os.path.join(staging, name), target)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _set_mode(tmp: str, target: str) -> None:
    """Gives the temp file the mode the target has (or a new file would get): mkstemp makes it 0600."""
    try:
        mode = os.stat(target).st_mode & 0o777
    except OSError:
        mode = 0o666 & ~_umask()
    os.chmod(tmp, mode)


def _fsync_file(path: str) -> None:
    if os.path.isfile(path):
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _fsync_dir(folder: str) -> None:
    # Makes the rename itself durable; not every platform/file system allows it.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _as_text(path: str | os.PathLike) -> str:
    return path if isinstance(path, str) else os.fspath(path) if isinstance(path, os.PathLike) else str(path)


def _check_scheme(url: str) -> None:
    """A clear error when the URL's file system is not installed (epath would fail deep inside fsspec)."""
    if not url.startswith(URL_SCHEMES):
        raise ValueError(f"unsupported URL {url!r}: use a local path or one of {', '.join(URL_SCHEMES)}")
    if url.startswith("gs://"):
        import importlib.util

        missing = [m for m in ("fsspec", "gcsfs") if importlib.util.find_spec(m) is None]
        if missing and importlib.util.find_spec("tensorflow") is None:
            raise MissingDependencyError(f"{url} is on Google Cloud Storage, which needs {' and '.join(missing)}: "
                                         f"{GCS_EXTRA}")


def file_sha256(path: str) -> str:
    """The sha256 hex digest of a local file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

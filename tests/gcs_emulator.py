"""A real local Google Cloud Storage server for `gs://` tests (no mocks); see docs/GCS_TESTING.md.

`gcs_bucket` (session fixture) starts `gcp-storage-emulator` (PyPI, pure Python, GCS JSON API) in a subprocess on
127.0.0.1 with a free port and an in-memory store, creates a bucket, and yields `(bucket_url, env)`:

* `bucket_url`: `"gs://flax-gpt2-test"`;
* `env`: the environment variables that point every client at the emulator (etils `epath` -> fsspec/gcsfs,
  tensorstore's GCS driver used by orbax for arrays). They are also set in `os.environ` for the session (and
  restored afterwards); pass `{**os.environ, **env}` to subprocesses explicitly if you build their env yourself.

`gcs_workdir` (function fixture) gives a fresh `gs://.../<test-name>-<uuid>` prefix in that bucket.

Use from a test module with `from gcs_emulator import gcs_bucket, gcs_workdir  # noqa: F401` (tests/ is on
sys.path), or add `pytest_plugins = ["gcs_emulator"]` to tests/conftest.py.

If `gcp_storage_emulator` is not importable, the fixture pip-installs it into a temporary `--target` folder
(the emulator runs in its own process, so the test environment is untouched); only if that fails too is the
test skipped, with the reason. Set `GCS_EMULATOR_NO_INSTALL=1` to skip instead of installing.

Run as a script (`python tests/gcs_emulator.py BUCKET`) this file is the emulator launcher: it adds the bits the
stock emulator lacks (see `_patch_emulator`), serves on 127.0.0.1:<free port>, prints the port on stdout, and
stops when its stdin closes or on SIGTERM.
"""

from __future__ import annotations

import importlib.util
import os
import select
import subprocess
import sys
import uuid
from pathlib import Path

BUCKET = "flax-gpt2-test"
EMULATOR_PACKAGE = "gcp-storage-emulator"
_START_TIMEOUT_S = 60
_INSTALL_TIMEOUT_S = 300


def emulator_env(port: int) -> dict[str, str]:
    """Environment that sends gcsfs/fsspec (epath) and tensorstore (orbax arrays) to the emulator on `port`."""
    url = f"http://127.0.0.1:{port}"
    return {
        # gcsfs: endpoint (read at every request).
        "STORAGE_EMULATOR_HOST": url,
        # fsspec config -> GCSFileSystem(token="anon"): no ADC / GCE-metadata probing. fsspec reads FSSPEC_* at
        # import time, so the fixture also patches `fsspec.config.conf` in-process.
        "FSSPEC_GS_TOKEN": "anon",
        "NO_GCE_CHECK": "true",
        # gcsfs >= 2025.x wraps GCSFileSystem in ExtendedGcsFileSystem, which asks the gRPC Storage Control API
        # for the bucket layout (TLS to the emulator port: retries for ~60 s, then falls back). Off. Read at
        # `import gcsfs`; in-process the fixture registers the plain class.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # tensorstore's `gcs` kvstore (orbax array writes/reads): it ignores STORAGE_EMULATOR_HOST.
        "TENSORSTORE_GCS_HTTP_URL": url,
        # tensorstore auth: send this fixed bearer token instead of looking for ADC / GCE metadata.
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token",
    }


# --------------------------------------------------------------------------------------------------------------
# Launcher (runs in the emulator subprocess)
# --------------------------------------------------------------------------------------------------------------


def _patch_emulator():
    """Adds to gcp-storage-emulator what gcsfs / tensorstore rely on and the stock server lacks.

    * `POST .../o/{src}/moveTo/o/{dst}` (gcsfs `mv` of one object; unpatched it gets 501, which gcsfs retries with
      backoff for ~30 s before falling back to copy + delete).
    * Generation preconditions `ifGenerationMatch` / `ifGenerationNotMatch` on uploads, reads and deletes (412 /
      304 like GCS). Stock, they are ignored, so tensorstore's conditional writes (OCDBT manifests) always
      succeed; with this a lost-update bug would fail the test like on real GCS.
    * `x-goog-generation` / `x-goog-metageneration` headers on media downloads, as GCS sends them.
    * A larger listen backlog (the server is single-threaded, tensorstore opens many connections at once).
    """
    import time
    from http import HTTPStatus
    from http import server as http_server

    from gcp_storage_emulator import server as srv
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def current_generation(storage, bucket, name) -> str:
        try:
            return str(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return "0"

    def object_name(request):
        name = (request.params or {}).get("object_id")
        if name is None and "name" in request.query:
            name = request.query["name"][0]
        if name is None and request.method == "POST":
            data = request.data
            if isinstance(data, dict):
                name = (data.get("meta") or {}).get("name") or data.get("name")
        return name

    def with_preconditions(handler, is_read):
        def wrapped(request, response, storage, *args, **kwargs):
            match = request.query.get("ifGenerationMatch", [None])[0]
            not_match = request.query.get("ifGenerationNotMatch", [None])[0]
            if (match is not None or not_match is not None) and "upload_id" not in request.query:
                if request.method != "GET":
                    request.data  # read the body even if we refuse: closing with unread data resets the socket
                name = object_name(request)
                gen = None if name is None else current_generation(storage, request.params["bucket_name"], name)
                if gen is not None and not (is_read and gen == "0"):  # reading a missing object: plain 404
                    if match is not None and gen != str(match):
                        response.status = HTTPStatus.PRECONDITION_FAILED
                        response.json({"error": {"code": 412, "message": "Precondition Failed"}})
                        return
                    if not_match is not None and gen == str(not_match):
                        if is_read:
                            response.status = HTTPStatus.NOT_MODIFIED
                        else:
                            response.status = HTTPStatus.PRECONDITION_FAILED
                            response.json({"error": {"code": 412, "message": "Precondition Failed"}})
                        return
            return handler(request, response, storage, *args, **kwargs)

        return wrapped

    original_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        original_download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            try:
                obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            except NotFound:
                return
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    objects.download = download  # `objects.get` (alt=media) calls the module-level name

    def move(request, response, storage, *args, **kwargs):
        bucket, src, dst = request.params["bucket_name"], request.params["object_id"], request.params["dest_object_id"]
        try:
            src_obj = storage.get_file_obj(bucket, src)
            content = storage.get_file(bucket, src)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        gen = str(time.time_ns())
        obj = dict(src_obj, name=dst, id=f"{bucket}/{dst}/{gen}", selfLink=f"/storage/v1/b/{bucket}/o/{dst}",
                   generation=gen, metageneration="1",
                   mediaLink=f"{request.base_url}/download/storage/v1/b/{bucket}/o/{dst}?generation={gen}&alt=media")
        storage.create_file(bucket, dst, content, obj)
        storage.delete_file(bucket, src)
        response.json(obj)

    reads = {objects.get, download, original_download}
    patched = []
    for regex, handlers in srv.HANDLERS:
        new = {}
        for method, handler in handlers.items():
            if handler is original_download:
                handler = download
            if handler in (objects.get, download, objects.insert, objects.delete, objects.patch):
                handler = with_preconditions(handler, is_read=handler in reads)
            new[method] = handler
        patched.append((regex, new))
    bucket_re = r"(?P<bucket_name>[-.\w]+)"
    move_route = (rf"^(?:/storage/v1)?/b/{bucket_re}/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
                  {"POST": move})
    srv.HANDLERS = (move_route, *patched)
    http_server.HTTPServer.request_queue_size = 512


def _serve(bucket: str) -> None:
    import logging
    import signal
    import threading

    logging.basicConfig(level=logging.INFO if os.environ.get("GCS_EMULATOR_VERBOSE") else logging.CRITICAL)
    _patch_emulator()
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(server._api._httpd.server_address[1], flush=True)
    stop.wait()
    server.stop()


# --------------------------------------------------------------------------------------------------------------
# Fixture side
# --------------------------------------------------------------------------------------------------------------


class EmulatorUnavailable(Exception):
    pass


def _emulator_pythonpath(install_dir: Path) -> str | None:
    """'' if the emulator is importable here, a folder to put on PYTHONPATH after installing it there."""
    if importlib.util.find_spec("gcp_storage_emulator") is not None:
        return ""
    if (install_dir / "gcp_storage_emulator").is_dir():
        return str(install_dir)
    if os.environ.get("GCS_EMULATOR_NO_INSTALL"):
        raise EmulatorUnavailable(f"{EMULATOR_PACKAGE} is not installed (and GCS_EMULATOR_NO_INSTALL is set)")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
           "--target", str(install_dir), EMULATOR_PACKAGE]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EmulatorUnavailable(f"{EMULATOR_PACKAGE} is not installed and `pip install` failed: {e}") from e
    if done.returncode != 0 or not (install_dir / "gcp_storage_emulator").is_dir():
        raise EmulatorUnavailable(f"{EMULATOR_PACKAGE} is not installed and `pip install --target` failed "
                                  f"(rc={done.returncode}): {done.stderr.strip()[-800:]}")
    return str(install_dir)


class Emulator:
    """The emulator subprocess; `start()` returns the port."""

    def __init__(self, bucket: str, workdir: Path, pythonpath: str = ""):
        self.bucket, self.workdir, self.pythonpath = bucket, workdir, pythonpath
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "gcs_emulator.log"

    def start(self) -> int:
        env = dict(os.environ)
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (self.pythonpath, env.get("PYTHONPATH")) if p)
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), self.bucket], cwd=self.workdir,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file)
        ready, _, _ = select.select([self.proc.stdout], [], [], _START_TIMEOUT_S)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"GCS emulator did not start (no port within {_START_TIMEOUT_S} s); log:\n"
                               + self.log.read_text(errors="replace")[-3000:])
        return int(line)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()  # the launcher stops on stdin EOF
            self.proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            self.proc.stdout.close()
            self._log_file.close()
            self.proc = None


def _reset_fsspec_gcs() -> None:
    """Forget cached gs:// filesystems (epath caches one per process; fsspec caches instances)."""
    try:
        from etils.epath import backend

        backend.fsspec_backend._get_filesystem.cache_clear()
    except (ImportError, AttributeError):
        pass
    if "gcsfs" in sys.modules:
        import gcsfs

        gcsfs.core.GCSFileSystem.clear_instance_cache()
        gcsfs.GCSFileSystem.clear_instance_cache()


def _fsspec_registry() -> dict:
    """fsspec's mutable registry of filesystem classes (`fsspec.registry` itself is a read-only view)."""
    import importlib

    return importlib.import_module("fsspec.registry")._registry


class _InProcessEnv:
    """Applies `env` to this process (os.environ + fsspec config + gcsfs class), undone by `restore()`."""

    def __init__(self, env: dict[str, str]):
        import fsspec.config

        registry = _fsspec_registry()
        self._old_environ = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self._old_conf = fsspec.config.conf.get("gs")
        fsspec.config.conf["gs"] = {**(self._old_conf or {}), "token": "anon"}
        self._old_registry = {p: registry.get(p) for p in ("gs", "gcs")}
        import gcsfs.core

        for p in ("gs", "gcs"):  # the plain class even if `gcsfs` was imported before the env var was set
            registry[p] = gcsfs.core.GCSFileSystem
        _reset_fsspec_gcs()

    def restore(self) -> None:
        import fsspec.config

        registry = _fsspec_registry()
        for k, v in self._old_environ.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._old_conf is None:
            fsspec.config.conf.pop("gs", None)
        else:
            fsspec.config.conf["gs"] = self._old_conf
        for p, cls in self._old_registry.items():
            if cls is None:
                registry.pop(p, None)
            else:
                registry[p] = cls
        _reset_fsspec_gcs()


try:
    import pytest
except ImportError:  # the launcher does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def gcs_bucket(tmp_path_factory):
        """`(bucket_url, env)` of a bucket on a local GCS emulator; env also applied to os.environ meanwhile."""
        if importlib.util.find_spec("gcsfs") is None:
            pytest.skip("gcsfs is not installed: gs:// paths need it (pip install 'flax_gpt2[gcs]')")
        workdir = tmp_path_factory.mktemp("gcs_emulator")
        try:
            pythonpath = _emulator_pythonpath(tmp_path_factory.getbasetemp() / "gcs_emulator_pkg")
        except EmulatorUnavailable as e:
            pytest.skip(str(e))
        emulator = Emulator(BUCKET, workdir, pythonpath)
        env = emulator_env(emulator.start())
        applied = None
        try:
            applied = _InProcessEnv(env)
            yield f"gs://{BUCKET}", env
        finally:
            if applied is not None:
                applied.restore()
            emulator.stop()

    @pytest.fixture
    def gcs_workdir(gcs_bucket, request) -> str:
        """A fresh `gs://` prefix for one test (the emulator and its bucket are shared by the session)."""
        name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:60]
        return f"{gcs_bucket[0]}/{name}-{uuid.uuid4().hex[:8]}"


if __name__ == "__main__":
    _serve(sys.argv[1] if len(sys.argv) > 1 else BUCKET)

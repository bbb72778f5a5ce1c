"""Smoke tests of `gs://` I/O against a real local GCS server (tests/gcs_emulator.py; docs/GCS_TESTING.md).

They check the plumbing the training code relies on: etils `epath` (fsspec + gcsfs), orbax checkpoints (gcsfs for
files + tensorstore's GCS driver for arrays) in-process, and the same from a subprocess that inherits the env.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from gcs_emulator import gcs_bucket, gcs_workdir  # noqa: F401  (fixtures)


def test_env_points_at_local_emulator(gcs_bucket):
    bucket_url, env = gcs_bucket
    assert bucket_url.startswith("gs://")
    for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"):
        assert env[key].startswith("http://127.0.0.1:")
        assert os.environ[key] == env[key]


def test_epath_roundtrip(gcs_workdir):
    root = epath.Path(gcs_workdir)
    assert not root.exists()
    (root / "sub").mkdir(parents=True, exist_ok=True)
    f = root / "a" / "b.txt"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("héllo")
    assert f.exists() and f.is_file() and f.read_text() == "héllo"
    (root / "blob.bin").write_bytes(b"\x00\x01\x02")
    assert (root / "blob.bin").read_bytes() == b"\x00\x01\x02"
    assert root.is_dir()
    assert sorted(p.name for p in root.iterdir()) == ["a", "blob.bin"]  # empty "sub" is not an object on GCS
    assert [p.name for p in root.glob("a/*.txt")] == ["b.txt"]
    with (root / "c.json").open("w") as fp:
        fp.write('{"x": 1}')
    f.rename(root / "a" / "moved.txt")  # gcsfs: objects.moveTo
    assert not f.exists() and (root / "a" / "moved.txt").read_text() == "héllo"
    (root / "a").rename(root / "a2")  # a "directory": copy + delete of each object
    assert (root / "a2" / "moved.txt").read_text() == "héllo" and not (root / "a").exists()
    root.rmtree()
    assert not root.exists()


def test_tensorstore_conditional_writes(gcs_workdir):
    """The emulator honours generation preconditions like GCS (tensorstore/OCDBT rely on them)."""
    import tensorstore as ts

    bucket, _, prefix = gcs_workdir.removeprefix("gs://").partition("/")
    kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": prefix + "/kv/"}).result()
    first = kv.write("k", b"one").result().generation
    assert first  # stored
    assert kv.read("k").result().value == b"one"
    assert kv.read("k", if_not_equal=first).result().state == "unspecified"  # 304: unchanged
    second = kv.write("k", b"two", if_equal=first).result().generation
    assert second and second != first
    assert kv.write("k", b"stale", if_equal=first).result().generation == b""  # 412: refused
    assert kv.read("k").result().value == b"two"
    assert epath.Path(gcs_workdir, "kv", "k").read_bytes() == b"two"  # same object through gcsfs


def _tree(offset):
    return {"w": jnp.arange(12.0).reshape(3, 4) + offset, "b": {"x": jnp.full((5,), offset, jnp.int32)},
            "step": jnp.asarray(offset)}


def _save_steps(directory, steps):
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    with ocp.CheckpointManager(directory, options=options) as mngr:
        for step in steps:
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_tree(step)),
                                                    meta=ocp.args.JsonSave({"step": step})))
        mngr.wait_until_finished()
        return mngr.all_steps()


def _restore_latest(directory):
    with ocp.CheckpointManager(directory) as mngr:
        step = mngr.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(0))
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              meta=ocp.args.JsonRestore()))
        return step, restored


def _assert_tree_equal(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_orbax_checkpoint_manager(gcs_workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a gs:// path mistaken for a local one would land here
    directory = f"{gcs_workdir}/run/checkpoints"
    assert _save_steps(directory, [1, 2, 3]) == [2, 3]
    step, restored = _restore_latest(directory)
    assert step == 3 and restored["meta"] == {"step": 3}
    _assert_tree_equal(restored["state"], _tree(3))
    # epath's gs:// glob refuses "**"; list recursively with the fsspec filesystem instead.
    import fsspec

    prefix = directory.removeprefix("gs://") + "/"
    files = {f.removeprefix(prefix) for f in fsspec.filesystem("gs").find(directory)}
    assert "3/meta/metadata" in files and any(f.startswith("3/state/") and "ocdbt" in f for f in files), files
    assert not any(f.startswith("1/") for f in files)  # max_to_keep deleted step 1 on GCS
    assert list(tmp_path.iterdir()) == []


def test_subprocess_inherits_env(gcs_bucket, gcs_workdir, tmp_path):
    _, env = gcs_bucket
    directory = f"{gcs_workdir}/ckpt"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from etils import epath
        import test_gcs_emulator as t
        epath.Path({gcs_workdir!r}, "notes.txt").write_text("from child")
        print(t._save_steps({directory!r}, [7]))
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("[7]")
    assert epath.Path(gcs_workdir, "notes.txt").read_text() == "from child"
    step, restored = _restore_latest(directory)
    assert step == 7
    _assert_tree_equal(restored["state"], _tree(7))
    assert list(tmp_path.iterdir()) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))

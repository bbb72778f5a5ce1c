"""A full disk or a crash in the middle of a write leaves the previous files, never a half-written folder:
`save_pretrained`, `convert --overwrite`, `Tokenizer.save` and the sample CLI's conversion cache."""

import errno
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy
import torch

from flax_gpt2 import convert, from_pretrained, save_pretrained
from flax_gpt2.checkpoints import loading


def _failing_after(real_save):
    """A safetensors writer that writes half of its file, then fails with ENOSPC (as a full disk does)."""

    def save_file(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    return save_file


@pytest.fixture
def full_disk(monkeypatch):
    monkeypatch.setattr(safetensors.numpy, "save_file", _failing_after(safetensors.numpy.save_file))
    return monkeypatch


@pytest.fixture(scope="module")
def tiny(hf_tiny):
    model, params = from_pretrained(hf_tiny[1], progress=False)
    return model, params


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def scaled(params, factor):
    import jax

    return jax.tree.map(lambda x: x * factor, params)


def assert_loads(folder, params):
    _, loaded = from_pretrained(folder, progress=False)
    np.testing.assert_array_equal(loaded["transformer"]["wte"]["embedding"], params["transformer"]["wte"]["embedding"])


@pytest.mark.parametrize("old_shards", [False, True], ids=["single-file", "sharded"])
def test_save_pretrained_on_a_full_disk_keeps_the_old_folder(tiny, tmp_path, monkeypatch, old_shards):
    model, params = tiny
    out = tmp_path / "out"
    save_pretrained(out, model, params, tokenizer=False, progress=False,
                    max_shard_size="400KB" if old_shards else "50GB")
    before = snapshot(out)
    assert ("model.safetensors.index.json" in before) == old_shards

    monkeypatch.setattr(safetensors.numpy, "save_file", _failing_after(safetensors.numpy.save_file))
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(out, model, scaled(params, 2.0), tokenizer=False, overwrite=True, progress=False)
    assert snapshot(out) == before  # nothing replaced, nothing removed, no staging folder left
    assert_loads(out, params)

    monkeypatch.undo()
    save_pretrained(out, model, scaled(params, 2.0), tokenizer=False, overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert_loads(out, scaled(params, 2.0))  # the stale shards went once the new file was in place


def test_a_failed_save_into_a_new_folder_leaves_nothing(tiny, tmp_path, full_disk):
    model, params = tiny
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(tmp_path / "new", model, params, tokenizer=False, progress=False)
    assert not (tmp_path / "new").exists()


def test_convert_overwrite_on_a_full_disk_keeps_the_old_weights(hf_tiny, tmp_path, capsys, monkeypatch):
    """`convert --overwrite` used to delete the old weights first: a full disk left config and tokenizer
    files without model.safetensors."""
    src = tmp_path / "src"
    shutil.copytree(hf_tiny[1], src)
    out = tmp_path / "out"
    assert convert.main(["--model", str(src), "--out", str(out), "--no-progress"]) == 0
    before = snapshot(out)
    monkeypatch.setattr(safetensors.numpy, "save_file", _failing_after(safetensors.numpy.save_file))
    capsys.readouterr()
    assert convert.main(["--model", str(src), "--out", str(out), "--overwrite",
                         "--dtype", "bfloat16", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert snapshot(out) == before
    assert_loads(out, from_pretrained(src, progress=False)[1])


def test_convert_to_msgpack_on_a_full_disk_keeps_the_old_weights(hf_tiny, tmp_path, capsys, monkeypatch):
    """`--format msgpack --overwrite` over a safetensors folder: the msgpack writer fails half way, and the
    old safetensors (which the msgpack save would remove once complete) must still be there and load."""
    from flax_gpt2.checkpoints import formats as checkpoint_files

    out = tmp_path / "out"
    assert convert.main(["--model", str(hf_tiny[1]), "--out", str(out), "--no-progress"]) == 0
    before = snapshot(out)
    real_write = checkpoint_files.write_flax_msgpack

    def write_half(folder, tensors, **kwargs):
        names = real_write(folder, tensors, **kwargs)
        path = os.path.join(folder, names[0])
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(checkpoint_files, "write_flax_msgpack", write_half)
    capsys.readouterr()
    assert convert.main(["--model", str(hf_tiny[1]), "--out", str(out), "--format", "msgpack", "--overwrite",
                         "--no-progress"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert snapshot(out) == before
    assert_loads(out, from_pretrained(hf_tiny[1], progress=False)[1])


# --- the sample CLI's conversion cache --------------------------------------------------------------------


@pytest.fixture
def bin_folder(hf_tiny, tmp_path, monkeypatch):
    """A PyTorch .bin copy of the tiny model (so the sample CLI converts and caches it), with a private cache."""
    torch_model, folder = hf_tiny
    out = tmp_path / "bin_model"
    out.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(folder / name, out / name)
    torch.save(torch_model.state_dict(), out / "pytorch_model.bin")
    monkeypatch.setenv("FLAX_GPT2_CACHE", str(tmp_path / "cache"))
    return out


def _cached_entry(tmp_path):
    (entry,) = os.listdir(tmp_path / "cache" / "models")
    return tmp_path / "cache" / "models" / entry


@pytest.mark.parametrize("damage", ["truncated", "no-manifest", "garbage-same-size"])
def test_a_damaged_cache_entry_is_converted_again(bin_folder, tmp_path, tiny, damage):
    logs = []
    loading.load_model(str(bin_folder), progress=False, log=logs.append)
    entry = _cached_entry(tmp_path)
    weights = entry / "model.safetensors"
    if damage == "truncated":  # a crash before the data reached the disk
        with open(weights, "r+b") as f:
            f.truncate(100)
    elif damage == "no-manifest":  # an entry written by an older version, or cut short
        (entry / loading.CACHE_MANIFEST).unlink()
        with open(weights, "r+b") as f:
            f.truncate(100)
    else:  # the right size, unreadable content: caught when loading
        weights.write_bytes(b"\xff" * weights.stat().st_size)
    logs.clear()
    model, params, _ = loading.load_model(str(bin_folder), progress=False, log=logs.append)
    assert any("converting" in line and "again" in line for line in logs), logs
    np.testing.assert_array_equal(params["transformer"]["wte"]["embedding"],
                                  tiny[1]["transformer"]["wte"]["embedding"])
    assert _cached_entry(tmp_path) == entry and loading.cache_is_complete(str(entry))
    assert sorted(n for n in os.listdir(entry.parent) if n.startswith(".")) == []  # no staging left


def test_an_unwritable_cache_still_loads_the_model(bin_folder, tmp_path, tiny, full_disk):
    logs = []
    _, params, _ = loading.load_model(str(bin_folder), progress=False, log=logs.append)
    assert any(line.startswith("Could not cache") and "No space left" in line for line in logs), logs
    np.testing.assert_array_equal(params["transformer"]["wte"]["embedding"],
                                  tiny[1]["transformer"]["wte"]["embedding"])
    assert os.listdir(tmp_path / "cache" / "models") == []  # nothing half-written was published

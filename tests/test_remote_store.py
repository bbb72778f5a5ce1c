"""`data.remote_reads="range"` (train/remote_store.py): a tokenized corpus on a real local GCS server
(tests/gcs_emulator.py) read in place in bounded blocks equals the same corpus read locally, fetches only what
it is asked for, and names a damaged shard in one line."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import prompt_completion_jsonl
from gcs_emulator import gcs_bucket, gcs_workdir  # noqa: F401  (fixtures)


def _tokenize(tmp_path, shared_dir, name, recipe="text"):
    """A local corpus of ~20k tokens in shards of 3000 tokens (several shard boundaries)."""
    from flax_gpt2.train import tokenize_corpus as tc

    if recipe == "text":
        source = tmp_path / "plays.txt"
        source.write_text((shared_dir / "data" / "tinyshakespeare.txt").read_text()[:80_000])
    else:
        source = prompt_completion_jsonl(tmp_path / "sft.jsonl", 300, seed=0)
    folder = tmp_path / name
    tc.tokenize_corpus(str(source), str(folder), recipe=recipe, shard_tokens=3000, progress=False)
    return folder


def _upload(folder, url):
    from flax_gpt2.train import remote_store

    remote_store.upload(str(folder), url)
    return url


@pytest.mark.parametrize("recipe", ["text", "prompt_completion"])
def test_range_reads_equal_the_local_store(tmp_path, shared_dir, gcs_workdir, recipe):  # noqa: F811
    from flax_gpt2.train import data, remote_store

    folder = _tokenize(tmp_path, shared_dir, "corpus", recipe)
    local = data.TokenStore(str(folder))
    assert len(local.shards) >= 3
    block = 2048  # 1024 tokens: reads span blocks as well as shards
    remote = remote_store.RemoteTokenStore(_upload(folder, f"{gcs_workdir}/corpus"), cache_bytes=4 * block,
                                           block_bytes=block)
    assert len(remote) == len(local) and remote.identity() == local.identity() and remote.meta == local.meta
    assert (remote.masks is None) == (local.masks is None) == (recipe == "text")
    assert remote.cache.bytes_read == 0  # opening reads meta.json and a listing, no shard bytes
    rng = np.random.default_rng(0)
    spans = [(0, len(local)), (len(local) - 1, len(local)), (2999, 3001)]
    spans += [tuple(sorted(rng.integers(0, len(local) + 1, 2))) for _ in range(40)]
    for start, stop in spans:
        if start == stop:
            continue
        np.testing.assert_array_equal(remote.read(start, stop), local.read(start, stop))
        if local.masks is not None:
            np.testing.assert_array_equal(remote.read(start, stop, remote.masks), local.read(start, stop, local.masks))
        assert remote.cache.bytes_cached <= 4 * block  # the bound is in bytes (last blocks are short)
    # Training windows read through the same code path see the same packed ids.
    windows = [data.Windows(s, 0, len(s), 64, scored=s.masks is not None) for s in (local, remote)]
    ids = rng.permutation(windows[0].count)[:16]
    np.testing.assert_array_equal(windows[1].read(ids), windows[0].read(ids))


def test_bytes_fetched_are_those_of_the_rows_read(tmp_path, shared_dir, gcs_workdir):  # noqa: F811
    from flax_gpt2.train import remote_store

    folder = _tokenize(tmp_path, shared_dir, "corpus")
    url = _upload(folder, f"{gcs_workdir}/corpus")
    block = 1024
    store = remote_store.RemoteTokenStore(url, cache_bytes=1 << 20, block_bytes=block)
    store.read(100, 200)  # 200 bytes inside block 0 of shard 0
    assert (store.cache.blocks_read, store.cache.bytes_read) == (1, block)
    store.read(120, 180)  # cached
    assert store.cache.blocks_read == 1 and store.cache.hits >= 1
    store.read(2990, 3010)  # the end of shard 0 (3000 tokens = 6000 bytes: a short last block) and shard 1's start
    assert store.cache.blocks_read == 3 and store.cache.bytes_read == block + (6000 - 5 * block) + block
    # A tight cache keeps at most its bound and reads a dropped block again.
    small = remote_store.RemoteTokenStore(url, cache_bytes=2 * block, block_bytes=block)
    for start in range(0, 3 * 512, 512):
        small.read(start, start + 10)
    assert small.cache.blocks_cached == 2 and small.cache.bytes_cached == 2 * block
    small.read(0, 10)  # block 0 was the least recently used: dropped, fetched again
    assert small.cache.blocks_read == 4 and small.cache.bytes_read == 4 * block


def test_damaged_remote_shards_are_one_line_errors(tmp_path, shared_dir, gcs_workdir):  # noqa: F811
    from flax_gpt2.train import data, remote_store
    from flax_gpt2.utils import file_io

    folder = _tokenize(tmp_path, shared_dir, "corpus")
    meta = json.loads((folder / "meta.json").read_text())
    name = meta["shards"][1]["file"]

    short = tmp_path / "short"
    shutil.copytree(folder, short)
    with open(short / name, "r+b") as f:
        f.truncate(os.path.getsize(short / name) - 2)
    url = _upload(short, f"{gcs_workdir}/short")
    with pytest.raises(data.CorpusError, match=rf"{name} is 5998 bytes but .*meta.json gives it 3000 tokens") as e:
        remote_store.RemoteTokenStore(url, block_bytes=1024)
    assert "\n" not in str(e.value) and "tokenize" in str(e.value)

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tokens = np.fromfile(bad / name, np.uint16)
    tokens[1500] = 60000  # past GPT-2's 50257 ids: found when the block holding it is read
    tokens.tofile(bad / name)
    store = remote_store.RemoteTokenStore(_upload(bad, f"{gcs_workdir}/bad"), block_bytes=1024)
    store.read(3000, 3100)  # shard 1's first block is fine
    with pytest.raises(data.CorpusError, match=rf"{name} holds token id 60000.*near position 1500") as e:
        store.read(4400, 4600)
    assert "\n" not in str(e.value)

    # An object replaced by a shorter one after the store was opened: the block read comes back short.
    ok = _upload(folder, f"{gcs_workdir}/ok")
    live = remote_store.RemoteTokenStore(ok, block_bytes=1024)
    file_io.atomic_write(f"{ok}/{name}", (folder / name).read_bytes()[:3000])
    with pytest.raises(data.CorpusError, match=rf"{name} gave \d+ bytes .* changed or truncated"):
        live.read(3000 + 1600, 3000 + 1700)


def test_loss_mask_byte_past_one_is_an_error_when_read(tmp_path, shared_dir, gcs_workdir):  # noqa: F811
    from flax_gpt2.train import data, remote_store

    folder = _tokenize(tmp_path, shared_dir, "corpus", "prompt_completion")
    meta = json.loads((folder / "meta.json").read_text())
    name = meta["shards"][0]["mask_file"]
    mask = np.fromfile(folder / name, np.uint8)
    mask[700] = 7
    mask.tofile(folder / name)
    store = remote_store.RemoteTokenStore(_upload(folder, f"{gcs_workdir}/corpus"), block_bytes=512)
    store.read(0, 1000)  # the tokens are fine
    with pytest.raises(data.CorpusError, match=rf"{name} holds 7; a loss mask holds only 0 \(not scored\) and 1 "
                                               r"\(scored\): the corpus is damaged"):
        store.read(600, 800, store.masks)


def test_bad_remote_settings_are_config_errors():
    from flax_gpt2.configs import tiny
    from flax_gpt2.train import config_checks, remote_store

    for key, value, match in (("remote_reads", "copy", "'range'"), ("remote_cache_bytes", 1000, "1 MiB"),
                              ("remote_block_bytes", 4097, "even integer")):
        c = tiny.get_config()
        setattr(c.data, key, value)
        with pytest.raises(config_checks.ConfigValueError, match=match):
            config_checks.check_config(c)
    with pytest.raises(config_checks.ConfigValueError, match="remote_cache_bytes"):
        remote_store.BlockCache(100, 1024)


def test_a_batch_of_windows_fetches_its_blocks_in_one_round(tmp_path, shared_dir, gcs_workdir):  # noqa: F811
    """`Windows.read` asks for every block of the batch at once (`prefetch`); reading the rows then hits the cache,
    and the tokens equal the local store's."""
    from flax_gpt2.train import data, remote_store

    folder = _tokenize(tmp_path, shared_dir, "corpus", "prompt_completion")
    local = data.TokenStore(str(folder))
    remote = remote_store.RemoteTokenStore(_upload(folder, f"{gcs_workdir}/corpus"), block_bytes=512)
    ids = np.random.default_rng(1).permutation(data.Windows(local, 0, len(local), 32).count)[:24].reshape(4, 6)
    got = data.Windows(remote, 0, len(remote), 32, scored=True).read(ids)
    np.testing.assert_array_equal(got, data.Windows(local, 0, len(local), 32, scored=True).read(ids))
    fetched = remote.cache.blocks_read
    # One round for the ids' blocks, one for the mask's; each window of 33 tokens (66 bytes of ids, 33 of mask)
    # lies in one or two 512-byte blocks of each file; every row was then read from the cache.
    assert remote.cache.requests == 2 and fetched <= 24 * 4 and remote.cache.hits >= 2 * 24
    data.Windows(remote, 0, len(remote), 32, scored=True).read(ids)
    assert remote.cache.blocks_read == fetched and remote.cache.requests == 2  # all cached

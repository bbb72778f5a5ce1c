"""The small shared pieces in flax_gpt2/utils that every layer leans on."""

import math
import os

import numpy as np

from flax_gpt2.utils.cache_root import cache_root
from flax_gpt2.utils.file_io import file_sha256
from flax_gpt2.utils.validation import is_int, is_real


def test_cache_root_treats_an_empty_setting_as_unset(monkeypatch, tmp_path):
    """Was (train/data.py): `FLAX_GPT2_CACHE=` put the tokenized corpora in the current folder."""
    default = os.path.expanduser("~/.cache/flax_gpt2")
    for empty in ("", "   "):
        monkeypatch.setenv("FLAX_GPT2_CACHE", empty)
        assert cache_root() == default
    monkeypatch.delenv("FLAX_GPT2_CACHE")
    assert cache_root() == default
    monkeypatch.setenv("FLAX_GPT2_CACHE", str(tmp_path / "env"))
    assert cache_root() == str(tmp_path / "env")
    assert cache_root(tmp_path / "explicit") == str(tmp_path / "explicit")  # an argument wins


def test_validators_refuse_bools_and_non_finite_numbers():
    assert all(is_int(x) for x in (0, -3, 2**70, np.int32(5), np.uint64(7)))
    assert not any(is_int(x) for x in (True, np.bool_(False), 1.0, "1", None))
    assert all(is_real(x) for x in (0, 1.5, np.float32(2.5), np.int64(3), -1e300))
    assert not any(is_real(x) for x in (True, math.nan, math.inf, -math.inf, np.float32("nan"), "1.0", None))


def test_file_sha256_reads_in_blocks_and_equals_hashlib(tmp_path):
    import hashlib

    data = os.urandom((1 << 20) + 12345)  # more than one 1 MiB block
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(str(tmp_path / "empty")) == hashlib.sha256(b"").hexdigest()

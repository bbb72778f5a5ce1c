"""Corpus tokenization (text, jsonl, `datasets` files), the uint16 token store, and the deterministic,
resumable batch order."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from flax_gpt2.configs import base
from flax_gpt2.train import data, documents, tokenize_corpus as tc


@pytest.fixture(scope="module")
def encoding(bpe_dir):
    return tc.gpt2_encoding(str(bpe_dir))


def _write_store(folder, tokens, shard_tokens):
    """A token store holding `tokens`, cut into shards of `shard_tokens`."""
    os.makedirs(folder, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, len(tokens), shard_tokens)):
        part = np.asarray(tokens[start:start + shard_tokens], np.uint16)
        part.tofile(os.path.join(folder, f"tokens_{i:05d}.bin"))
        shards.append({"file": f"tokens_{i:05d}.bin", "num_tokens": len(part)})
    meta = {"format": 1, "dtype": "uint16", "num_tokens": len(tokens), "num_documents": 1, "eot_token": 50256,
            "vocab_size": 50257, "source": "test", "shards": shards}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return data.TokenStore(folder)


def _data_config(**overrides) -> ml_collections.ConfigDict:
    config = base.get_config().data
    config.update(overrides)
    return config


def _sharding():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data", None))


def test_split_text_encodes_like_the_whole(encoding, shared_dir):
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    tricky = "a\n\n\nb  \n  c\r\nd\n é\n\n😀x\nY\n" * 300
    for sample in (text, tricky):
        pieces = documents.split_text(sample, chunk_chars=1000)
        assert len(pieces) > 5 and "".join(pieces) == sample
        encoded = encoding.encode_ordinary_batch(pieces, num_threads=2)
        assert sum(encoded, []) == encoding.encode_ordinary(sample)


def test_tokenize_text_jsonl_and_parquet(tmp_path, bpe_dir, encoding):
    import datasets

    docs = ["First document.\nWith two lines.", "Second <|endoftext|> one, special text is plain text."]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("A whole text file\nis one document.\n")
    with open(tmp_path / "src" / "b.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    datasets.Dataset.from_dict({"text": ["from parquet"]}).to_parquet(str(tmp_path / "src" / "c.parquet"))
    meta = tc.tokenize_corpus(str(tmp_path / "src"), str(tmp_path / "out"), tokenizer=str(bpe_dir),
                              shard_tokens=7, progress=False)
    expected = []
    for doc in ["A whole text file\nis one document.\n", *docs, "from parquet"]:
        expected += encoding.encode_ordinary(doc) + [50256]
    store = data.TokenStore(str(tmp_path / "out"))
    assert meta["num_documents"] == 4 and len(store) == len(expected) and len(store.shards) > 3
    assert store.read(0, len(store)).tolist() == expected
    assert store.read(5, 23).tolist() == expected[5:23]  # crosses shard boundaries


def test_progress_counts_down_the_source_with_documents_and_tokens_per_second(tmp_path, bpe_dir, capsys):
    """A local text/jsonl source: the bar's total is its size (so tqdm shows an ETA), ending at 100%, with
    documents/s and tokens/s beside it; a source of unknown size (parquet) counts tokens instead."""
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(500):
            f.write(json.dumps({"text": f"document number {i} " * 20}) + "\n")
    size = os.path.getsize(tmp_path / "d.jsonl")
    tc.tokenize_corpus(str(tmp_path / "d.jsonl"), str(tmp_path / "out"), tokenizer=str(bpe_dir), progress=True)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in last and "docs/s" in last and "tokens/s" in last, last
    assert f"/{size / 1024:.0f}k" in last or f"/{size / 1024:.1f}k" in last, (size, last)
    assert tc.text_size(str(tmp_path / "d.jsonl")) == size
    import pandas as pd

    pd.DataFrame({"text": ["a parquet document"] * 3}).to_parquet(tmp_path / "p.parquet")
    assert tc.text_size(str(tmp_path / "p.parquet")) is None
    tc.tokenize_corpus(str(tmp_path / "p.parquet"), str(tmp_path / "out2"), tokenizer=str(bpe_dir), progress=True)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert " tokens" in last and "docs/s" in last and "%" not in last, last


def test_jsonl_missing_field_and_missing_files_are_clear_errors(tmp_path, bpe_dir):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match=r"d.jsonl:1 has no field 'text'"):
        tc.tokenize_corpus(str(tmp_path / "d.jsonl"), str(tmp_path / "o1"), tokenizer=str(bpe_dir), progress=False)
    assert not (tmp_path / "o1").exists()
    with pytest.raises(FileNotFoundError, match="data file not found"):
        tc.tokenize_corpus(str(tmp_path / "nope.txt"), str(tmp_path / "o2"), tokenizer=str(bpe_dir), progress=False)
    config = _data_config(source=str(tmp_path / "missing" / "corpus.txt"), cache_dir=str(tmp_path), num_threads=1)
    with pytest.raises(FileNotFoundError, match="corpus.txt"):
        data.load_tokens(config)
    config.source = "no-such-user/no-such-dataset-offline"
    with pytest.raises(FileNotFoundError, match="datasets.load_dataset could not load it"):
        data.load_tokens(config, progress=False)


def test_load_tokens_caches_the_tokenized_corpus(tmp_path, bpe_dir, encoding, monkeypatch):
    (tmp_path / "corpus.txt").write_text("some text to tokenize\n" * 50)
    config = _data_config(source=str(tmp_path / "corpus.txt"), cache_dir=str(tmp_path / "cache"),
                          tokenizer=str(bpe_dir), num_threads=1)
    first = data.load_tokens(config, progress=False)
    monkeypatch.setattr(tc, "tokenize_corpus", lambda *a, **k: pytest.fail("tokenized twice"))
    second = data.load_tokens(config, progress=False)
    assert second.folder == first.folder
    assert len(second) == len(first) == len(encoding.encode_ordinary("some text to tokenize\n" * 50)) + 1
    # a tokenized folder may also be given as the source
    config.source = first.folder
    assert data.load_tokens(config).folder == first.folder


def test_windows_pack_inputs_and_targets(tmp_path):
    store = _write_store(tmp_path / "s", np.arange(1000) % 50257, shard_tokens=300)
    windows = data.Windows(store, 100, 900, seq_len=10)
    assert windows.count == (800 - 1) // 10
    got = windows.read(np.array([[0, 3]]))
    assert got.shape == (1, 2, 11)
    assert got[0, 1].tolist() == list(range(130, 141))  # inputs 130..139, targets 131..140


def test_split_point_holds_out_the_tail(tmp_path):
    store = _write_store(tmp_path / "s", np.zeros(10_000), shard_tokens=4096)
    assert data.split_point(store, 0.1, seq_len=64) == 9000
    assert data.split_point(store, 0.001, seq_len=64) == 10_000 - 65  # at least one window
    assert data.split_point(store, 0.0, seq_len=64) == 10_000
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_point(store, 1.0, seq_len=64)


def test_batches_are_deterministic_resumable_and_cover_each_epoch(tmp_path):
    store = _write_store(tmp_path / "s", np.arange(5000) % 50257, shard_tokens=1024)
    windows = data.Windows(store, 0, len(store), seq_len=16)  # 312 windows
    make = lambda state=None: data.TrainBatches(windows, 24, 8, seed=3, sharding=_sharding(), state=state)  # noqa: E731
    batches = make()
    assert batches.batches_per_epoch == 13
    ids = [batches.next_window_ids() for _ in range(30)]
    assert all(i.shape == (3, 8) for i in ids)
    epoch0 = np.concatenate([i.reshape(-1) for i in ids[:13]])
    assert len(set(epoch0.tolist())) == 13 * 24  # no window twice in an epoch
    epoch1 = np.concatenate([i.reshape(-1) for i in ids[13:26]])
    assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
    # Resuming from a saved state continues the same sequence, across the epoch boundary.
    resumed = make()
    for _ in range(11):
        resumed.next_window_ids()
    saved = data.DataState(**json.loads(json.dumps(resumed.state.__dict__)))
    again = make(saved)
    for expected in ids[11:30]:
        np.testing.assert_array_equal(again.next_window_ids(), expected)
    # ... and the arrays hold those windows' tokens.
    batch = next(make())
    np.testing.assert_array_equal(np.asarray(batch), windows.read(ids[0]))
    # a different seed is a different order
    other = data.TrainBatches(windows, 24, 8, seed=4, sharding=_sharding())
    assert not np.array_equal(other.next_window_ids(), ids[0])


def test_too_little_data_is_a_clear_error(tmp_path):
    store = _write_store(tmp_path / "s", np.zeros(100), shard_tokens=100)
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.TrainBatches(data.Windows(store, 0, 100, seq_len=16), 8, 8, seed=0, sharding=_sharding())


def test_eval_batches_are_the_same_held_out_windows(tmp_path):
    store = _write_store(tmp_path / "s", np.arange(3000), shard_tokens=1000)
    windows = data.Windows(store, 2000, 3000, seq_len=10)
    first = data.eval_batches(windows, 4, 3, _sharding())
    second = data.eval_batches(windows, 4, 3, _sharding())
    assert len(first) == 3 and first[0].shape == (1, 4, 11)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(first[1])[0, 0, 0] == 2000 + 4 * 10

"""Hostile and broken inputs on the training-data path: corpus manifests (meta.json) that name files outside
their folder (local and on `gs://`, against the real GCS emulator), damaged or edited token caches, records
that are not text, a corpus tokenized over another one, a text file far larger than memory should allow,
and resumes whose data or length changed.

Command-line cases end with one error line naming the file or flag and the fix (exit 2 for a usage error, 1
for a runtime one, no traceback without --debug), as in test_cli_inputs.py. They run in-process through
`main(argv)`, the code path of `python -m ...`; a few run as real subprocesses.
"""

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_train_config
from gcs_emulator import gcs_bucket, gcs_workdir  # noqa: F401  (fixtures)

from flax_gpt2.utils import file_io
from flax_gpt2.train import data, run_guard
from flax_gpt2.train import documents, tokenize_corpus as tc

REPO = Path(__file__).resolve().parents[2]
VOCAB = 50257


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)


def _write_corpus(folder: Path, tokens, *, shard_tokens: int = 1 << 20, **meta_overrides) -> Path:
    """A corpus folder as tokenize_corpus writes it (no sha256), with `meta_overrides` written as given."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(tokens, np.uint16)
    shards = []
    for i, start in enumerate(range(0, len(tokens), shard_tokens)):
        part = tokens[start:start + shard_tokens]
        part.tofile(folder / f"tokens_{i:05d}.bin")
        shards.append({"file": f"tokens_{i:05d}.bin", "num_tokens": len(part)})
    meta = {"format": 1, "dtype": "uint16", "num_tokens": len(tokens), "num_documents": 1, "eot_token": VOCAB - 1,
            "vocab_size": VOCAB, "source": "test", "shards": shards, **meta_overrides}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _one_error_line(err: str, code: int, names: str) -> str:
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err, err[-3000:]
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]], f"expected one error line, last: {err[-3000:]}"
    assert names in lines[-1], f"{names!r} not named in: {lines[-1]}"
    if code == 1:
        assert "--debug" in lines[-1]
    return lines[-1]


def _tokenize_cli(argv, capsys, code: int = 0) -> tuple[str, str]:
    assert tc.main([*map(str, argv), "--no_progress"]) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def _train_cli(argv, capsys, code: int) -> tuple[str, str]:
    from flax_gpt2.train.__main__ import main

    assert main([*map(str, argv)]) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


# --- 1. manifests that name files outside their folder --------------------------------------------------------

UNSAFE_NAMES = ["{outside}", "../outside.bin", "a/../../outside.bin", "", None, 7]


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=["absolute", "dotdot", "nested-dotdot", "empty", "null",
                                                    "number"])
def test_a_local_corpus_never_reads_a_file_outside_its_folder(tmp_path, name):
    """Before, a shard named '/etc/hostname' was memory-mapped and trained on."""
    outside = tmp_path / "outside.bin"
    np.arange(8, dtype=np.uint16).tofile(outside)
    folder = _write_corpus(tmp_path / "corpus", np.arange(8))
    meta = json.loads((folder / "meta.json").read_text())
    meta["shards"][0]["file"] = name.format(outside=outside) if isinstance(name, str) else name
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(file_io.UnsafeManifestName, match=r"corpus/meta\.json: shards\[0\]\.file is"):
        data.TokenStore(str(folder))


def _unsafe_remote_corpus(url: str, name: str) -> None:
    """A corpus at `url` whose meta.json names `name` (an absolute local path or `..`) for its shard. For an
    absolute name the object the old mirror read (`url` + name) exists, so the old code wrote it out there."""
    if not name.startswith(".."):  # (an object name with `..` parts is refused by the server itself)
        file_io.atomic_write(file_io.join(url, name), np.arange(4, dtype=np.uint16).tobytes())
    meta = {"format": 1, "dtype": "uint16", "num_tokens": 4, "num_documents": 1, "eot_token": VOCAB - 1,
            "vocab_size": VOCAB, "source": "x", "shards": [{"file": name, "num_tokens": 4}]}
    file_io.atomic_write(file_io.join(url, "meta.json"), json.dumps(meta))


@pytest.mark.parametrize("where", ["source", "cache_dir"])
def test_a_gs_corpus_never_writes_outside_the_local_cache(gcs_workdir, tmp_path, monkeypatch, where):  # noqa: F811
    """A bucket's meta.json naming an absolute path or `..` is refused before any byte is written."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLAX_GPT2_CACHE", str(cache))
    config = tiny_train_config(tmp_path).data
    config.num_threads = 1
    if where == "source":
        url = f"{gcs_workdir}/corpus"
        config.source = url
    else:
        (tmp_path / "plays.txt").write_text("some words\n" * 20)
        config.source, config.cache_dir = str(tmp_path / "plays.txt"), f"{gcs_workdir}/token-cache"
        url = file_io.join(config.cache_dir, data._corpus_key(config))
    target = tmp_path / "elsewhere" / "written.bin"
    for name in (str(target), "../../escaped.bin"):
        _unsafe_remote_corpus(url, name)
        with pytest.raises(file_io.UnsafeManifestName, match=r"meta\.json: shards\[0\]\.file is"):
            data.load_tokens(config, progress=False)
    assert not target.exists() and not (tmp_path / "elsewhere").exists()
    assert not list(tmp_path.rglob("escaped.bin")) and not list(cache.rglob("*.bin"))


# --- 9 and 14: damaged or edited token caches ------------------------------------------------------------------

def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


DAMAGED = {
    # a cache meta.json whose num_tokens shrank: before, a quarter of the data was used, silently
    "num-tokens-shrank": (lambda f: _edit_meta(f, lambda m: m.update(num_tokens=m["num_tokens"] // 4)),
                          r"meta\.json says num_tokens=\d+ but its shards hold 4000 tokens", "meta.json"),
    "shard-count-shrank": (lambda f: _edit_meta(f, lambda m: (m.update(num_tokens=1000),
                                                              m["shards"][0].update(num_tokens=1000))),
                           r"tokens_00000\.bin is 8000 bytes \(4000 tokens\) but .*meta\.json says 1000",
                           "tokens_00000.bin"),
    "shard-truncated": (lambda f: os.truncate(f / "tokens_00000.bin", 1001),
                        r"tokens_00000\.bin is 1001 bytes \(500 tokens\) but .*says 4000: the corpus is damaged",
                        "tokens_00000.bin"),
    "shard-missing": (lambda f: (f / "tokens_00000.bin").unlink(), r"tokens_00000\.bin is missing", "tokens_00000.bin"),
    "meta-not-json": (lambda f: (f / "meta.json").write_text('{"shards": ['), r"meta\.json is not valid JSON",
                      "meta.json"),
    "meta-binary": (lambda f: (f / "meta.json").write_bytes(b"\xff\xfe\x00garbage"), r"meta\.json is not valid JSON",
                    "meta.json"),
    "meta-a-list": (lambda f: (f / "meta.json").write_text("[1, 2]"), r"meta\.json does not hold a JSON object",
                    "meta.json"),
    "meta-no-shards": (lambda f: _edit_meta(f, lambda m: m.pop("shards")), r"meta\.json has no list of shards",
                       "meta.json"),
    "shard-count-a-string": (lambda f: _edit_meta(f, lambda m: m["shards"][0].update(num_tokens="4000")),
                             r"meta\.json has shards\[0\]", "meta.json"),
    "vocab-too-large": (lambda f: _edit_meta(f, lambda m: m.update(vocab_size=1 << 20)),
                        r"vocab_size=1048576, not a count of at most 65536", "meta.json"),
    # ids past the vocabulary: before, the run stopped on a NaN loss and blamed the learning rate
    "id-past-vocab": (lambda f: _poke(f / "tokens_00000.bin", 3210, 60000),
                      r"tokens_00000\.bin holds token id 60000 at position 3210, past the vocabulary of 50257",
                      "tokens_00000.bin"),
}


def _poke(path: Path, index: int, value: int) -> None:
    tokens = np.fromfile(path, np.uint16)
    tokens[index] = value
    tokens.tofile(path)


@pytest.mark.parametrize("case", DAMAGED, ids=list(DAMAGED))
def test_a_damaged_corpus_is_an_error_naming_the_file_and_the_fix(tmp_path, case):
    damage, match, _ = DAMAGED[case]
    folder = _write_corpus(tmp_path / "corpus", np.arange(4000) % 1000)
    damage(folder)
    with pytest.raises(data.CorpusError, match=match) as e:
        data.TokenStore(str(folder))
    assert "tokenize_corpus SOURCE " + str(folder) + " --overwrite" in str(e.value)


def test_a_damaged_cache_says_to_delete_it_from_the_training_command_line(tmp_path, shared_dir, capsys):
    """Through `python -m train`: one line that names the cache file and says how to get a good cache."""
    (tmp_path / "plays.txt").write_text((shared_dir / "data" / "tinyshakespeare.txt").read_text()[:20_000])
    argv = ["--config", REPO / "configs" / "tiny.py", "--workdir", tmp_path / "run", "--config.steps=1",
            f"--config.data.source={tmp_path / 'plays.txt'}", f"--config.data.cache_dir={tmp_path / 'cache'}",
            f"--config.data.tokenizer={shared_dir / 'gpt2-bpe'}", "--config.progress_bar=False"]
    config = tiny_train_config(tmp_path / "cache", **{"data.source": str(tmp_path / "plays.txt"),
                                                      "data.tokenizer": str(shared_dir / "gpt2-bpe")}).data
    store = data.load_tokens(config, progress=False)
    _poke(Path(store.folder) / "tokens_00000.bin", 17, 50300)
    _, err = _train_cli(argv, capsys, 1)
    line = _one_error_line(err, 1, f"{store.folder}/tokens_00000.bin holds token id 50300")
    assert f"delete the cache folder {store.folder}" in line
    # A folder in the cache's place that holds files but no meta.json (before: "Directory not empty").
    shutil.rmtree(store.folder)
    os.makedirs(store.folder)
    Path(store.folder, "notes.txt").write_text("mine")
    _, err = _train_cli(argv, capsys, 1)
    line = _one_error_line(err, 1, f"{store.folder} holds files but no meta.json")
    assert "delete it" in line and Path(store.folder, "notes.txt").read_text() == "mine"


# --- 13 and 14: sources that are not text ---------------------------------------------------------------------

BAD_SOURCES = {
    "jsonl-text-null": ("d.jsonl", '{"text": "fine"}\n{"text": null}\n', "d.jsonl:2: field 'text' is null"),
    "jsonl-text-number": ("d.jsonl", '{"text": 3.5}\n', "d.jsonl:1: field 'text' is a number (3.5)"),
    "jsonl-text-list": ("d.jsonl", '{"text": ["a", "b"]}\n', "d.jsonl:1: field 'text' is a list"),
    "jsonl-line-a-list": ("d.jsonl", '["text"]\n', "d.jsonl:1 holds a list, not a JSON object"),
    "jsonl-line-a-number": ("d.jsonl", '{"text": "x"}\n42\n', "d.jsonl:2 holds a number (42), not a JSON object"),
    "text-binary": ("blob.txt", b"PK\x03\x04\x14\x00\x08\x08\xff\xfe\x00\x00", "blob.txt is not UTF-8 text"),
    "jsonl-binary": ("d.jsonl", b'{"text": "caf\xe9"}\n', "d.jsonl is not UTF-8 text"),
    "text-empty": ("empty.txt", "", "has no text (1 empty documents)"),
    "jsonl-all-empty": ("d.jsonl", '{"text": ""}\n{"text": ""}\n', "has no text (2 empty documents)"),
}


@pytest.mark.parametrize("case", BAD_SOURCES, ids=list(BAD_SOURCES))
def test_a_source_that_is_not_text_is_one_line(tmp_path, bpe_dir, capsys, case):
    name, content, names = BAD_SOURCES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    _, err = _tokenize_cli([path, tmp_path / "out", "--tokenizer", bpe_dir], capsys, code=1)
    _one_error_line(err, 1, names)
    assert not (tmp_path / "out").exists()


def test_recipe_fields_that_are_not_text_are_one_line(tmp_path, bpe_dir, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"concepts": ["dog", 3], "target": "A dog."}) + "\n")
    _, err = _tokenize_cli([path, tmp_path / "out", "--recipe", "commongen", "--tokenizer", bpe_dir], capsys, 1)
    _one_error_line(err, 1, "c.jsonl:1: field 'concepts' must be a string or a list of strings")
    path.write_text(json.dumps({"question": "q", "answers": {"text": None}}) + "\n")
    _, err = _tokenize_cli([path, tmp_path / "out", "--recipe", "eli5", "--tokenizer", bpe_dir], capsys, 1)
    _one_error_line(err, 1, "c.jsonl:1: an ELI5 record needs 'answers'")
    path.write_text(json.dumps({"answers": {"text": ["fine", None]}}) + "\n")
    _, err = _tokenize_cli([path, tmp_path / "out", "--recipe", "eli5", "--tokenizer", bpe_dir], capsys, 1)
    _one_error_line(err, 1, "field 'answers' must be a string or a list of strings")
    assert not (tmp_path / "out").exists()


# --- 8. tokenizing into a folder that holds something else ----------------------------------------------------

def test_tokenizing_into_a_folder_that_holds_another_corpus(tmp_path, bpe_dir, capsys):
    """Before, the command printed success and kept the old corpus."""
    encoding = tc.gpt2_encoding(str(bpe_dir))
    (tmp_path / "a.txt").write_text("The first corpus.\n" * 50)
    (tmp_path / "b.txt").write_text("Another text, quite different.\n" * 80)
    out = tmp_path / "out"
    _tokenize_cli([tmp_path / "a.txt", out, "--tokenizer", bpe_dir, "--num_threads", "1"], capsys)
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    _, err = _tokenize_cli([tmp_path / "b.txt", out, "--tokenizer", bpe_dir], capsys, code=2)
    line = _one_error_line(err, 2, str(out))
    assert "holds another tokenized corpus" in line and "--overwrite" in line
    assert _snapshot(out) == before
    # The same corpus again: said so, nothing redone.
    stdout, _ = _tokenize_cli([tmp_path / "a.txt", out, "--tokenizer", bpe_dir], capsys)
    assert "already holds this corpus" in stdout and _snapshot(out) == before
    # --overwrite replaces the corpus files and keeps the user's.
    stdout, _ = _tokenize_cli([tmp_path / "b.txt", out, "--tokenizer", bpe_dir, "--overwrite"], capsys)
    store = data.TokenStore(str(out))
    assert store.read(0, len(store)).tolist() == encoding.encode_ordinary((tmp_path / "b.txt").read_text()) + [
        encoding.eot_token]
    assert (out / "notes.txt").read_text() == "mine" and store.meta["source"] == str(tmp_path / "b.txt")
    # A folder with other files and no corpus.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("mine")
    _, err = _tokenize_cli([tmp_path / "a.txt", tmp_path / "mine", "--tokenizer", bpe_dir], capsys, code=2)
    assert "is not empty and holds no tokenized corpus" in _one_error_line(err, 2, str(tmp_path / "mine"))


def test_overwrite_removes_the_old_corpus_shards_only(tmp_path, bpe_dir):
    (tmp_path / "big.txt").write_text("word " * 3000)
    (tmp_path / "small.txt").write_text("tiny text")
    out = tmp_path / "out"
    old = tc.tokenize_corpus(str(tmp_path / "big.txt"), str(out), tokenizer=str(bpe_dir), shard_tokens=1000,
                             progress=False)
    assert len(old["shards"]) == 4
    (out / "tokens_keep.bin").write_bytes(b"not listed")
    new = tc.tokenize_corpus(str(tmp_path / "small.txt"), str(out), tokenizer=str(bpe_dir), shard_tokens=1000,
                             progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokens_00000.bin", "tokens_keep.bin"]
    assert len(data.TokenStore(str(out))) == new["num_tokens"] == 3


def test_the_real_tokenize_command_line(tmp_path, bpe_dir):
    """`python -m flax_gpt2.train.tokenize_corpus`: a null text and a taken OUT_DIR, with and without --debug."""
    (tmp_path / "d.jsonl").write_text('{"text": null}\n')
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    (tmp_path / "a.txt").write_text("text")
    for args, code, names in [([tmp_path / "d.jsonl", tmp_path / "o"], 1, "d.jsonl:1: field 'text' is null"),
                              ([tmp_path / "a.txt", tmp_path / "taken"], 2, "--overwrite")]:
        for debug in (False, True) if code == 1 else (False,):  # (--debug shows a usage error's traceback too)
            command = [sys.executable, "-m", "flax_gpt2.train.tokenize_corpus", *map(str, args), "--tokenizer",
                       str(bpe_dir), "--no_progress", *(["--debug"] if debug else [])]
            proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
            assert proc.returncode == code, proc.stderr[-3000:]
            if debug and code == 1:
                assert "Traceback" in proc.stderr and names in proc.stderr
            else:
                _one_error_line(proc.stderr, code, names)


# --- 11. a large text file is read in chunks --------------------------------------------------------------------

def _tricky_text(rng: random.Random, n: int) -> str:
    """Text where every kind of whitespace run, multi-byte character and contraction meets a possible cut."""
    atoms = ["word", "Word", " ", "  ", "\n", "\n\n", "\t", " \n", "\n ", "'s", "'ll", "é", "日本", "😀", "42", "3.5",
             "!", "...", "\r\n", "\u00a0", "\u2028", "\x1c", "\x85", "x\ny", "a b", " 's"]
    return "".join(rng.choice(atoms) for _ in range(n))


def test_text_pieces_encode_like_the_whole(bpe_dir):
    """The streaming reader's cuts, many per text: the pieces' encodings concatenate to the whole's."""
    encoding = tc.gpt2_encoding(str(bpe_dir))
    rng = random.Random(0)
    for trial in range(40):
        text = _tricky_text(rng, rng.randrange(50, 3000))
        pieces = list(documents.text_pieces(io.StringIO(text), chunk_chars=rng.choice([1, 2, 7, 33, 200])))
        assert "".join(pieces) == text
        assert sum(encoding.encode_ordinary_batch(pieces, num_threads=1), []) == encoding.encode_ordinary(text), trial


def test_a_text_file_larger_than_a_chunk_tokenizes_as_one_piece(tmp_path, bpe_dir, shared_dir):
    """The same token stream as encoding the whole file at once, as the tokenizer did before."""
    encoding = tc.gpt2_encoding(str(bpe_dir))
    plays = (shared_dir / "data" / "tinyshakespeare.txt").read_text()
    text = plays + _tricky_text(random.Random(1), 20_000) + plays + "x" * 50_000 + plays[:300_000]
    assert len(text) > 2 * documents.CHUNK_CHARS
    (tmp_path / "big.txt").write_text(text)
    tc.tokenize_corpus(str(tmp_path / "big.txt"), str(tmp_path / "out"), tokenizer=str(bpe_dir), progress=False)
    store = data.TokenStore(str(tmp_path / "out"))
    with open(tmp_path / "big.txt", encoding="utf-8") as f:  # (universal newlines, as a text source is read)
        expected = encoding.encode_ordinary(f.read()) + [encoding.eot_token]
    assert store.read(0, len(store)).tolist() == expected


_PEAK_SCRIPT = """
import sys
from flax_gpt2.train import documents, tokenize_corpus as tc
def mib(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) / 1024
documents.CHUNK_CHARS, documents.BATCH_CHARS = 1 << 16, 1 << 18  # the same code path, at a scale a test affords
encoding = tc.gpt2_encoding(sys.argv[3])
encoding.encode_ordinary_batch(["warm up the encoder " * 1000], num_threads=1)
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here, not from loading
before = mib("VmRSS:")
tc.tokenize_corpus(sys.argv[1], sys.argv[2], tokenizer=sys.argv[3], num_threads=1, progress=False)
print(mib("VmHWM:") - before)
"""


def test_tokenizing_a_text_file_takes_bounded_memory(tmp_path, bpe_dir, shared_dir):
    """Before, a text file was encoded in one piece at ~14x its size (103 MB -> 1.5 GiB)."""
    plays = (shared_dir / "data" / "tinyshakespeare.txt").read_text()
    with open(tmp_path / "big.txt", "w") as f:
        for _ in range(8):  # 8.9 MB: measured +106 MiB when encoded in one piece, +37 MiB in chunks
            f.write(plays)
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "big.txt"), str(tmp_path / "out"),
                           str(bpe_dir)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grew_mib = float(proc.stdout.split()[-1])
    assert grew_mib < 64, f"peak memory grew by {grew_mib:.0f} MiB while tokenizing an 8.9 MB file"


# --- 6 and 15: a resume whose data or length changed -------------------------------------------------------------

RUN_STEPS = 8  # past tiny's 5 warmup steps: the cosine decays to lr * min_lr_ratio at the last step


def _run_argv(root: Path, workdir: Path, *extra) -> list:
    return ["--config", REPO / "configs" / "tiny.py", "--workdir", workdir, f"--config.steps={RUN_STEPS}",
            "--config.checkpoint_every=4", "--config.eval_every=4", "--config.log_every=1",
            "--config.progress_bar=False", f"--config.data.source={root / 'plays.txt'}",
            f"--config.data.cache_dir={root / 'cache'}", f"--config.data.tokenizer={root / 'bpe'}", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shared_dir):
    """A complete run of RUN_STEPS steps (cosine schedule over `steps`), on a text file it owns."""
    from flax_gpt2.train.__main__ import main

    root = tmp_path_factory.mktemp("corpus_run")
    shutil.copytree(shared_dir / "gpt2-bpe", root / "bpe")
    (root / "plays.txt").write_text((shared_dir / "data" / "tinyshakespeare.txt").read_text()[:60_000])
    assert main([*map(str, _run_argv(root, root / "run"))]) == 0
    return root


def _copy_run(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run"


def test_a_resume_on_edited_data_is_refused(finished_run, tmp_path, capsys):
    """Before, the edited file was tokenized again and trained on at the saved position, exit 0."""
    root = finished_run
    workdir = _copy_run(root, tmp_path)
    before = _snapshot(workdir)
    original = (root / "plays.txt").read_text()
    try:
        (root / "plays.txt").write_text(original.replace("Citizen", "Villager"))
        _, err = _train_cli(_run_argv(root, workdir), capsys, 1)
        line = _one_error_line(err, 1, "corpus.sha256")
        assert "The training data changed since the checkpoints were written" in line
        assert "--config.allow_config_change=True" in line and _snapshot(workdir) == before
        # Asked for: it continues on the new data.
        _train_cli(_run_argv(root, workdir, "--config.allow_config_change=True"), capsys, 0)
    finally:
        (root / "plays.txt").write_text(original)  # the same text again (a new mtime): the same corpus
    _train_cli(_run_argv(root, _copy_run(root, tmp_path / "again")), capsys, 0)


def test_a_longer_resume_keeps_the_schedule_or_is_refused(finished_run, tmp_path, capsys):
    """Before, `steps` was harmless: the cosine was stretched mid-run and the learning rate jumped back up."""
    root = finished_run
    workdir = _copy_run(root, tmp_path)
    before = _snapshot(workdir)
    _, err = _train_cli(_run_argv(root, workdir, "--config.steps=10"), capsys, 1)
    line = _one_error_line(err, 1, f"steps: {RUN_STEPS} -> 10")
    assert f"the update after step {RUN_STEPS} would use a learning rate of" in line
    assert f"--config.optimizer.decay_steps={RUN_STEPS}" in line and _snapshot(workdir) == before
    # The way the message gives: trained on, at the final learning rate of the run's own schedule.
    _train_cli(_run_argv(root, workdir, "--config.steps=10", f"--config.optimizer.decay_steps={RUN_STEPS}"),
               capsys, 0)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(lrs) == list(range(1, 11))
    np.testing.assert_allclose([lrs[9], lrs[10]], [1e-3 * 0.1] * 2, rtol=1e-6)  # tiny: lr 1e-3, min_lr_ratio 0.1


def test_a_longer_resume_on_a_constant_schedule_is_harmless():
    from flax_gpt2.configs import tiny

    saved = run_guard.flatten(tiny.get_config())
    for schedule, harmless in (("constant", True), ("cosine", False), ("linear", False)):
        run = dict(saved, **{"optimizer.schedule": schedule})
        longer = dict(run, steps=run["steps"] * 3)
        if harmless:
            assert run_guard.check_resume_config(run, longer, allow_change=False, workdir="w") == {
                "steps": (run["steps"], longer["steps"])}
        else:
            with pytest.raises(run_guard.ConfigChangedError, match="learning-rate schedule"):
                run_guard.check_resume_config(run, longer, allow_change=False, workdir="w", step=run["steps"])
        # with the decay's length kept, any schedule extends
        pinned = dict(longer, **{"optimizer.decay_steps": run["steps"]})
        assert "steps" in run_guard.check_resume_config(run, pinned, allow_change=False, workdir="w")

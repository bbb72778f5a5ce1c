"""The GPT-2 tokenizer against transformers' GPT2Tokenizer built from the same files, plus file handling.

Offline: a fixture blocks sockets wherever a test reaches for the hub or tiktoken's download.
"""

import hashlib
import json
import os
import shutil
import socket
import warnings

import numpy as np
import pytest
import tiktoken

from flax_gpt2 import assets
from flax_gpt2.tokenizer import bpe_files, sources as tokenizer_sources
from flax_gpt2.tokenizer import bpe_tokenizer as tokenizer_lib
from flax_gpt2.tokenizer.bpe_tokenizer import ENDOFTEXT, Tokenizer, get_tokenizer

HARD_STRINGS = [
    "", " ", "  ", "\n", "\n\n\n", "\t", "\t\t x", "hello  world", "hello   world  ", "trailing space ",
    "trailing spaces   ", "trailing newline\n", "newlines\n\n", "tabs\t\t", "mixed \t\n \n", "line\r\nwindows\r\n",
    " leading", "   leading spaces", "a\n \n b", "    return x**2\n", "a\u00a0b", "\u3000full width",
    "\u2028separator", "x\x00y\x0b\x0c", "\u200bzero width", "\ufeffBOM",
    # contractions, in several cases and forms
    "I'm you're he's we've they'll she'd don't", "I'M YOU'RE HE'S WE'VE THEY'LL SHE'D DON'T", "It'S it'LL",
    "''s", "' s", "rock'n'roll", "x's's", "'ll'd've're", "dog\u2019s", " 's 't 're 've 'm 'll 'd",
    # numbers
    "1234567890", "3.14159", "1,000,000", "-42", "2024-01-01", " 12 345", "\u0663\u0664\u0665", "\u00bd \u00b2 \u216b",
    # unicode, emoji, CJK
    "naïve café résumé", "Ελληνικά", "русский", "עברית", "العربية", "हिन्दी",
    "\u0e44\u0e17\u0e22", "e\u0301", "\u01c4 \u00df \u0130stanbul", "\U0001f600", "a\U0001f600b\U0001f600 \U0001f600",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466", "\U0001f3f3\ufe0f\u200d\U0001f308",
    "flags \U0001f1fa\U0001f1f8\U0001f1ef\U0001f1f5", "你好，世界", "日本語のテキスト",
    "\ud55c\uad6d\uc5b4", "\U00020000\U00020001",
    # punctuation, code, urls
    "!!!???...", "http://example.com/a?b=c&d=e", "def f(x):\n    return x**2\n", "<|startoftext|>",
    # the end-of-text marker written in text
    ENDOFTEXT, "<|endoftext|> kid, room, dance:", "a<|endoftext|>b", " <|endoftext|>", "<|endoftext|><|endoftext|>",
    "<|endoftext", "<|endoftext|>\n\nhello", "x <|endoftext|> y",
]


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return get_tokenizer(bpe_dir)


def _hf_folder(folder, vocab_file, merges_file):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(vocab_file, folder / "vocab.json")
    shutil.copy(merges_file, folder / "merges.txt")
    return folder


def _hf_tokenizer(folder):
    # transformers 5: GPT2Tokenizer(vocab_file=..., merges_file=...) silently builds an empty vocabulary;
    # from_pretrained on a folder reads vocab.json + merges.txt as users do.
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def hf_folder(bpe_dir, tmp_path_factory):
    return _hf_folder(tmp_path_factory.mktemp("hf_gpt2"), bpe_dir / "encoder.json", bpe_dir / "vocab.bpe")


@pytest.fixture(scope="module")
def hf(hf_folder):
    return _hf_tokenizer(hf_folder)


@pytest.fixture(scope="module")
def shakespeare(shared_dir):
    return (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host or open a connection fails at once (tests must never hang on the network)."""
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    # tiktoken keeps loaded encodings in a module-level dict; start each test without them.
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


@pytest.fixture
def offline(monkeypatch, tmp_path, no_network):
    """Empty Hugging Face and tiktoken caches, HF_HUB_OFFLINE=1: only the copy shipped in the package."""
    import huggingface_hub.constants

    (tmp_path / "hf").mkdir()
    (tmp_path / "tiktoken").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    return tmp_path


@pytest.fixture
def empty_caches(offline, monkeypatch):
    """`offline`, and the package's own copy of GPT-2's files gone too (a damaged install): no local copy."""
    (offline / "assets").mkdir()
    monkeypatch.setattr(assets, "FOLDER", str(offline / "assets"))
    return offline


# ---- ids against transformers ----


def test_tinyshakespeare_matches_transformers(tok, hf, shakespeare):
    ids = tok.encode(shakespeare)
    assert ids == hf(shakespeare)["input_ids"]
    lines = shakespeare.split("\n")
    hf_lines = hf(lines)["input_ids"]
    assert [tok.encode(line) for line in lines] == hf_lines
    # The same lines through encode_batch's threads (4 chunks).
    batch, mask = tok.encode_batch(lines, padding_side="right", num_threads=4)
    assert [row[:n].tolist() for row, n in zip(batch, mask.sum(1))] == hf_lines
    assert tok.decode(ids) == shakespeare


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_hard_strings_match_transformers(tok, hf, text):
    # Our default encodes "<|endoftext|>" in text as plain text: transformers' split_special_tokens=True.
    ids = tok.encode(text)
    assert ids == hf(text, split_special_tokens=True)["input_ids"]
    # allowed_special="all" encodes it as the special token: transformers' default.
    special_ids = tok.encode(text, allowed_special="all")
    assert special_ids == hf(text)["input_ids"]
    assert tok.encode(text, allowed_special={ENDOFTEXT}) == special_ids
    assert tok.decode(ids) == text
    assert tok.decode(special_ids) == text
    assert tok.decode(ids) == hf.decode(ids)


def test_endoftext_is_plain_text_unless_allowed(tok):
    prompt = "<|endoftext|> kid, room, dance:"
    plain = tok.encode(prompt)
    assert tok.eot_token not in plain
    special = tok.encode(prompt, allowed_special="all")
    assert special[0] == tok.eot_token == tok.eos_token_id == 50256
    assert special[1:] == tok.encode(" kid, room, dance:")
    with pytest.raises(ValueError, match="endoftext"):
        tok.encode(prompt, disallowed_special="all")
    assert tok.encode("no marker here", disallowed_special="all") == tok.encode("no marker here")
    with pytest.raises(ValueError, match="unknown special tokens"):
        tok.encode(prompt, allowed_special={"<|endoftext|>", "<|pad|>"})
    with pytest.raises(TypeError, match="set of special tokens"):
        tok.encode(prompt, allowed_special=ENDOFTEXT)
    with pytest.raises(TypeError, match="encode_batch"):
        tok.encode(["a", "b"])


def test_pattern_and_ranks_match_tiktoken(tok, bpe_dir, monkeypatch):
    from tiktoken_ext.openai_public import r50k_pat_str

    assert tokenizer_lib.GPT2_PATTERN == r50k_pat_str
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files directly, caching nothing
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(bpe_dir / "vocab.bpe"), encoder_json_file=str(bpe_dir / "encoder.json"),
        vocab_bpe_hash=tokenizer_lib.GPT2_MERGES_SHA256, encoder_json_hash=tokenizer_lib.GPT2_VOCAB_SHA256)
    assert tok.mergeable_ranks == ranks
    assert tok.vocab_size == 50257 and tok.special_tokens == {ENDOFTEXT: 50256}
    # The content digest that recognises re-formatted GPT-2 files is the one of these files.
    assert Tokenizer(tok.encoding).is_standard_gpt2


def test_pickles_for_worker_processes(tok):
    import pickle

    again = pickle.loads(pickle.dumps(tok))
    text = "Pickled for datasets.map(num_proc=...) <|endoftext|>"
    assert again.encode(text) == tok.encode(text) and again.is_standard_gpt2


def test_encoding_without_endoftext_is_an_error():
    encoding = tiktoken.Encoding("bytes", pat_str=tokenizer_lib.GPT2_PATTERN,
                                 mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    with pytest.raises(ValueError, match="no '<\\|endoftext\\|>' special token"):
        Tokenizer(encoding)


# ---- batches ----


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_encode_batch_matches_transformers_padding(tok, hf_folder, padding_side):
    texts = ["Hello world", "", "A longer sentence, with\npunctuation and \U0001f600.", " x"]
    ids, mask = tok.encode_batch(texts, padding_side=padding_side)
    assert ids.dtype == mask.dtype == np.int32
    hf = _hf_tokenizer(hf_folder)
    hf.pad_token = ENDOFTEXT  # GPT-2 has no pad token; ours defaults to <|endoftext|>
    ref = hf(texts, padding=True, padding_side=padding_side, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert tok.decode_batch(ids, mask) == texts


@pytest.mark.parametrize("truncation_side", ["left", "right"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_encode_batch_truncation_matches_transformers(tok, hf_folder, truncation_side, padding_side):
    texts = ["one two three four five six seven", "short", "exactly five tokens here ok", ""]
    hf = _hf_tokenizer(hf_folder)
    hf.pad_token, hf.truncation_side, hf.padding_side = ENDOFTEXT, truncation_side, padding_side
    ref = hf(texts, padding="max_length", truncation=True, max_length=5, return_tensors="np")
    ids, mask = tok.encode_batch(texts, max_length=5, padding_side=padding_side, truncation_side=truncation_side)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_encode_batch_options(tok):
    texts = ["a b c", "<|endoftext|> kid"]
    ids, mask = tok.encode_batch(texts, pad_id=-1, padding_side="right", max_length=12)
    for row, m, text in zip(ids, mask, texts):
        n = len(tok.encode(text))
        assert row[:n].tolist() == tok.encode(text) and (row[n:] == -1).all()
        assert m.tolist() == [1] * n + [0] * (12 - n)
    ids, mask = tok.encode_batch(texts, allowed_special="all")
    assert ids[1][mask[1] == 1].tolist() == tok.encode(texts[1], allowed_special="all") == [50256, 5141]
    for max_length in (None, 3):
        ids, mask = tok.encode_batch([], max_length=max_length)
        assert ids.shape == mask.shape == (0, max_length or 0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(texts="one string"), TypeError, "list of strings"),
    (dict(texts=["ok", 3]), TypeError, "list of strings"),
    (dict(padding_side="middle"), ValueError, "padding_side"),
    (dict(truncation_side="up"), ValueError, "truncation_side"),
    (dict(max_length=0), ValueError, "max_length"),
    (dict(max_length=2.5), ValueError, "max_length"),
    (dict(max_length=True), ValueError, "max_length"),
    (dict(pad_id="0"), TypeError, "pad_id"),
    (dict(pad_id=2**40), ValueError, "pad_id"),
    (dict(allowed_special={"<|nope|>"}), ValueError, "unknown special"),
])
def test_encode_batch_bad_arguments(tok, kwargs, error, match):
    kwargs = {"texts": ["a", "b"], **kwargs}
    with pytest.raises(error, match=match):
        tok.encode_batch(kwargs.pop("texts"), **kwargs)


# ---- decoding and the vocabulary ----


def test_decode_accepts_arrays(tok, hf):
    import jax.numpy as jnp

    ids = tok.encode("Hello \U0001f600 world<|endoftext|>", allowed_special="all")
    text = tok.decode(ids)
    assert text == hf.decode(ids)
    for form in (tuple(ids), np.array(ids, np.int32), np.array(ids, np.uint32), np.array(ids), jnp.array(ids)):
        assert tok.decode(form) == text
    assert tok.decode(np.int64(31373)) == tok.decode(31373) == "hello"
    assert tok.decode([]) == tok.decode(np.zeros((0,), np.int32)) == ""
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    # Half an emoji decodes to U+FFFD, as in transformers.
    emoji = tok.encode("\U0001f600")
    assert tok.decode(emoji[:1]) == hf.decode(emoji[:1]) and "\ufffd" in tok.decode(emoji[:1])
    batch, mask = tok.encode_batch(["Hello", "Hello \U0001f600 world"])
    # Without a mask the padding (<|endoftext|>) is text like any token, as in transformers' batch_decode.
    assert tok.decode_batch(batch) == hf.batch_decode(batch.tolist()) == [
        "<|endoftext|>" * (len(batch[0]) - 1) + "Hello", "Hello \U0001f600 world"]
    assert tok.decode_batch(jnp.asarray(batch), mask) == ["Hello", "Hello \U0001f600 world"]
    assert tok.decode_batch(batch, skip_special_tokens=True) == ["Hello", "Hello \U0001f600 world"]


@pytest.mark.parametrize("ids, error, match", [
    ([1.0, 2.0], TypeError, "integers"),
    ([[1, 2], [3, 4]], ValueError, "decode_batch"),
    ([50257], ValueError, "50257 is out of range"),
    ([5, -1], ValueError, "-1 is out of range"),
    ("hello", TypeError, "str"),
])
def test_decode_bad_ids(tok, ids, error, match):
    with pytest.raises(error, match=match):
        tok.decode(ids)


def test_decode_batch_bad_mask(tok):
    with pytest.raises(ValueError, match="attention_mask shape"):
        tok.decode_batch([[1, 2]], [[1, 1, 1]])


def test_vocabulary_matches_transformers(tok, hf, bpe_dir):
    vocab = json.loads((bpe_dir / "encoder.json").read_text())
    assert tok.get_vocab() == vocab == hf.get_vocab()
    sample = [0, 188, 220, 256, 262, 50255, 50256] + np.random.default_rng(0).integers(0, 50257, 500).tolist()
    assert [tok.id_to_token(i) for i in sample] == hf.convert_ids_to_tokens(sample)
    tokens = hf.convert_ids_to_tokens(sample)
    assert [tok.token_to_id(t) for t in tokens] == sample
    assert tok.token_to_id(b" the") == tok.token_to_id("\u0120the") == 262
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_to_id(" the")
    with pytest.raises(KeyError, match="not a token"):
        tok.token_to_id(b"\xff\xfe\xfd not a token")
    with pytest.raises(ValueError, match="out of range"):
        tok.id_to_token(50257)
    with pytest.raises(TypeError, match="int"):
        tok.id_to_token(1.0)


# ---- saving and the file checks ----


def test_save_round_trip(tok, bpe_dir, tmp_path):
    vocab_path, merges_path = tok.save(tmp_path / "saved")
    assert json.loads(open(vocab_path).read()) == json.loads((bpe_dir / "encoder.json").read_text())
    assert open(merges_path).read().split("\n") == (bpe_dir / "vocab.bpe").read_text().split("\n")
    # Byte-identical, so the saved folder passes tiktoken's own sha256 check.
    assert open(vocab_path, "rb").read() == (bpe_dir / "encoder.json").read_bytes()
    assert open(merges_path, "rb").read() == (bpe_dir / "vocab.bpe").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = get_tokenizer(tmp_path / "saved")
    assert again.is_standard_gpt2 and again.mergeable_ranks == tok.mergeable_ranks


def test_both_file_names(tok, hf_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_named = get_tokenizer(str(hf_folder))
    assert hf_named.is_standard_gpt2 and hf_named.encoding.name == "gpt2"
    assert hf_named.mergeable_ranks == tok.mergeable_ranks


def test_reformatted_gpt2_files_are_standard(bpe_dir, tmp_path):
    # As written by transformers' save_vocabulary: sorted, indented, non-ASCII kept; CRLF merges.
    vocab = json.loads((bpe_dir / "encoder.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    merges = (bpe_dir / "vocab.bpe").read_text(encoding="utf-8")
    (tmp_path / "merges.txt").write_bytes(merges.replace("\n", "\r\n").encode())
    assert hashlib.sha256((tmp_path / "vocab.json").read_bytes()).hexdigest() != tokenizer_lib.GPT2_VOCAB_SHA256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = get_tokenizer(tmp_path)
    assert tok.is_standard_gpt2 and tok.encoding.name == "gpt2"


def _custom_bpe(bpe_dir, folder, n_merges):
    """GPT-2's first `n_merges` merges and their tokens, `<|endoftext|>` last: a valid, different BPE."""
    folder.mkdir()
    merges = (bpe_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1][:n_merges]
    vocab = {t: i for t, i in json.loads((bpe_dir / "encoder.json").read_text()).items() if i < 256 + n_merges}
    vocab[ENDOFTEXT] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    return folder


@pytest.mark.parametrize("n_merges", [49999, 1000])
def test_custom_bpe_works_with_a_warning(bpe_dir, tmp_path, shakespeare, n_merges):
    # 49999: GPT-2's files with the last merge removed (a tampered copy whose two files still agree).
    folder = _custom_bpe(bpe_dir, tmp_path / "custom", n_merges)
    with pytest.warns(UserWarning, match="not GPT-2's BPE files"):
        tok = get_tokenizer(folder)
    assert not tok.is_standard_gpt2 and tok.encoding.name != "gpt2"
    assert tok.vocab_size == 256 + n_merges + 1 and tok.eot_token == 256 + n_merges
    hf = _hf_tokenizer(folder)
    text = shakespeare[:200_000] + " gazed <|endoftext|>"
    assert tok.encode(text) == hf(text, split_special_tokens=True)["input_ids"]
    assert tok.encode(text, allowed_special="all") == hf(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "saved")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "saved" / name).read_bytes() == (folder / name).read_bytes()


def _tamper(bpe_dir, folder, vocab_edit=None, merges_edit=None):
    folder.mkdir()
    vocab = (bpe_dir / "encoder.json").read_text(encoding="utf-8")
    merges = (bpe_dir / "vocab.bpe").read_text(encoding="utf-8")
    (folder / "vocab.json").write_text(vocab_edit(vocab) if vocab_edit else vocab, encoding="utf-8")
    (folder / "merges.txt").write_text(merges_edit(merges) if merges_edit else merges, encoding="utf-8")
    return folder


@pytest.mark.parametrize("vocab_edit, merges_edit, match", [
    # Tampered copies whose two files no longer agree.
    (None, lambda m: m.replace("\n\u0120 t\n", "\n\u0120 q\n", 1),
     r"merges.txt, line 3: '\u0120a' has id 257 .* not above the id 10662 of '\u0120q' \(line 2\)"),
    (lambda v: v.replace('"\\u0120gazed": 50255', '"\\u0120gazer": 50255'), None,
     r"merges.txt, line 50001: .*'\u0120gazed', which is not in .*vocab.json"),
    (lambda v: v.replace('"\\u0120gazed": 50255', '"\\u0120gazed": 50254'), None,
     r"vocab.json: id 50254 is used twice"),
    (None, lambda m: m.replace("\nh e\n", "\nh e x\n", 1), r"merges.txt, line 4: expected two tokens"),
    (None, lambda m: m.replace("\nh e\n", "\nh\u4e00 e\n", 1), r"merges.txt, line 4: .* not in .*vocab.json"),
    # Malformed files.
    (lambda v: v[:-10], None, r"vocab.json is not valid UTF-8 JSON"),
    (lambda v: "[1, 2]", None, r"vocab.json must hold a non-empty JSON object"),
    (lambda v: v.replace('"!": 0', '"!": "0"'), None, r"vocab.json: the id of '!' must be an int"),
    (lambda v: v.replace('"!": 0', '"\u4e00\u4e00": 0'), None, r"vocab.json has no entry for byte 33"),
    (lambda v: v.replace('"<|endoftext|>": 50256', '"<|eot|>": 50256'), None,
     r"vocab.json has no '<\|endoftext\|>'"),
])
def test_tampered_or_malformed_files_are_clear_errors(bpe_dir, tmp_path, vocab_edit, merges_edit, match):
    folder = _tamper(bpe_dir, tmp_path / "bad", vocab_edit, merges_edit)
    with pytest.raises(ValueError, match=match):
        get_tokenizer(folder)


def test_merges_with_unknown_byte_characters(bpe_dir, tmp_path):
    folder = _tamper(bpe_dir, tmp_path / "bad", lambda v: v.replace('"he": 258', '"h\u4e00": 258'),
                     lambda m: m.replace("\nh e\n", "\nh \u4e00\n", 1))
    with pytest.raises(ValueError, match=r"merges.txt, line 4: .* not in .*vocab.json"):
        get_tokenizer(folder)
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "vocab.json").write_text(json.dumps({**{c: i for i, c in enumerate(bpe_files.CHAR_TO_BYTE)},
                                                   "\u4e00x": 256, ENDOFTEXT: 257}), encoding="utf-8")
    with pytest.warns(UserWarning):  # an unmergeable entry is a special token, spelled as in vocab.json
        assert get_tokenizer(folder).special_tokens == {"\u4e00x": 256, ENDOFTEXT: 257}


@pytest.mark.parametrize("kept_lines", [25001, 50000])
def test_truncated_gpt2_merges_are_an_error(bpe_dir, tmp_path, kept_lines):
    """Cut at a line boundary, GPT-2's merges.txt used to load with a 286 KB warning, its last 25,000
    tokens turned into special tokens."""
    folder = _tamper(bpe_dir, tmp_path / "cut", None, lambda m: "\n".join(m.split("\n")[:kept_lines]) + "\n")
    with pytest.raises(ValueError) as info:
        get_tokenizer(folder)
    message = str(info.value)
    assert "merges.txt" in message and "does not cover" in message and "needs 50000 merges" in message
    assert "\n" not in message and len(message) < 500


def test_a_custom_bpe_whose_merges_stop_short_is_an_error(bpe_dir, tmp_path):
    folder = _custom_bpe(bpe_dir, tmp_path / "custom", 1000)
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    (folder / "merges.txt").write_text("\n".join(lines[:1001 - 100]) + "\n", encoding="utf-8")  # 100 merges cut
    with pytest.raises(ValueError, match=r"\(900 merges\) does not cover .*100 entries are produced by no merge"):
        get_tokenizer(folder)
    # A few unmerged entries are special tokens of a custom BPE: a warning of one short line.
    (folder / "merges.txt").write_text("\n".join(lines[:1001 - 10]) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning) as record:
        tok = get_tokenizer(folder)
    message = str(record[0].message)
    assert "not GPT-2's BPE files" in message and "and 7 more" in message
    assert "\n" not in message and len(message) < 400
    # Only <|endoftext|> in user text is special, never what the merges do not reach.
    unmerged = next(t for t in tok.special_tokens if t != ENDOFTEXT)
    text = tok.decode([tok.token_to_id(unmerged)]) + ENDOFTEXT
    ids = tok.encode(text, allowed_special=tokenizer_lib.USER_TEXT_SPECIAL)
    assert ids[-1] == tok.eot_token and tok.token_to_id(unmerged) not in ids


def test_save_replaces_files_only_when_both_are_complete(tok, bpe_dir, tmp_path, monkeypatch):
    custom = get_tokenizer_quietly(_custom_bpe(bpe_dir, tmp_path / "custom", 300))
    folder = tmp_path / "saved"
    tok.save(folder)
    before = {name: (folder / name).read_bytes() for name in ("vocab.json", "merges.txt")}

    class FullDisk:
        """A file that takes half of what is written, then fails as a full disk does."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            raise OSError(28, "No space left on device")

    def open_with_full_disk(path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        return FullDisk(f) if str(path).endswith("merges.txt") else f

    monkeypatch.setattr(bpe_files, "open", open_with_full_disk, raising=False)
    with pytest.raises(OSError, match="No space left"):
        custom.save(folder)  # vocab.json was written in full, merges.txt half
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]  # no staging left behind
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert get_tokenizer(folder).is_standard_gpt2


def test_tokenizer_files_takes_either_naming(bpe_dir, hf_folder, tmp_path):
    assert tokenizer_lib.tokenizer_files(hf_folder) == (str(hf_folder / "vocab.json"), str(hf_folder / "merges.txt"))
    assert bpe_files.tokenizer_files(str(bpe_dir)) == (str(bpe_dir / "encoder.json"), str(bpe_dir / "vocab.bpe"))
    (tmp_path / "empty").mkdir()
    assert bpe_files.tokenizer_files(tmp_path / "empty") is None
    assert bpe_files.tokenizer_files(tmp_path / "nowhere") is None
    (tmp_path / "half").mkdir()
    shutil.copy(bpe_dir / "vocab.bpe", tmp_path / "half" / "vocab.bpe")
    with pytest.raises(FileNotFoundError, match=r"half/encoder.json is missing: the folder has vocab.bpe"):
        bpe_files.tokenizer_files(tmp_path / "half")


def test_a_folder_with_two_different_tokenizers_is_refused(bpe_dir, tmp_path):
    # GPT-2's 50,257-token pair beside a small custom BPE: which one the model was trained with cannot be
    # guessed, and taking the first (vocab.json + merges.txt) would give a 357-token tokenizer to a
    # 50,257-token model.
    folder = _custom_bpe(bpe_dir, tmp_path / "both", 100)
    shutil.copy(bpe_dir / "encoder.json", folder / "encoder.json")
    shutil.copy(bpe_dir / "vocab.bpe", folder / "vocab.bpe")
    message = (f"{folder} holds two different tokenizers, vocab.json + merges.txt (357 tokens) and encoder.json "
               f"+ vocab.bpe (50257 tokens); delete the pair that does not belong to the model")
    with pytest.raises(ValueError) as info:
        bpe_files.tokenizer_files(folder)
    assert str(info.value) == message
    with pytest.raises(ValueError, match="holds two different tokenizers"):
        get_tokenizer_quietly(folder)
    # The same tokenizer under both names, whatever its JSON formatting and line ends, is not a conflict.
    vocab = json.loads((bpe_dir / "encoder.json").read_text(encoding="utf-8"))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_bytes((bpe_dir / "vocab.bpe").read_bytes().replace(b"\n", b"\r\n"))
    assert bpe_files.tokenizer_files(folder) == (str(folder / "vocab.json"), str(folder / "merges.txt"))


def get_tokenizer_quietly(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_tokenizer(folder)


def test_missing_files_are_clear_errors(bpe_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files in .*empty.*vocab.json \+ merges.txt"):
        get_tokenizer(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    shutil.copy(bpe_dir / "encoder.json", tmp_path / "half" / "vocab.json")
    with pytest.raises(FileNotFoundError, match=r"half/merges.txt is missing"):
        get_tokenizer(tmp_path / "half")
    (tmp_path / "half" / "vocab.json").rename(tmp_path / "half" / "vocab.bpe")
    with pytest.raises(FileNotFoundError, match=r"half/encoder.json is missing"):
        get_tokenizer(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        get_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        get_tokenizer("./nowhere")
    with pytest.raises(ValueError, match="is a file"):
        get_tokenizer(bpe_dir / "encoder.json")


# ---- hub names, offline ----


@pytest.mark.parametrize("name", [None, "gpt2", "openai-community/gpt2-medium", "distilgpt2"])
def test_gpt2_names_load_offline_from_the_shipped_copy(offline, tok, name, monkeypatch):
    # Empty caches and no network: the standard encoding still loads, from the files shipped in the package,
    # without even the short probe of the hub (HF_HUB_OFFLINE unset) that other names wait for.
    from flax_gpt2.utils import hub

    def no_probe():
        raise AssertionError("the network was probed for GPT-2's own files")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "hub_unreachable", no_probe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shipped = get_tokenizer(name)
    assert shipped.is_standard_gpt2 and shipped.mergeable_ranks == tok.mergeable_ranks
    assert shipped.special_tokens == tok.special_tokens == {ENDOFTEXT: 50256}
    assert shipped._files == (os.path.join(assets.FOLDER, "gpt2-bpe", "encoder.json"),
                              os.path.join(assets.FOLDER, "gpt2-bpe", "vocab.bpe"))


def test_a_damaged_shipped_copy_is_named_and_skipped(offline, bpe_dir, hf_folder, monkeypatch):
    damaged = offline / "assets" / "gpt2-bpe"
    damaged.mkdir(parents=True)
    shutil.copy(bpe_dir / "encoder.json", damaged / "encoder.json")
    (damaged / "vocab.bpe").write_bytes((bpe_dir / "vocab.bpe").read_bytes()[:-1000])  # truncated
    monkeypatch.setattr(assets, "FOLDER", str(offline / "assets"))
    with pytest.raises(OSError) as info:
        get_tokenizer("gpt2")
    assert (f"the copy shipped with flax_gpt2: {damaged / 'vocab.bpe'} does not have the sha256 it was shipped "
            f"with (modified or truncated): the flax_gpt2 install is damaged; reinstall it") in str(info.value)
    # Another local copy still serves (here the hub cache), as it would have before the package shipped one.
    _fill_hub_cache(offline / "hf", "gpt2", hf_folder)
    assert get_tokenizer("gpt2")._files[0].startswith(str(offline / "hf"))


@pytest.mark.parametrize("name", [None, "gpt2", "openai-community/gpt2-medium", "someone/their-gpt2"])
def test_hub_name_offline_says_how_to_work_offline(empty_caches, name):
    with pytest.raises(OSError) as info:
        get_tokenizer(name)
    message = str(info.value)
    assert "vocab.json + merges.txt" in message and "TIKTOKEN_CACHE_DIR" in message
    assert "not in the local cache" in message
    assert "e.g. get_tokenizer('/path/to/gpt2')" in message
    if name != "someone/their-gpt2":  # not GPT-2's vocabulary: the shipped copy is no stand-in for it
        assert "the copy shipped with flax_gpt2: " in message and "encoder.json is missing" in message


def test_offline_error_names_the_callers_way_to_pass_a_folder(empty_caches):
    with pytest.raises(OSError) as info:
        get_tokenizer("gpt2", pass_folder_as="--tokenizer DIR")
    assert "e.g. --tokenizer DIR, or point TIKTOKEN_CACHE_DIR" in str(info.value)
    assert "get_tokenizer(" not in str(info.value)


def test_hub_name_without_network_says_how_to_work_offline(empty_caches, monkeypatch):
    # Online mode with no network: the downloads fail (sockets are blocked) and the error still helps.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    from flax_gpt2.utils import hub

    monkeypatch.setattr(hub, "hub_unreachable", lambda: "")  # the hub answers the probe; downloads fail

    def no_hub(*args, **kwargs):  # huggingface_hub retries for ~20 s before failing; fail at once instead
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    with pytest.raises(OSError) as info:
        get_tokenizer("gpt2")
    message = str(info.value)
    assert "Hugging Face hub 'gpt2' (vocab.json + merges.txt): OSError: network access is disabled" in message
    assert "tiktoken 'gpt2': ConnectionError" in message and "network access is disabled" in message
    assert "TIKTOKEN_CACHE_DIR" in message and "vocab.json + merges.txt (or encoder.json" in message


def _fill_hub_cache(cache, repo_id, folder):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))


def test_hub_cache(empty_caches, bpe_dir, hf_folder, tok, tmp_path):
    _fill_hub_cache(empty_caches / "hf", "openai-community/gpt2", hf_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_hub = get_tokenizer("gpt2")
    assert from_hub.is_standard_gpt2 and from_hub.mergeable_ranks == tok.mergeable_ranks
    assert from_hub.name_or_path == "gpt2"
    _fill_hub_cache(empty_caches / "hf", "someone/custom", _custom_bpe(bpe_dir, tmp_path / "custom", 100))
    with pytest.warns(UserWarning, match="not GPT-2's BPE"):
        assert get_tokenizer("someone/custom").vocab_size == 357


def test_tiktoken_cache(empty_caches, bpe_dir, tok, tmp_path, monkeypatch):
    # Filled where tiktoken_cache_path says (test_tiktoken_cache_path_is_where_tiktoken_writes checks it).
    for url, name in zip(tokenizer_sources.TIKTOKEN_GPT2_FILES, ("vocab.bpe", "encoder.json")):
        shutil.copy(bpe_dir / name, tokenizer_sources.tiktoken_cache_path(url))
    (tmp_path / "cwd" / "gpt2").mkdir(parents=True)  # None never means a local folder called gpt2
    monkeypatch.chdir(tmp_path / "cwd")
    from_tiktoken = get_tokenizer(None)
    assert from_tiktoken.encoding is tiktoken.get_encoding("gpt2")
    assert from_tiktoken.is_standard_gpt2
    text = "Hello \U0001f600 world <|endoftext|>"
    assert from_tiktoken.encode(text) == tok.encode(text)
    # save() works from tiktoken's own encoding too (ranks read back through its public API).
    vocab_path, merges_path = from_tiktoken.save(tmp_path / "saved")
    assert open(vocab_path, "rb").read() == (bpe_dir / "encoder.json").read_bytes()
    assert open(merges_path, "rb").read() == (bpe_dir / "vocab.bpe").read_bytes()


@pytest.mark.parametrize("where", ["TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", "tempdir", "disabled"])
def test_tiktoken_cache_path_is_where_tiktoken_writes(empty_caches, bpe_dir, tmp_path, monkeypatch, where):
    # tiktoken has no public "is it cached?", so tiktoken_cache_path repeats its naming: the installed
    # tiktoken fills an empty cache from a stand-in download, and its files must be where we look.
    import tempfile

    import tiktoken.load

    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    cache = tmp_path / "cache"
    if where == "tempdir":  # neither variable: <tempdir>/data-gym-cache
        (tmp_path / "tmp").mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        cache = tmp_path / "tmp" / "data-gym-cache"
    elif where == "disabled":
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    else:
        monkeypatch.setenv(where, str(cache))
    assert not tokenizer_sources.tiktoken_cache_has_gpt2()
    served = {url: (bpe_dir / url.rsplit("/", 1)[1]).read_bytes() for url in tokenizer_sources.TIKTOKEN_GPT2_FILES}
    downloaded = []

    def download(url):
        downloaded.append(url)
        return served[url]

    with monkeypatch.context() as m:
        m.setattr(tiktoken.load, "read_file", download)  # the network, as tiktoken reaches it
        tiktoken.get_encoding("gpt2")
    assert sorted(downloaded) == sorted(served)
    paths = [tokenizer_sources.tiktoken_cache_path(url) for url in served]
    if where == "disabled":  # TIKTOKEN_CACHE_DIR="" turns tiktoken's cache off
        assert paths == [None, None] and not tokenizer_sources.tiktoken_cache_has_gpt2()
        assert not cache.exists()
        return
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(p) for p in paths)
    assert {os.path.dirname(p) for p in paths} == {str(cache)}
    assert tokenizer_sources.tiktoken_cache_has_gpt2()
    # Then get_tokenizer takes tiktoken's encoding from that cache, with no network.
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    from_cache = get_tokenizer(None)
    assert from_cache.encoding is tiktoken.get_encoding("gpt2") and from_cache.is_standard_gpt2
    assert len(downloaded) == 2

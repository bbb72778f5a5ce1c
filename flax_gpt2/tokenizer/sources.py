"""Where a tokenizer comes from: a local folder, the Hugging Face hub, or tiktoken's `gpt2` encoding.

`locate(name_or_path)` answers with a pair of BPE files (from a folder or the hub) or with tiktoken's own
`gpt2` Encoding; `flax_gpt2.tokenizer.bpe_tokenizer.get_tokenizer` builds the `Tokenizer` from either. For OpenAI's
GPT-2 names (and `None`) the copy shipped in the package (`flax_gpt2.assets`) answers first, so they work
offline on any install; only if that copy is damaged are the other local copies (the hub cache,
tiktoken's) and then the network tried: without network huggingface_hub retries for ~20 s, and tiktoken's
download has no timeout at all. When no source answers, the error lists what was tried and says how to
work offline.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable

import tiktoken

from flax_gpt2 import assets
from flax_gpt2.tokenizer import bpe_files
from flax_gpt2.utils import file_io, hub

# How the offline error tells a Python caller to pass a local folder; command lines pass their flag.
PASS_FOLDER_AS = "get_tokenizer('/path/to/gpt2')"

# Hub names whose tokenizer is the standard GPT-2 one (so tiktoken's `gpt2` encoding may stand in),
# each with the names the hub cache may hold it under.
_GPT2_HUB_NAMES = {
    **{name: (name, f"openai-community/{name}") for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
    **{f"openai-community/{name}": (f"openai-community/{name}", name)
       for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
    "distilgpt2": ("distilgpt2", "distilbert/distilgpt2"),
    "distilbert/distilgpt2": ("distilbert/distilgpt2", "distilgpt2"),
}

# Where tiktoken downloads GPT-2's files from (tiktoken_ext/openai_public.py, `gpt2`), with the sha256
# it expects of each.
TIKTOKEN_GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe": bpe_files.GPT2_MERGES_SHA256,
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json": bpe_files.GPT2_VOCAB_SHA256,
}


def locate(name_or_path: str | os.PathLike | None, *,
           pass_folder_as: str = PASS_FOLDER_AS) -> tuple[str, str] | tiktoken.Encoding:
    """The tokenizer `name_or_path` names: its `(vocab, merges)` files, or tiktoken's `gpt2` Encoding.

    Args:
        name_or_path: as `flax_gpt2.tokenizer.bpe_tokenizer.get_tokenizer`'s.
        pass_folder_as: how the offline error says to pass a local folder instead, e.g.
            `"--config.data.tokenizer=DIR"` on a command line.

    Raises:
        FileNotFoundError: a folder is missing one of the two files, or a path does not exist.
        ValueError: the path is a file, or a folder holding two different tokenizers.
        OSError: a hub name could not be loaded (e.g. no network); the message says how to work offline.
    """
    if name_or_path is None:  # never a folder that happens to be called "gpt2"
        return _from_hub_or_tiktoken("gpt2", pass_folder_as)
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return _folder_files(path)
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; pass the folder that holds vocab.json + merges.txt")
    if (isinstance(name_or_path, os.PathLike) or path.startswith((".", "/", "~")) or "\\" in path
            or path.count("/") > 1):  # not a hub name ("user/model")
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return _from_hub_or_tiktoken(path, pass_folder_as)


def _folder_files(folder: str) -> tuple[str, str]:
    files = bpe_files.tokenizer_files(folder)
    if files is None:
        found = sorted(os.listdir(folder))
        raise FileNotFoundError(f"no tokenizer files in {folder}: expected vocab.json + merges.txt (or "
                                f"encoder.json + vocab.bpe); found {found[:20]}")
    return files


def _hub_offline() -> str:
    """Why no download may be tried ("" if they may): HF_HUB_OFFLINE, or one short probe found no network."""
    return hub.hub_unreachable()


def _from_hub_or_tiktoken(name: str, pass_folder_as: str) -> tuple[str, str] | tiktoken.Encoding:
    errors: list[str] = []
    # OpenAI's GPT-2 files never change, so any local copy (the shipped one, the hub cache under either
    # name, or tiktoken's cache) is used before the network is touched, or even probed.
    if name in _GPT2_HUB_NAMES:
        try:
            return bpe_files.tokenizer_files(assets.path(assets.GPT2_BPE))
        except assets.DamagedAsset as e:
            errors.append(f"the copy shipped with flax_gpt2: {e}")
    offline = _hub_offline()
    if offline:
        errors.append(f"downloads: not tried ({offline})")
    if name not in _GPT2_HUB_NAMES:
        files = _from_hub(name, errors, local_files_only=bool(offline))
        if files is None:
            raise OSError(_offline_help(name, errors, pass_folder_as))
        return files
    for repo_id in _GPT2_HUB_NAMES[name]:
        if files := _from_hub(repo_id, errors, local_files_only=True):
            return files
    if not tiktoken_cache_has_gpt2():
        errors.append("tiktoken 'gpt2': not in its cache (TIKTOKEN_CACHE_DIR)")
    elif (encoding := _from_tiktoken(errors)) is not None:
        return encoding
    if not offline:
        if files := _from_hub(_GPT2_HUB_NAMES[name][0], errors, local_files_only=False):
            return files
        if (encoding := _from_tiktoken(errors)) is not None:
            return encoding
    raise OSError(_offline_help(name, errors, pass_folder_as))


def _from_hub(repo_id: str, errors: list[str], local_files_only: bool) -> tuple[str, str] | None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        errors.append("Hugging Face hub: huggingface_hub is not installed")
        return None
    try:
        vocab_file, merges_file = [hf_hub_download(repo_id, f, local_files_only=local_files_only)
                                   for f in bpe_files.FILE_PAIRS[0]]
    except Exception as e:  # not cached, offline, no such repo, ...: the caller tries the next source
        reason = "not in the local cache" if local_files_only else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        errors.append(f"Hugging Face hub {repo_id!r} (vocab.json + merges.txt): {reason}")
        return None
    return vocab_file, merges_file


def _from_tiktoken(errors: list[str]) -> tiktoken.Encoding | None:
    try:
        return tiktoken.get_encoding("gpt2")  # tiktoken checks the files' sha256 sums itself
    except Exception as e:  # no network, unwritable cache, ...
        errors.append(f"tiktoken 'gpt2': {type(e).__name__}: {e}")
        return None


def _offline_help(name: str, errors: Iterable[str], pass_folder_as: str) -> str:
    tried = "".join(f"\n  - {e}" for e in errors)
    return (f"could not load the tokenizer for {name!r}; tried:{tried}\n"
            "To work offline, either pass a local folder that holds vocab.json + merges.txt (or encoder.json + "
            f"vocab.bpe), e.g. {pass_folder_as}, or point TIKTOKEN_CACHE_DIR at a folder holding "
            "tiktoken's GPT-2 files (fill it once, with network access: TIKTOKEN_CACHE_DIR=/path/to/cache "
            "python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"). "
            "Set HF_HUB_OFFLINE=1 to skip the network look-ups.")


# ---- tiktoken's download cache ----


def tiktoken_cache_path(url: str) -> str | None:
    """Where tiktoken keeps its download of `url`; None when its cache is off (`TIKTOKEN_CACHE_DIR=""`).

    tiktoken offers no public way to ask whether a file is cached, nor to forbid the download (a plain
    `requests.get` with no timeout), so this repeats the one rule of `tiktoken.load.read_file_cached` we
    need: the folder is $TIKTOKEN_CACHE_DIR, else $DATA_GYM_CACHE_DIR, else <tempdir>/data-gym-cache, and
    the file is named by the sha1 of its URL. That rule is unchanged from tiktoken 0.2 to 0.14 (setup.cfg
    asks for >= 0.7); tests/test_tokenizer.py checks it against the installed tiktoken by letting
    tiktoken fill an empty cache and finding its files here.
    """
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


def tiktoken_cache_has_gpt2() -> bool:
    """Whether `tiktoken.get_encoding("gpt2")` can be built from tiktoken's cache, without a download.

    The sha256 sums are checked too: since 0.6, tiktoken deletes and downloads again a cached file that
    does not match them.
    """
    for url, sha256 in TIKTOKEN_GPT2_FILES.items():
        path = tiktoken_cache_path(url)
        if path is None or not os.path.isfile(path) or file_io.file_sha256(path) != sha256:
            return False
    return True

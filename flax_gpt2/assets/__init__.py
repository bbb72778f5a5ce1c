"""Files shipped inside the package, so that the demo and the standard tokenizer work offline on any install.

- `data/tinyshakespeare.txt`: Tiny Shakespeare, the demo configs' corpus (configs/shakespeare.py, tiny.py).
- `gpt2-bpe/encoder.json` + `gpt2-bpe/vocab.bpe`: OpenAI's GPT-2 BPE files, what `get_tokenizer()` (and
  `"gpt2"`, `"distilgpt2"`, ...) loads before any cache or download.

Origins and licences are in SOURCES.md beside this file. The layout is the one of the repository's
`shared/` test folder, so `$FLAX_GPT2_SHARED` can stand in for this folder (see `flax_gpt2.configs.base`).
Each file's sha256 is checked the first time it is asked for: a damaged install is an error that names the
file, never another corpus or vocabulary.
"""

from __future__ import annotations

import functools
import os

from flax_gpt2.utils.file_io import file_sha256

TINYSHAKESPEARE = "data/tinyshakespeare.txt"
GPT2_BPE = "gpt2-bpe"

GPT2_VOCAB = f"{GPT2_BPE}/encoder.json"
GPT2_MERGES = f"{GPT2_BPE}/vocab.bpe"

# sha256 of each shipped file. The BPE files' are the sums tiktoken checks for its `gpt2` encoding: they
# identify OpenAI's GPT-2 files wherever they are found (`tokenizer.bpe_files.GPT2_VOCAB_SHA256`).
SHA256 = {
    TINYSHAKESPEARE: "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    GPT2_VOCAB: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    GPT2_MERGES: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

FOLDER = os.path.dirname(os.path.abspath(__file__))


class DamagedAsset(OSError):
    """A shipped file is missing or does not have its sha256: the install is damaged."""


def path(name: str) -> str:
    """The checked path of a shipped file or folder (`TINYSHAKESPEARE`, `GPT2_BPE`).

    Raises:
        DamagedAsset: a file is missing or its content is not the one shipped (the message says to reinstall).
        KeyError: `name` is not a shipped file.
    """
    files = [f for f in SHA256 if f == name or f.startswith(name.rstrip("/") + "/")]
    if not files:
        raise KeyError(f"{name!r} is not shipped with flax_gpt2; shipped: {sorted(SHA256)}")
    for f in files:
        _check(os.path.join(FOLDER, *f.split("/")), SHA256[f])
    return os.path.join(FOLDER, *name.rstrip("/").split("/"))


@functools.cache
def _check(full_path: str, sha256: str) -> None:
    """Raises DamagedAsset unless the file is there with its sha256 (each file is hashed once a process)."""
    if not os.path.isfile(full_path):
        problem = "is missing"
    elif file_sha256(full_path) != sha256:
        problem = "does not have the sha256 it was shipped with (modified or truncated)"
    else:
        return
    raise DamagedAsset(f"{full_path} {problem}: the flax_gpt2 install is damaged; reinstall it "
                       f"(pip install --force-reinstall flax_gpt2, or `git checkout` the file in a clone)")

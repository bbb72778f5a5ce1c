"""The README's Python blocks run as pasted. Offline, the hub id "gpt2" and the placeholder folder are swapped
for a tiny local model folder (the only edits; each must still be found, so the README cannot drift away
from this test); the serving block needs a running server and is covered by tests/test_serve.py."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# What stands for the network in a pasted block, and what replaces it here.
# GPT-2's tokenizer needs no stand-in: `get_tokenizer()` and `get_tokenizer("gpt2")` load the files shipped
# in the package, offline, as pasted.
OFFLINE = {'from_pretrained("gpt2")': "from_pretrained(MODEL)", 'from_pretrained("gpt2", ': "from_pretrained(MODEL, ",
           'model="gpt2"': "model=MODEL",
           'get_tokenizer("path/to/model")': "get_tokenizer(MODEL)"}


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_every_offline_substitution_still_has_its_place_in_the_readme():
    text = "".join(_blocks())
    assert all(pattern in text for pattern in OFFLINE), [p for p in OFFLINE if p not in text]


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_python_block_runs(index, hf_tiny, tmp_path, monkeypatch):
    code = _blocks()[index]
    if "OpenAI(" in code:
        pytest.skip("needs a running server: tests/test_serve.py drives it with the openai client")
    assert code.lstrip().startswith(("import", "from")), "a README block must import what it uses"
    for pattern, replacement in OFFLINE.items():
        code = code.replace(pattern, replacement)
    monkeypatch.chdir(tmp_path)  # blocks write out/...
    exec(compile(code, f"README.md python block {index}", "exec"), {"MODEL": str(hf_tiny[1])})

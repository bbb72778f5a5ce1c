"""What `pip install .` puts into site-packages: the library and, under its namespace, the training
application and its configs; no generic top-level `train`/`configs` packages; and the installed app runs a
shipped config by name from a folder that is not a checkout."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import venv_beside_this_interpreter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the source tree (the checkout gets no build/ or egg-info from it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "benchmarks", "notebooks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=300)
    (path,) = (tmp / "dist").glob("flax_gpt2-*.whl")
    return path


def _sources(folder: str) -> set[str]:
    return {str(p.relative_to(REPO / folder)) for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts}


def test_wheel_has_one_top_level_package_with_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"flax_gpt2"}, f"pip would install generic top-level packages: {sorted(top - {'flax_gpt2'})}"
    installed = set(names)
    # Every module of the repository's three source folders is in the wheel (a subpackage missing from
    # setup.cfg's explicit list would be lost silently).
    for folder, prefix in (("flax_gpt2", "flax_gpt2/"), ("train", "flax_gpt2/train/"),
                           ("configs", "flax_gpt2/configs/")):
        missing = {prefix + f for f in _sources(folder)} - installed
        assert not missing, f"not packaged: {sorted(missing)}"
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "flax-gpt2-train = flax_gpt2.train.__main__:main" in entry_points


def _clean_env(**extra) -> dict:
    """This environment without PYTHONPATH, FLAX_GPT2_SHARED and JAX_PLATFORMS, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLAX_GPT2_SHARED", "JAX_PLATFORMS")}
    env.update(extra)
    return env


NO_NETWORK = """
import socket

_connect = socket.socket.connect
_getaddrinfo = socket.getaddrinfo
LOCAL = ("127.0.0.1", "::1", "localhost")


def connect(self, address):
    if self.family != socket.AF_UNIX and not (isinstance(address, tuple) and address[0] in LOCAL):
        raise OSError(f"no network in this test: connect to {address!r}")
    return _connect(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host not in LOCAL:
        raise OSError(f"no network in this test: getaddrinfo({host!r})")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect
socket.getaddrinfo = getaddrinfo
"""


def _no_network_site(folder: Path) -> Path:
    """A folder whose sitecustomize.py makes every connection but to 127.0.0.1 fail at once (for PYTHONPATH)."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(NO_NETWORK)
    return folder


def _offline_env(tmp_path: Path, **extra) -> dict:
    """`_clean_env` with an empty HOME and empty Hugging Face / tiktoken caches, and no network."""
    home = tmp_path / "home"
    env = _clean_env(HOME=str(home), HF_HOME=str(home / "hf"), TIKTOKEN_CACHE_DIR=str(home / "tiktoken"),
                     XDG_CACHE_HOME=str(home / "cache"), HF_HUB_OFFLINE="1",
                     PYTHONPATH=str(_no_network_site(tmp_path / "no-network")), **extra)
    for name in [k for k in env if k.startswith("TPU_")]:  # an in-process compile_only test may have set them
        del env[name]
    return env


def test_installed_app_trains_a_shipped_config_by_name(wheel, tmp_path):
    """The wheel in a fresh venv (dependencies from this interpreter): `python -m flax_gpt2.train --config
    tiny` and the `flax-gpt2-train` script train from a folder with no checkout in sight, importing the
    venv's copy, on the corpus and tokenizer shipped in the wheel: no FLAX_GPT2_SHARED, empty Hugging Face
    and tiktoken caches, no network. `import train` / `import configs` find nothing."""
    env_dir = tmp_path / "venv"
    python = venv_beside_this_interpreter(env_dir)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _offline_env(tmp_path, JAX_PLATFORMS="cpu")
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u, flax_gpt2.train.train_loop as t, flax_gpt2.configs as c; "
                            "print(t.__file__, c.__file__, u.find_spec('train'), u.find_spec('configs'))"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    probe = probe.stdout.split()
    assert all(Path(p).is_relative_to(env_dir) for p in probe[:2]), probe
    assert probe[2:] == ["None", "None"], probe

    for command in ([str(python), "-m", "flax_gpt2.train"], [str(env_dir / "bin" / "flax-gpt2-train")]):
        workdir = work / f"run{len(command)}"
        proc = subprocess.run([*command, "--config", "tiny", "--workdir", str(workdir), "--config.steps=2",
                               "--config.checkpoint_every=2", "--config.progress_bar=False",
                               f"--config.data.cache_dir={tmp_path / 'cache'}"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (workdir / "result.json").is_file() and (workdir / "metrics.jsonl").is_file()
        config = json.loads((workdir / "train_config.json").read_text())
        assert Path(config["data"]["source"]).is_relative_to(env_dir), config["data"]["source"]


def test_wheel_ships_the_demo_data_and_tokenizer_files(wheel):
    """The corpus and GPT-2's BPE files are in the wheel, byte for byte the checked-in ones."""
    from flax_gpt2 import assets

    with zipfile.ZipFile(wheel) as z:
        for name, sha256 in assets.SHA256.items():
            assert hashlib.sha256(z.read(f"flax_gpt2/assets/{name}")).hexdigest() == sha256, name
        assert "flax_gpt2/assets/SOURCES.md" in z.namelist()


@pytest.mark.slow  # ~30 s of CPU (compiles the demo's model), 100 s on a loaded 2-core machine
def test_readme_demo_runs_offline_without_shared_data(tmp_path):
    """The README's main command from the checkout, shortened, with no FLAX_GPT2_SHARED, empty caches, no
    network and no JAX_PLATFORMS: it trains on the shipped text and samples with the shipped tokenizer,
    and prints no libtpu line. (.ci/run also runs it verbatim from a fresh clone.)"""
    workdir = tmp_path / "runs" / "shakespeare"
    proc = subprocess.run([sys.executable, "-m", "train", "--config", "configs/shakespeare.py", "--workdir",
                           str(workdir), "--config.steps=1", "--config.eval_batches=1", "--config.model.n_layer=1",
                           "--config.sample.max_new_tokens=4", "--config.progress_bar=False"],
                          cwd=REPO, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROMEO:" in (workdir / "sample.txt").read_text()
    assert json.loads((workdir / "train_config.json").read_text())["data"]["source"] == str(
        REPO / "flax_gpt2" / "assets" / "data" / "tinyshakespeare.txt")
    assert "libtpu" not in proc.stdout + proc.stderr


LIBTPU_NOISE = ("libtpu", "host bounds", "TPU_WORKER_HOSTNAMES", "INVALID_ARGUMENT")


def test_commands_on_a_cpu_machine_print_no_libtpu_lines(tmp_path, hf_tiny):
    """With libtpu installed (the [tpu] extra) and no TPU attached, a command that starts JAX's backend
    (convert) says nothing about libtpu and runs on the CPU, with JAX_PLATFORMS unset."""
    import importlib.util

    from flax_gpt2.utils import cli

    if cli.tpu_attached():
        pytest.skip("this machine may have a TPU: the TPU backend is expected to start")
    if importlib.util.find_spec("libtpu") is None:  # CI installs it (.ci/run): there, this is never skipped
        pytest.skip("libtpu is not installed (pip install '.[tpu]'): nothing would print its errors")
    env = _clean_env()
    for name in [k for k in env if k.startswith("TPU_")]:
        del env[name]
    proc = subprocess.run([sys.executable, "-m", "flax_gpt2.convert", "--model", str(hf_tiny[1]), "--out",
                           str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in LIBTPU_NOISE:
        assert noise not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()

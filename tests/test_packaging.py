"""What `pip install .` puts into site-packages: the library and, under its namespace, the training
application and its configs; no generic top-level `train`/`configs` packages; and the installed app runs a
shipped config by name from a folder that is not a checkout."""

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

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


def test_installed_app_trains_a_shipped_config_by_name(wheel, tmp_path, shared_dir):
    """The wheel in a fresh venv (dependencies from this interpreter): `python -m flax_gpt2.train --config
    tiny` and the `flax-gpt2-train` script train from a folder with no checkout in sight, importing the
    venv's copy; `import train` / `import configs` find nothing."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", FLAX_GPT2_SHARED=str(shared_dir))
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u, flax_gpt2.train.train_loop as t, flax_gpt2.configs as c; "
                            "print(t.__file__, c.__file__, u.find_spec('train'), u.find_spec('configs'))"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120, check=True).stdout.split()
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

"""Shared offline fixtures: the ../shared folder, tiny configs, and random-init HF reference checkpoints."""

import logging
import os
from pathlib import Path

import pytest

# Tests run on CPU; several simulate devices themselves in subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never touch the network in tests: the HF hub and tiktoken downloads must fail fast, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(os.environ.get("FLAX_GPT2_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
# The demo configs (configs/tiny.py, ...) find their data only through this variable; the test runs and the
# command lines they start inherit it.
os.environ.setdefault("FLAX_GPT2_SHARED", str(SHARED))


class _QuietOrbax(logging.Filter):
    """Drops orbax's and TensorStore's info and warning records (async saves and restores log per array and per
    thread; the records of saves still finishing after their test reach stderr directly, hundreds of lines at
    the end of a run). Their errors pass, and so does everything else on absl's logger."""

    _SOURCES = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorstore{os.sep}")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not any(s in record.pathname for s in self._SOURCES)


# orbax logs through absl, whose records all go to the logger named "absl".
logging.getLogger("absl").addFilter(_QuietOrbax())


def _no_persistent_cache_in_this_process():
    """Keeps this test process's compiles out of JAX's persistent compilation cache, whatever a command run
    in-process (`sample.main`, a training run) points it at: `sample.main` turns it on process-wide, as it should
    for a user, and every later test would then write its programs to disk. The tests of the cache itself run
    their commands in subprocesses."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)


_no_persistent_cache_in_this_process()


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_after_each_module():
    """Drops JAX's compiled programs after each test module. Every XLA:CPU executable keeps a few memory maps of
    its code for the life of the process; the whole suite compiles enough of them to pass Linux's limit of
    65,530 maps per process (measured: 33,088 after the 174 tests of four modules), and the next compile dies
    with SIGSEGV (the CI crashes at ~91% of the suite, in whichever test compiled next)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _restore_the_compilation_cache_setting():
    """Puts JAX's persistent compilation cache setting back as it was before each test: a command run in this
    process turns it on process-wide, as it does for a user, and the next test must not inherit its folder."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    yield
    if any(getattr(jax.config, k) != v for k, v in before.items()):
        compilation_cache.reset_cache()
        for k, v in before.items():
            jax.config.update(k, v)


def prompt_completion_jsonl(path, count: int, seed: int):
    """Writes `count` random `{"prompt", "completion"}` records (the prompt_completion recipe) to `path`."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"prompt": f"question {i}: " + "why " * rng.randint(0, 9),
                                "completion": " because " * rng.randint(1, 12)}) + "\n")
    return path


def left_padded(prompts, pad: int):
    """`(ids, mask)` `[B, T]` int64: token-id prompts of different lengths, left-padded with `pad`."""
    import numpy as np

    t = max(len(p) for p in prompts)
    ids = np.full((len(prompts), t), pad, np.int64)
    mask = np.zeros((len(prompts), t), np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
    return ids, mask


def write_run_checkpoint(run_dir, step: int, config, params) -> None:
    """A training run's checkpoint `step` as the trainer writes it (orbax items + `RunMeta`), without training:
    for tests of the readers (`from_pretrained`, `convert`) on run folders."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from flax_gpt2.checkpoints import run_folders

    manager = ocp.CheckpointManager(run_folders.checkpoint_dir(run_dir), item_handlers=run_folders.item_handlers())
    meta = run_folders.RunMeta(step=step, data={}, model_config=config.to_hf_config(), train_config={},
                               checksums={"params": run_folders.fingerprint(params)})
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave({"count": jnp.zeros(())}),
        meta=ocp.args.JsonSave(meta.to_json())))
    manager.wait_until_finished()


def run_device_worker(test_file: str, out: Path, devices: int, timeout: float) -> dict:
    """Runs `python TEST_FILE worker OUT` on `devices` fake CPU devices (XLA's host-platform device count must
    be set before JAX starts, hence a subprocess) and returns the JSON the worker wrote to `out`."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, test_file, "worker", str(out)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(Path(out).read_text())


def venv_beside_this_interpreter(env_dir: Path, extra_paths: tuple[str, ...] = ()) -> Path:
    """A fresh venv that also sees the site-packages this interpreter imports from; returns its python.

    Not `system_site_packages=True`: from inside a venv (a newcomer's setup, and CI's) that exposes the base
    interpreter's packages, not the venv's, and jax is missing. The parent folders are plain lines of a
    .pth file, added after the venv's own site-packages: their own .pth files (this checkout's editable
    install) are not run, so the venv's copy of flax_gpt2 is the one imported. `extra_paths` (e.g. this
    checkout) are added after them.
    """
    import subprocess
    import sys
    import venv

    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    parents = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    (Path(own) / "_parent_site_packages.pth").write_text("".join(p + "\n" for p in [*parents, *extra_paths]))
    return python


def set_dotted(config, overrides: dict) -> None:
    """`set_dotted(config, {"optimizer.lr": 1e-3})`: assigns ml_collections config keys by dotted path."""
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value


def tiny_train_config(cache_dir, **overrides):
    """configs/tiny.py for in-process training tests: no progress bar, a loss record every step, the token
    cache in `cache_dir`; `overrides` are dotted keys (`steps=8`, `**{"optimizer.lr": 1e-3}`)."""
    from flax_gpt2.configs import tiny

    config = tiny.get_config()
    config.log_every = 1
    config.progress_bar = False
    config.data.cache_dir = str(cache_dir)
    set_dotted(config, overrides)
    return config


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        message = f"shared data folder not found at {SHARED} (set FLAX_GPT2_SHARED)"
        if os.environ.get("CI") or os.environ.get("FLAX_GPT2_REQUIRE_SHARED"):
            pytest.fail(message + ": CI needs it", pytrace=False)  # never a quietly smaller suite in CI
        pytest.skip(message)
    return SHARED


@pytest.fixture(scope="session")
def bpe_dir(shared_dir) -> Path:
    """Folder with the exact GPT-2 `encoder.json` and `vocab.bpe`."""
    return shared_dir / "gpt2-bpe"


def make_hf_model(tmp_path_factory, name="hf_tiny", model_class="GPT2LMHeadModel", seed=0, tokenizer_files=True,
                  randomize=False, randomize_std=0.1, **config_kwargs):
    """A random-init transformers GPT-2 saved with `save_pretrained`; returns (torch_model, folder).

    With `tokenizer_files`, the folder also gets `vocab.json` + `merges.txt` (GPT-2's, from ../shared) like
    every hub checkpoint has. With `randomize`, every parameter is redrawn after init (see
    `randomize_parameters`, with `randomize_std`): a fresh init has zero biases and unit LayerNorms, which
    hide same-shape mix-ups; a larger std (0.3) also makes next-token distributions peaked (no near-ties).
    """
    import shutil

    import torch
    import transformers

    kwargs = dict(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    kwargs.update(config_kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(transformers.GPT2Config(**kwargs)).eval()
    if randomize:
        randomize_parameters(model, seed, std=randomize_std)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    if tokenizer_files and (SHARED / "gpt2-bpe").is_dir():
        shutil.copyfile(SHARED / "gpt2-bpe" / "encoder.json", folder / "vocab.json")
        shutil.copyfile(SHARED / "gpt2-bpe" / "vocab.bpe", folder / "merges.txt")
    return model, folder


def randomize_parameters(torch_model, seed=0, std=0.1):
    """Redraws every parameter of a torch GPT-2 in place: LayerNorm scales N(1, 0.2), everything else
    (matrices, embeddings, biases, LayerNorm shifts) N(0, std). No two tensors of a shape share values, so
    a swap of two of them changes the outputs."""
    import torch

    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            layer_norm_scale = ("ln_" in name) and name.endswith(".weight")
            center, scale = (1.0, 0.2) if layer_norm_scale else (0.0, std)
            p.copy_(center + scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return torch_model


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """(torch GPT2LMHeadModel, its save_pretrained folder) for a tiny random config with the real vocabulary."""
    return make_hf_model(tmp_path_factory)


@pytest.fixture(scope="session")
def hf_tiny_random(tmp_path_factory):
    """Like `hf_tiny`, but every parameter random (non-zero biases, non-unit LayerNorm affine)."""
    return make_hf_model(tmp_path_factory, "hf_tiny_random", seed=1, randomize=True)

"""Every run config loads through the command line; bad command lines and bad settings are clear errors;
fine-tuning starts from Hugging Face weights."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import set_dotted

from flax_gpt2.train.config_cli import UsageError, parse_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "base"))


def test_all_run_configs_exist():
    assert set(CONFIGS) >= {"tiny", "shakespeare", "gpt2_124m", "gpt2_355m", "gpt2_774m", "gpt2_1558m", "finetune"}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_is_consistent(name):
    from flax_gpt2.train.model_config import model_config

    config, workdir = parse_args(["train", "--config", f"configs/{name}.py", "--workdir", "/tmp/x"])
    assert workdir == "/tmp/x"
    assert config.steps > 0 and config.checkpoint_every > 0
    assert {"data", "fsdp", "tensor"} <= set(config.mesh)
    micro = config.micro_batch_size or config.batch_size
    assert config.batch_size % micro == 0
    if not config.init_from:
        gpt2, pretrained = model_config(config)
        assert pretrained is None and config.data.seq_len <= gpt2.n_positions


@pytest.mark.parametrize("name, preset, lr", [("gpt2_124m", "gpt2", 6e-4), ("gpt2_355m", "gpt2-medium", 3e-4),
                                              ("gpt2_774m", "gpt2-large", 2.5e-4), ("gpt2_1558m", "gpt2-xl", 2e-4)])
def test_pretraining_configs_mirror_gpt2(name, preset, lr):
    config, _ = parse_args(["train", "--config", f"configs/{name}.py", "--workdir", "w"])
    assert (config.model.preset, config.data.seq_len, config.batch_size) == (preset, 1024, 512)
    assert config.optimizer.lr == lr and config.optimizer.warmup_steps > 0 and config.optimizer.min_lr_ratio < 1
    assert config.optimizer.weight_decay == 0.1 and config.model.param_dtype == "float32"


def test_dotted_overrides_are_typed():
    config, _ = parse_args(["train", "--config=configs/tiny.py", "--workdir=w", "--config.steps=7",
                            "--config.mesh.fsdp=2", "--config.optimizer.lr=3e-4", "--config.model.n_layer=3",
                            "--config.data.source=corpus.jsonl", "--config.model.remat=True"])
    assert (config.steps, config.mesh.fsdp, config.optimizer.lr, config.model.n_layer) == (7, 2, 3e-4, 3)
    assert config.data.source == "corpus.jsonl" and config.model.remat is True


@pytest.mark.parametrize("argv, message", [
    (["--config.stepz=3"], "unknown config key 'stepz'"),
    (["--config.mesh.dat=2"], "unknown config key 'mesh.dat'"),
    (["--config.steps=ten"], "invalid literal"),
    (["stray"], "unexpected arguments"),
])
def test_bad_command_lines(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(["train", "--config", "configs/tiny.py", "--workdir", "w", *argv])


def test_missing_config_or_workdir():
    with pytest.raises(UsageError, match="--config is required"):
        parse_args(["train", "--workdir", "w"])
    with pytest.raises(UsageError, match="--workdir is required"):
        parse_args(["train", "--config", "configs/tiny.py"])
    with pytest.raises(UsageError, match=r"configs/nope.py: no such file; shipped configs: .*shakespeare, tiny"):
        parse_args(["train", "--config", "configs/nope.py", "--workdir", "w"])


def test_broken_config_file_is_a_usage_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(UsageError, match="cannot load the config file: SyntaxError"):
        parse_args(["train", "--config", str(broken), "--workdir", "w"])


@pytest.mark.parametrize("spelling", ["tiny", "tiny.py", "configs/tiny.py", "--config=tiny"])
def test_shipped_configs_load_by_name_outside_a_checkout(spelling, tmp_path, monkeypatch):
    """pip users have no configs/ folder beside them: a shipped config's name (or the checkout's path to it)
    loads the installed flax_gpt2/configs file, the same config as the checkout's."""
    from_checkout, _ = parse_args(["train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", "w"])
    monkeypatch.chdir(tmp_path)
    argv = [spelling] if spelling.startswith("--") else ["--config", spelling]
    config, _ = parse_args(["train", *argv, "--workdir", "w", "--config.steps=3"])
    assert config.steps == 3 and config.model.preset == from_checkout.model.preset == "tiny"
    assert config.data.seq_len == from_checkout.data.seq_len and config.batch_size == from_checkout.batch_size
    (tmp_path / "tiny").mkdir()  # a local path of that name wins (and is no config file)
    with pytest.raises(UsageError, match="cannot load the config file"):
        parse_args(["train", "--config", "tiny", "--workdir", "w"])


def test_cli_reports_unknown_key_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir", "w",
                           "--config.optimizer.lrr=1"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    assert "error: unknown config key 'optimizer.lrr'" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_offline_tokenizer_error_names_the_config_flag(tmp_path):
    """A hub tokenizer name with no network and empty caches (not GPT-2's, whose files ship with the
    package): one error line that says how to pass a folder on this command line, not in Python."""
    (tmp_path / "tiktoken").mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hf"),
               TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken"))
    proc = subprocess.run([sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir",
                           str(tmp_path / "w"), "--config.data.tokenizer=someone/their-bpe",
                           f"--config.data.cache_dir={tmp_path / 'cache'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith("train: error: could not load the tokenizer for 'someone/their-bpe'")
    assert "e.g. --config.data.tokenizer=DIR" in errors[0] and "get_tokenizer(" not in errors[0]


def _tiny(tmp_path, **overrides):
    from flax_gpt2.configs import tiny

    config = tiny.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    config.progress_bar = False
    set_dotted(config, overrides)
    return config


@pytest.mark.parametrize("overrides, error, message", [
    ({"data.seq_len": 512}, ValueError, "data.seq_len=512 exceeds the model's n_positions=256"),
    ({"data.source": "/nonexistent/corpus.txt"}, FileNotFoundError, "data file not found: '/nonexistent/corpus.txt'"),
    ({"micro_batch_size": 3}, ValueError, "batch_size=8 must be a positive multiple of micro_batch_size=3"),
    ({"mesh.data": 3}, ValueError, r"mesh \(data=3, fsdp=1, tensor=1\) needs 3 devices but there are 1"),
    ({"model.dtype": "fp8"}, ValueError, "config.model.dtype='fp8'"),
    ({"model.preset": "gpt5"}, ValueError, "unknown GPT-2 preset 'gpt5'"),
])
def test_bad_settings_are_clear_errors(tmp_path, overrides, error, message):
    from flax_gpt2.train.train_loop import train_and_evaluate

    with pytest.raises(error, match=message):
        train_and_evaluate(_tiny(tmp_path, **overrides), str(tmp_path / "run"))


def test_finetune_starts_from_hf_weights(hf_tiny, tmp_path):
    import jax

    import flax_gpt2
    from flax_gpt2.configs import finetune
    from flax_gpt2.checkpoints import run_folders as run_checkpoint
    from flax_gpt2.train.train_loop import train_and_evaluate

    _, shared_folder = hf_tiny
    folder = tmp_path / "pretrained"
    shutil.copytree(shared_folder, folder)
    config = finetune.get_config()
    config.init_from = str(folder)
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.seq_len = 64
    config.batch_size, config.micro_batch_size = 4, 2
    config.steps, config.eval_batches, config.progress_bar, config.sample.prompt = 2, 1, False, ""
    config.optimizer.lr = 0.0  # the weights must come back exactly as loaded
    result = train_and_evaluate(config, str(tmp_path / "run"))
    assert result["step"] == 2 and np.isfinite(result["loss"])
    _, trained = run_checkpoint.load_run(tmp_path / "run")
    _, expected = flax_gpt2.from_pretrained(str(folder), progress=False)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Resuming takes the architecture and weights from the run's own checkpoint: init_from is not read
    # again (here it is gone), and the weights are still the loaded ones.
    shutil.rmtree(folder)
    config.steps = 3
    assert train_and_evaluate(config, str(tmp_path / "run"))["step"] == 3
    _, resumed = run_checkpoint.load_run(tmp_path / "run")
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    config.model.n_layer = 4
    with pytest.raises(ValueError, match="init_from=.* fixes the architecture"):
        train_and_evaluate(config, str(tmp_path / "run2"))

"""docs/TPU_PODS.md's FineWeb-Edu walk-through is made of commands that work: every `scripts/tpu_pod.sh` line
dry-runs (exit 0), the `tokenize_corpus` command's flags parse with its own parser, and the training overrides
load configs/gpt2_124m_fineweb.py through the training app's config checks."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from flax_gpt2.train import tokenize_corpus
from flax_gpt2.train.config_checks import check_config
from flax_gpt2.train.config_cli import parse_args

ROOT = Path(__file__).resolve().parents[1]


def walkthrough_lines() -> list[str]:
    text = (ROOT / "docs" / "TPU_PODS.md").read_text()
    block = text.split("## End to end: GPT-2 124M on FineWeb-Edu", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", "").splitlines() if line.strip() and not line.startswith("#")]


def test_walkthrough_tpu_pod_commands_dry_run():
    commands = [shlex.split(line)[1:] for line in walkthrough_lines() if line.startswith("scripts/tpu_pod.sh ")]
    assert [c[0] for c in commands] == ["create", "install", "babysit", "logs", "delete"]
    for args in commands:
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "tpu_pod.py"), "--dry-run", *args],
                              capture_output=True, text=True, env={**os.environ, "TMPDIR": "/tmp"}, timeout=60)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "\n+ gcloud " in "\n" + proc.stdout, args  # it prints the commands it would run
        if args[0] == "babysit":  # and the training command carries the overrides
            assert ("--config.data.source=gs://my-bucket/tokens/fineweb-edu-10BT --config.watchdog_exit=True"
                    in proc.stdout)


def test_walkthrough_tokenize_command_parses():
    (line,) = [line for line in walkthrough_lines() if "tokenize_corpus" in line]
    remote = shlex.split(line)[-1].removeprefix("--command=")
    command = remote.split("&&", 1)[1].split(">>", 1)[0]
    argv = shlex.split(command)
    assert argv[:3] == ["python3", "-m", "flax_gpt2.train.tokenize_corpus"]
    args = tokenize_corpus.build_parser().parse_args(argv[3:])
    assert (args.source, args.out_dir, args.dataset_config) == (
        "HuggingFaceFW/fineweb-edu", "gs://my-bucket/tokens/fineweb-edu-10BT", "sample-10BT")
    assert args.distributed and not args.progress


def test_walkthrough_training_overrides_load_and_check():
    (line,) = [line for line in walkthrough_lines() if line.startswith("scripts/tpu_pod.sh babysit")]
    argv = shlex.split(line)
    overrides = argv[argv.index("--") + 1:]
    config_path = argv[argv.index("--config") + 1]
    workdir = argv[argv.index("--workdir") + 1]
    config, parsed_workdir = parse_args(["train", "--config", str(ROOT / config_path), "--workdir", workdir,
                                         *overrides])
    check_config(config)
    assert parsed_workdir == workdir
    tokenized = [line for line in walkthrough_lines() if "tokenize_corpus" in line][0]
    assert config.data.source in tokenized  # training reads the folder step 2 wrote
    assert config.watchdog_exit is True and config.profile_steps == "1000:1003"
    assert (config.steps, config.batch_size, config.data.seq_len) == (19_073, 512, 1024)

"""scripts/tpu_pod.py: the exact gcloud commands it prints and runs (a fake `gcloud` on PATH records them),
the babysit relaunch loop, usage errors, and the remote shell scripts themselves (run here with bash)."""

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tpu_pod.py"
SLICE = ["--name", "gpt2-pod", "--zone", "us-central2-b"]
TRAIN = ["--config", "configs/gpt2_124m.py", "--workdir", "gs://bucket/gpt2"]

PREFIX = "gcloud compute tpus tpu-vm"
SSH = f"{PREFIX} ssh gpt2-pod --zone=us-central2-b --worker=all --quiet"
PID = "/tmp/flax_gpt2-train.pid"
ALIVE = f'[ -f {PID} ] && kill -0 "$(cat {PID})" 2>/dev/null'


def run_script(overrides: str = "") -> str:
    return (f'cd ~/flax_gpt2 && if [ ! -f ~/train.exit ] && {ALIVE}; then echo "$(hostname): already running"; '
            f'else rm -f ~/train.exit; (trap "" HUP; python3 -m train --config configs/gpt2_124m.py '
            f'--workdir gs://bucket/gpt2 --config.distributed.enabled=True{overrides} >> ~/train.log 2>&1; '
            f'echo $? > ~/train.exit) > /dev/null 2>&1 < /dev/null & echo $! > {PID}; fi')


STATUS_SCRIPT = (f'if [ -f ~/train.exit ]; then echo "$(hostname): exited $(cat ~/train.exit)"; '
                 f'elif {ALIVE}; then echo "$(hostname): running"; else echo "$(hostname): not started"; fi')
PIP = "cd ~/flax_gpt2 && python3 -m pip install --quiet -e \".[tpu,gcs]\""
GIT_URL = "https://github.com/example/flax_gpt2.git"

CREATE = (f"{PREFIX} create gpt2-pod --zone=us-central2-b --accelerator-type=v4-32 "
          "--version=tpu-ubuntu2204-base --spot")
INSTALL_GIT = shlex.join([*SSH.split(), f"--command=set -e; rm -rf ~/flax_gpt2 && git clone --quiet {GIT_URL} "
                          f"~/flax_gpt2 && git -C ~/flax_gpt2 checkout --quiet v1.0 && {PIP}"])
RUN = shlex.join([*SSH.split(), "--command=" + run_script()])
DESCRIBE = f"{PREFIX} describe gpt2-pod --zone=us-central2-b '--format=value(state)'"
STATUS = shlex.join([*SSH.split(), "--command=" + STATUS_SCRIPT])
DELETE = f"{PREFIX} delete gpt2-pod --zone=us-central2-b --quiet"
RESULT = "gcloud storage cat gs://bucket/gpt2/result.json"


def tpu_pod(*args, env=None, check_code=None):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=60)
    if check_code is not None:
        assert proc.returncode == check_code, (proc.stdout, proc.stderr)
    return proc


def printed(proc) -> list[str]:
    """The commands the script printed (without the `+ ` prefix)."""
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


# --------------------------------------------------------------------------------------------- dry run

@pytest.mark.parametrize("args, expected", [
    (["create", *SLICE, "--accelerator_type", "v4-32", "--spot"], [CREATE]),
    (["create", *SLICE, "--accelerator_type", "v5litepod-16", "--preemptible", "--project", "my-proj"],
     [f"{PREFIX} create gpt2-pod --zone=us-central2-b --project=my-proj --accelerator-type=v5litepod-16 "
      "--version=v2-alpha-tpuv5-lite --preemptible"]),
    (["create", *SLICE, "--accelerator_type", "v6e-64", "--version", "my-runtime"],
     [f"{PREFIX} create gpt2-pod --zone=us-central2-b --accelerator-type=v6e-64 --version=my-runtime"]),
    (["install", *SLICE, "--repo", GIT_URL, "--ref", "v1.0"], [INSTALL_GIT]),
    (["run", *SLICE, *TRAIN], [RUN]),
    (["run", *SLICE, *TRAIN, "--", "--config.steps=1000", "--config.data.source=gs://bucket/my tokens"],
     [shlex.join([*SSH.split(), "--command=" + run_script(
         " --config.steps=1000 '--config.data.source=gs://bucket/my tokens'")])]),
    (["status", *SLICE], [DESCRIBE, STATUS]),
    (["logs", *SLICE], [f"{PREFIX} ssh gpt2-pod --zone=us-central2-b --worker=0 --quiet "
                        "'--command=tail -n 100 ~/train.log'"]),
    (["logs", *SLICE, "--worker", "3", "--lines", "20", "--follow"],
     [f"{PREFIX} ssh gpt2-pod --zone=us-central2-b --worker=3 --quiet '--command=tail -n 20 -f ~/train.log'"]),
    (["delete", *SLICE], [DELETE]),
])
def test_dry_run_prints_the_exact_commands(args, expected):
    proc = tpu_pod("--dry-run", *args, check_code=0)
    assert printed(proc) == expected
    assert proc.stdout == "".join(f"+ {line}\n" for line in expected)
    # `--dry-run` after the command is the same
    assert tpu_pod(args[0], "--dry-run", *args[1:], check_code=0).stdout == proc.stdout


def test_dry_run_install_from_local_checkout_ships_a_git_archive(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = tpu_pod("install", *SLICE, "--dry-run", env=env, check_code=0)
    tarball = tmp_path / "flax_gpt2-gpt2-pod.tar.gz"
    unpack = "rm -rf ~/flax_gpt2 && mkdir -p ~/flax_gpt2 && tar -xzf ~/flax_gpt2.tar.gz -C ~/flax_gpt2"
    assert printed(proc) == [
        f"git -C {ROOT} archive --format=tar.gz --output={tarball} HEAD",
        f"{PREFIX} scp {tarball} gpt2-pod:flax_gpt2.tar.gz --zone=us-central2-b --worker=all --quiet",
        shlex.join([*SSH.split(), f"--command=set -e; {unpack} && {PIP}"]),
    ]
    assert not tarball.exists()


def test_dry_run_babysit_prints_its_plan():
    proc = tpu_pod("babysit", *SLICE, *TRAIN, "--accelerator_type", "v4-32", "--spot", "--repo", GIT_URL,
                   "--ref", "v1.0", "--dry-run", check_code=0)
    assert printed(proc) == [RESULT, DESCRIBE, STATUS, DELETE, CREATE, INSTALL_GIT, RUN, RUN]
    assert all(line.startswith(("+ ", "# ")) for line in proc.stdout.splitlines())  # pasteable as a script


# ----------------------------------------------------------------------------- a fake gcloud on PATH

FAKE = textwrap.dedent("""\
    #!{python}
    # A fake gcloud/git: appends its argv to calls.jsonl; answers from script.json (see tests).
    import json, os, sys
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]
    with open(os.path.join(here, "calls.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\\n")
    with open(os.path.join(here, "script.json")) as f:
        script = json.load(f)

    def pop(key, default):
        values = script.get(key) or [default]
        value = values.pop(0) if len(values) > 1 else values[0]
        script[key] = values
        with open(os.path.join(here, "script.json"), "w") as f:
            json.dump(script, f)
        return value

    words = " ".join(argv)
    if argv[0] == "git":
        sys.exit(0)
    verb = argv[4] if argv[1:4] == ["compute", "tpus", "tpu-vm"] else " ".join(argv[1:3])
    command = next((a for a in argv if a.startswith("--command=")), "")
    if "not started" in command:
        verb = "status"
    elif "trap" in command:
        verb = "run"
    if pop("fail_" + verb, 0):
        sys.stderr.write(f"ERROR: (gcloud) {{verb}} failed\\n")
        sys.exit(1)
    if verb == "describe":
        state = pop("describe", "READY")
        if state == "NOT_FOUND":
            sys.stderr.write("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found\\n")
            sys.exit(1)
        print(state)
    elif verb == "storage cat":
        runs = sum("trap" in line for line in open(os.path.join(here, "calls.jsonl")))
        if runs < script.get("done_after_runs", 10**9):
            print(json.dumps({{"stopped": "preempted"}}) if runs else "", end="")
            if not runs:
                sys.stderr.write("ERROR: (gcloud.storage.cat) The following URLs matched no objects\\n")
                sys.exit(1)
        else:
            print(json.dumps({{"step": 10, "stopped": "done"}}))
    elif verb == "status":
        for line in pop("workers", ["not started", "not started"]):
            print(f"t1v-n-0-w-{{line[0]}}: {{line[1]}}" if isinstance(line, list) else f"host: {{line}}")
""")


@pytest.fixture
def fake_gcloud(tmp_path):
    """Puts a fake `gcloud` and `git` first on PATH; returns (env, set_script, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "git"):
        exe = bin_dir / name
        exe.write_text(FAKE.format(python=sys.executable))
        exe.chmod(0o755)
    (bin_dir / "script.json").write_text("{}")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path)}

    def set_script(**script):
        (bin_dir / "script.json").write_text(json.dumps(script))

    def calls() -> list[list[str]]:
        log = bin_dir / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, set_script, calls


@pytest.mark.parametrize("args", [
    ["create", *SLICE, "--accelerator_type", "v4-32", "--spot"],
    ["install", *SLICE, "--repo", GIT_URL, "--ref", "v1.0"],
    ["install", *SLICE],
    ["run", *SLICE, *TRAIN, "--", "--config.steps=1000", "--config.data.source=gs://bucket/my tokens"],
    ["logs", *SLICE, "--worker", "all"],
    ["delete", *SLICE, "--project", "my-proj"],
])
def test_runs_exactly_the_printed_commands(fake_gcloud, args):
    env, _, calls = fake_gcloud
    proc = tpu_pod(*args, env=env, check_code=0)
    assert [shlex.split(line) for line in printed(proc)] == calls()  # printed == run, and copy-pasteable
    assert printed(proc) == printed(tpu_pod("--dry-run", *args, env=env, check_code=0))


def test_status_shows_the_state_then_each_worker(fake_gcloud):
    env, set_script, calls = fake_gcloud
    set_script(describe=["READY"], workers=[[[0, "running"], [1, "exited 1"]]])
    proc = tpu_pod("status", *SLICE, env=env, check_code=0)
    assert [" ".join(c[:5]) for c in calls()] == [f"{PREFIX} describe", f"{PREFIX} ssh"]
    assert "gpt2-pod: READY" in proc.stdout
    assert "t1v-n-0-w-0: running\nt1v-n-0-w-1: exited 1" in proc.stdout
    set_script(describe=["NOT_FOUND"])
    assert "gpt2-pod: not found" in tpu_pod("status", *SLICE, env=env, check_code=0).stdout


def test_a_failed_gcloud_command_exits_1_and_names_it(fake_gcloud):
    env, set_script, calls = fake_gcloud
    set_script(fail_create=[1])
    proc = tpu_pod("create", *SLICE, "--accelerator_type", "v4-8", env=env, check_code=1)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tpu_pod: error: gcloud failed with exit code 1: {PREFIX} create gpt2-pod --zone=us-central2-b "
        "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base")


# ------------------------------------------------------------------------------------------ babysit

BABYSIT = ["babysit", *SLICE, *TRAIN, "--accelerator_type", "v4-32", "--spot", "--repo", GIT_URL,
           "--ref", "v1.0", "--poll_seconds", "0"]


def kinds(calls) -> list[str]:
    """Each call as one word: result, describe, status, delete, create, install, run."""
    out = []
    for argv in calls:
        command = next((a for a in argv if a.startswith("--command=")), "")
        if argv[1:3] == ["storage", "cat"]:
            out.append("result")
        elif "not started" in command:
            out.append("status")
        elif "trap" in command:
            out.append("run")
        elif "pip install" in command:
            out.append("install")
        else:
            out.append(argv[4])
    return out


def test_babysit_recreates_a_preempted_slice_and_reruns_until_done(fake_gcloud):
    env, set_script, calls = fake_gcloud
    # PREEMPTED once, then READY; the first run stops at the preemption (exit 0, result "preempted");
    # result.json says "done" once the second run has started.
    set_script(describe=["PREEMPTED", "READY"], workers=[[[0, "exited 0"], [1, "exited 0"]]],
               done_after_runs=2)
    proc = tpu_pod(*BABYSIT, env=env, check_code=0)
    assert kinds(calls()) == ["result", "describe", "delete", "create", "install", "run",
                              "result", "describe", "status", "run",
                              "result"]
    assert [shlex.join(c) for c in calls() if kinds([c]) != ["status"]][:6] == [
        RESULT, DESCRIBE, DELETE, CREATE, INSTALL_GIT, RUN]
    assert "restart 1/10" in proc.stdout and "says the run is done" in proc.stdout


def test_babysit_creates_a_missing_slice_and_waits_while_running(fake_gcloud):
    env, set_script, calls = fake_gcloud
    set_script(describe=["NOT_FOUND", "CREATING", "READY"],
               workers=[[[0, "running"]], [[0, "running"]], [[0, "exited 0"]]], done_after_runs=2)
    tpu_pod(*BABYSIT, env=env, check_code=0)
    assert kinds(calls()) == ["result", "describe", "create", "install", "run",
                              "result", "describe",  # CREATING: wait
                              "result", "describe", "status",  # running
                              "result", "describe", "status",  # running
                              "result", "describe", "status", "run",  # stopped without "done": rerun
                              "result"]


def test_babysit_installs_before_its_first_run_on_an_existing_slice(fake_gcloud):
    env, set_script, calls = fake_gcloud
    set_script(describe=["READY"], workers=[["not started"]], done_after_runs=1)
    tpu_pod(*BABYSIT, env=env, check_code=0)
    assert kinds(calls()) == ["result", "describe", "status", "install", "run", "result"]


def test_babysit_stops_on_a_crash(fake_gcloud):
    env, set_script, calls = fake_gcloud
    set_script(describe=["READY"], workers=[[[0, "exited 0"], [1, "exited 1"]]])
    proc = tpu_pod(*BABYSIT, env=env, check_code=1)
    assert kinds(calls()) == ["result", "describe", "status", "describe"]  # READY again: not a preemption
    assert proc.stderr.count("\n") == 1 and "training exited with status {'t1v-n-0-w-1': 1}" in proc.stderr


def test_babysit_restarts_a_run_its_hang_watchdog_stopped(fake_gcloud):
    from flax_gpt2.train.watchdog import HANG_EXIT_CODE

    env, set_script, calls = fake_gcloud
    # Host 1 froze: its watchdog exited 75; host 0's collective then failed (exit 1). Both finish the rerun.
    set_script(describe=["READY"], workers=[[[0, "exited 1"], [1, f"exited {HANG_EXIT_CODE}"]]],
               done_after_runs=1)
    proc = tpu_pod(*BABYSIT, env=env, check_code=0)
    assert kinds(calls()) == ["result", "describe", "status", "install", "run", "result"]
    assert "hang watchdog stopped the run on t1v-n-0-w-1" in proc.stdout and "/hangs/" in proc.stdout


def test_babysit_gives_up_after_max_restarts(fake_gcloud):
    env, set_script, calls = fake_gcloud
    set_script(describe=["NOT_FOUND"], fail_create=[1])  # no capacity, ever
    proc = tpu_pod(*BABYSIT, "--max_restarts", "2", env=env, check_code=1)
    assert kinds(calls()).count("create") == 3
    assert proc.stderr.strip().splitlines()[-1].startswith("tpu_pod: error: gave up after 2 restarts")


def test_babysit_exits_at_once_when_already_done(fake_gcloud):
    env, set_script, calls = fake_gcloud
    set_script(done_after_runs=0)
    tpu_pod(*BABYSIT, env=env, check_code=0)
    assert kinds(calls()) == ["result"]


# ------------------------------------------------------------------------------------- usage errors

@pytest.mark.parametrize("args, message", [
    (["run", *SLICE, "--config", "configs/tiny.py", "--workdir", "runs/tiny"], "must be a gs://bucket/path URL"),
    (["babysit", *SLICE, "--accelerator_type", "v4-8", "--config", "configs/tiny.py", "--workdir", "/tmp/x"],
     "must be a gs://bucket/path URL"),
    (["create", *SLICE, "--accelerator_type", "v9-8"], "--accelerator_type 'v9-8' is not a TPU type"),
    (["create", *SLICE, "--accelerator_type", "tpu-v4"], "is not a TPU type"),
    (["create", *SLICE], "create needs --accelerator_type"),
    (["run", *SLICE, "--workdir", "gs://b/x"], "run needs --config"),
    (["create", "--name", "My_Pod", "--zone", "z", "--accelerator_type", "v4-8"], "--name 'My_Pod'"),
    (["create", *SLICE, "--accelerator_type", "v4-8", "--spot", "--preemptible"], "not allowed with"),
    (["run", *SLICE, *TRAIN, "--config.steps=3"], "put --config.steps=3 after `--`"),
    (["run", *SLICE, *TRAIN, "--", "steps=3"], "is not a --config.KEY=VALUE override"),
    (["delete", *SLICE, "--", "--config.steps=3"], "only apply to run and babysit"),
    (["install", *SLICE, "--repo", "/no/such/checkout"], "neither a git URL nor a local folder"),
    (["logs", *SLICE, "--worker", "first"], "--worker 'first'"),
    (["frobnicate", *SLICE], "invalid choice"),
    (["delete", "--zone", "z"], "required: --name"),
])
def test_usage_errors_exit_2_with_one_line(args, message):
    proc = tpu_pod(*args, check_code=2)
    assert proc.stdout == ""  # nothing printed, nothing run
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("tpu_pod: error: "), proc.stderr
    assert message in proc.stderr


def test_shell_wrapper():
    proc = subprocess.run([str(ROOT / "scripts" / "tpu_pod.sh"), "--dry-run", "delete", *SLICE],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and printed(proc) == [DELETE]


# ------------------------------------------------------------- the remote scripts, run here with bash

def test_remote_run_and_status_scripts(tmp_path):
    """The scripts `run` and `status` send to every worker: start once, report running, then the exit code."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "flax_gpt2").mkdir(parents=True)
    bin_dir.mkdir()
    fake_python = bin_dir / "python3"  # "trains" until ~/release exists, then exits 3
    fake_python.write_text('#!/bin/sh\necho "args: $*"\nwhile [ ! -f ~/release ]; do sleep 0.05; done\nexit 3\n')
    fake_python.chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    commands = {}
    for name, args in (("run", [*TRAIN, "--", "--config.data.source=gs://bucket/my tokens"]), ("status", [])):
        line = printed(tpu_pod("--dry-run", name, *SLICE, *args, check_code=0))[-1]
        command = next(a for a in shlex.split(line) if a.startswith("--command="))[len("--command="):]
        assert PID in command
        commands[name] = command.replace(PID, str(tmp_path / "train.pid"))  # this test's own pid file

    def remote(name):
        proc = subprocess.run(["bash", "-c", commands[name]], capture_output=True, text=True, env=env, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split(": ", 1)[-1].strip()

    assert remote("status") == "not started"
    assert remote("run") == ""  # returns at once: the job runs in the background
    assert remote("status") == "running"
    assert remote("run") == "already running"
    (home / "release").touch()
    deadline = time.time() + 20
    while remote("status") == "running" and time.time() < deadline:
        time.sleep(0.05)
    assert remote("status") == "exited 3"
    assert (home / "train.log").read_text() == (
        "args: -m train --config configs/gpt2_124m.py --workdir gs://bucket/gpt2 "
        "--config.distributed.enabled=True --config.data.source=gs://bucket/my tokens\n")
    assert remote("run") == ""  # a finished job can be started again; its output is appended
    while remote("status") != "exited 3" and time.time() < deadline:
        time.sleep(0.05)
    assert (home / "train.log").read_text().count("args: -m train") == 2


def test_docs_show_the_commands_the_tool_prints():
    """docs/TPU_PODS.md's step-by-step block: each `scripts/tpu_pod.sh ...` is followed by its exact output."""
    text = (ROOT / "docs" / "TPU_PODS.md").read_text()
    block = text.split("## Step by step", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    examples, command = [], None
    for line in block.replace("\\\n", "").splitlines():
        if line.startswith("scripts/tpu_pod.sh "):
            command = (shlex.split(line)[1:], [])
            examples.append(command)
        elif line.startswith("+ "):
            command[1].append(line)
    assert len(examples) == 7 and all(expected for _, expected in examples)
    env = {**os.environ, "TMPDIR": "/tmp"}
    for args, expected in examples:
        proc = tpu_pod("--dry-run", *args, env=env, check_code=0)
        assert proc.stdout.replace(str(ROOT), "/path/to/flax_gpt2").splitlines() == expected

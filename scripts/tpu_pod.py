"""Run `python -m train` on a Cloud TPU VM slice: create, install, run, status, logs, delete, babysit.

    python scripts/tpu_pod.py create  --name gpt2 --zone us-central2-b --accelerator_type v4-32 --spot
    python scripts/tpu_pod.py install --name gpt2 --zone us-central2-b
    python scripts/tpu_pod.py run     --name gpt2 --zone us-central2-b --config configs/gpt2_124m.py \
        --workdir gs://bucket/gpt2_124m -- --config.data.source=...
    python scripts/tpu_pod.py logs    --name gpt2 --zone us-central2-b [--worker 3] [--follow]
    python scripts/tpu_pod.py delete  --name gpt2 --zone us-central2-b
    python scripts/tpu_pod.py babysit ...create and run flags...   # spot/preemptible: recreate until done

Every command is printed (`+ ...`, copy-pasteable) before it runs; `--dry-run` prints them only. Exit codes
follow the project's convention (flax_gpt2/utils/cli.py): 2 for a usage error (one line), 1 for a failed command
(named), 130 for Ctrl-C. The script needs only the standard library and `gcloud`, so it runs on a laptop
without JAX. See docs/TPU_PODS.md.

On every worker the project lives in ~/flax_gpt2, and `run` starts, in the background,
`python3 -m train --config CONFIG --workdir WORKDIR --config.distributed.enabled=True [OVERRIDES]` with its
output appended to ~/train.log, its pid in /tmp/flax_gpt2-train.pid and, when it ends, its exit status in
~/train.exit.
`run` does not start a second copy on a worker where one is still running.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "tpu_pod"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Paths on every worker, left to the remote shell to expand.
REMOTE_DIR = "~/flax_gpt2"
REMOTE_LOG = "~/train.log"
REMOTE_PID = "/tmp/flax_gpt2-train.pid"  # /tmp is emptied at boot: no stale pid after a VM restarts
REMOTE_EXIT = "~/train.exit"
EXTRAS = "[tpu,gcs]"  # jax[tpu], and the gs:// dependencies the workdir needs

# The TPU VM software version to use with JAX, per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
ACCELERATOR_TYPE = re.compile(r"^(%s)-([1-9][0-9]*)$" % "|".join(RUNTIME_VERSIONS))
TPU_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
OVERRIDE = re.compile(r"^--config\.[A-Za-z_][A-Za-z0-9_.]*=")
# States after which a spot/preemptible slice cannot be restarted, only deleted and created again.
RECREATE_STATES = ("PREEMPTED", "TERMINATED")
MAX_DESCRIBE_FAILURES = 5
# The exit status of a run the hang watchdog stopped (train/watchdog.py HANG_EXIT_CODE): restart it.
HANG_EXIT_CODE = 75  # babysit: consecutive failed `describe` calls before giving up
WORKER_STATUS = re.compile(r"^(?P<host>\S+): (?P<status>running|not started|exited (?P<code>-?[0-9]+))$")


class UsageError(ValueError):
    """A bad command line: one line on stderr, exit code 2."""


class CommandFailed(RuntimeError):
    """A command exited non-zero: exit code 1, and the message names the command."""

    def __init__(self, argv: list[str], returncode: int | None, detail: str = ""):
        what = "not found on PATH" if returncode is None else f"failed with exit code {returncode}"
        super().__init__(f"{argv[0]} {what}: {shlex.join(argv)}" + (f" ({detail})" if detail else ""))


class Runner:
    """Prints each command (`+ ...`) and runs it unless `dry_run`."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, argv: list[str], *, capture: bool = False, check: bool = True):
        """Runs `argv`; returns the CompletedProcess (stdout/stderr as text when `capture`), or None when
        dry-running. Raises CommandFailed for a non-zero exit when `check`."""
        print("+ " + shlex.join(argv), flush=True)
        if self.dry_run:
            return None
        pipe = subprocess.PIPE if capture else None
        try:
            done = subprocess.run(argv, stdout=pipe, stderr=pipe, text=True)
        except FileNotFoundError:
            raise CommandFailed(argv, None) from None
        if check and done.returncode:
            raise CommandFailed(argv, done.returncode, _last_line(done.stderr) if capture else "")
        return done


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Pod:
    """The gcloud commands for one slice, as argv lists."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.common = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])

    def _tpu(self, verb: str, *flags: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.args.name, *self.common, *flags]

    def _ssh(self, worker: str, script: str) -> list[str]:
        return self._tpu("ssh", f"--worker={worker}", "--quiet", f"--command={script}")

    def create(self) -> list[str]:
        a = self.args
        lifecycle = ["--spot"] if a.spot else ["--preemptible"] if a.preemptible else []
        return self._tpu("create", f"--accelerator-type={a.accelerator_type}", f"--version={a.version}", *lifecycle)

    def install(self) -> list[list[str]]:
        """Ships the repository (a git URL is cloned on every worker; a local checkout's `--ref` is sent as a
        `git archive`, so uncommitted changes are not) and pip-installs it with the TPU extras."""
        a = self.args
        pip = f"cd {REMOTE_DIR} && python3 -m pip install --quiet -e \".{EXTRAS}\""
        if _is_git_url(a.repo):
            clone = (f"rm -rf {REMOTE_DIR} && git clone --quiet {shlex.quote(a.repo)} {REMOTE_DIR} && "
                     f"git -C {REMOTE_DIR} checkout --quiet {shlex.quote(a.ref)}")
            return [self._ssh("all", f"set -e; {clone} && {pip}")]
        tarball = self.tarball()
        unpack = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
                  f"tar -xzf ~/flax_gpt2.tar.gz -C {REMOTE_DIR}")
        return [
            ["git", "-C", a.repo, "archive", "--format=tar.gz", f"--output={tarball}", a.ref],
            ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{a.name}:flax_gpt2.tar.gz", *self.common,
             "--worker=all", "--quiet"],
            self._ssh("all", f"set -e; {unpack} && {pip}"),
        ]

    def tarball(self) -> str:
        return os.path.join(tempfile.gettempdir(), f"flax_gpt2-{self.args.name}.tar.gz")

    def train_command(self) -> str:
        a = self.args
        return shlex.join(["python3", "-m", "train", "--config", a.config, "--workdir", a.workdir,
                           "--config.distributed.enabled=True", *a.overrides])

    def run(self) -> list[str]:
        """Starts training in the background on every worker (unless it is already running there)."""
        # A subshell that ignores SIGHUP (so the job outlives the ssh session) and records the exit status.
        job = f"(trap \"\" HUP; {self.train_command()} >> {REMOTE_LOG} 2>&1; echo $? > {REMOTE_EXIT})"
        script = (f"cd {REMOTE_DIR} && if [ ! -f {REMOTE_EXIT} ] && {_alive()}; "
                  f"then echo \"$(hostname): already running\"; "
                  f"else rm -f {REMOTE_EXIT}; {job} > /dev/null 2>&1 < /dev/null & echo $! > {REMOTE_PID}; fi")
        return self._ssh("all", script)

    def describe(self) -> list[str]:
        return self._tpu("describe", "--format=value(state)")

    def workers(self) -> list[str]:
        """Prints `HOST: running`, `HOST: exited N` or `HOST: not started` on every worker."""
        script = (f"if [ -f {REMOTE_EXIT} ]; then echo \"$(hostname): exited $(cat {REMOTE_EXIT})\"; "
                  f"elif {_alive()}; then echo \"$(hostname): running\"; "
                  f"else echo \"$(hostname): not started\"; fi")
        return self._ssh("all", script)

    def logs(self) -> list[str]:
        a = self.args
        return self._ssh(a.worker, f"tail -n {a.lines}{' -f' if a.follow else ''} {REMOTE_LOG}")

    def delete(self) -> list[str]:
        return self._tpu("delete", "--quiet")

    def result(self) -> list[str]:
        return ["gcloud", "storage", "cat", self.args.workdir.rstrip("/") + "/result.json",
                *self.common[1:]]


def _alive() -> str:
    return f"[ -f {REMOTE_PID} ] && kill -0 \"$(cat {REMOTE_PID})\" 2>/dev/null"


def _is_git_url(repo: str) -> bool:
    return "://" in repo or bool(re.match(r"^[\w.-]+@[\w.-]+:", repo))


# ---------------------------------------------------------------------------------------------- commands

def cmd_create(pod: Pod, run: Runner) -> int:
    run(pod.create())
    return 0


def cmd_install(pod: Pod, run: Runner) -> int:
    for argv in pod.install():
        run(argv)
    return 0


def cmd_run(pod: Pod, run: Runner) -> int:
    run(pod.run())
    return 0


def cmd_status(pod: Pod, run: Runner) -> int:
    if run.dry_run:
        run(pod.describe())
        run(pod.workers())
        return 0
    state = _state(pod, run)
    print(f"{pod.args.name}: {state or 'not found'}", flush=True)
    if state == "READY":
        run(pod.workers())
    return 0


def cmd_logs(pod: Pod, run: Runner) -> int:
    run(pod.logs())
    return 0


def cmd_delete(pod: Pod, run: Runner) -> int:
    run(pod.delete())
    return 0


def cmd_babysit(pod: Pod, run: Runner) -> int:
    """Keeps a spot/preemptible run going until WORKDIR/result.json says `"stopped": "done"`.

    Each poll: done? -> exit 0. Slice missing, PREEMPTED or TERMINATED -> (delete,) create, install, run.
    READY -> if no worker is running the job (it stopped at a preemption notice, or the VM restarted):
    run it again (install first if this babysit has not launched it). A worker whose job exited non-zero
    on a slice that is still READY is a crash, not a preemption: exit 1, unless a worker exited with the hang
    watchdog's status (75, `watchdog_exit=True`): then the run is relaunched from its last checkpoint. Every relaunch or failed command
    counts against --max_restarts.
    """
    a = pod.args
    if run.dry_run:
        print(f"# every {a.poll_seconds:g} s until {a.workdir}/result.json says \"stopped\": \"done\":")
        for argv in (pod.result(), pod.describe(), pod.workers()):
            run(argv)
        print("# when the slice is missing, or PREEMPTED/TERMINATED (then deleted first):")
        for argv in (pod.delete(), pod.create(), *pod.install(), pod.run()):
            run(argv)
        print("# when it is READY and no worker is running the job (installing first if not yet launched):")
        run(pod.run())
        return 0

    restarts = -1  # the first launch is not a restart
    launched = False

    def relaunch(why: str, steps: list[list[str]]) -> None:
        nonlocal restarts, launched
        restarts += 1
        if restarts > a.max_restarts:
            raise RuntimeError(f"gave up after {a.max_restarts} restarts (--max_restarts); last: {why}")
        _say(f"{why}: {'launching' if restarts == 0 else f'restart {restarts}/{a.max_restarts}'}")
        try:
            for argv in steps:
                run(argv)
        except CommandFailed as e:  # e.g. no spot capacity right now
            _say(f"{e}; retrying in {a.poll_seconds:g} s")
            return
        launched = True

    describe_failures = 0
    while True:
        if _done(pod, run):
            _say(f"{a.workdir}/result.json says the run is done")
            return 0
        try:
            state = _state(pod, run)
            describe_failures = 0
        except CommandFailed as e:  # an API hiccup must not end a days-long run; a lasting failure does
            describe_failures += 1
            if describe_failures >= MAX_DESCRIBE_FAILURES:
                raise
            _say(f"{e}; trying again at the next poll")
            state = "UNKNOWN"
        if state is None or state in RECREATE_STATES:
            steps = ([pod.delete()] if state else []) + [pod.create(), *pod.install(), pod.run()]
            relaunch(f"slice {a.name} is {state or 'missing'}", steps)
        elif state == "READY":
            workers = _workers(pod, run)
            crashed = {host: code for host, code in workers.items() if code not in (None, "running", 0)}
            hung = sorted(host for host, code in crashed.items() if code == HANG_EXIT_CODE)
            if hung and "running" not in workers.values():
                # The watchdog found the run stuck (its peers may have failed in the broken collective):
                # the stacks are in WORKDIR/hangs/; the checkpoint is good, so run again.
                relaunch(f"the hang watchdog stopped the run on {', '.join(hung)} (stacks in "
                         f"{a.workdir}/hangs/)", ([] if launched else pod.install()) + [pod.run()])
            elif crashed and _crash_confirmed(pod, run):
                raise RuntimeError(f"training exited with status {crashed} on a READY slice (a crash, not a "
                                   f"preemption); see `{PROG} logs --worker N`, fix, and babysit again")
            if workers and not crashed and "running" not in workers.values():
                steps = ([] if launched else pod.install()) + [pod.run()]
                relaunch("no worker is running the job", steps)
            elif not workers:
                _say("could not read the workers' status; trying again at the next poll")
        else:
            _say(f"slice {a.name} is {state}; waiting")
        time.sleep(a.poll_seconds)


def _say(message: str) -> None:
    print(f"{PROG} {time.strftime('%H:%M:%S')}: {message}", flush=True)


def _state(pod: Pod, run: Runner) -> str | None:
    """The slice's state (READY, PREEMPTED, ...), or None when it does not exist."""
    done = run(pod.describe(), capture=True, check=False)
    if done.returncode == 0:
        return done.stdout.strip() or "UNKNOWN"
    if "NOT_FOUND" in done.stderr or "not found" in done.stderr:
        return None
    raise CommandFailed(pod.describe(), done.returncode, _last_line(done.stderr))


def _done(pod: Pod, run: Runner) -> bool:
    """Whether WORKDIR/result.json exists and says the run finished (a preempted run writes one too)."""
    done = run(pod.result(), capture=True, check=False)
    if done.returncode:
        return False
    try:
        return json.loads(done.stdout).get("stopped", "done") == "done"
    except (ValueError, AttributeError):
        return False


def _workers(pod: Pod, run: Runner) -> dict[str, str | int | None]:
    """{host: "running" | exit code | None (not started)}; empty when ssh failed."""
    done = run(pod.workers(), capture=True, check=False)
    if done.returncode:
        return {}
    status = {}
    for line in done.stdout.splitlines():
        m = WORKER_STATUS.match(line.strip())
        if m:
            s = m["status"]
            status[m["host"]] = int(m["code"]) if m["code"] is not None else (None if s == "not started" else s)
    return status


def _crash_confirmed(pod: Pod, run: Runner) -> bool:
    """A job killed by a preemption can exit non-zero just before the slice leaves READY: look again."""
    time.sleep(pod.args.poll_seconds)
    try:
        return _state(pod, run) == "READY"
    except CommandFailed:
        return False


COMMANDS = {"create": cmd_create, "install": cmd_install, "run": cmd_run, "status": cmd_status,
            "logs": cmd_logs, "delete": cmd_delete, "babysit": cmd_babysit}


# ---------------------------------------------------------------------------------------------- parsing

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse would print the usage first)
        raise UsageError(message)


# Flags each command needs; every command accepts every flag, so one set of flags serves them all.
REQUIRED = {"create": ("accelerator_type",), "run": ("config", "workdir"),
            "babysit": ("accelerator_type", "config", "workdir")}
HELP = {"create": "create the slice", "install": "install the project on every worker",
        "run": "start training on every worker", "status": "the slice's state and each worker's job",
        "logs": "show a worker's ~/train.log", "delete": "delete the slice",
        "babysit": "create, install and run; recreate a preempted slice and rerun until result.json says done"}


def _parser() -> argparse.ArgumentParser:
    flags = _Parser(add_help=False)
    flags.add_argument("--name", required=True, help="TPU VM name")
    flags.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a (v5p)")
    flags.add_argument("--project", default="", help="Google Cloud project (default: gcloud's)")
    flags.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                       help="print the commands without running them")
    flags.add_argument("--accelerator_type", default="", help="create: v2-8 ... v6e-256, e.g. v4-32")
    flags.add_argument("--version", default="", help="create: TPU VM software version (default per generation: "
                       + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
    lifecycle = flags.add_mutually_exclusive_group()
    lifecycle.add_argument("--spot", action="store_true", help="create: a spot slice (preemptible, no time limit)")
    lifecycle.add_argument("--preemptible", action="store_true", help="create: a preemptible slice (24 h at most)")
    flags.add_argument("--repo", default=str(PROJECT_ROOT),
                       help="install: a git URL cloned on every worker, or a local checkout whose --ref is "
                            "sent as a git archive (default: this checkout)")
    flags.add_argument("--ref", default="HEAD", help="install: branch, tag or commit (default: HEAD)")
    flags.add_argument("--config", default="", help="run: config file relative to the repository root")
    flags.add_argument("--workdir", default="", help="run: gs://bucket/path, shared by every host")
    flags.add_argument("--worker", default="0", help="logs: worker index, or all (default: 0)")
    flags.add_argument("--lines", type=int, default=100, help="logs: last lines to show (default: 100)")
    flags.add_argument("--follow", action="store_true", help="logs: keep printing new lines (tail -f)")
    flags.add_argument("--max_restarts", type=int, default=10,
                       help="babysit: relaunches and failed commands before giving up (default: 10)")
    flags.add_argument("--poll_seconds", type=float, default=300,
                       help="babysit: seconds between checks (default: 300)")

    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     epilog="Overrides for python -m train go after `--`: ... -- --config.steps=1000")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run_first", action="store_true",
                        help="print the commands without running them (also accepted after COMMAND)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        sub.add_parser(name, parents=[flags], help=HELP[name])
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses and checks `argv`; `--config.KEY=VALUE` overrides for `python -m train` go after `--`."""
    overrides = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    stray = [a for a in argv if OVERRIDE.match(a)]
    if stray:
        raise UsageError(f"put {stray[0]} after `--` (overrides for python -m train go last: ... -- {stray[0]})")
    args = _parser().parse_args(argv)
    args.overrides = overrides
    args.dry_run = args.dry_run or args.dry_run_first
    for override in overrides:
        if not OVERRIDE.match(override):
            raise UsageError(f"{override!r} after `--` is not a --config.KEY=VALUE override for python -m train")
    if overrides and args.command not in ("run", "babysit"):
        raise UsageError(f"--config.KEY=VALUE overrides only apply to run and babysit, not {args.command}")
    for flag in REQUIRED.get(args.command, ()):
        if not getattr(args, flag):
            raise UsageError(f"{args.command} needs --{flag}")
    if not TPU_NAME.match(args.name):
        raise UsageError(f"--name {args.name!r}: use lowercase letters, digits and '-' (at most 63, "
                         f"starting with a letter)")
    if args.accelerator_type:
        m = ACCELERATOR_TYPE.match(args.accelerator_type)
        if not m:
            raise UsageError(f"--accelerator_type {args.accelerator_type!r} is not a TPU type; use "
                             f"GENERATION-SIZE with GENERATION one of {', '.join(RUNTIME_VERSIONS)} (e.g. v4-32)")
        args.version = args.version or RUNTIME_VERSIONS[m[1]]
    if args.workdir and (not args.workdir.startswith("gs://") or not args.workdir[5:].strip("/")):
        raise UsageError(f"--workdir {args.workdir!r} must be a gs://bucket/path URL: every host writes "
                         f"checkpoints to it, and a local folder is a different folder on each worker")
    if os.path.isabs(args.config):
        raise UsageError(f"--config {args.config!r}: give the path relative to the repository root "
                         f"(e.g. configs/gpt2_124m.py); it is read on the workers")
    if not _is_git_url(args.repo):
        if args.command in ("install", "babysit") and not os.path.isdir(args.repo):
            raise UsageError(f"--repo {args.repo!r} is neither a git URL nor a local folder")
        args.repo = os.path.abspath(args.repo)
    if args.worker != "all" and not args.worker.isdigit():
        raise UsageError(f"--worker {args.worker!r}: give a worker index (0, 1, ...) or all")
    if args.lines < 0 or args.max_restarts < 0 or args.poll_seconds < 0:
        raise UsageError("--lines, --max_restarts and --poll_seconds must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        return COMMANDS[args.command](Pod(args), Runner(args.dry_run))
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (CommandFailed, RuntimeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

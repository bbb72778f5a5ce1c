"""Mutation check: does the fast test suite catch a fixed list of realistic bugs?

    python tests/mutation/run.py              # every mutation in mutations.py and mutations_generation.py
    python tests/mutation/run.py --list       # names, files and tests, without running anything
    python tests/mutation/run.py --only NAME[,NAME ...] [--only NAME ...] [--no-baseline] [--keep]

Copies the repository (tracked files and untracked, not ignored ones: `git ls-files`) to a temporary folder,
checks that every mutation's anchor text occurs exactly once (else it stops before running anything), runs the
union of the listed tests once on the unmutated copy (they must pass, or every "kill" would mean nothing),
then per mutation: applies it, runs only its tests (`python -m pytest -x -q <tests> -p no:cacheprovider`, cwd
and PYTHONPATH the copy, JAX_PLATFORMS=cpu), restores the file. Prints killed / survived with the times; exits 1
unless every mutation is killed. Not part of the default test command; the ../shared data must exist.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS as TRAINING_MUTATIONS, Mutation  # noqa: E402
from mutations_generation import MUTATIONS as GENERATION_MUTATIONS  # noqa: E402

MUTATIONS: tuple[Mutation, ...] = TRAINING_MUTATIONS + GENERATION_MUTATIONS

REPO = Path(__file__).resolve().parents[2]


def repo_files(repo: Path) -> list[str]:
    """Tracked files that exist, plus untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         check=True, capture_output=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (repo / f).is_file()})


def copy_repo(repo: Path, dest: Path) -> None:
    for f in repo_files(repo):
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / f, target)
    # setup.cfg installs train/ and configs/ as flax_gpt2.train / flax_gpt2.configs; on PYTHONPATH the copy
    # needs the same names inside its own package, or they would resolve to the editable install's files.
    for name in ("train", "configs"):
        (dest / "flax_gpt2" / name).symlink_to(Path("..") / name, target_is_directory=True)


def check_anchors(root: Path, mutations) -> None:
    """Every replacement's `old` text occurs exactly once (after the earlier replacements of its mutation)."""
    problems = []
    for m in mutations:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        text = path.read_text()
        for old, new in m.replacements:
            count = text.count(old)
            if count != 1:
                problems.append(f"{m.name}: anchor found {count} times in {m.file} (needs exactly 1): {old!r}")
                break
            text = text.replace(old, new)
        for test in m.tests:
            if not (root / test.split("::")[0]).is_file():
                problems.append(f"{m.name}: test file {test.split('::')[0]} does not exist")
    if problems:
        raise SystemExit("mutation list is out of date with the code:\n  " + "\n  ".join(problems))


def shared_dir() -> Path:
    return Path(os.environ.get("FLAX_GPT2_SHARED", REPO.parent / "shared")).resolve()


def run_tests(root: Path, tests, timeout: float) -> tuple[int | None, float, str]:
    """(pytest's exit code or None on timeout, seconds, the output's tail)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1",
               FLAX_GPT2_SHARED=str(shared_dir()), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", *tests, "-p", "no:cacheprovider"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, time.perf_counter() - start, out[-2000:]
    return proc.returncode, time.perf_counter() - start, (proc.stdout + proc.stderr)[-2000:]


def apply(root: Path, m: Mutation) -> str:
    """Applies `m` in the copy; returns the file's original text."""
    path = root / m.file
    original = path.read_text()
    text = original
    for old, new in m.replacements:
        text = text.replace(old, new)
    path.write_text(text)
    return original


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                        help="run only these mutations (repeatable, or comma-separated)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"mutation names must be unique across both lists: {duplicates}")
    only = {name.strip() for value in args.only for name in value.split(",") if name.strip()}
    unknown = only - set(names)
    if unknown:
        parser.error(f"unknown mutation(s) {sorted(unknown)}; --list shows them")
    mutations = [m for m in MUTATIONS if not only or m.name in only]
    if args.list:
        for m in mutations:
            print(f"{m.name}\n    {m.file}: {m.why}\n    tests: {' '.join(m.tests)}")
        return 0
    if not shared_dir().is_dir():
        raise SystemExit(f"the shared data folder {shared_dir()} is missing (set FLAX_GPT2_SHARED): the tests "
                         "would skip, and a skipped test kills nothing")

    tmp = Path(tempfile.mkdtemp(prefix="flax_gpt2_mutation_"))
    root = tmp / "repo"
    try:
        copy_repo(REPO, root)
        check_anchors(root, mutations)
        print(f"{len(mutations)} mutations; copy of {REPO} in {root}", flush=True)
        where = ("import flax_gpt2, flax_gpt2.train, flax_gpt2.configs; "
                 "print(flax_gpt2.__file__, flax_gpt2.train.__file__, flax_gpt2.configs.__file__)")
        env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
        probe = subprocess.run([sys.executable, "-c", where], cwd=root, env=env, capture_output=True, text=True,
                               check=True).stdout.split()
        if not all(Path(p).resolve().is_relative_to(root.resolve()) for p in probe):
            raise SystemExit(f"the copy imports the package from elsewhere: {probe}")

        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutations for t in m.tests))
            rc, seconds, tail = run_tests(root, tests, args.timeout * 2)
            print(f"baseline (unmutated, {len(tests)} test ids): rc={rc} in {seconds:.0f}s", flush=True)
            if rc != 0:
                print(tail)
                raise SystemExit("the tests fail (or time out) without any mutation: fix that first")

        rows = []
        for m in mutations:
            original = apply(root, m)
            try:
                rc, seconds, tail = run_tests(root, m.tests, args.timeout)
            finally:
                (root / m.file).write_text(original)
            status = {0: "SURVIVED", 1: "killed", None: "TIMEOUT"}.get(rc, f"ERROR rc={rc}")
            rows.append((m.name, status, seconds))
            print(f"  {status:<9} {seconds:6.0f}s  {m.name}", flush=True)
            if status != "killed":
                print("    " + tail.replace("\n", "\n    ")[-1500:])
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'mutation':<{width}}  {'result':<9}  time")
    for name, status, seconds in rows:
        print(f"{name:<{width}}  {status:<9}  {seconds:5.0f}s")
    killed = sum(status == "killed" for _, status, _ in rows)
    print(f"\n{killed}/{len(rows)} killed, {len(rows) - killed} not, in {sum(s for _, _, s in rows):.0f}s")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

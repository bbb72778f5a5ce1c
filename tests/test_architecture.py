"""The layout is a contract (docs/ARCHITECTURE.md): the import layers in setup.cfg hold (import-linter), the
library never imports the training application, nothing imports a private name across modules or a command
module, train/ imports itself relatively, local imports state why, and files stay small."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "flax_gpt2"
APP = ROOT / "train"
COMMANDS = {"flax_gpt2.sample", "flax_gpt2.evaluate", "flax_gpt2.convert", "flax_gpt2.serve.__main__",
            "flax_gpt2.train.__main__"}
MAX_TOP_LEVEL_MODULES = 8
MAX_LINES = 400
LONG_FILE_NOTE = "Why one file:"  # a file over MAX_LINES says, in its docstring, why it is not split


def _sources(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py") if "assets" not in p.parts or p.name == "__init__.py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "train":  # installed as flax_gpt2.train
        parts = ["flax_gpt2", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(node, absolute module imported, names, is_function_local) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node, module, [a.name for a in node.names], id(node) in local
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, [], id(node) in local


def test_import_layers_hold():
    """import-linter's contracts in setup.cfg: commands on top, then serve | evaluation, generation,
    checkpoints, tokenizer | modeling, assets, utils; no import upwards, none between siblings."""
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports (the import-linter package, in the [test] extra) is not installed")
    result = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_library_never_imports_the_application_or_a_command():
    bad = []
    for path in _sources(LIBRARY):
        me = _module_name(path)
        for node, module, names, _ in _imports(path):
            targets = {module} | {f"{module}.{n}" for n in names}
            app = [t for t in targets if t.startswith(("flax_gpt2.train", "flax_gpt2.configs", "train.", "configs."))
                   or t in ("train", "configs")]
            cmd = [t for t in targets if t in COMMANDS and t != me]
            if app or cmd:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {app or cmd}")
    for path in _sources(APP):
        for node, module, names, _ in _imports(path):
            targets = {module} | {f"{module}.{n}" for n in names}
            if targets & COMMANDS and _module_name(path) != "flax_gpt2.train.__main__":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports a command: {targets & COMMANDS}")
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_across_modules():
    bad = [f"{p.relative_to(ROOT)}:{node.lineno} imports {n} from {module}"
           for p in _sources(LIBRARY, APP) for node, module, names, _ in _imports(p)
           for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, "\n".join(bad)


def test_the_application_imports_itself_relatively():
    bad = [f"{p.relative_to(ROOT)}:{node.lineno} `from {node.module} import ...`: write `from . import ...`"
           for p in _sources(APP) for node, module, _, _ in _imports(p)
           if isinstance(node, ast.ImportFrom) and not node.level and module.startswith("flax_gpt2.train")]
    assert not bad, "\n".join(bad)


def test_function_local_imports_of_project_modules_say_why():
    """A project module imported inside a function (not at the top) has a comment just above saying why
    (an optional heavy dependency behind it, a cost deferred); otherwise it belongs at the top."""
    bad = []
    for path in _sources(LIBRARY, APP):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node, module, _, local in _imports(path):
            if local and (module.startswith("flax_gpt2") or getattr(node, "level", 0)):
                i = node.lineno - 2  # the reason may head the block of local imports this one belongs to
                while i > 0 and (not lines[i].strip() or lines[i].strip().startswith(("import ", "from "))):
                    i -= 1
                if not lines[i].strip().startswith("#") and "#" not in lines[node.lineno - 1]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module} locally without a reason")
    assert not bad, "\n".join(bad)


def test_the_package_face_is_small():
    modules = sorted(p.name for p in LIBRARY.glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def test_files_are_small_or_say_why_not():
    bad = []
    for path in _sources(LIBRARY, APP, ROOT / "configs"):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES and LONG_FILE_NOTE not in (ast.get_docstring(ast.parse(text)) or ""):
            bad.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines and no '{LONG_FILE_NOTE}' in its docstring")
    assert not bad, "\n".join(bad)


def test_importing_the_library_configures_no_logging():
    """Was (after orbax moved to a top-level import): `import flax_gpt2` left a stderr handler on the root
    logger (orbax logs at import), so a user's `logging.basicConfig` did nothing and the train and serve
    commands lost their INFO lines."""
    modules = ["flax_gpt2", "flax_gpt2.sample", "flax_gpt2.evaluate", "flax_gpt2.convert", "flax_gpt2.serve.__main__",
               "flax_gpt2.train.__main__", "flax_gpt2.checkpoints.run_folders"]
    code = ("import logging, importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    importlib.import_module(m)\n"
            "    assert not logging.getLogger().handlers, (m, logging.getLogger().handlers)\n")
    result = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

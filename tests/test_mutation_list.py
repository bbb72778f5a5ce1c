"""The mutation list (tests/mutation/) stays in step with the code: a refactor that moves or rewrites a line a
mutation targets, or renames the test that kills it, fails here at once instead of in the next (long) run."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "mutation"))

from run import MUTATIONS, check_anchors  # noqa: E402


def test_every_anchor_occurs_once_and_every_test_exists():
    check_anchors(ROOT, MUTATIONS)  # SystemExit naming each stale mutation
    missing = []
    for m in MUTATIONS:
        for test in m.tests:
            file, _, name = test.partition("::")
            name = name.split("[")[0]
            if name and not re.search(rf"^def {re.escape(name)}\(", (ROOT / file).read_text(), flags=re.M):
                missing.append(f"{m.name}: {test}")
    assert not missing, "tests named by mutations that no longer exist:\n" + "\n".join(missing)

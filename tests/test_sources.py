"""What the source tree keeps to: logs for operators and events for evidence, never a bare print in
the library; and no pointer to a document the repository does not carry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "corral"
# Where printing is the job: the command line's output to its user.
PRINTS = {PACKAGE / "cli"}


def test_the_library_logs_instead_of_printing() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(path == p or p in path.parents for p in PRINTS):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == [], "use logging.getLogger(__name__) (operators) or an event (evidence)"


def test_documents_cited_are_in_the_repository() -> None:
    # A Markdown file named in the code, tests or docs must exist here, relative to the repository
    # root or to the citing file; the corpora the tests read from outside it are data, not documents.
    cited = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.md)\b")
    code = sorted(
        p
        for top in ("src", "tests", "scripts", "scenarios", "benchmarks")
        for p in (ROOT / top).rglob("*.py")
    )
    missing = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *code]:
        for name in cited.findall(path.read_text()):
            if name == "SOURCE.md":  # the corpus's own note of its origin, beside its data
                continue
            if not any((base / name).exists() for base in (ROOT, ROOT / "docs", path.parent)):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert missing == []

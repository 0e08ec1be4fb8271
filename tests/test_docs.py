"""The generated parts of docs/ match the code they come from (scripts/gen-docs writes them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import docgen  # noqa: E402


@pytest.mark.parametrize("path", list(docgen.DOCS), ids=lambda p: p.name)
def test_generated_doc_is_current(path: Path) -> None:
    text = path.read_text()
    assert docgen.DOCS[path](text) == text, f"{path.relative_to(ROOT)} is stale: run {docgen.COMMAND}"


def test_every_event_field_is_in_events_md() -> None:
    text = docgen.EVENTS_DOC.read_text()
    for model in docgen.event_models():
        section = text.split(f"\n## `{model.model_fields['type'].default}`\n", 1)[1].split("\n## ", 1)[0]
        for name in model.model_fields.keys() - set(docgen.COMMON_FIELDS):
            assert f"| `{name}` |" in section, (model.__name__, name)
    assert "| `error` | string |" in text  # sandbox.stop's, once missing from the hand-written page


def test_an_event_type_without_a_section_is_an_error() -> None:
    text = docgen.EVENTS_DOC.read_text()
    without = text.replace("\n## `proc.seccomp`\n", "\n## Seccomp filters\n")
    with pytest.raises(docgen.DocError, match=r"no section for proc\.seccomp"):
        docgen.events_doc(without)


def test_a_section_for_no_event_type_is_an_error() -> None:
    text = docgen.EVENTS_DOC.read_text() + "\n## `proc.teleport`\nNot a type.\n"
    with pytest.raises(docgen.DocError, match=r"`proc\.teleport` names no event type"):
        docgen.events_doc(text)


def test_a_stale_table_is_rewritten() -> None:
    text = docgen.EVENTS_DOC.read_text()
    stale = text.replace("| `error` | string |", "| `eror` | string |")
    assert docgen.events_doc(stale) == text


def test_the_check_command_passes() -> None:
    r = subprocess.run([ROOT / "scripts" / "gen-docs", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _named_paths(text: str) -> list[str]:
    """The file and directory paths a piece of markdown names in backticks (`egress/rules.py`)."""
    found: list[str] = []
    for token in re.findall(r"`([^`\s]+)`", text):
        if token.endswith((".py", ".yaml", ".md", "/")) or token.startswith(("scripts/", "benchmarks")):
            found.append(token)
    return found


def _exists(path: str) -> bool:
    if "*" in path or "NAME" in path:  # a pattern: its directory must exist
        path = path.split("*")[0].split("NAME")[0]
    return any((base / path).exists() for base in (ROOT, ROOT / "src" / "corral", ROOT / "docs"))


@pytest.mark.parametrize(
    ("doc", "heading"), [("README.md", "## Where things live"), ("docs/architecture.md", "## To change X")]
)
def test_the_where_to_edit_maps_name_files_that_exist(doc: str, heading: str) -> None:
    text = (ROOT / doc).read_text()
    assert heading in text, f"{doc} lost its section {heading!r}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    paths = _named_paths(section)
    assert len(paths) > 10, paths
    missing = [p for p in paths if not _exists(p)]
    assert missing == [], f"{doc}, {heading}: names files that do not exist: {missing}"

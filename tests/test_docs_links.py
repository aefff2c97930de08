"""User-facing text points only at documents the repository contains, and names no issue numbers.

Scans the package's modules, the README, DEVELOPERS.md, the notebook sources, scripts, benchmarks, recipes and
the tests for

* the names of design notes that live outside the repository (``theory.md``, ``paper.md``, … when not
  written as a path under ``docs/``, and any ``shared/docs`` path);
* issue or pull-request numbers (``issue 8``, ``PR #12``, ``(#12)``);
* ``docs/NAME.md`` paths that do not exist, and ``docs/NAME.md §N`` citations of a section that NAME.md does not
  have (sections are the numbered ``##``/``###`` headings, e.g. ``## 3.`` or ``### 3.2``);

and checks that the relative links inside ``docs/*.md`` resolve.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: design notes that exist only outside the repository; inside it they are docs/theory.md, docs/estimators.md, …
EXTERNAL_NOTES = ("paper", "theory", "ecosystem", "estimators", "user-data", "architecture")

_NOTE_TOKEN = re.compile(r"[\w./-]*?(?<![\w-])(?:" + "|".join(map(re.escape, EXTERNAL_NOTES)) + r")\.md\b")
_SHARED_DOCS = re.compile(r"shared/docs\b")
_ISSUE = re.compile(
    r"\bissues?\s+#?\d+"  # issue 8, issues #3 — case-insensitive below
    r"|(?-i:\bPRs?(?:\s+#?|#)\d+)|\bpull request\s+#?\d+"  # PR #6731, pull request 12 (not a variable pr2)
    r"|(?<![\w&\"'#/])#\d{1,5}\b(?![\"'\w])",  # (#12), TRL #3823 — not colours such as "#333333"
    re.IGNORECASE,
)
_DOCS_PATH = re.compile(r"(?<![\w/.-])docs/([\w.-]+?\.md)(?:\s*§\s*(\d+(?:\.\d+)*))?")


def _scanned_files() -> list[Path]:
    files = sorted((ROOT / "ctpo_lab").rglob("*.py"))
    files += [ROOT / "README.md", ROOT / "DEVELOPERS.md"]
    files += sorted((ROOT / "notebooks").glob("*.py"))
    for folder in ("scripts", "benchmarks", "recipes"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    files += sorted(p for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name)
    return [p for p in files if p.exists()]


FILES = _scanned_files()


def _sections(doc: Path) -> set[str]:
    """Numbers of the numbered headings of a docs/ file: "## 3. Title" → "3", "### 3.2 Title" → "3.2"."""
    found = re.findall(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", doc.read_text(encoding="utf-8"), re.M)
    return set(found)


def _problems(text: str, label: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{label}:{n}"
        for m in _NOTE_TOKEN.finditer(line):
            token = m.group(0)
            if not re.search(r"(?<![\w/.-])docs/[\w-]+\.md$", token):
                out.append(f"{where}: names an external note {token!r}: point at docs/ or write it inline")
        if _SHARED_DOCS.search(line):
            out.append(f"{where}: points at shared/docs (outside the repository)")
        for m in _ISSUE.finditer(line):
            out.append(f"{where}: names an issue/PR number {m.group(0)!r}")
        for m in _DOCS_PATH.finditer(line):
            name, section = m.group(1), m.group(2)
            doc = DOCS / name
            if not doc.is_file():
                out.append(f"{where}: docs/{name} does not exist")
            elif section and section not in _sections(doc):
                out.append(f"{where}: docs/{name} has no section §{section}")
    return out


def test_there_is_something_to_scan():
    assert any(p.suffix == ".py" for p in FILES) and (ROOT / "README.md") in FILES


def test_docs_exist():
    for name in ("theory.md", "estimators.md", "conventions.md"):
        assert (DOCS / name).is_file(), f"docs/{name} missing"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dead_document_or_issue_reference(path):
    problems = _problems(path.read_text(encoding="utf-8", errors="replace"), str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


def test_docs_relative_links_resolve():
    missing = []
    for doc in sorted(DOCS.glob("*.md")):
        for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", link) or link.startswith("#"):
                continue
            target, _, anchor = link.partition("#")
            if not (doc.parent / target).exists():
                missing.append(f"{doc.name}: {link}")
    assert not missing, missing


def test_docs_name_no_issue_numbers():
    hits = [f"{doc.name}: {m.group(0)!r}" for doc in sorted(DOCS.glob("*.md"))
            for m in _ISSUE.finditer(doc.read_text(encoding="utf-8"))]
    assert not hits, hits


def test_the_patterns():
    """The scanner catches what it should and lets through what it should."""
    def flagged(text: str) -> bool:
        return bool(_problems(text, "probe"))

    for bad in ("(paper.md)", "theory.md §5", "see ecosystem.md", "../shared/docs/user-data.md", "issue 8",
                "(Issue #12)", "verl PR #6731", "TRL #3823", "docs/nonexistent.md", "docs/theory.md §42"):
        assert flagged(bad), bad
    for good in ("docs/theory.md §5", "docs/theory.md §3.2", "[x](docs/estimators.md)", "table2_estimators.md",
                 'colour "#333333"', "# 1 · a heading", "step #  3", "docs/conventions.md §1", "pr2 = pr[sel]"):
        assert not flagged(good), good

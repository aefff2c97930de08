"""The README's commands and links exist: every `python -m MODULE` it shows answers `--help`, every relative
link or image points at a file, and the Quickstart is exactly two commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _modules() -> list[str]:
    found = re.findall(r"python -m ([A-Za-z_][\w.]*)", README)
    return sorted({m for m in found if m.startswith("ctpo_lab")})


def test_quickstart_is_two_commands():
    section = README.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block in the Quickstart"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    assert "pip install" in commands[0] and "python -m ctpo_lab" in commands[0]
    assert "pip install" in commands[1] and "pytest" in commands[1]


def test_readme_names_the_entry_points():
    assert {"ctpo_lab", "ctpo_lab.train", "ctpo_lab.markov", "ctpo_lab.llm", "ctpo_lab.figures"} <= set(_modules())


@pytest.mark.parametrize("module", _modules())
def test_entry_point_answers_help(module):
    res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage" in res.stdout.lower()


def test_relative_links_exist():
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+://", link) and not link.startswith("#")]
    assert local, "the README links no local file"
    missing = [link for link in local if link and not (ROOT / link).exists()]
    assert not missing, missing

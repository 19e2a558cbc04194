"""The scripts of docs/examples/ (README, "From training code") run as a user runs them, and the README
shows each of them and never shadows the package with a variable named `atoms` (issue 18, item 6)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))
# Each script takes 2-10 s on the 2 shared CPU cores here; the bound leaves room for a loaded machine.
SECONDS = 60


def training_code_section() -> str:
    """README's "From training code" section, subsections included, up to the next level-2 heading."""
    text = (ROOT / "README.md").read_text()
    return text.split("## From training code", 1)[1].split("\n## ", 1)[0]


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs(script, tmp_path):
    start = time.perf_counter()
    # -P, as the README runs them: the repository root must not shadow installed packages (test_layout).
    done = subprocess.run(
        [sys.executable, "-P", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=2 * SECONDS
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "Warning" not in done.stderr, done.stderr
    assert seconds < SECONDS


def test_readme_names_every_example():
    section = training_code_section()
    assert [path.name for path in EXAMPLES if f"docs/examples/{path.name}" not in section] == []


def test_readme_code_never_shadows_the_package():
    blocks = (ROOT / "README.md").read_text().split("```")[1::2]
    assignment = re.compile(r"(^|,)\s*atoms\s*(,[^=]*)?=(?!=)")
    shadowing = [line for block in blocks for line in block.splitlines() if assignment.search(line)]
    assert shadowing == []

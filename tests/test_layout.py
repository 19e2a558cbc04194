"""The repository's folders never shadow an installed package in the project's own commands.

The layout is fixed: kernels/ sits at the top and installs as `atoms.kernels`. Hugging Face's `kernels`
package, which transformers imports, has the same top-level name, so whenever the repository root is first
on sys.path (`python -m ...` or `python -c ...` run from the root) the folder wins and transformers fails to
import. The project's commands therefore run through the venv's entry points or `python -P`; these tests fail
when one of them does not, and show that the hazard they guard against is real.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The places a project command is written down: make targets, CI, and README's commands for users.
COMMAND_FILES = ["Makefile", ".ci/run", "README.md"]
# `python -m ...` / `python -c ...` (any python: python3, .venv/bin/python, $(BIN)/python) without -P.
_UNSAFE = re.compile(r"\bpython[0-9.]*((?:\s+-[A-OQ-Za-z]+)*)\s+-[mc]\b")

# Prints, for every top-level folder of the repository that another installed distribution (not this
# project's own, whose editable install maps `atoms` to the folder on purpose) provides as a top-level
# module, where that name is imported from. Run in a child with the repository root as its
# working directory, exactly as a user's shell would be.
_PROBE = r"""
import importlib.metadata, importlib.util, json, sys
from pathlib import Path
root = Path(sys.argv[1])
provided = importlib.metadata.packages_distributions()
names = [p.name for p in root.iterdir() if set(provided.get(p.name, [])) - {"atoms"}]
print(json.dumps({n: getattr(importlib.util.find_spec(n), "origin", None) for n in names}))
"""


def _shadowed(origins: dict[str, str | None]) -> list[str]:
    """The names whose import resolves inside the repository instead of to the installed distribution."""
    inside = [
        n for n, origin in origins.items() if origin and Path(origin).resolve().is_relative_to(ROOT / n)
    ]
    return sorted(inside)


def _probe(*python_flags: str) -> dict[str, str | None]:
    out = subprocess.run(
        [sys.executable, *python_flags, "-c", _PROBE, str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_this_test_run_imports_every_installed_package_from_site_packages():
    """Run by `make test` (the venv's pytest entry point), nothing of the repository shadows a package.
    `python -m pytest` from the root fails here."""
    provided = importlib.metadata.packages_distributions()
    names = [p.name for p in ROOT.iterdir() if set(provided.get(p.name, [])) - {"atoms"}]
    origins = {n: getattr(importlib.util.find_spec(n), "origin", None) for n in names}
    assert _shadowed(origins) == [], (
        f"{_shadowed(origins)} import from the repository, not from site-packages: the root is on sys.path "
        f"({[p for p in sys.path if p in ('', '.', str(ROOT))]}). Run tests with .venv/bin/pytest, not "
        "`python -m pytest` from the root."
    )


def test_transformers_imports_from_the_repository_root_with_safe_path():
    out = subprocess.run(
        [sys.executable, "-P", "-c", "import transformers, sae_lens; print(transformers.__version__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert _shadowed(_probe("-P")) == []


def test_the_hazard_is_real_without_safe_path():
    """Without -P the root comes first and the repository's kernels/ hides Hugging Face's `kernels` (which
    transformers depends on): the checks above would catch a command that forgot -P."""
    if "kernels" not in importlib.metadata.packages_distributions():
        pytest.skip("Hugging Face's `kernels` is not installed here, so nothing can be shadowed")
    assert "kernels" in _shadowed(_probe())


def _command_lines(name: str, text: str) -> list[str]:
    """The lines that are commands: README's fenced code blocks (its prose may name the unsafe forms), and
    every line of the Makefile and CI script but their comments."""
    if name.endswith(".md"):
        return [line for i, block in enumerate(text.split("```")) if i % 2 for line in block.splitlines()]
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def _unsafe_commands(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if (m := _UNSAFE.search(line)) and "P" not in m.group(1)]


def test_no_project_command_puts_the_root_first_on_sys_path():
    found = {
        name: _unsafe_commands(_command_lines(name, (ROOT / name).read_text())) for name in COMMAND_FILES
    }
    assert {k: v for k, v in found.items() if v} == {}, "use -P (python -P -m ...) or a venv entry point"


def test_the_command_check_catches_a_command_without_safe_path():
    assert _unsafe_commands(["\t$(BIN)/python -m pytest -q tests"]) == ["$(BIN)/python -m pytest -q tests"]
    assert _unsafe_commands(['.venv/bin/python -c "import atoms"']) != []
    assert _unsafe_commands(["python3 -u -m pip install x"]) != []
    assert _unsafe_commands(["$(BIN)/python -P -m pip install x"]) == []
    assert _unsafe_commands(["python -uP -c 'x'"]) == []
    readme = "Never `python -m pytest` here.\n```bash\npython -m pytest\n```\n"
    assert _command_lines("README.md", readme) == ["bash", "python -m pytest"]

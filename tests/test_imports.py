"""What `import atoms` and `import atoms.kernels` load: the lazy re-exports of atoms/__init__.py.

Each statement runs in a fresh `python -P -X importtime` child. The assertions are on the modules it leaves
in sys.modules, never on times (README "Import cost" has those); importtime's report names the slowest
imports in a failure message, to show where a heavy import came from.
"""

import json
import subprocess
import sys

import pytest

# Each heavy import named by issue 18 (import cost measured from SAE training code), plus the rest of the
# project's dependencies that only some functions need.
HEAVY = ["cvxpy", "scipy", "scipy.stats", "transformers", "matplotlib", "safetensors", "typer", "hypothesis"]
_PROBE = "import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"


def loaded_after(statement: str) -> tuple[set[str], str]:
    """The modules in sys.modules after `statement` in a fresh interpreter, and importtime's slowest lines."""
    done = subprocess.run(
        [sys.executable, "-P", "-X", "importtime", "-c", _PROBE.format(statement=statement)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    timings = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    slowest = sorted(timings[1:], key=lambda line: -int(line.split("|")[1]))[:12]
    return set(json.loads(done.stdout)), "\n".join(slowest)


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_import_atoms_kernels_loads_torch_and_triton_only():
    """`import atoms.kernels` (which runs atoms/__init__.py first) adds no package beyond torch, triton and
    their own imports, and no module of atoms outside atoms.kernels."""
    # Triton ships Linux wheels only (kernels/dispatch.py runs without it).
    baseline, _ = loaded_after("import torch\ntry:\n    import triton\nexcept ImportError:\n    pass")
    modules, slowest = loaded_after("import atoms.kernels")
    added = top_level(modules) - top_level(baseline) - set(sys.stdlib_module_names)
    assert added == {"atoms"}, f"import atoms.kernels also loads {sorted(added)}; slowest:\n{slowest}"
    ours = {m for m in modules if m == "atoms" or m.startswith("atoms.")}
    assert {m for m in ours if not m.startswith("atoms.kernels")} == {"atoms"}, sorted(ours)
    assert not set(HEAVY) & modules, slowest


def test_import_atoms_loads_nothing_heavy():
    modules, slowest = loaded_after("import atoms")
    heavy = {"torch", "numpy", "triton", *HEAVY} & modules
    assert not heavy, f"import atoms loads {sorted(heavy)}; slowest:\n{slowest}"
    assert {m for m in modules if m.startswith("atoms")} == {"atoms"}


@pytest.mark.parametrize(("name", "module"), [("TSAE", "atoms.tsae"), ("AIP", "atoms.aip")])
def test_training_names_load_without_the_solvers(name, module):
    # Training code takes TSAE and AIP; neither needs cvxpy, scipy.stats or transformers.
    modules, slowest = loaded_after(f"from atoms import {name}")
    assert module in modules
    assert not {"cvxpy", "scipy.stats", "transformers"} & modules, slowest


@pytest.mark.parametrize("module", ["atoms.recovery", "atoms.metrics"])
def test_metrics_and_recovery_load_the_solvers_on_first_use(module):
    # Training code scores with atoms.metrics; only the cvxpy solver and the phase transition's curve need
    # cvxpy and scipy.stats, and those functions import them.
    modules, slowest = loaded_after(f"import {module}")
    assert not {"cvxpy", "scipy.stats"} & modules, slowest


def test_lazy_exports_behave_like_attributes():
    import atoms

    assert set(atoms.__all__) <= set(dir(atoms))
    from atoms.dictionary import Dictionary

    assert atoms.Dictionary is Dictionary
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = atoms.nonexistent
    from atoms import synth  # a submodule, not a re-export: imported as before

    assert synth.__name__ == "atoms.synth"

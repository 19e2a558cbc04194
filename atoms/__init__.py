"""atoms: a toolkit that tests the Atom Theory of LLM representations (arXiv 2509.20784).

Dictionaries are (n_atoms, d) tensors, rows are atoms (the SAELens W_dec layout). Statistics and certificates
are float64. The theory and conventions: SPEC.md beside the repository.

The public names load on first use (PEP 562 module `__getattr__`): `import atoms` imports no module of
atoms, and `import atoms.kernels`, which runs this file first, adds only torch and Triton. When this file
imported its re-exports eagerly, `import atoms.kernels` took 1.7-2.2 s and 420 MB of peak RSS on 2 shared
CPU cores (cvxpy, scipy.stats and scipy.optimize came with `atoms.recovery`), against 0.9-1.0 s and 240 MB
for torch alone; now 1.1 s and 327 MB (README, "Import cost, torch.compile and mixed precision";
tests/test_imports.py).
"""

from importlib import import_module
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "AIP": "atoms.aip",
    "SecondMoment": "atoms.aip",
    "Dictionary": "atoms.dictionary",
    "babel": "atoms.dictionary",
    "coherence": "atoms.dictionary",
    "welch_bound": "atoms.dictionary",
    "AtomsError": "atoms.errors",
    "BadInputError": "atoms.errors",
    "IllConditionedError": "atoms.errors",
    "evaluate": "atoms.evaluation",
    "q_star": "atoms.metrics",
    "r2": "atoms.metrics",
    "basis_pursuit": "atoms.recovery",
    "rip_constant": "atoms.rip",
    "TSAE": "atoms.tsae",
    "spark": "atoms.uniqueness",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Imports the module behind a public name on first access and caches the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'atoms' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

"""atoms: a toolkit that tests the Atom Theory of LLM representations (arXiv 2509.20784).

Dictionaries are (n_atoms, d) tensors, rows are atoms (the SAELens W_dec layout). Statistics and certificates
are float64. The theory and conventions: SPEC.md beside the repository.
"""

from atoms.aip import AIP, SecondMoment
from atoms.dictionary import Dictionary, babel, coherence, welch_bound
from atoms.errors import AtomsError, BadInputError, IllConditionedError
from atoms.metrics import q_star, r2
from atoms.recovery import basis_pursuit
from atoms.rip import rip_constant
from atoms.tsae import TSAE
from atoms.uniqueness import spark

__all__ = [
    "AIP",
    "TSAE",
    "AtomsError",
    "BadInputError",
    "Dictionary",
    "IllConditionedError",
    "SecondMoment",
    "babel",
    "basis_pursuit",
    "coherence",
    "q_star",
    "r2",
    "rip_constant",
    "spark",
    "welch_bound",
]

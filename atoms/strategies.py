"""Hypothesis strategies over ground-truth dictionaries and sparse codes, for tests here and in other repos.

    from atoms.strategies import dictionary_and_codes

    @given(dictionary_and_codes(max_atoms=16, k_max=3))
    def test_my_encoder(case): ...  # case.dictionary, case.codes.values, case.activations

Sizes are drawn first, with st.integers from small minima, and seeds with st.integers from 0, so hypothesis
shrinks a failure to the smallest dictionary, the fewest atoms and seed 0. Dictionaries are float64 torch
tensors `(n_atoms, d)` with unit rows (see atoms.synth); cast them with `dtypes()` to test lower precisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from hypothesis import reject
from hypothesis import strategies as st

from atoms import synth
from atoms.errors import BadInputError
from atoms.synth import Codes, _coherence

__all__ = [
    "KINDS",
    "CoherentDictionary",
    "Planted",
    "coherent_dictionaries",
    "dictionaries",
    "dictionary_and_codes",
    "dtypes",
    "sparse_codes",
]

KINDS = ("gaussian", "simplex", "dirac_hadamard", "steiner", "coherence", "near_duplicate")
_DEFAULT_KINDS = ("gaussian", "simplex", "dirac_hadamard", "coherence", "near_duplicate")
# Shape (n_atoms, d) of every Steiner ETF small enough for a strategy -> its (v, k); smallest first, so
# shrinking reaches (16, 6). Shape: r = (v - 1)/(k - 1) blocks per point, v (r + 1) atoms in v r / k
# dimensions.
_STEINER = {(16, 6): (4, 2), (28, 7): (7, 3), (64, 28): (8, 2), (120, 35): (15, 3), (256, 120): (16, 2)}
_SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
# Coherence a fixed-mu strategy asks of n_atoms in d: at least this many times the Welch bound, which the
# decoherence descent of synth.dictionary_with_coherence reaches for small sizes (about 1.2 to 1.6).
_WELCH_MARGIN = 1.6


class CoherentDictionary(NamedTuple):
    """A dictionary `(n_atoms, d)` float64 with unit rows whose coherence is exactly `mu` (to 1e-12)."""

    dictionary: torch.Tensor
    mu: float


class Planted(NamedTuple):
    """A dictionary `(n_atoms, d)`, planted codes over its atoms, and activations = codes.values @ dictionary
    `(n_samples, d)`, all float64."""

    dictionary: torch.Tensor
    codes: Codes
    activations: torch.Tensor


def _int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInputError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise BadInputError(f"{name}={value} is too small; pass {name} >= {minimum}.")
    return value


def _bounds(min_atoms: int, max_atoms: int, min_d: int, max_d: int) -> tuple[int, int, int, int]:
    min_atoms, max_atoms = _int(min_atoms, "min_atoms", 1), _int(max_atoms, "max_atoms", 1)
    min_d, max_d = _int(min_d, "min_d", 1), _int(max_d, "max_d", 1)
    if min_atoms > max_atoms:
        raise BadInputError(f"min_atoms={min_atoms} > max_atoms={max_atoms}; pass min_atoms <= max_atoms.")
    if min_d > max_d:
        raise BadInputError(f"min_d={min_d} > max_d={max_d}; pass min_d <= max_d.")
    return min_atoms, max_atoms, min_d, max_d


def _shapes(kind: str, min_atoms: int, max_atoms: int, min_d: int, max_d: int) -> list[tuple[int, int]]:
    """Every (n_atoms, d) that `kind` can build inside the bounds (for the size-free kinds: the corners)."""
    if kind == "simplex":
        return [(d + 1, d) for d in range(max(min_d, min_atoms - 1), min(max_d, max_atoms - 1) + 1)]
    if kind == "dirac_hadamard":
        powers = (1 << e for e in range(1, max_d.bit_length()))
        return [(2 * n, n) for n in powers if min_d <= n <= max_d and min_atoms <= 2 * n <= max_atoms]
    if kind == "steiner":
        return [(n, d) for n, d in _STEINER if min_atoms <= n <= max_atoms and min_d <= d <= max_d]
    low_atoms = max(min_atoms, 2) if kind in ("coherence", "near_duplicate") else min_atoms
    low_d = max(min_d, 2) if kind == "near_duplicate" else min_d
    if low_atoms > max_atoms or low_d > max_d:
        return []
    return [(low_atoms, low_d), (max_atoms, max_d)]


def _welch(n_atoms: int, d: int) -> float:
    return math.sqrt(max(n_atoms - d, 0) / (d * (n_atoms - 1)))


@st.composite
def _coherence_kind(
    draw: st.DrawFn, min_atoms: int, max_atoms: int, min_d: int, max_d: int
) -> CoherentDictionary:
    d = draw(st.integers(min_d, max_d))
    n_atoms = draw(st.integers(min_atoms, max_atoms))
    seed = draw(_SEEDS)
    # dictionary_with_coherence's first try is this Gaussian dictionary: any mu at or above its coherence is
    # planted at once, and t shrinks to 0, i.e. to mu equal to that coherence.
    floor = _coherence(synth.gaussian_dictionary(n_atoms, d, seed).numpy())
    mu = min(1.0, floor + draw(st.floats(0.0, 1.0)) * (1.0 - floor))
    try:
        return CoherentDictionary(synth.dictionary_with_coherence(n_atoms, d, mu, seed), mu)
    except synth.UnreachableCoherenceError:
        reject()


@st.composite
def _dictionaries(draw: st.DrawFn, shapes: dict[str, list[tuple[int, int]]]) -> torch.Tensor:
    kind = draw(st.sampled_from(list(shapes)))
    if kind in ("simplex", "dirac_hadamard", "steiner"):
        # The shape index comes first, where the other kinds draw d, so the shrinker can trade kinds.
        n_atoms, d = shapes[kind][draw(st.integers(0, len(shapes[kind]) - 1))]
        seed = draw(st.none() | _SEEDS)  # None: the frame in its canonical coordinates
        if kind == "simplex":
            return synth.simplex_etf(d, seed)
        if kind == "dirac_hadamard":
            return synth.dirac_hadamard(d, seed)
        return synth.steiner_etf(*_STEINER[(n_atoms, d)], seed)
    (lo_n, lo_d), (hi_n, hi_d) = shapes[kind]
    if kind == "coherence":
        return draw(_coherence_kind(lo_n, hi_n, lo_d, hi_d)).dictionary
    d = draw(st.integers(lo_d, hi_d))
    n_atoms = draw(st.integers(lo_n, hi_n))
    seed = draw(_SEEDS)
    if kind == "near_duplicate":
        cos = draw(st.floats(0.99, 0.999999))
        return synth.near_duplicate_dictionary(n_atoms, d, cos, seed)
    return synth.gaussian_dictionary(n_atoms, d, seed)


def dictionaries(
    min_atoms: int = 2,
    max_atoms: int = 32,
    min_d: int = 2,
    max_d: int = 16,
    kinds: Sequence[str] = _DEFAULT_KINDS,
) -> st.SearchStrategy[torch.Tensor]:
    """Unit-norm float64 dictionaries `(n_atoms, d)`, n_atoms in [min_atoms, max_atoms], d in [min_d, max_d].

    kinds, any of KINDS:
    - "gaussian": random atoms;
    - "simplex": the simplex ETF, n_atoms = d + 1;
    - "dirac_hadamard": [I; H / sqrt(d)], n_atoms = 2 d, d a power of two;
    - "steiner": Steiner ETFs of shapes (16, 6), (28, 7), (64, 28), (120, 35), (256, 120);
    - "coherence": a planted coherence (see coherent_dictionaries);
    - "near_duplicate": one pair at cosine in [0.99, 0.999999].
    The frames are drawn in canonical coordinates or under a random rotation. A kind whose fixed shapes fall
    outside the bounds is left out; if none remains the call raises. Shrinks to the first kind, the smallest
    sizes and seed 0.
    """
    min_atoms, max_atoms, min_d, max_d = _bounds(min_atoms, max_atoms, min_d, max_d)
    if isinstance(kinds, str) or not kinds:
        raise BadInputError(f"kinds must be a non-empty sequence of names from {KINDS}, got {kinds!r}.")
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise BadInputError(f"unknown dictionary kinds {unknown}; choose from {KINDS}.")
    shapes = {kind: _shapes(kind, min_atoms, max_atoms, min_d, max_d) for kind in dict.fromkeys(kinds)}
    shapes = {kind: found for kind, found in shapes.items() if found}
    if not shapes:
        raise BadInputError(
            f"none of the kinds {tuple(kinds)} fits n_atoms in [{min_atoms}, {max_atoms}] and d in "
            f"[{min_d}, {max_d}]: simplex needs n_atoms = d + 1, dirac_hadamard n_atoms = 2 d with d a power "
            "of two, steiner one of its fixed shapes, near_duplicate d >= 2 and coherence/near_duplicate "
            "n_atoms >= 2. Widen the bounds or add kind 'gaussian'."
        )
    return _dictionaries(shapes)


@st.composite
def _fixed_mu(
    draw: st.DrawFn, mu: float, min_atoms: int, max_atoms: int, min_d: int, max_d: int
) -> CoherentDictionary:
    d = draw(st.integers(min_d, max_d))
    # Largest n_atoms the descent reaches mu for: n_atoms <= d always (orthonormal start), beyond that while
    # mu stays _WELCH_MARGIN times above the Welch bound (which increases with n_atoms).
    fits = [n for n in range(min_atoms, max_atoms + 1) if n <= d or _WELCH_MARGIN * _welch(n, d) <= mu]
    if not fits:
        reject()
    n_atoms = draw(st.integers(min_atoms, max(fits)))
    seed = draw(_SEEDS)
    try:
        return CoherentDictionary(synth.dictionary_with_coherence(n_atoms, d, mu, seed), mu)
    except synth.UnreachableCoherenceError:
        reject()


def coherent_dictionaries(
    mu: float | None = None, min_atoms: int = 2, max_atoms: int = 32, min_d: int = 2, max_d: int = 16
) -> st.SearchStrategy[CoherentDictionary]:
    """CoherentDictionary(dictionary (n_atoms, d) float64, mu): unit atoms whose coherence is exactly mu.

    mu=None draws mu between the coherence of a random dictionary of that size and 1 (shrinking to the
    former). A fixed mu draws d, then n_atoms only up to where mu is at least 1.6 times the Welch bound
    (always allowed: n_atoms <= d); sizes where even that fails are rejected, so a small mu needs a large
    max_d.
    """
    min_atoms, max_atoms, min_d, max_d = _bounds(min_atoms, max_atoms, min_d, max_d)
    if min_atoms < 2:
        raise BadInputError(f"min_atoms={min_atoms}: a coherence needs a pair of atoms; pass min_atoms >= 2.")
    if mu is None:
        return _coherence_kind(min_atoms, max_atoms, min_d, max_d)
    if isinstance(mu, bool) or not isinstance(mu, int | float) or not 0.0 <= mu <= 1.0:
        raise BadInputError(f"mu={mu!r} is not a coherence; pass a float in [0, 1] or None to draw it.")
    return _fixed_mu(float(mu), min_atoms, max_atoms, min_d, max_d)


@st.composite
def _codes(draw: st.DrawFn, n_atoms: int, k_max: int, nonneg: bool | None, max_samples: int) -> Codes:
    n_samples = draw(st.integers(1, max_samples))
    k = draw(st.integers(1, min(k_max, n_atoms)))
    dmin = draw(st.floats(0.1, 1.0))
    dmax = dmin * draw(st.floats(1.0, 10.0))
    edge = draw(st.floats(0.0, 1.0))
    sign_free = draw(st.booleans()) if nonneg is None else nonneg
    return synth.planted_codes(n_samples, n_atoms, k, dmin, dmax, sign_free, draw(_SEEDS), edge=edge)


def _check_codes_args(k_max: int | None, nonneg: object, max_samples: int) -> None:
    if k_max is not None:
        _int(k_max, "k_max", 1)
    if nonneg is not None and not isinstance(nonneg, bool):
        raise BadInputError(f"nonneg must be True, False or None (drawn), got {nonneg!r}.")
    _int(max_samples, "max_samples", 1)


def sparse_codes(
    n_atoms: int, k_max: int | None = None, nonneg: bool | None = False, max_samples: int = 8
) -> st.SearchStrategy[Codes]:
    """Planted codes over n_atoms atoms (see synth.planted_codes): 1..max_samples rows, k in [1, k_max]
    non-zeros per row (k_max defaults to n_atoms), magnitudes in [dmin, dmax] with dmin in [0.1, 1] and dmax
    up to 10 dmin, a random boundary-snapping probability `edge`. nonneg=None draws the sign rule too."""
    n_atoms = _int(n_atoms, "n_atoms", 1)
    _check_codes_args(k_max, nonneg, max_samples)
    if k_max is not None and k_max > n_atoms:
        raise BadInputError(f"k_max={k_max} > n_atoms={n_atoms}; pass k_max <= n_atoms.")
    return _codes(n_atoms, n_atoms if k_max is None else k_max, nonneg, max_samples)


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """The floating dtypes activations come in: float64 (first: failures shrink to it), float32, bfloat16."""
    return st.sampled_from((torch.float64, torch.float32, torch.bfloat16))


def dictionary_and_codes(
    min_atoms: int = 2,
    max_atoms: int = 32,
    min_d: int = 2,
    max_d: int = 16,
    k_max: int = 4,
    nonneg: bool | None = False,
    kinds: Sequence[str] = _DEFAULT_KINDS,
    max_samples: int = 8,
) -> st.SearchStrategy[Planted]:
    """Planted(dictionary (n_atoms, d), codes, activations (n_samples, d)): a dictionary from `dictionaries`,
    then k-sparse codes over its atoms with k <= min(k_max, n_atoms), and their activations."""
    _check_codes_args(k_max, nonneg, max_samples)
    drawn = dictionaries(min_atoms, max_atoms, min_d, max_d, kinds)

    @st.composite
    def planted(draw: st.DrawFn) -> Planted:
        dictionary = draw(drawn)
        codes = draw(_codes(dictionary.shape[0], k_max, nonneg, max_samples))
        return Planted(dictionary, codes, codes.values @ dictionary)

    return planted()

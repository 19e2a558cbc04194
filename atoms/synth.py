"""Ground-truth dictionaries and sparse codes whose geometry is known in advance, for tests and benchmarks.

Every dictionary is a float64 torch tensor of shape `(n_atoms, d)`: rows are atoms (the W_dec layout), each of
unit Euclidean norm. Every random generator takes a seed (an int, a `numpy.random.Generator` or a
`torch.Generator`) so a failing case can be rebuilt from its arguments alone. The frames with a closed form
(simplex, Steiner, Dirac-Hadamard) take an optional seed that applies a random rotation of R^d: that keeps
every inner product, so the frame stays tight and equiangular, but hides the coordinate structure from code
under test.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch

from atoms.errors import BadInputError

__all__ = [
    "Codes",
    "Seed",
    "UnreachableCoherenceError",
    "dictionary_with_coherence",
    "dirac_hadamard",
    "gaussian_dictionary",
    "gershgorin_tight_frame",
    "near_duplicate_dictionary",
    "planted_codes",
    "simplex_etf",
    "steiner_etf",
    "twin_dictionary",
]

Seed = int | np.random.Generator | torch.Generator

# Rows of the Gram computed at once by the tiled coherence scan: memory O(_TILE x n_atoms), never n_atoms^2.
_TILE = 1024
# The decoherence descent holds the full Gram; above this many atoms it would need more than ~128 MiB.
_MAX_DECOHERE_ATOMS = 4096
# Slack for float64 rounding when checking that no pair exceeds the requested coherence.
_TOL = 1e-12


class UnreachableCoherenceError(BadInputError):
    """The requested coherence is below what the generator can build for these n_atoms and d."""


class Codes(NamedTuple):
    """Planted sparse codes: `values` (n_samples, n_atoms) float64 with exactly k non-zeros per row, at the
    columns `support` (n_samples, k) int64, sorted within each row."""

    values: torch.Tensor
    support: torch.Tensor


def _int_arg(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise BadInputError(
            f"{name} must be an int, got {type(value).__name__} {value!r}; pass a whole number."
        )
    if value < minimum:
        raise BadInputError(f"{name}={value} is too small; pass {name} >= {minimum}.")
    return int(value)


def _float_arg(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise BadInputError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise BadInputError(f"{name}={value} is not finite; pass a finite number.")
    return float(value)


def _rng(seed: object) -> np.random.Generator:
    """A numpy Generator from an int seed, a numpy Generator (used as is) or a torch Generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=seed)))
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise BadInputError(
            f"seed must be a non-negative int, a numpy.random.Generator or a torch.Generator, got "
            f"{type(seed).__name__} {seed!r}; pass e.g. seed=0 so the case can be rebuilt."
        )
    if seed < 0:
        raise BadInputError(f"seed={seed} is negative; pass a non-negative int.")
    return np.random.default_rng(int(seed))


def _unit_rows(w: np.ndarray) -> np.ndarray:
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def _haar_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    """A (d, d) orthogonal matrix drawn from the Haar measure (QR of a Gaussian with the signs of R fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _finish(w: np.ndarray, seed: Seed | None) -> torch.Tensor:
    """Rotate by a Haar-random orthogonal map when a seed is given (inner products unchanged)."""
    if seed is not None:
        w = w @ _haar_orthogonal(w.shape[1], _rng(seed))
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64))


def _welch(n_atoms: int, d: int) -> float:
    return math.sqrt(max(n_atoms - d, 0) / (d * (n_atoms - 1)))


def _row_max(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per atom, the largest |cos| with another atom and that partner's index, scanned in row tiles."""
    n = w.shape[0]
    values = np.empty(n)
    partner = np.empty(n, dtype=np.int64)
    for start in range(0, n, _TILE):
        stop = min(start + _TILE, n)
        g = np.abs(w[start:stop] @ w.T)
        g[np.arange(stop - start), np.arange(start, stop)] = -1.0
        partner[start:stop] = g.argmax(axis=1)
        values[start:stop] = g[np.arange(stop - start), partner[start:stop]]
    return values, partner


def _coherence(w: np.ndarray) -> float:
    """Largest |cos| over pairs of distinct unit rows of `w` (n_atoms, d)."""
    return float(_row_max(w)[0].max())


def gaussian_dictionary(n_atoms: int, d: int, seed: Seed) -> torch.Tensor:
    """Random dictionary `(n_atoms, d)` float64: i.i.d. standard Gaussian rows scaled to unit norm (uniform on
    the sphere)."""
    n_atoms = _int_arg(n_atoms, "n_atoms", 1)
    d = _int_arg(d, "d", 1)
    return torch.from_numpy(_unit_rows(_rng(seed).standard_normal((n_atoms, d))))


def simplex_etf(d: int, seed: Seed | None = None) -> torch.Tensor:
    """The regular simplex: `(d + 1, d)` float64 unit atoms with every pairwise cosine equal to -1/d.

    Its coherence 1/d equals the Welch bound for d + 1 atoms in R^d, and it is tight: W^T W = (d + 1)/d I.
    Built in closed form: the standard basis of R^(d+1) centred on its mean, written in the Helmert
    orthonormal basis of the hyperplane orthogonal to (1, ..., 1). A seed applies a random rotation.
    """
    d = _int_arg(d, "d", 1)
    # Helmert row j (j = 1..d): (1, ..., 1, -j, 0, ..., 0) / sqrt(j (j + 1)) with j ones; an orthonormal basis
    # of the sum-zero hyperplane. Centred basis vector i has coordinates column i of this matrix, norm
    # sqrt(d/(d+1)).
    helmert = np.zeros((d, d + 1))
    for j in range(1, d + 1):
        helmert[j - 1, :j] = 1.0
        helmert[j - 1, j] = -float(j)
        helmert[j - 1] /= math.sqrt(j * (j + 1))
    return _finish(helmert.T * math.sqrt((d + 1) / d), seed)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _steiner_blocks(v: int, k: int) -> list[tuple[int, ...]]:
    """Blocks of a 2-(v, k, 1) design on points 0..v-1: every pair of points lies in exactly one block."""
    if k == 2:
        return list(combinations(range(v), 2))
    # k = 3: the lines of the projective geometry PG(m-1, 2); points are the non-zero vectors x of F_2^m
    # (point x - 1), and the line through x, y is {x, y, x XOR y}. Each line is listed once, from its two
    # smallest points.
    lines = []
    for x in range(1, v + 1):
        for y in range(x + 1, v + 1):
            z = x ^ y
            if z > y:
                lines.append((x - 1, y - 1, z - 1))
    return lines


def steiner_etf(v: int, k: int = 2, seed: Seed | None = None) -> torch.Tensor:
    """A real Steiner equiangular tight frame (Fickus, Mixon and Tremain 2012), `(v (r + 1), b)` float64.

    From a 2-(v, k, 1) Steiner system with b blocks, each point in r = (v - 1)/(k - 1) blocks, and a real
    Hadamard matrix of order r + 1 with one row removed (r x (r + 1), entries +-1, columns pairwise at inner
    product -1). Each point contributes r + 1 atoms: column c of that matrix, written on the r blocks through
    the point, scaled by 1/sqrt(r). Two atoms of one point meet at |cos| = 1/r through the removed row; atoms
    of two points meet at |cos| = 1/r on the single block holding both. So every pair is at |cos| = 1/r, the
    Welch bound, and the frame is tight: W^T W = k (r + 1)/r I.

    Only Sylvester Hadamard orders (powers of two) are used, which supports:
    - k = 2, v a power of two >= 4 (all pairs of v points): shape (v^2, v (v - 1)/2); v = 4, 8, 16, 32 give
      (16, 6), (64, 28), (256, 120), (1024, 496), coherence 1/(v - 1).
    - k = 3, v = 2^m - 1 with m >= 3 (lines of the projective geometry PG(m - 1, 2)): shape
      (v (v + 1)/2, v (v - 1)/6); v = 7, 15, 31, 63 give (28, 7), (120, 35), (496, 155), (2016, 651),
      coherence 2/(v - 1).
    A seed applies a random rotation of R^b; without one the frame is sparse (r non-zeros per atom).
    """
    v = _int_arg(v, "v", 1)
    k = _int_arg(k, "k", 2)
    if k == 2 and not (v >= 4 and _is_power_of_two(v)):
        raise BadInputError(
            f"steiner_etf(v={v}, k=2) needs v a power of two >= 4 (a Sylvester Hadamard matrix of order v); "
            "pass v in 4, 8, 16, 32, ... or use k=3 with v = 2^m - 1."
        )
    if k == 3 and not (v >= 7 and _is_power_of_two(v + 1)):
        raise BadInputError(
            f"steiner_etf(v={v}, k=3) needs v = 2^m - 1 with m >= 3 (projective-geometry triple system with "
            "a Sylvester Hadamard matrix of order (v + 1)/2); pass v in 7, 15, 31, 63, ..."
        )
    if k > 3:
        raise BadInputError(
            f"steiner_etf supports block sizes k=2 and k=3, got k={k}; pass k=2 (v a power of two) or k=3 "
            "(v = 2^m - 1)."
        )
    blocks = _steiner_blocks(v, k)
    r = (v - 1) // (k - 1)
    flat = scipy.linalg.hadamard(r + 1).astype(np.float64)[1:]  # drop the all-ones row: r x (r + 1)
    blocks_of_point: list[list[int]] = [[] for _ in range(v)]
    for b, block in enumerate(blocks):
        for point in block:
            blocks_of_point[point].append(b)
    w = np.zeros((v * (r + 1), len(blocks)))
    for point, rows in enumerate(blocks_of_point):
        w[point * (r + 1) : (point + 1) * (r + 1), rows] = flat.T / math.sqrt(r)
    return _finish(w, seed)


def dirac_hadamard(n: int, seed: Seed | None = None) -> torch.Tensor:
    """The Dirac-Hadamard dictionary `(2 n, n)` float64: rows of the identity, then rows of H_n / sqrt(n).

    n must be a power of two >= 2 (Sylvester construction, scipy.linalg.hadamard). Coherence 1/sqrt(n); the
    frame is tight (W^T W = 2 I). A seed applies a random rotation.
    """
    n = _int_arg(n, "n", 2)
    if not _is_power_of_two(n):
        raise BadInputError(
            f"dirac_hadamard(n={n}) needs n a power of two (Sylvester Hadamard matrix); pass n = "
            f"{1 << (n.bit_length() - 1)} or {1 << n.bit_length()}."
        )
    w = np.vstack([np.eye(n), scipy.linalg.hadamard(n).astype(np.float64) / math.sqrt(n)])
    return _finish(w, seed)


def _decohere(w: np.ndarray, mu: float, max_iter: int) -> np.ndarray:
    """Push unit rows apart until their coherence is <= mu or max_iter steps; return the least coherent.

    Projected gradient descent on the sphere of sum_{i != j} (|G_ij| / c)^p, c the current coherence: a smooth
    stand-in for the maximum whose exponent p grows so the steps focus on the worst pairs. Alternating
    projections (Tropp et al. 2005) stall in low dimension; this reaches the optimum cos(pi / n) on the
    circle.
    """
    best, best_c = w, math.inf
    power, step = 4.0, 0.2
    for _ in range(max_iter + 1):
        g = w @ w.T
        np.fill_diagonal(g, 0.0)
        c = float(np.abs(g).max())
        if c < best_c:
            best, best_c = w, c
        if best_c <= mu:
            break
        grad = ((np.abs(g) / c) ** (power - 1) * np.sign(g)) @ w
        grad -= np.sum(grad * w, axis=1, keepdims=True) * w  # tangent to each atom's sphere
        largest = float(np.linalg.norm(grad, axis=1).max())
        if largest == 0.0:  # a stationary configuration: no direction lowers the smoothed maximum
            break
        w = _unit_rows(w - step * grad / largest)
        power, step = min(power * 1.01, 64.0), max(step * 0.995, 1e-3)
    return best


def _plant(
    w: np.ndarray, mu: float, values: np.ndarray, partner: np.ndarray, candidates: int = 16
) -> np.ndarray | None:
    """Rotate one atom of a pair towards the other, inside their plane, until |cos| = mu, keeping every other
    pair <= mu. Tries the most coherent pairs first (the smallest rotation); None if none of `candidates`
    works. `values`, `partner`: each atom's largest |cos| and its partner (from _row_max)."""
    tried: set[tuple[int, int]] = set()
    for i in np.argsort(-values, kind="stable"):
        pair = (min(int(i), int(partner[i])), max(int(i), int(partner[i])))
        if pair in tried:
            continue
        tried.add(pair)
        if len(tried) > candidates:
            return None
        a, j = pair
        cos = float(w[a] @ w[j])
        u = w[j] - cos * w[a]
        u -= (u @ w[a]) * w[a]  # second Gram-Schmidt pass: u must be orthogonal to w[a] to rounding
        norm_u = float(np.linalg.norm(u))
        if norm_u == 0.0 and mu < 1.0:
            continue
        sign = 1.0 if cos >= 0 else -1.0
        new = sign * mu * w[a] + (math.sqrt(1.0 - mu * mu) * u / norm_u if mu < 1.0 else 0.0)
        new /= np.linalg.norm(new)
        others = np.abs(w @ new)
        others[[a, j]] = 0.0
        if others.max() <= mu + _TOL:
            planted = w.copy()
            planted[j] = new
            return planted
    return None


def dictionary_with_coherence(
    n_atoms: int, d: int, mu: float, seed: Seed, *, max_tries: int = 3, max_iter: int = 1000
) -> torch.Tensor:
    """A unit-norm dictionary `(n_atoms, d)` float64 whose coherence is mu (to 1e-12).

    Each try starts from a Gaussian dictionary (the first is `gaussian_dictionary(n_atoms, d, seed)` when
    seed is an int, so any mu at or above its coherence succeeds at once). If its coherence exceeds mu, the
    atoms are pushed apart by gradient descent (at most `max_iter` steps, up to 4096 atoms), or replaced by an
    orthonormal set when n_atoms <= d. Then one pair is rotated inside its plane to |cos| = mu exactly,
    provided no other pair exceeds mu. Raises UnreachableCoherenceError when mu is below the Welch bound
    sqrt((n_atoms - d) / (d (n_atoms - 1))) or no try reaches it; the descent gets to about 1.2 to 1.6
    times the bound in a few hundred steps for up to a few hundred atoms.
    """
    n_atoms = _int_arg(n_atoms, "n_atoms", 2)
    d = _int_arg(d, "d", 1)
    mu = _float_arg(mu, "mu")
    max_tries = _int_arg(max_tries, "max_tries", 1)
    max_iter = _int_arg(max_iter, "max_iter", 0)
    if not 0.0 <= mu <= 1.0:
        raise BadInputError(f"mu={mu} is not a coherence; pass mu in [0, 1].")
    welch = _welch(n_atoms, d)
    if mu < welch - _TOL:
        raise UnreachableCoherenceError(
            f"mu={mu} is below the Welch bound {welch:.6g} for n_atoms={n_atoms} in d={d}: no dictionary "
            "has a smaller coherence. Pass mu >= the bound, a larger d, or fewer atoms."
        )
    rng = _rng(seed)
    best = 1.0
    for _ in range(max_tries):
        w = _unit_rows(rng.standard_normal((n_atoms, d)))
        values, partner = _row_max(w)
        if values.max() > mu + _TOL and (n_atoms <= d or n_atoms <= _MAX_DECOHERE_ATOMS):
            # orthonormal rows (coherence 0) when they fit, else push the atoms apart
            w = np.linalg.qr(w.T)[0].T if n_atoms <= d else _decohere(w, mu, max_iter)
            values, partner = _row_max(w)
        best = min(best, float(values.max()))
        if values.max() <= mu + _TOL:
            planted = _plant(w, mu, values, partner)
            if planted is not None:
                return torch.from_numpy(planted)
    hint = f"mu >= {best:.6g} is reachable" if best > mu + _TOL else "no pair could be planted"
    raise UnreachableCoherenceError(
        f"could not build n_atoms={n_atoms} atoms in d={d} with coherence mu={mu} in {max_tries} tries "
        f"(Welch bound {welch:.6g}, least coherence reached {best:.6g}: {hint}). Pass a larger mu, a larger "
        "d, fewer atoms, or more max_tries / max_iter."
    )


def near_duplicate_dictionary(
    n_atoms: int, d: int, cos: float, seed: Seed, *, pair: tuple[int, int] = (0, 1)
) -> torch.Tensor:
    """A Gaussian unit-norm dictionary `(n_atoms, d)` float64 whose atoms `pair` meet at cosine `cos`.

    Atom pair[1] is rotated towards atom pair[0] inside their plane. cos = 1 gives an exact duplicate. The
    other pairs keep their random cosines, so the coherence is max(cos, theirs): equal to cos when cos is
    close to 1. Needs d >= 2 (in d = 1 every pair is already at |cos| = 1).
    """
    n_atoms = _int_arg(n_atoms, "n_atoms", 2)
    d = _int_arg(d, "d", 2)
    cos = _float_arg(cos, "cos")
    if not 0.0 < cos <= 1.0:
        raise BadInputError(
            f"cos={cos} is outside (0, 1]; a near duplicate needs a cosine close to 1, e.g. 0.999."
        )
    if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= int(p) < n_atoms for p in pair):
        raise BadInputError(
            f"pair={pair} must be two distinct atom indices in [0, {n_atoms}); e.g. pair=(0, 1)."
        )
    w = _unit_rows(_rng(seed).standard_normal((n_atoms, d)))
    a, j = int(pair[0]), int(pair[1])
    u = w[j] - (w[j] @ w[a]) * w[a]
    u -= (u @ w[a]) * w[a]
    w[j] = cos * w[a] + math.sqrt(1.0 - cos * cos) * u / np.linalg.norm(u)
    w[j] /= np.linalg.norm(w[j])
    return torch.from_numpy(w)


def twin_dictionary(n_atoms: int, d: int, seed: Seed) -> torch.Tensor:
    """A unit-norm dictionary `(n_atoms, d)` float64 of exact twins: atom h + i is atom i or its negation, bit
    for bit (h = n_atoms - n_atoms // 2, i < n_atoms // 2), the sign drawn per pair; atoms 0..h-1 are
    Gaussian. So the coherence is 1 (to rounding) and the spark 2, and a code on a twinned atom is not the
    unique l1 minimiser: splitting it between the twins keeps its image and its l1 norm. Needs d >= 2 (in
    d = 1 every pair is a twin already).
    """
    n_atoms = _int_arg(n_atoms, "n_atoms", 2)
    d = _int_arg(d, "d", 2)
    rng = _rng(seed)
    pairs = n_atoms // 2
    base = _unit_rows(rng.standard_normal((n_atoms - pairs, d)))
    signs = rng.choice(np.array([-1.0, 1.0]), size=(pairs, 1))
    return torch.from_numpy(np.vstack([base, signs * base[:pairs]]))


def gershgorin_tight_frame(
    K: int,
    mu: float,
    d: int | None = None,
    n_atoms: int | None = None,
    seed: Seed = 0,
    *,
    negative: bool = False,
) -> torch.Tensor:
    """A dictionary `(n_atoms, d)` float64 whose first K atoms reach the Gershgorin bound (K - 1) mu.

    The first K atoms have Gram (1 - mu) I + mu 1 1^T (every pairwise cosine +mu). Its largest eigenvalue
    is 1 + (K - 1) mu, so ||G - I||_2 = (K - 1) mu: the Gershgorin bound of SPEC section 4.1 holds with
    equality. With `negative`, every pairwise cosine is -mu instead: Gram (1 + mu) I - mu 1 1^T, whose
    smallest eigenvalue 1 - (K - 1) mu reaches the bound from below (positive definite only for
    mu < 1/(K - 1)); there each planted atom at dmin beside the others at dmax sinks to the TSAE window's
    upper end dmin - mu (K - 1) dmax. The planted atoms are the rows of the Cholesky factor of the Gram, in
    the first K coordinates. The other atoms keep coherence <= mu: first the basis vectors e_K, ..., e_(d-1)
    (orthogonal to the planted ones), then, past d atoms, random unit vectors kept only if no |cos| with an
    earlier atom exceeds mu. So the dictionary's coherence is mu and its delta_K is exactly (K - 1) mu.
    Defaults: d = K, n_atoms = d.
    """
    K = _int_arg(K, "K", 1)
    mu = _float_arg(mu, "mu")
    if not 0.0 <= mu < 1.0:
        raise BadInputError(
            f"mu={mu} is outside [0, 1); the Gram (1 - mu) I + mu 11^T is singular at mu = 1."
        )
    if negative and (K - 1) * mu >= 1.0:
        raise BadInputError(
            f"negative=True with K={K} needs mu < 1/(K - 1) = {1.0 / (K - 1):.6g}, got mu={mu}: K vectors "
            "cannot be pairwise at cosine -mu beyond that. Pass a smaller mu or K."
        )
    d = K if d is None else _int_arg(d, "d", 1)
    n_atoms = d if n_atoms is None else _int_arg(n_atoms, "n_atoms", 1)
    if d < K or n_atoms < K:
        raise BadInputError(
            f"K={K} planted atoms need d >= K and n_atoms >= K (got d={d}, n_atoms={n_atoms}); raise d "
            "and n_atoms."
        )
    cos = -mu if negative else mu
    gram = (1.0 - cos) * np.eye(K) + cos * np.ones((K, K))
    w = np.zeros((n_atoms, d))
    w[:K, :K] = np.linalg.cholesky(gram)
    n_basis = min(n_atoms, d) - K
    w[K : K + n_basis, K : K + n_basis] = np.eye(n_basis)
    rng = _rng(seed)
    filled, budget = K + n_basis, 1000 * (n_atoms - K - n_basis)
    while filled < n_atoms and budget > 0:
        budget -= 1
        x = rng.standard_normal(d)
        x /= np.linalg.norm(x)
        if np.abs(w[:filled] @ x).max() <= mu:
            w[filled] = x
            filled += 1
    if filled < n_atoms:
        raise UnreachableCoherenceError(
            f"found only {filled - d} of the {n_atoms - d} atoms past d={d} with |cos| <= mu={mu} by random "
            "sampling; pass a larger mu, a larger d or fewer atoms."
        )
    return torch.from_numpy(w)


def planted_codes(
    n_samples: int,
    n_atoms: int,
    k: int,
    dmin: float,
    dmax: float,
    nonneg: bool,
    seed: Seed,
    edge: float = 0.0,
) -> Codes:
    """Random k-sparse codes: Codes(values (n_samples, n_atoms) float64, support (n_samples, k) int64 sorted).

    Each row's support is a uniform random k-subset of the atoms; each non-zero has magnitude uniform in
    [dmin, dmax], snapped with probability `edge` to dmin or dmax (even odds) to stress threshold boundaries,
    and a random sign unless `nonneg`. dmin > 0 so every row has exactly k non-zeros. Activations are values @
    W_dec.
    """
    n_samples = _int_arg(n_samples, "n_samples", 1)
    n_atoms = _int_arg(n_atoms, "n_atoms", 1)
    k = _int_arg(k, "k", 1)
    dmin, dmax, edge = _float_arg(dmin, "dmin"), _float_arg(dmax, "dmax"), _float_arg(edge, "edge")
    if not isinstance(nonneg, bool | np.bool_):
        raise BadInputError(f"nonneg must be a bool, got {type(nonneg).__name__} {nonneg!r}.")
    if k > n_atoms:
        raise BadInputError(f"k={k} non-zeros cannot fit in n_atoms={n_atoms} atoms; pass k <= n_atoms.")
    if dmin <= 0.0:
        raise BadInputError(
            f"dmin={dmin} must be > 0: a zero magnitude would leave fewer than k={k} non-zeros. Pass "
            "dmin > 0 (signs come from nonneg=False, not from the magnitudes)."
        )
    if dmin > dmax:
        raise BadInputError(f"dmin={dmin} > dmax={dmax}; pass dmin <= dmax.")
    if not 0.0 <= edge <= 1.0:
        raise BadInputError(f"edge={edge} is a probability; pass edge in [0, 1].")
    rng = _rng(seed)
    # The k smallest of i.i.d. uniforms sit at a uniform random k-subset; argpartition is linear time.
    support = np.sort(np.argpartition(rng.random((n_samples, n_atoms)), k - 1, axis=1)[:, :k], axis=1)
    # dmin + (dmax - dmin) u can round one ulp past dmax; the minimum keeps the stated range exact.
    magnitudes = np.minimum(dmin + (dmax - dmin) * rng.random((n_samples, k)), dmax)
    snap = rng.random((n_samples, k)) < edge
    low = rng.random((n_samples, k)) < 0.5
    magnitudes = np.where(snap, np.where(low, dmin, dmax), magnitudes)
    if not nonneg:
        magnitudes = magnitudes * rng.choice(np.array([-1.0, 1.0]), size=(n_samples, k))
    values = np.zeros((n_samples, n_atoms))
    np.put_along_axis(values, support, magnitudes, axis=1)
    return Codes(torch.from_numpy(values), torch.from_numpy(support.astype(np.int64)))

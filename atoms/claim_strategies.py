"""Hypothesis strategies of theorem instances, concentrated where each claim of atoms.theorems is tight.

One `Recipe` per claim says how to draw its `Instance`s: which dictionary families, which sparsity K, whether
codes and a threshold are needed, and which sizes keep the exact computations (spark, delta_K, basis pursuit)
fast. The draws lean on the edges where a theorem can only just hold:

- premise just satisfied: for a premise mu < edge(K), dictionaries whose coherence is planted at
  edge(K) (1 - slack) with a small slack, and K at the largest value the premise allows for the drawn
  dictionary;
- the known frames (simplex and Steiner ETFs, Dirac-Hadamard, the Gershgorin-tight frame), which reach the
  classical bounds with equality, beside Gaussian and near-duplicate dictionaries, and exact twins
  (duplicate and antipodal atoms, coherence 1: spark 2, and l1 minimisers that are not unique);
- codes at the edges of [dmin, dmax] (`synth.planted_codes(edge=...)`) and on adversarial supports: "crowd"
  puts K atoms most correlated with an off-support atom at dmax (the off-support pre-activation peaks),
  "oppose" puts an atom at dmin beside K - 1 atoms that pull its pre-activation down;
- thresholds at the TSAE window's edges (tau = lower end + slack, upper end - slack), inside it, and beyond
  either end by a relative 1e-9 to 0.99 (half the time under 1e-2). The "window" family couples the three:
  K + 1 atoms pairwise at cosine +mu or -mu, codes that reach the window's lower or upper end exactly, and
  tau just inside that end or under 1e-2 beyond it, so a window 1 % too wide at either end is refuted.

Every instance's label is the generator call that rebuilds it. Sizes come from `Sizes`; the verify engine's
budgets pick them. Draws start with the family, then K, then sizes and seeds, each from small values, so
hypothesis shrinks a counterexample to the first family, the smallest K and sizes, and seed 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import numpy as np
import torch
from hypothesis import reject
from hypothesis import strategies as st

from atoms import synth
from atoms.dictionary import Dictionary, welch_bound
from atoms.errors import BadInputError
from atoms.theorems import Claim, Instance, instance

__all__ = ["FAMILIES", "RECIPES", "Recipe", "Sizes", "codes", "instances", "recipe_for"]

FAMILIES = (
    "edge",
    "simplex",
    "steiner",
    "dirac_hadamard",
    "gershgorin",
    "welch",
    "coherent",
    "orthonormal",
    "gaussian",
    "near_duplicate",
    "duplicate",
    "window",
)
_SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
# Steiner ETFs by shape (n_atoms, d) -> (v, block size), smallest first.
_STEINER = {(16, 6): (4, 2), (28, 7): (7, 3), (64, 28): (8, 2)}
# rip_constant enumerates exactly up to this many supports (its default max_supports).
_RIP_EXACT = 200_000
_REACHABLE = 1.25
# Slacks under a premise's edge: tiny ones probe the boundary, but stay well above float64 rounding (~1e-16
# times K), where a strict inequality that holds "by 1e-17" says nothing about the theorem.
_SLACKS = st.sampled_from((1e-9, 1e-6, 1e-3, 0.02)) | st.floats(0.0, 0.5, exclude_min=True)
# Relative distances of tau beyond an end of the TSAE window: just beyond (under 1e-2, so that a window 1 %
# too wide at either end holds tau; at least 1e-9, clear of float64 rounding) or far beyond.
_JUST_BEYOND = st.sampled_from((1e-9, 1e-6, 1e-3)) | st.floats(1e-9, 1e-2)
_BEYOND = _JUST_BEYOND | st.floats(1e-2, 0.99)
CodeMode = Literal["random", "crowd", "oppose"]


@dataclass(frozen=True)
class Sizes:
    """Largest instances a strategy draws.

    max_atoms, max_d: dictionary shape bounds.  max_k: largest sparsity K.  max_samples: codes per instance.
    max_subsets: for claims that compute an exact spark, only shapes with at most this many subsets of
    2..min(d, n_atoms) atoms are drawn (below 50,000, `atoms.uniqueness` enumerates instead of a MILP).
    steiner_max_atoms: largest Steiner ETF drawn (16, 28 or 64 atoms).
    """

    max_atoms: int = 16
    max_d: int = 8
    max_k: int = 4
    max_samples: int = 4
    max_subsets: int = 20_000
    steiner_max_atoms: int = 16


@dataclass(frozen=True)
class Recipe:
    """How to draw instances of one claim.

    families: dictionary families to draw from (see FAMILIES), the first is where shrinking goes.
    edge: for a premise of the form mu < edge(K), the coherence the "edge" family plants (times 1 - slack),
        and the bound "K as large as the premise allows" uses; None when the premise is not of that form.
    k_min, k_max: K's range (k_max None: Sizes.max_k).  room: keep n_atoms >= K + room and d >= K + room.
    rip_order: 1 or 2 when the claim computes delta_K or delta_2K exactly (keeps C(n_atoms, order K) within
        rip_constant's exact range); 0 otherwise.
    spark: the claim computes an exact spark (shapes limited by Sizes.max_subsets).
    codes: None, "signed", "nonneg" or "any" (drawn).  threshold: draw a TSAE threshold tau with dmin, dmax.
    """

    families: tuple[str, ...] = FAMILIES
    edge: Callable[[int], float] | None = None
    k_min: int = 1
    k_max: int | None = None
    room: int = 0
    rip_order: int = 0
    spark: bool = False
    codes: Literal["signed", "nonneg", "any"] | None = None
    threshold: bool = False


class _Drawn(NamedTuple):
    """A dictionary, the generator call that rebuilds it, and for the "window" family the end of the TSAE
    window ("lower" or "upper") that its codes reach and its threshold sits at."""

    atoms: torch.Tensor
    label: str
    window_end: Literal["lower", "upper"] | None = None


def _uniqueness_edge(k: int) -> float:
    """mu < 1/(2K - 1): Donoho-Elad uniqueness, the coherence form of exact l1 recovery, a non-empty TSAE
    window (eps (2K - 1) dmax < dmin) and, through Tropp 2004, ERC < 1."""
    return 1.0 / (2 * k - 1)


def _rip_edge(k: int) -> float:
    """(2K - 1) mu < 1/sqrt(2) bounds delta_2K < 1/sqrt(2) by Gershgorin: the coherence edge of Cai-Zhang."""
    return 1.0 / (math.sqrt(2.0) * (2 * k - 1))


def _false_uniqueness_edge(k: int) -> float:
    return 1.0 / k


def _false_l1_edge(k: int) -> float:
    """K < 1 + 1/mu, i.e. mu < 1/(K - 1); every mu < 1 for K = 1."""
    return 1.0 if k == 1 else 1.0 / (k - 1)


_FRAMES = ("simplex", "steiner", "dirac_hadamard", "gershgorin")
_WELCH = Recipe(
    families=("simplex", "steiner", "welch", "orthonormal", "gaussian", "near_duplicate"), k_max=1
)
_DICTIONARIES = (*_FRAMES, "coherent", "gaussian", "near_duplicate", "duplicate")
_RIP = Recipe(families=_DICTIONARIES, k_min=2, rip_order=1)
_SPARK = Recipe(families=_DICTIONARIES, k_max=1, spark=True)
_EDGE_FAMILIES = ("edge", *_DICTIONARIES)
# Without the exact twins: at coherence 1 the window is empty, so they would only dilute the search.
_TSAE = Recipe(
    families=("edge", *_FRAMES, "coherent", "gaussian", "near_duplicate", "window"),
    edge=_uniqueness_edge,
    room=1,
    codes="nonneg",
    threshold=True,
)

RECIPES: dict[str, Recipe] = {
    "welch": _WELCH,
    "false_welch_strict": _WELCH,
    "rip_gershgorin": _RIP,
    "rip_babel": _RIP,
    "false_rip_gershgorin": _RIP,
    "spark_coherence": _SPARK,
    "false_spark_coherence": _SPARK,
    "uniqueness_coherence": Recipe(families=_EDGE_FAMILIES, edge=_uniqueness_edge, spark=True),
    "false_uniqueness": Recipe(families=_EDGE_FAMILIES, edge=_false_uniqueness_edge, spark=True),
    "l1_coherence": Recipe(families=_EDGE_FAMILIES, edge=_uniqueness_edge, room=1, codes="any"),
    "false_l1_twice": Recipe(families=_EDGE_FAMILIES, edge=_false_l1_edge, room=1, codes="any"),
    # K = 1 whatever mu; false_l1_twice's edge (1 at K = 1) lets the edge family draw mu up to 0.999.
    "false_l1_one_sparse": Recipe(families=_EDGE_FAMILIES, edge=_false_l1_edge, k_max=1, room=1, codes="any"),
    "l1_erc": Recipe(families=_EDGE_FAMILIES, edge=_uniqueness_edge, room=1, codes="any"),
    "l1_rip": Recipe(families=_EDGE_FAMILIES, edge=_rip_edge, room=1, rip_order=2, codes="any"),
    "tsae_support": _TSAE,
    "tsae_refit": _TSAE,
    "false_tsae_low_threshold": _TSAE,
    "false_tsae_lower_end": _TSAE,
    "false_tsae_upper_end": _TSAE,
    "tsae_code_error": Recipe(families=_EDGE_FAMILIES, edge=_uniqueness_edge, room=1, codes="any"),
    "false_tsae_exact_raw": Recipe(families=_EDGE_FAMILIES, edge=_uniqueness_edge, room=1, codes="any"),
}


def recipe_for(claim: Claim) -> Recipe:
    """The claim's recipe, or for a claim without one a generic recipe built from what it needs."""
    if claim.name in RECIPES:
        return RECIPES[claim.name]
    if "threshold" in claim.needs:
        return _TSAE
    if "codes" in claim.needs:
        codes = "nonneg" if "dmin" in claim.needs else "any"
        return Recipe(families=_EDGE_FAMILIES, edge=_uniqueness_edge, room=1, codes=codes)
    return Recipe(families=_DICTIONARIES, spark=True)


def _subsets(n_atoms: int, d: int) -> int:
    """Subsets an exact spark may have to check: those of 2..min(d, n_atoms) atoms (none when n_atoms <= d,
    whose rank alone decides the spark)."""
    if n_atoms <= d:
        return 0
    return sum(math.comb(n_atoms, k) for k in range(2, d + 1))


def _shape_ok(n: int, d: int, k: int, recipe: Recipe, sizes: Sizes) -> bool:
    if n < k + recipe.room or d < k + recipe.room or n < 2:
        return False
    if recipe.spark and _subsets(n, d) > sizes.max_subsets:
        return False
    if recipe.rip_order and (recipe.rip_order * k > n or math.comb(n, recipe.rip_order * k) > _RIP_EXACT):
        return False
    return True


def _draw_shape(
    draw: st.DrawFn,
    k: int,
    recipe: Recipe,
    sizes: Sizes,
    *,
    over: bool | None,
    mu: float | None = None,
    least: int = 1,
) -> tuple[int, int]:
    """(n_atoms, d) within Sizes and the recipe's limits, both >= least; over=True asks n_atoms > d (a finite
    spark), False n_atoms <= d, None either. With mu, only shapes where synth.dictionary_with_coherence
    reaches mu."""

    def ok(n: int, d: int) -> bool:
        if over is not None and (n > d) != over:
            return False
        if n < least or d < least:
            return False
        # The decoherence descent reliably reaches 1.2 times the Welch bound (measured for n_atoms <= 24);
        # a failed attempt costs ~0.3 s, so unreachable shapes are not drawn at all.
        if mu is not None and n > d and mu < _REACHABLE * welch_bound(n, d):
            return False
        return _shape_ok(n, d, k, recipe, sizes)

    ds = [d for d in range(1, sizes.max_d + 1) if any(ok(n, d) for n in range(2, sizes.max_atoms + 1))]
    if not ds:
        reject()
    d = draw(st.sampled_from(ds))
    return draw(st.sampled_from([n for n in range(2, sizes.max_atoms + 1) if ok(n, d)])), d


def _fits(n: int, d: int, k: int, recipe: Recipe, sizes: Sizes) -> bool:
    return n <= sizes.max_atoms and d <= sizes.max_d and _shape_ok(n, d, k, recipe, sizes)


def _coherent(n: int, d: int, mu: float, seed: int) -> _Drawn:
    try:
        atoms = synth.dictionary_with_coherence(n, d, mu, seed)
    except synth.UnreachableCoherenceError:
        reject()
    return _Drawn(atoms, f"synth.dictionary_with_coherence(n_atoms={n}, d={d}, mu={mu!r}, seed={seed})")


@st.composite
def _dictionary(draw: st.DrawFn, family: str, k: int, recipe: Recipe, sizes: Sizes) -> _Drawn:
    """One dictionary of `family` for sparsity k, inside the recipe's size limits."""
    if family == "simplex":
        ds = [d for d in range(2, sizes.max_d + 1) if _fits(d + 1, d, k, recipe, sizes)]
        if not ds:
            reject()
        d, seed = draw(st.sampled_from(ds)), draw(st.none() | _SEEDS)
        return _Drawn(synth.simplex_etf(d, seed), f"synth.simplex_etf(d={d}, seed={seed})")
    if family == "dirac_hadamard":
        ns = [1 << e for e in range(1, 5) if _fits(2 << e, 1 << e, k, recipe, sizes)]
        if not ns:
            reject()
        n, seed = draw(st.sampled_from(ns)), draw(st.none() | _SEEDS)
        return _Drawn(synth.dirac_hadamard(n, seed), f"synth.dirac_hadamard(n={n}, seed={seed})")
    if family == "steiner":
        shapes = [s for s in _STEINER if s[0] <= sizes.steiner_max_atoms and _fits(*s, k, recipe, sizes)]
        if not shapes:
            reject()
        shape, seed = draw(st.sampled_from(shapes)), draw(st.none() | _SEEDS)
        v, block = _STEINER[shape]
        return _Drawn(synth.steiner_etf(v, block, seed), f"synth.steiner_etf(v={v}, k={block}, seed={seed})")
    if family == "gershgorin":
        # K planted atoms reach delta_K = (K - 1) mu; K + 1 of them put K at cosine +mu with an off-support
        # atom, which is where the TSAE window's lower end and the coherence bounds are tight.
        planted = draw(st.sampled_from((k, k + 1))) if k > 1 else k + 1
        mu = draw(st.sampled_from((0.25, 0.5)) | st.floats(0.01, 0.95))
        if recipe.edge is not None and draw(st.booleans()):
            mu = recipe.edge(k) * (1.0 - draw(_SLACKS))
        mu = min(mu, 0.95)
        # Atoms past d are random unit vectors kept when |cos| <= mu with every earlier atom: for a small mu
        # they are rarely found, so only mu >= 0.3 gets them.
        n, d = _draw_shape(draw, k, recipe, sizes, over=None if mu >= 0.3 else False, least=planted)
        seed = draw(_SEEDS)
        try:
            atoms = synth.gershgorin_tight_frame(planted, mu, d=d, n_atoms=n, seed=seed)
        except synth.UnreachableCoherenceError:
            reject()
        return _Drawn(
            atoms, f"synth.gershgorin_tight_frame(K={planted}, mu={mu!r}, d={d}, n_atoms={n}, seed={seed})"
        )
    if family == "edge":
        if recipe.edge is None:
            reject()
        # Capped at 0.999: at K = 1 the edge is mu < 1, where atoms a hair apart test the solver, not the
        # theorem (the near_duplicate family covers cosines up to 0.999999).
        mu = min(recipe.edge(k), 0.999) * (1.0 - draw(_SLACKS))
        n, d = _draw_shape(draw, k, recipe, sizes, over=True if recipe.spark else None, mu=mu)
        return _coherent(n, d, mu, draw(_SEEDS))
    if family == "welch":
        n, d = _draw_shape(draw, k, recipe, sizes, over=True)
        mu = min(1.0, welch_bound(n, d) * draw(st.floats(_REACHABLE, 2.0)))
        return _coherent(n, d, mu, draw(_SEEDS))
    if family == "orthonormal":
        n, d = _draw_shape(draw, k, recipe, sizes, over=False)
        return _coherent(n, d, 0.0, draw(_SEEDS))
    if family == "coherent":
        mu = draw(st.floats(0.05, 0.95))
        n, d = _draw_shape(draw, k, recipe, sizes, over=None, mu=mu)
        return _coherent(n, d, mu, draw(_SEEDS))
    if family == "near_duplicate":
        n, d = _draw_shape(draw, k, recipe, sizes, over=None)
        if d < 2:
            reject()
        cos, seed = draw(st.floats(0.99, 0.999999)), draw(_SEEDS)
        return _Drawn(
            synth.near_duplicate_dictionary(n, d, cos, seed),
            f"synth.near_duplicate_dictionary(n_atoms={n}, d={d}, cos={cos!r}, seed={seed})",
        )
    if family == "gaussian":
        n, d = _draw_shape(draw, k, recipe, sizes, over=None)
        seed = draw(_SEEDS)
        return _Drawn(
            synth.gaussian_dictionary(n, d, seed), f"synth.gaussian_dictionary({n}, {d}, seed={seed})"
        )
    if family == "duplicate":
        n, d = _draw_shape(draw, k, recipe, sizes, over=None, least=2)
        seed = draw(_SEEDS)
        return _Drawn(
            synth.twin_dictionary(n, d, seed), f"synth.twin_dictionary(n_atoms={n}, d={d}, seed={seed})"
        )
    if family == "window":
        return draw(_window(k, recipe, sizes))
    raise BadInputError(f"unknown dictionary family {family!r}; choose from {FAMILIES}.")


@st.composite
def _window(draw: st.DrawFn, k: int, recipe: Recipe, sizes: Sizes) -> _Drawn:
    """K + 1 atoms pairwise at cosine +mu (K of them crowd the last one up to the window's lower end
    mu K dmax) or -mu (one at dmin beside K - 1 at dmax sinks to the upper end dmin - mu (K - 1) dmax), with
    mu under the edge where the window is non-empty. Only for threshold recipes."""
    ds = [d for d in range(k + 1, sizes.max_d + 1) if _fits(k + 1, d, k, recipe, sizes)]
    if not recipe.threshold or not ds:
        reject()
    end = draw(st.sampled_from(("lower", "upper")))
    # At least 1e-9 under the edge: a float slack of 1e-300 would round mu onto it (an empty window).
    mu = recipe.edge(k) * (1.0 - max(draw(_SLACKS), 1e-9))
    d = draw(st.sampled_from(ds))
    negative = end == "upper"
    return _Drawn(
        synth.gershgorin_tight_frame(k + 1, mu, d=d, n_atoms=k + 1, negative=negative),
        f"synth.gershgorin_tight_frame(K={k + 1}, mu={mu!r}, d={d}, n_atoms={k + 1}, negative={negative})",
        end,
    )


def _largest_k(mu: float, k: int, recipe: Recipe, sizes: Sizes, n: int, d: int) -> int:
    """The largest K the premise mu < edge(K) allows for this dictionary (within the size limits), or k when
    none does: the premise is then false, which the report counts too."""
    cap = recipe.k_max or sizes.max_k
    allowed = [
        j for j in range(recipe.k_min, cap + 1) if mu < recipe.edge(j) and _shape_ok(n, d, j, recipe, sizes)
    ]
    return max(allowed) if allowed else k


def codes(
    atoms: torch.Tensor,
    n_samples: int,
    k: int,
    dmin: float,
    dmax: float,
    nonneg: bool,
    seed: int,
    *,
    edge: float = 0.0,
    mode: CodeMode = "random",
) -> torch.Tensor:
    """K-sparse codes (n_samples, n_atoms) float64 for unit atoms (n_atoms, d), magnitudes in [dmin, dmax].

    mode "random": `synth.planted_codes` (uniform supports, magnitudes snapped to dmin or dmax with
    probability `edge`). For each sample the adversarial modes pick a target atom j at random, then
    "crowd": the k other atoms most correlated with j (most positively when nonneg, largest |cos| otherwise),
        all at dmax, signed so every term pushes <m, d_j> the same way: the off-support pre-activation peaks;
    "oppose": j at dmin with the k - 1 atoms that most pull <m, d_j> down (most negative cos when nonneg),
        at dmax: the on-support pre-activation dips.
    The adversarial modes need n_atoms >= k + 1.
    """
    n_atoms = atoms.shape[0]
    if mode == "random":
        return synth.planted_codes(n_samples, n_atoms, k, dmin, dmax, nonneg, seed, edge=edge).values
    if mode not in ("crowd", "oppose"):
        raise BadInputError(f"mode must be 'random', 'crowd' or 'oppose', got {mode!r}.")
    if n_atoms < k + 1:
        raise BadInputError(
            f"mode={mode!r} needs an atom besides the k={k} it places; pass n_atoms >= k + 1 or "
            "mode='random'."
        )
    rng = np.random.default_rng(seed)
    gram = (atoms @ atoms.T).numpy()
    values = np.zeros((n_samples, n_atoms))
    for row, j in enumerate(rng.integers(n_atoms, size=n_samples)):
        cos = gram[j].copy()
        sign = np.where(cos >= 0, 1.0, -1.0)
        if mode == "crowd":
            score = cos if nonneg else np.abs(cos)
            score[j] = -np.inf
            others = np.argsort(-score, kind="stable")[:k]
            values[row, others] = dmax * (1.0 if nonneg else sign[others])
        else:
            score = -cos if nonneg else np.abs(cos)
            score[j] = -np.inf
            others = np.argsort(-score, kind="stable")[: k - 1]
            values[row, j] = dmin
            values[row, others] = dmax * (1.0 if nonneg else -sign[others])
    return torch.from_numpy(values)


# The code mode that reaches each end of the TSAE window on the "window" family's atoms.
_REACH: dict[str, CodeMode] = {"lower": "crowd", "upper": "oppose"}


@st.composite
def _codes(
    draw: st.DrawFn,
    atoms: torch.Tensor,
    k: int,
    recipe: Recipe,
    sizes: Sizes,
    dmin: float,
    dmax: float,
    window_end: str | None,
) -> tuple[torch.Tensor, str]:
    n_samples = draw(st.integers(1, sizes.max_samples))
    nonneg = {"nonneg": True, "signed": False}.get(recipe.codes)
    if nonneg is None:
        nonneg = draw(st.booleans())
    if window_end is not None:
        mode = _REACH[window_end]
    else:
        modes = ("random", "crowd", "oppose") if atoms.shape[0] > k else ("random",)
        mode = draw(st.sampled_from(modes))
    edge = draw(st.sampled_from((1.0, 0.5, 0.0)))
    seed = draw(_SEEDS)
    values = codes(atoms, n_samples, k, dmin, dmax, nonneg, seed, edge=edge, mode=mode)
    label = (
        f"claim_strategies.codes(atoms, n_samples={n_samples}, k={k}, dmin={dmin!r}, dmax={dmax!r}, "
        f"nonneg={nonneg}, seed={seed}, edge={edge}, mode={mode!r})"
    )
    return values, label


def _magnitudes(draw: st.DrawFn, eps: float, k: int, recipe: Recipe) -> tuple[float, float]:
    """(dmin, dmax): for a threshold recipe, dmin just above eps (2K - 1) dmax (a narrow TSAE window) or
    anywhere up to dmax; otherwise a range like synth's: dmin in [0.1, 1], dmax up to 10 dmin."""
    if not recipe.threshold:
        dmin = draw(st.floats(0.1, 1.0))
        return dmin, dmin * draw(st.floats(1.0, 10.0))
    dmax = draw(st.sampled_from((1.0,)) | st.floats(0.5, 4.0))
    floor = eps * (2 * k - 1)
    width = draw(st.sampled_from((1e-6, 1e-3)) | st.floats(0.0, 1.0))
    if floor < 1.0:
        # min(): floor + (1 - floor) can round one ulp above 1.
        return min(dmax, dmax * (floor + (1.0 - floor) * max(width, 1e-6))), dmax
    # An empty window: the true claims' premise fails, the variants without one end can still hold.
    return dmax * max(width, 0.05), dmax


_PLACES = ("at the lower end", "at the upper end", "inside", "below the window", "above the window")
# The "window" family's places at each end: beyond it first (where shrinking goes), or just inside.
_END_PLACES = {
    "lower": ("below the window", "at the lower end"),
    "upper": ("above the window", "at the upper end"),
}


def _threshold(
    draw: st.DrawFn, eps: float, k: int, dmin: float, dmax: float, window_end: str | None
) -> tuple[float, str]:
    """tau at the window eps K dmax < tau < dmin - eps (K - 1) dmax: just inside either end, inside, or a
    relative distance beyond either end (half the time under 1e-2); only at `window_end` when given, and
    then beyond it by under 1e-2."""
    lower, upper = eps * k * dmax, dmin - eps * (k - 1) * dmax
    where = draw(st.sampled_from(_PLACES if window_end is None else _END_PLACES[window_end]))
    beyond = _BEYOND if window_end is None else _JUST_BEYOND
    width = upper - lower
    # An absolute slack of at least 1e-9 dmax from either end keeps the instance clear of float64 rounding.
    least = 1e-9 * dmax
    if where in ("at the lower end", "at the upper end", "inside") and width <= 2 * least:
        # The window is empty or too thin to sit in: beyond it (beyond the window family's end).
        where = "below the window" if window_end is None else _END_PLACES[window_end][0]
    if where == "below the window":
        tau = min(lower, upper) * (1.0 - draw(beyond))
    elif where == "above the window":
        tau = max(lower, upper) * (1.0 + draw(beyond))
    else:
        fraction = draw(st.floats(0, 1)) if where == "inside" else draw(_SLACKS)
        slack = min(max(fraction * width, least), width - least)
        tau = lower + slack if where != "at the upper end" else upper - slack
    if not tau > 0:
        reject()
    return tau, where


@st.composite
def _instances(draw: st.DrawFn, recipe: Recipe, sizes: Sizes) -> Instance:
    family = draw(st.sampled_from(recipe.families))
    k_cap = recipe.k_max or sizes.max_k
    k = draw(st.integers(recipe.k_min, max(recipe.k_min, k_cap)))
    drawn = draw(_dictionary(family, k, recipe, sizes))
    dic = Dictionary(drawn.atoms)
    n, d = dic.n_atoms, dic.d
    if recipe.edge is not None and draw(st.sampled_from(("largest", "drawn"))) == "largest":
        k = _largest_k(dic.coherence(), k, recipe, sizes, n, d)
    if not _shape_ok(n, d, k, recipe, sizes):
        reject()
    label = drawn.label
    values = threshold = dmin = dmax = None
    if recipe.codes is not None:
        dmin, dmax = _magnitudes(draw, dic.coherence(), k, recipe)
        values, code_label = draw(_codes(dic.unit, k, recipe, sizes, dmin, dmax, drawn.window_end))
        label += f"; {code_label}"
    if recipe.threshold:
        threshold, where = _threshold(draw, dic.coherence(), k, dmin, dmax, drawn.window_end)
        label += f"; tau={threshold!r} ({where})"
    return instance(dic, k, codes=values, threshold=threshold, dmin=dmin, dmax=dmax, label=label)


def instances(
    claim: Claim, sizes: Sizes | None = None, families: tuple[str, ...] | None = None
) -> st.SearchStrategy[Instance]:
    """Instances of `claim` drawn by its recipe (`RECIPES`, or a generic one from `claim.needs`), from the
    given dictionary families only when `families` is set (a subset of the recipe's)."""
    recipe = recipe_for(claim)
    if families is not None:
        unknown = [f for f in families if f not in recipe.families]
        if not families or unknown:
            raise BadInputError(
                f"families {families!r} must be a non-empty subset of claim {claim.name!r}'s recipe families "
                f"{recipe.families}."
            )
        recipe = replace(recipe, families=tuple(families))
    return _instances(recipe, sizes or Sizes())

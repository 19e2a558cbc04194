"""The theorems of SPEC section 4 as claims that can be checked on any instance.

A claim has a premise and a conclusion, each evaluated on an `Instance` (unit-norm atoms, a sparsity K, and
where the claim needs them planted codes and a threshold) with a margin: how far inside (> 0) or outside (< 0)
the inequality the instance landed. One definition per theorem drives proofs_check/, `atoms verify` and the
report.

A conclusion is True (proved on this instance), False (refuted: the instance is a counterexample) or None
(undecided: an exact value was too expensive and only bounds were found, or basis pursuit landed in the
flagged band between 1e-5 and 1e-3 relative error). Only a False conclusion under a true premise refutes a
theorem.

Each theorem also has planted false variants (`FALSE_VARIANTS`): statements that look plausible but are
wrong. A test suite that cannot refute them is too weak to trust when it passes the true ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from atoms.dictionary import Dictionary, welch_bound
from atoms.errors import BadInputError, IllConditionedError
from atoms.kernels.threshold_encoder import threshold_encode
from atoms.recovery import basis_pursuit, erc
from atoms.rip import rip_constant
from atoms.uniqueness import spark

__all__ = ["CLAIMS", "FALSE_VARIANTS", "Claim", "Instance", "Verdict", "instance"]


@dataclass(frozen=True)
class Instance:
    """What a claim is checked on.

    dictionary: the atoms, unit-normalised (under the AIP when it was built with one).
    k: the sparsity K the claim speaks about.
    codes: (n_samples, n_atoms) float64 planted K-sparse codes on `dictionary.unit`, or None.
    threshold: the TSAE threshold tau, or None.
    dmin, dmax: the range of the non-zero code magnitudes (TSAE identifiability), or None.
    label: where the instance came from, for tables and counterexample printouts.
    """

    dictionary: Dictionary
    k: int
    codes: torch.Tensor | None = None
    threshold: float | None = None
    dmin: float | None = None
    dmax: float | None = None
    label: str = ""

    @property
    def mu(self) -> float:
        return self.dictionary.coherence()

    def describe(self) -> str:
        """One line that is enough to rebuild the instance by hand."""
        parts = [
            self.label or "instance",
            f"n_atoms={self.dictionary.n_atoms}",
            f"d={self.dictionary.d}",
            f"K={self.k}",
            f"mu={self.mu:.6g}",
        ]
        if self.codes is not None:
            parts.append(f"samples={self.codes.shape[0]}")
        if self.threshold is not None:
            parts.append(f"tau={self.threshold:.6g}, code magnitudes in [{self.dmin:.6g}, {self.dmax:.6g}]")
        return ", ".join(parts)


def instance(
    atoms: torch.Tensor | Dictionary,
    k: int,
    *,
    codes: torch.Tensor | None = None,
    threshold: float | None = None,
    dmin: float | None = None,
    dmax: float | None = None,
    label: str = "",
) -> Instance:
    """Build an Instance from atoms (n_atoms, d) (or a Dictionary), checking K and the codes' shape."""
    dic = atoms if isinstance(atoms, Dictionary) else Dictionary(atoms)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= dic.n_atoms:
        raise BadInputError(f"k must be an int in [1, n_atoms = {dic.n_atoms}], got {k!r}.")
    if codes is not None:
        codes = torch.as_tensor(codes, dtype=torch.float64)
        if codes.ndim != 2 or codes.shape[1] != dic.n_atoms or codes.shape[0] == 0:
            raise BadInputError(
                f"codes must be (n_samples >= 1, n_atoms = {dic.n_atoms}), got {tuple(codes.shape)}."
            )
        # Every claim speaks of K-sparse codes: a denser code would be a counterexample to nothing.
        dense = ((codes != 0).sum(dim=1) > k).nonzero().flatten()
        if dense.numel():
            raise BadInputError(
                f"codes rows {dense[:10].tolist()} have more than k = {k} non-zeros; pass k >= the largest "
                "support size, or sparser codes."
            )
    if dmin is not None and dmax is not None and not 0 < dmin <= dmax:
        raise BadInputError(f"need 0 < dmin <= dmax, got dmin = {dmin!r}, dmax = {dmax!r}.")
    if codes is not None and (dmin is not None or dmax is not None):
        magnitudes = codes.abs()[codes != 0]
        low = -math.inf if dmin is None else dmin
        high = math.inf if dmax is None else dmax
        if bool(((magnitudes < low) | (magnitudes > high)).any()):
            raise BadInputError(
                f"code magnitudes span [{float(magnitudes.min()):.6g}, {float(magnitudes.max()):.6g}], "
                f"outside [dmin, dmax] = [{low:.6g}, {high:.6g}]; pass the range the codes were drawn from."
            )
    return Instance(dic, k, codes, threshold, dmin, dmax, label)


class Verdict(NamedTuple):
    """A claim's outcome on one instance.

    premise / conclusion: True, False, or None (conclusion undecided). The margins are > 0 inside the
    inequality and < 0 outside it, in the inequality's own units; the premise is True when its margin
    exceeds RELATIVE_TOLERANCE times the size of what it compares (`Claim.premise_scale`). `evidence` says
    how the conclusion was decided (exact value, bound, solver errors) and, for a counterexample, what the
    counterexample is.
    """

    premise: bool
    premise_margin: float
    conclusion: bool | None
    conclusion_margin: float
    evidence: str

    @property
    def counterexample(self) -> bool:
        """The premise holds and the conclusion is refuted."""
        return self.premise and self.conclusion is False


Outcome = tuple[bool | None, float, str]

# Every comparison of theorems.py allows float64 rounding relative to the size of what it compares: a
# quantity of size s built from a few dozen roundings is off by ~1e-16 s per rounding, so RELATIVE_TOLERANCE
# times s leaves room for 1e4 of them. An absolute slack is wrong at both ends of the scale: 1e-12 refuted
# the raw code error bound at dmax = 1e4 (margin -1.4e-12, i.e. -1.4e-16 relative), took rounding for a held
# TSAE window at dmax = 1e6 and rejected windows held by 1e-9 relative at dmax = 1e-6. A strict premise
# must hold by more than this: ERC of [I; H_4/2] on atoms {3, 7} is 1 in exact arithmetic, computes just
# under it, and the dual certificate it promises then fails by 2e-16 (found by proofs_check). Strategies
# draw >= 1e-9 (relative) from edges.
RELATIVE_TOLERANCE = 1e-12


def _tolerance(*quantities: float) -> float:
    """RELATIVE_TOLERANCE times the largest finite |quantity| (an infinite one is compared exactly)."""
    return RELATIVE_TOLERANCE * max((abs(q) for q in quantities if math.isfinite(q)), default=0.0)


def _unit_scale(inst: Instance) -> float:
    """The size of a dimensionless premise's two sides (coherences, ERC, delta_2K and their limits): 1."""
    return 1.0


def _k_scale(inst: Instance) -> float:
    """The size of both sides of K < f (1 + 1/mu), equal at the premise's edge: K."""
    return float(inst.k)


def _code_scale(inst: Instance) -> float:
    """The size of the TSAE window's ends and of a pre-activation (K terms of at most dmax): K dmax."""
    return inst.k * inst.dmax


@dataclass(frozen=True)
class Claim:
    """A theorem, or a planted false variant of one, as premise => conclusion on an Instance.

    premise(inst) -> margin (> 0 inside the inequality, in its own units); conclusion(inst) -> (held, margin,
    evidence). premise_scale(inst) -> the size of the quantities the premise compares: the premise holds when
    its margin exceeds RELATIVE_TOLERANCE times that (float64 rounding at its edge is not taken as held).
    needs: the Instance fields the claim reads besides the dictionary and K.
    """

    name: str
    theorem: str
    statement: str
    premise: Callable[[Instance], float]
    conclusion: Callable[[Instance], Outcome]
    needs: tuple[str, ...] = ()
    source: str = ""
    planted_false: bool = False
    premise_scale: Callable[[Instance], float] = _unit_scale

    def check(self, inst: Instance) -> Verdict:
        """Evaluate premise and conclusion on `inst` (the conclusion even when the premise fails: the report
        shows how often the conclusion holds without the premise, i.e. how conservative the premise is)."""
        missing = [f for f in self.needs if getattr(inst, f) is None]
        if missing:
            raise BadInputError(
                f"claim {self.name!r} needs {missing} on its instance; build it with "
                f"atoms.theorems.instance(..., {', '.join(f + '=...' for f in missing)})."
            )
        margin = float(self.premise(inst))
        held, c_margin, evidence = self.conclusion(inst)
        return Verdict(margin > _tolerance(self.premise_scale(inst)), margin, held, float(c_margin), evidence)


# ---- premises ----


def _always(inst: Instance) -> float:
    """A premise that every instance satisfies (unit-norm atoms are guaranteed by Dictionary)."""
    return math.inf


def _coherence_uniqueness(inst: Instance, factor: float = 2.0) -> float:
    """mu < 1 / (factor K - 1), written as the margin 1 / (factor K - 1) - mu. factor = 2 is the theorem."""
    return 1.0 / (factor * inst.k - 1.0) - inst.mu


def _coherence_sparsity(inst: Instance, factor: float = 0.5) -> float:
    """K < factor (1 + 1/mu), as the margin factor (1 + 1/mu) - K; factor 1/2 is the l1-recovery theorem."""
    if inst.mu == 0:
        return math.inf
    return factor * (1.0 + 1.0 / inst.mu) - inst.k


def _supports(codes: torch.Tensor) -> list[torch.Tensor]:
    return [row.nonzero().flatten() for row in codes]


def _erc_premise(inst: Instance, limit: float = 1.0) -> float:
    """max over the codes' supports of ERC(L) < limit, as limit - max ERC. limit = 1 is Tropp's condition."""
    supports = _supports(inst.codes)
    if any(s.numel() >= inst.dictionary.d for s in supports):
        # d or more atoms on a support leave no room for an off-support atom outside their span.
        return -math.inf
    # A support holding every atom has no off-support atom: ERC is a maximum over an empty set, 0.
    n_atoms = inst.dictionary.n_atoms
    try:
        worst = max(erc(inst.dictionary.unit, s) if s.numel() < n_atoms else 0.0 for s in supports)
    except IllConditionedError:
        # Linearly dependent atoms on a support (e.g. 4 atoms of the Steiner ETF (16, 6), whose spark is 4):
        # Tropp's condition presumes independent atoms, so the premise fails.
        return -math.inf
    return limit - worst


def _rip_recovery_premise(inst: Instance, limit: float = 1.0 / math.sqrt(2.0)) -> float:
    """delta_2K < limit; only an exact delta_2K can satisfy it (a lower bound cannot prove the premise)."""
    two_k = 2 * inst.k
    if two_k > inst.dictionary.n_atoms:
        return -math.inf
    rip = rip_constant(inst.dictionary, two_k)
    if rip.kind != "exact":
        return -math.inf
    return limit - rip.value


def _tsae_window(inst: Instance, lower: float = 1.0, widen: float = 0.0) -> float:
    """eps K dmax < tau < dmin - eps (K - 1) dmax, as the smaller of the two slacks (eps = coherence), in code
    units (its scale is K dmax, `_code_scale`). The planted false variants move the ends: the lower end
    times `lower` (0: tau > 0 only), the upper end up by `widen` dmax.

    The theorem is about non-negative codes (a negative entry is zeroed by any threshold): -inf otherwise."""
    if bool((inst.codes < 0).any()):
        return -math.inf
    eps, k, tau = inst.mu, inst.k, inst.threshold
    return min(
        tau - lower * eps * k * inst.dmax,
        inst.dmin - eps * (k - 1) * inst.dmax + widen * inst.dmax - tau,
    )


def _one_sparse(inst: Instance) -> float:
    """K = 1, as the margin 1.5 - K (K is an integer); mu <= 1 holds for every dictionary."""
    return 1.5 - inst.k


# ---- conclusions ----


def _welch(inst: Instance, factor: float = 1.0) -> Outcome:
    """mu >= factor x the Welch bound, up to rounding relative to the larger of the two (ETFs meet it)."""
    dic = inst.dictionary
    bound = factor * welch_bound(dic.n_atoms, dic.d)
    margin = inst.mu - bound
    held = margin >= -_tolerance(inst.mu, bound)
    return held, margin, f"mu = {inst.mu:.12g}, bound = {bound:.12g}"


def _rip_bound(inst: Instance, bound: Callable[[Instance], float], name: str) -> Outcome:
    """delta_K <= bound, up to rounding relative to ||G_SS|| = 1 + delta_K (delta_K is computed from it by
    cancellation) or to the bound, whichever is larger."""
    rip = rip_constant(inst.dictionary, inst.k)
    b = bound(inst)
    margin = b - rip.value
    evidence = f"delta_K {rip.kind} = {rip.value:.9g} on support {rip.support}, {name} = {b:.9g}"
    if margin < -_tolerance(1.0 + rip.value, b):
        return False, margin, evidence
    return (True if rip.kind == "exact" else None), margin, evidence


def _gershgorin(inst: Instance, offset: int = 1) -> float:
    return (inst.k - offset) * inst.mu


def _babel(inst: Instance, offset: int = 1) -> float:
    j = inst.k - offset
    return 0.0 if j <= 0 else inst.dictionary.babel(j)


def _exact_spark(inst: Instance) -> tuple[float | None, float, float, str]:
    result = spark(inst.dictionary, time_limit=30.0)
    evidence = f"spark {result.kind} via {result.method}, in [{result.lower:g}, {result.upper:g}]"
    if result.support is not None:
        evidence += f", dependent atoms {result.support}"
    return result.value, result.lower, result.upper, evidence


def _spark_bound(inst: Instance, factor: float = 1.0) -> Outcome:
    """spark >= 1 + factor/mu; the spark is an integer, the bound is allowed rounding relative to its size
    (the simplex and exact twins meet it: spark d + 1 = 1 + 1/mu, spark 2 = 1 + 1/1)."""
    bound = 1.0 + factor / inst.mu if inst.mu > 0 else math.inf
    value, lower, upper, evidence = _exact_spark(inst)
    evidence += f", 1 + {factor:g}/mu = {bound:.9g}"
    slack = _tolerance(bound)
    if upper < bound - slack:
        return False, upper - bound, evidence
    if value is None:
        return (True if lower >= bound - slack else None), lower - bound, evidence
    return True, value - bound, evidence


def _unique_sparsest(inst: Instance) -> Outcome:
    """Every K-sparse representation is the unique sparsest one, which holds iff 2K < spark (Donoho-Elad)."""
    _, lower, upper, evidence = _exact_spark(inst)
    two_k = 2 * inst.k
    if upper <= two_k:
        # A dependent set of spark <= 2K atoms splits into two codes of at most K atoms with equal images.
        return False, upper - two_k - 0.5, evidence + f"; 2K = {two_k}: two K-sparse codes share an image"
    if lower > two_k:
        return True, lower - two_k - 0.5, evidence
    return None, lower - two_k - 0.5, evidence


# Success policy of SPEC section 7: relative code error under 1e-5 is recovered, over 1e-3 failed.
_RECOVERED, _FAILED = 1e-5, 1e-3


def _l1_recovers(inst: Instance, nonneg: bool = False) -> Outcome:
    """Basis pursuit (the cvxpy reference) recovers every planted code exactly.

    The bands are relative code errors (SPEC section 7), so they scale with the codes. The margin is in
    decades: log10(1e-5 / worst relative error), > 0 when every code is recovered."""
    unit = inst.dictionary.unit
    result = basis_pursuit(unit, inst.codes @ unit, nonneg=nonneg, solver="cvxpy", true_codes=inst.codes)
    worst = float(result.errors.max())
    margin = math.log10(_RECOVERED / max(worst, 1e-300))
    evidence = f"basis pursuit: {result.counts}, worst relative error {worst:.3g}"
    if result.counts["failed"]:
        i = result.decisions.index("failed")
        support = inst.codes[i].nonzero().flatten().tolist()
        evidence += f"; sample {i} on support {support} ({result.reasons[i]})"
        return False, margin, evidence
    if result.counts["flagged"]:
        return None, margin, evidence
    return True, margin, evidence


def _tsae_supports(inst: Instance) -> Outcome:
    """The threshold encoder with W_enc = whitened atoms transposed recovers every support exactly.

    Supports are compared exactly, without a slack: the window premise keeps tau a relative tolerance away
    from the pre-activations the theorem bounds. Margin: the smallest gap between a code's pre-activation and
    tau, over on-support (z - tau) and off-support (tau - z) entries, in code units."""
    unit = inst.dictionary.unit
    m = inst.codes @ unit
    n_atoms = unit.shape[0]
    tau = torch.full((n_atoms,), float(inst.threshold), dtype=torch.float64)
    encoded = threshold_encode(m, unit.T.contiguous(), torch.zeros(n_atoms, dtype=torch.float64), tau)
    true_support, found = inst.codes != 0, encoded != 0
    z = m @ unit.T
    gaps = torch.where(true_support, z - tau, tau - z)
    margin = float(gaps.min())
    wrong = (true_support != found).any(dim=1).nonzero().flatten()
    if wrong.numel():
        i = int(wrong[0])
        true_i, found_i = true_support[i].nonzero().flatten().tolist(), found[i].nonzero().flatten().tolist()
        evidence = (
            f"{wrong.numel()} of {m.shape[0]} supports wrong; sample {i}: true {true_i}, encoded {found_i}"
        )
        return False, margin, evidence
    return True, margin, f"all {m.shape[0]} supports recovered, smallest gap to tau {margin:.3g}"


def _tsae_refit(inst: Instance) -> Outcome:
    """Least squares on the encoder's support reconstructs m exactly (the paper's 'exact reconstruction').

    Exactly means a residual under 1e-10 relative to ||m||. Margin in decades: log10(1e-10 / worst relative
    residual)."""
    unit = inst.dictionary.unit
    m = inst.codes @ unit
    n_atoms = unit.shape[0]
    tau = torch.full((n_atoms,), float(inst.threshold), dtype=torch.float64)
    encoded = threshold_encode(m, unit.T.contiguous(), torch.zeros(n_atoms, dtype=torch.float64), tau)
    worst = 0.0
    for row, target in zip(encoded, m, strict=True):
        support = row.nonzero().flatten()
        if support.numel() == 0:
            worst = max(worst, 1.0)
            continue
        coef = torch.linalg.lstsq(unit[support].T, target[:, None]).solution[:, 0]
        worst = max(worst, float(torch.linalg.vector_norm(coef @ unit[support] - target) / target.norm()))
    margin = math.log10(1e-10 / max(worst, 1e-300))
    return worst < 1e-10, margin, f"worst relative residual after refit {worst:.3g}"


def _tsae_code_error(inst: Instance, factor: float = 1.0) -> Outcome:
    """Raw codes (no refit) are off by at most eps (K - 1) dmax per entry on the support (times `factor`).

    The error is a pre-activation (a sum of K terms of at most dmax) minus a code: it is allowed rounding
    relative to K dmax. The Gershgorin-tight frame attains the bound exactly, where an absolute slack failed
    from dmax = 3.7e3 up."""
    unit = inst.dictionary.unit
    z = inst.codes @ unit @ unit.T
    on = inst.codes != 0
    error = float((z - inst.codes).abs()[on].max())
    bound = factor * inst.mu * (inst.k - 1) * inst.dmax
    margin = bound - error
    return (
        margin >= -_tolerance(_code_scale(inst)),
        margin,
        f"max raw code error {error:.6g}, bound eps (K-1) dmax x {factor:g} = {bound:.6g}",
    )


# ---- the claims ----

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "welch",
        "3 (coherence)",
        "mu >= sqrt((N - d) / (d (N - 1))) for N unit atoms in R^d",
        _always,
        _welch,
        source="Welch 1974",
    ),
    Claim(
        "rip_gershgorin",
        "1 (RIP)",
        "delta_K <= (K - 1) mu",
        _always,
        lambda inst: _rip_bound(inst, _gershgorin, "(K-1) mu"),
        source="Gershgorin; SPEC 4.1",
    ),
    Claim(
        "rip_babel",
        "1 (RIP)",
        "delta_K <= mu1(K - 1)",
        _always,
        lambda inst: _rip_bound(inst, _babel, "mu1(K-1)"),
        source="Tropp 2004; SPEC 4.1",
    ),
    Claim(
        "spark_coherence",
        "2 (uniqueness)",
        "spark(D) >= 1 + 1/mu",
        _always,
        _spark_bound,
        source="Donoho-Elad 2003",
    ),
    Claim(
        "uniqueness_coherence",
        "2 (uniqueness)",
        "mu < 1/(2K - 1)  =>  every K-sparse code is the unique sparsest representation (2K < spark)",
        _coherence_uniqueness,
        _unique_sparsest,
        source="Donoho-Elad 2003; SPEC 4.2",
    ),
    Claim(
        "l1_coherence",
        "3 (exact l1 recovery)",
        "K < (1 + 1/mu)/2  =>  basis pursuit recovers every K-sparse code",
        _coherence_sparsity,
        _l1_recovers,
        needs=("codes",),
        source="Donoho-Elad 2003, Gribonval-Nielsen 2003",
        premise_scale=_k_scale,
    ),
    Claim(
        "l1_erc",
        "3 (exact l1 recovery)",
        "ERC(L) < 1 on the support  =>  basis pursuit recovers the code",
        _erc_premise,
        _l1_recovers,
        needs=("codes",),
        source="Tropp 2004",
    ),
    Claim(
        "l1_rip",
        "3 (exact l1 recovery)",
        "delta_2K < 1/sqrt(2)  =>  basis pursuit recovers every K-sparse code",
        _rip_recovery_premise,
        _l1_recovers,
        needs=("codes",),
        source="Cai-Zhang 2014",
    ),
    Claim(
        "tsae_support",
        "4 (TSAE identifiability)",
        "eps K dmax < tau < dmin - eps (K-1) dmax  =>  the threshold encoder recovers every support",
        _tsae_window,
        _tsae_supports,
        needs=("codes", "threshold", "dmin", "dmax"),
        source="SPEC 4.4",
        premise_scale=_code_scale,
    ),
    Claim(
        "tsae_refit",
        "4 (TSAE identifiability)",
        "inside the window, least squares on the encoded support reconstructs m exactly",
        _tsae_window,
        _tsae_refit,
        needs=("codes", "threshold", "dmin", "dmax"),
        source="SPEC 4.4 (the paper's exact reconstruction, after a refit)",
        premise_scale=_code_scale,
    ),
    Claim(
        "tsae_code_error",
        "4 (TSAE identifiability)",
        "raw encoder codes are within eps (K-1) dmax of the true codes on the support",
        _always,
        _tsae_code_error,
        needs=("codes", "dmax"),
        source="SPEC 4.4 (the O(eps K dmax) raw error)",
    ),
)

FALSE_VARIANTS: tuple[Claim, ...] = (
    Claim(
        "false_welch_strict",
        "3 (coherence)",
        "mu >= 1.01 x the Welch bound (false: equiangular tight frames meet the bound)",
        _always,
        lambda inst: _welch(inst, factor=1.01),
        planted_false=True,
    ),
    Claim(
        "false_rip_gershgorin",
        "1 (RIP)",
        "delta_K <= (K - 2) mu (false: Gershgorin is tight)",
        _always,
        lambda inst: _rip_bound(inst, lambda i: _gershgorin(i, offset=2), "(K-2) mu"),
        planted_false=True,
    ),
    Claim(
        "false_spark_coherence",
        "2 (uniqueness)",
        "spark(D) >= 1 + 2/mu (false: the simplex has spark d + 1 = 1 + 1/mu)",
        _always,
        lambda inst: _spark_bound(inst, factor=2.0),
        planted_false=True,
    ),
    Claim(
        "false_uniqueness",
        "2 (uniqueness)",
        "mu < 1/K  =>  every K-sparse code is the unique sparsest representation",
        lambda inst: 1.0 / inst.k - inst.mu,
        _unique_sparsest,
        planted_false=True,
    ),
    Claim(
        "false_l1_twice",
        "3 (exact l1 recovery)",
        "K < 1 + 1/mu (twice the coherence bound)  =>  basis pursuit recovers every K-sparse code",
        lambda inst: _coherence_sparsity(inst, factor=1.0),
        _l1_recovers,
        needs=("codes",),
        planted_false=True,
        premise_scale=_k_scale,
    ),
    Claim(
        "false_l1_one_sparse",
        "3 (exact l1 recovery)",
        "K = 1 (any mu <= 1)  =>  basis pursuit recovers every 1-sparse code (false: an exact duplicate or "
        "antipode of the atom splits the code)",
        _one_sparse,
        _l1_recovers,
        needs=("codes",),
        planted_false=True,
    ),
    Claim(
        "false_tsae_low_threshold",
        "4 (TSAE identifiability)",
        "tau < dmin - eps (K-1) dmax alone (no lower end of the window)  =>  supports recovered",
        lambda inst: _tsae_window(inst, lower=0.0),
        _tsae_supports,
        needs=("codes", "threshold", "dmin", "dmax"),
        planted_false=True,
        premise_scale=_code_scale,
    ),
    Claim(
        "false_tsae_lower_end",
        "4 (TSAE identifiability)",
        "0.99 eps K dmax < tau < dmin - eps (K-1) dmax  =>  supports recovered (false: K atoms at dmax, "
        "each at cosine +eps with an off-support atom, lift it to eps K dmax)",
        lambda inst: _tsae_window(inst, lower=0.99),
        _tsae_supports,
        needs=("codes", "threshold", "dmin", "dmax"),
        planted_false=True,
        premise_scale=_code_scale,
    ),
    Claim(
        "false_tsae_upper_end",
        "4 (TSAE identifiability)",
        "eps K dmax < tau < dmin - eps (K-1) dmax + 0.01 dmax  =>  supports recovered (false: an atom at "
        "dmin beside K - 1 atoms at cosine -eps and dmax sinks to the window's upper end)",
        lambda inst: _tsae_window(inst, widen=0.01),
        _tsae_supports,
        needs=("codes", "threshold", "dmin", "dmax"),
        planted_false=True,
        premise_scale=_code_scale,
    ),
    Claim(
        "false_tsae_exact_raw",
        "4 (TSAE identifiability)",
        "raw encoder codes equal the true codes (exact reconstruction without a refit)",
        _always,
        lambda inst: _tsae_code_error(inst, factor=1e-9),
        needs=("codes", "dmax"),
        planted_false=True,
    ),
)

"""The verdict rules of SPEC section 8: each claim of the paper holds, fails, or is inconclusive.

The rules live here, apart from rendering; every reason sentence is built from the evidence's numbers.

Value claims (the paper states a number v; our interval [lo, hi] at margin t, `PaperClaim.margin`):
- a premise of the comparison unmet (including fewer than `MIN_SEEDS` seeds for a trained claim) ->
  inconclusive, naming the premise and its data;
- holds if [lo, hi] lies inside [v - t, v + t], or contains v and is at most 2 t wide (precise enough to
  have excluded a value t away);
- fails if [lo, hi] lies entirely outside [v - t, v + t] and, for a trained claim, training converged by the
  plateau rule (atoms.convergence);
- inconclusive otherwise: not converged, or the interval straddles the margin's edge / is wider than 2 t.

Convergence gates "fails" only. The claims are about what training reaches: a run that already matches the
paper before its loss plateaued shows it is reached (the sentence still says it had not plateaued), while one
that falls short may only need more steps.

Direction claims (the paper states an inequality: statistic > threshold or < threshold): premise unmet ->
inconclusive; holds if the whole interval is on the claimed side; fails if it is entirely on the other side
(touching the threshold counts as the other side) and, where training is involved, it converged;
inconclusive otherwise.

The capacity-vs-data jump: see `jump_verdict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, NamedTuple

from atoms.errors import BadInputError
from atoms.intervals import Interval

__all__ = [
    "ANGLE_MARGIN_DEG",
    "JUMP_GRADUAL_CELLS",
    "JUMP_HIGH_MIN",
    "JUMP_LOW_MAX",
    "JUMP_SPAN_RATIO",
    "MIN_SEEDS",
    "PAPER_CLAIMS",
    "Q_STAR_MARGIN",
    "R2_MARGIN",
    "ClaimEvidence",
    "ClaimVerdict",
    "GridCell",
    "JumpEvidence",
    "PaperClaim",
    "Premise",
    "Verdict",
    "direction_verdict",
    "jump_verdict",
    "unmeasured_verdict",
    "value_verdict",
    "verdict",
    "verdict_table",
]

R2_MARGIN = 0.01
"""Practical-equivalence margin of R^2 claims, in R^2 units (one percentage point of variance explained).
The paper reports per-model averages over layers to 0.1 point without error bars, so any margin is a
convention; this one is stated here and printed with each verdict."""
Q_STAR_MARGIN = 0.01
"""Practical-equivalence margin of q* claims, in fraction units (one percentage point), for the same
reason."""
ANGLE_MARGIN_DEG = 2.0
"""Degrees from 90 within which a mean angle counts as centred at 90 (the report's own 2-degree rule for the
Gaussian null's Euclidean angles, atoms.report.shift_sentences)."""
MIN_SEEDS = 3
"""Fewest training seeds behind the interval of a trained claim: with fewer, the interval does not cover the
seed-to-seed variation (atoms.intervals.combine_seeds)."""
JUMP_LOW_MAX = 0.8
"""A grid cell is below the jump when its whole R^2 interval is under this: the paper's R^2 "stays near
0.6-0.8" before the jump."""
JUMP_HIGH_MIN = 0.95
"""A grid cell is past the jump ("about 1") when its whole R^2 interval is at or above this."""
JUMP_GRADUAL_CELLS = 2
"""A row that reaches its critical n_atoms after this many cells wholly between JUMP_LOW_MAX and
JUMP_HIGH_MIN climbs gradually: R^2 does not "stay near 0.6-0.8" and then jump, it rises over at least
three grid steps (with the default doublings of n_atoms, a factor of 8). One such cell is allowed: a sharp
jump can fall between two grid points."""
JUMP_SPAN_RATIO = 1.0
"""A grid row (one training-set size T) reaches the claimed range when its largest dictionary has at least
JUMP_SPAN_RATIO * T atoms: then every training vector can have an atom of its own, so a critical capacity
"matched to the number of training activations" has been passed and a converged fit must be near 1."""


class Verdict(StrEnum):
    """The three outcomes of SPEC section 8."""

    HOLDS = "holds"
    FAILS = "fails"
    INCONCLUSIVE = "inconclusive"


Units = Literal["fraction", "degrees", "margin"]


@dataclass(frozen=True)
class PaperClaim:
    """One claim of the paper, as the verdict rules read it."""

    name: str
    """Key of the claim in PAPER_CLAIMS and in the evidence."""
    kind: Literal["value", "direction", "jump"]
    """Which rule decides it."""
    description: str
    """What the paper claims, in a sentence."""
    source: str
    """Where in the paper (and SPEC) the claim is made."""
    units: Units
    """How numbers are printed: fraction as %, degrees, or a plain margin."""
    trained: bool
    """Whether the evidence comes from trained dictionaries (then convergence and seeds matter)."""
    value: float | None = None
    """The paper's number (value claims), in `units`."""
    margin: float = 0.0
    """Practical-equivalence margin (value claims), absolute, in `units`."""
    side: Literal[">", "<"] | None = None
    """The claimed side of `threshold` (direction claims)."""
    threshold: float | None = None
    """The threshold of a direction claim, in `units`."""

    def paper(self) -> str:
        """The paper's value or inequality, formatted."""
        if self.kind == "value":
            return f"{_fmt(self.value, self.units)} (margin {_fmt(self.margin, self.units)})"
        if self.kind == "direction":
            return f"{self.side} {_fmt(self.threshold, self.units)}"
        return (
            f"R^2 < {JUMP_LOW_MAX:g} at small n_atoms, >= {JUMP_HIGH_MIN:g} past a critical n_atoms "
            "that grows with the training tokens"
        )


def _fmt(x: float | None, units: Units, *, signed: bool = False) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    sign = "+" if signed else ""
    if units == "fraction":
        return f"{100 * x:{sign}.2f}%"
    if units == "degrees":
        return f"{x:{sign}.2f} deg"
    return f"{x:{sign}.4g}"


_PAPER = "arXiv 2509.20784"
PAPER_CLAIMS: dict[str, PaperClaim] = {
    c.name: c
    for c in (
        PaperClaim(
            "r2_atoms",
            "value",
            "TSAE atoms under the AIP reconstruct activations with R^2 = 99.9%",
            f"{_PAPER}, results table (per-model average over layers); SPEC sections 5-6",
            "fraction",
            True,
            value=0.999,
            margin=R2_MARGIN,
        ),
        PaperClaim(
            "q_star_atoms",
            "value",
            "TSAE atoms reach stability q* = 99.8%",
            f"{_PAPER}, results table; SPEC sections 5-6",
            "fraction",
            True,
            value=0.998,
            margin=Q_STAR_MARGIN,
        ),
        PaperClaim(
            "q_star_neurons",
            "value",
            "neurons (the identity basis) reach stability q* = 0.5%",
            f"{_PAPER}, results table; SPEC sections 5-6",
            "fraction",
            False,
            value=0.005,
            margin=Q_STAR_MARGIN,
        ),
        PaperClaim(
            "q_star_features",
            "value",
            "SAE features (GemmaScope / LlamaScope) reach stability q* = 68.2%",
            f"{_PAPER}, results table; SPEC sections 5-6",
            "fraction",
            True,
            value=0.682,
            margin=Q_STAR_MARGIN,
        ),
        PaperClaim(
            "r2_features",
            "value",
            "SAE features reconstruct activations with R^2 = 48.8%",
            f"{_PAPER}, results table; SPEC sections 5-6",
            "fraction",
            True,
            value=0.488,
            margin=R2_MARGIN,
        ),
        PaperClaim(
            "aip_angles_90",
            "value",
            "angles between token activations under the AIP centre at 90 degrees (mean angle, held-out text)",
            f"{_PAPER}, representation shift; SPEC section 2",
            "degrees",
            False,
            value=90.0,
            margin=ANGLE_MARGIN_DEG,
        ),
        PaperClaim(
            "euclidean_angles_off_90",
            "direction",
            "Euclidean angles between token activations do not centre at 90 degrees (statistic: |mean angle "
            "- 90| on held-out text)",
            f"{_PAPER}, representation shift; SPEC section 2",
            "degrees",
            False,
            side=">",
            threshold=ANGLE_MARGIN_DEG,
        ),
        PaperClaim(
            "capacity_jump",
            "jump",
            "R^2 stays near 0.6-0.8 until n_atoms passes a critical value matched to the training "
            "tokens, then jumps to about 1",
            f"{_PAPER}, capacity vs data (Gemma2-2B layer 1, n_atoms in steps of 4d); SPEC theorem 5",
            "fraction",
            True,
        ),
        PaperClaim(
            "tsae_window",
            "direction",
            "the TSAE identifiability window is non-empty (margin dmin - eps (2K - 1) dmax > 0)",
            f"{_PAPER}, TSAE identifiability theorem; SPEC theorem 4",
            "margin",
            True,
            side=">",
            threshold=0.0,
        ),
        PaperClaim(
            "rip_premise",
            "direction",
            "the trained atoms satisfy the RIP premise by Gershgorin (margin 1 - (K - 1) mu > 0)",
            f"{_PAPER}, RIP theorem; SPEC theorem 1",
            "margin",
            True,
            side=">",
            threshold=0.0,
        ),
        PaperClaim(
            "uniqueness_premise",
            "direction",
            "the trained atoms satisfy the uniqueness premise (margin 1 / (2K - 1) - mu > 0)",
            f"{_PAPER}, uniqueness theorem; SPEC theorem 2",
            "margin",
            True,
            side=">",
            threshold=0.0,
        ),
    )
}


@dataclass(frozen=True)
class Premise:
    """A premise of a comparison (e.g. angles measured on held-out text), met or not, with its data."""

    name: str
    """What the premise requires, in a few words."""
    met: bool
    """Whether it holds for this evidence."""
    detail: str
    """The data that decided it, e.g. "S estimated on 32768 tokens of articles apart from the angles'"."""


@dataclass(frozen=True)
class ClaimEvidence:
    """Our measurement of one value or direction claim."""

    claim: str
    """Name in PAPER_CLAIMS."""
    interval: Interval
    """Our estimate and its interval (held-out samples; over seeds where training is involved)."""
    conditions: Mapping[str, Any] = field(default_factory=dict)
    """Conditions of the measurement: model, layer, tokens seen, L0, norm (Euclidean / AIP), ..."""
    converged: bool | None = None
    """Whether training converged by the plateau rule (every seed); None where no training is involved."""
    convergence_reason: str = ""
    """The plateau rule's reason (atoms.convergence.Convergence.reason)."""
    seeds: int = 1
    """Training seeds behind `interval`."""
    premises: tuple[Premise, ...] = ()
    """Premises of the comparison with the paper."""


@dataclass(frozen=True)
class GridCell:
    """One cell of the capacity-vs-data grid."""

    n_atoms: int
    """Dictionary size."""
    tokens: int
    """Training activations the cell was fitted on."""
    r2: Interval
    """R^2 on the cell's training activations, with its interval."""
    converged: bool
    """Whether the cell's training converged by the plateau rule."""
    convergence_reason: str = ""
    """The plateau rule's reason."""


@dataclass(frozen=True)
class JumpEvidence:
    """The capacity-vs-data grid as evidence for the jump claim."""

    cells: tuple[GridCell, ...]
    """Every trained cell."""
    conditions: Mapping[str, Any] = field(default_factory=dict)
    """Model, layer, norm, steps per cell, ..."""
    premises: tuple[Premise, ...] = ()
    """Premises of the comparison with the paper."""
    claim: str = "capacity_jump"
    """Name in PAPER_CLAIMS."""


class ClaimVerdict(NamedTuple):
    """One row of the verdict table."""

    claim: str
    """Name in PAPER_CLAIMS."""
    verdict: Verdict
    """holds, fails or inconclusive."""
    reason: str
    """Why, built from the evidence's numbers."""
    paper: str
    """The paper's value or inequality, formatted."""
    interval: Interval | None
    """Our interval (None for the jump, whose numbers are in `reason`)."""
    conditions: Mapping[str, Any]
    """The evidence's conditions."""


def _interval_text(iv: Interval, units: Units) -> str:
    return (
        f"{_fmt(iv.estimate, units)} [{_fmt(iv.low, units)}, {_fmt(iv.high, units)}] "
        f"({iv.level:.0%}, {iv.method}, n = {iv.n})"
    )


def _unmet(ev: ClaimEvidence, claim: PaperClaim) -> list[str]:
    """Unmet premises of a comparison, as clauses with their data (seeds included for trained claims)."""
    out = [f"premise unmet: {p.name} ({p.detail})" for p in ev.premises if not p.met]
    if claim.trained and ev.seeds < MIN_SEEDS:
        out.append(f"premise unmet: {ev.seeds} training seed(s), the rule needs {MIN_SEEDS}")
    return out


def _claim_for(ev: ClaimEvidence | JumpEvidence, kind: str) -> PaperClaim:
    claim = PAPER_CLAIMS.get(ev.claim)
    if claim is None:
        raise BadInputError(f"unknown claim {ev.claim!r}; known: {sorted(PAPER_CLAIMS)}.")
    if claim.kind != kind:
        raise BadInputError(f"claim {ev.claim!r} is a {claim.kind} claim, not a {kind} claim.")
    if isinstance(ev, ClaimEvidence):
        iv = ev.interval
        if not all(math.isfinite(v) for v in (iv.estimate, iv.low, iv.high)) or iv.low > iv.high:
            raise BadInputError(
                f"claim {ev.claim!r}: the interval must be finite with low <= high, got {iv}."
            )
        if claim.trained and ev.converged is None:
            raise BadInputError(
                f"claim {ev.claim!r} involves training: pass converged (and convergence_reason) from the "
                "plateau rule."
            )
    return claim


def _row(claim: PaperClaim, ev: ClaimEvidence, verdict: Verdict, reason: str) -> ClaimVerdict:
    return ClaimVerdict(claim.name, verdict, reason, claim.paper(), ev.interval, dict(ev.conditions))


def _not_converged(ev: ClaimEvidence) -> str:
    return f"training not converged: {ev.convergence_reason or 'no reason recorded'}"


def value_verdict(ev: ClaimEvidence) -> ClaimVerdict:
    """The value-claim rule (module docstring) for one piece of evidence."""
    claim = _claim_for(ev, "value")
    iv, u, v, t = ev.interval, claim.units, float(claim.value), claim.margin
    ours = _interval_text(iv, u)
    band = f"[{_fmt(v - t, u)}, {_fmt(v + t, u)}]"
    unmet = _unmet(ev, claim)
    if unmet:
        return _row(
            claim, ev, Verdict.INCONCLUSIVE, f"ours {ours} vs paper {_fmt(v, u)}; " + "; ".join(unmet)
        )
    inside = v - t <= iv.low and iv.high <= v + t
    precise = iv.contains(v) and iv.width <= 2 * t
    if inside or precise:
        why = (
            f"lies within the margin {band} of the paper's {_fmt(v, u)}"
            if inside
            else f"contains the paper's {_fmt(v, u)} and is {_fmt(iv.width, u)} wide, at most twice the "
            f"margin {_fmt(t, u)}"
        )
        note = f" ({_not_converged(ev)})" if claim.trained and not ev.converged else ""
        return _row(claim, ev, Verdict.HOLDS, f"ours {ours} {why}{note}")
    outside = iv.high < v - t or iv.low > v + t
    if outside:
        diff = _fmt(iv.estimate - v, u, signed=True)
        gap = f"{diff} from the paper's {_fmt(v, u)}, outside the margin {band}"
        if claim.trained and not ev.converged:
            return _row(claim, ev, Verdict.INCONCLUSIVE, f"ours {ours} is {gap}, but {_not_converged(ev)}")
        trained = f" with training converged ({ev.convergence_reason})" if claim.trained else ""
        return _row(claim, ev, Verdict.FAILS, f"ours {ours} is {gap}{trained}")
    why = (
        f"contains the paper's {_fmt(v, u)} but is {_fmt(iv.width, u)} wide, more than twice the margin "
        f"{_fmt(t, u)}"
        if iv.contains(v)
        else f"straddles an edge of the margin {band} around the paper's {_fmt(v, u)}"
    )
    return _row(claim, ev, Verdict.INCONCLUSIVE, f"ours {ours} {why}")


def direction_verdict(ev: ClaimEvidence) -> ClaimVerdict:
    """The direction-claim rule (module docstring) for one piece of evidence."""
    claim = _claim_for(ev, "direction")
    iv, u, thr = ev.interval, claim.units, float(claim.threshold)
    ours = _interval_text(iv, u)
    wanted = f"{claim.side} {_fmt(thr, u)}"
    unmet = _unmet(ev, claim)
    if unmet:
        return _row(claim, ev, Verdict.INCONCLUSIVE, f"ours {ours} vs claimed {wanted}; " + "; ".join(unmet))
    on_side = iv.low > thr if claim.side == ">" else iv.high < thr
    against = iv.high <= thr if claim.side == ">" else iv.low >= thr
    if on_side:
        note = f" ({_not_converged(ev)})" if claim.trained and not ev.converged else ""
        return _row(claim, ev, Verdict.HOLDS, f"ours {ours} lies entirely {wanted}{note}")
    if against:
        if claim.trained and not ev.converged:
            return _row(
                claim, ev, Verdict.INCONCLUSIVE, f"ours {ours} is not {wanted}, but {_not_converged(ev)}"
            )
        trained = f" with training converged ({ev.convergence_reason})" if claim.trained else ""
        return _row(
            claim, ev, Verdict.FAILS, f"ours {ours} lies entirely on the other side of {wanted}{trained}"
        )
    return _row(claim, ev, Verdict.INCONCLUSIVE, f"ours {ours} straddles the threshold {_fmt(thr, u)}")


Bracket = tuple[float, float]


def _critical(row: list[GridCell]) -> tuple[Bracket, bool]:
    """Bracket (lower, upper] of a row's critical n_atoms, and whether the row shows a jump.

    The critical n_atoms is the smallest from which every cell of the row is near 1: (n_prev, n] when found
    at n after n_prev, (0, n_min] when even the smallest is near 1, (n_max, inf) when the largest is not.
    The row shows a jump when the cell just below the critical one is below JUMP_LOW_MAX: R^2 goes from
    "near 0.6-0.8" to "about 1" within one grid step.
    """
    first = len(row)
    while first > 0 and row[first - 1].r2.low >= JUMP_HIGH_MIN:
        first -= 1
    if first == len(row):
        return (float(row[-1].n_atoms), math.inf), False
    lower = 0.0 if first == 0 else float(row[first - 1].n_atoms)
    jump = first > 0 and row[first - 1].r2.high < JUMP_LOW_MAX
    return (lower, float(row[first].n_atoms)), jump


def _between(row: list[GridCell], critical: float) -> list[GridCell]:
    """The cells of a row below its critical n_atoms whose whole interval lies in [JUMP_LOW_MAX,
    JUMP_HIGH_MIN): neither "near 0.6-0.8" nor "about 1"."""
    return [c for c in row if c.n_atoms < critical and c.r2.low >= JUMP_LOW_MAX and c.r2.high < JUMP_HIGH_MIN]


def _settled(cell: GridCell) -> bool:
    """Converged, or already past the jump (its whole interval at or above JUMP_HIGH_MIN): more training
    cannot move the row's critical n_atoms through this cell (`jump_verdict`)."""
    return cell.converged or cell.r2.low >= JUMP_HIGH_MIN


def _bracket_text(b: Bracket) -> str:
    if b[0] == 0:
        return f"<= {b[1]:.0f}"
    if math.isinf(b[1]):
        return f"> {b[0]:.0f}"
    return f"in ({b[0]:.0f}, {b[1]:.0f}]"


def jump_verdict(ev: JumpEvidence) -> ClaimVerdict:
    """The capacity-vs-data rule.

    Rows are the training-set sizes T; a row's critical n_atoms is bracketed by its cells (`_critical`).
    A row is settled when each of its cells converged or has its whole R^2 interval at or above
    JUMP_HIGH_MIN. An unconverged cell still under it is no evidence (it could still rise and move its row's
    critical n_atoms); an unconverged cell past it counts as past the jump, because the claim asks whether
    that many atoms can fit the data and the fit it reached already shows that they can (a memorising
    cell's loss keeps falling geometrically, so a relative plateau rule may never fire for it). The verdict
    names such cells.
    - A premise unmet -> inconclusive.
    - fails if, among settled rows, the brackets say the critical n_atoms shrinks with data (for T1 < T2 the
      bracket of T2 lies entirely at or below that of T1), or a row that reaches JUMP_SPAN_RATIO * T atoms
      has its largest cell entirely below JUMP_HIGH_MIN, or a row reaches its critical n_atoms gradually
      (JUMP_GRADUAL_CELLS or more cells wholly between JUMP_LOW_MAX and JUMP_HIGH_MIN before it: R^2
      climbs, it does not jump). Rows not settled cannot undo these, and the verdict names them.
    - inconclusive if some row is not settled.
    - holds if some row shows a jump (`_critical`) and some pair T1 < T2 shows the critical n_atoms grow
      (T2's bracket at or above T1's).
    - inconclusive otherwise, naming what the grid lacks.
    """
    claim = _claim_for(ev, "jump")
    if not ev.cells:
        raise BadInputError("the capacity-vs-data grid has no cells.")
    rows: dict[int, list[GridCell]] = {}
    for c in ev.cells:
        rows.setdefault(c.tokens, []).append(c)
    tokens = sorted(rows)
    for t in tokens:
        rows[t].sort(key=lambda c: c.n_atoms)
    crit = {t: _critical(rows[t]) for t in tokens}
    summary = "; ".join(
        f"T = {t}: R^2 "
        + ", ".join(f"{c.r2.estimate:.3f} [{c.r2.low:.3f}, {c.r2.high:.3f}] at {c.n_atoms}" for c in rows[t])
        + f" -> critical n_atoms {_bracket_text(crit[t][0])}{' (jump)' if crit[t][1] else ''}"
        for t in tokens
    )

    def row(verdict: Verdict, why: str) -> ClaimVerdict:
        still = "".join(
            f"; cell {c.n_atoms} atoms / {c.tokens} tokens counts as past the jump unconverged (its whole "
            f"interval is at or above {JUMP_HIGH_MIN:g})"
            for c in ev.cells
            if not c.converged and _settled(c)
        )
        return ClaimVerdict(
            claim.name, verdict, f"{why}{still}. Grid: {summary}", claim.paper(), None, dict(ev.conditions)
        )

    unmet = [f"premise unmet: {p.name} ({p.detail})" for p in ev.premises if not p.met]
    if unmet:
        return row(Verdict.INCONCLUSIVE, "; ".join(unmet))
    unsettled = [
        f"cell {c.n_atoms} atoms / {c.tokens} tokens not converged: "
        f"{c.convergence_reason or 'no reason recorded'}"
        for c in ev.cells
        if not _settled(c)
    ]
    settled = [t for t in tokens if all(map(_settled, rows[t]))]
    pairs = [(a, b) for i, a in enumerate(settled) for b in settled[i + 1 :]]
    shrinks = [(a, b) for a, b in pairs if crit[b][0][1] <= crit[a][0][0]]
    unfit = [
        t
        for t in settled
        if rows[t][-1].n_atoms >= JUMP_SPAN_RATIO * t and rows[t][-1].r2.high < JUMP_HIGH_MIN
    ]
    gradual = {t: _between(rows[t], crit[t][0][1]) for t in settled if not math.isinf(crit[t][0][1])}
    gradual = {t: cs for t, cs in gradual.items() if len(cs) >= JUMP_GRADUAL_CELLS}
    if shrinks or unfit or gradual:
        why = (
            [
                f"the critical n_atoms shrinks from {_bracket_text(crit[a][0])} at T = {a} to "
                f"{_bracket_text(crit[b][0])} at T = {b}"
                for a, b in shrinks
            ]
            + [
                f"at T = {t}, {rows[t][-1].n_atoms} atoms (>= {JUMP_SPAN_RATIO:g} T) reach only R^2 "
                f"{rows[t][-1].r2.high:.3f} at most, under {JUMP_HIGH_MIN:g}"
                for t in unfit
            ]
            + [
                f"at T = {t}, R^2 climbs gradually to the critical n_atoms {_bracket_text(crit[t][0])}: "
                + ", ".join(f"{c.r2.estimate:.3f} at {c.n_atoms}" for c in cs)
                + f" lie wholly between {JUMP_LOW_MAX:g} and {JUMP_HIGH_MIN:g}, where the paper has a jump"
                for t, cs in gradual.items()
            ]
        )
        if unsettled:
            why.append("other rows are not settled, which cannot undo this (" + "; ".join(unsettled) + ")")
        return row(Verdict.FAILS, "; ".join(why))
    if unsettled:
        return row(Verdict.INCONCLUSIVE, "; ".join(unsettled))
    jumps = [t for t in tokens if crit[t][1]]
    grows = [(a, b) for a, b in pairs if crit[b][0][0] >= crit[a][0][1]]
    if jumps and grows:
        a, b = grows[0]
        return row(
            Verdict.HOLDS,
            f"R^2 jumps from under {JUMP_LOW_MAX:g} to at least {JUMP_HIGH_MIN:g} at T = "
            f"{', '.join(map(str, jumps))}, and the critical n_atoms grows from "
            f"{_bracket_text(crit[a][0])} at T = {a} to {_bracket_text(crit[b][0])} at T = {b}",
        )
    missing = []
    if not jumps:
        missing.append(
            f"no row rises from a cell under R^2 {JUMP_LOW_MAX:g} straight to a run of cells at or above "
            f"{JUMP_HIGH_MIN:g}"
        )
    if not grows:
        missing.append(
            "the grid cannot show the critical n_atoms growing with data"
            + (f" (only T = {tokens[0]})" if len(tokens) == 1 else " (its brackets overlap)")
        )
    short = [
        f"T = {t} reaches only {rows[t][-1].n_atoms} atoms (< {JUMP_SPAN_RATIO:g} T)"
        for t in tokens
        if rows[t][-1].n_atoms < JUMP_SPAN_RATIO * t and rows[t][-1].r2.low < JUMP_HIGH_MIN
    ]
    return row(Verdict.INCONCLUSIVE, "; ".join(missing + short))


def unmeasured_verdict(claim: str, why: str, conditions: Mapping[str, Any] | None = None) -> ClaimVerdict:
    """Inconclusive: the run measured nothing for `claim`; `why` says what was not run and how to run it."""
    known = PAPER_CLAIMS.get(claim)
    if known is None:
        raise BadInputError(f"unknown claim {claim!r}; known: {sorted(PAPER_CLAIMS)}.")
    if not why:
        raise BadInputError("say why the claim was not measured (what was not run, and how to run it).")
    return ClaimVerdict(
        claim, Verdict.INCONCLUSIVE, f"not measured: {why}", known.paper(), None, dict(conditions or {})
    )


def verdict(ev: ClaimEvidence | JumpEvidence) -> ClaimVerdict:
    """The verdict of one claim, by the rule of its kind."""
    if isinstance(ev, JumpEvidence):
        return jump_verdict(ev)
    claim = PAPER_CLAIMS.get(ev.claim)
    if claim is not None and claim.kind == "direction":
        return direction_verdict(ev)
    return value_verdict(ev)


def verdict_table(evidence: Sequence[ClaimEvidence | JumpEvidence]) -> list[ClaimVerdict]:
    """One verdict per piece of evidence, in PAPER_CLAIMS order; each claim at most once."""
    names = [ev.claim for ev in evidence]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BadInputError(f"evidence for claims {twice} given more than once; pass one per claim.")
    order = {name: i for i, name in enumerate(PAPER_CLAIMS)}
    return [verdict(ev) for ev in sorted(evidence, key=lambda e: order.get(e.claim, len(order)))]

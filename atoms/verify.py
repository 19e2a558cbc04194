"""The search that tries to break each theorem: shared by proofs_check/ and the `atoms verify` command.

For each claim of atoms.theorems (true theorems and planted false variants), `run_claim` runs a hypothesis
search over the claim's instances (atoms.claim_strategies, concentrated where the claim is tight) and records
every verdict. A counterexample (premise held, conclusion refuted) or a check that raised makes the search
function raise, so hypothesis shrinks it to a minimal instance, which the report prints.

Exit-code rule (`exit_code`), for the command and for CI:
    1  a true claim was violated under a satisfied premise, or a check raised: the theory or code is wrong;
    2  otherwise, the suite is too weak: a planted false variant was not refuted, or a true claim's premise
       never held (it was never tested);
    0  every true claim held wherever its premise held, and every false variant was refuted.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from rich.table import Table
from rich.text import Text

from atoms.claim_strategies import Sizes, instances, recipe_for
from atoms.errors import BadInputError
from atoms.theorems import CLAIMS, FALSE_VARIANTS, Claim, Instance, Verdict

__all__ = [
    "BUDGETS",
    "Budget",
    "ClaimReport",
    "claim_named",
    "exit_code",
    "render",
    "run_claim",
    "to_json",
    "verify",
    "verify_table",
]


@dataclass(frozen=True)
class Budget:
    """How hard `run_claim` searches.

    name: "default" or "full" (or your own).
    examples: instances generated per claim before shrinking (hypothesis max_examples), split evenly
        across the dictionary families of the claim's recipe.
    sizes: the largest instances drawn (atoms.claim_strategies.Sizes).
    shrink_seconds, shrink_examples: once a counterexample is found, shrinking stops trying new instances
        after this many seconds or this many new instances; the smallest counterexample so far is reported.
    seed: hypothesis seed: the same budget and seed give the same search.
    """

    name: str
    examples: int
    sizes: Sizes = field(default_factory=Sizes)
    shrink_seconds: float = 20.0
    shrink_examples: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 1:
            raise BadInputError(f"Budget.examples must be an int >= 1, got {self.examples!r}.")
        if not (self.shrink_seconds >= 0 and self.shrink_examples >= 0):
            raise BadInputError(
                f"Budget.shrink_seconds and shrink_examples must be >= 0, got {self.shrink_seconds!r} and "
                f"{self.shrink_examples!r}."
            )


BUDGETS: dict[str, Budget] = {
    # `pytest proofs_check/` and `atoms verify`: exact spark by enumeration only, cvxpy on <= 4 codes. All 21
    # claims: 7-8 s of `verify()` on 2 cores (the 18 before issue 15: 6 s, same machine and hour).
    "default": Budget(
        "default",
        examples=80,
        sizes=Sizes(max_atoms=16, max_d=8, max_k=4, max_samples=4, max_subsets=20_000, steiner_max_atoms=16),
        shrink_seconds=15.0,
        shrink_examples=150,
    ),
    # A release check: more instances, larger dictionaries, Steiner (28, 7), spark by enumeration of up to
    # 50,000 subsets (the most atoms.uniqueness enumerates before a MILP). All 21 claims: 39 s of `verify()`
    # on 2 cores (the 18 before issue 15: 27 s, same machine and hour).
    "full": Budget(
        "full",
        examples=250,
        sizes=Sizes(
            max_atoms=24, max_d=12, max_k=6, max_samples=12, max_subsets=50_000, steiner_max_atoms=28
        ),
        shrink_seconds=60.0,
        shrink_examples=500,
    ),
}


@dataclass
class ClaimReport:
    """What the search found for one claim.

    tried: distinct instances checked (shrinking included).  premise_held: among them, those whose premise
    held.  conclusion_held / undecided / violated: among the premise-held ones, conclusion True / None /
    False.
    held_without_premise: conclusion True where the premise failed (how conservative the premise is).
    worst_premise_margin: the smallest premise margin among premise-held instances (how close to the
    premise's edge the search got; inf when the premise always holds).  worst_conclusion_margin: the
    smallest conclusion margin among premise-held instances (how close to a counterexample).  Both None when
    the premise never held.
    counterexample: the shrunk minimal counterexample (instance, margins, evidence), or None.
    error: the shrunk minimal instance on which the check raised, with the exception, or None.
    families: instances tried per dictionary family of the stratified search ("custom" for a given
    strategy); a family at 0 produced no valid instance within the budget's sizes.
    witness: the Instance behind `counterexample` or `error` (not in to_json), to re-check it by hand; None
    when drawing an instance raised.
    """

    name: str
    theorem: str
    statement: str
    planted_false: bool
    budget: str
    tried: int = 0
    premise_held: int = 0
    conclusion_held: int = 0
    undecided: int = 0
    violated: int = 0
    held_without_premise: int = 0
    worst_premise_margin: float | None = None
    worst_conclusion_margin: float | None = None
    counterexample: str | None = None
    error: str | None = None
    seconds: float = 0.0
    families: dict[str, int] = field(default_factory=dict)
    witness: Instance | None = field(default=None, repr=False, compare=False)

    @property
    def refuted(self) -> bool:
        """A counterexample was found."""
        return self.counterexample is not None

    @property
    def premise_fraction(self) -> float:
        return self.premise_held / self.tried if self.tried else 0.0

    @property
    def status(self) -> str:
        """ "held", "VIOLATED", "ERROR", "UNTESTED" (premise never held) for a true claim; "REFUTED" (good) or
        "NOT REFUTED" (the suite is too weak) for a planted false variant."""
        if self.error is not None:
            return "ERROR"
        if self.planted_false:
            return "REFUTED" if self.refuted else "NOT REFUTED"
        if self.refuted:
            return "VIOLATED"
        return "held" if self.premise_held else "UNTESTED"


class _Found(Exception):
    """Raised inside the search on a counterexample or a check that raised, so hypothesis shrinks it."""

    def __init__(self, kind: str, text: str, inst: Instance | None) -> None:
        super().__init__(f"{kind}: {text}")
        self.kind, self.text, self.inst = kind, text, inst


def _key(inst: Instance) -> str:
    """A digest of everything a claim reads from an instance: equal instances are checked once."""
    h = hashlib.blake2b(digest_size=16)
    h.update(inst.dictionary.raw.contiguous().numpy().tobytes())
    if inst.codes is not None:
        h.update(inst.codes.contiguous().numpy().tobytes())
    h.update(repr((tuple(inst.dictionary.raw.shape), inst.k, inst.threshold, inst.dmin, inst.dmax)).encode())
    return h.hexdigest()


def _codes_text(inst: Instance, limit: int = 4) -> str:
    if inst.codes is None:
        return ""
    rows = []
    for i, row in enumerate(inst.codes[:limit]):
        support = row.nonzero().flatten()
        values = ", ".join(f"{float(v):.6g}" for v in row[support])
        rows.append(f"    code {i}: support {support.tolist()}, values [{values}]")
    more = f"\n    ... {inst.codes.shape[0] - limit} more" if inst.codes.shape[0] > limit else ""
    return "\n" + "\n".join(rows) + more


def _describe(inst: Instance, verdict: Verdict) -> str:
    return (
        f"{inst.describe()}{_codes_text(inst)}\n"
        f"  premise margin {verdict.premise_margin:.6g}, conclusion margin {verdict.conclusion_margin:.6g}\n"
        f"  evidence: {verdict.evidence}"
    )


def _min(current: float | None, value: float) -> float:
    return value if current is None else min(current, value)


class _Search:
    """Bookkeeping of one run: each distinct instance is checked once; verdicts are tallied."""

    def __init__(self, claim: Claim, budget: Budget, report: ClaimReport) -> None:
        self.claim, self.budget, self.report = claim, budget, report
        self.seen: dict[str, _Found | None] = {}
        self.found_at: float | None = None
        self.after_found = 0
        self.family = "custom"

    def _count(self) -> None:
        self.report.tried += 1
        self.report.families[self.family] = self.report.families.get(self.family, 0) + 1

    def _tally(self, verdict: Verdict) -> None:
        r = self.report
        self._count()
        if not verdict.premise:
            r.held_without_premise += verdict.conclusion is True
            return
        r.premise_held += 1
        r.conclusion_held += verdict.conclusion is True
        r.undecided += verdict.conclusion is None
        r.violated += verdict.conclusion is False
        r.worst_premise_margin = _min(r.worst_premise_margin, verdict.premise_margin)
        r.worst_conclusion_margin = _min(r.worst_conclusion_margin, verdict.conclusion_margin)

    def _exhausted(self) -> bool:
        """Shrinking has used its budget: new instances are no longer checked."""
        if self.found_at is None:
            return False
        too_long = time.perf_counter() - self.found_at > self.budget.shrink_seconds
        return too_long or self.after_found >= self.budget.shrink_examples

    def check(self, inst: Instance) -> None:
        key = _key(inst)
        if key in self.seen:
            found = self.seen[key]
        elif self._exhausted():
            # Not checked: hypothesis sees a pass, keeps the smallest counterexample so far, and stops.
            return
        else:
            found = self._check_new(inst)
            self.seen[key] = found
        if found is not None:
            # A fresh exception each time: hypothesis annotates what it catches.
            raise _Found(found.kind, found.text, found.inst)

    def _check_new(self, inst: Instance) -> _Found | None:
        if self.found_at is not None:
            self.after_found += 1
        try:
            verdict = self.claim.check(inst)
        except Exception as e:  # a check that raises is reported, never taken as a pass
            self._count()
            self._mark_found()
            return _Found("error", f"{inst.describe()}\n  raised {e!r}", inst)
        self._tally(verdict)
        if verdict.counterexample:
            self._mark_found()
            return _Found("counterexample", _describe(inst, verdict), inst)
        return None

    def _mark_found(self) -> None:
        if self.found_at is None:
            self.found_at = time.perf_counter()


def claim_named(name: str) -> Claim:
    """The claim (true or planted false) called `name`."""
    for claim in (*CLAIMS, *FALSE_VARIANTS):
        if claim.name == name:
            return claim
    names = [c.name for c in (*CLAIMS, *FALSE_VARIANTS)]
    raise BadInputError(f"no claim named {name!r}; choose from {names}.")


def _budget(budget: str | Budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if budget not in BUDGETS:
        raise BadInputError(f"unknown budget {budget!r}; choose from {list(BUDGETS)} or pass a Budget.")
    return BUDGETS[budget]


def _search(
    strategy: SearchStrategy[Instance], examples: int, budget: Budget, search: _Search
) -> _Found | None:
    """One hypothesis search of `examples` instances; the shrunk counterexample or error, or None."""

    @seed(budget.seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        # No target phase: steering by the conclusion margin was measured to crowd the search into
        # ill-conditioned instances (atoms a hair apart) at the expense of breadth.
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
        print_blob=False,
    )
    @given(strategy)
    def search_claim(inst: Instance) -> None:
        search.check(inst)

    try:
        search_claim()
    except _Found as found:
        return found
    except Unsatisfiable:
        # No valid instance of this family fits the budget's sizes; the report's family counts show it.
        return None
    except Exception as e:  # the instance strategy itself failed: reported, never taken as a pass
        return _Found("error", f"drawing an instance raised {e!r}", None)
    return None


def run_claim(
    claim: Claim | str, budget: str | Budget = "default", strategy: SearchStrategy[Instance] | None = None
) -> ClaimReport:
    """Search for a counterexample to `claim` (a Claim or its name) within `budget`.

    By default the search is stratified: one hypothesis search per dictionary family of the claim's recipe
    (atoms.claim_strategies), each with an equal share of budget.examples, so every family is drawn however
    small the budget (a single search over all families was measured to skip some entirely at 40
    examples). It stops at the first counterexample, shrunk within its family. `strategy` replaces all
    that with one search over the given Instances. Deterministic for a given budget (its seed).
    """
    claim = claim_named(claim) if isinstance(claim, str) else claim
    budget = _budget(budget)
    report = ClaimReport(claim.name, claim.theorem, claim.statement, claim.planted_false, budget.name)
    search = _Search(claim, budget, report)
    if strategy is not None:
        plan = [("custom", strategy, budget.examples)]
    else:
        families = recipe_for(claim).families
        share = max(1, math.ceil(budget.examples / len(families)))
        plan = [(family, instances(claim, budget.sizes, (family,)), share) for family in families]
    start = time.perf_counter()
    for family, family_strategy, examples in plan:
        search.family = family
        report.families.setdefault(family, 0)
        found = _search(family_strategy, examples, budget, search)
        if found is not None:
            report.witness = found.inst
            if found.kind == "error":
                report.error = found.text
            else:
                report.counterexample = found.text
            break
    report.seconds = time.perf_counter() - start
    return report


def verify(
    names: Sequence[str] | None = None,
    budget: str | Budget = "default",
    include_false: bool = True,
    progress: Callable[[ClaimReport], None] | None = None,
) -> list[ClaimReport]:
    """Run `run_claim` on the true claims (CLAIMS) and, with include_false, the planted false variants.

    names: only these claims (true or false, by name), in the order given; None for all. progress is called
    with each report as it completes (for a live display).
    """
    if names is None:
        claims = list(CLAIMS) + (list(FALSE_VARIANTS) if include_false else [])
    else:
        claims = [claim_named(name) for name in names]
    reports = []
    for claim in claims:
        report = run_claim(claim, budget)
        reports.append(report)
        if progress is not None:
            progress(report)
    return reports


def exit_code(reports: Sequence[ClaimReport]) -> int:
    """1 if a true claim was violated or any check raised; else 2 if a planted false variant was not
    refuted or a true claim's premise never held (the suite is too weak); else 0."""
    if any(r.error is not None or (r.refuted and not r.planted_false) for r in reports):
        return 1
    if any(r.status in ("NOT REFUTED", "UNTESTED") for r in reports):
        return 2
    return 0


def _margin(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}"


_STYLE = {"held": "green", "REFUTED": "green", "VIOLATED": "bold red", "ERROR": "bold red"}


def render(reports: Sequence[ClaimReport]) -> Table:
    """A rich Table, one row per claim: instances tried, premise held, conclusion held, undecided, the
    closest premise margin and the worst conclusion margin under a held premise, and the status. Planted false
    variants are marked: they must be refuted. The counterexamples, too long for a cell, are listed by
    `counterexample_lines`."""
    table = Table(title=f"Theorem checks ({reports[0].budget if reports else 'no'} budget)", show_lines=True)
    for column in ("claim", "theorem", "tried", "premise held", "conclusion held", "undecided"):
        table.add_column(column, justify="right" if column not in ("claim", "theorem") else "left")
    table.add_column("closest premise", justify="right")
    table.add_column("worst conclusion margin", justify="right")
    table.add_column("status")
    for r in reports:
        name = Text(r.name)
        if r.planted_false:
            name.append("\nplanted false: must be refuted", style="italic")
        status = r.status + (" (good)" if r.status == "REFUTED" else "")
        if r.status in ("NOT REFUTED", "UNTESTED"):
            status += " (the suite is too weak)"
        table.add_row(
            name,
            r.theorem,
            str(r.tried),
            str(r.premise_held),
            str(r.conclusion_held),
            str(r.undecided),
            _margin(r.worst_premise_margin),
            _margin(r.worst_conclusion_margin),
            Text(status, style=_STYLE.get(r.status, "yellow")),
        )
    return table


def counterexample_lines(reports: Sequence[ClaimReport]) -> list[str]:
    """One line per claim with a counterexample (the smallest found) or an error."""
    return [f"{r.name}: {r.error or r.counterexample}" for r in reports if r.error or r.counterexample]


def _json_float(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "inf" if value > 0 else ("-inf" if value < 0 else "nan")


def to_json(reports: Sequence[ClaimReport]) -> dict:
    """{"budget", "exit_code", "claims": [one dict per report: its fields and status]}; infinite margins are
    the strings "inf" / "-inf" (strict JSON has no infinity), margins never reached are null."""
    claims = []
    for r in reports:
        row = {f.name: getattr(r, f.name) for f in fields(r) if f.name != "witness"}
        row["worst_premise_margin"] = _json_float(r.worst_premise_margin)
        row["worst_conclusion_margin"] = _json_float(r.worst_conclusion_margin)
        row["status"] = r.status
        claims.append(row)
    return {
        "budget": reports[0].budget if reports else None,
        "exit_code": exit_code(reports),
        "claims": claims,
    }


def verify_table(
    names: Sequence[str] | None = None,
    budget: str | Budget = "default",
    include_false: bool = True,
    progress: Callable[[ClaimReport], None] | None = None,
) -> tuple[list[ClaimReport], Table, int]:
    """`verify`, then (reports, render(reports), exit_code(reports)): what `atoms verify` prints, returns."""
    reports = verify(names, budget, include_false, progress)
    return reports, render(reports), exit_code(reports)

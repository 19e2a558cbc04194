"""proofs_check: every theorem of SPEC section 4 checked empirically, and its planted false variants refuted.

`pytest proofs_check/` runs the default budget (a few minutes on 2 cores); `--atoms-budget=full` runs more
examples and larger sizes for a release check. `pytest -s` prints each search's summary and the
counterexamples that refute the false variants.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings

from atoms.verify import BUDGETS, Budget, ClaimReport, claim_named, run_claim

# A true claim's premise must hold on at least this fraction of the instances its search draws: a search
# that rarely satisfies the premise has tested little, however green it looks.
MIN_PREMISE_FRACTION = 0.4
# Among premise-held instances, at most this fraction may stay undecided (flagged solver results, bounds).
MAX_UNDECIDED_FRACTION = 0.2


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--atoms-budget",
        choices=sorted(BUDGETS),
        default="default",
        help="proofs_check search budget: 'default' (minutes) or 'full' (more examples, larger sizes).",
    )


@pytest.fixture(scope="session")
def budget(request: pytest.FixtureRequest) -> Budget:
    """The atoms.verify Budget chosen with --atoms-budget."""
    return BUDGETS[request.config.getoption("--atoms-budget")]


@pytest.fixture(scope="session")
def cross_check(budget: Budget) -> settings:
    """hypothesis settings for the cross-checks against independent references: a third of the budget's
    examples (they run beside the searches), deterministic, no deadline."""
    return settings(
        max_examples=max(10, budget.examples // 3),
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


def _summary(report: ClaimReport) -> str:
    return (
        f"\n{report.name} [{report.budget}]: {report.status}; tried {report.tried}, premise held "
        f"{report.premise_held}, conclusion held {report.conclusion_held}, undecided {report.undecided}, "
        f"closest premise margin {report.worst_premise_margin}, worst conclusion margin "
        f"{report.worst_conclusion_margin}, {report.seconds:.1f} s"
    )


@pytest.fixture
def holds(budget: Budget) -> Callable[[str], ClaimReport]:
    """holds(name): search for a counterexample to the true claim `name` and assert none was found, that the
    premise held on a substantial fraction of instances and that most of those were decided."""

    def check(name: str) -> ClaimReport:
        report = run_claim(name, budget)
        print(_summary(report))
        assert not report.planted_false, f"{name} is a planted false variant; use `refuted`."
        assert report.error is None, f"{name}: a check raised on\n{report.error}"
        assert report.counterexample is None, f"{name} is violated by\n{report.counterexample}"
        assert report.premise_fraction >= MIN_PREMISE_FRACTION, (
            f"{name}: the premise held on only {report.premise_held} of {report.tried} instances; the search "
            "must concentrate where the premise is just satisfied."
        )
        assert report.undecided <= MAX_UNDECIDED_FRACTION * report.premise_held, (
            f"{name}: {report.undecided} of {report.premise_held} premise-held instances stayed undecided."
        )
        empty = [family for family, count in report.families.items() if count == 0]
        assert not empty, f"{name}: the families {empty} drew no valid instance within the budget's sizes."
        return report

    return check


@pytest.fixture
def refuted(budget: Budget) -> Callable[[str], ClaimReport]:
    """refuted(name): the search must find a counterexample to the planted false variant `name`; it is
    printed (pytest -s) and attached to the assertion message."""

    def check(name: str) -> ClaimReport:
        report = run_claim(name, budget)
        print(_summary(report))
        assert report.planted_false, f"{name} is a true claim; use `holds`."
        assert report.error is None, f"{name}: a check raised on\n{report.error}"
        assert report.counterexample is not None, (
            f"the suite is too weak: no counterexample to the planted false claim {name!r} "
            f"({report.statement}) in {report.tried} instances."
        )
        print(f"counterexample to {name} ({report.statement}):\n{report.counterexample}")
        # The shrunk witness must refute the claim again when checked afresh.
        assert claim_named(name).check(report.witness).counterexample, (
            f"the reported counterexample to {name} does not reproduce:\n{report.counterexample}"
        )
        return report

    return check

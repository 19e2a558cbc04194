"""SPEC section 7: basis pursuit (the cvxpy reference) on Gaussian matrices against the toolkit's
Donoho-Tanner curve: well below rho*(delta) the success rate's Wilson interval sits near 1, well above it
near 0."""

from __future__ import annotations

import pytest

from atoms.recovery import donoho_tanner_curve, phase_transition


@pytest.mark.parametrize("nonneg", [False, True], ids=["signed", "nonneg"])
def test_success_below_failure_above_the_curve(budget, nonneg):
    full = budget.name == "full"
    n, trials = (100, 30) if full else (50, 10)
    for delta in (0.3, 0.6):
        rho = float(donoho_tanner_curve([delta], nonneg=nonneg)[0])
        # Half the curve, and three quarters of the way from the curve to 1: at n = 50 the transition is wide
        # (its width shrinks like 1/sqrt(n)) and, for non-negative codes, shifted up: measured with 20 trials
        # at delta = 0.6, rho = 0.8 (half-way) still succeeds 5% of the time, rho = 0.9 never.
        below, above = 0.5 * rho, rho + 0.75 * (1.0 - rho)
        result = phase_transition(
            n, deltas=[delta], rhos=[below, above], trials=trials, nonneg=nonneg, seed=0, solver="cvxpy"
        )
        low, high = result.ci_low[0].tolist(), result.ci_high[0].tolist()
        summary = (
            f"delta={delta}, rho*={rho:.3f}, k={result.sparsities[0].tolist()} of "
            f"m={int(result.measurements[0])}: successes {result.successes[0].tolist()} of {trials}, "
            "Wilson intervals "
            f"[{low[0]:.2f}, {high[0]:.2f}] and [{low[1]:.2f}, {high[1]:.2f}]"
        )
        print(summary)
        # At finite n a rare failure below the curve is real (n = 100, non-negative, k = 6 of m = 30: HiGHS
        # and cvxpy both fail 1 of 30): the rate and its interval must sit near 1 below and near 0 above.
        rates = result.rates[0].tolist()
        assert rates[0] >= 0.9 and low[0] >= 0.6, f"below the curve: {summary}"
        assert rates[1] <= 0.1 and high[1] <= 0.4, f"above the curve: {summary}"

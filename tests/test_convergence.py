"""atoms.convergence: the plateau rule on synthetic held-out curves."""

from __future__ import annotations

import math

import pytest

from atoms.convergence import PlateauRule
from atoms.errors import BadInputError


def run(rule, curve, steps, l0=None):
    """Feed `curve(step)` (and `l0(step)`) at every due step; return every decision and the final one."""
    tracker = rule.tracker()
    decisions = [
        tracker.update(s, curve(s), None if l0 is None else l0(s)) for s in range(1, steps + 1) if rule.due(s)
    ]
    return decisions, tracker.finalize()


def test_exponential_decay_converges_after_it_flattens():
    rule = PlateauRule(eval_every=500, window=5, rel_tol=0.01, min_steps=2000)
    decisions, final = run(rule, lambda s: 1.0 + math.exp(-s / 2000), 30_000)
    first = next(d for d in decisions if d.converged)
    # With a = e^{-s/2000}, the window (s - 2000 to s) improves by a (e - 1) / (1 + a e): at most 1% once
    # a <= 0.01 / (e - 1 - 0.01 e) = 0.005913, i.e. s >= 10261; the first evaluation after that is 10500.
    assert first.step == 10500
    a = math.exp(-10500 / 2000)
    assert first.relative_improvement == pytest.approx(a * (math.e - 1) / (1 + a * math.e), rel=1e-12)
    assert "0.89% over steps 8500-10500" in first.reason
    assert not any(d.converged for d in decisions if d.step < 10500)
    assert final.converged and final.step == 30_000


def test_linear_fall_never_converges_and_finalize_says_budget_exhausted():
    rule = PlateauRule(eval_every=500, window=5, rel_tol=0.01, min_steps=0)
    decisions, final = run(rule, lambda s: 20.0 - 1e-3 * s, 10_000)
    assert not any(d.converged for d in decisions)
    assert not final.converged
    assert final.reason.startswith("budget exhausted before plateau")
    # The numbers behind the reason: 10 -> 12 over steps 8000-10000, a 16.67% fall.
    assert "12 -> 10" in final.reason and "16.67%" in final.reason and "steps 8000-10000" in final.reason
    assert final.relative_improvement == pytest.approx(2 / 12)


def test_min_steps_and_window_fill():
    rule = PlateauRule(eval_every=100, window=3, rel_tol=0.01, min_steps=1000)
    decisions, _ = run(rule, lambda s: 1.0, 1000)
    assert "2 held-out evaluations" in decisions[1].reason and not decisions[1].converged
    assert "under the rule's minimum of 1000" in decisions[5].reason
    assert decisions[-1].converged and decisions[-1].step == 1000


def test_l0_tolerance_against_target():
    rule = PlateauRule(eval_every=100, window=3, min_steps=0, target_l0=32.0, l0_tol=0.1)
    _, off = run(rule, lambda s: 1.0, 1000, l0=lambda s: 40.0)
    assert not off.converged and "40" in off.reason and "25.0%" in off.reason and "32" in off.reason
    _, near = run(rule, lambda s: 1.0, 1000, l0=lambda s: 34.0)
    assert near.converged and "mean L0 34 (target 32)" in near.reason
    # One evaluation of the window out of tolerance is enough to refuse.
    _, late = run(rule, lambda s: 1.0, 1000, l0=lambda s: 40.0 if s == 900 else 32.0)
    assert not late.converged and "40" in late.reason


def test_l0_spread_without_target():
    rule = PlateauRule(eval_every=100, window=4, min_steps=0, l0_tol=0.1)
    _, drifting = run(rule, lambda s: 1.0, 2000, l0=lambda s: s / 50)
    assert not drifting.converged and "spread" in drifting.reason
    _, steady = run(rule, lambda s: 1.0, 2000, l0=lambda s: 30.0 + (s % 200) / 100)
    assert steady.converged


def test_r2_is_read_as_unexplained_variance():
    rule = PlateauRule(eval_every=100, window=3, min_steps=0, rel_tol=0.01, metric="r2")
    # R^2 99.8% -> 99.9% changes R^2 by 0.1% but halves the unexplained variance: not a plateau.
    tracker = rule.tracker()
    for step, r2 in ((100, 0.998), (200, 0.9985), (300, 0.999)):
        status = tracker.update(step, r2)
    assert not status.converged and status.relative_improvement == pytest.approx(0.5)
    assert "1 - R^2" in status.reason
    _, flat = run(rule, lambda s: 0.999 - 1e-3 * math.exp(-s / 100), 2000)
    assert flat.converged


def test_divergence_is_reported_and_kept():
    rule = PlateauRule(eval_every=100, window=2, min_steps=0)
    tracker = rule.tracker()
    tracker.update(100, 1.0)
    status = tracker.update(200, math.nan)
    assert not status.converged and "diverged" in status.reason and "step 200" in status.reason
    tracker.update(300, 1.0)
    assert "diverged" in tracker.finalize().reason


def test_finalize_without_evaluations():
    final = PlateauRule().tracker().finalize()
    assert not final.converged and final.step == -1 and "no held-out evaluation" in final.reason


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: PlateauRule(window=1), "window"),
        (lambda: PlateauRule(eval_every=0), "eval_every"),
        (lambda: PlateauRule(rel_tol=-0.1), "rel_tol"),
        (lambda: PlateauRule(target_l0=0.0), "target_l0"),
        (lambda: PlateauRule(metric="accuracy"), "metric"),
        (lambda: PlateauRule(min_steps=True), "min_steps"),
    ],
)
def test_bad_rule(make, match):
    with pytest.raises(BadInputError, match=match):
        make()


def test_bad_updates():
    tracker = PlateauRule(target_l0=10.0).tracker()
    with pytest.raises(BadInputError, match="no l0"):
        tracker.update(100, 1.0)
    tracker.update(100, 1.0, 10.0)
    with pytest.raises(BadInputError, match="steps must increase"):
        tracker.update(100, 1.0, 10.0)
    with pytest.raises(BadInputError, match="l0 must be"):
        tracker.update(200, 1.0, -1.0)

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

    def improvement(s):
        # Half-window means of 1 + e^{-t/2000}: evaluations s-2000, s-1500 against s-500, s.
        a = [1.0 + math.exp(-t / 2000) for t in (s - 2000, s - 1500, s - 500, s)]
        return ((a[0] + a[1]) - (a[2] + a[3])) / (a[0] + a[1])

    # The improvement falls with s; the rule fires at the first evaluation where it is at most 1%.
    expected = next(s for s in range(2000, 30_001, 500) if improvement(s) <= 0.01)
    assert improvement(expected - 500) > 0.01 >= improvement(expected)
    assert first.step == expected == 10000
    assert first.relative_improvement == pytest.approx(improvement(expected), rel=1e-12)
    assert f"{improvement(expected):.2%} over steps 8000-10000" in first.reason
    assert not any(d.converged for d in decisions if d.step < expected)
    assert final.converged and final.step == 30_000


def test_linear_fall_never_converges_and_finalize_says_budget_exhausted():
    rule = PlateauRule(eval_every=500, window=5, rel_tol=0.01, min_steps=0)
    decisions, final = run(rule, lambda s: 20.0 - 1e-3 * s, 10_000)
    assert not any(d.converged for d in decisions)
    assert not final.converged
    assert final.reason.startswith("budget exhausted before plateau")
    # The numbers behind the reason: half-window means 11.75 (steps 8000, 8500) -> 10.25 (9500, 10000).
    assert (
        "11.75 -> 10.25" in final.reason and "12.77%" in final.reason and "steps 8000-10000" in final.reason
    )
    assert final.relative_improvement == pytest.approx(1.5 / 11.75)


def test_noise_around_a_flat_loss_is_a_plateau():
    """A flat loss with +-5% alternating noise converges: first-vs-best would read the noise as progress."""
    rule = PlateauRule(eval_every=100, window=4, rel_tol=0.01, min_steps=0)
    decisions, final = run(rule, lambda s: 1.0 + (0.05 if (s // 100) % 2 else -0.05), 2000)
    assert final.converged and decisions[3].converged


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
    assert near.converged and "mean L0 averaged 34 over the window (target 32)" in near.reason
    # The window's average decides: one evaluation at 40 among 32s averages 34.7, within 10%; two do not.
    _, one = run(rule, lambda s: 1.0, 1000, l0=lambda s: 40.0 if s == 900 else 32.0)
    assert one.converged and "averaged 34.67" in one.reason
    _, two = run(rule, lambda s: 1.0, 1000, l0=lambda s: 40.0 if s >= 900 else 32.0)
    assert not two.converged and "37.33" in two.reason and "16.7%" in two.reason


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

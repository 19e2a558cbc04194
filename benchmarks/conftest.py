"""Shared by the benchmark files: timing stays on, `--full`, peak memory in a fresh process, a summary table.

`pytest benchmarks/` times for real although pyproject's addopts holds `--benchmark-disable` (there so that
the test suite runs benchmark fixtures once, untimed): this conftest switches timing back on unless
`--benchmark-disable` is given on the command line itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Runs in the child. Every allocation of 64 KiB or more is its own mmap (MALLOC_MMAP_THRESHOLD_, set below),
# so freeing returns it to the OS at once and resident memory follows live memory: one call's leftovers do
# not hide in malloc's free lists and lower the next call's apparent peak.
_CHILD = r"""
import gc, importlib.util, json, sys

import torch


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


path, factory, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, path.rsplit("/", 1)[0])  # the benchmark's own folder, as pytest puts it there
spec = importlib.util.spec_from_file_location("_peak_memory_target", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
cuda = torch.cuda.is_available()
peaks = []
for args in calls:
    step = getattr(module, factory)(*args)
    step()  # warm-up: one-time buffers (BLAS packing, thread pools) are not the step's own memory
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set, to the current VmRSS
        base = status("VmRSS")
        step()
        peaks.append(status("VmHWM") - base)
    del step
    gc.collect()
print(json.dumps(peaks))
"""

MEMORY_METHOD = (
    "peak memory = the most one call adds on top of what is resident before it, measured in a fresh Python "
    "process after one warm-up call: on CPU the kernel's peak resident set (VmHWM, reset through "
    "/proc/self/clear_refs) minus VmRSS, every allocation >= 64 KiB mmap-ed so frees reach the OS; on CUDA "
    "torch.cuda.max_memory_allocated minus memory_allocated"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        default=False,
        help="also run the large benchmark shapes (tens of minutes on 2 CPU cores)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark reads these options in its own pytest_configure, which runs last (trylast).
    if "--benchmark-disable" not in config.invocation_params.args:
        config.option.benchmark_enable = True


@pytest.fixture(scope="session")
def full(request: pytest.FixtureRequest) -> bool:
    """True under `--full`."""
    return bool(request.config.getoption("--full"))


class PeakMemory:
    """Peak bytes each call adds, all measured in one fresh Python process (`method` says how)."""

    method = MEMORY_METHOD

    def __call__(self, path: str | Path, factory: str, calls: list[list]) -> list[int] | None:
        """`factory(*args)`, for each args in `calls`, is looked up in the file at `path` and must return a
        zero-argument callable (the step, its inputs already built) that leaves nothing behind, e.g. sets
        `.grad` to None at its end. Each step runs twice, warm-up then measured. Returns None where the peak
        resident set cannot be reset (no writable /proc/self/clear_refs: not Linux, or a locked-down
        container).
        """
        if not torch.cuda.is_available() and not os.access("/proc/self/clear_refs", os.W_OK):
            return None
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        args = [sys.executable, "-P", "-c", _CHILD, str(path), factory, json.dumps(calls)]
        done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"peak-memory child failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def measure_peak_memory() -> PeakMemory:
    """A `PeakMemory`, as a fixture so benchmark files need not import this conftest."""
    return PeakMemory()


class Summary:
    """Markdown tables printed at the end of the session: `row(table, **columns)`, `note(table, text)`."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, object]]] = {}
        self.notes: dict[str, list[str]] = {}

    def row(self, table: str, **columns: object) -> None:
        self.rows.setdefault(table, []).append(columns)

    def note(self, table: str, text: str) -> None:
        if text not in self.notes.setdefault(table, []):
            self.notes[table].append(text)

    def markdown(self) -> str:
        parts = []
        for table, rows in self.rows.items():
            header = list(dict.fromkeys(key for row in rows for key in row))
            lines = [f"### {table}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(row.get(key, "")) for key in header) + " |" for row in rows]
            lines += ["", *self.notes.get(table, [])]
            parts.append("\n".join(lines))
        return "\n\n".join(parts)


_SUMMARY = Summary()


@pytest.fixture(scope="session")
def summary() -> Summary:
    """The session's `Summary`; its tables are printed in the terminal summary, beside pytest-benchmark's."""
    return _SUMMARY


def pytest_terminal_summary(terminalreporter) -> None:
    if _SUMMARY.rows:
        terminalreporter.section("benchmark summary")
        terminalreporter.write_line(_SUMMARY.markdown())

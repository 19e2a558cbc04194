"""The GPU check in one command: the GPU test suite and the kernels' timings on a CUDA machine, in one table.

    python -P benchmarks/gpu_check.py            # a CUDA machine; sized for under 5 minutes on one H100/H200
    python -P benchmarks/gpu_check.py --dry-run  # no GPU: CPU, Triton's interpreter, tiny shapes (~1.5 min)

1. `pytest -m gpu tests/test_gpu.py` runs in a child process (this file with --suite-child), each test's
   outcome streamed to a file as it ends: a crash or the timeout (--suite-timeout) keeps the rows before it,
   and a CUDA error in the suite cannot poison the timings' CUDA context. Its full log goes to --log. With
   pytest-xdist installed the suite runs in --workers processes (default: one per 4 cores, at most 4), since
   its time goes to Triton compilations and float64 references on the CPU.
2. Timings: median of triton.testing.do_bench (CUDA events, L2 flushed between calls, after warm-up; on the
   CPU of a dry run, perf_counter around 3 calls after one), each variant divided by its group's floor.
   - benchmarks/test_threshold_encoder.py's CUDA rows: both shapes, fp32 and bf16, SAE training (no x
     grad) and x grad, each of its variants (floor = its three GEMMs, SAELens when installed, naive, ours);
   - benchmarks/test_coherence.py's CUDA rows: 16384 x 2304 in fp64, fp32 and bf16 (floor = a GEMM of the
     n^2 d FLOPs the pairs need, materialised Gram, ours);
   - what those files do not time: the encoder forward alone (floor = its GEMM; the torch reference; ours),
     gram_reduce with fp32 "tf32x3" products, and support_coherence for q* (4096 codes of 64 atoms among
     16384; floor = the float64 batched GEMM of the already gathered rows; the torch reference; ours).
3. One Markdown table (check, shape, dtype, result, x floor) under the GPU's name and the driver, torch,
   Triton and CUDA versions, to paste into kernels/NOTES.md; failure messages and skip reasons below it.

A failing test or a step that raises becomes its row; the exit status is 1 when any test failed or errored,
the suite crashed, timed out or ran nothing, or a timed step raised; 2 without a CUDA device (and no
--dry-run). Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from statistics import median
from types import ModuleType
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = "tests/test_gpu.py"
# A guard, not the expected time: the suite compiles each kernel variant it tests (about 60 Triton
# compilations of a few seconds each, shared out among the workers) and builds float64 references.
SUITE_TIMEOUT_S = 270
# Shapes of the dry run's timings (the benchmark files' SHAPES are replaced by these), and the support-Gram
# timing's codes: (number of codes, atoms per code).
DRY_ENCODER_SHAPES = {"small": (64, 24, 80), "large": (96, 40, 130)}
DRY_COHERENCE_SHAPES = {"small": (40, 24), "large": (70, 37)}
SUPPORT_CODES = {"gpu": (4096, 64), "dry": (16, 8)}


class Row(NamedTuple):
    """One line of the table."""

    check: str
    shape: str = ""
    dtype: str = ""
    result: str = ""
    """"pass", "FAIL", "ERROR", "skip", or a median time "1.234 ms"."""
    floor_ratio: float | None = None
    failed: bool = False
    detail: str = ""
    """The failure message or the skip reason, printed under the table."""


# ------------------------------------------------------------------------------------------------------------
# The test suite, in a child process
# ------------------------------------------------------------------------------------------------------------


class _Recorder:
    """pytest plugin of the child: one JSON line per test phase that decides its outcome, flushed at once."""

    def __init__(self, path: str) -> None:
        self.out = open(path, "a", encoding="utf-8")  # open for the whole session, closed at exit

    def _write(self, nodeid: str, outcome: str, report: Any) -> None:
        message = ""
        if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
            message = report.longrepr[2]
        elif report.longrepr is not None:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)[-500:]
        line = {
            "id": nodeid,
            "outcome": outcome,
            "seconds": getattr(report, "duration", 0.0),
            "message": message,
        }
        self.out.write(json.dumps(line) + "\n")
        self.out.flush()

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call":
            self._write(report.nodeid, report.outcome, report)
        elif report.skipped:
            self._write(report.nodeid, "skipped", report)
        elif report.failed:  # setup or teardown
            self._write(report.nodeid, "error", report)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self._write(report.nodeid or SUITE, "error", report)


def default_workers() -> int:
    """pytest-xdist workers for the suite: one per 4 CPU cores, at most 4, 1 without pytest-xdist. The suite
    spends its time on the CPU (Triton compilations, float64 references), which workers share out; they
    share the GPU."""
    if importlib.util.find_spec("xdist") is None:
        return 1
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def _suite_child(results: str, workers: int) -> int:
    import pytest

    # addopts cleared: pyproject's --benchmark-disable needs pytest-benchmark, which the suite does not.
    args = ["-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", "-o", "addopts=", SUITE]
    args += ["-n", str(workers)] if workers > 1 else []
    return int(pytest.main(args, plugins=[_Recorder(results)]))


_NODE = re.compile(r"::test_(?P<name>[^\[]+)(?:\[(?P<params>.*)\])?$")
_SHAPE = re.compile(r"^\d+(x\d+)+$")


def _suite_row(entry: dict[str, Any]) -> Row:
    """A test's row: tests/test_gpu.py's ids are "<shape>-<dtype>" for kernels, a name for the rest."""
    match = _NODE.search(entry["id"])
    check, shape, dtype = entry["id"], "", ""
    if match is not None:
        check, params = match["name"], match["params"] or ""
        head, _, tail = params.partition("-")
        if _SHAPE.match(head):
            shape, dtype = head, tail
        elif params:
            check = f"{check}[{params}]"
    outcome = entry["outcome"]
    result = {"passed": "pass", "failed": "FAIL", "error": "ERROR", "skipped": "skip"}[outcome]
    return Row(check, shape, dtype, result, failed=outcome in ("failed", "error"), detail=entry["message"])


def run_suite(dry_run: bool, timeout: float, log: Path, workers: int) -> tuple[list[Row], str]:
    """The suite's rows, and a one-line summary of its run."""
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results.jsonl"
        results.touch()
        cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--suite-child", str(results)]
        cmd += ["--workers", str(workers)] + (["--dry-run"] if dry_run else [])
        # Each worker's BLAS and torch threads get their share of the cores, not all of them. PYTHONSAFEPATH
        # is -P for the xdist workers too (started with `python -c` in the repository root, they would
        # otherwise import its kernels/ folder as Hugging Face's `kernels` package).
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        env = {
            **os.environ,
            **dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), threads),
            "PYTHONSAFEPATH": "1",
        }
        start = time.perf_counter()
        with log.open("w", encoding="utf-8") as out:
            try:
                rc: int | None = subprocess.run(
                    cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
                ).returncode
            except subprocess.TimeoutExpired:
                rc = None
        seconds = time.perf_counter() - start
        outcomes: dict[str, dict[str, Any]] = {}
        for line in results.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            # A teardown error after a passed call makes the test an error: the worst outcome wins.
            if outcomes.get(entry["id"], {}).get("outcome") not in ("failed", "error"):
                outcomes[entry["id"]] = entry
    # Workers finish in any order: rows by test, then shape (numerically), then dtype.
    rows = sorted(
        (_suite_row(entry) for entry in outcomes.values()),
        key=lambda r: (r.check, [int(v) for v in r.shape.split("x") if v], r.dtype),
    )
    counts = {k: sum(r.result == k for r in rows) for k in ("pass", "FAIL", "ERROR", "skip")}
    summary = (
        f"suite `pytest -m gpu {SUITE}`: {counts['pass']} passed, {counts['FAIL']} failed, "
        f"{counts['ERROR']} errors, {counts['skip']} skipped in {seconds:.0f} s (log: {log})"
    )
    if rc is None:
        rows.append(
            Row(
                "suite",
                result="FAIL",
                failed=True,
                detail=f"timed out after {timeout:.0f} s: later tests never ran",
            )
        )
    elif rc not in (0, 1) or counts["pass"] == 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-800:]
        rows.append(
            Row(
                "suite",
                result="FAIL",
                failed=True,
                detail=f"pytest exit {rc}, {counts['pass']} passed: {tail}",
            )
        )
    return rows, summary


# ------------------------------------------------------------------------------------------------------------
# Timings
# ------------------------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn() after warm-up: do_bench on CUDA, perf_counter on the CPU (dry run)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        # rep = 200 ms: at least 5 timed calls for steps up to 40 ms (the slowest here take ~30 ms).
        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * median(times)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


Step = Callable[[], object]


def timed_group(
    check: str, shape: str, dtype: str, factories: dict[str, Callable[[], Step] | str]
) -> list[Row]:
    """Rows of one group: each variant's step, built by its factory just before it is timed, freed after;
    "floor" (first) is what the others are divided by. A str in place of a factory: why that variant skips.
    A step that raises is an ERROR row, which fails the check for our kernels' variants ("ours ...") only:
    the peers (SAELens) and the torch baselines are not this project's to fix."""
    rows: list[Row] = []
    floor: float | None = None
    for variant, factory in factories.items():
        name = f"{check}: {variant}"
        print(f"timing {name} {shape} {dtype}", file=sys.stderr, flush=True)
        if isinstance(factory, str):
            rows.append(Row(name, shape, dtype, "skip", detail=factory))
            continue
        try:
            ms = median_ms(factory())
        except Exception as err:  # a row of the table, not the end of the check
            ours = variant.startswith("ours")
            rows.append(Row(name, shape, dtype, "ERROR", failed=ours, detail=f"{type(err).__name__}: {err}"))
            continue
        finally:
            _free()
        floor = ms if variant == "floor" else floor
        rows.append(Row(name, shape, dtype, f"{ms:.3f} ms", None if floor is None else ms / floor))
    return rows


def _load(relative: str) -> ModuleType:
    """A benchmark file as a module (benchmarks/ is no package, and `python -P` keeps it off sys.path)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"gpu_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _encoder_forward(enc: ModuleType, shape: str, dtype: str, variant: str) -> Step:
    """The forward alone, no gradient: the GEMM (floor), threshold_encode_reference or threshold_encode."""
    from atoms.kernels.threshold_encoder import threshold_encode, threshold_encode_reference

    t = enc._inputs(shape, dtype)
    x, W = t["x"], t["W_enc"]
    if variant == "floor":
        return lambda: x @ W
    encode = threshold_encode if variant == "ours" else threshold_encode_reference

    @torch.no_grad()
    def step() -> object:
        return encode(x, W, t["b_enc"], t["theta"], b_dec=t["b_dec"], return_l0=True)

    return step


def encoder_rows(enc: ModuleType) -> list[Row]:
    rows: list[Row] = []
    missing = enc.saelens_missing()
    for shape, dims in enc.SHAPES.items():
        shape_id = "x".join(map(str, dims))
        for dtype in enc.DTYPES:
            forward = {v: partial(_encoder_forward, enc, shape, dtype, v) for v in ("floor", "torch", "ours")}
            rows += timed_group("encoder fwd", shape_id, dtype, forward)
            for x_grad in (False, True):
                steps: dict[str, Callable[[], Step] | str] = {
                    v: missing
                    if v == "saelens" and missing
                    else partial(enc.encoder_step, v, shape, dtype, x_grad)
                    for v in enc.VARIANTS
                }
                rows += timed_group(
                    f"encoder fwd+bwd {'x grad' if x_grad else 'train'}", shape_id, dtype, steps
                )
    return rows


def _tf32x3_step(coh: ModuleType) -> Step:
    from atoms.kernels.aip_gram import gram_reduce

    unit = coh._inputs("large", "fp32")
    return lambda: gram_reduce(unit, bins=coh.BINS, thresholds=coh.THRESHOLDS, precision="tf32x3")


def coherence_rows(coh: ModuleType) -> list[Row]:
    rows: list[Row] = []
    shape_id = "x".join(map(str, coh.SHAPES["large"]))
    for dtype in coh.DTYPES:
        steps: dict[str, Callable[[], Step] | str] = {
            v: partial(coh.coherence_step, v, "large", dtype) for v in coh.VARIANTS
        }
        if dtype == "fp32":
            steps["ours tf32x3"] = partial(_tf32x3_step, coh)
        rows += timed_group("coherence", shape_id, dtype, steps)
    return rows


def _support_step(coh: ModuleType, dtype: str, codes: tuple[int, int], variant: str) -> Step:
    """support_coherence of `codes` random supports on test_coherence's large unit atoms, or its floor."""
    from atoms.kernels.support_gram import support_coherence, support_coherence_reference

    unit = coh._inputs("large", dtype)
    n_codes, k = codes
    gen = torch.Generator(device=unit.device).manual_seed(1)
    idx = torch.rand(n_codes, unit.shape[0], generator=gen, device=unit.device).topk(k, dim=1).indices
    if variant == "floor":
        rows = unit.double()[idx]  # gathered outside the timing
        return lambda: torch.bmm(rows, rows.mT)
    coherence = support_coherence if variant == "ours" else support_coherence_reference
    return lambda: coherence(unit, idx)


def support_rows(coh: ModuleType, codes: tuple[int, int]) -> list[Row]:
    n_atoms, d = coh.SHAPES["large"]
    shape_id = f"{codes[0]}x{codes[1]}x{n_atoms}x{d}"
    rows: list[Row] = []
    for dtype in ("fp64", "fp32"):
        steps = {v: partial(_support_step, coh, dtype, codes, v) for v in ("floor", "torch", "ours")}
        rows += timed_group("support_coherence", shape_id, dtype, steps)
    return rows


def run_timings(dry_run: bool) -> tuple[list[Row], str]:
    start = time.perf_counter()
    try:
        enc = _load("benchmarks/test_threshold_encoder.py")
        coh = _load("benchmarks/test_coherence.py")
    except Exception as err:  # e.g. atoms not importable: the suite's rows still get printed
        return [
            Row("timings", result="ERROR", failed=True, detail=f"{type(err).__name__}: {err}")
        ], "no timings"
    if dry_run:
        enc.SHAPES, coh.SHAPES = DRY_ENCODER_SHAPES, DRY_COHERENCE_SHAPES
    # One (shape, dtype)'s inputs serve its 11 encoder steps, in a row (a 4096 x 16384 randn on the CPU takes
    # about a second). The steps clone what they differentiate and only toggle x's requires_grad.
    enc._inputs = lru_cache(maxsize=1)(enc._inputs)
    rows = encoder_rows(enc) + coherence_rows(coh)
    rows += support_rows(coh, SUPPORT_CODES["dry" if dry_run else "gpu"])
    how = "median of do_bench" if torch.cuda.is_available() else "median of 3 perf_counter calls"
    seconds = time.perf_counter() - start
    return rows, f"timings ({how}, after warm-up; x floor = time / its group's floor) in {seconds:.0f} s"


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------


def environment() -> str:
    import triton

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        memory = p.total_memory / 2**30
        gpu = f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {memory:.0f} GiB)"
    else:
        gpu = "none: DRY RUN on the CPU (Triton interpreter, tiny shapes; times are not GPU times)"
    driver = "n/a"
    if shutil.which("nvidia-smi") and torch.cuda.is_available():
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, check=False, timeout=30)
        driver = done.stdout.strip() or "n/a"
    return (
        f"GPU: {gpu}\n"
        f"driver {driver}, torch {torch.__version__}, Triton {triton.__version__}, "
        f"CUDA {torch.version.cuda}, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}"
    )


def table(rows: list[Row]) -> str:
    lines = ["| check | shape | dtype | result | x floor |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r.floor_ratio is None else f"{r.floor_ratio:.2f}"
        lines.append(f"| {r.check} | {r.shape} | {r.dtype} | {r.result} | {ratio} |")
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    """Failure messages, then each distinct skip reason once."""
    failures = [
        f"- {r.result} {r.check} {r.shape} {r.dtype}: {' / '.join(r.detail.splitlines())[:400]}"
        for r in rows
        if r.failed
    ]
    skips = dict.fromkeys(f"- skip: {r.detail}" for r in rows if r.result == "skip")
    return "\n".join([*failures, *skips])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    parser.add_argument(
        "--log", type=Path, help="where the suite's pytest log goes (default: a temporary file)"
    )
    parser.add_argument(
        "--suite-timeout", type=float, default=SUITE_TIMEOUT_S, help="seconds (default %(default)s)"
    )
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="pytest-xdist workers (default %(default)s)"
    )
    parser.add_argument("--suite-child", metavar="RESULTS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Before anything touches CUDA (torch initialises it lazily and reads CUDA_VISIBLE_DEVICES then).
    if args.dry_run:
        os.environ.update(CUDA_VISIBLE_DEVICES="", ATOMS_GPU_DRYRUN="1", ATOMS_KERNELS="interpret")
    else:
        os.environ.pop("ATOMS_GPU_DRYRUN", None)
        os.environ.pop("ATOMS_KERNELS", None)  # the default dispatch: compiled Triton on CUDA tensors
    if args.suite_child:
        return _suite_child(args.suite_child, args.workers)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.log is None:
        fd, name = tempfile.mkstemp(prefix="gpu_check-", suffix=".log")
        os.close(fd)
        args.log = Path(name)
    log = args.log
    print(f"running the suite (log: {log})", file=sys.stderr, flush=True)
    suite, suite_summary = run_suite(args.dry_run, args.suite_timeout, log, args.workers)
    timings, timing_summary = run_timings(args.dry_run)
    rows = suite + timings
    failed = sum(r.failed for r in rows)
    print(f"## GPU check (`python -P benchmarks/gpu_check.py{' --dry-run' if args.dry_run else ''}`)\n")
    print(environment())
    print(f"{suite_summary}; {timing_summary}; total {time.perf_counter() - start:.0f} s\n")
    print(table(rows))
    print(f"\n{'FAILED: ' + str(failed) + ' rows' if failed else 'all checks passed'}")
    if notes := details(rows):
        print(notes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

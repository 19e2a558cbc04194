"""Scale (issue 9): the statistics of a GemmaScope-sized dictionary, and a million-token capture, in bounded
memory. Time and peak memory of each step, recorded in benchmark.extra_info and the summary tables.

Dictionary steps, on Gaussian atoms (seeded) under an AIP whose covariance has a decaying spectrum
(eigenvalues 1 / (1 + k / 64)), float64:

- coherence: Dictionary(W_dec, aip) (whitening), then coherence, max_coherence (per-atom max and partner)
  and cos_histogram: one tiled walk over the upper Gram.
- spark: spark_lower_bounds on that Dictionary, its coherence already cached: one Babel walk
  (`Dictionary.babel_crossing`, the full Gram in row tiles).
- q*: per_sample_coherence of 4096 sparse codes with 64 active atoms each (support Grams, gathered rows),
  then q_star in both forms.
- certified: certified_fractions(erc_samples=16, bp_samples=0): the spark bounds (coherence cached, so one
  Babel walk again) and 16 ERC least-squares solves (each O(n_atoms d) memory). Basis pursuit at this size is
  benchmarked elsewhere (benchmarks/test_basis_pursuit.py).

Every walk holds O(tile x n_atoms) at most beside the (n_atoms, d) atoms; nothing (n_atoms, n_atoms) or
(n_samples, n_atoms) is built (65536^2 float64 would be 32 GiB).

Capture steps: the tiny random Llama of tests/tiny_models.py (4 blocks, d = 32), layers 1 and 3, into
shards of the default 8192 rows, 100k and 1M tokens: the peak should not grow with the number of tokens.

Sizes: the default run is 8192 x 2304 and both captures (about 5 minutes on 2 shared cores). `--full` adds
16384 x 2304 and GemmaScope's 65536 x 2304 (walks grow as n_atoms^2: 16 times the 16384 case, over an hour on
2 cores; about 2.4 GiB of atoms, whitened copy included, and a few GiB for each ERC solve).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# tests/tiny_models.py holds the tiny Llama the capture tests use; the peak-memory child imports this file
# by path, so the folder goes on sys.path here rather than in a conftest.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import byte_tokenizer, tiny_llama

from atoms.activations import capture
from atoms.aip import AIP
from atoms.dictionary import Dictionary
from atoms.metrics import certified_fractions, per_sample_coherence, q_star
from atoms.uniqueness import spark_lower_bounds

D = 2304
SIZES = {"8k": 8192, "16k": 16384, "64k": 65536}
DEFAULT_SIZES = ("8k",)
STEPS = ("coherence", "spark", "q*", "certified")
N_CODES, K_ACTIVE, ERC_SAMPLES = 4096, 64, 16
TOKENS = {"100k": 100_000, "1M": 1_000_000}
TABLE = "scale: dictionary statistics at d = 2304"
CAPTURE_TABLE = "scale: capture to shards (tiny Llama, d = 32, layers 1 and 3)"

_peaks: dict[str, dict[str, int | None]] = {}


@functools.lru_cache(maxsize=1)
def _inputs(size: str) -> tuple[torch.Tensor, AIP]:
    """W_dec (n_atoms, 2304) Gaussian and the AIP, seeded; cached for the steps of one size."""
    n = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    C = (Q / (1 + torch.arange(D, dtype=torch.float64) / 64)) @ Q.T
    return torch.randn(n, D, generator=gen, dtype=torch.float64), AIP.from_moment(C)


# Dictionaries whose coherence statistics are computed, by size: the coherence step leaves its own here, so
# a process that runs every step walks the Gram for coherence once.
_built: dict[str, Dictionary] = {}


def _dictionary(size: str) -> Dictionary:
    """The Dictionary of `_inputs`, its coherence statistics computed (cached inside it)."""
    if size not in _built:
        _built.clear()
        dic = Dictionary(*_inputs(size))
        dic.coherence()
        _built[size] = dic
    return _built[size]


@functools.lru_cache(maxsize=1)
def _codes(size: str) -> tuple[torch.Tensor, torch.Tensor]:
    """N_CODES sparse codes (indices, values) with K_ACTIVE distinct random atoms each, seeded."""
    gen = torch.Generator().manual_seed(1)
    idx = torch.rand(N_CODES, SIZES[size], generator=gen).topk(K_ACTIVE, dim=1).indices
    return idx, torch.randn(N_CODES, K_ACTIVE, generator=gen, dtype=torch.float64)


def scale_step(step: str, size: str, progress: bool = False) -> Callable[[], object]:
    """The work of `step` at `size` as a zero-argument callable (its inputs built first); the peak-memory
    child's factory. progress: tqdm bars on stderr (the one-process run at the end of this file)."""
    if step == "coherence":
        W, aip = _inputs(size)

        def coherence():
            dic = Dictionary(W, aip)
            out = dic.coherence(progress=progress), dic.max_coherence(), dic.cos_histogram()
            _built.clear()
            _built[size] = dic
            return out

        return coherence
    dic = _dictionary(size)
    if step == "spark":
        return lambda: spark_lower_bounds(dic, progress=progress)
    idx, vals = _codes(size)
    if step == "q*":

        def stability():
            mu, l0 = per_sample_coherence(dic, idx, vals, progress=progress)
            return q_star(mu, l0), q_star(mu, l0, form="per_sample")

        return stability
    if step == "certified":
        return lambda: certified_fractions(
            dic, idx, vals, erc_samples=ERC_SAMPLES, bp_samples=0, progress=progress, codes_of="unit"
        )
    raise ValueError(f"unknown step {step!r}; use one of {STEPS}")


@functools.lru_cache(maxsize=1)
def _capture_inputs() -> tuple[torch.nn.Module, object, list[str]]:
    """The tiny Llama, its byte tokenizer and about 1.4M bytes of text (one token a byte) in 3000 texts."""
    tok = byte_tokenizer()
    model = tiny_llama(tok, max_positions=256)
    words = "atoms sparse residual stream coherence dictionary shard token layer whitening".split()
    gen = torch.Generator().manual_seed(5)
    texts = [
        " ".join(words[int(i)] for i in torch.randint(len(words), (60,), generator=gen)) for _ in range(3000)
    ]
    return model, tok, texts


def capture_step(tokens: str) -> Callable[[], object]:
    """Capture TOKENS[tokens] rows of layers 1 and 3 into a fresh temporary folder, removed afterwards."""
    model, tok, texts = _capture_inputs()

    def run():
        folder = tempfile.mkdtemp(prefix="atoms-scale-")
        try:
            cap = capture(
                model,
                tok,
                texts,
                [1, 3],
                max_tokens=TOKENS[tokens],
                seq_len=256,
                batch_size=16,
                out_dir=folder,
            )
            return cap.n_tokens
        finally:
            shutil.rmtree(folder)

    return run


def _peak(key: str, variant: str, factory: str, calls: list[list], names: list[str], measure) -> int | None:
    """Peak bytes of `variant`, all of `names` measured in one fresh child (inputs built once there)."""
    if key not in _peaks:
        peaks = measure(Path(__file__), factory, calls) or [None] * len(calls)
        _peaks[key] = dict(zip(names, peaks, strict=True))
    return _peaks[key][variant]


def _time_once(benchmark, run: Callable[[], object]) -> tuple[float, tuple, tuple] | None:
    """One timed round of `run`: (seconds, load averages before, after); None when timing is disabled."""
    load_before = os.getloadavg()
    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    load_after = os.getloadavg()
    if benchmark.disabled:
        return None
    return benchmark.stats.stats.min, load_before, load_after


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("step", STEPS)
def test_dictionary_scale(benchmark, summary, measure_peak_memory, full, size, step):
    if size not in DEFAULT_SIZES and not full:
        pytest.skip(f"{SIZES[size]} x {D} runs under --full (walks grow as n_atoms^2; over an hour at 65536)")
    n = SIZES[size]
    benchmark.group = f"scale {n}x{D}"
    timed = _time_once(benchmark, scale_step(step, size))
    if timed is None:
        return
    seconds, load_before, load_after = timed
    peak = _peak(size, step, "scale_step", [[s, size] for s in STEPS], list(STEPS), measure_peak_memory)
    atoms_bytes = n * D * 8
    benchmark.extra_info.update(
        n_atoms=n,
        d=D,
        step=step,
        seconds=seconds,
        peak_bytes=peak,
        atoms_bytes=atoms_bytes,
        load_average_before=load_before,
        load_average_after=load_after,
        torch_threads=torch.get_num_threads(),
    )
    summary.row(
        TABLE,
        **{
            "n_atoms x d": f"{n} x {D}",
            "step": step,
            "s": f"{seconds:.1f}",
            "peak MiB": _mib(peak),
            "peak / (n_atoms d 8 B)": "n/a" if peak is None else f"{peak / atoms_bytes:.2f}",
            "load avg (1 min)": f"{load_before[0]:.1f}-{load_after[0]:.1f}",
        },
    )
    summary.note(
        TABLE,
        f"One timed round per step, {torch.get_num_threads()} torch threads, CPU torch path. coherence "
        "includes building the Dictionary (whitening); spark is one Babel walk (coherence cached); q* is "
        f"{N_CODES} codes x {K_ACTIVE} active atoms; certified = spark bounds (one Babel walk) + "
        f"{ERC_SAMPLES} ERC solves, bp_samples=0. An (n_atoms, d) float64 array is n_atoms d 8 B.",
    )
    summary.note(TABLE, f"Peak MiB: {measure_peak_memory.method}.")


@pytest.mark.parametrize("tokens", list(TOKENS))
def test_capture_scale(benchmark, summary, measure_peak_memory, tokens):
    benchmark.group = "scale capture"
    timed = _time_once(benchmark, capture_step(tokens))
    if timed is None:
        return
    seconds, load_before, load_after = timed
    calls = [[t] for t in TOKENS]
    peak = _peak("capture", tokens, "capture_step", calls, list(TOKENS), measure_peak_memory)
    benchmark.extra_info.update(
        tokens=TOKENS[tokens],
        seconds=seconds,
        tokens_per_s=TOKENS[tokens] / seconds,
        peak_bytes=peak,
        load_average_before=load_before,
        load_average_after=load_after,
    )
    summary.row(
        CAPTURE_TABLE,
        **{
            "tokens": f"{TOKENS[tokens]:,}",
            "s": f"{seconds:.1f}",
            "tokens/s": f"{TOKENS[tokens] / seconds:,.0f}",
            "peak MiB": _mib(peak),
            "load avg (1 min)": f"{load_before[0]:.1f}-{load_after[0]:.1f}",
        },
    )
    summary.note(
        CAPTURE_TABLE,
        "Shards of 8192 rows (2.4 MB each: two layers of 32 float32 + 4 int64 token fields a row), seq_len "
        "256, batch 16; the activations would be 256 MB per layer at 1M tokens if held in memory.",
    )
    summary.note(CAPTURE_TABLE, f"Peak MiB: {measure_peak_memory.method}.")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_once(size: str) -> None:
    """Every dictionary step at `size` once, in this process, with progress bars: time and peak memory.

    For sizes where the pytest run (a timed round plus a separate peak-memory child per step) takes hours:
    `MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/test_scale.py 64k`. The peak of a step is the resident
    set's high-water mark (reset through /proc/self/clear_refs before it) minus the resident set before it;
    the environment variable makes freed blocks of 64 KiB or more return to the OS, as in conftest.
    """
    import time

    n = SIZES[size]
    print("| n_atoms x d | step | s | peak MiB | load avg (1 min) |\n|---|---|---|---|---|", flush=True)
    for step in STEPS:
        run = scale_step(step, size, progress=True)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, load, start = _status_bytes("VmRSS"), os.getloadavg()[0], time.perf_counter()
        run()
        seconds, peak = time.perf_counter() - start, _status_bytes("VmHWM") - base
        print(
            f"| {n} x {D} | {step} | {seconds:.1f} | {_mib(peak)} | {load:.1f}-{os.getloadavg()[0]:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    run_once(sys.argv[1] if len(sys.argv) > 1 else "64k")

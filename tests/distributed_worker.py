"""The worker tests/test_distributed.py runs under `torchrun --nproc-per-node 2` (gloo, CPU).

Usage: distributed_worker.py OUT. OUT holds the inputs the test wrote (train.pt: activations and AIP file;
one_cut/: a checkpoint written by one process); each rank writes its results to OUT/rank<r>.pt.
Scenarios, in order (each rank runs all of them; a collective that one rank skips would hang):
statistics reduced over disjoint shards, mismatch errors, then TSAE training: an uninterrupted run, a run
interrupted after its step-4 checkpoint, its resumption on 2 ranks, and the resumption of a 1-process
checkpoint.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from atoms.aip import AIP, SecondMoment
from atoms.distributed import all_reduce_counts, all_reduce_moment, all_reduce_r2, shard
from atoms.errors import BadInputError
from atoms.metrics import R2Accumulator
from atoms.train import TrainConfig, train
from atoms.tsae import TSAE

D, N_ATOMS = 16, 32
HIST_BINS = 20
TRAIN = {
    "lr": 3e-3,
    "batch_size": 128,
    "steps": 12,
    "lr_warmup_steps": 2,
    "sparsity_warmup_steps": 4,
    "checkpoint_every": 4,
    "target_l0": 4.0,
    "dead_window": 512,
    "log_every": 1000,
}
INTERRUPT_AT = 6  # after the checkpoint at step 4, before the one at step 8


class Interrupt(Exception):
    """Raised by the callback to simulate a crash after step INTERRUPT_AT."""


def stop_at(step: int):
    def callback(stats) -> None:
        if stats.step == step:
            raise Interrupt

    return callback


def stats_data() -> tuple[torch.Tensor, torch.Tensor]:
    """(x, x_hat): 601 float64 activations (odd, so the shards differ in size) with a large mean, and noisy
    reconstructions of them."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(601, D, generator=g, dtype=torch.float64) @ torch.randn(
        D, D, generator=g, dtype=torch.float64
    )
    x = x + 40.0
    return x, 0.9 * x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)


def histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts (HIST_BINS,) int64 of the rows' norms over a fixed range: what a rank contributes."""
    return torch.histc(x.norm(dim=1), bins=HIST_BINS, min=100.0, max=250.0).long()


def model(aip: AIP) -> TSAE:
    return TSAE(D, N_ATOMS, aip, seed=3)


def run_statistics(rank: int) -> dict:
    x, x_hat = stats_data()
    rows = shard(x.shape[0])
    part, part_hat = x[rows], x_hat[rows]
    half = part.shape[0] // 2
    moment = SecondMoment(D).update(part[:half]).update(part[half:])
    aip = AIP.fit(x)
    r2_aip = R2Accumulator(aip).update(part, part_hat)
    # Rank 1 contributes nothing to the Euclidean accumulator, so it does not even know d.
    r2_euclid = R2Accumulator()
    if rank == 0:
        r2_euclid.update(part, part_hat)
    return {
        "moment": all_reduce_moment(moment).state(),
        "moment_center": all_reduce_moment(SecondMoment(D, center=True).update(part)).state(),
        "r2_aip": all_reduce_r2(r2_aip).value(),
        "r2_euclid": all_reduce_r2(r2_euclid).value(),
        "histogram": all_reduce_counts(histogram(part)),
    }


def mismatch_errors(rank: int, x_train: torch.Tensor) -> dict:
    """The message each mismatch raises on this rank (every rank must raise, or the next collective hangs)."""
    cases = {
        "moment_d": lambda: all_reduce_moment(SecondMoment(D + rank)),
        "moment_center": lambda: all_reduce_moment(SecondMoment(D, center=rank == 1)),
        "bins": lambda: all_reduce_counts(torch.zeros(HIST_BINS + rank, dtype=torch.int64)),
        "ndim": lambda: all_reduce_counts(torch.zeros((4, 5) if rank else (20,), dtype=torch.int64)),
        "r2_aip": lambda: all_reduce_r2(R2Accumulator(AIP.fit(x_train) if rank == 0 else None)),
        "train_data": lambda: train(
            TSAE(D, N_ATOMS), x_train[: 512 + 64 * rank], TrainConfig(**TRAIN), progress=False
        ),
    }
    messages = {}
    for name, call in cases.items():
        try:
            call()
        except BadInputError as e:
            messages[name] = str(e)
    return messages


def run_training(rank: int, out: Path, x: torch.Tensor, aip: AIP) -> dict:
    cfg = TrainConfig(**TRAIN)
    results = {}

    full = model(aip)
    history = train(full, x, cfg, out / "two_full", progress=False)
    results["two_full"] = (full.state_dict(), history.loss, history.final_coefficient)

    try:
        train(model(aip), x, cfg, out / "two_cut", progress=False, callback=stop_at(INTERRUPT_AT))
    except Interrupt:
        pass
    if rank == 0:
        # A copy for the 2-rank resumption; the test resumes the original in one process.
        shutil.copytree(out / "two_cut", out / "two_cut_resumed")
    dist.barrier()
    resumed = model(aip)
    history = train(resumed, x, cfg, out / "two_cut_resumed", progress=False)
    results["two_resumed"] = (resumed.state_dict(), history.loss, history.final_coefficient)

    # Built with another seed: the resumption must take every weight from the checkpoint.
    from_one = TSAE(D, N_ATOMS, aip, seed=99)
    history = train(from_one, x, cfg, out / "one_cut", progress=False)
    results["one_to_two"] = (from_one.state_dict(), history.loss, history.final_coefficient)
    return results


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs = torch.load(out / "train.pt", weights_only=True)
    x, aip = inputs["x"], AIP.load(out / "aip.safetensors")
    result = {"world_size": dist.get_world_size()}
    result.update(run_statistics(rank))
    result["errors"] = mismatch_errors(rank, x)
    result.update(run_training(rank, out, x, aip))
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

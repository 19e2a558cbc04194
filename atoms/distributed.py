"""Streaming statistics reduced across the ranks of a torch.distributed job (torchrun; gloo or NCCL).

Each rank accumulates the statistics of its own shard of the data; these functions give every rank the
statistics of the union. A SecondMoment or an R2Accumulator is gathered whole from every rank (one fixed-size
float64 vector each) and the parts are merged with the accumulator's own Chan update in rank order, so every
rank computes the same result bit for bit, and it equals merging the shards' accumulators in rank order in
one process (and any other order or batching up to float64 rounding). Counts such as histograms are summed
exactly in int64.

Without an initialised process group, or with a single rank, every function returns its input unchanged, so
library code calls them unconditionally. Ranks that disagree on what they accumulate (d, center, the AIP, the
number of bins) get a BadInputError on every rank, never a hang or a silently wrong merge.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from atoms.aip import SecondMoment
from atoms.errors import BadInputError
from atoms.metrics import R2Accumulator

__all__ = [
    "agree",
    "all_reduce_counts",
    "all_reduce_moment",
    "all_reduce_r2",
    "comm_device",
    "is_distributed",
    "shard",
    "world",
]

Group = dist.ProcessGroup | None


def world(group: Group = None) -> tuple[int, int]:
    """(rank, world_size) of this process in `group`; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_distributed(group: Group = None) -> bool:
    """True inside an initialised process group of more than one rank."""
    return world(group)[1] > 1


def shard(n: int, group: Group = None) -> slice:
    """The rows this rank owns of n rows: [n r / W, n (r + 1) / W) for rank r of W, contiguous.

    Shard sizes differ by at most one and cover every row exactly once; slice(0, n) outside a process group.
    """
    rank, size = world(group)
    return slice(n * rank // size, n * (rank + 1) // size)


def comm_device(group: Group = None) -> torch.device:
    """Where collective tensors must live: the current CUDA device for a pure NCCL group, else the CPU.

    gloo, and the mixed default of init_process_group() without a backend (CPU tensors through gloo, CUDA
    ones through NCCL), take CPU tensors; the small statistics here cost nothing to move.
    """
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(vector: torch.Tensor, group: Group) -> list[torch.Tensor]:
    """Every rank's float64 vector (k,), in rank order, on the CPU; k must be the same on every rank."""
    local = vector.to(device=comm_device(group), dtype=torch.float64).contiguous()
    parts = [torch.empty_like(local) for _ in range(world(group)[1])]
    dist.all_gather(parts, local, group=group)
    return [p.cpu() for p in parts]


def agree(what: str, values: dict[str, float], fix: str, group: Group = None) -> None:
    """Raise BadInputError on every rank unless all ranks pass equal `values` (numbers); a no-op on one rank.

    The message lists every rank's values, then `fix`. Used before a collective whose tensor sizes depend on
    the values, where a mismatch would otherwise hang or merge unrelated statistics.
    """
    if not is_distributed(group):
        return
    names = list(values)
    parts = _gather(torch.tensor([float(values[k]) for k in names], dtype=torch.float64), group)
    if all(torch.equal(p, parts[0]) for p in parts):
        return
    table = "; ".join(
        f"rank {r}: " + ", ".join(f"{k} = {v:g}" for k, v in zip(names, p.tolist(), strict=True))
        for r, p in enumerate(parts)
    )
    raise BadInputError(f"ranks disagree on {what} ({table}). {fix}")


def all_reduce_moment(moment: SecondMoment, group: Group = None) -> SecondMoment:
    """The SecondMoment of every rank's samples together, identical on every rank; `moment` on one rank.

    Each rank sends (count, mean (d,), M2 (d, d)) as one float64 vector of 1 + d + d^2 numbers (2.6 MB at
    d = 576); the parts are merged in rank order with SecondMoment.merge. A rank without samples is fine.
    """
    if not isinstance(moment, SecondMoment):
        raise BadInputError(f"all_reduce_moment expects a SecondMoment, got {type(moment).__name__}.")
    if not is_distributed(group):
        return moment
    d = moment.d
    agree(
        "the SecondMoment to reduce",
        {"d": d, "center": moment.center},
        "Every rank must accumulate activations of the same layer with the same center setting.",
        group,
    )
    count, mean, m2 = moment.state()
    parts = _gather(torch.cat([torch.tensor([count], dtype=torch.float64), mean, m2.flatten()]), group)
    out = SecondMoment(d, moment.center)
    for p in parts:
        out = out.merge(
            SecondMoment.from_state(int(p[0]), p[1 : d + 1], p[d + 1 :].view(d, d), moment.center)
        )
    return out


def _aip_fingerprint(acc: R2Accumulator) -> dict[str, float]:
    """Numbers that differ between AIPs in practice: presence, d, trace and sum of the Cholesky factor."""
    if acc.aip is None:
        return {"aip": 0.0, "aip_d": 0.0, "aip_trace": 0.0, "aip_sum": 0.0}
    L = acc.aip.cholesky
    return {"aip": 1.0, "aip_d": acc.aip.d, "aip_trace": float(L.diagonal().sum()), "aip_sum": float(L.sum())}


def all_reduce_r2(acc: R2Accumulator, group: Group = None) -> R2Accumulator:
    """The R2Accumulator of every rank's samples together, identical on every rank; `acc` on one rank.

    Every rank must use the same norm (the same AIP, or none). Each sends (count, scatter, sse, mean (d,));
    the parts are merged in rank order with R2Accumulator.merge. A rank without samples is fine.
    """
    if not isinstance(acc, R2Accumulator):
        raise BadInputError(f"all_reduce_r2 expects an R2Accumulator, got {type(acc).__name__}.")
    if not is_distributed(group):
        return acc
    agree(
        "the norm of the R2Accumulator to reduce",
        _aip_fingerprint(acc),
        "Every rank must pass the same AIP (or none) to R2Accumulator.",
        group,
    )
    # A Euclidean accumulator learns d from its first batch: ranks without samples take d from the others.
    widths = {int(p[0]) for p in _gather(torch.tensor([acc.d or 0]), group)} - {0}
    if len(widths) > 1:
        raise BadInputError(
            f"ranks disagree on the activation width of the R2Accumulator (d in {sorted(widths)}). Every "
            "rank must measure activations of the same layer."
        )
    if not widths:
        return acc
    d = widths.pop()
    count, mean, scatter, sse = _r2_state(acc, d)
    parts = _gather(torch.cat([torch.tensor([count, scatter, sse], dtype=torch.float64), mean]), group)
    out = R2Accumulator(acc.aip)
    for p in parts:
        out = out.merge(R2Accumulator.from_state(int(p[0]), p[3:], float(p[1]), float(p[2]), acc.aip))
    return out


def _r2_state(acc: R2Accumulator, d: int) -> tuple[int, torch.Tensor, float, float]:
    """(count, mean (d,), scatter, sse) of an accumulator; a zero mean for one without samples."""
    count, mean, scatter, sse = acc.state()
    return count, torch.zeros(d, dtype=torch.float64) if mean is None else mean, scatter, sse


def all_reduce_counts(counts: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Every rank's integer `counts` (any shape, e.g. a histogram (bins,)) summed exactly, as int64.

    Returns `counts` itself on one rank, otherwise a new int64 tensor on counts' device. Float counts (from
    torch.histc) must be converted with .long() first: a sum of floats would not be exact.
    """
    if not isinstance(counts, torch.Tensor) or counts.is_floating_point() or counts.is_complex():
        got = counts.dtype if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise BadInputError(
            f"all_reduce_counts expects an integer tensor, got {got}; convert float histogram counts with "
            ".long() first."
        )
    if not is_distributed(group):
        return counts
    fix = "Every rank must count into the same bins (the same bins= and edges)."
    # Two rounds: the second gathers one number per dimension, so the ranks must first agree on how many.
    agree("the number of dimensions of the counts to sum", {"ndim": counts.ndim}, fix, group)
    agree("the shape of the counts to sum", {f"size[{i}]": s for i, s in enumerate(counts.shape)}, fix, group)
    total = counts.to(device=comm_device(group), dtype=torch.int64).clone()
    dist.all_reduce(total, group=group)
    return total.to(counts.device)

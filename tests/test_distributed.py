"""Tests of atoms.distributed and of distributed training: a real `torchrun --nproc-per-node 2` (gloo, CPU).

The worker (tests/distributed_worker.py) runs once for the module; every comparison is against a
single-process computation over the same data made here: one-pass statistics, an uninterrupted 1-process
training run, and resumptions across rank counts (2 -> 1 and 1 -> 2).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed_worker import (
    HIST_BINS,
    INTERRUPT_AT,
    N_ATOMS,
    TRAIN,
    D,
    Interrupt,
    histogram,
    model,
    stats_data,
    stop_at,
)

from atoms.aip import AIP, SecondMoment
from atoms.distributed import (
    agree,
    all_reduce_counts,
    all_reduce_moment,
    all_reduce_r2,
    is_distributed,
    shard,
    world,
)
from atoms.errors import BadInputError
from atoms.metrics import R2Accumulator, r2
from atoms.train import TrainConfig, latest_checkpoint, train

WORKER = Path(__file__).with_name("distributed_worker.py")
# A 2-rank run sums each gradient as g_0 / 2 + g_1 / 2 instead of over the whole batch at once: the same
# step up to float32 rounding (measured: 1.2e-7, one float32 ulp, after 12 steps here). Training on
# other batches (another shuffling seed) moves them by 2e-2, so 1e-5 separates the two with room for other
# BLAS builds.
WEIGHT_ATOL = 1e-5


def training_data() -> torch.Tensor:
    """(1024, D) float32: 3-sparse non-negative codes on N_ATOMS random atoms, as in test_train."""
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((N_ATOMS, D)) @ (np.eye(D) + 0.3 * rng.standard_normal((D, D)))
    codes = np.zeros((1024, N_ATOMS))
    for i in range(1024):
        codes[i, rng.choice(N_ATOMS, 3, replace=False)] = rng.uniform(1.0, 2.0, 3)
    return torch.tensor(codes @ atoms, dtype=torch.float32)


def run_torchrun(out: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(WORKER), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Inputs written, the 1-process references computed, the 2-rank worker run; returns what they made."""
    out = tmp_path_factory.mktemp("distributed")
    x = training_data()
    aip = AIP.fit(x)
    torch.save({"x": x}, out / "train.pt")
    aip.save(out / "aip.safetensors")
    cfg = TrainConfig(**TRAIN)
    with pytest.raises(Interrupt):
        train(model(aip), x, cfg, out / "one_cut", progress=False, callback=stop_at(INTERRUPT_AT))
    run_torchrun(out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = model(aip)
    history = train(one, x, cfg, progress=False)
    return {
        "out": out,
        "x": x,
        "aip": aip,
        "ranks": ranks,
        "one_full": (one.state_dict(), history.loss, history.final_coefficient),
    }


def assert_identical(a, b) -> None:
    """Two (state_dict, loss history, final coefficient) triples equal bit for bit."""
    for (name, p), q in zip(a[0].items(), b[0].values(), strict=True):
        assert torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q, name
    assert torch.equal(a[1], b[1]) and a[2] == b[2]


def assert_close(a, b, what: str) -> None:
    """Weights within WEIGHT_ATOL, the same loss history and coefficient to 1e-4 relative."""
    for name, p in a[0].items():
        if isinstance(p, torch.Tensor):
            err = float((p.double() - b[0][name].double()).abs().max())
            assert err < WEIGHT_ATOL, (what, name, err)
    np.testing.assert_allclose(a[1].numpy(), b[1].numpy(), rtol=1e-4, err_msg=what)
    assert a[2] == pytest.approx(b[2], rel=1e-4), what


# --- statistics ---------------------------------------------------------------------------------------------


def test_moment_of_two_ranks_equals_one_process(runs):
    x, _ = stats_data()
    for r in runs["ranks"]:
        assert r["world_size"] == 2
    # Both ranks hold the same result, bit for bit...
    for key in ("moment", "moment_center"):
        for a, b in zip(runs["ranks"][0][key], runs["ranks"][1][key], strict=True):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), key
    # ...which is one process's merge of the same shards' moments in rank order, bit for bit...
    shards = []
    for r in range(2):
        part = x[x.shape[0] * r // 2 : x.shape[0] * (r + 1) // 2]
        half = part.shape[0] // 2
        shards.append(SecondMoment(D).update(part[:half]).update(part[half:]))
    merged = shards[0].merge(shards[1])
    count, mean, m2 = runs["ranks"][0]["moment"]
    assert count == x.shape[0] == merged.count
    assert torch.equal(mean, merged.state()[1]) and torch.equal(m2, merged.state()[2])
    # ...and one float64 pass over all the data (numpy) to rounding; so is the AIP built from it.
    reduced = SecondMoment.from_state(count, mean, m2)
    flat = x.numpy()
    np.testing.assert_allclose(reduced.matrix.numpy(), flat.T @ flat / len(flat), rtol=1e-12)
    centered = SecondMoment.from_state(*runs["ranks"][1]["moment_center"], center=True)
    np.testing.assert_allclose(centered.matrix.numpy(), np.cov(flat, rowvar=False, bias=True), rtol=1e-11)
    np.testing.assert_allclose(
        AIP.from_moment(reduced).cholesky.numpy(), AIP.fit(x).cholesky.numpy(), rtol=1e-11, atol=1e-13
    )


def test_r2_and_histogram_of_two_ranks_equal_one_process(runs):
    x, x_hat = stats_data()
    for r in runs["ranks"]:
        assert r["r2_aip"] == pytest.approx(r2(x, x_hat, AIP.fit(x)), rel=1e-12)
        # Rank 1 had no samples (and no d): the reduction still gives rank 0's value everywhere.
        assert r["r2_euclid"] == pytest.approx(r2(x[: len(x) // 2], x_hat[: len(x) // 2]), rel=1e-12)
        assert torch.equal(r["histogram"], histogram(x))
        assert int(r["histogram"].sum()) == len(x)


def test_ranks_that_disagree_get_the_same_error(runs):
    expected = {
        "moment_d": r"ranks disagree on the SecondMoment to reduce \(rank 0: d = 16, center = 0; rank 1: "
        r"d = 17.*same layer with the same center setting",
        "moment_center": r"rank 0: d = 16, center = 0; rank 1: d = 16, center = 1\)",
        "bins": r"shape of the counts to sum \(rank 0: size\[0\] = 20; rank 1: size\[0\] = 21\).*same bins",
        "ndim": r"number of dimensions of the counts to sum \(rank 0: ndim = 1; rank 1: ndim = 2\)",
        "r2_aip": r"norm of the R2Accumulator.*rank 0: aip = 1.*rank 1: aip = 0.*same AIP \(or none\)",
        "train_data": r"training activations \(rank 0: rows = 512.*rank 1: rows = 576.*same \(n, d\) "
        r"activations",
    }
    for r in runs["ranks"]:
        assert set(r["errors"]) == set(expected)
        for name, pattern in expected.items():
            assert re.search(pattern, r["errors"][name]), (name, r["errors"][name])


# --- training -----------------------------------------------------------------------------------------------


def test_two_ranks_train_identically_and_like_one_process(runs):
    rank0, rank1 = runs["ranks"]
    assert_identical(rank0["two_full"], rank1["two_full"])
    assert_close(rank0["two_full"], runs["one_full"], "2 ranks vs 1 process")
    # The tolerance means something: another shuffling of the same data moves the weights far more.
    x, aip = runs["x"], runs["aip"]
    other = model(aip)
    history = train(other, x, TrainConfig(**{**TRAIN, "seed": 1}), progress=False)
    with pytest.raises(AssertionError):
        assert_close((other.state_dict(), history.loss, history.final_coefficient), runs["one_full"], "seed")


def test_resume_on_two_ranks_is_bitwise(runs):
    rank0, rank1 = runs["ranks"]
    assert_identical(rank0["two_resumed"], rank0["two_full"])
    assert_identical(rank1["two_resumed"], rank1["two_full"])


def test_resume_across_rank_counts(runs):
    out, x, aip = runs["out"], runs["x"], runs["aip"]
    # 2 -> 1: the 2-rank run interrupted after step 6 left its step-4 checkpoint; one process finishes it.
    assert latest_checkpoint(out / "two_cut").name == "step_000000004.pt"
    resumed = model(aip)
    history = train(resumed, x, TrainConfig(**TRAIN), out / "two_cut", progress=False)
    got = (resumed.state_dict(), history.loss, history.final_coefficient)
    assert_close(got, runs["ranks"][0]["two_full"], "2 -> 1 vs 2 ranks")
    assert_close(got, runs["one_full"], "2 -> 1 vs 1 process")
    # Steps 1-4 came from the 2-rank checkpoint's history, bit for bit.
    assert torch.equal(history.loss[:4], runs["ranks"][0]["two_full"][1][:4])
    # 1 -> 2: a 1-process checkpoint finished on 2 ranks (models built with another seed there).
    rank0, rank1 = runs["ranks"]
    assert_identical(rank0["one_to_two"], rank1["one_to_two"])
    assert_close(rank0["one_to_two"], runs["one_full"], "1 -> 2 vs 1 process")
    assert torch.equal(rank0["one_to_two"][1][:4], runs["one_full"][1][:4])


# --- without a process group --------------------------------------------------------------------------------


def test_no_process_group_is_a_no_op():
    x, x_hat = stats_data()
    assert world() == (0, 1) and not is_distributed()
    assert shard(10) == slice(0, 10)
    moment = SecondMoment(D).update(x)
    acc = R2Accumulator().update(x, x_hat)
    counts = histogram(x)
    assert all_reduce_moment(moment) is moment
    assert all_reduce_r2(acc) is acc
    assert all_reduce_counts(counts) is counts
    agree("anything", {"d": 3}, "no fix needed")


def test_one_rank_group_is_a_no_op():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert world() == (0, 1) and not is_distributed()
        moment = SecondMoment(D).update(stats_data()[0])
        assert all_reduce_moment(moment) is moment
        counts = torch.arange(HIST_BINS)
        assert all_reduce_counts(counts) is counts
    finally:
        dist.destroy_process_group()


def test_bad_arguments():
    with pytest.raises(BadInputError, match=r"expects a SecondMoment, got Tensor"):
        all_reduce_moment(torch.zeros(3, 3))
    with pytest.raises(BadInputError, match=r"expects an R2Accumulator, got SecondMoment"):
        all_reduce_r2(SecondMoment(3))
    with pytest.raises(BadInputError, match=r"integer tensor, got torch.float32; convert .* with .long\(\)"):
        all_reduce_counts(torch.zeros(4))


def test_second_moment_state_round_trip():
    x, _ = stats_data()
    moment = SecondMoment(D, center=True).update(x)
    count, mean, m2 = moment.state()
    copy = SecondMoment.from_state(count, mean, m2, center=True)
    assert copy.count == count and copy.center
    assert torch.equal(copy.matrix, moment.matrix)
    mean += 1  # state() hands out copies: the accumulator is unchanged
    assert torch.equal(moment.mean, copy.mean)
    with pytest.raises(
        BadInputError, match=r"mean \(d,\) and M2 \(d, d\); got count 3, mean \(4,\), M2 \(3, 3\)"
    ):
        SecondMoment.from_state(3, torch.zeros(4), torch.zeros(3, 3))
    with pytest.raises(BadInputError, match=r"int count >= 0.*got count -1"):
        SecondMoment.from_state(-1, torch.zeros(3), torch.zeros(3, 3))

"""atoms.fit (training stopped by the plateau rule, resumable) and atoms.evidence (per-seed statistics)."""

import math

import numpy as np
import pytest
import torch

from atoms.aip import AIP
from atoms.convergence import PlateauRule
from atoms.evidence import (
    angle_means,
    claim_record,
    evidence_from_record,
    q_star_quantile,
    r2_statistic,
    seed_interval,
    statistic,
)
from atoms.fit import fit_to_plateau
from atoms.intervals import Interval
from atoms.metrics import q_star, r2
from atoms.train import TrainConfig
from atoms.tsae import TSAE
from atoms.verdicts import Premise, Verdict, verdict


def data(n=600, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen).double()


def model():
    return TSAE(6, 24, dtype=torch.float64, threshold_init=0.05, seed=1)


CONFIG = TrainConfig(batch_size=100, steps=150, lr=1e-2, lr_warmup_steps=0, sparsity_warmup_steps=0)


def test_a_plateau_stops_training_before_the_step_limit():
    x = data()
    rule = PlateauRule(eval_every=10, window=4, rel_tol=0.5, min_steps=20)  # a loose rule: stops early
    fit = fit_to_plateau(model(), x[:500], x[500:], CONFIG, rule)
    assert fit.stopped_by == "plateau" and fit.convergence.converged
    assert fit.result.loss.numel() == fit.evaluations[-1].step < CONFIG.steps
    strict = PlateauRule(eval_every=10, window=4, rel_tol=0.0, min_steps=10_000)
    fit = fit_to_plateau(model(), x[:500], x[500:], CONFIG, strict)
    assert fit.stopped_by == "steps" and not fit.convergence.converged
    assert fit.convergence.reason.startswith("budget exhausted before plateau")
    assert fit.result.loss.numel() == CONFIG.steps


def test_a_deadline_stops_training_and_says_so():
    x = data()
    rule = PlateauRule(eval_every=10, window=4, rel_tol=0.0, min_steps=10_000)
    fit = fit_to_plateau(model(), x[:500], x[500:], CONFIG, rule, deadline=0.0)
    assert fit.stopped_by == "deadline" and fit.result.loss.numel() == 1
    assert not fit.convergence.converged


def test_resuming_replays_the_evaluations_and_a_finished_run_trains_no_further(tmp_path):
    x = data()
    rule = PlateauRule(eval_every=10, window=4, rel_tol=0.05, min_steps=20)
    config = TrainConfig(**{**CONFIG.__dict__, "checkpoint_every": 10})
    reference = fit_to_plateau(model(), x[:500], x[500:], config, rule)

    class Stop(Exception):
        pass

    def interrupt(stats):
        if stats.step == 25:
            raise Stop

    with pytest.raises(Stop):
        fit_to_plateau(model(), x[:500], x[500:], config, rule, checkpoint_dir=tmp_path, callback=interrupt)
    resumed_model = model()
    resumed = fit_to_plateau(resumed_model, x[:500], x[500:], config, rule, checkpoint_dir=tmp_path)
    assert resumed.evaluations == reference.evaluations
    assert resumed.stopped_by == reference.stopped_by and resumed.convergence == reference.convergence
    again_model = model()
    again = fit_to_plateau(again_model, x[:500], x[500:], config, rule, checkpoint_dir=tmp_path)
    assert again.result.loss.numel() == resumed.result.loss.numel()
    for p, q in zip(again_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_statistics_match_the_library_metrics():
    gen = torch.Generator().manual_seed(2)
    x = data(400)
    x_hat = x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    aip = AIP.fit(x)
    assert r2_statistic(x, x_hat).estimate == pytest.approx(r2(x, x_hat), rel=1e-12)
    assert r2_statistic(x, x_hat, aip).estimate == pytest.approx(r2(x, x_hat, aip), rel=1e-12)

    mu = torch.rand(300, generator=gen, dtype=torch.float64) * 0.4
    l0 = torch.randint(0, 5, (300,), generator=gen)
    rows = np.stack([mu.numpy(), l0.double().numpy()], 1)
    assert q_star_quantile(rows) == pytest.approx(q_star(mu, l0, form="quantile").value, abs=1e-12)

    vectors = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    pairs = torch.rad2deg(torch.arccos((unit @ unit.T).clamp(-1, 1)))
    off = pairs[~torch.eye(50, dtype=torch.bool)]
    assert angle_means(vectors).mean() == pytest.approx(float(off.mean()), rel=1e-12)


def test_seed_intervals_cover_the_seeds_and_round_trip_into_verdicts():
    gen = np.random.default_rng(3)
    seeds = [statistic(gen.normal(mu, 0.01, 400), np.mean, seed=i) for i, mu in enumerate((0.5, 0.52, 0.54))]
    iv = seed_interval(seeds)
    assert (
        iv.n == 3
        and iv.low < 0.52 < iv.high
        and iv.estimate == pytest.approx(np.mean([s.estimate for s in seeds]))
    )
    one = seed_interval(seeds[:1])
    assert one.n == 400 and one.low < seeds[0].estimate < one.high

    record = claim_record(
        "r2_atoms",
        Interval(0.62, 0.6, 0.64, 0.95, "test", 3),
        {"layer": 9, "norm": "aip"},
        converged=True,
        convergence_reason="flat",
        seeds=3,
        premises=[Premise("dictionary size 4d", True, "n = 4d")],
    )
    row = verdict(evidence_from_record(record))
    assert row.verdict == Verdict.FAILS and "62.00%" in row.reason and math.isclose(row.interval.low, 0.6)

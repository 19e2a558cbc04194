"""`atoms.evaluate` (issue 18, item 3): every number equals what the metrics functions give directly, on a
planted problem, on a user's own SAE class and through a DataLoader; dense codes and the time budget warn and
cap as documented; bad input raises BadInputError; results stay on the activations' device."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_device import accelerator, assert_home, here, to_here  # noqa: F401 (fixture)
from test_foreign_sae import MySAE
from test_foreign_sae import activations as foreign_activations
from torch.utils.data import DataLoader, TensorDataset

import atoms
from atoms import synth
from atoms.aip import AIP
from atoms.dictionary import Dictionary
from atoms.errors import BadInputError
from atoms.metrics import certified_fractions, per_sample_coherence, q_star, r2, to_sparse, unit_codes
from atoms.tsae import TSAE, ReLUSAE, as_sae

D, N, K = 32, 48, 2


@pytest.fixture(scope="module")
def planted() -> tuple[torch.Tensor, torch.Tensor, TSAE]:
    """Activations (300, D) of planted 2-sparse codes, the true atoms (N, D), and a TSAE under the AIP
    initialised from them (threshold 0.4 in scaled units recovers 95% of the supports exactly)."""
    atoms_true = synth.gaussian_dictionary(N, D, 0)
    codes = synth.planted_codes(300, N, K, 1.0, 1.5, True, 1)
    x = (codes.values @ atoms_true).float()
    model = TSAE(D, N, AIP.fit(x), threshold_init=0.4)
    model.init_from_atoms_(atoms_true)
    return x, atoms_true, model


def direct(model: torch.nn.Module, x: torch.Tensor, aip: AIP, keep: int) -> dict:
    """The numbers evaluate() must give, from the metrics functions called one by one."""
    sae = as_sae(model)
    with torch.no_grad():
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    dictionary = Dictionary(sae.dictionary()[0], aip)
    indices, values = to_sparse(codes)
    values = unit_codes(dictionary, values.double() / sae.input_scale, indices)
    mu, l0 = per_sample_coherence(dictionary, indices, values)
    certified = certified_fractions(dictionary, indices[:keep], values[:keep], nonneg=True, codes_of="unit")
    return {
        "r2_euclidean": r2(x, x_hat),
        "r2_aip": r2(x, x_hat, aip),
        "l0_mean": float(l0.double().mean()),
        "coherence_aip": dictionary.coherence(),
        "coherence_euclidean": Dictionary(sae.dictionary()[0]).coherence(),
        "q_star": q_star(mu, l0).value,
        "q_star_per_sample": q_star(mu, l0, form="per_sample").value,
        "certified": certified,
        "mu": mu,
        "l0": l0,
    }


def assert_matches(result: atoms.evaluation.EvalResult, expected: dict) -> None:
    for name in ("r2_euclidean", "r2_aip", "l0_mean", "coherence_aip", "coherence_euclidean"):
        assert getattr(result, name) == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name
    assert result.q_star.value == expected["q_star"]
    assert result.q_star_per_sample.value == expected["q_star_per_sample"]
    assert torch.equal(result.l0, expected["l0"]) and torch.allclose(result.mu, expected["mu"], atol=1e-12)
    ours, theirs = result.certified, expected["certified"]
    for name in (
        "n",
        "spark_lower",
        "spark_count",
        "erc_n",
        "erc_count",
        "bp_n",
        "bp_recovered",
        "bp_failed",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_planted_tsae_matches_the_metrics(planted):
    x, _, model = planted
    result = atoms.evaluate(model, x, certify_samples=100)
    assert_matches(result, direct(model, x, result.aip, 100))
    # The fitted AIP is the one the model was built on (same activations), and the true atoms are found.
    assert torch.allclose(result.aip.cholesky, model.aip.cholesky, rtol=1e-12)
    assert result.r2_aip > 0.95 and result.q_star.value > 0.9 and result.certified.bp_fraction > 0.9
    assert result.l0_quantiles[0.5] == K and result.l0_quantiles[1.0] == int(result.l0.max())
    assert result.n == 300 and result.n_dense == 0


def test_given_aip_is_used(planted):
    x, atoms_true, model = planted
    aip = AIP.from_dictionary(atoms_true)
    result = atoms.evaluate(model, x, aip, certify_samples=50)
    assert result.aip is aip
    assert_matches(result, direct(model, x, aip, 50))


def test_user_sae_class_and_a_dataloader():
    x = foreign_activations(256, seed=3)
    mine = MySAE("log_threshold")
    result = atoms.evaluate(mine, DataLoader(TensorDataset(x), batch_size=50), certify_samples=64)
    assert_matches(result, direct(mine, x, result.aip, 64))
    # The user's own forward pass gives the same R^2: no adapter artefact.
    with torch.no_grad():
        assert result.r2_euclidean == pytest.approx(r2(x, mine(x)), rel=1e-6)
    one_shot = atoms.evaluate(mine, iter(x.split(50)), result.aip, certify_samples=64)
    assert one_shot.r2_aip == pytest.approx(result.r2_aip, rel=1e-12)


def test_dense_codes_warn_and_are_left_out():
    model = ReLUSAE(8, 24, seed=1)
    with torch.no_grad():
        model.b_enc.fill_(10.0)  # every latent fires: l0 = 24 > d = 8
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"l0 > d = 8 .* every certificate fails"):
        result = atoms.evaluate(model, x, certify_samples=32)
    assert result.n_dense == 32 and result.certified is None
    assert result.l0_mean == 24 and result.q_star.value == 0.0


def test_time_budget_caps_erc_and_basis_pursuit(planted):
    x, _, model = planted
    with pytest.warns(UserWarning, match=r"would take about .* s here .* run on 0 of them.*coherence bound"):
        result = atoms.evaluate(model, x, certify_samples=100, time_budget_s=1e-9)
    certified = result.certified
    assert certified.erc_n == certified.bp_n == 0 and math.isnan(certified.erc_fraction)
    assert certified.spark_source == "given"
    assert certified.spark_lower == pytest.approx(1 + 1 / result.coherence_aip)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, x: atoms.evaluate("sae", x), "expected a TSAE"),
        (lambda m, x: atoms.evaluate(m, x[:, :5]), "the activations have d = 5 but the SAE has d = 32"),
        (lambda m, x: atoms.evaluate(m, 3), "must be a"),
        (lambda m, x: atoms.evaluate(m, []), "yielded no batches"),
        (lambda m, x: atoms.evaluate(m, iter([x])), "one-shot iterator"),
        (lambda m, x: atoms.evaluate(m, x, AIP.fit(x[:, :4])), "aip has d = 4"),
        (lambda m, x: atoms.evaluate(m, x, certify_samples=-1), "certify_samples"),
        (lambda m, x: atoms.evaluate(m, x, time_budget_s=0), "time_budget_s"),
        (lambda m, x: atoms.evaluate(m, x, nonneg="yes"), "nonneg"),
    ],
)
def test_bad_input(planted, call, match):
    x, _, model = planted
    with pytest.raises(BadInputError, match=match):
        call(model, x)


@pytest.mark.usefixtures("accelerator")
def test_results_on_the_activations_device(planted):
    x, _, model = planted
    result = atoms.evaluate(to_here(copy.deepcopy(model)), here(x), certify_samples=20)
    assert_home([result.mu, result.l0, result.certified.erc_values, result.certified.bp_rows])

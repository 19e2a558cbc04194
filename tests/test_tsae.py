"""Tests of atoms.tsae (TSAE, ReLUSAE, SAELens format) against independent float64 numpy references."""

from __future__ import annotations

import importlib.metadata
import json
import math
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

from atoms.aip import AIP
from atoms.dictionary import Dictionary
from atoms.errors import BadInputError
from atoms.tsae import MIN_THRESHOLD, TSAE, ReLUSAE, load_saelens, save_saelens


def np64(t: torch.Tensor) -> np.ndarray:
    """A model output as a float64 numpy array (outputs carry autograd graphs)."""
    return t.detach().double().numpy()


def correlated(n: int, d: int, seed: int, cond: float = 20.0) -> np.ndarray:
    """(n, d) float64 activations with a mean and a covariance of condition number about cond**2."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    mix = (q * np.logspace(0, np.log10(cond), d)) @ q.T
    return rng.standard_normal((n, d)) @ mix + rng.standard_normal(d)


def planted(d: int, n_atoms: int, k: int, n: int, seed: int, cond: float = 30.0):
    """Raw atoms (n_atoms, d) mixed by an ill-conditioned map, k-sparse codes in [1, 2], their support."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    atoms = atoms @ ((q * np.logspace(0, np.log10(cond), d)) @ q.T)
    codes = np.zeros((n, n_atoms))
    for i in range(n):
        codes[i, rng.choice(n_atoms, k, replace=False)] = rng.uniform(1.0, 2.0, k)
    return atoms, codes, codes > 0


def randomise(model, seed: int, threshold_scale: float = 0.2) -> None:
    """Give every parameter a generic value (non-zero biases, spread thresholds) for formula checks."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.rand(p.shape, generator=gen, dtype=torch.float64)
            if name == "threshold":
                p.copy_(MIN_THRESHOLD + threshold_scale * noise)
            elif name.startswith("b_"):
                p.copy_(0.1 * (noise - 0.5))
            else:
                p.add_((0.3 * (noise - 0.5)).to(p.dtype))
        model.constrain_()


def reference_forward(model, x: np.ndarray, coefficient: float) -> dict[str, np.ndarray | float]:
    """Independent float64 forward pass: scipy triangular-solve whitening, JumpReLU or ReLU, both losses."""
    p = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    s = model.input_scale
    L = model.aip.cholesky.numpy() if model.aip is not None else np.eye(model.d)
    u = s * scipy.linalg.solve_triangular(L, x.T, lower=True).T
    z = (u - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if isinstance(model, TSAE):
        on = z > p["threshold"]
        penalty = on.sum(1)
    else:
        on = z > 0
        penalty = (z * on) @ np.linalg.norm(p["W_dec"], axis=1)
    codes = z * on
    u_hat = codes @ p["W_dec"] + p["b_dec"]
    x_hat = u_hat @ L.T / s
    aip_loss = ((u - u_hat) ** 2).sum(1).mean()
    raw_loss = ((x - x_hat) ** 2).sum(1).mean() * model.raw_scale**2
    return {
        "codes": codes,
        "x_hat": x_hat,
        "z": z,
        "aip_loss": aip_loss,
        "raw_loss": raw_loss,
        "sparsity": coefficient * penalty.mean(),
        "l0": on.sum(1).mean(),
    }


@pytest.fixture(scope="module")
def data():
    x = correlated(600, 12, seed=0)
    return x, AIP.fit(x)


# --- shapes, dtypes and the forward pass against the reference ----------------------------------------------


def test_shapes_and_dtypes(data):
    x, aip = data
    model = TSAE(12, 20, aip)
    out = model(torch.tensor(x[:7], dtype=torch.float32))
    assert out.codes.shape == (7, 20) and out.codes.dtype == torch.float32
    assert out.x_hat.shape == (7, 12) and out.x_hat.dtype == torch.float32
    for t in (out.loss, out.recon_loss, out.l0_loss, out.l0):
        assert t.shape == ()
    assert model.encode(x[:6].reshape(2, 3, 12)).shape == (2, 3, 20)
    assert model.decode(torch.zeros(2, 3, 20)).shape == (2, 3, 12)
    assert model.threshold.dtype == torch.float32
    m64 = TSAE(12, 20, aip, dtype=torch.float64)
    assert m64.encode(x[:3]).dtype == torch.float64 and m64.decode(torch.zeros(1, 20)).dtype == torch.float64
    relu = ReLUSAE(12, 20)
    assert relu(x[:5]).codes.shape == (5, 20) and relu.encode(x[:5]).dtype == torch.float32


@pytest.mark.parametrize("loss_norm", ["aip", "euclidean"])
@pytest.mark.parametrize("with_aip", [True, False])
def test_tsae_forward_matches_reference(data, loss_norm, with_aip):
    x, aip = data
    model = TSAE(12, 20, aip if with_aip else None, loss_norm=loss_norm, dtype=torch.float64, seed=3)
    model.fit_input_scale(x)
    randomise(model, seed=1)
    ref = reference_forward(model, x[:64], coefficient=0.01)
    out = model(x[:64], coefficient=0.01)
    assert 0 < ref["l0"] < 20  # the thresholds cut inside the distribution: both branches are exercised
    np.testing.assert_allclose(np64(out.codes), ref["codes"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np64(out.x_hat), ref["x_hat"], rtol=1e-10, atol=1e-10)
    recon = ref["aip_loss"] if loss_norm == "aip" else ref["raw_loss"]
    assert float(out.recon_loss.detach()) == pytest.approx(recon, rel=1e-10)
    assert float(out.l0_loss.detach()) == pytest.approx(ref["sparsity"], rel=1e-6)
    assert float(out.loss.detach()) == pytest.approx(recon + ref["sparsity"], rel=1e-6)
    assert float(out.l0.detach()) == pytest.approx(ref["l0"], rel=1e-6)
    np.testing.assert_allclose(np64(model.decode(out.codes)), ref["x_hat"], rtol=1e-10, atol=1e-10)


def test_encoder_gets_row_major_whitened_rows(data):
    """The whitened batch reaches the encoder row-major: the CPU encoder works in row blocks and the Triton
    kernel loads rows, and either reads a column-major batch (what a right-hand triangular solve returns)
    as strided memory."""
    x, aip = data
    model = TSAE(12, 20, aip)
    strides = []
    encode = model._encode
    with mock.patch.object(model, "_encode", side_effect=lambda u: strides.append(u.stride()) or encode(u)):
        model(x[:64])
    assert strides == [(12, 1)]


def test_relu_forward_matches_reference(data):
    x, _ = data
    model = ReLUSAE(12, 20, l1_coefficient=0.03, dtype=torch.float64, seed=2)
    model.fit_input_scale(x)
    randomise(model, seed=4)
    ref = reference_forward(model, x[:64], coefficient=0.03)
    out = model(x[:64])
    np.testing.assert_allclose(np64(out.codes), ref["codes"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np64(out.x_hat), ref["x_hat"], rtol=1e-10, atol=1e-10)
    assert float(out.recon_loss.detach()) == pytest.approx(ref["raw_loss"], rel=1e-10)
    assert float(out.l0_loss.detach()) == pytest.approx(ref["sparsity"], rel=1e-10)


def test_threshold_gradient_is_the_jumprelu_pseudo_derivative(data):
    """d loss / d theta_j = sum_i K_ij (-(theta_j / e) dL/dcodes_ij - coefficient / (B e)), K rectangular."""
    x, aip = data
    e, coef = 0.05, 0.02
    model = TSAE(12, 20, aip, bandwidth=e, dtype=torch.float64)
    randomise(model, seed=5)
    batch = x[:200]
    out = model(batch, coefficient=coef)
    out.loss.backward()
    ref = reference_forward(model, batch, coef)
    p = {k: v.detach().double().numpy() for k, v in model.named_parameters()}
    u = model.input_scale * scipy.linalg.solve_triangular(aip.cholesky.numpy(), batch.T, lower=True).T
    u_hat = ref["codes"] @ p["W_dec"] + p["b_dec"]
    d_codes = 2 * (u_hat - u) @ p["W_dec"].T / len(batch)
    theta = p["threshold"]
    window = np.abs(ref["z"] - theta) <= e / 2
    expected = (window * (-(theta / e) * d_codes - coef / (len(batch) * e))).sum(0)
    assert window.sum() > 5
    np.testing.assert_allclose(model.threshold.grad.numpy(), expected, rtol=1e-5, atol=1e-9)


# --- coordinates, scale and dictionary ----------------------------------------------------------------------


def test_input_scale(data):
    x, aip = data
    model = TSAE(12, 20, aip)
    assert model.input_scale == pytest.approx(1 / math.sqrt(12), rel=1e-15)
    # An uncentered AIP fitted on x gives E||x~||^2 = d on x exactly: the measurement agrees with 1/sqrt(d).
    assert model.fit_input_scale(x) == pytest.approx(1 / math.sqrt(12), rel=1e-10)
    assert model.raw_scale == pytest.approx(1 / math.sqrt((x**2).sum(1).mean()), rel=1e-10)
    euclid = ReLUSAE(12, 20)
    assert euclid.input_scale == 1.0
    euclid.fit_input_scale(x)
    assert euclid.input_scale == pytest.approx(1 / math.sqrt((x**2).sum(1).mean()), rel=1e-10)


def test_dictionary_atoms_are_unit_under_the_aip(data):
    x, aip = data
    model = TSAE(12, 20, aip, dtype=torch.float64)
    randomise(model, seed=6)
    atoms, got_aip = model.dictionary()
    assert got_aip is aip and atoms.dtype == torch.float64 and atoms.shape == (20, 12)
    S = np.linalg.solve(aip.cholesky.numpy() @ aip.cholesky.numpy().T, np.eye(12))
    np.testing.assert_allclose(np.einsum("id,de,ie->i", atoms.numpy(), S, atoms.numpy()), 1.0, rtol=1e-10)
    np.testing.assert_allclose(Dictionary(atoms, aip).norms.numpy(), 1.0, rtol=1e-10)
    # x_hat = (codes / s) @ atoms + the raw decoder bias
    codes = np64(model.encode(x[:30]))
    b_raw = model.b_dec.detach().numpy() @ aip.cholesky.numpy().T / model.input_scale
    expected = codes / model.input_scale @ atoms.numpy() + b_raw
    np.testing.assert_allclose(np64(model.decode(codes)), expected, rtol=1e-10, atol=1e-10)


def test_paper_encoder_init_recovers_the_planted_support():
    """W_dec = true atoms, W_enc = W_dec^T: under the AIP, thresholded correlations read off the support."""
    d = n_atoms = 32
    atoms, codes, support = planted(d, n_atoms, k=3, n=3000, seed=0)
    x = codes @ atoms
    exact = {}
    for name, aip in (("aip", AIP.fit(x)), ("euclidean", None)):
        model = TSAE(d, n_atoms, aip, dtype=torch.float64)
        model.fit_input_scale(x)
        model.init_from_atoms_(atoms)
        whitened = aip.whiten(torch.tensor(atoms)).numpy() if aip is not None else atoms
        # Half the smallest planted coefficient (1), in the model's units.
        theta = 0.5 * model.input_scale * np.linalg.norm(whitened, axis=1)
        with torch.no_grad():
            model.threshold.copy_(torch.tensor(theta))
            got = np64(model.encode(x)) > 0
        exact[name] = (got == support).all(1).mean()
    assert exact["aip"] == 1.0
    assert exact["euclidean"] < 0.05  # the same atoms read off Euclidean-ly: the mixing map ruins the support


def test_project_and_constrain():
    model = TSAE(6, 9, threshold_init=0.01, dtype=torch.float64)
    randomise(model, seed=7)
    g = np.random.default_rng(0).standard_normal((9, 6))
    model.W_dec.grad = torch.tensor(g)
    w = model.W_dec.detach().numpy().copy()
    model.project_decoder_grad_()
    expected = g - (g * w).sum(1, keepdims=True) * w / (w * w).sum(1, keepdims=True)
    np.testing.assert_allclose(model.W_dec.grad.numpy(), expected, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        model.W_dec.mul_(3.0)
        model.threshold[:3] = -0.5
    model.constrain_()
    np.testing.assert_allclose(model.W_dec.detach().norm(dim=1).numpy(), 1.0, rtol=1e-14)
    assert float(model.threshold.detach().min()) == np.float32(MIN_THRESHOLD)


def test_negative_threshold_still_encodes_and_learns():
    """A step outside the trainer may push theta below 0: the forward uses the floor, gradients still flow."""
    model = TSAE(6, 9, bandwidth=0.5)
    with torch.no_grad():
        model.threshold.fill_(-0.1)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    out = model(x, coefficient=1.0)
    out.loss.backward()
    z = (model.input_scale * x - model.b_dec.detach()) @ model.W_enc.detach() + model.b_enc.detach()
    torch.testing.assert_close(out.codes.detach(), z * (z > MIN_THRESHOLD))
    assert float(model.threshold.grad.abs().sum()) > 0


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_inputs(data):
    x, aip = data
    model = TSAE(12, 20, aip)
    with pytest.raises(BadInputError, match=r"last dimension 11 but 12 was expected"):
        model(torch.zeros(4, 11))
    bad = torch.tensor(x[:4], dtype=torch.float32)
    bad[2, 5] = float("nan")
    with pytest.raises(BadInputError, match=r"activations holds 1 non-finite values \(1 NaN.*\(2, 5\)"):
        model(bad)
    with pytest.raises(BadInputError, match=r"activations is empty"):
        model.encode(torch.zeros(0, 12))
    with pytest.raises(BadInputError, match=r"floating dtype is required"):
        model(torch.zeros(3, 12, dtype=torch.int64))
    with pytest.raises(
        BadInputError, match=r"threshold_init must be a finite number > 0, got 0.*default is 0.001"
    ):
        TSAE(12, 20, threshold_init=0.0)
    with pytest.raises(BadInputError, match=r"threshold_init must be a finite number > 0, got -1"):
        TSAE(12, 20, threshold_init=-1)
    with pytest.raises(BadInputError, match=r"n_atoms must be an int >= 1, got 0"):
        TSAE(12, 0)
    with pytest.raises(BadInputError, match=r"d must be an int >= 1, got 2.5"):
        TSAE(2.5, 4)
    with pytest.raises(BadInputError, match=r"AIP has d = 12 but the model has d = 10"):
        TSAE(10, 20, aip)
    with pytest.raises(BadInputError, match=r"loss_norm must be 'aip' or 'euclidean', got 'l2'"):
        TSAE(12, 20, aip, loss_norm="l2")
    with pytest.raises(BadInputError, match=r"bandwidth must be a finite number > 0"):
        TSAE(12, 20, bandwidth=float("inf"))
    with pytest.raises(BadInputError, match=r"dtype must be torch.float32, .* got 'int8'"):
        TSAE(12, 20, dtype="int8")
    with pytest.raises(BadInputError, match=r"l1_coefficient must be a finite number >= 0, got -0.1"):
        ReLUSAE(12, 20, l1_coefficient=-0.1)
    with pytest.raises(BadInputError, match=r"atoms has shape \(3, 12\), the model needs \(20, 12\)"):
        model.init_from_atoms_(np.ones((3, 12)))
    zero_atoms = np.ones((20, 12))
    zero_atoms[[4, 7]] = 0
    with pytest.raises(BadInputError, match=r"atoms \[4, 7\] are zero vectors"):
        model.init_from_atoms_(zero_atoms)
    with pytest.raises(BadInputError, match=r"all zero"):
        model.fit_input_scale(np.zeros((5, 12)))


# --- SAELens format -----------------------------------------------------------------------------------------


def folded_reference(path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens's formulas (jumprelu / standard) evaluated in float64 numpy on the saved, folded weights."""
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(str(path / "sae_weights.safetensors")).items()}
    z = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    codes = np.maximum(z, 0) * (z > w.get("threshold", 0.0))
    return codes, codes @ w["W_dec"] + w["b_dec"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data):
    x, aip = data
    tsae = TSAE(12, 20, aip, seed=8)
    tsae.fit_input_scale(x)
    randomise(tsae, seed=9, threshold_scale=0.3)
    relu = ReLUSAE(12, 20, seed=10)
    relu.fit_input_scale(x)
    randomise(relu, seed=11)
    root = tmp_path_factory.mktemp("saelens")
    return {
        "tsae": (tsae, save_saelens(tsae, root / "tsae", metadata={"hook_name": "blocks.3.hook_resid_post"})),
        "relu": (relu, save_saelens(relu, root / "relu")),
    }


@pytest.mark.parametrize("kind", ["tsae", "relu"])
def test_folded_weights_compute_our_codes_on_raw_activations(saved, data, kind):
    x, _ = data
    model, path = saved[kind]
    codes, x_hat = folded_reference(path, x[:300])
    ours = np64(model.encode(x[:300]))
    z = reference_forward(model, x[:300], 0.0)["z"]
    theta = model.threshold.detach().double().numpy() if kind == "tsae" else 0.0
    clear = np.abs(z - theta) > 1e-4  # entries this close to the threshold may flip by float32 rounding
    assert clear.mean() > 0.99 and 0.05 < (codes > 0).mean() < 0.95
    np.testing.assert_allclose(codes[clear], ours[clear], rtol=1e-4, atol=1e-5)
    ours_hat = np64(model.decode(codes))
    np.testing.assert_allclose(x_hat, ours_hat, rtol=1e-4, atol=1e-4 * np.abs(x).max())
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu" if kind == "tsae" else "standard")
    assert (cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"]) == (12, 20, True)
    assert (path / "aip.safetensors").is_file() == (kind == "tsae")


@pytest.mark.parametrize("kind", ["tsae", "relu"])
def test_load_saelens_round_trip(saved, data, kind):
    x, _ = data
    model, path = saved[kind]
    back = load_saelens(path)
    assert type(back) is type(model) and back.config() == model.config()
    assert back.input_scale == model.input_scale and back.raw_scale == model.raw_scale
    if kind == "tsae":
        np.testing.assert_array_equal(back.aip.cholesky.numpy(), model.aip.cholesky.numpy())
    for (name, a), (_, b) in zip(model.named_parameters(), back.named_parameters(), strict=True):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    z = reference_forward(model, x[:200], 0.0)["z"]
    theta = model.threshold.detach().double().numpy() if kind == "tsae" else 0.0
    clear = np.abs(z - theta) > 1e-4
    np.testing.assert_allclose(
        np64(back.encode(x[:200]))[clear], np64(model.encode(x[:200]))[clear], atol=1e-4
    )


def test_load_saelens_rejects_foreign_and_tampered(saved, tmp_path):
    with pytest.raises(BadInputError, match=r"no cfg.json and sae_weights.safetensors: it is not a SAELens"):
        load_saelens(tmp_path)
    model, _ = saved["tsae"]
    path = save_saelens(model, tmp_path / "copy")
    meta = json.loads((path / "atoms_sae.json").read_text())
    meta["input_scale"] *= 2
    (path / "atoms_sae.json").write_text(json.dumps(meta))
    with pytest.raises(BadInputError, match=r"decoder rows .* are not unit-norm .* Re-save"):
        load_saelens(path)


@pytest.mark.parametrize("kind", ["tsae", "relu"])
def test_sae_lens_loads_the_directory_and_computes_our_codes(saved, data, kind):
    # sae-lens is an optional extra ("peers"): skip only when it is not installed. Installed but failing to
    # import is a failure: that is how a shadowed dependency (the repository's kernels/ over Hugging Face's
    # `kernels`) once skipped this test silently.
    try:
        importlib.metadata.distribution("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sae-lens is not installed; install the 'peers' extra (make install does it)")
    from sae_lens import SAE

    x, _ = data
    model, path = saved[kind]
    sae = SAE.load_from_disk(path)
    assert sae.cfg.architecture() == ("jumprelu" if kind == "tsae" else "standard")
    if kind == "tsae":
        assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    raw = torch.tensor(x[:300], dtype=torch.float32)
    with torch.no_grad():
        theirs = sae.encode(raw)
        theirs_hat = sae.decode(theirs)
        ours = model.encode(raw)
        ours_hat = model.decode(theirs)
    z = reference_forward(model, x[:300], 0.0)["z"]
    theta = model.threshold.detach().double().numpy() if kind == "tsae" else 0.0
    clear = torch.tensor(np.abs(z - theta) > 1e-4)
    assert clear.float().mean() > 0.99 and 0.05 < float((ours > 0).float().mean()) < 0.95
    torch.testing.assert_close(theirs[clear], ours[clear], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs_hat, ours_hat, rtol=1e-4, atol=1e-4 * float(raw.abs().max()))

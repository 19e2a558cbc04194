"""Issue 18 item 2, inside SAELens's trainer: `atoms.saelens_training` checked against sae-lens itself.

Its SAE computes sae-lens's own JumpReLU training SAE's codes, reconstructions, losses and gradients on the
same weights (with an identity AIP, under which the AIP term is sae-lens's MSE); sae-lens's SAETrainer trains
it (activations from an iterator, no model or hub); what it saves, sae-lens and `atoms.tsae.load_saelens`
read.
"""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

try:
    importlib.metadata.distribution("sae-lens")
except importlib.metadata.PackageNotFoundError:
    # As in test_tsae: skip only when the optional "peers" extra is missing; a failing import fails.
    pytest.skip("sae-lens is not installed; install the 'peers' extra", allow_module_level=True)

from sae_lens import (
    SAE,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    SAETrainer,
    TrainingSAE,
    TrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput

from atoms.aip import AIP
from atoms.errors import BadInputError
from atoms.saelens_training import ARCHITECTURE, AtomsJumpReLUTrainingSAE, AtomsJumpReLUTrainingSAEConfig
from atoms.tsae import TSAE, load_saelens

D_IN, D_SAE = 16, 48
L0_COEFFICIENT = 0.05


@pytest.fixture(scope="module")
def activations() -> torch.Tensor:
    """(4096, D_IN) sparse non-negative mixtures of anisotropic atoms, at sae-lens's scale E||x||^2 = D_IN."""
    gen = torch.Generator().manual_seed(0)
    mixing = torch.eye(D_IN) + torch.randn(D_IN, D_IN, generator=gen) / D_IN**0.5
    atoms = torch.randn(D_SAE, D_IN, generator=gen) @ mixing
    codes = torch.rand(4096, D_SAE, generator=gen) * (torch.rand(4096, D_SAE, generator=gen) < 0.1)
    x = codes @ atoms
    return x * (D_IN / x.pow(2).sum(-1).mean()).sqrt()


@pytest.fixture(scope="module")
def aip_paths(tmp_path_factory, activations) -> dict[str, str]:
    root = tmp_path_factory.mktemp("aip")
    paths = {"identity": str(root / "identity.safetensors"), "fitted": str(root / "fitted.safetensors")}
    AIP(torch.eye(D_IN, dtype=torch.float64)).save(paths["identity"])
    AIP.fit(activations).save(paths["fitted"])
    return paths


def ours(aip_path: str, **kwargs) -> AtomsJumpReLUTrainingSAE:
    cfg = AtomsJumpReLUTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, aip_path=aip_path, l0_coefficient=L0_COEFFICIENT, **kwargs
    )
    return AtomsJumpReLUTrainingSAE(cfg)


def randomised_sae_lens_jumprelu() -> JumpReLUTrainingSAE:
    """sae-lens's own JumpReLU training SAE, weights drawn so that about a third of the latents fire."""
    sae = JumpReLUTrainingSAE(
        JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l0_coefficient=L0_COEFFICIENT)
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=gen) / D_IN**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=gen))
        sae.W_dec.copy_(0.3 * torch.randn(D_SAE, D_IN, generator=gen))
        sae.threshold.copy_(0.2 + 0.6 * torch.rand(D_SAE, generator=gen))
    return sae


def step_input(x: torch.Tensor) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"l0": L0_COEFFICIENT},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )


def test_matches_sae_lens_jumprelu_on_the_same_weights(activations, aip_paths):
    theirs = randomised_sae_lens_jumprelu()
    mine = ours(aip_paths["identity"])
    mine.load_state_dict(theirs.state_dict())
    x = activations[:256]
    with torch.no_grad():
        z = (x - theirs.b_dec) @ theirs.W_enc + theirs.b_enc
    clear = (z - theirs.threshold).abs() > 1e-4  # entries this close to theta may flip by float32 rounding
    codes = mine.encode(x)
    assert clear.float().mean() > 0.99 and 0.1 < float((codes > 0).float().mean()) < 0.9
    torch.testing.assert_close(codes[clear], theirs.encode(x)[clear], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.decode(codes), theirs.decode(codes))

    # Under the identity AIP the AIP term is sae-lens's MSE, so the objective is sae-lens's, term for term.
    out_mine, out_theirs = (
        mine.training_forward_pass(step_input(x)),
        theirs.training_forward_pass(step_input(x)),
    )
    assert set(out_mine.losses) == {"mse_loss", "l0_loss", "aip_mse_loss"}
    torch.testing.assert_close(out_mine.losses["aip_mse_loss"], out_theirs.losses["mse_loss"])
    torch.testing.assert_close(out_mine.losses["l0_loss"], out_theirs.losses["l0_loss"])
    assert out_mine.losses["mse_loss"].item() == 0.0  # mse_coefficient defaults to 0
    torch.testing.assert_close(out_mine.loss, out_theirs.loss)
    out_mine.loss.backward()
    out_theirs.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in mine.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_aip_term_is_the_aip_norm_scaled_to_the_euclidean(activations, aip_paths):
    mine = ours(aip_paths["fitted"], mse_coefficient=0.5)
    x = activations[:256]
    out = mine.training_forward_pass(step_input(x))
    aip = AIP.load(aip_paths["fitted"])
    residual = (x - out.sae_out).detach().double()
    # An independent form: r^T S r with the dense S = C^{-1}, times trace(C) / d_in.
    expected = torch.einsum("bi,ij,bj->b", residual, aip.metric(), residual).mean()
    expected *= torch.trace(aip.cholesky @ aip.cholesky.T) / D_IN
    torch.testing.assert_close(out.losses["aip_mse_loss"].double(), expected, rtol=1e-4, atol=0)
    euclidean = residual.pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["mse_loss"].double(), 0.5 * euclidean, rtol=1e-5, atol=0)


def test_sae_lens_trainer_lowers_the_loss_and_the_result_loads_everywhere(activations, aip_paths, tmp_path):
    torch.manual_seed(2)  # sae-lens draws the initial weights from torch's global generator
    sae = ours(aip_paths["fitted"])
    batch, steps = 128, 60
    train, held_out = activations[:-512], activations[-512:]
    batches = (train[i % (len(train) // batch) * batch :][:batch] for i in range(steps))

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(sae.training_forward_pass(step_input(held_out)).loss)

    before = held_out_loss()
    lr = 1e-2  # constant: sae-lens's SAETrainerConfig leaves lr_end unset, which its trainer refuses
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr, lr_end=lr
    )
    trainer = SAETrainer(cfg, sae, iter(batches))
    assert trainer.fit() is sae and trainer.n_training_steps == steps
    after = held_out_loss()
    assert after < 0.6 * before, (before, after)

    # What sae-lens's runner writes at the end: a plain "jumprelu" SAE, read by sae-lens and by atoms.
    path = tmp_path / "final"
    sae.save_inference_model(path)
    assert json.loads((path / "cfg.json").read_text())["architecture"] == "jumprelu"
    x = held_out[:256]
    with torch.no_grad():
        codes = sae.encode(x)
        theirs = SAE.load_from_disk(path)
        back = load_saelens(path)
        torch.testing.assert_close(theirs.encode(x), codes)
        torch.testing.assert_close(theirs.decode(codes), sae.decode(codes))
    assert type(back) is TSAE and back.aip is None
    torch.testing.assert_close(back.encode(x), codes)
    torch.testing.assert_close(back.decode(codes), sae.decode(codes))

    # The trainer's checkpoints keep the training architecture, so sae-lens resumes them as this class.
    checkpoint = tmp_path / "checkpoint"
    sae.save_model(checkpoint)
    resumed = TrainingSAE.load_from_disk(checkpoint)
    assert type(resumed) is AtomsJumpReLUTrainingSAE and resumed.cfg.aip_path == aip_paths["fitted"]
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


def test_sae_lens_builds_it_from_its_config_through_the_registry(aip_paths):
    # The path sae-lens's LanguageModelSAETrainingRunner takes from `LanguageModelSAERunnerConfig.sae`.
    cfg = AtomsJumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, aip_path=aip_paths["fitted"])
    assert cfg.architecture() == ARCHITECTURE
    built = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.to_dict()).to_dict())
    assert type(built) is AtomsJumpReLUTrainingSAE and built.cfg == cfg


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"jumprelu_sparsity_loss_mode": "tanh"}, "jumprelu_sparsity_loss_mode = 'tanh'"),
        ({"jumprelu_ste_to_input": True}, "jumprelu_ste_to_input = True"),
        ({"pre_act_loss_coefficient": 3e-6}, "pre_act_loss_coefficient = 3e-06"),
        ({"normalize_activations": "covariance_whitening"}, "already whitens"),
        ({"mse_coefficient": -1.0}, "mse_coefficient must be a finite number >= 0"),
    ],
)
def test_bad_configs(aip_paths, change, match):
    with pytest.raises(BadInputError, match=match):
        AtomsJumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, aip_path=aip_paths["fitted"], **change)


def test_aip_of_another_layer_is_refused(tmp_path):
    path = tmp_path / "aip.safetensors"
    AIP(torch.eye(D_IN + 1, dtype=torch.float64)).save(path)
    with pytest.raises(BadInputError, match=r"has d = 17 but the SAE has d_in = 16"):
        ours(str(path))

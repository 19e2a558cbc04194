"""SAEs of one's own and of sae-lens (issue 18, item 1): `as_sae`, `save_saelens` and `load_saelens` on
plain SAELens directories, and the trainer on such modules. Each measured failure of the issue is a test here,
run as the user ran it: their own module in SAELens naming and layout, their own Adam loop, sae-lens's
files."""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_device import NotOnCPU, accelerator, assert_home, here, to_here  # noqa: F401 (fixture)
from torch import nn

from atoms.errors import BadInputError
from atoms.train import TrainConfig, TrainState, latest_checkpoint, train, train_step
from atoms.tsae import TSAE, ReLUSAE, as_sae, load_saelens, save_saelens

D, N = 16, 32
KINDS = ["threshold", "log_threshold", "relu"]


class MySAE(nn.Module):
    """A user's SAE in SAELens naming and layout: JumpReLU with a raw `threshold` or a `log_threshold`, or
    ReLU with neither. Decoder rows at norm 0.1 (sae-lens's decoder_init_norm), never normalised."""

    def __init__(self, kind: str = "threshold", seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.W_enc = nn.Parameter(torch.randn(D, N, generator=gen) / D**0.5)
        self.b_enc = nn.Parameter(0.1 * torch.randn(N, generator=gen))
        w = torch.randn(N, D, generator=gen)
        self.W_dec = nn.Parameter(0.1 * w / w.norm(dim=1, keepdim=True))
        self.b_dec = nn.Parameter(0.1 * torch.randn(D, generator=gen))
        theta = 0.2 + 0.6 * torch.rand(N, generator=gen)
        if kind == "threshold":
            self.threshold = nn.Parameter(theta)
        elif kind == "log_threshold":
            self.log_threshold = nn.Parameter(theta.log())

    def theta(self) -> torch.Tensor:
        """(N,) the JumpReLU threshold; 0 for the ReLU SAE."""
        if self.kind == "relu":
            return torch.zeros(N)
        return self.threshold if self.kind == "threshold" else self.log_threshold.exp()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pre_activations(x)
        return torch.relu(z) * (z > self.theta())

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def activations(n: int, seed: int) -> torch.Tensor:
    """(n, D) float32: 3-sparse non-negative codes in [1, 2] on N random atoms."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((N, D)) / D**0.5
    codes = np.zeros((n, N))
    for i in range(n):
        codes[i, rng.choice(N, 3, replace=False)] = rng.uniform(1.0, 2.0, 3)
    return torch.tensor(codes @ atoms, dtype=torch.float32)


def clear_of_threshold(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Entries whose pre-activation is not within float32 rounding of the threshold (those may flip)."""
    return (z - theta).abs() > 1e-4


def assert_same_codes(ours: torch.Tensor, theirs: torch.Tensor, z: torch.Tensor, theta: torch.Tensor) -> None:
    clear = clear_of_threshold(z, theta)
    assert clear.float().mean() > 0.99 and 0.05 < float((theirs > 0).float().mean()) < 0.95
    torch.testing.assert_close(ours.detach()[clear], theirs.detach()[clear], rtol=1e-5, atol=1e-6)


def needs_sae_lens() -> None:
    # As in test_tsae: skip only when the optional "peers" extra is not installed.
    try:
        importlib.metadata.distribution("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sae-lens is not installed; install the 'peers' extra (make install does it)")


# --- the adapter --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_computes_the_modules_codes_on_its_own_tensors(kind):
    mine = MySAE(kind)
    x = activations(200, seed=1)
    sae = as_sae(mine)
    assert isinstance(sae, ReLUSAE if kind == "relu" else TSAE)
    assert sae.input_scale == 1.0 and sae.aip is None
    assert sae.W_enc is mine.W_enc and sae.W_dec is mine.W_dec  # shared, not copied
    with torch.no_grad():
        assert_same_codes(sae.encode(x), mine.encode(x), mine.pre_activations(x), mine.theta())
        codes = mine.encode(x)
        torch.testing.assert_close(sae.decode(codes), mine.decode(codes))
    assert as_sae(mine) is sae  # one adapter per module...
    mine.W_dec = nn.Parameter(mine.W_dec.detach().clone())
    assert as_sae(mine) is not sae and as_sae(mine).W_dec is mine.W_dec  # ...while it holds the same tensors
    assert as_sae(sae) is sae


def test_adapter_follows_dtype_and_buffers():
    mine = MySAE("threshold").double()
    assert as_sae(mine).dtype == torch.float64
    # Weights held as buffers (not trainable) are read too, on the same memory.
    frozen = MySAE("relu")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        value = getattr(frozen, name).detach()
        delattr(frozen, name)
        frozen.register_buffer(name, value)
    sae = as_sae(frozen)
    assert sae.W_dec.data_ptr() == frozen.W_dec.data_ptr() and not sae.W_dec.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_draws_no_initialisation_of_the_modules_size(kind, monkeypatch):
    """Every shaped tensor of the adapter is the module's own: building it draws no (n, d) random matrix
    (2.4 GB of float64 at 131072 latents in d = 2304) and leaves the sizes right."""
    mine = MySAE(kind)
    drawn = []
    real_randn = torch.randn

    def randn(*args, **kwargs):
        drawn.append(args)
        return real_randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    sae = as_sae(mine)
    assert all(np.prod(shape) <= 1 for shape in drawn), drawn
    assert (sae.n_atoms, sae.d) == tuple(mine.W_dec.shape)


# --- save_saelens and load_saelens --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_saelens_of_a_module_of_ones_own(tmp_path, kind):
    """Measured: save_saelens(MySAE, dir) -> "save_saelens takes a TSAE or ReLUSAE, got MySAE"."""
    needs_sae_lens()
    from sae_lens import SAE

    mine = MySAE(kind)
    (tmp_path / "atoms_sae.json").write_text("{}")  # a stale file of an earlier save must not survive
    path = save_saelens(mine, tmp_path, metadata={"hook_name": "blocks.3.hook_resid_post"})
    assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == ("standard" if kind == "relu" else "jumprelu")
    x = activations(300, seed=2)
    theirs = SAE.load_from_disk(path)
    back = load_saelens(path)
    assert type(back) is (ReLUSAE if kind == "relu" else TSAE)  # a log_threshold is saved as its exp
    with torch.no_grad():
        z, theta = mine.pre_activations(x), mine.theta()
        for model in (theirs, back):
            assert_same_codes(model.encode(x), mine.encode(x), z, theta)
            codes = mine.encode(x)
            torch.testing.assert_close(model.decode(codes), mine.decode(codes), rtol=1e-5, atol=1e-6)


def sae_lens_directory(path, architecture: str, applies_b_dec: bool = True):
    """A SAE that sae-lens builds and writes itself, with generic weights; returns the SAE."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig

    cls, cfg_cls = (
        (JumpReLUSAE, JumpReLUSAEConfig) if architecture == "jumprelu" else (StandardSAE, StandardSAEConfig)
    )
    sae = cls(cfg_cls(d_in=D, d_sae=N, apply_b_dec_to_input=applies_b_dec))
    reference = MySAE("threshold", seed=3)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(getattr(reference, name))
    sae.save_model(path)
    return sae


@pytest.mark.parametrize(
    ("architecture", "applies_b_dec"), [("jumprelu", True), ("standard", True), ("jumprelu", False)]
)
def test_load_saelens_reads_a_sae_lens_directory(tmp_path, architecture, applies_b_dec):
    """Measured: load_saelens(plain SAELens folder) -> "has no atoms_sae.json or sae_weights.safetensors"."""
    needs_sae_lens()
    from sae_lens import SAE

    sae = sae_lens_directory(tmp_path, architecture, applies_b_dec)
    ours = load_saelens(tmp_path)
    assert type(ours) is (TSAE if architecture == "jumprelu" else ReLUSAE)
    theirs = SAE.load_from_disk(tmp_path)
    x = activations(300, seed=4)
    with torch.no_grad():
        z = theirs.process_sae_in(x) @ theirs.W_enc + theirs.b_enc
        theta = theirs.threshold if architecture == "jumprelu" else torch.zeros(N)
        expected = theirs.encode(x)
        assert_same_codes(ours.encode(x), expected, z, theta)
        torch.testing.assert_close(ours.decode(expected), theirs.decode(expected), rtol=1e-5, atol=1e-6)
        # The in-memory sae-lens SAE adapts as well, unless it skips b_dec on the input.
        if applies_b_dec:
            assert_same_codes(as_sae(sae).encode(x), expected, z, theta)
        else:
            with pytest.raises(BadInputError, match=r"apply_b_dec_to_input = False.*b_enc \+= b_dec @ W_enc"):
                as_sae(sae)


def test_load_saelens_reads_a_log_threshold(tmp_path):
    """Older sae-lens training checkpoints store log_threshold; sae-lens's training loader converts it, and so
    does ours."""
    needs_sae_lens()
    from sae_lens import TrainingSAE

    mine = MySAE("log_threshold", seed=5)
    save_file(
        {k: v.detach() for k, v in mine.state_dict().items()}, str(tmp_path / "sae_weights.safetensors")
    )
    cfg = {"architecture": "jumprelu", "d_in": D, "d_sae": N, "dtype": "float32"}  # pre-6.0: no version
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    ours, theirs = load_saelens(tmp_path), TrainingSAE.load_from_disk(tmp_path)
    x = activations(300, seed=6)
    with torch.no_grad():
        assert_same_codes(ours.encode(x), theirs.encode(x), mine.pre_activations(x), mine.theta())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"architecture": "topk"}, r"holds a SAELens 'topk' SAE.*sae_lens.SAE.load_from_disk"),
        ({"normalize_activations": "layer_norm"}, r"normalize_activations = 'layer_norm'.*fold"),
        ({"d_in": 17}, r"says d_in = 17, d_sae = 32, but the weights have d = 16, n = 32"),
    ],
)
def test_load_saelens_refuses_what_it_cannot_compute(tmp_path, change, match):
    needs_sae_lens()
    sae_lens_directory(tmp_path, "jumprelu")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(BadInputError, match=match):
        load_saelens(tmp_path)


# --- training -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_train_step_on_a_module_of_ones_own(kind):
    """Measured: TrainState.start(MySAE, cfg) -> AttributeError: no attribute 'sparsity_coefficient'."""
    mine = MySAE(kind)
    x = activations(2048, seed=7)
    with torch.no_grad():
        before = mine(x[:256])
    cfg = TrainConfig(lr=3e-3, lr_warmup_steps=0, sparsity_warmup_steps=0, bandwidth=0.05)
    optimizer = torch.optim.Adam(mine.parameters(), lr=cfg.lr, betas=(0.0, 0.999))  # the user's own
    state = TrainState.start(mine, cfg)
    # The decoder norms (0.1) were folded into the encoder: unit rows, the same reconstructions.
    torch.testing.assert_close(mine.W_dec.detach().norm(dim=1), torch.ones(N))
    with torch.no_grad():
        torch.testing.assert_close(mine(x[:256]), before, rtol=1e-5, atol=1e-5)
    assert state.coefficient == (5e-3 if kind == "relu" else 1e-3)  # the adapter's defaults
    start = {name: p.detach().clone() for name, p in mine.named_parameters()}
    stats = [train_step(mine, optimizer, x[i * 64 : (i + 1) * 64], state) for i in range(32)]
    assert state.step == 32 and state.tokens_seen == 32 * 64
    first, last = np.mean([s.loss for s in stats[:4]]), np.mean([s.loss for s in stats[-4:]])
    assert last < 0.5 * first, (first, last)
    for name, p in mine.named_parameters():
        assert not torch.equal(p.detach(), start[name]), f"{name} did not move"
    torch.testing.assert_close(mine.W_dec.detach().norm(dim=1), torch.ones(N))
    if kind != "relu":
        assert as_sae(mine).bandwidth == 0.05 and float(mine.theta().detach().min()) > 0


def test_train_runs_on_a_module_of_ones_own_and_resumes(tmp_path):
    x = activations(1024, seed=8)
    cfg = TrainConfig(lr=3e-3, batch_size=128, steps=6, lr_warmup_steps=2, checkpoint_every=2, log_every=100)
    expected = train(MySAE(), x, cfg, progress=False)

    class Stop(Exception):
        pass

    def stop_at_5(stats):
        if stats.step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(MySAE(), x, cfg, tmp_path, progress=False, callback=stop_at_5)
    assert latest_checkpoint(tmp_path).name == "step_000000004.pt"
    resumed = MySAE()
    got = train(resumed, x, cfg, tmp_path, progress=False)
    assert torch.equal(got.loss, expected.loss)
    assert as_sae(resumed).input_scale == 1.0  # fit_input_scale leaves a module of one's own on raw inputs


# --- bad input ----------------------------------------------------------------------------------------------


class NoDecoder(MySAE):
    def __init__(self) -> None:
        super().__init__()
        del self.W_dec


PARTS = r"a SAELens-style SAE needs W_enc \(d, n\), b_enc \(n,\), W_dec \(n, d\), b_dec \(d,\), and threshold"


def test_a_missing_piece_is_named(tmp_path):
    for call in (
        lambda: save_saelens(NoDecoder(), tmp_path),
        lambda: TrainState.start(NoDecoder(), TrainConfig()),
        lambda: as_sae(NoDecoder()),
    ):
        with pytest.raises(BadInputError, match=r"NoDecoder has no W_dec; " + PARTS):
            call()
    wrong = MySAE()
    wrong.b_enc = nn.Parameter(torch.zeros(N + 1))
    with pytest.raises(BadInputError, match=r"MySAE.b_enc has shape \(33,\), expected \(32,\)"):
        as_sae(wrong)
    scalar = MySAE()
    del scalar.threshold
    scalar.threshold = 0.3
    with pytest.raises(BadInputError, match=r"MySAE.threshold is float, not a floating tensor"):
        as_sae(scalar)
    mixed = MySAE()
    mixed.W_enc.data = mixed.W_enc.data.double()
    with pytest.raises(BadInputError, match=r"mix dtypes \['torch.float32', 'torch.float64'\]"):
        as_sae(mixed)
    with pytest.raises(BadInputError, match=r"expected a TSAE, ReLUSAE or an nn.Module .*got dict"):
        save_saelens({"W_enc": torch.zeros(D, N)}, tmp_path)
    with pytest.raises(BadInputError, match=r"a TSAE has its own \(TSAE\(bandwidth=...\)\)"):
        TrainState.start(TSAE(D, N), TrainConfig(bandwidth=0.05))


# --- devices ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("accelerator")
def test_adapter_answers_on_the_modules_device(kind, tmp_path):
    """With test_device's stand-in accelerator: the adapter computes, starts training, folds and saves on the
    module's device. (Stepping a JumpReLU there goes through the threshold encoder's backward, which
    test_device's own TSAE case covers.)"""
    mine = to_here(MySAE(kind))
    x = here(activations(64, seed=9))
    sae = as_sae(mine)
    assert_home([sae.encode(x), sae(x)])
    cfg = TrainConfig(lr_warmup_steps=0, sparsity_warmup_steps=0)
    state = TrainState.start(mine, cfg)
    assert isinstance(mine.W_dec, NotOnCPU) and isinstance(mine.W_enc, NotOnCPU)
    assert_home(state.tokens_since_fired)
    if kind == "relu":
        train_step(mine, torch.optim.Adam(mine.parameters()), x, state)
        assert_home([state.tokens_since_fired, *mine.parameters()])
    back = load_saelens(save_saelens(mine, tmp_path))  # saved from the device, loaded on the host
    torch.testing.assert_close(back.encode(x.cpu()), sae.encode(x).cpu(), rtol=1e-5, atol=1e-6)

"""An SAE module of one's own, in SAELens naming and layout, adapted by `as_sae` and saved by `save_saelens`.

The adapter shares the module's tensors (no copy), so its codes are the module's codes; the saved folder is a
plain SAELens one (sae_weights.safetensors, cfg.json) that sae-lens's SAE.load_from_disk and atoms'
load_saelens both read. Run: .venv/bin/python -P docs/examples/own_sae_to_saelens.py
"""

import tempfile

import torch
from torch import nn

from atoms.tsae import as_sae, load_saelens, save_saelens

D, N_ATOMS = 16, 48


class MyReLUSAE(nn.Module):
    """W_enc (d, n), b_enc (n,), W_dec (n, d), b_dec (d,) and no threshold: a standard ReLU SAE."""

    def __init__(self, d: int, n_atoms: int) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(torch.randn(d, n_atoms) / d**0.5)
        self.b_enc = nn.Parameter(torch.full((n_atoms,), -0.5))
        self.W_dec = nn.Parameter(torch.randn(n_atoms, d) / d**0.5)
        self.b_dec = nn.Parameter(torch.zeros(d))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, d) -> codes (batch, n_atoms)."""
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)


torch.manual_seed(0)
mine = MyReLUSAE(D, N_ATOMS)
x = torch.randn(512, D)
sae = as_sae(mine)  # a ReLUSAE on raw activations whose parameters are mine's own tensors
with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
    assert torch.allclose(sae.encode(x), mine.encode(x), atol=1e-5)
    save_saelens(mine, folder, metadata={"hook_name": "blocks.6.hook_resid_post"})
    loaded = load_saelens(folder)
    gap = float((loaded.encode(x) - mine.encode(x)).abs().max())
print(f"{type(sae).__name__} adapter; codes after save_saelens + load_saelens differ by {gap:.1e}")

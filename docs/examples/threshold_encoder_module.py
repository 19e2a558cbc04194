"""A JumpReLU SAE of one's own whose encoder is atoms' fused threshold encoder, trained by one's own loop.

`threshold_encode` computes codes = z * (z > theta), z = (x - b_dec) @ W_enc + b_enc, and with return_l0 the
L0 whose pseudo-gradient reaches theta (SPEC section 6): on CUDA tensors the Triton kernel, on CPU the torch
reference. Run: .venv/bin/python -P docs/examples/threshold_encoder_module.py
"""

import torch
from torch import nn

from atoms.kernels import threshold_encode
from atoms.synth import gaussian_dictionary, planted_codes

D, N_ATOMS = 32, 64


class MyJumpReLUSAE(nn.Module):
    """SAELens names and layout, so atoms.tsae.as_sae, save_saelens and atoms.evaluate take it as it is."""

    def __init__(self, d: int, n_atoms: int) -> None:
        super().__init__()
        w = torch.randn(n_atoms, d)
        self.W_dec = nn.Parameter(w / w.norm(dim=1, keepdim=True))
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(n_atoms))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.threshold = nn.Parameter(torch.full((n_atoms,), 0.1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (batch, d) -> reconstruction (batch, d) and l0 (batch,)."""
        codes, l0 = threshold_encode(
            x, self.W_enc, self.b_enc, self.threshold, b_dec=self.b_dec, bandwidth=0.05, return_l0=True
        )
        return codes @ self.W_dec + self.b_dec, l0


torch.manual_seed(0)
x = (planted_codes(2048, N_ATOMS, 3, 0.5, 1.0, True, 0).values @ gaussian_dictionary(N_ATOMS, D, 0)).float()
model = MyJumpReLUSAE(D, N_ATOMS)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.0, 0.999))
for _ in range(100):
    batch = x[torch.randint(0, x.shape[0], (256,))]
    x_hat, l0 = model(batch)
    loss = (batch - x_hat).pow(2).sum(-1).mean() + 2e-2 * l0.mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.threshold.clamp_(min=1e-6)  # the JumpReLU needs theta > 0
print(f"after 100 steps: loss {loss.item():.4f}, mean l0 {l0.detach().mean().item():.1f}")

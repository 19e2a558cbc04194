"""`train_step` inside one's own loop: a TSAE under the AIP, fed by one's own DataLoader.

TrainState.start holds what a step reads besides the model and batch (the warmed-up sparsity coefficient, the
target-L0 controller, dead-latent counters); train_step does the forward pass, the backward pass, the decoder
gradient projection, the optimizer step and the unit-norm constraint. Any module with SAELens-style weights
can take the TSAE's place. Run: .venv/bin/python -P docs/examples/own_training_loop.py
"""

from torch.utils.data import DataLoader, TensorDataset

from atoms import AIP, TSAE
from atoms.synth import gaussian_dictionary, planted_codes
from atoms.train import TrainConfig, TrainState, make_optimizer, train_step

D, N_ATOMS = 32, 64

x = (planted_codes(4096, N_ATOMS, 3, 0.5, 1.0, True, 0).values @ gaussian_dictionary(N_ATOMS, D, 0)).float()
aip = AIP.fit(x)
model = TSAE(D, N_ATOMS, aip, bandwidth=0.05, threshold_init=0.01)
model.fit_input_scale(x)  # inputs at unit mean squared norm, as the JumpReLU defaults assume
config = TrainConfig(
    lr=3e-3, lr_warmup_steps=20, sparsity_warmup_steps=20, sparsity_coefficient=0.05, target_l0=3
)
state = TrainState.start(model, config)
optimizer = make_optimizer(model, config)
loader = DataLoader(TensorDataset(x), batch_size=256, shuffle=True)
for _ in range(4):
    for (batch,) in loader:
        stats = train_step(model, optimizer, batch, state)
print(f"step {stats.step}: loss {stats.loss:.4f}, l0 {stats.l0:.1f}, dead latents {stats.dead}")

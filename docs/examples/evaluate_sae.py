"""`atoms.evaluate`: R^2 in both norms, L0, coherence, q* and the certified fractions of an SAE, in one call.

It takes a TSAE, a ReLUSAE or any module with SAELens-style weights, and a tensor or any iterable of (batch,
d) batches; it fits the AIP on the activations unless one is given, converts the codes to unit-norm-atom codes
itself, and caps the expensive certificates to `time_budget_s`, warning when it does.
Run: .venv/bin/python -P docs/examples/evaluate_sae.py
"""

from torch.utils.data import DataLoader, TensorDataset

import atoms
from atoms.synth import gaussian_dictionary, planted_codes

D, N_ATOMS = 32, 48

true_atoms = gaussian_dictionary(N_ATOMS, D, 0)
x = (planted_codes(2000, N_ATOMS, 2, 1.0, 1.5, True, 1).values @ true_atoms).float()
model = atoms.TSAE(D, N_ATOMS, atoms.AIP.fit(x), threshold_init=0.4)
model.init_from_atoms_(true_atoms)  # the paper's encoder W_enc = D^T S on the planted atoms
result = atoms.evaluate(model, DataLoader(TensorDataset(x), batch_size=500), certify_samples=200)
certified = result.certified
print(
    f"R^2 Euclidean {result.r2_euclidean:.3f}, AIP {result.r2_aip:.3f}; l0 mean {result.l0_mean:.2f}, "
    f"median {result.l0_quantiles[0.5]:.0f}; coherence AIP {result.coherence_aip:.3f}, Euclidean "
    f"{result.coherence_euclidean:.3f}; q* {result.q_star.value:.3f} (per sample "
    f"{result.q_star_per_sample.value:.3f}); certified: spark {certified.spark_fraction:.3f}, ERC "
    f"{certified.erc_fraction:.3f}, basis pursuit {certified.bp_fraction:.3f} of {certified.bp_n}"
)

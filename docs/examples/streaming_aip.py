"""The AIP of activations that never sit in memory together: `AIP.fit` on a DataLoader, or a SecondMoment fed
batch by batch.

Both accumulate the uncentered second moment in float64 (Chan's pairwise update, mergeable across batches and
processes), so either gives the AIP of all the rows, up to float64 rounding.
Run: .venv/bin/python -P docs/examples/streaming_aip.py
"""

import torch
from torch.utils.data import DataLoader, TensorDataset

from atoms import AIP, SecondMoment

D = 24
generator = torch.Generator().manual_seed(0)
mixing = torch.randn(D, D, generator=generator)
x = torch.randn(10_000, D, generator=generator) @ mixing  # correlated activations


def batches():
    """What a capture loop yields: (batch, d) activations, one batch at a time."""
    yield from x.split(1000)


from_loader = AIP.fit(DataLoader(TensorDataset(x), batch_size=512))
moment = SecondMoment(D)
for batch in batches():
    moment.update(batch)
from_moment = AIP.from_moment(moment)
whole = AIP.fit(x)
gap = max(float((a.cholesky - whole.cholesky).abs().max()) for a in (from_loader, from_moment))
print(f"{from_loader}; streamed factors differ from the one-shot one by {gap:.1e}")

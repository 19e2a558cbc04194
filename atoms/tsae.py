"""Sparse autoencoders whose atoms are unit vectors under the AIP: the TSAE and the ReLU SAE baseline.

Coordinates. A model never sees raw activations x (batch, d): it sees u = s * x~, where x~ = L^{-1} x is the
AIP-whitened activation (x itself without an AIP) and s = `input_scale` puts the inputs at unit mean squared
norm, the scale the JumpReLU defaults (threshold 0.001, bandwidth 0.001, SPEC section 6) were tuned for. Every
parameter lives in u coordinates: W_enc (d, n_atoms), b_enc (n_atoms,), W_dec (n_atoms, d) with unit-norm
rows, b_dec (d,). Reconstructions go back by x_hat = L u_hat / s.

So a unit row w of W_dec is the raw atom L w, whose AIP norm is ||L^{-1} L w|| = 1: atoms are unit-norm under
the AIP (SPEC section 3), and `dictionary()` hands them to `atoms.dictionary.Dictionary` as they are. A code
f_j contributes (f_j / s) L w_j to x_hat: codes are in units of the scaled input.

`input_scale`: with an AIP and no explicit value, s = 1/sqrt(d). An uncentered AIP without ridge fitted on the
training activations has E||x~||^2 = trace(L^{-1} C L^{-T}) = d exactly, so that is the unit-mean-square
scale; a ridge, a centered AIP or other text moves it, and `fit_input_scale` (which the trainer calls by
default) measures it. Without an AIP the default is 1 and only a measurement can be right.

Initialisation (the paper's encoder W_enc = D^T S, which in whitened coordinates is W_dec^T): W_dec rows
random unit vectors, W_enc = W_dec^T, b_enc = 0, b_dec = 0 (zero rather than the whitened mean: the atom model
m = delta @ W_dec has no offset, so any offset the data needs is learned, not assumed).

SAELens format: `save_saelens` folds the whitening and the scale into the weights, so SAELens's own
`SAE.load_from_disk` computes our codes from raw activations; `load_saelens` unfolds them, and reads any
SAELens JumpReLU or standard (ReLU) directory as sae-lens writes it.

SAEs of one's own: `as_sae(module)` adapts any module with SAELens-style weights (`SAELENS_PARTS`) without
copying them, so `save_saelens`, `atoms.train.train_step` and the model methods (encode, decode, forward,
dictionary) take such modules too.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from atoms.aip import AIP, whiten_rows
from atoms.errors import BadInputError, as_float_tensor, check_finite
from atoms.kernels.sparse_step import SparseCodes, mean_squared_error, sparse_autoencode
from atoms.kernels.sparse_triton import PaddedCodes
from atoms.kernels.threshold_encoder import threshold_encode

__all__ = [
    "SAELENS_PARTS",
    "TSAE",
    "ReLUSAE",
    "SparseAutoencoder",
    "TSAEOutput",
    "TrainingLoss",
    "as_sae",
    "load_saelens",
    "save_saelens",
]

LossNorm = Literal["aip", "euclidean"]

# Thresholds are kept at or above this (in scaled units, where codes are O(0.1)): far below any useful
# threshold, but positive, as the JumpReLU needs.
MIN_THRESHOLD = 1e-6

# SAELens reads configs without this version tag as pre-6.0 ones and renames their fields.
SAELENS_FORMAT_VERSION = "6.0.0"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
ATOMS_META = "atoms_sae.json"
AIP_FILE = "aip.safetensors"
# What `as_sae` and `load_saelens` read from an SAE of one's own or of sae-lens: SAELens's names and layout.
SAELENS_PARTS = (
    "W_enc (d, n), b_enc (n,), W_dec (n, d), b_dec (d,), and threshold or log_threshold (n,) for a JumpReLU "
    "SAE (neither for a ReLU SAE)"
)
_LINEAR_PARTS = ("W_enc", "b_enc", "W_dec", "b_dec")
# Rows whitened at once by `scale_rows`: a (block, d) float copy, bounded whatever the number of rows.
SCALE_BLOCK_ROWS = 65_536


class TSAEOutput(NamedTuple):
    """What a forward pass of `TSAE` or `ReLUSAE` returns; losses are 0-dim tensors that carry gradients."""

    x_hat: torch.Tensor
    """(batch, d) reconstruction in raw activation coordinates."""
    codes: torch.Tensor
    """(batch, n_atoms) non-negative codes, in units of the scaled input."""
    loss: torch.Tensor
    """recon_loss + l0_loss, the objective."""
    recon_loss: torch.Tensor
    """Mean over the batch of the squared reconstruction error at unit mean squared input norm: in the AIP
    norm, ||u - u_hat||^2, or with loss_norm="euclidean" in raw coordinates, ||x - x_hat||^2 * raw_scale^2."""
    l0_loss: torch.Tensor
    """The sparsity penalty: coefficient * mean L0 for the TSAE, coefficient * mean L1 for the ReLU SAE."""
    l0: torch.Tensor
    """Mean number of active latents per sample (no gradient)."""


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise BadInputError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _check_positive(name: str, value: Any, *, allow_zero: bool = False, hint: str = "") -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise BadInputError(f"{name} must be a finite number {bound}, got {value!r}.{hint}")
    return float(value)


class TrainingLoss(NamedTuple):
    """What `SparseAutoencoder.training_loss` returns."""

    loss: torch.Tensor
    recon_loss: torch.Tensor
    l0_loss: torch.Tensor
    """The sparsity term (L0 for a JumpReLU SAE, L1 for a ReLU SAE), coefficient included."""
    l0: torch.Tensor
    """() float32: mean active latents per row, detached."""
    fired: torch.Tensor
    """(n_atoms,) bool: latents active in some row."""
    rows: int
    """Rows in the batch."""
    dropped: torch.Tensor | None = None
    """(1,) int32 on the device: selected entries that did not fit in the capacity (the Triton sparse path
    with an int capacity; 0 unless some row overflowed, and then the loss and gradients miss them). None on
    the dense and torch paths, which are exact."""
    counts: torch.Tensor | None = None
    """(batch,) int32: entries each row selected (active and window), true even where a row overflowed; its
    max is the capacity the batch needed. None where `dropped` is."""


class SparseAutoencoder(nn.Module, ABC):
    """What the TSAE and the ReLU SAE share: coordinates, decoder, loss, input scale, unit-norm constraint.

    Subclasses define `_encode(u (batch, d)) -> (codes (batch, n_atoms), penalty (batch,), l0 (batch,))`,
    where penalty is the per-sample sparsity term the coefficient multiplies, and `_sparse_pass`, the same
    model on the sparse training path.
    """

    architecture: str

    def __init__(
        self,
        d: int,
        n_atoms: int,
        aip: AIP | None,
        *,
        loss_norm: LossNorm,
        sparsity_coefficient: float,
        input_scale: float | None,
        seed: int,
        dtype: torch.dtype | str,
    ) -> None:
        super().__init__()
        self.d = _check_int("d", d, 1)
        self.n_atoms = _check_int("n_atoms", n_atoms, 1)
        if aip is not None and not isinstance(aip, AIP):
            raise BadInputError(f"aip must be an atoms.aip.AIP or None, got {type(aip).__name__}.")
        if aip is not None and aip.d != self.d:
            raise BadInputError(
                f"the AIP has d = {aip.d} but the model has d = {self.d}; fit the AIP on activations of the "
                "layer the model is trained on."
            )
        if loss_norm not in ("aip", "euclidean"):
            raise BadInputError(f"loss_norm must be 'aip' or 'euclidean', got {loss_norm!r}.")
        given = dtype
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise BadInputError(
                f"dtype must be torch.float32, float64, bfloat16 or float16 (or its name), got {given!r}."
            )
        self.aip = aip
        self.loss_norm: LossNorm = loss_norm
        self.sparsity_coefficient = sparsity_coefficient
        self.seed = _check_int("seed", seed, 0)
        if input_scale is None:
            input_scale = 1.0 / math.sqrt(self.d) if aip is not None else 1.0
        self.input_scale = _check_positive("input_scale", input_scale)
        # Scale of the raw-coordinate loss, 1/sqrt(E||x||^2): for the AIP's C, E||x||^2 = ||L||_F^2.
        self.raw_scale = 1.0 / float(aip.cholesky.norm()) if aip is not None else self.input_scale
        self._factors: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

        gen = torch.Generator().manual_seed(self.seed)
        w = torch.randn(self.n_atoms, self.d, generator=gen, dtype=torch.float64)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.to(dtype))
        self.W_enc = nn.Parameter(w.T.contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(self.n_atoms, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d, dtype=dtype))

    # --- coordinates ----------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.W_dec.dtype

    @property
    def _compute_dtype(self) -> torch.dtype:
        # Triangular solves exist in float32/64 only, and half precision would lose the whitening's accuracy.
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def _cholesky(self, like: torch.Tensor) -> torch.Tensor:
        """The AIP's L (d, d) in `like`'s dtype and on its device, cached (the AIP never changes)."""
        key = (like.dtype, like.device)
        if key not in self._factors:
            self._factors[key] = self.aip.cholesky.to(dtype=like.dtype, device=like.device)
        return self._factors[key]

    def _raw_rows(self, x: torch.Tensor | np.ndarray, what: str) -> tuple[torch.Tensor, torch.Size]:
        """x (..., d) checked, as (n, d) rows in the compute dtype on the model's device; x's lead shape."""
        x = as_float_tensor(x, what, d=self.d)
        lead = x.shape[:-1]
        return x.reshape(-1, self.d).to(device=self.W_dec.device, dtype=self._compute_dtype), lead

    def _scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """u = s L^{-1} x for rows raw (n, d) in the compute dtype; returned in the parameters' dtype."""
        if self.aip is not None:
            raw = whiten_rows(raw, self._cholesky(raw))
        return (raw * self.input_scale).to(self.dtype)

    def _unscaled(self, u: torch.Tensor) -> torch.Tensor:
        """x = L u / s for rows u (n, d); in the compute dtype."""
        u = u.to(self._compute_dtype) / self.input_scale
        return u @ self._cholesky(u).T if self.aip is not None else u

    # --- the model ------------------------------------------------------------------------------------------

    @abstractmethod
    def _encode(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u (batch, d) -> codes (batch, n_atoms), sparsity penalty (batch,), active count l0 (batch,)."""

    def encode(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Codes (..., n_atoms) of raw activations x (..., d), in the parameters' dtype, on the model's device
        (x, on any device, is moved there)."""
        raw, lead = self._raw_rows(x, "activations")
        codes = self._encode(self._scaled(raw))[0]
        return codes.reshape(*lead, self.n_atoms)

    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Raw reconstruction x_hat (..., d) of codes (..., n_atoms) on the model's device; float64 only for
        float64 models."""
        codes = as_float_tensor(codes, "codes", d=self.n_atoms)
        lead = codes.shape[:-1]
        flat = codes.reshape(-1, self.n_atoms).to(device=self.W_dec.device, dtype=self.dtype)
        return self._unscaled(flat @ self.W_dec + self.b_dec).reshape(*lead, self.d)

    def forward(self, x: torch.Tensor | np.ndarray, coefficient: float | None = None) -> TSAEOutput:
        """Encode, decode and score raw activations x (..., d), flattened to (batch, d) rows, on the model's
        device (x, on any device, is moved there).

        `coefficient` multiplies the sparsity penalty; None uses the model's own (the trainer passes its
        warmed-up, possibly adapted value).
        """
        raw, _ = self._raw_rows(x, "activations")
        u = self._scaled(raw)
        codes, penalty, l0 = self._encode(u)
        u_hat = codes @ self.W_dec + self.b_dec
        x_hat = self._unscaled(u_hat)
        recon = self._recon_loss(u, u_hat, raw, x_hat)
        coef = self.sparsity_coefficient if coefficient is None else coefficient
        sparsity = coef * penalty.mean()
        return TSAEOutput(x_hat, codes, recon + sparsity, recon, sparsity, l0.detach().float().mean())

    def _recon_loss(
        self,
        u: torch.Tensor,
        u_hat: torch.Tensor,
        raw: torch.Tensor | None,
        x_hat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean squared error in the loss norm: ||u - u_hat||^2 (AIP), or ||x - x_hat||^2 on raw activations
        at the raw-loss scale (Euclidean; raw None: recovered from u). In the compute dtype."""
        dtype = self._compute_dtype
        if self.loss_norm == "aip":
            return mean_squared_error(u_hat.to(dtype), u.to(dtype))
        raw = self._unscaled(u) if raw is None else raw
        x_hat = self._unscaled(u_hat) if x_hat is None else x_hat
        return (raw - x_hat).pow(2).sum(-1).mean() * self.raw_scale**2

    def training_loss(
        self,
        x: torch.Tensor | np.ndarray,
        coefficient: float | torch.Tensor | None = None,
        *,
        sparse: bool = False,
        scaled: bool = False,
        capacity: int | None = None,
        validate: bool = True,
    ) -> TrainingLoss:
        """The loss a training step back-propagates, on rows x (batch, d), without the outputs it does not
        need (no x_hat under the AIP norm, no dense codes on the sparse path).

        coefficient: the sparsity coefficient (None: the model's own); a 0-dim tensor on the model's device
            (cast to the penalty's dtype) lets a CUDA graph change it between replays.
        sparse: after the encoder's GEMM touch only the active entries (`atoms.kernels.sparse_step`): the same
            loss and gradients as the dense path to rounding, at a fraction of its cost when L0 is small.
        scaled: x is already in model coordinates u = s L^{-1} x (`scale_rows`), in the parameters' dtype
            and on the model's device, as the trainer passes a tensor of activations it whitened once.
        capacity: entry slots a row on the sparse path's Triton kernels (`sparse_autoencode`): None sizes
            them exactly (one host sync), an int is sync-free and may overflow, which the result's `dropped`
            counts. Ignored by the dense and torch paths.
        validate: False skips the input checks, which read x back (a host sync, which a CUDA graph cannot
            hold): x must then be (batch, d) rows in the compute dtype (scaled: the parameters' dtype) on the
            model's device.
        """
        if scaled:
            u, raw = x, None
        else:
            raw = self._raw_rows(x, "activations")[0] if validate else x
            u = self._scaled(raw)
        dropped = counts = None
        if sparse:
            u_hat, penalty, l0, codes = self._sparse_pass(u, capacity)
            fired = codes.fired()
            if isinstance(codes, PaddedCodes):
                dropped, counts = codes.dropped, codes.counts
        else:
            codes, per_sample, l0 = self._encode(u)
            u_hat = codes @ self.W_dec + self.b_dec
            penalty = per_sample.mean()
            with torch.no_grad():
                fired = (codes != 0).any(dim=0)
        recon = self._recon_loss(u, u_hat, raw)
        coef = self.sparsity_coefficient if coefficient is None else coefficient
        if isinstance(coef, torch.Tensor):
            coef = coef.to(penalty.dtype)
        sparsity = coef * penalty
        l0 = l0.detach().float().mean()
        return TrainingLoss(recon + sparsity, recon, sparsity, l0, fired, u.shape[0], dropped, counts)

    @abstractmethod
    def _sparse_pass(
        self, u: torch.Tensor, capacity: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SparseCodes | PaddedCodes]:
        """u (batch, d) -> u_hat (batch, d), mean sparsity penalty (), l0 (batch,), codes, on the sparse path
        with `capacity` entry slots a row (`sparse_autoencode`)."""

    @torch.no_grad()
    def scale_rows(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Model coordinates u = s L^{-1} x (n, d) of raw rows x (n, d), in the parameters' dtype on the
        model's device: what `training_loss(..., scaled=True)` takes. Whitened in blocks, each exactly as a
        training step would whiten it."""
        raw = as_float_tensor(x, "activations", ndim_min=2, d=self.d).reshape(-1, self.d)
        out = torch.empty(raw.shape, dtype=self.dtype, device=self.W_dec.device)
        for s in range(0, raw.shape[0], SCALE_BLOCK_ROWS):
            rows = raw[s : s + SCALE_BLOCK_ROWS].to(device=self.W_dec.device, dtype=self._compute_dtype)
            out[s : s + SCALE_BLOCK_ROWS] = self._scaled(rows)
        return out

    # --- training hooks -------------------------------------------------------------------------------------

    @torch.no_grad()
    def fit_input_scale(self, activations: torch.Tensor | np.ndarray) -> float:
        """Set s = 1/sqrt(mean ||x~||^2) and the raw-loss scale from activations (n, d); returns s."""
        raw = as_float_tensor(activations, "activations", d=self.d, dtype=torch.float64).reshape(-1, self.d)
        whitened = raw
        if self.aip is not None:
            whitened = whiten_rows(raw, self.aip.cholesky.to(raw.device))
        ms_white = float(whitened.pow(2).sum(-1).mean())
        ms_raw = float(raw.pow(2).sum(-1).mean())
        if ms_white == 0 or ms_raw == 0:
            raise BadInputError(
                "the activations passed to fit_input_scale are all zero; pass a sample of real activations."
            )
        self.input_scale = 1.0 / math.sqrt(ms_white)
        self.raw_scale = 1.0 / math.sqrt(ms_raw)
        return self.input_scale

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from each W_dec row's gradient its component along the (unit) row, before an optimizer step.

        That component would only change the row's norm, which `constrain_` undoes; SAELens does the same.
        """
        g = self.W_dec.grad
        if g is not None:
            w = self.W_dec
            along = torch.linalg.vecdot(g, w) / torch.linalg.vecdot(w, w)
            g.addcmul_(w, along[:, None], value=-1)

    @torch.no_grad()
    def constrain_(self) -> None:
        """After an optimizer step: W_dec rows back to unit norm (atoms unit-norm under the AIP)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def fold_decoder_norms_(self) -> torch.Tensor:
        """Scale W_dec rows to unit norm and each latent's W_enc column and b_enc entry (and a TSAE's
        threshold) by its row's norm; returns the old norms (n_atoms,).

        Reconstructions and the sparsity penalty stay the same while each code scales by its norm (sae_lens's
        fold_W_dec_norm): what `TrainState.start` does to a decoder whose rows are not unit-norm, so that the
        trainer's unit-norm constraint does not change the model it starts from.
        """
        norms = self.W_dec.norm(dim=1)
        zero = (norms == 0).nonzero().flatten()
        if zero.numel():
            raise BadInputError(
                f"decoder rows {zero[:10].tolist()} are zero, which have no direction to normalise; give "
                "them one (e.g. random unit vectors) before training."
            )
        self.W_dec /= norms[:, None]
        self.W_enc *= norms
        self.b_enc *= norms
        return norms

    @torch.no_grad()
    def init_from_atoms_(self, atoms: torch.Tensor | np.ndarray) -> None:
        """Set W_dec to given raw atoms (n_atoms, d), normalised under the AIP, and W_enc = W_dec^T.

        This is the paper's encoder W_enc = D^T S: with true atoms it reads off the planted codes.
        """
        atoms = as_float_tensor(atoms, "atoms", ndim_min=2, d=self.d, dtype=torch.float64)
        if atoms.shape != (self.n_atoms, self.d):
            raise BadInputError(
                f"atoms has shape {tuple(atoms.shape)}, the model needs ({self.n_atoms}, {self.d}) "
                "(rows are atoms)."
            )
        w = atoms.cpu()
        if self.aip is not None:
            w = whiten_rows(w, self.aip.cholesky)
        norms = w.norm(dim=1, keepdim=True)
        zero = (norms.squeeze(1) == 0).nonzero().flatten()
        if zero.numel():
            raise BadInputError(
                f"atoms {zero[:10].tolist()} are zero vectors, which have no direction to normalise; drop "
                "them, or replace them by random unit vectors (as the model's own initialisation does)."
            )
        w = w / norms
        self.W_dec.copy_(w.to(self.W_dec))
        self.W_enc.copy_(w.T.to(self.W_enc))

    def dictionary(self) -> tuple[torch.Tensor, AIP | None]:
        """(atoms, aip): the atoms in raw coordinates (n_atoms, d) float64, unit-norm under the AIP.

        `atoms.dictionary.Dictionary(*model.dictionary())` measures their geometry. The atoms are on the CPU
        whatever the model's device: move them (`.to(device)`) to measure them on a GPU.
        """
        w = self.W_dec.detach().to(device="cpu", dtype=torch.float64)
        if self.aip is not None:
            w = w @ self.aip.cholesky.T
        return w, self.aip

    # --- state ----------------------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, float]:
        """The scales: plain floats (exact, untouched by `.to(dtype)`), carried by the state dict this way."""
        return {"input_scale": self.input_scale, "raw_scale": self.raw_scale}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.input_scale = float(state["input_scale"])
        self.raw_scale = float(state["raw_scale"])

    def _apply(self, fn, recurse: bool = True):
        self._factors = {}  # cached factors follow the device of the parameters
        return super()._apply(fn, recurse)

    def config(self) -> dict[str, Any]:
        """Constructor arguments except the AIP, JSON-able; `type(model)(**config, aip=...)` rebuilds it."""
        return {
            "d": self.d,
            "n_atoms": self.n_atoms,
            "seed": self.seed,
            "dtype": str(self.dtype).split(".")[-1],
        }


class TSAE(SparseAutoencoder):
    """JumpReLU SAE on AIP-whitened activations (SPEC section 6); aip=None gives the Euclidean TSAE.

    codes = JumpReLU_theta((u - b_dec) @ W_enc + b_enc) through the fused threshold encoder, u the scaled
    whitened input; u_hat = codes @ W_dec + b_dec. Loss = mean ||u - u_hat||^2 (AIP norm;
    loss_norm="euclidean" measures the error on raw activations instead, the paper's "Euclidean + TSAE"
    ablation) + l0_coefficient * mean L0. The L0 term's gradient reaches theta through the rectangle-kernel
    pseudo-derivative of bandwidth `bandwidth`.

    `threshold` (n_atoms,) is a raw float32 parameter (a log parameterisation freezes under Adam), kept
    >= MIN_THRESHOLD by `constrain_`; the forward pass uses max(threshold, MIN_THRESHOLD) with a
    straight-through gradient, so a model stepped outside the trainer (without `constrain_`) still encodes and
    still learns. The dtype argument sets W_enc, W_dec and the biases; float64 runs only on the torch path of
    the encoder.
    """

    architecture = "jumprelu"

    def __init__(
        self,
        d: int,
        n_atoms: int,
        aip: AIP | None = None,
        *,
        loss_norm: LossNorm = "aip",
        bandwidth: float = 0.001,
        threshold_init: float = 0.001,
        l0_coefficient: float = 1e-3,
        input_scale: float | None = None,
        seed: int = 0,
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        super().__init__(
            d,
            n_atoms,
            aip,
            loss_norm=loss_norm,
            sparsity_coefficient=_check_positive("l0_coefficient", l0_coefficient, allow_zero=True),
            input_scale=input_scale,
            seed=seed,
            dtype=dtype,
        )
        self.bandwidth = _check_positive("bandwidth", bandwidth, hint=" The JumpReLU default is 0.001.")
        self.threshold_init = _check_positive(
            "threshold_init",
            threshold_init,
            hint=" The JumpReLU default is 0.001 (thresholds must be positive).",
        )
        self.threshold = nn.Parameter(torch.full((self.n_atoms,), self.threshold_init, dtype=torch.float32))

    def _stored_threshold(self) -> torch.Tensor:
        """theta (n_atoms,) as the parameters hold it, before the MIN_THRESHOLD floor of the forward pass."""
        return self.threshold

    def _theta(self) -> torch.Tensor:
        raw = self._stored_threshold().float()
        return raw + (raw.clamp(min=MIN_THRESHOLD) - raw).detach()

    def _encode(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes, l0 = threshold_encode(
            u,
            self.W_enc,
            self.b_enc,
            self._theta(),
            b_dec=self.b_dec,
            bandwidth=self.bandwidth,
            return_l0=True,
            # theta is floored at MIN_THRESHOLD just above; the value check would read it back every step.
            validate=False,
        )
        return codes, l0, l0

    def _sparse_pass(
        self, u: torch.Tensor, capacity: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SparseCodes | PaddedCodes]:
        out = sparse_autoencode(
            u, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self._theta(), self.bandwidth, capacity
        )
        return out.u_hat, out.l0.mean(), out.l0, out.codes

    @torch.no_grad()
    def constrain_(self) -> None:
        """Unit-norm decoder rows; thresholds back to >= MIN_THRESHOLD (the stored value is the used one)."""
        super().constrain_()
        self._floor_threshold_()

    @torch.no_grad()
    def _floor_threshold_(self) -> None:
        self.threshold.clamp_(min=MIN_THRESHOLD)

    @torch.no_grad()
    def fold_decoder_norms_(self) -> torch.Tensor:
        norms = super().fold_decoder_norms_()
        self._scale_threshold_(norms)  # the pre-activations scaled by the norms: the same latents fire
        return norms

    @torch.no_grad()
    def _scale_threshold_(self, factor: torch.Tensor) -> None:
        self.threshold *= factor.to(self.threshold.dtype)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "loss_norm": self.loss_norm,
            "bandwidth": self.bandwidth,
            "threshold_init": self.threshold_init,
            "l0_coefficient": self.sparsity_coefficient,
        }

    def extra_repr(self) -> str:
        return (
            f"d={self.d}, n_atoms={self.n_atoms}, aip={self.aip is not None}, loss_norm={self.loss_norm}, "
            f"bandwidth={self.bandwidth}, l0_coefficient={self.sparsity_coefficient}"
        )


class _LogThresholdTSAE(TSAE):
    """A TSAE whose threshold parameter is log_threshold, theta = exp(log_threshold), as older sae-lens
    training SAEs (and training code modelled on them) store it. Only `as_sae` and `load_saelens` build it, to
    train or evaluate such an SAE as it is; the project's own TSAE keeps theta raw (SPEC section 6)."""

    def __init__(self, d: int, n_atoms: int, **kwargs: Any) -> None:
        super().__init__(d, n_atoms, **kwargs)
        theta = self.threshold.detach()
        del self.threshold
        self.log_threshold = nn.Parameter(theta.log())

    def _stored_threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    @torch.no_grad()
    def _floor_threshold_(self) -> None:
        self.log_threshold.clamp_(min=math.log(MIN_THRESHOLD))

    @torch.no_grad()
    def _scale_threshold_(self, factor: torch.Tensor) -> None:
        self.log_threshold += factor.log().to(self.log_threshold.dtype)


class ReLUSAE(SparseAutoencoder):
    """Standard ReLU + L1 SAE on Euclidean activations: the "features" baseline (SPEC section 5).

    codes = ReLU((u - b_dec) @ W_enc + b_enc), u = s x at unit mean squared norm; loss = mean ||u - u_hat||^2
    + l1_coefficient * mean sum_j codes_j ||W_dec_j|| (the decoder norms make the penalty invariant to
    rescaling a latent; the rows are unit-norm anyway after each trainer step).
    """

    architecture = "standard"

    def __init__(
        self,
        d: int,
        n_atoms: int,
        *,
        l1_coefficient: float = 5e-3,
        input_scale: float | None = None,
        seed: int = 0,
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        super().__init__(
            d,
            n_atoms,
            None,
            loss_norm="euclidean",
            sparsity_coefficient=_check_positive("l1_coefficient", l1_coefficient, allow_zero=True),
            input_scale=input_scale,
            seed=seed,
            dtype=dtype,
        )

    def _encode(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = torch.relu(torch.addmm(self.b_enc, u - self.b_dec, self.W_enc))
        penalty = codes @ self.W_dec.norm(dim=1)
        return codes, penalty, (codes > 0).sum(-1)

    def _sparse_pass(
        self, u: torch.Tensor, capacity: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SparseCodes | PaddedCodes]:
        out = sparse_autoencode(u, self.W_enc, self.b_enc, self.W_dec, self.b_dec, capacity=capacity)
        penalty = self.W_dec.norm(dim=1) @ out.column_sums / u.shape[0]
        return out.u_hat, penalty, out.l0, out.codes

    def config(self) -> dict[str, Any]:
        return {**super().config(), "l1_coefficient": self.sparsity_coefficient}

    def extra_repr(self) -> str:
        return f"d={self.d}, n_atoms={self.n_atoms}, l1_coefficient={self.sparsity_coefficient}"


# ------------------------------------------------------------------------------------------------------------
# SAEs of one's own: SAELens naming and layout
# ------------------------------------------------------------------------------------------------------------


def _check_saelens_weights(
    found: dict[str, Any], owner: str, *, require_threshold: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a SAELens-style SAE, checked, by name: W_enc (d, n), b_enc (n,), W_dec (n, d), b_dec
    (d,) in one floating dtype, and threshold or log_threshold (n,) if present, all finite and on one device.

    `found` maps names to what the SAE holds (None where it holds nothing). Where both thresholds exist,
    log_threshold is the parameter (older sae-lens training SAEs derive threshold from it).
    """
    threshold = "log_threshold" if found.get("log_threshold") is not None else "threshold"
    with_threshold = require_threshold or found.get(threshold) is not None
    names = (*_LINEAR_PARTS, threshold) if with_threshold else _LINEAR_PARTS
    weights: dict[str, torch.Tensor] = {}
    for name in names:
        value = found.get(name)
        if value is None:
            raise BadInputError(f"{owner} has no {name}; a SAELens-style SAE needs {SAELENS_PARTS}.")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            what = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise BadInputError(
                f"{owner}.{name} is {what}, not a floating tensor; a SAELens-style SAE needs {SAELENS_PARTS}."
            )
        weights[name] = value
    d, n = weights["W_enc"].shape if weights["W_enc"].ndim == 2 else ("d", "n")
    shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), threshold: (n,)}
    for name, value in weights.items():
        if tuple(value.shape) != shapes[name]:
            raise BadInputError(
                f"{owner}.{name} has shape {tuple(value.shape)}, expected {shapes[name]} (W_enc is "
                f"{tuple(weights['W_enc'].shape)}); a SAELens-style SAE needs {SAELENS_PARTS}."
            )
        check_finite(value.detach(), f"{owner}.{name}")
    dtypes = {str(weights[name].dtype) for name in _LINEAR_PARTS}
    devices = {str(value.device) for value in weights.values()}
    if len(dtypes) > 1 or len(devices) > 1:
        raise BadInputError(
            f"{owner}'s weights mix dtypes {sorted(dtypes)} or devices {sorted(devices)}; W_enc, b_enc, "
            "W_dec and b_dec need one dtype, and every weight one device: move them with "
            "module.to(dtype=..., device=...)."
        )
    return weights


def _applies_b_dec(cfg: Any, owner: str) -> bool:
    """SAELens's apply_b_dec_to_input of a config (a cfg.json dict, an SAE's cfg object, or None: True), after
    checking that the SAE normalises no input, which atoms does not apply."""
    get = cfg.get if isinstance(cfg, dict) else lambda key, default: getattr(cfg, key, default)
    normalise = get("normalize_activations", "none")
    if normalise not in ("none", None, False):
        raise BadInputError(
            f"{owner} normalises its input activations (normalize_activations = {normalise!r}), which atoms "
            "does not apply. Fold a constant scaling into the weights first (sae_lens: "
            "sae.fold_activation_norm_scaling_factor(factor)) and set normalize_activations to 'none'."
        )
    return bool(get("apply_b_dec_to_input", True))


def _wrap(weights: dict[str, torch.Tensor]) -> SparseAutoencoder:
    """A model in raw coordinates (no AIP, input scale 1) whose parameters are `weights` themselves, checked
    by `_check_saelens_weights`: a TSAE with a threshold (raw or log), a ReLUSAE without.

    nn.Parameters are shared, not copied, so an optimizer over their owner's parameters steps the model; plain
    tensors (buffers) become parameters on the same memory, without gradients.
    """
    n, d = weights["W_dec"].shape
    cls = _LogThresholdTSAE if "log_threshold" in weights else TSAE if "threshold" in weights else ReLUSAE
    # Built at 1 x 1, then sized: every shaped tensor is replaced below, so drawing the (n, d) random
    # initialisation would only cost time and memory (2.4 GB of float64 for 131072 latents at d = 2304).
    model = cls(1, 1, input_scale=1.0, dtype=weights["W_dec"].dtype)
    model.d, model.n_atoms = d, n
    for name, value in weights.items():
        shared = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        setattr(model, name, shared)
    return model


# Adapters of modules of one's own, per module: built once, rebuilt only if the module's tensors are replaced.
_ADAPTERS: weakref.WeakKeyDictionary[nn.Module, tuple[dict[str, Any], SparseAutoencoder]] = (
    weakref.WeakKeyDictionary()
)
_SAELENS_NAMES = (*_LINEAR_PARTS, "threshold", "log_threshold")


def as_sae(module: nn.Module) -> SparseAutoencoder:
    """The SAE that atoms computes with for `module`: itself if it is a TSAE or ReLUSAE, else an adapter.

    A module of one's own qualifies by exposing SAELens's names and layout (`SAELENS_PARTS`): W_enc (d, n),
    b_enc (n,), W_dec (n, d), b_dec (d,), and threshold or log_threshold (n,) for a JumpReLU SAE (codes =
    z * (z > theta) with z = (x - b_dec) @ W_enc + b_enc), neither for a ReLU SAE (codes = relu(z));
    decoding is codes @ W_dec + b_dec. A sae_lens SAE qualifies too, unless its cfg normalises activations;
    one with apply_b_dec_to_input = False must fold b_dec @ W_enc into b_enc first.

    The adapter is a TSAE (or ReLUSAE) on raw activations (no AIP, input scale 1) whose parameters are the
    module's own tensors, shared rather than copied: encode, decode and forward compute the module's codes and
    reconstructions (thresholds below MIN_THRESHOLD act as MIN_THRESHOLD), dictionary() returns its W_dec rows
    at their norms, an optimizer over the module's parameters steps it, and `atoms.train.train_step` and
    `save_saelens` go through it.
    Its sparsity coefficient and bandwidth are the TSAE's defaults (1e-3 for the L0, 0.001) or the ReLU
    SAE's (5e-3 for the L1), which TrainConfig.sparsity_coefficient and TrainConfig.bandwidth replace. Calls
    on the same module return the same adapter while the module holds the same tensors.

    A module lacking a piece raises BadInputError naming it.
    """
    if isinstance(module, SparseAutoencoder):
        return module
    if not isinstance(module, nn.Module):
        raise BadInputError(
            f"expected a TSAE, ReLUSAE or an nn.Module with SAELens-style weights ({SAELENS_PARTS}); got "
            f"{type(module).__name__}."
        )
    found = {name: getattr(module, name, None) for name in _SAELENS_NAMES}
    known = _ADAPTERS.get(module)
    if known is not None and all(found[name] is value for name, value in known[0].items()):
        return known[1]
    owner = type(module).__name__
    if not _applies_b_dec(getattr(module, "cfg", None), owner):
        raise BadInputError(
            f"{owner} does not subtract b_dec from its input (cfg.apply_b_dec_to_input = False), as atoms "
            "does (SAELens's default). Fold it into the encoder bias first: b_enc += b_dec @ W_enc, then set "
            "apply_b_dec_to_input = True."
        )
    adapter = _wrap(_check_saelens_weights(found, owner))
    _ADAPTERS[module] = (found, adapter)
    return adapter


# ------------------------------------------------------------------------------------------------------------
# SAELens format
# ------------------------------------------------------------------------------------------------------------

_CLASSES: dict[str, type[SparseAutoencoder]] = {"TSAE": TSAE, "ReLUSAE": ReLUSAE}


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary sibling and os.replace: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))


def save_saelens(model: nn.Module, path: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` as a SAELens directory that gives the same codes and reconstructions on RAW activations.

    Files: sae_weights.safetensors and cfg.json (architecture "jumprelu" for a TSAE, "standard" for a ReLUSAE;
    `metadata` such as model_name and hook_name goes into cfg.json's metadata), aip.safetensors (the AIP, when
    the model has one) and atoms_sae.json (our constructor arguments and scales, for `load_saelens`).

    `model` may also be a module of one's own with SAELens-style weights (`as_sae`): its directory is a plain
    SAELens one, its weights as they are (a log_threshold written as threshold = exp(log_threshold)), without
    atoms_sae.json; `load_saelens` reads it back as a TSAE or ReLUSAE on raw activations.

    Folding: the model computes u = s x L^{-T}, z = (u - b_dec) @ W_enc + b_enc and x_hat = (codes @ W_dec +
    b_dec) L^T / s. With M = s L^{-T} that is z = (x - b_dec L^T / s) @ (M W_enc) + b_enc, SAELens's own
    formula with W_enc' = s L^{-T} W_enc (a triangular solve), b_dec' = b_dec L^T / s, W_dec' = W_dec L^T / s,
    b_enc and threshold unchanged (SAELens also keeps z > threshold, strictly). Folding runs in float64; the
    weights are stored in float32 (float64 for a float64 model).
    """
    own = isinstance(model, SparseAutoencoder)
    model = as_sae(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not own:
        # A stale atoms_sae.json from an earlier save here would make load_saelens unfold these weights.
        (path / ATOMS_META).unlink(missing_ok=True)
    out_dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    s = model.input_scale
    p = {k: v.detach().to(device="cpu", dtype=torch.float64) for k, v in model.named_parameters()}
    W_enc, W_dec, b_dec = p["W_enc"], p["W_dec"], p["b_dec"]
    if model.aip is not None:
        L = model.aip.cholesky
        W_enc = torch.linalg.solve_triangular(L.T, W_enc, upper=True)
        W_dec, b_dec = W_dec @ L.T, b_dec @ L.T
    weights = {"W_enc": W_enc * s, "W_dec": W_dec / s, "b_dec": b_dec / s, "b_enc": p["b_enc"]}
    if isinstance(model, TSAE):
        weights["threshold"] = model._stored_threshold().detach().to(device="cpu", dtype=torch.float64)
    weights = {k: v.to(out_dtype).contiguous() for k, v in weights.items()}
    _atomic_write(path / SAELENS_WEIGHTS, lambda f: save_file(weights, str(f)))

    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": SAELENS_FORMAT_VERSION}
    meta.update(metadata or {})
    cfg = {
        "architecture": model.architecture,
        "d_in": model.d,
        "d_sae": model.n_atoms,
        "dtype": str(out_dtype).split(".")[-1],
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    _write_json(path / SAELENS_CFG, cfg)
    if model.aip is not None:
        _atomic_write(path / AIP_FILE, model.aip.save)
    if not own:
        return path
    ours = {
        "format": "atoms.sae",
        "version": 1,
        "class": type(model).__name__,
        "config": model.config(),
        "input_scale": model.input_scale,
        "raw_scale": model.raw_scale,
        "has_aip": model.aip is not None,
    }
    _write_json(path / ATOMS_META, ours)
    return path


def load_saelens(path: str | Path) -> SparseAutoencoder:
    """Read a SAELens directory into a TSAE or ReLUSAE.

    A directory `save_saelens` wrote for a TSAE or ReLUSAE (it holds atoms_sae.json) comes back as that
    model, whitening unfolded: W_enc = L^T W_enc' / s, W_dec = s W_dec' L^{-T} and b_dec = s b_dec' L^{-T}
    (triangular solves), with L from aip.safetensors; values agree with the saved model to float32 rounding
    times the AIP's condition number.

    Any other SAELens "jumprelu" or "standard" directory (cfg.json and sae_weights.safetensors as sae-lens
    writes them, threshold or log_threshold) comes back as a TSAE or ReLUSAE on raw activations (no AIP, input
    scale 1) computing sae-lens's codes and reconstructions, its weights in their stored dtype (threshold in
    float32) and its decoder rows at their norms; apply_b_dec_to_input = False is folded into b_enc. Train it
    further with TrainConfig(fit_input_scale=False), which keeps it on raw activations.
    """
    path = Path(path)
    if (path / ATOMS_META).is_file():
        return _load_ours(path)
    if (path / SAELENS_CFG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return _load_saelens_directory(path)
    raise BadInputError(
        f"{path} has no {SAELENS_CFG} and {SAELENS_WEIGHTS}: it is not a SAELens directory. Pass the "
        "directory that sae_lens's SAE.save_model or atoms.tsae.save_saelens wrote."
    )


def _read_weights(path: Path, fix: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / SAELENS_WEIGHTS))
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise BadInputError(
            f"{path / SAELENS_WEIGHTS} is unreadable ({type(e).__name__}: {e}); it was damaged after saving. "
            f"{fix}"
        ) from e


def _load_saelens_directory(path: Path) -> SparseAutoencoder:
    """A SAELens jumprelu or standard directory without atoms_sae.json, as `load_saelens` describes."""
    fix = "Re-save the SAE with sae_lens (SAE.save_model)."
    try:
        cfg = json.loads((path / SAELENS_CFG).read_text())
    except ValueError as e:
        raise BadInputError(f"{path / SAELENS_CFG} is not valid JSON ({e}). {fix}") from e
    if not isinstance(cfg, dict):
        raise BadInputError(f"{path / SAELENS_CFG} holds {type(cfg).__name__}, not a SAELens config. {fix}")
    # sae-lens reads a config without an architecture (before 6.0) as a standard SAE.
    architecture = cfg.get("architecture", "standard")
    if architecture not in ("jumprelu", "standard"):
        raise BadInputError(
            f"{path} holds a SAELens {architecture!r} SAE; load_saelens reads 'jumprelu' and 'standard' "
            "ones. Load it with sae_lens.SAE.load_from_disk instead."
        )
    applies_b_dec = _applies_b_dec(cfg, str(path))
    loaded = _read_weights(path, fix)
    jumprelu = architecture == "jumprelu"
    extra = sorted(set(loaded) - {*_LINEAR_PARTS, *(("threshold", "log_threshold") if jumprelu else ())})
    if extra:
        raise BadInputError(
            f"{path / SAELENS_WEIGHTS} holds {extra} besides the weights of a SAELens {architecture} SAE "
            f"({SAELENS_PARTS}). Load it with sae_lens.SAE.load_from_disk instead."
        )
    weights = _check_saelens_weights(loaded, str(path / SAELENS_WEIGHTS), require_threshold=jumprelu)
    n, d = weights["W_dec"].shape
    if (cfg.get("d_in"), cfg.get("d_sae")) != (d, n):
        raise BadInputError(
            f"{path / SAELENS_CFG} says d_in = {cfg.get('d_in')}, d_sae = {cfg.get('d_sae')}, but the "
            f"weights have d = {d}, n = {n}. {fix}"
        )
    if not applies_b_dec:
        # SAELens then encodes x @ W_enc + b_enc, which is (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc).
        W_enc, b_dec = weights["W_enc"].double(), weights["b_dec"].double()
        weights["b_enc"] = (weights["b_enc"].double() + b_dec @ W_enc).to(weights["b_enc"].dtype)
    for name in ("threshold", "log_threshold"):
        if name in weights:
            weights[name] = weights[name].float()
    return _wrap({name: nn.Parameter(value) for name, value in weights.items()})


def _load_ours(path: Path) -> SparseAutoencoder:
    """A directory `save_saelens` wrote for a TSAE or ReLUSAE, as `load_saelens` describes."""
    meta_path = path / ATOMS_META
    try:
        meta = json.loads(meta_path.read_text())
        cls = _CLASSES[meta["class"]]
        config, s, has_aip = dict(meta["config"]), float(meta["input_scale"]), bool(meta["has_aip"])
    except (KeyError, ValueError, TypeError) as e:
        raise BadInputError(f"{meta_path} is unreadable or incomplete ({e!r}); re-save the model.") from e
    try:
        aip = AIP.load(path / AIP_FILE) if has_aip else None
    except BadInputError as e:
        raise BadInputError(
            f"the AIP saved with the model in {path} is unreadable ({e}); re-save the model with "
            "save_saelens."
        ) from e
    if cls is TSAE:
        model = cls(aip=aip, **config)
    else:
        model = cls(**config)
    model.input_scale, model.raw_scale = s, float(meta["raw_scale"])
    loaded = _read_weights(path, "Re-save the model with save_saelens.")
    expected = {"W_enc", "W_dec", "b_dec", "b_enc", *(("threshold",) if cls is TSAE else ())}
    if set(loaded) != expected:
        raise BadInputError(
            f"{path / SAELENS_WEIGHTS} holds tensors {sorted(loaded)}, not {sorted(expected)} of a "
            f"{cls.__name__}; re-save the model with save_saelens."
        )
    w = {k: v.to(torch.float64) for k, v in loaded.items()}
    W_enc, W_dec, b_dec = w["W_enc"] / s, w["W_dec"] * s, w["b_dec"] * s
    if aip is not None:
        L = aip.cholesky
        W_enc = L.T @ W_enc
        W_dec = whiten_rows(W_dec, L)
        b_dec = whiten_rows(b_dec[None], L)[0]
    unfolded = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec, "b_enc": w["b_enc"]}
    if cls is TSAE:
        unfolded["threshold"] = w["threshold"]
    with torch.no_grad():
        for name, value in unfolded.items():
            getattr(model, name).copy_(value)
    off = float((model.W_dec.detach().double().norm(dim=1) - 1).abs().max())
    if off > 1e-3:
        raise BadInputError(
            f"the unfolded decoder rows of {path} are not unit-norm (max deviation {off:.3g}): the weights, "
            "the AIP or the input scale were changed after saving. Re-save the model with save_saelens."
        )
    return model

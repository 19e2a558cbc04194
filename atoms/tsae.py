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
`SAE.load_from_disk` computes our codes from raw activations; `load_saelens` unfolds them.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from atoms.aip import AIP, whiten_rows
from atoms.errors import BadInputError, as_float_tensor
from atoms.kernels.threshold_encoder import threshold_encode

__all__ = ["TSAE", "ReLUSAE", "SparseAutoencoder", "TSAEOutput", "load_saelens", "save_saelens"]

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


class SparseAutoencoder(nn.Module, ABC):
    """What the TSAE and the ReLU SAE share: coordinates, decoder, loss, input scale, unit-norm constraint.

    Subclasses define `_encode(u (batch, d)) -> (codes (batch, n_atoms), penalty (batch,), l0 (batch,))`,
    where penalty is the per-sample sparsity term the coefficient multiplies.
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
        """Codes (..., n_atoms) of raw activations x (..., d), in the parameters' dtype."""
        raw, lead = self._raw_rows(x, "activations")
        codes = self._encode(self._scaled(raw))[0]
        return codes.reshape(*lead, self.n_atoms)

    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Raw reconstruction x_hat (..., d) of codes (..., n_atoms); float64 only for float64 models."""
        codes = as_float_tensor(codes, "codes", d=self.n_atoms)
        lead = codes.shape[:-1]
        flat = codes.reshape(-1, self.n_atoms).to(device=self.W_dec.device, dtype=self.dtype)
        return self._unscaled(flat @ self.W_dec + self.b_dec).reshape(*lead, self.d)

    def forward(self, x: torch.Tensor | np.ndarray, coefficient: float | None = None) -> TSAEOutput:
        """Encode, decode and score raw activations x (..., d), flattened to (batch, d) rows.

        `coefficient` multiplies the sparsity penalty; None uses the model's own (the trainer passes its
        warmed-up, possibly adapted value).
        """
        raw, _ = self._raw_rows(x, "activations")
        u = self._scaled(raw)
        codes, penalty, l0 = self._encode(u)
        u_hat = codes @ self.W_dec + self.b_dec
        x_hat = self._unscaled(u_hat)
        if self.loss_norm == "aip":
            recon = (u.to(x_hat.dtype) - u_hat.to(x_hat.dtype)).pow(2).sum(-1).mean()
        else:
            recon = (raw - x_hat).pow(2).sum(-1).mean() * self.raw_scale**2
        coef = self.sparsity_coefficient if coefficient is None else coefficient
        sparsity = coef * penalty.mean()
        return TSAEOutput(x_hat, codes, recon + sparsity, recon, sparsity, l0.detach().float().mean())

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
            g -= (g * w).sum(dim=1, keepdim=True) * w / w.pow(2).sum(dim=1, keepdim=True)

    @torch.no_grad()
    def constrain_(self) -> None:
        """After an optimizer step: W_dec rows back to unit norm (atoms unit-norm under the AIP)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

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

        `atoms.dictionary.Dictionary(*model.dictionary())` measures their geometry.
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

    def _theta(self) -> torch.Tensor:
        raw = self.threshold.float()
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
        )
        return codes, l0, l0

    @torch.no_grad()
    def constrain_(self) -> None:
        """Unit-norm decoder rows; thresholds back to >= MIN_THRESHOLD (the stored value is the used one)."""
        super().constrain_()
        self.threshold.clamp_(min=MIN_THRESHOLD)

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

    def config(self) -> dict[str, Any]:
        return {**super().config(), "l1_coefficient": self.sparsity_coefficient}

    def extra_repr(self) -> str:
        return f"d={self.d}, n_atoms={self.n_atoms}, l1_coefficient={self.sparsity_coefficient}"


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


def save_saelens(
    model: SparseAutoencoder, path: str | Path, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write `model` as a SAELens directory that gives the same codes and reconstructions on RAW activations.

    Files: sae_weights.safetensors and cfg.json (architecture "jumprelu" for a TSAE, "standard" for a ReLUSAE;
    `metadata` such as model_name and hook_name goes into cfg.json's metadata), aip.safetensors (the AIP, when
    the model has one) and atoms_sae.json (our constructor arguments and scales, for `load_saelens`).

    Folding: the model computes u = s x L^{-T}, z = (u - b_dec) @ W_enc + b_enc and x_hat = (codes @ W_dec +
    b_dec) L^T / s. With M = s L^{-T} that is z = (x - b_dec L^T / s) @ (M W_enc) + b_enc, SAELens's own
    formula with W_enc' = s L^{-T} W_enc (a triangular solve), b_dec' = b_dec L^T / s, W_dec' = W_dec L^T / s,
    b_enc and threshold unchanged (SAELens also keeps z > threshold, strictly). Folding runs in float64; the
    weights are stored in float32 (float64 for a float64 model).
    """
    if not isinstance(model, SparseAutoencoder):
        raise BadInputError(f"save_saelens takes a TSAE or ReLUSAE, got {type(model).__name__}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
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
        weights["threshold"] = p["threshold"]
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
    """Read a directory written by `save_saelens` back into a TSAE or ReLUSAE, unfolding the whitening.

    W_enc = L^T W_enc' / s, W_dec = s W_dec' L^{-T} and b_dec = s b_dec' L^{-T} (triangular solves), with L
    from aip.safetensors; values agree with the saved model to float32 rounding times the AIP's condition
    number.
    """
    path = Path(path)
    meta_path = path / ATOMS_META
    if not meta_path.is_file() or not (path / SAELENS_WEIGHTS).is_file():
        raise BadInputError(
            f"{path} has no {ATOMS_META} or {SAELENS_WEIGHTS}: it was not written by "
            "atoms.tsae.save_saelens. Load foreign SAELens directories with sae_lens.SAE.load_from_disk."
        )
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
    try:
        loaded = load_file(str(path / SAELENS_WEIGHTS))
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise BadInputError(
            f"{path / SAELENS_WEIGHTS} is unreadable ({type(e).__name__}: {e}); it was damaged after saving. "
            "Re-save the model with save_saelens."
        ) from e
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

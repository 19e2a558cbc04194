"""Train a SAELens JumpReLU SAE inside sae-lens's own trainer, with atoms' fused encoder and the AIP loss.

Needs sae-lens >= 6 (the "peers" extra). Importing this module registers the training architecture
"atoms_jumprelu" with sae-lens, as sae-lens registers its own: `AtomsJumpReLUTrainingSAE` is a subclass of
sae-lens's `JumpReLUTrainingSAE` that changes two of its extension points and nothing else.

- `encode_with_hidden_pre` computes the codes with `atoms.kernels.threshold_encode` (Triton on CUDA, the torch
  reference on CPU): the JumpReLU of sae-lens's DeepMind mode (jumprelu_sparsity_loss_mode="step",
  jumprelu_ste_to_input=False), with the same rectangle-kernel pseudo-derivatives, but without keeping the
  dense (batch, d_sae) pre-activations for backward. In their place it returns the per-sample L0 (batch,),
  which carries the threshold's pseudo-gradient out of the same pass; so `hook_sae_acts_pre` is not called
  and TrainStepOutput.hidden_pre holds that L0. The input still goes through sae-lens's `process_sae_in`
  (hooks, normalisation, b_dec), which keeps sae-lens's input options working; the price is that b_dec's
  gradient comes back through autograd (one GEMM more in backward than threshold_encode's own b_dec path).
- `calculate_aux_loss` adds the AIP-norm reconstruction error to sae-lens's losses as "aip_mse_loss":
  mean over the batch of ||L^{-1} (x - x_hat)||^2 * trace(C) / d_in, C = L L^T the AIP's second moment. The
  factor trace(C) / d_in makes an empty reconstruction cost as much as under sae-lens's Euclidean MSE
  (E||L^{-1} x||^2 = d_in for the uncentered AIP of these activations), so l0 coefficients tuned for sae-lens
  carry over; it also makes the term invariant to a constant input scaling, so an AIP fitted on raw
  activations serves sae-lens's normalize_activations="expected_average_only_in". sae-lens's own Euclidean
  "mse_loss" stays in the objective with weight `mse_coefficient` (0 by default: the TSAE's objective,
  reconstruction under the AIP plus the L0 penalty).

The trained SAE is a plain SAELens JumpReLU SAE on raw activations: `save_inference_model` (what sae-lens's
runner writes at the end of training) writes architecture "jumprelu", which `sae_lens.SAE.load_from_disk` and
`atoms.tsae.load_saelens` both read. Checkpoints (`save_model`, the trainer's checkpoints) keep the
architecture "atoms_jumprelu" and the AIP's path, so `sae_lens.TrainingSAE.load_from_disk` resumes them as
this class. sae-lens leaves decoder norms free, as for its own JumpReLU; `atoms.dictionary.Dictionary`
normalises the atoms under the AIP when it measures them.

Usage, with activations from one's own pipeline (any iterator of (batch, d_in) tensors)::

    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from atoms.aip import AIP
    from atoms.saelens_training import AtomsJumpReLUTrainingSAE, AtomsJumpReLUTrainingSAEConfig

    AIP.fit(sample).save("aip.safetensors")  # sample (n, d_in): activations of the layer trained on
    cfg = AtomsJumpReLUTrainingSAEConfig(d_in=576, d_sae=2304, aip_path="aip.safetensors")
    sae = AtomsJumpReLUTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(  # sae-lens's trainer refuses an unset lr_end
        total_training_samples=10_000_000, train_batch_size_samples=4096, lr=3e-4, lr_end=3e-4
    )
    trainer = SAETrainer(trainer_cfg, sae, batches)
    trainer.fit().save_inference_model("out/")  # atoms.tsae.load_saelens("out/") reads it

or with sae-lens's runner, which builds the SAE from its config through the registry:
`LanguageModelSAERunnerConfig(sae=AtomsJumpReLUTrainingSAEConfig(...), ...)` after importing this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import (
    JumpReLUSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    register_sae_training_class,
)
from sae_lens.saes.sae import SAEConfig, TrainStepInput, mse_loss

from atoms.aip import AIP, whiten_rows
from atoms.errors import BadInputError
from atoms.kernels.threshold_encoder import threshold_encode
from atoms.tsae import MIN_THRESHOLD

__all__ = ["ARCHITECTURE", "AtomsJumpReLUTrainingSAE", "AtomsJumpReLUTrainingSAEConfig"]

ARCHITECTURE = "atoms_jumprelu"


@dataclass(kw_only=True)
class AtomsJumpReLUTrainingSAEConfig(JumpReLUTrainingSAEConfig):
    """sae-lens's JumpReLU training config, in its DeepMind mode only, plus the AIP loss's two fields."""

    aip_path: str
    """File written by `atoms.aip.AIP.save`, fitted on activations of the layer trained on (before sae-lens's
    normalisation). A path rather than the AIP itself, so the config stays JSON and sae-lens can rebuild the
    SAE from it (runner, checkpoints)."""
    mse_coefficient: float = 0.0
    """Weight of sae-lens's Euclidean mse_loss; the AIP term's weight is 1."""

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        unsupported = {
            "jumprelu_sparsity_loss_mode": (self.jumprelu_sparsity_loss_mode, "step"),
            "jumprelu_ste_to_input": (self.jumprelu_ste_to_input, False),
            "pre_act_loss_coefficient": (self.pre_act_loss_coefficient, None),
        }
        for name, (value, needed) in unsupported.items():
            if value != needed:
                raise BadInputError(
                    f"{name} = {value!r}: atoms' fused encoder implements the L0 step penalty with "
                    f"pseudo-gradients to the threshold only, which needs {name} = {needed!r}. Train with "
                    "sae-lens's own JumpReLUTrainingSAE for the other modes."
                )
        if self.normalize_activations == "covariance_whitening":
            raise BadInputError(
                "normalize_activations = 'covariance_whitening' already whitens the SAE's inputs, so an AIP "
                "fitted on the raw activations would not match them; use 'none' or "
                "'expected_average_only_in'."
            )
        if not (math.isfinite(self.mse_coefficient) and self.mse_coefficient >= 0):
            raise BadInputError(
                f"mse_coefficient must be a finite number >= 0, got {self.mse_coefficient!r}."
            )

    def get_inference_config_class(self) -> type[SAEConfig]:
        # The trained SAE is a plain JumpReLU SAE, as sae-lens's batchtopk is: saved as "jumprelu".
        return JumpReLUSAEConfig


class AtomsJumpReLUTrainingSAE(JumpReLUTrainingSAE):
    """sae-lens's JumpReLU training SAE with atoms' fused encoder and the AIP loss (module docstring)."""

    cfg: AtomsJumpReLUTrainingSAEConfig

    def __init__(self, cfg: AtomsJumpReLUTrainingSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        self.aip = AIP.load(cfg.aip_path)
        if self.aip.d != cfg.d_in:
            raise BadInputError(
                f"the AIP in {cfg.aip_path} has d = {self.aip.d} but the SAE has d_in = {cfg.d_in}; fit the "
                "AIP on activations of the layer the SAE is trained on."
            )
        # trace(C) / d_in, with trace(C) = ||L||_F^2.
        self.aip_scale = float(self.aip.cholesky.pow(2).sum()) / cfg.d_in
        # The AIP is not a parameter or buffer: it stays out of the state dict, so saved weights are exactly
        # a JumpReLU SAE's, and out of `.to(dtype)`, which would round it; L is cast per dtype and device.
        self._factors: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self.mse_loss_fn = self._weighted_mse

    def _weighted_mse(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """sae-lens's per-element squared error (..., d_in), times mse_coefficient."""
        return self.cfg.mse_coefficient * mse_loss(preds, target)

    def _cholesky(self, like: torch.Tensor) -> torch.Tensor:
        """The AIP's L (d_in, d_in) in `like`'s dtype and on its device, cached."""
        key = (like.dtype, like.device)
        if key not in self._factors:
            self._factors[key] = self.aip.cholesky.to(dtype=like.dtype, device=like.device)
        return self._factors[key]

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., d_in) -> codes (..., d_sae) and, in place of the pre-activations, the L0 (...) float32."""
        sae_in = self.process_sae_in(x)
        raw = self.threshold.float()
        # sae-lens clamps the threshold at 0 before each training step; the encoder needs it positive, so it
        # uses max(threshold, MIN_THRESHOLD) with a straight-through gradient, as atoms' TSAE does.
        theta = raw + (raw.clamp(min=MIN_THRESHOLD) - raw).detach()
        codes, l0 = threshold_encode(
            sae_in, self.W_enc, self.b_enc, theta, bandwidth=self.bandwidth, return_l0=True
        )
        return self.hook_sae_acts_post(codes), l0

    def aip_mse(self, sae_out: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
        """Mean over samples of ||L^{-1} (sae_in - sae_out)||^2 * trace(C) / d_in, for (..., d_in) inputs;
        float32 (float64 for float64 inputs), since half precision has no triangular solve."""
        residual = (sae_in - sae_out).reshape(-1, self.cfg.d_in)
        if residual.dtype != torch.float64:
            residual = residual.float()
        whitened = whiten_rows(residual, self._cholesky(residual))
        return whitened.pow(2).sum(-1).mean() * self.aip_scale

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The L0 penalty (hidden_pre is the per-sample L0 of `encode_with_hidden_pre`) and the AIP term."""
        return {
            "l0_loss": (step_input.coefficients["l0"] * hidden_pre).mean(),
            "aip_mse_loss": self.aip_mse(sae_out, step_input.sae_in),
        }

    def _apply(self, *args: Any, **kwargs: Any) -> AtomsJumpReLUTrainingSAE:
        self._factors = {}  # cached factors follow the parameters' device
        return super()._apply(*args, **kwargs)


register_sae_training_class(ARCHITECTURE, AtomsJumpReLUTrainingSAE, AtomsJumpReLUTrainingSAEConfig)

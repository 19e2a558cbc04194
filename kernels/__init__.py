"""Fused Triton kernels with their torch reference paths, installed as `atoms.kernels`.

Dispatch happens per call by the tensors' device (kernels/dispatch.py): CUDA tensors take Triton, CPU tensors
the torch reference; ATOMS_KERNELS=interpret runs the Triton kernels through Triton's interpreter on CPU and
ATOMS_KERNELS=torch forces the reference everywhere. This package is a leaf: it imports nothing from atoms.
`aot` (ahead-of-time compilation for sm_80/sm_90) is for tests and is not imported here.
"""

from . import dispatch, support_gram, threshold_encoder
from .dispatch import backend
from .support_gram import SupportCoherence, support_coherence, support_coherence_reference
from .threshold_encoder import EncoderOutput, ThresholdEncoder, threshold_encode, threshold_encode_reference

__all__ = [
    "EncoderOutput",
    "SupportCoherence",
    "ThresholdEncoder",
    "backend",
    "dispatch",
    "support_coherence",
    "support_coherence_reference",
    "support_gram",
    "threshold_encode",
    "threshold_encode_reference",
    "threshold_encoder",
]

"""Fused Triton kernels with their torch reference paths, installed as `atoms.kernels`.

Dispatch happens per call by the tensors' device (kernels/dispatch.py): CUDA tensors take Triton, CPU tensors
the torch reference; ATOMS_KERNELS=interpret runs the Triton kernels through Triton's interpreter on CPU and
ATOMS_KERNELS=torch forces the reference everywhere. This package is a leaf: it imports nothing from atoms,
and only torch and Triton beyond the standard library (tests/test_imports.py). Importing it registers the
threshold encoder's custom ops, torch.ops.atoms.threshold_encode and threshold_encode_backward.
`aot` (ahead-of-time compilation for sm_80/sm_90) is for tests and is not imported here.
"""

from . import aip_gram, dispatch, support_gram, threshold_encoder
from .aip_gram import GramStats, gram_reduce, gram_reduce_reference
from .dispatch import backend
from .support_gram import SupportCoherence, support_coherence, support_coherence_reference
from .threshold_encoder import EncoderOutput, ThresholdEncoder, threshold_encode, threshold_encode_reference

__all__ = [
    "EncoderOutput",
    "GramStats",
    "SupportCoherence",
    "ThresholdEncoder",
    "aip_gram",
    "backend",
    "dispatch",
    "gram_reduce",
    "gram_reduce_reference",
    "support_coherence",
    "support_coherence_reference",
    "support_gram",
    "threshold_encode",
    "threshold_encode_reference",
    "threshold_encoder",
]

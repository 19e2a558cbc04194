"""Fused Triton kernels with torch reference paths."""

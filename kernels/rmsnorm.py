"""RMSNorm (forward + backward) in Triton, with a PyTorch reference path.

(Work in progress: the reference path is final; the Triton kernels follow.)
"""
from __future__ import annotations

import torch


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference path (CPU, or KERNELS_REFERENCE=1)
# ----------------------------------------------------------------------------------------------------------------

def _compute_dtype(dtype):
    """fp32 math for fp16/bf16/fp32 inputs; fp64 inputs stay fp64."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm_reference(x, weight=None, eps=1e-6):
    """y = x * rsqrt(mean(x^2, -1) + eps) * weight in fp32 (autograd through torch ops), cast to x.dtype."""
    if weight is not None and weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight must have shape [{x.shape[-1]}], got {tuple(weight.shape)}")
    xf = x.to(_compute_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


def rms_norm_triton(x, weight=None, eps=1e-6):
    """Triton path (work in progress: falls back to the reference for now)."""
    return rms_norm_reference(x, weight=weight, eps=eps)

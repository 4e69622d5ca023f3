"""FlashAttention-2 (forward + backward) in Triton, with a PyTorch reference path.

(Work in progress: the reference path is final; the Triton kernels follow.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# Shared input checks
# ----------------------------------------------------------------------------------------------------------------

def _check(q, k, v, key_lengths, scale):
    """Validate shapes/dtypes; returns the softmax scale."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B,H,L,D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, Lq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"attention: expected k, v of shape [{B},{H},Lk,{D}], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if key_lengths is not None and (key_lengths.dim() != 1 or key_lengths.shape[0] != B):
        raise ValueError(f"attention: key_lengths must have shape [{B}], got {tuple(key_lengths.shape)}")
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference path (CPU, or KERNELS_REFERENCE=1)
# ----------------------------------------------------------------------------------------------------------------

def attention_reference(q, k, v, key_lengths=None, scale=None):
    """softmax(q k^T * scale + mask) v through torch SDPA; rows with key_length 0 give 0."""
    scale = _check(q, k, v, key_lengths, scale)
    if key_lengths is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    Lk = k.shape[2]
    kl = key_lengths.to(device=q.device, dtype=torch.long).clamp(0, Lk)
    # A row with no valid key would be a 0/0 softmax: attend to key 0 and zero the output instead, so that no
    # NaN reaches the backward pass.
    mask = torch.arange(Lk, device=q.device)[None, :] < kl.clamp(min=1)[:, None]      # [B, Lk], True = attend
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    empty = (kl == 0)[:, None, None, None]
    return torch.where(empty, torch.zeros((), dtype=o.dtype, device=o.device), o)


def attention_triton(q, k, v, key_lengths=None, scale=None):
    """Triton FlashAttention-2 path (work in progress: falls back to the reference for now)."""
    return attention_reference(q, k, v, key_lengths=key_lengths, scale=scale)

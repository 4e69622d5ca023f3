"""kernels: hand-written Triton FlashAttention-2 and RMSNorm, each with a PyTorch reference path.

    from kernels import attention, rms_norm
    o = attention(q, k, v, key_lengths=None, scale=None)   # q [B,H,Lq,D], k/v [B,H,Lk,D] -> [B,H,Lq,D]
    y = rms_norm(x, weight=None, eps=1e-6)                 # over the last dim, output in x's dtype

Dispatch (decided per call, from the first tensor argument):
- CUDA tensors run the Triton kernels (`attention_triton`, `rms_norm_triton`), fused forward and backward
  (where triton is not installed, e.g. on Windows, CUDA tensors take the reference path).
- CPU tensors (and any other device) run the PyTorch reference (`attention_reference`, `rms_norm_reference`):
  the same math written with torch ops, so every script trains and samples on a CPU.
- `KERNELS_REFERENCE=1` in the environment forces the reference on CUDA too (for comparisons / debugging).
- The Triton functions can be called explicitly on CPU tensors when the process starts with `TRITON_INTERPRET=1`
  (set before triton is first imported): triton's interpreter then runs the same kernel source (the tests).

Note: the package attribute `kernels.attention` is the function; the module is `kernels.attention` in
`sys.modules` (`from kernels.attention import attention_triton` works as usual).
"""
import os

from .attention import attention_reference, attention_triton, triton as _triton
from .rmsnorm import rms_norm_reference, rms_norm_triton

__all__ = ["attention", "rms_norm", "attention_reference", "attention_triton", "rms_norm_reference",
           "rms_norm_triton", "use_triton"]


def use_triton(t):
    """True when `t` goes through the Triton kernels: a CUDA tensor, triton installed, KERNELS_REFERENCE unset/0."""
    return t.is_cuda and _triton is not None and os.environ.get("KERNELS_REFERENCE", "0") in ("", "0")


def attention(q, k, v, key_lengths=None, scale=None):
    """Non-causal softmax(q k^T * scale) v with optional padded keys masked per batch row (key_lengths [B])."""
    fn = attention_triton if use_triton(q) else attention_reference
    return fn(q, k, v, key_lengths=key_lengths, scale=scale)


def rms_norm(x, weight=None, eps=1e-6):
    """x / sqrt(mean(x^2, -1) + eps) * weight, fp32 math, output in x's dtype."""
    fn = rms_norm_triton if use_triton(x) else rms_norm_reference
    return fn(x, weight=weight, eps=eps)

"""RMSNorm (forward + backward) in Triton, with a PyTorch reference path.

    y = rms_norm(x, weight=None, eps=1e-6)                 # from kernels import rms_norm

Normalises over the last dimension (N = x.shape[-1], N <= 16384 on the Triton path, any N on the
reference path), for any leading shape; math in fp32 (fp64 inputs stay fp64 on the reference path), output in
x's dtype. RadiT normalises queries and keys with it over the head dim (QK-RMSNorm, radit App. B.2).

Math, per row x in R^N (w = weight, or 1 when weight is None):
    r = 1 / sqrt(mean_j x_j^2 + eps),   xhat = r x,   y = xhat * w
Backward, with g = dL/dy:
    dx = r * (g*w - xhat * mean_j(g_j w_j xhat_j)),   dw = sum_rows g * xhat

Paths (the dispatch lives in kernels/__init__.py):
- Triton (`rms_norm_triton`, CUDA tensors): the forward reads each row once, writes y once and saves r (fp32, one
  per row). Small N pack several rows per program (a [ROWS, BLOCK_N] tile) so that QK-norm over a head dim of 16-128
  is not one tiny program per row. The backward recomputes xhat from x and r, writes dx in the same pass, and
  accumulates dw as fp32 partial sums in registers: the grid is capped near 2x the SM count and each program
  walks a strided set of row tiles, so the partial buffer is [programs, N] whatever the row count; one fp32 sum
  over programs finishes dw (never a bf16 sum).
- Reference (`rms_norm_reference`, CPU tensors or KERNELS_REFERENCE=1): the same formula with torch ops; autograd
  gives the backward.
Under TRITON_INTERPRET=1 (set before triton is first imported) the same kernels run on CPU tensors in triton's
interpreter (the tests). Importing this file needs no GPU, nor triton.
"""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference path still works everywhere
    triton = tl = None

INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)
_jit = triton.jit if triton is not None else (lambda fn: fn)

# Debug aid used by the tests: when True, every buffer a kernel writes is allocated filled with NaN, so any element
# a kernel fails to write shows up in the result.
POISON_OUTPUTS = False

MAX_N = 16384            # one row must fit one tile (fp32 registers) on the Triton path


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference path (CPU, or KERNELS_REFERENCE=1)
# ----------------------------------------------------------------------------------------------------------------

def _check(x, weight):
    if weight is not None and weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight must have shape [{x.shape[-1]}], got {tuple(weight.shape)}")


def _compute_dtype(dtype):
    """fp32 math for fp16/bf16/fp32 inputs; fp64 inputs stay fp64."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm_reference(x, weight=None, eps=1e-6):
    """y = x * rsqrt(mean(x^2, -1) + eps) * weight in fp32 (autograd through torch ops), cast to x.dtype."""
    _check(x, weight)
    xf = x.to(_compute_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

@_jit
def _rms_fwd(X, W, Y, RSTD, M, N, eps,
             HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program = ROWS rows x the whole row (BLOCK_N >= N columns): one read of x, one write of y and r.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask_c = cols < N
    mask = (rows < M)[:, None] & mask_c[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / N + eps)
    y = x * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@_jit
def _rms_bwd(X, W, DY, RSTD, DX, DW_PARTIAL, M, N,
             HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program p handles row tiles p, p + G, p + 2G, ... (G = grid size): dx is written tile by tile; the dw
    # contribution sum_rows(g * xhat) stays in an fp32 register vector and is stored once, in row p of the partials.
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask_c = cols < N
    w = tl.full([BLOCK_N], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    n_tiles = tl.cdiv(M, ROWS)
    for tile in range(pid, n_tiles, n_progs):
        rows = tl.arange(0, ROWS).to(tl.int64) + tile * ROWS          # int64: rows * N may pass 2^31
        mask_r = rows < M
        mask = mask_r[:, None] & mask_c[None, :]
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=mask_r, other=0.0)
        xhat = x * rstd[:, None]
        gw = g * w[None, :]
        c = tl.sum(gw * xhat, 1) / N
        dx = rstd[:, None] * (gw - xhat * c[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += tl.sum(g * xhat, 0)
    if HAS_W:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask_c)


# ----------------------------------------------------------------------------------------------------------------
# Launch helpers (tile shapes, grid cap)
# ----------------------------------------------------------------------------------------------------------------

def _tile(N, backward=False):
    """(BLOCK_N, ROWS, num_warps): a whole row per tile; ~4K-element tiles for small N so that programs are not tiny;
    more warps for long rows to keep per-thread registers bounded (~16-32 fp32 values of x per thread in the
    forward). The backward holds about three row-sized fp32 vectors per thread (x, dy and the dw partial sums), so
    long rows get twice the warps there (up to 32): 16 warps spilled at N >= 12288 (bench.py --compile-only)."""
    block_n = max(16, triton.next_power_of_2(N))
    rows = max(1, min(64, 4096 // block_n))
    per_warp = 256 if backward and block_n >= 8192 else 512
    warps = max(1, min(32 if backward else 16, block_n * rows // per_warp))
    return block_n, rows, warps


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _max_programs(x):
    """Grid cap for the backward: ~2 programs per SM (4 under the interpreter, to exercise the strided walk)."""
    if INTERPRET or not x.is_cuda:
        return 4
    return 2 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _empty(shape, dtype, device):
    """Output buffer; NaN-filled when POISON_OUTPUTS is set (proves the kernels write every element)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function and the Triton entry point
# ----------------------------------------------------------------------------------------------------------------

class _RMSNorm(torch.autograd.Function):
    """Fused RMSNorm forward/backward over the Triton kernels above."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        N = x.shape[-1]
        x2 = x.reshape(-1, N)
        M = x2.shape[0]
        block_n, rows, warps = _tile(N)
        y = _empty(x2.shape, x.dtype, x.device)
        rstd = _empty((M,), torch.float32, x.device)
        _rms_fwd[(triton.cdiv(M, rows),)](x2, weight if weight is not None else x2, y, rstd, M, N, eps,
                                          HAS_W=weight is not None, ROWS=rows, BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy = dy.reshape(M, N).contiguous()
        block_n, rows, warps = _tile(N, backward=True)
        n_prog = max(1, min(triton.cdiv(M, rows), _max_programs(x2)))
        dx = _empty(x2.shape, x2.dtype, x2.device)
        has_w = weight is not None
        partial = _empty((n_prog, N), torch.float32, x2.device) if has_w else rstd     # rstd: unused dummy
        _rms_bwd[(n_prog,)](x2, weight if has_w else x2, dy, rstd, dx, partial, M, N,
                            HAS_W=has_w, ROWS=rows, BLOCK_N=block_n, num_warps=warps)
        dw = partial.sum(0).to(weight.dtype) if has_w else None       # the one fp32 reduction over programs
        return dx.view(ctx.x_shape), dw, None


def rms_norm_triton(x, weight=None, eps=1e-6):
    """Triton RMSNorm (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("rms_norm_triton: triton is not installed (use rms_norm_reference)")
    _check(x, weight)
    N = x.shape[-1]
    if N > MAX_N:
        raise ValueError(f"rms_norm_triton: hidden size {N} > {MAX_N} is not supported (use rms_norm_reference)")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"rms_norm_triton: dtype {x.dtype} not supported (float32, float16, bfloat16)")
    if x.numel() == 0:
        return rms_norm_reference(x, weight, eps)
    if weight is not None:
        weight = weight.contiguous()
    return _RMSNorm.apply(x.contiguous(), weight, float(eps))

"""FlashAttention-2 (forward + backward) in Triton, with a PyTorch reference path.

    o = attention(q, k, v, key_lengths=None, scale=None)     # from kernels import attention

q [B, H, Lq, D], k and v [B, H, Lk, D] -> o [B, H, Lq, D] in q's dtype. Non-causal; self-attention (Lq = Lk) and
cross-attention (Lq != Lk); any lengths; D <= 128 (tiles are padded to a power of two >= 16 and masked);
`key_lengths` [B] (int) marks keys j >= key_lengths[b] of batch row b as padding (text tokens); a row with
key_length 0 attends to nothing and returns 0. `scale` defaults to 1/sqrt(D).

Math (per batch b, head h; s = scale):
    S = s * Q K^T,   S[i, j] = -inf for j >= key_lengths[b]
    P = softmax_rows(S),   O = P V,   LSE_i = log sum_j exp(S_ij)
Backward, with dO = dL/dO:
    dV = P^T dO,   dP = dO V^T,   Delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id,
    dS = P * (dP - Delta),   dQ = s * dS K,   dK = s * dS^T Q.

Paths (the dispatch lives in kernels/__init__.py):
- Triton (`attention_triton`, CUDA tensors): the FlashAttention-2 algorithm (Dao 2023). The forward keeps one
  query block in registers and streams key/value blocks through an online softmax in fp32: with S in log2 units
  (the scale folded into one multiply by s*log2(e), so exp becomes exp2),
      m' = max(m, rowmax S_blk),  l = l 2^(m - m') + rowsum 2^(S_blk - m'),  acc = acc 2^(m - m') + 2^(S_blk - m') V,
  and stores O = acc / l and LSE2 = m + log2(l) (log2 units). The backward recomputes P = 2^(S - LSE2) blockwise
  instead of storing it: a preprocess kernel computes Delta = rowsum(dO * O); one kernel per key block walks all
  query blocks and accumulates dK, dV in registers; one kernel per query block walks all key blocks and
  accumulates dQ. Every output element has exactly one writer: no atomics, deterministic. All dot products
  accumulate in fp32 (fp32 inputs use TF32 when torch.backends.cuda.matmul.allow_tf32 is on, IEEE fp32 otherwise).
  Block sizes / warps / stages are autotuned per (length buckets, D, dtype) on the GPU; under TRITON_INTERPRET=1
  a fixed small configuration runs instead (the interpreter executes the same kernel source on CPU tensors; set
  the variable before triton is first imported, since triton decorates its own helpers, tl.zeros etc., then).
- Reference (`attention_reference`, CPU tensors or KERNELS_REFERENCE=1): torch's scaled_dot_product_attention
  with a boolean key mask; autograd gives the backward.

Importing this file needs no GPU, nor triton (the reference path works everywhere).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference path still works everywhere
    triton = tl = None

# TRITON_INTERPRET=1: the kernels run in triton's CPU interpreter (tests), with fixed small tiles, no autotuning.
INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)
_jit = triton.jit if triton is not None else (lambda fn: fn)

# Debug aid used by the tests: when True, every buffer a kernel writes is allocated filled with NaN, so any element
# a kernel fails to write shows up in the result.
POISON_OUTPUTS = False

LOG2E = 1.4426950408889634


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
    if k.shape[2] == 0:
        raise ValueError("attention: k and v have no keys (Lk = 0)")
    if key_lengths is not None and (key_lengths.dim() != 1 or key_lengths.shape[0] != B):
        raise ValueError(f"attention: key_lengths must have shape [{B}], got {tuple(key_lengths.shape)}")
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


def _empty(shape, dtype, device):
    """Output buffer; NaN-filled when POISON_OUTPUTS is set (proves the kernels write every element)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


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


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

@_jit
def _attn_fwd(Q, K, V, O, LSE, KL, qk_scale,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              H, Lq, Lk, LQ_BUCKET, LK_BUCKET, D: tl.constexpr,
              HAS_KL: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program = one block of BLOCK_M queries of one (batch, head); it streams all valid key blocks.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    n_end = Lk
    if HAS_KL:
        n_end = tl.load(KL + b)          # already clamped to [0, Lk] on the host side
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < n_end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        # S in log2 units: scale * log2(e) folded into one multiply so the softmax uses exp2.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))       # finite: every visited block holds >= 1 valid key
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty).to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new
    # key_length 0: nothing visited, l = 0 -> output 0 and LSE = +inf (so that a recomputed P would be 0).
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=mask_m)


@_jit
def _attn_bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                         H, Lq, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Delta_i = sum_d dO_id * O_id (= rowsum(P * dP)), in fp32.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@_jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KL, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   H, Lq, Lk, LQ_BUCKET, LK_BUCKET, D: tl.constexpr,
                   HAS_KL: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program = one block of BLOCK_N keys of one (batch, head); it walks every query block and accumulates
    # dK = s * dS^T Q and dV = P^T dO in fp32 registers (transposed tiles: rows are keys).
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    n_end = Lk
    if HAS_KL:
        n_end = tl.load(KL + b)
    mask_n = offs_n < n_end                      # padded keys get dK = dV = 0
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0).to(DOT_DTYPE)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0).to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = bh.to(tl.int64) * Lq
    # A block made only of padded keys skips the walk and stores zeros.
    m_stop = tl.where(pid_n * BLOCK_N < n_end, Lq, 0)
    for start_m in range(0, m_stop, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < Lq
        qd_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=qd_mask, other=0.0).to(DOT_DTYPE)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=qd_mask, other=0.0).to(DOT_DTYPE)
        lse = tl.load(LSE + row_base + rows, mask=mask_m, other=float("inf"))   # +inf -> P = 0 off the end
        delta = tl.load(DELTA + row_base + rows, mask=mask_m, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale     # S^T, log2 units
        p_t = tl.math.exp2(s_t - lse[None, :])
        p_t = tl.where(mask_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(DO.dtype.element_ty).to(DOT_DTYPE), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(Q.dtype.element_ty).to(DOT_DTYPE), q, input_precision=PRECISION)
    dk = dk * sm_scale
    out_off = b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    out_mask = (offs_n < Lk)[:, None] & mask_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=out_mask)       # DK, DV share k's strides
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=out_mask)


@_jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KL, qk_scale, sm_scale,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 H, Lq, Lk, LQ_BUCKET, LK_BUCKET, D: tl.constexpr,
                 HAS_KL: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program = one block of BLOCK_M queries; it walks the valid key blocks and accumulates dQ = s * dS K.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    qd_mask = mask_m[:, None] & mask_d[None, :]
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(Q + q_off, mask=qd_mask, other=0.0).to(DOT_DTYPE)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=qd_mask, other=0.0).to(DOT_DTYPE)
    row_base = bh.to(tl.int64) * Lq
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    n_end = Lk
    if HAS_KL:
        n_end = tl.load(KL + b)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < n_end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # No key mask needed: padded keys were loaded as k = v = 0, so their dS * k terms add exactly 0 to dQ.
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(K.dtype.element_ty).to(DOT_DTYPE), k, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=qd_mask)        # DQ shares q's strides


# ----------------------------------------------------------------------------------------------------------------
# Autotuning and launches
# ----------------------------------------------------------------------------------------------------------------

# Interpreter / fallback block sizes: small tiles keep TRITON_INTERPRET=1 fast and exercise the multi-block loops.
_INTERPRET_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32)


def _fwd_configs():
    """Forward configs: 128-query tiles with 64/128-key tiles suit Hopper (wgmma wants M=64*k, 4-8 warps);
    the 64x64 two-stage ones fit Ampere's shared memory at D=128. Configs that exceed a device's resources are
    dropped by the autotuner (OutOfResources)."""
    cfgs = [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 4),
            (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in cfgs]


def _bwd_configs():
    """Backward configs (shared by the dK/dV and dQ kernels): five fp32 accumulator-sized tiles are live, so the
    tiles are smaller than the forward's."""
    cfgs = [(64, 128, 8, 2), (64, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (32, 128, 4, 2), (64, 64, 4, 2),
            (32, 64, 4, 2), (32, 32, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in cfgs]


if triton is not None and not INTERPRET:
    # Keyed on power-of-two length buckets (not exact lengths: text lengths vary per batch), D and the dtypes.
    _KEY = ["LQ_BUCKET", "LK_BUCKET", "D"]
    _attn_fwd_tuned = triton.autotune(configs=_fwd_configs(), key=_KEY)(_attn_fwd)
    _attn_bwd_dkdv_tuned = triton.autotune(configs=_bwd_configs(), key=_KEY)(_attn_bwd_dkdv)
    _attn_bwd_dq_tuned = triton.autotune(configs=_bwd_configs(), key=_KEY)(_attn_bwd_dq)
else:
    _attn_fwd_tuned, _attn_bwd_dkdv_tuned, _attn_bwd_dq_tuned = _attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq


def _tl_dtypes():
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16} if tl else {}


_TL_DTYPE = _tl_dtypes()


def _launch_args(q, k, key_lengths, scale):
    """Common launch values: kl tensor (or a dummy), HAS_KL, qk_scale (log2 units), BLOCK_D, dot precision,
    length buckets (autotune key), dot operand dtype."""
    Lq, D = q.shape[2:]
    Lk = k.shape[2]
    kl = key_lengths
    if kl is None:
        kl = torch.zeros(1, dtype=torch.int32, device=q.device)      # never read (HAS_KL=False)
    # Only fp32 operands look at this: TF32 tensor cores when torch allows them (DESIGN.md: TF32 on), else IEEE.
    precision = "tf32"
    if q.dtype == torch.float32 and not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        precision = "ieee"
    block_d = max(16, triton.next_power_of_2(D))
    buckets = (triton.next_power_of_2(Lq), triton.next_power_of_2(Lk))
    # Under the interpreter, tl.dot on bf16 multiplies the uint16 storage (triton 3.9): dot operands are rounded
    # to bf16 and then widened to fp32 there, which is what tensor cores compute (exact products, fp32 sums).
    dot_dtype = _TL_DTYPE[q.dtype]
    if q.dtype == torch.bfloat16 and INTERPRET:
        dot_dtype = tl.float32
    return kl, key_lengths is not None, scale * LOG2E, block_d, precision, buckets, dot_dtype


def _flash_fwd(q, k, v, key_lengths, scale):
    """Launch the forward kernel; returns (o, lse2) with lse2 [B*H, Lq] fp32 in log2 units."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kl, has_kl, qk_scale, block_d, precision, (lqb, lkb), dot_dtype = _launch_args(q, k, key_lengths, scale)
    o = _empty(q.shape, q.dtype, q.device)
    lse = _empty((B * H, Lq), torch.float32, q.device)
    extra = dict(_INTERPRET_BLOCKS) if INTERPRET else {}
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_tuned[grid](q, k, v, o, lse, kl, qk_scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                          *o.stride()[:3], H, Lq, Lk, lqb, lkb, D, HAS_KL=has_kl, PRECISION=precision,
                          DOT_DTYPE=dot_dtype, BLOCK_D=block_d, **extra)
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, key_lengths, scale):
    """Launch preprocess, dK/dV and dQ kernels; returns (dq, dk, dv) in the input dtype."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kl, has_kl, qk_scale, block_d, precision, (lqb, lkb), dot_dtype = _launch_args(q, k, key_lengths, scale)
    delta = _empty((B * H, Lq), torch.float32, q.device)
    pre_m = 64 if block_d <= 64 else 32
    _attn_bwd_preprocess[(triton.cdiv(Lq, pre_m), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Lq, D, BLOCK_M=pre_m, BLOCK_D=block_d)
    dq = _empty(q.shape, q.dtype, q.device)       # same (contiguous) strides as q
    dk = _empty(k.shape, k.dtype, k.device)       # same strides as k (k is contiguous here)
    dv = _empty(v.shape, v.dtype, v.device)
    assert dq.stride() == q.stride() and dk.stride() == k.stride() == dv.stride()
    extra = dict(_INTERPRET_BLOCKS) if INTERPRET else {}
    common = (qk_scale, scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
              H, Lq, Lk, lqb, lkb, D)
    grid_n = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)  # noqa: E731
    _attn_bwd_dkdv_tuned[grid_n](q, k, v, do, lse, delta, dk, dv, kl, *common, HAS_KL=has_kl,
                                 PRECISION=precision, DOT_DTYPE=dot_dtype, BLOCK_D=block_d, **extra)
    grid_m = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq_tuned[grid_m](q, k, v, do, lse, delta, dq, kl, *common, HAS_KL=has_kl,
                               PRECISION=precision, DOT_DTYPE=dot_dtype, BLOCK_D=block_d, **extra)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function and the Triton entry point
# ----------------------------------------------------------------------------------------------------------------

class _FlashAttention(torch.autograd.Function):
    """FlashAttention-2 forward/backward over the Triton kernels above."""

    @staticmethod
    def forward(ctx, q, k, v, key_lengths, scale):
        o, lse = _flash_fwd(q, k, v, key_lengths, scale)
        ctx.save_for_backward(q, k, v, o, lse, key_lengths)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_lengths = ctx.saved_tensors
        do = do.contiguous()
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, key_lengths, ctx.scale)
        return dq, dk, dv, None, None


def attention_triton(q, k, v, key_lengths=None, scale=None):
    """Triton FlashAttention-2 (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("attention_triton: triton is not installed (use attention_reference)")
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        # Same contract as SDPA under autocast (DESIGN.md: bf16 autocast): run in the autocast dtype.
        dt = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    scale = _check(q, k, v, key_lengths, scale)
    D = q.shape[-1]
    if D > 128:
        raise ValueError(f"attention_triton: head dim D={D} > 128 is not supported (use attention_reference)")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"attention_triton: dtype {q.dtype} not supported (float32, float16, bfloat16)")
    B, H = q.shape[:2]
    Lk = k.shape[2]
    if B * H > 65535:
        raise ValueError(f"attention_triton: B*H = {B * H} exceeds the 65535 grid limit (use attention_reference)")
    if q.numel() == 0:                      # nothing to launch
        return attention_reference(q, k, v, key_lengths, scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if key_lengths is not None:
        key_lengths = key_lengths.to(device=q.device, dtype=torch.int32).clamp(0, Lk).contiguous()
    return _FlashAttention.apply(q, k, v, key_lengths, scale)

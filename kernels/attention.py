"""FlashAttention-2 (forward + backward) in Triton, with a PyTorch reference path.

    o = attention(q, k, v, key_lengths=None, scale=None)     # from kernels import attention

q [B, H, Lq, D], k and v [B, H, Lk, D] -> o [B, H, Lq, D] in q's dtype. Non-causal; self-attention (Lq = Lk) and
cross-attention (Lq != Lk); any lengths; any head dim 1 <= D <= 256 (MAX_HEAD_DIM, as FlashAttention-2);
`key_lengths` [B] (int) marks keys j >= key_lengths[b] of batch row b as padding (text tokens); a row with
key_length 0 attends to nothing and returns 0. `scale` defaults to 1/sqrt(D). q, k, v may be strided views (the
permuted slices of a fused qkv projection): only the last dimension must be contiguous, nothing is copied.

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
  Block sizes / warps / stages are autotuned per (length buckets, D, dtype, key mask, precision, alignment) on the
  GPU; under TRITON_INTERPRET=1 a fixed small configuration runs instead (the interpreter executes the same kernel
  source on CPU tensors; set the variable before triton is first imported, since triton decorates its own helpers,
  tl.zeros etc., then).
- Reference (`attention_reference`, CPU tensors or KERNELS_REFERENCE=1): torch's scaled_dot_product_attention
  with a boolean key mask; autograd gives the backward.

Three implementation choices matter for speed and safety (each is a comment at its place below):
- Head dims that are not a power of two are split into two power-of-two chunks, D = DA + tail with the tail padded
  to DB (72 = 64 + 16 computing 80 columns, 40 = 32 + 16 -> 48, 80 = 64 + 16, 160 = 128 + 32): triton's tiles are
  powers of two, and padding 72 to 128 wasted 44 % of every matmul. The row strides are passed in units of ALIGN
  elements (16 bytes when the strides allow), so that the compiler can prove 16-byte alignment for rows of 72 or 40
  elements, whose strides the JIT alone would not mark (it only marks multiples of 16 elements): that keeps
  vector loads and cp.async pipelining.
- Key blocks that hold only valid keys run without any key mask; only the one block that straddles the end of the
  valid keys is masked. That masking is where the dQ kernel must zero P of padded keys: their score is 0, so
  P = 2^(-LSE) overflows for a row whose valid scores are all strongly negative, and inf * 0 would be NaN.
- The grid is one-dimensional (blocks x batch x heads), so B * H has no 65535 limit.
- On sm_90+ the forward moves q, k, v and o through TMA tensor descriptors made on the device (zero fill past the
  ends stands in for the row and head-dim masks); the backward kernels and sm_80 use pointer loads with cp.async
  pipelining. KERNELS_TMA=0 forces pointer loads everywhere (kernels/bench.py times both).

Importing this file needs no GPU, nor triton (the reference path works everywhere).
"""
from __future__ import annotations

import math
import os
import warnings

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
MAX_HEAD_DIM = 256                    # as FlashAttention-2; one fp32 accumulator row of 256 per query stays feasible
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_PROGRAMS = 2 ** 31 - 1            # CUDA's limit on grid dimension x (the kernels use a 1-D grid)


# ----------------------------------------------------------------------------------------------------------------
# Shared input checks
# ----------------------------------------------------------------------------------------------------------------

def _check(q, k, v, key_lengths, scale):
    """Validate shapes, dtypes and key lengths (one-line ValueErrors naming the argument); returns the scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B,H,L,D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, H, Lq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"attention: expected k, v of shape [{B},{H},Lk,{D}], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v devices differ ({q.device}, {k.device}, {v.device})")
    if k.shape[2] == 0:
        raise ValueError("attention: k and v have no keys (Lk = 0)")
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor) or key_lengths.dim() != 1 or key_lengths.shape[0] != B:
            got = tuple(key_lengths.shape) if isinstance(key_lengths, torch.Tensor) else type(key_lengths).__name__
            raise ValueError(f"attention: key_lengths must be an integer tensor of shape [{B}], got {got}")
        if key_lengths.dtype.is_floating_point or key_lengths.dtype.is_complex or key_lengths.dtype == torch.bool:
            raise ValueError(f"attention: key_lengths must be an integer tensor, got {key_lengths.dtype}")
        # The range is checked where it costs nothing (a CPU tensor). On a GPU the check would be a device sync per
        # call, which stalls the launch queue of every layer: there the lengths are clamped to [0, Lk] instead.
        if key_lengths.device.type == "cpu" and key_lengths.numel():
            lo, hi = int(key_lengths.min()), int(key_lengths.max())
            if lo < 0 or hi > k.shape[2]:
                raise ValueError(f"attention: key_lengths must lie in [0, Lk={k.shape[2]}], got values in "
                                 f"[{lo}, {hi}]")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")
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
# Triton kernels: tile helpers
# ----------------------------------------------------------------------------------------------------------------

@_jit
def _load_chunk(base, rows, row_mask, stride_row, COL0: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr,
                MASK_ROWS: tl.constexpr):
    """Load the [len(rows), WIDTH] tile of columns COL0 .. COL0+WIDTH-1 (zero past D, and past row_mask if
    MASK_ROWS). The column mask is known at compile time, so a chunk inside D has none at all."""
    cols = COL0 + tl.arange(0, WIDTH)
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if COL0 + WIDTH > D:
        if MASK_ROWS:
            return tl.load(ptrs, mask=row_mask[:, None] & (cols < D)[None, :], other=0.0)
        return tl.load(ptrs, mask=(cols < D)[None, :], other=0.0)
    if MASK_ROWS:
        return tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    return tl.load(ptrs)


@_jit
def _load_rows(base, desc, b, h, row0, rows, row_mask, stride_row, COL0: tl.constexpr, WIDTH: tl.constexpr,
               D: tl.constexpr, MASK_ROWS: tl.constexpr, USE_TMA: tl.constexpr, BLOCK: tl.constexpr):
    """Rows row0 .. row0+BLOCK-1, columns COL0 .. COL0+WIDTH-1 of one (batch, head): through the TMA descriptor
    `desc` (which zero-fills rows and columns past the tensor's ends) or through pointers (`_load_chunk`)."""
    if USE_TMA:
        return desc.load([b, h, row0, COL0]).reshape([BLOCK, WIDTH])
    return _load_chunk(base, rows, row_mask, stride_row, COL0, WIDTH, D, MASK_ROWS)


@_jit
def _descriptor(base, B, H, L, D: tl.constexpr, stride_b, stride_h, stride_row, BLOCK: tl.constexpr,
                WIDTH: tl.constexpr):
    """A TMA descriptor of a [B, H, L, D] tensor with [1, 1, BLOCK, WIDTH] boxes (strides in elements)."""
    return tl.make_tensor_descriptor(base, shape=[B, H, L, D], strides=[stride_b, stride_h, stride_row, 1],
                                     block_shape=[1, 1, BLOCK, WIDTH])


@_jit
def _store_chunk(base, rows, row_mask, stride_row, value, COL0: tl.constexpr, WIDTH: tl.constexpr,
                 D: tl.constexpr):
    """Store a [len(rows), WIDTH] tile into columns COL0 .. (masked to rows in row_mask and columns < D)."""
    cols = COL0 + tl.arange(0, WIDTH)
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    if COL0 + WIDTH > D:
        tl.store(ptrs, value, mask=row_mask[:, None] & (cols < D)[None, :])
    else:
        tl.store(ptrs, value, mask=row_mask[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: forward
# ----------------------------------------------------------------------------------------------------------------

@_jit
def _fwd_block(acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, k_desc_a, k_desc_b, v_desc_a, v_desc_b, b, h,
               start_n, n_end, stride_kn, stride_vn, qk_scale,
               D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
               PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the online softmax. MASKED: the block straddles n_end (the only one that needs a mask)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    valid = cols < n_end
    k_a = _load_rows(k_base, k_desc_a, b, h, start_n, cols, valid, stride_kn, 0, DA, D, MASKED, USE_TMA,
                     BLOCK_N).to(DOT_DTYPE)
    s = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
    if DB > 0:
        k_b = _load_rows(k_base, k_desc_b, b, h, start_n, cols, valid, stride_kn, DA, DB, D, MASKED, USE_TMA,
                         BLOCK_N).to(DOT_DTYPE)
        s = tl.dot(q_b, tl.trans(k_b), s, input_precision=PRECISION)
    s = s * qk_scale                               # log2 units: the softmax scale and log2(e) in one multiply
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))          # finite: every visited block holds >= 1 valid key
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    # P is rounded to the storage dtype for the second matmul, as a tensor-core kernel does.
    p = p.to(v_base.dtype.element_ty).to(DOT_DTYPE)
    v_a = _load_rows(v_base, v_desc_a, b, h, start_n, cols, valid, stride_vn, 0, DA, D, MASKED, USE_TMA,
                     BLOCK_N).to(DOT_DTYPE)
    acc_a = tl.dot(p, v_a, acc_a * alpha[:, None], input_precision=PRECISION)
    if DB > 0:
        v_b = _load_rows(v_base, v_desc_b, b, h, start_n, cols, valid, stride_vn, DA, DB, D, MASKED, USE_TMA,
                         BLOCK_N).to(DOT_DTYPE)
        acc_b = tl.dot(p, v_b, acc_b * alpha[:, None], input_precision=PRECISION)
    return acc_a, acc_b, m_new, l_i


@_jit
def _attn_fwd(Q, K, V, O, LSE, KL, qk_scale,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              B, H, Lq, Lk, LQ_BUCKET, LK_BUCKET,
              D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr,
              HAS_KL: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_TMA: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program = one block of BLOCK_M queries of one (batch, head); it streams all valid key blocks.
    # Strides arrive in units of ALIGN elements (see the module docstring), hence the "* ALIGN" below.
    # USE_TMA (sm_90+): q, k, v and o move through TMA descriptors of the [B, H, L, D] tensors (made here, on the
    # device), which zero-fill past the ends of the rows and of the head dim; otherwise through pointer loads.
    n_blocks_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_blocks_m
    bh = pid // n_blocks_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = rows < Lq
    q_base = Q + (b * stride_qb + h * stride_qh) * ALIGN
    k_base = K + (b * stride_kb + h * stride_kh) * ALIGN
    v_base = V + (b * stride_vb + h * stride_vh) * ALIGN
    # Descriptors (placeholders when USE_TMA is off or D is a power of two: never read then).
    b32 = b.to(tl.int32)
    h32 = h.to(tl.int32)
    q_desc_a = Q
    q_desc_b = Q
    k_desc_a = Q
    k_desc_b = Q
    v_desc_a = Q
    v_desc_b = Q
    o_desc_a = Q
    o_desc_b = Q
    if USE_TMA:
        q_desc_a = _descriptor(Q, B, H, Lq, D, stride_qb * ALIGN, stride_qh * ALIGN, stride_qm * ALIGN, BLOCK_M, DA)
        k_desc_a = _descriptor(K, B, H, Lk, D, stride_kb * ALIGN, stride_kh * ALIGN, stride_kn * ALIGN, BLOCK_N, DA)
        v_desc_a = _descriptor(V, B, H, Lk, D, stride_vb * ALIGN, stride_vh * ALIGN, stride_vn * ALIGN, BLOCK_N, DA)
        o_desc_a = _descriptor(O, B, H, Lq, D, stride_ob * ALIGN, stride_oh * ALIGN, stride_om * ALIGN, BLOCK_M, DA)
        if DB > 0:
            q_desc_b = _descriptor(Q, B, H, Lq, D, stride_qb * ALIGN, stride_qh * ALIGN, stride_qm * ALIGN,
                                   BLOCK_M, DB)
            k_desc_b = _descriptor(K, B, H, Lk, D, stride_kb * ALIGN, stride_kh * ALIGN, stride_kn * ALIGN,
                                   BLOCK_N, DB)
            v_desc_b = _descriptor(V, B, H, Lk, D, stride_vb * ALIGN, stride_vh * ALIGN, stride_vn * ALIGN,
                                   BLOCK_N, DB)
            o_desc_b = _descriptor(O, B, H, Lq, D, stride_ob * ALIGN, stride_oh * ALIGN, stride_om * ALIGN,
                                   BLOCK_M, DB)
    row0 = (pid_m * BLOCK_M).to(tl.int32)
    q_a = _load_rows(q_base, q_desc_a, b32, h32, row0, rows, valid_m, stride_qm * ALIGN, 0, DA, D, True, USE_TMA,
                     BLOCK_M).to(DOT_DTYPE)
    q_b = q_a                                      # placeholder when D is a power of two (DB = 0): never read
    if DB > 0:
        q_b = _load_rows(q_base, q_desc_b, b32, h32, row0, rows, valid_m, stride_qm * ALIGN, DA, DB, D, True,
                         USE_TMA, BLOCK_M).to(DOT_DTYPE)
    n_end = Lk
    if HAS_KL:
        n_end = tl.load(KL + b)          # already clamped to [0, Lk] on the host side
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, DA], tl.float32)
    acc_b = acc_a
    if DB > 0:
        acc_b = tl.zeros([BLOCK_M, DB], tl.float32)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):      # blocks of valid keys only: no mask
        acc_a, acc_b, m_i, l_i = _fwd_block(acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, k_desc_a, k_desc_b,
                                            v_desc_a, v_desc_b, b32, h32, start_n, n_end, stride_kn * ALIGN,
                                            stride_vn * ALIGN, qk_scale, D, DA, DB, False, USE_TMA, PRECISION,
                                            DOT_DTYPE, BLOCK_N)
    if n_full < n_end:                              # the block that straddles the end of the valid keys
        acc_a, acc_b, m_i, l_i = _fwd_block(acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, k_desc_a, k_desc_b,
                                            v_desc_a, v_desc_b, b32, h32, n_full, n_end, stride_kn * ALIGN,
                                            stride_vn * ALIGN, qk_scale, D, DA, DB, True, USE_TMA, PRECISION,
                                            DOT_DTYPE, BLOCK_N)
    # key_length 0: nothing visited, l = 0 -> output 0 and LSE = +inf (so that a recomputed P is 0).
    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    o_base = O + (b * stride_ob + h * stride_oh) * ALIGN
    o_a = (acc_a * inv_l[:, None]).to(O.dtype.element_ty)
    if USE_TMA:                                     # the descriptor drops the rows and columns past the ends
        o_desc_a.store([b32, h32, row0, 0], o_a.reshape([1, 1, BLOCK_M, DA]))
    else:
        _store_chunk(o_base, rows, valid_m, stride_om * ALIGN, o_a, 0, DA, D)
    if DB > 0:
        o_b = (acc_b * inv_l[:, None]).to(O.dtype.element_ty)
        if USE_TMA:
            o_desc_b.store([b32, h32, row0, DA], o_b.reshape([1, 1, BLOCK_M, DB]))
        else:
            _store_chunk(o_base, rows, valid_m, stride_om * ALIGN, o_b, DA, DB, D)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh.to(tl.int64) * Lq + rows, lse, mask=valid_m)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: backward
# ----------------------------------------------------------------------------------------------------------------

@_jit
def _attn_bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                         H, Lq, D: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    # Delta_i = sum_d dO_id * O_id (= rowsum(P * dP)), in fp32. Bandwidth-bound: one padded tile is fine here.
    n_blocks_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_blocks_m
    bh = pid // n_blocks_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = rows < Lq
    o = _load_chunk(O + (b * stride_ob + h * stride_oh) * ALIGN, rows, valid_m, stride_om * ALIGN, 0, BLOCK_D, D,
                    True).to(tl.float32)
    do = _load_chunk(DO + (b * stride_dob + h * stride_doh) * ALIGN, rows, valid_m, stride_dom * ALIGN, 0, BLOCK_D,
                     D, True).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Lq + rows, tl.sum(o * do, 1), mask=valid_m)


@_jit
def _dkdv_block(dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_base, do_base, lse_base, delta_base, start_m, Lq,
                stride_qm, stride_dom, qk_scale,
                D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, MASKED: tl.constexpr,
                PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query block of the dK/dV walk (transposed tiles: rows are keys). MASKED: the last, partial query block;
    its rows past Lq load as q = dO = 0 with LSE = +inf, so their P is exactly 0."""
    rows = start_m + tl.arange(0, BLOCK_M)
    valid = rows < Lq
    q_a = _load_chunk(q_base, rows, valid, stride_qm, 0, DA, D, MASKED).to(DOT_DTYPE)
    do_a = _load_chunk(do_base, rows, valid, stride_dom, 0, DA, D, MASKED).to(DOT_DTYPE)
    if MASKED:
        lse = tl.load(lse_base + rows, mask=valid, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=valid, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    s_t = tl.dot(k_a, tl.trans(q_a), input_precision=PRECISION)
    dp_t = tl.dot(v_a, tl.trans(do_a), input_precision=PRECISION)
    q_b = q_a
    do_b = do_a
    if DB > 0:
        q_b = _load_chunk(q_base, rows, valid, stride_qm, DA, DB, D, MASKED).to(DOT_DTYPE)
        do_b = _load_chunk(do_base, rows, valid, stride_dom, DA, DB, D, MASKED).to(DOT_DTYPE)
        s_t = tl.dot(k_b, tl.trans(q_b), s_t, input_precision=PRECISION)
        dp_t = tl.dot(v_b, tl.trans(do_b), dp_t, input_precision=PRECISION)
    # Padded keys (k = v = 0) are not masked here: their rows of P, dS, dK and dV are independent of the valid
    # rows and are zeroed once at the store.
    p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
    p_lo = p_t.to(do_base.dtype.element_ty).to(DOT_DTYPE)
    dv_a = tl.dot(p_lo, do_a, dv_a, input_precision=PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q_base.dtype.element_ty).to(DOT_DTYPE)
    dk_a = tl.dot(ds_t, q_a, dk_a, input_precision=PRECISION)
    if DB > 0:
        dv_b = tl.dot(p_lo, do_b, dv_b, input_precision=PRECISION)
        dk_b = tl.dot(ds_t, q_b, dk_b, input_precision=PRECISION)
    return dk_a, dk_b, dv_a, dv_b


@_jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KL, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn,
                   H, Lq, Lk, LQ_BUCKET, LK_BUCKET,
                   D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr,
                   HAS_KL: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program = one block of BLOCK_N keys of one (batch, head); it walks every query block and accumulates
    # dK = s * dS^T Q and dV = P^T dO in fp32 registers. DK and DV share one (contiguous) layout.
    n_blocks_n = tl.cdiv(Lk, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_blocks_n
    bh = pid // n_blocks_n
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_end = Lk
    if HAS_KL:
        n_end = tl.load(KL + b)
    valid_n = cols < n_end                       # padded keys get dK = dV = 0
    k_base = K + (b * stride_kb + h * stride_kh) * ALIGN
    v_base = V + (b * stride_vb + h * stride_vh) * ALIGN
    k_a = _load_chunk(k_base, cols, valid_n, stride_kn * ALIGN, 0, DA, D, True).to(DOT_DTYPE)
    v_a = _load_chunk(v_base, cols, valid_n, stride_vn * ALIGN, 0, DA, D, True).to(DOT_DTYPE)
    k_b = k_a
    v_b = v_a
    dk_a = tl.zeros([BLOCK_N, DA], tl.float32)
    dv_a = tl.zeros([BLOCK_N, DA], tl.float32)
    dk_b = dk_a
    dv_b = dv_a
    if DB > 0:
        k_b = _load_chunk(k_base, cols, valid_n, stride_kn * ALIGN, DA, DB, D, True).to(DOT_DTYPE)
        v_b = _load_chunk(v_base, cols, valid_n, stride_vn * ALIGN, DA, DB, D, True).to(DOT_DTYPE)
        dk_b = tl.zeros([BLOCK_N, DB], tl.float32)
        dv_b = tl.zeros([BLOCK_N, DB], tl.float32)
    q_base = Q + (b * stride_qb + h * stride_qh) * ALIGN
    do_base = DO + (b * stride_dob + h * stride_doh) * ALIGN
    lse_base = LSE + bh.to(tl.int64) * Lq
    delta_base = DELTA + bh.to(tl.int64) * Lq
    # A block made only of padded keys skips the walk and stores zeros.
    m_full = tl.where(pid_n * BLOCK_N < n_end, (Lq // BLOCK_M) * BLOCK_M, 0)
    for start_m in range(0, m_full, BLOCK_M):
        dk_a, dk_b, dv_a, dv_b = _dkdv_block(dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_base, do_base,
                                             lse_base, delta_base, start_m, Lq, stride_qm * ALIGN,
                                             stride_dom * ALIGN, qk_scale, D, DA, DB, False, PRECISION, DOT_DTYPE,
                                             BLOCK_M)
    if (pid_n * BLOCK_N < n_end) & (Lq % BLOCK_M != 0):
        dk_a, dk_b, dv_a, dv_b = _dkdv_block(dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_base, do_base,
                                             lse_base, delta_base, (Lq // BLOCK_M) * BLOCK_M, Lq,
                                             stride_qm * ALIGN, stride_dom * ALIGN, qk_scale, D, DA, DB, True,
                                             PRECISION, DOT_DTYPE, BLOCK_M)
    out_base = (b * stride_dkb + h * stride_dkh) * ALIGN
    in_range = cols < Lk
    keep = valid_n[:, None]
    _store_chunk(DK + out_base, cols, in_range, stride_dkn * ALIGN,
                 tl.where(keep, dk_a * sm_scale, 0.0).to(DK.dtype.element_ty), 0, DA, D)
    _store_chunk(DV + out_base, cols, in_range, stride_dkn * ALIGN,
                 tl.where(keep, dv_a, 0.0).to(DV.dtype.element_ty), 0, DA, D)
    if DB > 0:
        _store_chunk(DK + out_base, cols, in_range, stride_dkn * ALIGN,
                     tl.where(keep, dk_b * sm_scale, 0.0).to(DK.dtype.element_ty), DA, DB, D)
        _store_chunk(DV + out_base, cols, in_range, stride_dkn * ALIGN,
                     tl.where(keep, dv_b, 0.0).to(DV.dtype.element_ty), DA, DB, D)


@_jit
def _dq_block(dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_base, v_base, start_n, n_end, stride_kn, stride_vn,
              qk_scale, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, MASKED: tl.constexpr,
              PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the dQ walk. MASKED: the block straddling n_end, where P of padded keys must be zeroed."""
    cols = start_n + tl.arange(0, BLOCK_N)
    valid = cols < n_end
    k_a = _load_chunk(k_base, cols, valid, stride_kn, 0, DA, D, MASKED).to(DOT_DTYPE)
    v_a = _load_chunk(v_base, cols, valid, stride_vn, 0, DA, D, MASKED).to(DOT_DTYPE)
    s = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
    dp = tl.dot(do_a, tl.trans(v_a), input_precision=PRECISION)
    k_b = k_a
    if DB > 0:
        k_b = _load_chunk(k_base, cols, valid, stride_kn, DA, DB, D, MASKED).to(DOT_DTYPE)
        v_b = _load_chunk(v_base, cols, valid, stride_vn, DA, DB, D, MASKED).to(DOT_DTYPE)
        s = tl.dot(q_b, tl.trans(k_b), s, input_precision=PRECISION)
        dp = tl.dot(do_b, tl.trans(v_b), dp, input_precision=PRECISION)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if MASKED:
        # A padded key was loaded as k = 0, so its score is 0 and P = 2^(-LSE): for a row whose valid scores are
        # all strongly negative that overflows to inf, and inf * (k = 0) in the next dot would be NaN.
        p = tl.where(valid[None, :], p, 0.0)
    ds = (p * (dp - delta[:, None])).to(k_base.dtype.element_ty).to(DOT_DTYPE)
    dq_a = tl.dot(ds, k_a, dq_a, input_precision=PRECISION)
    if DB > 0:
        dq_b = tl.dot(ds, k_b, dq_b, input_precision=PRECISION)
    return dq_a, dq_b


@_jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KL, qk_scale, sm_scale,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm,
                 H, Lq, Lk, LQ_BUCKET, LK_BUCKET,
                 D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, ALIGN: tl.constexpr,
                 HAS_KL: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program = one block of BLOCK_M queries; it walks the valid key blocks and accumulates dQ = s * dS K.
    n_blocks_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_blocks_m
    bh = pid // n_blocks_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = rows < Lq
    q_base = Q + (b * stride_qb + h * stride_qh) * ALIGN
    do_base = DO + (b * stride_dob + h * stride_doh) * ALIGN
    q_a = _load_chunk(q_base, rows, valid_m, stride_qm * ALIGN, 0, DA, D, True).to(DOT_DTYPE)
    do_a = _load_chunk(do_base, rows, valid_m, stride_dom * ALIGN, 0, DA, D, True).to(DOT_DTYPE)
    q_b = q_a
    do_b = do_a
    dq_a = tl.zeros([BLOCK_M, DA], tl.float32)
    dq_b = dq_a
    if DB > 0:
        q_b = _load_chunk(q_base, rows, valid_m, stride_qm * ALIGN, DA, DB, D, True).to(DOT_DTYPE)
        do_b = _load_chunk(do_base, rows, valid_m, stride_dom * ALIGN, DA, DB, D, True).to(DOT_DTYPE)
        dq_b = tl.zeros([BLOCK_M, DB], tl.float32)
    row_base = bh.to(tl.int64) * Lq
    lse = tl.load(LSE + row_base + rows, mask=valid_m, other=float("inf"))
    delta = tl.load(DELTA + row_base + rows, mask=valid_m, other=0.0)
    k_base = K + (b * stride_kb + h * stride_kh) * ALIGN
    v_base = V + (b * stride_vb + h * stride_vh) * ALIGN
    n_end = Lk
    if HAS_KL:
        n_end = tl.load(KL + b)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):      # blocks of valid keys only: no mask
        dq_a, dq_b = _dq_block(dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_base, v_base, start_n, n_end,
                               stride_kn * ALIGN, stride_vn * ALIGN, qk_scale, D, DA, DB, False, PRECISION,
                               DOT_DTYPE, BLOCK_N)
    if n_full < n_end:
        dq_a, dq_b = _dq_block(dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_base, v_base, n_full, n_end,
                               stride_kn * ALIGN, stride_vn * ALIGN, qk_scale, D, DA, DB, True, PRECISION,
                               DOT_DTYPE, BLOCK_N)
    dq_base = DQ + (b * stride_dqb + h * stride_dqh) * ALIGN
    _store_chunk(dq_base, rows, valid_m, stride_dqm * ALIGN, (dq_a * sm_scale).to(DQ.dtype.element_ty), 0, DA, D)
    if DB > 0:
        _store_chunk(dq_base, rows, valid_m, stride_dqm * ALIGN, (dq_b * sm_scale).to(DQ.dtype.element_ty),
                     DA, DB, D)


# ----------------------------------------------------------------------------------------------------------------
# Autotuning and launches
# ----------------------------------------------------------------------------------------------------------------

# Interpreter / fallback block sizes: small tiles keep TRITON_INTERPRET=1 fast and exercise the multi-block loops.
_INTERPRET_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32)


def split_head_dim(D):
    """(DA, DB): the head dim as a power-of-two chunk DA plus a tail padded to the power of two DB (0: no tail).
    Two chunks are used only when they compute fewer columns than one padded tile (tl.dot needs K >= 16)."""
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"attention_triton: head dim D={D} is outside 1..{MAX_HEAD_DIM}")
    whole = max(16, 1 << (D - 1).bit_length())            # next power of two >= D, at least 16
    da = 1 << (D.bit_length() - 1)                        # largest power of two <= D
    if da == D or da < 16:
        return whole, 0
    db = max(16, 1 << (D - da - 1).bit_length())
    if da + db >= whole:
        return whole, 0
    return da, db


# Autotune configurations, (BLOCK_M, BLOCK_N, warps, stages, head dims), chosen from the compile-only report
# (`python kernels/bench.py --compile-only 90`, BENCHMARKS.md): on sm_90 each of them lowers its dots to wgmma,
# fits in shared memory and does not spill at the head dims it is listed for (the head dims are DA + DB, the
# columns computed). Where several remain, the autotuner times them on the device.
_FWD_CONFIGS = [
    (128, 128, 8, 3, (1, 128)), (128, 128, 8, 2, (1, 128)), (128, 64, 8, 3, (1, 128)), (128, 64, 8, 2, (1, 256)),
    (128, 64, 4, 3, (1, 80)), (128, 64, 4, 4, (1, 80)), (128, 32, 8, 2, (129, 256)), (64, 64, 4, 3, (1, 128)),
    (64, 64, 4, 2, (1, 256)), (64, 64, 8, 2, (129, 256)), (64, 32, 4, 2, (1, 256)),
]
# dK/dV: BLOCK_N keys are the rows of its dots (wgmma needs 64 of them); the dK, dV accumulators and the K, V
# tiles all live in registers, so large head dims take short query blocks. At D = 256 the best tile still
# spills 80 bytes per thread (no preset uses D > 160).
_DKDV_CONFIGS = [
    (64, 128, 8, 2, (1, 96)), (64, 64, 8, 2, (1, 128)), (64, 64, 4, 2, (1, 96)), (32, 128, 8, 2, (1, 128)),
    (32, 64, 8, 3, (1, 128)), (32, 64, 8, 2, (1, 160)), (16, 64, 8, 2, (129, 256)),
]
# dQ: BLOCK_M queries are the rows of its dots, so no 32-row tiles (they lower to mma.sync instead of wgmma).
_DQ_CONFIGS = [
    (64, 128, 8, 2, (1, 128)), (64, 128, 8, 3, (1, 128)), (128, 64, 8, 2, (1, 128)), (64, 64, 4, 3, (1, 128)),
    (64, 64, 4, 2, (1, 160)), (64, 64, 8, 2, (1, 256)), (64, 32, 4, 2, (1, 256)),
]


def _configs(table):
    """triton.Config objects of a table above, each tagged with the head dims it is meant for."""
    out = []
    for m, n, w, st, dims in table:
        cfg = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
        cfg.head_dims = dims
        out.append(cfg)
    return out


def _prune(configs, named_args=None, **kwargs):
    """Keep the configurations listed for this head dim (DA + DB columns)."""
    d = kwargs.get("DA", 64) + kwargs.get("DB", 0)
    kept = [c for c in configs if c.head_dims[0] <= d <= c.head_dims[1]]
    return kept or configs[-1:]


if triton is not None and not INTERPRET:
    # Keyed on power-of-two length buckets (not exact lengths: text lengths vary per batch), the head dim split,
    # the key mask (self- and cross-attention tune apart), the precision, the stride alignment and (forward) TMA or
    # pointer loads; triton adds the tensors' dtypes to the key itself.
    _KEY = ["LQ_BUCKET", "LK_BUCKET", "D", "HAS_KL", "PRECISION", "ALIGN"]
    _PRUNE = {"early_config_prune": _prune}
    _attn_fwd_tuned = triton.autotune(configs=_configs(_FWD_CONFIGS), key=_KEY + ["USE_TMA"],
                                      prune_configs_by=_PRUNE)(_attn_fwd)
    _attn_bwd_dkdv_tuned = triton.autotune(configs=_configs(_DKDV_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)(
        _attn_bwd_dkdv)
    _attn_bwd_dq_tuned = triton.autotune(configs=_configs(_DQ_CONFIGS), key=_KEY, prune_configs_by=_PRUNE)(
        _attn_bwd_dq)
else:
    _attn_fwd_tuned, _attn_bwd_dkdv_tuned, _attn_bwd_dq_tuned = _attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq


def _tl_dtypes():
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16} if tl else {}


_TL_DTYPE = _tl_dtypes()


def stride_alignment(dtype, *tensors):
    """The largest power of two ALIGN <= 16 bytes / element size that divides the batch, head and row strides of
    every tensor: the kernels index in units of ALIGN elements, so the compiler knows each row start is
    ALIGN * element-size bytes aligned (16 bytes for rows of 72 or 40 bf16 elements, which the JIT does not mark)."""
    align = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    strides = [s for t in tensors for s in t.stride()[:3]]
    while align > 1 and any(s % align for s in strides):
        align //= 2
    return align


# TMA (tensor descriptors) for the forward kernel: on sm_90+ when the installed triton has them and every
# tensor's strides and base are 16-byte aligned. KERNELS_TMA=0 forces the pointer path (for comparisons; the
# bench times both), KERNELS_TMA=1 asks for it anywhere triton can build it (the interpreter tests use that).
_HAS_DESCRIPTORS = tl is not None and hasattr(tl, "make_tensor_descriptor")
_allocator_set = False


def _tma_setting():
    return os.environ.get("KERNELS_TMA", "auto").strip().lower()


def tma_eligible(align, *tensors):
    """True when the forward runs through TMA descriptors for these tensors (see the comment above)."""
    setting = _tma_setting()
    if not _HAS_DESCRIPTORS or setting in ("0", "off", "false"):
        return False
    t = tensors[0]
    if align * t.element_size() != 16 or any(x.data_ptr() % 16 for x in tensors):
        return False
    if setting in ("1", "on", "true"):
        wanted = True
    else:
        wanted = t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9
    if wanted and t.is_cuda:
        _ensure_tma_allocator()
    return wanted


def _ensure_tma_allocator():
    """Descriptors made on the device need a small global workspace per launch, which triton asks for through
    the allocator set here (once per process, unless the user set one)."""
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))
        _allocator_set = True


def _units(t, align):
    return [s // align for s in t.stride()[:3]]


def _launch_args(q, k, key_lengths, scale):
    """Common launch values: kl tensor (or a dummy), HAS_KL, qk_scale (log2 units), dot precision, length buckets
    (autotune key), dot operand dtype, head dim split."""
    Lq, D = q.shape[2:]
    Lk = k.shape[2]
    kl = key_lengths
    if kl is None:
        kl = torch.zeros(1, dtype=torch.int32, device=q.device)      # never read (HAS_KL=False)
    # Only fp32 operands look at this: TF32 tensor cores when torch allows them, else IEEE.
    precision = "tf32"
    if q.dtype == torch.float32 and not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        precision = "ieee"
    buckets = (triton.next_power_of_2(Lq), triton.next_power_of_2(Lk))
    # Under the interpreter, tl.dot on bf16 multiplies the uint16 storage (triton 3.9): dot operands are rounded
    # to bf16 and then widened to fp32 there, which is what tensor cores compute (exact products, fp32 sums).
    dot_dtype = _TL_DTYPE[q.dtype]
    if q.dtype == torch.bfloat16 and INTERPRET:
        dot_dtype = tl.float32
    da, db = split_head_dim(D)
    return kl, key_lengths is not None, scale * LOG2E, precision, buckets, dot_dtype, da, db


def _flash_fwd(q, k, v, key_lengths, scale):
    """Launch the forward kernel; returns (o, lse2) with lse2 [B*H, Lq] fp32 in log2 units."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kl, has_kl, qk_scale, precision, (lqb, lkb), dot_dtype, da, db = _launch_args(q, k, key_lengths, scale)
    o = _empty(q.shape, q.dtype, q.device)
    lse = _empty((B * H, Lq), torch.float32, q.device)
    align = stride_alignment(q.dtype, q, k, v, o)
    use_tma = tma_eligible(align, q, k, v, o)
    extra = dict(_INTERPRET_BLOCKS) if INTERPRET else {}
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    _attn_fwd_tuned[grid](q, k, v, o, lse, kl, qk_scale, *_units(q, align), *_units(k, align), *_units(v, align),
                          *_units(o, align), B, H, Lq, Lk, lqb, lkb, D=D, DA=da, DB=db, ALIGN=align, HAS_KL=has_kl,
                          PRECISION=precision, DOT_DTYPE=dot_dtype, USE_TMA=use_tma, **extra)
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, key_lengths, scale):
    """Launch preprocess, dK/dV and dQ kernels; returns (dq, dk, dv) in the input dtype (contiguous)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kl, has_kl, qk_scale, precision, (lqb, lkb), dot_dtype, da, db = _launch_args(q, k, key_lengths, scale)
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)       # dk and dv share one layout (contiguous)
    align = stride_alignment(q.dtype, q, k, v, o, do, dq, dk)
    delta = _empty((B * H, Lq), torch.float32, q.device)
    block_d = max(16, triton.next_power_of_2(D))
    pre_m = 64 if block_d <= 64 else 32
    _attn_bwd_preprocess[(triton.cdiv(Lq, pre_m) * B * H,)](
        o, do, delta, *_units(o, align), *_units(do, align), H, Lq, D=D, ALIGN=align, BLOCK_M=pre_m,
        BLOCK_D=block_d)
    extra = dict(_INTERPRET_BLOCKS) if INTERPRET else {}
    strides = (*_units(q, align), *_units(k, align), *_units(v, align), *_units(do, align))
    consts = dict(D=D, DA=da, DB=db, ALIGN=align, HAS_KL=has_kl, PRECISION=precision, DOT_DTYPE=dot_dtype, **extra)
    grid_n = lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]) * B * H,)  # noqa: E731
    _attn_bwd_dkdv_tuned[grid_n](q, k, v, do, lse, delta, dk, dv, kl, qk_scale, scale, *strides, *_units(dk, align),
                                 H, Lq, Lk, lqb, lkb, **consts)
    grid_m = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    _attn_bwd_dq_tuned[grid_m](q, k, v, do, lse, delta, dq, kl, qk_scale, scale, *strides, *_units(dq, align),
                               H, Lq, Lk, lqb, lkb, **consts)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function and the Triton entry point
# ----------------------------------------------------------------------------------------------------------------

def _last_dim_contiguous(t):
    """The kernels take any batch / head / row strides; only the head dim itself must be contiguous."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


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
        dq, dk, dv = _flash_bwd(_last_dim_contiguous(do), q, k, v, o, lse, key_lengths, ctx.scale)
        return dq, dk, dv, None, None


_warned = set()


def _fallback(reason, q, k, v, key_lengths, scale):
    """Shapes the Triton path cannot take run on the reference path, with one warning per reason."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"kernels.attention: {reason}; using the PyTorch reference path (SDPA) for such calls",
                      stacklevel=3)
    return attention_reference(q, k, v, key_lengths, scale)


def attention_triton(q, k, v, key_lengths=None, scale=None):
    """Triton FlashAttention-2 (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("attention_triton: triton is not installed (use attention_reference)")
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        # Same contract as SDPA under autocast (bf16 autocast): run in the autocast dtype.
        dt = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    scale = _check(q, k, v, key_lengths, scale)
    if not INTERPRET and not q.is_cuda:
        raise ValueError(f"attention_triton: q, k, v must be CUDA tensors (got {q.device}); CPU tensors run the "
                         f"Triton source only under TRITON_INTERPRET=1, otherwise use attention_reference")
    if key_lengths is not None and key_lengths.device != q.device:
        key_lengths = key_lengths.to(q.device, non_blocking=True)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention_triton: dtype {q.dtype} not supported (float32, float16, bfloat16)")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if D > MAX_HEAD_DIM:
        return _fallback(f"head dim D={D} > {MAX_HEAD_DIM}", q, k, v, key_lengths, scale)
    if q.numel() == 0:                      # nothing to launch
        return attention_reference(q, k, v, key_lengths, scale)
    if triton.cdiv(max(Lq, Lk), 16) * B * H > MAX_PROGRAMS:
        return _fallback(f"B*H*L = {B * H * max(Lq, Lk)} needs more than 2^31-1 programs", q, k, v, key_lengths,
                         scale)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if key_lengths is not None:
        key_lengths = key_lengths.to(dtype=torch.int32).clamp(0, Lk).contiguous()
    return _FlashAttention.apply(q, k, v, key_lengths, scale)

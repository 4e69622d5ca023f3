"""Throughput of the Triton kernels against PyTorch, measured in one run on one GPU.

    python kernels/bench.py                  # full table (markdown), bf16
    python kernels/bench.py --quick          # fewer sizes, for a smoke run
    python kernels/bench.py --compile-only 90   # no GPU needed: compile every kernel x config for sm_90 and report
                                                # shared memory / registers / spills (triton ahead-of-time compile)

Attention: forward, backward and forward+backward TFLOP/s for D in {64, 128}, L = Lq = Lk in {256, 1024, 4096},
non-causal, B*L = 16384 tokens and H*D = 2048, against torch.nn.functional.scaled_dot_product_attention with
each backend that runs here (flash, cuDNN, efficient); FLOPs: forward 4*B*H*Lq*Lk*D (two matmuls), backward
2.5x that (five matmuls), forward+backward 3.5x. The ratio column is ours / the best SDPA backend.
RMSNorm: forward and forward+backward GB/s for hidden 64, 1536, 4096, 8192 over 2^26 elements, against eager
torch.nn.functional.rms_norm and torch.compile of the reference formula, plus a device-to-device copy (the
bandwidth ceiling). Bytes = tensors read + written: forward x, y (2*M*N*e); forward+backward x, y, x, dy, dx
(5*M*N*e); the O(N) weight and O(M) rstd terms are left out.

Before timing, every kernel is re-checked against the reference path on the GPU. Without CUDA this prints that,
runs a CPU self-check of the reference path against float64 math, and exits 0 (1 if the self-check fails).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):               # `python kernels/bench.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.attention import attention_reference, attention_triton  # noqa: E402
from kernels.rmsnorm import rms_norm_reference, rms_norm_triton  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# CPU self-check (no CUDA): the reference path against float64 math
# ----------------------------------------------------------------------------------------------------------------

def cpu_self_check():
    """Reference attention and RMSNorm (forward and gradients) vs float64 formulas; returns a list of failures."""
    torch.manual_seed(0)
    failures = []
    B, H, Lq, Lk, D = 2, 3, 37, 21, 24
    q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for n in (Lq, Lk, Lk))
    kl = torch.tensor([21, 5])
    o = attention_reference(q, k, v, key_lengths=kl)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (q64 @ k64.transpose(-1, -2)) / math.sqrt(D)
    s = s.masked_fill(~(torch.arange(Lk)[None, :] < kl[:, None])[:, None, None, :], float("-inf"))
    o64 = s.softmax(-1) @ v64
    grads64 = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads), (o64, *grads64)):
        err = (a.double() - b).abs().max().item()
        if not err < 1e-5:
            failures.append(f"attention {name}: max error {err:.2e}")
    x = torch.randn(4, 7, 96, requires_grad=True)
    w = torch.randn(96, requires_grad=True)
    y = rms_norm_reference(x, w, eps=1e-6)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    gx64, gw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    for name, a, b in (("y", y, y64), ("dx", gx, gx64), ("dw", gw, gw64)):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        if not err < 1e-5:
            failures.append(f"rms_norm {name}: relative error {err:.2e}")
    return failures


# ----------------------------------------------------------------------------------------------------------------
# Compile-only report (no GPU): does every kernel x autotune config build for a target, and does it fit?
# ----------------------------------------------------------------------------------------------------------------

# Max dynamic shared memory per block (bytes) by compute capability; configs above it are dropped by the autotuner.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}

# Head dims of the compile-only report: every head dim a preset uses (kernels/model_calls.py lists the calls).
REPORT_HEAD_DIMS = (40, 64, 72, 80, 96, 128, 160, 256)


def _jit_attrs(fn, values):
    """The specialisation triton's JIT gives a call with these argument values: pointers (torch allocations are
    16-byte aligned) and integers that are multiples of 16 get `tt.divisibility = 16`; other integers get nothing.
    Compiling with these attributes (rather than marking every stride) is what makes the report match the run."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        v = values.get(name)
        if isinstance(v, str) or (isinstance(v, int) and v % 16 == 0 and v != 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _ptx_features(ptx):
    """What the generated code does with memory and matmuls, read off the PTX: cp.async count and its widest copy
    (bytes), TMA copies, widest plain global load (bytes), wgmma vs mma.sync instruction counts."""
    import re
    cp = [int(x, 0) for x in re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*?,\s*(0x[0-9a-f]+|\d+)\s*[,;]", ptx)]
    loads = re.findall(r"ld\.global(?:\.[a-zA-Z0-9:_]+)*?(?:\.v(\d))?\.(?:b|u|s|f)(\d+)", ptx)
    widest = max((int(v or 1) * int(bits) // 8 for v, bits in loads), default=0)
    return dict(cp_async=len(cp), cp_bytes=max(cp, default=0), tma=ptx.count("cp.async.bulk.tensor"),
                load_bytes=widest, wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"))


def _compile(fn, types, consts, values, target, num_warps, num_stages):
    """Ahead-of-time compile of one kernel specialisation; returns (shared bytes, registers, spill bytes, PTX
    features). Spills: cuobjdump's STACK (the per-thread stack frame, where ptxas puts spilled registers) plus LOCAL
    (explicit local memory); LOCAL alone reads 0 even when a kernel spills."""
    import subprocess
    import tempfile

    import triton
    from triton.compiler import ASTSource
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    pointers = {n: "ptr" for n in fn.arg_names if sig[n].startswith("*")}
    src = ASTSource(fn, sig, constexprs=consts, attrs=_jit_attrs(fn, {**values, **pointers}))
    k = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    regs = spill = -1
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(k.asm["cubin"])
            out = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
        fields = dict(kv.split(":", 1) for kv in out.split() if kv.split(":")[0] in ("REG", "STACK", "LOCAL"))
        regs = int(fields.get("REG", -1))
        spill = int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
    return k.metadata.shared, regs, spill, _ptx_features(k.asm["ptx"])


def _attention_call_values(D, dtype_bytes, L=1024, B=2, align=None):
    """Argument values of a representative call (contiguous [B, H, L, D], H * D = 2048 where D divides it, else
    H = 16), as the wrapper passes them: strides in units of ALIGN elements (kernels/attention.py)."""
    A = sys.modules["kernels.attention"]
    H = 2048 // D if 2048 % D == 0 else 16
    if align is None:
        align = 16 // dtype_bytes
        while align > 1 and ((H * L * D) % align or (L * D) % align or D % align):
            align //= 2
    batch, head, row = H * L * D // align, L * D // align, D // align
    values = dict(H=H, Lq=L, Lk=L, LQ_BUCKET=L, LK_BUCKET=L)
    for t, row_name in (("q", "m"), ("k", "n"), ("v", "n"), ("o", "m"), ("do", "m"), ("dq", "m"), ("dk", "n")):
        values.update({f"stride_{t}b": batch, f"stride_{t}h": head, f"stride_{t}{row_name}": row})
    da, db = A.split_head_dim(D)
    return values, dict(D=D, DA=da, DB=db, ALIGN=align)


def compile_report(arch, dtype_name, quick):
    """Compile the attention kernels (every autotune config the pruning keeps, each head dim of REPORT_HEAD_DIMS)
    and the RMSNorm kernels (hidden sizes of the bench) for sm_<arch>; print resources and what the code does
    (spills, cp.async / TMA, vector load width, wgmma / mma.sync); returns 1 if a kernel fails to build or has no
    config that fits in shared memory."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    A, R = sys.modules["kernels.attention"], sys.modules["kernels.rmsnorm"]
    if A.INTERPRET:
        print("--compile-only needs TRITON_INTERPRET unset")
        return 1
    target = GPUTarget("cuda", arch, 32)
    limit = SHARED_LIMIT.get(arch, 101376)
    t, tl_dtype = f"*{dtype_name}", {"bf16": tl.bfloat16, "fp16": tl.float16}[dtype_name]
    types = dict(Q=t, K=t, V=t, O=t, DO=t, DQ=t, DK=t, DV=t, LSE="*fp32", DELTA="*fp32", KL="*i32",
                 qk_scale="fp32", sm_scale="fp32", X=t, Y=t, DY=t, DX=t, W="*fp32", RSTD="*fp32", DW_PARTIAL="*fp32",
                 eps="fp32")
    print(f"compile-only report for sm_{arch} ({dtype_name}; shared-memory limit {limit // 1024} KiB per block), "
          f"triton {triton.__version__}")
    print("Attention: a contiguous [2, H, 1024, D] call with the JIT's run-time specialisation (strides in units of "
          "ALIGN elements). cp.async: count / widest copy in bytes; loads: widest plain global load in bytes; "
          "spill: cuobjdump STACK + LOCAL bytes per thread.\n")
    print("| kernel | shape | config | shared KiB | registers | spill bytes | cp.async | TMA | loads | wgmma "
          "| mma.sync | fits |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = 0

    def row(name, shape, config, result):
        sh, regs, spill, f = result
        print(f"| {name} | {shape} | {config} | {sh / 1024:.0f} | {regs} | {spill} | {f['cp_async']} / "
              f"{f['cp_bytes']} B | {f['tma']} | {f['load_bytes']} B | {f['wgmma']} | {f['mma_sync']} | "
              f"{'yes' if sh <= limit else 'no'} |")
        return sh <= limit

    dims = (64, 72) if quick else REPORT_HEAD_DIMS
    for D in dims:
        values, dconsts = _attention_call_values(D, 2)
        for name, fn, table in (("attn fwd", A._attn_fwd, A._FWD_CONFIGS),
                                ("attn dK/dV", A._attn_bwd_dkdv, A._DKDV_CONFIGS),
                                ("attn dQ", A._attn_bwd_dq, A._DQ_CONFIGS)):
            cfgs = A._prune(A._configs(table), **dconsts)
            fits = 0
            for cfg in (cfgs[:1] if quick else cfgs):
                bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                consts = dict(dconsts, HAS_KL=True, PRECISION="tf32", DOT_DTYPE=tl_dtype, BLOCK_M=bm, BLOCK_N=bn)
                if fn is A._attn_fwd:          # the forward takes TMA descriptors on sm_90+ (as at run time)
                    consts["USE_TMA"] = arch >= 90 and A._HAS_DESCRIPTORS
                shape = f"D={D} ({dconsts['DA']}+{dconsts['DB']}, ALIGN {dconsts['ALIGN']})"
                config = f"{bm}x{bn}, {cfg.num_warps} warps, {cfg.num_stages} stages"
                try:
                    result = _compile(fn, types, consts, values, target, cfg.num_warps, cfg.num_stages)
                except Exception as e:  # noqa: BLE001  (report every failing config, then fail)
                    print(f"| {name} | {shape} | {config} | FAILED: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]} | | | | | | | no |")
                    continue
                fits += row(name, shape, config, result)
            if not fits:
                print(f"no {name} config builds and fits for D={D}")
                failed = 1
    for N in ((1536,) if quick else (16, 64, 1536, 4096, 8192, 12288, 16384)):
        for name, fn, (block_n, rows, warps) in (("rmsnorm fwd", R._rms_fwd, R._tile(N)),
                                                 ("rmsnorm bwd", R._rms_bwd, R._tile(N, backward=True))):
            values = dict(M=1 << 20, N=N)
            try:
                result = _compile(fn, types, dict(HAS_W=True, ROWS=rows, BLOCK_N=block_n), values, target, warps, 3)
            except Exception as e:  # noqa: BLE001
                print(f"| {name} | N={N} | FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]} "
                      f"| | | | | | | | | no |")
                failed = 1
                continue
            row(name, f"N={N}", f"{rows} rows x {block_n}, {warps} warps", result)
    print("\ncompile-only: " + ("FAILED" if failed else "every kernel builds, with at least one fitting config"))
    return failed


# ----------------------------------------------------------------------------------------------------------------
# GPU correctness re-check
# ----------------------------------------------------------------------------------------------------------------

def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def _fused_qkv_views(B, H, L, D, dtype):
    """q, k, v as the models make them: [B, H, L, D] views of one [B, L, 3, H, D] projection (no copies)."""
    qkv = torch.randn(B, L, 3, H, D, device="cuda", dtype=dtype)
    return [t.permute(0, 2, 1, 3) for t in qkv.unbind(2)]


def gpu_check(dtype):
    """Triton vs the reference path on the GPU (forward and gradients, all finite); returns a list of failures.
    Includes the inputs of the dQ defect (kernels issue 18: one valid key, inputs scaled x3 in fp16 and x30 in
    bf16), the head dims that are not powers of two (40, 72, 80, 160), D = 256, and strided fused-qkv views."""
    torch.manual_seed(0)
    failures = []
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    mult = 3.0 if dtype == torch.float16 else 30.0
    # (B, H, Lq, Lk, D, key lengths, input scale, strided)
    cases = [(2, 4, 1000, 1000, 64, None, 1.0, False), (2, 3, 257, 77, 128, [77, 9], 1.0, False),
             (1, 2, 1, 300, 80, None, 1.0, False), (2, 2, 4096, 4096, 64, [4096, 1000], 1.0, False),
             (2, 4, 333, 1, 64, None, mult, False), (3, 2, 129, 40, 64, [0, 1, 40], mult, False),
             (2, 16, 256, 256, 72, None, 1.0, True), (2, 8, 1024, 130, 40, [130, 3], 1.0, False),
             (2, 8, 256, 256, 160, None, 1.0, True), (1, 4, 300, 17, 256, [5], mult, False)]
    for B, H, Lq, Lk, D, kl, scale_in, strided in cases:
        if strided:
            q, k, v = _fused_qkv_views(B, H, Lq, D, dtype)
            q, k = q * scale_in, k * scale_in
        else:
            q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dtype) for n in (Lq, Lk, Lk))
            q, k = q * scale_in, k * scale_in
        key_lengths = None if kl is None else torch.tensor(kl, device="cuda")
        do = torch.randn(B, H, Lq, D, device="cuda", dtype=dtype)
        outs = {}
        for name, fn, tma in (("triton", attention_triton, "auto"), ("triton, pointer loads", attention_triton, "0"),
                              ("reference", attention_reference, "auto")):
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            with _tma(tma):
                o = fn(qq, kk, vv, key_lengths=key_lengths)
                o.backward(do)
            outs[name] = (o, qq.grad, kk.grad, vv.grad)
        case = (B, H, Lq, Lk, D, kl, scale_in, "strided" if strided else "contiguous")
        for path in ("triton", "triton, pointer loads"):
            for what, a, b in zip(("o", "dq", "dk", "dv"), outs[path], outs["reference"]):
                if not torch.isfinite(a).all():
                    failures.append(f"attention ({path}) {case} {what}: not finite")
                    continue
                err = _rel(a, b)
                if not err < tol * max(1.0, scale_in):
                    failures.append(f"attention ({path}) {case} {what}: relative error {err:.2e}")
    for shape in ((4096, 64), (1000, 1536), (333, 4096), (77, 8192), (3, 16384)):
        x = torch.randn(shape, device="cuda", dtype=dtype)
        w = torch.randn(shape[-1], device="cuda")
        dy = torch.randn(shape, device="cuda", dtype=dtype)
        outs = {}
        for name, fn in (("triton", rms_norm_triton), ("reference", rms_norm_reference)):
            xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = fn(xx, ww)
            y.backward(dy)
            outs[name] = (y, xx.grad, ww.grad)
        for what, a, b in zip(("y", "dx", "dw"), outs["triton"], outs["reference"]):
            err = _rel(a, b)
            if not err < tol:
                failures.append(f"rms_norm {shape} {what}: relative error {err:.2e}")
    return failures


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------

def _ms(fn, grad_to_none=None):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none)


def _sdpa_backends():
    """{name: context-manager factory} for the SDPA backends to try."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
    return {n: (lambda b=getattr(SDPBackend, a): sdpa_kernel(b)) for n, a in names.items() if hasattr(SDPBackend, a)}


def _time_attention(fn, q, k, v, ctx=None):
    """(fwd ms, bwd ms, fwd+bwd ms) of fn, or None if it does not run here."""
    import contextlib
    ctx = ctx or contextlib.nullcontext
    # detach, not clone: a clone of a strided view would be contiguous, and the strides are part of the call.
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    try:
        with ctx():
            o = fn(q, k, v)
            do = torch.randn_like(o)
            o.backward(do, retain_graph=True)
            torch.cuda.synchronize()
            fwd = _ms(lambda: fn(q, k, v))
            bwd = _ms(lambda: o.backward(do, retain_graph=True), grad_to_none=[q, k, v])
            both = _ms(lambda: fn(q, k, v).backward(do), grad_to_none=[q, k, v])
    except RuntimeError as e:         # backend not available for this shape / device
        print(f"  (skipped: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return None
    return fwd, bwd, both


@contextlib.contextmanager
def _tma(value):
    """KERNELS_TMA set to `value` inside the block (kernels/attention.py reads it per call)."""
    old = os.environ.get("KERNELS_TMA")
    os.environ["KERNELS_TMA"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KERNELS_TMA")
        else:
            os.environ["KERNELS_TMA"] = old


def bench_attention(dtype, quick):
    rows = ["| D | L | B x H | ours fwd | ours bwd | ours fwd+bwd | best SDPA fwd | best SDPA bwd | best SDPA fwd+bwd"
            " | ratio fwd | ratio bwd | ratio fwd+bwd | SDPA per backend (fwd / bwd / fwd+bwd) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    backends = _sdpa_backends()
    for D in (64, 128):
        for L in ((1024,) if quick else (256, 1024, 4096)):
            H, B = 2048 // D, max(1, 16384 // L)
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(3))
            flops = 4.0 * B * H * L * L * D
            tf = lambda ms, mult: mult * flops / (ms * 1e-3) / 1e12  # noqa: E731
            ours = _time_attention(attention_triton, q, k, v)
            with _tma("0"):                            # the forward's pointer path, for comparison with TMA
                pointers = _time_attention(attention_triton, q, k, v)
            per = {}
            for name, ctx in backends.items():
                t = _time_attention(F.scaled_dot_product_attention, q, k, v, ctx)
                if t is not None:
                    per[name] = [tf(t[0], 1), tf(t[1], 2.5), tf(t[2], 3.5)]
            mine = [tf(ours[0], 1), tf(ours[1], 2.5), tf(ours[2], 3.5)]
            per["ours, pointer loads"] = [tf(pointers[0], 1), tf(pointers[1], 2.5), tf(pointers[2], 3.5)]
            best = [max((p[i] for n, p in per.items() if not n.startswith("ours")), default=float("nan"))
                    for i in range(3)]
            detail = ", ".join(f"{n} {p[0]:.0f}/{p[1]:.0f}/{p[2]:.0f}" for n, p in per.items())
            rows.append(f"| {D} | {L} | {B} x {H} | " + " | ".join(f"{x:.0f}" for x in mine + best) + " | "
                        + " | ".join(f"{a / b:.2f}x" for a, b in zip(mine, best)) + f" | {detail} |")
    return rows


def _strided_like(shape, stride, dtype):
    """A random tensor with exactly these strides (a fresh buffer laid out like the model's view)."""
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride))
    return torch.randn(size, device="cuda", dtype=dtype).as_strided(shape, stride)


def bench_model_calls(dtype, quick, limit=None):
    """The attention calls the presets make (kernels/model_calls.py: training forwards of every script, with
    their B, H, Lq, Lk, D, key lengths and strides), timed forward and backward against every SDPA backend that
    takes the call (with key lengths: a boolean mask, which the flash backend refuses)."""
    from kernels.model_calls import attention_calls
    calls, seen = [], set()
    for c in attention_calls():
        key = (c.B, c.H, c.Lq, c.Lk, c.D, c.key_lengths, c.q_stride, c.k_stride, c.v_stride)
        if c.path == "kernels" and c.phase == "train" and key not in seen:
            seen.add(key)
            calls.append(c)
    calls = calls[:limit or (6 if quick else None)]
    rows = ["| script | preset | B x H | Lq | Lk | D | key lengths | strided | ours fwd ms | ours fwd+bwd ms "
            "| best SDPA fwd ms | best SDPA fwd+bwd ms | ratio fwd | ratio fwd+bwd | SDPA per backend "
            "(fwd / fwd+bwd ms) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    backends = _sdpa_backends()
    for c in calls:
        q = _strided_like((c.B, c.H, c.Lq, c.D), c.q_stride, dtype)
        k = _strided_like((c.B, c.H, c.Lk, c.D), c.k_stride, dtype)
        v = _strided_like((c.B, c.H, c.Lk, c.D), c.v_stride, dtype)
        kl = mask = None
        if c.key_lengths:                      # padded captions: about 60 % of the tokens are valid
            kl = torch.full((c.B,), max(1, int(0.6 * c.Lk)), device="cuda", dtype=torch.int32)
            mask = (torch.arange(c.Lk, device="cuda")[None, :] < kl[:, None])[:, None, None, :]
        ours = _time_attention(lambda a, b, d: attention_triton(a, b, d, key_lengths=kl), q, k, v)
        per = {}
        for name, ctx in backends.items():
            t = _time_attention(lambda a, b, d: F.scaled_dot_product_attention(a, b, d, attn_mask=mask), q, k, v,
                                ctx)
            if t is not None:
                per[name] = t
        best_f = min((t[0] for t in per.values()), default=float("nan"))
        best_b = min((t[2] for t in per.values()), default=float("nan"))
        detail = ", ".join(f"{n} {t[0]:.3f} / {t[2]:.3f}" for n, t in per.items())
        rows.append(f"| {c.script} | {c.preset} | {c.B} x {c.H} | {c.Lq} | {c.Lk} | {c.D} | "
                    f"{'yes' if c.key_lengths else 'no'} | {'yes' if c.strided else 'no'} | {ours[0]:.3f} | "
                    f"{ours[2]:.3f} | {best_f:.3f} | {best_b:.3f} | {best_f / ours[0]:.2f}x | {best_b / ours[2]:.2f}x "
                    f"| {detail} |")
    return rows


def bench_rms_norm(dtype, quick):
    rows = ["| hidden | rows | ours fwd | eager fwd | compiled fwd | ours fwd+bwd | eager fwd+bwd | compiled fwd+bwd"
            " | copy | ratio vs eager (fwd / fwd+bwd) | ratio vs compiled (fwd / fwd+bwd) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    compiled = torch.compile(rms_norm_reference, dynamic=False)
    eager = lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)  # noqa: E731
    for N in ((1536,) if quick else (64, 1536, 4096, 8192)):
        M = (1 << 26) // N
        e = torch.finfo(dtype).bits // 8
        x = torch.randn(M, N, device="cuda", dtype=dtype)
        w = torch.randn(N, device="cuda", dtype=dtype)
        dy = torch.randn_like(x)
        gbs = lambda ms, n_tensors: n_tensors * M * N * e / (ms * 1e-3) / 1e9  # noqa: E731
        res = {}
        for name, fn in (("ours", lambda x, w: rms_norm_triton(x, w)), ("eager", eager), ("compiled", compiled)):
            xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
            with torch.no_grad():
                fwd = _ms(lambda: fn(x, w))
            both = _ms(lambda: fn(xx, ww).backward(dy), grad_to_none=[xx, ww])
            res[name] = (gbs(fwd, 2), gbs(both, 5))
        out = torch.empty_like(x)
        copy = gbs(_ms(lambda: out.copy_(x)), 2)
        o, ea, co = res["ours"], res["eager"], res["compiled"]
        rows.append(f"| {N} | {M} | {o[0]:.0f} | {ea[0]:.0f} | {co[0]:.0f} | {o[1]:.0f} | {ea[1]:.0f} | {co[1]:.0f} | "
                    f"{copy:.0f} | {o[0] / ea[0]:.2f}x / {o[1] / ea[1]:.2f}x | "
                    f"{o[0] / co[0]:.2f}x / {o[1] / co[1]:.2f}x |")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="input dtype of the timed kernels")
    p.add_argument("--quick", action="store_true", help="one size per table (smoke run)")
    p.add_argument("--skip-check", action="store_true", help="skip the GPU correctness re-check (not recommended)")
    p.add_argument("--compile-only", type=int, default=None, metavar="SM",
                   help="no GPU needed: compile all kernels for compute capability SM (e.g. 90, 80) and report "
                        "shared memory, registers and spills instead of timing")
    args = p.parse_args(argv)

    if args.compile_only is not None:
        return compile_report(args.compile_only, args.dtype, args.quick)

    if not torch.cuda.is_available():
        print("kernels/bench.py: no CUDA device here, so nothing is timed. "
              "Running the CPU self-check of the reference path instead.")
        failures = cpu_self_check()
        for f in failures:
            print("FAIL", f)
        print("self-check failed" if failures else "self-check passed (reference attention and RMSNorm vs float64)")
        return 1 if failures else 0

    import triton
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = True
    if os.environ.get("KERNELS_REFERENCE", "0") not in ("", "0"):
        print("note: KERNELS_REFERENCE is set; this bench calls the Triton functions directly regardless")
    if not args.skip_check:
        failures = gpu_check(dtype)
        for f in failures:
            print("FAIL", f)
        if failures:
            print("GPU correctness check failed: not timing")
            return 1
        print("GPU correctness check passed (Triton vs reference path, forward and gradients)")
    props = torch.cuda.get_device_properties(0)
    print(f"\ndevice: {props.name} ({props.multi_processor_count} SMs) | date: {datetime.date.today()} | "
          f"torch {torch.__version__} | triton {triton.__version__} | CUDA {torch.version.cuda} | {args.dtype}")
    print(f"command: python kernels/bench.py{' --quick' if args.quick else ''} --dtype {args.dtype}\n")
    print("Attention, TFLOP/s (non-causal; fwd 4*B*H*L*L*D FLOPs, bwd 2.5x, fwd+bwd 3.5x)\n")
    print("\n".join(bench_attention(dtype, args.quick)))
    print("\nAttention calls of the presets (training forwards; ratio = best SDPA time / ours, > 1 means faster)\n")
    print("\n".join(bench_model_calls(dtype, args.quick)))
    print("\nRMSNorm, GB/s (fwd bytes 2*M*N*e, fwd+bwd 5*M*N*e; copy = device-to-device copy of x)\n")
    print("\n".join(bench_rms_norm(dtype, args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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


def _compile(fn, types, consts, target, num_warps, num_stages):
    """Ahead-of-time compile of one kernel specialisation; returns (shared bytes, registers, spill bytes)."""
    import subprocess
    import tempfile

    import triton
    from triton.compiler import ASTSource
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    # What the JIT assumes at run time for 16-divisible pointers and strides (it is what enables cp.async / TMA).
    aligned = [i for i, n in enumerate(fn.arg_names) if sig[n].startswith("*") or n.startswith("stride")]
    src = ASTSource(fn, sig, constexprs=consts, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    k = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    regs = spill = -1
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(k.asm["cubin"])
            out = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
        fields = dict(kv.split(":") for kv in out.split() if ":" in kv and kv.split(":")[0] in ("REG", "LOCAL"))
        regs, spill = int(fields.get("REG", -1)), int(fields.get("LOCAL", -1))
    return k.metadata.shared, regs, spill


def compile_report(arch, dtype_name, quick):
    """Compile the attention kernels (every autotune config, D in {64, 128}) and the RMSNorm kernels (hidden sizes of
    the bench) for sm_<arch>; print resources; returns 1 if a kernel fails to build or has no config that fits."""
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
          f"triton {triton.__version__}\n")
    print("| kernel | shape | config | shared KiB | registers | spill bytes | fits |\n|---|---|---|---|---|---|---|")
    failed = 0
    for D in ((64,) if quick else (64, 128)):
        for name, fn, cfgs in (("attn fwd", A._attn_fwd, A._fwd_configs()), ("attn dK/dV", A._attn_bwd_dkdv,
                               A._bwd_configs()), ("attn dQ", A._attn_bwd_dq, A._bwd_configs())):
            fits = 0
            for cfg in (cfgs[:1] if quick else cfgs):
                bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                consts = dict(D=D, HAS_KL=True, PRECISION="tf32", DOT_DTYPE=tl_dtype, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D)
                desc = f"| {name} | D={D} | {bm}x{bn}, {cfg.num_warps} warps, {cfg.num_stages} stages |"
                try:
                    sh, regs, spill = _compile(fn, types, consts, target, cfg.num_warps, cfg.num_stages)
                except Exception as e:  # noqa: BLE001  (report every failing config, then fail)
                    print(f"{desc} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | no |")
                    continue
                fits += sh <= limit
                print(f"{desc} {sh / 1024:.0f} | {regs} | {spill} | {'yes' if sh <= limit else 'no'} |")
            if not fits:
                print(f"no {name} config builds and fits for D={D}")
                failed = 1
    pre = (R._rms_fwd, R._rms_bwd)
    for N in ((1536,) if quick else (16, 64, 1536, 4096, 8192, 16384)):
        block_n, rows, warps = R._tile(N)
        for name, fn in zip(("rmsnorm fwd", "rmsnorm bwd"), pre):
            try:
                sh, regs, spill = _compile(fn, types, dict(HAS_W=True, ROWS=rows, BLOCK_N=block_n), target, warps, 3)
            except Exception as e:  # noqa: BLE001
                print(f"| {name} | N={N} | FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | no |")
                failed = 1
                continue
            print(f"| {name} | N={N} | {rows} rows x {block_n}, {warps} warps | {sh / 1024:.0f} | {regs} | {spill} | "
                  f"{'yes' if sh <= limit else 'no'} |")
    print("\ncompile-only: " + ("FAILED" if failed else "every kernel builds, with at least one fitting config"))
    return failed


# ----------------------------------------------------------------------------------------------------------------
# GPU correctness re-check
# ----------------------------------------------------------------------------------------------------------------

def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def gpu_check(dtype):
    """Triton vs the reference path on the GPU (forward and gradients); returns a list of failures."""
    torch.manual_seed(0)
    failures = []
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    for B, H, Lq, Lk, D, kl in ((2, 4, 1000, 1000, 64, None), (2, 3, 257, 77, 128, [77, 9]),
                                (1, 2, 1, 300, 80, None), (2, 2, 4096, 4096, 64, [4096, 1000])):
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dtype) for n in (Lq, Lk, Lk))
        key_lengths = None if kl is None else torch.tensor(kl, device="cuda")
        do = torch.randn(B, H, Lq, D, device="cuda", dtype=dtype)
        outs = {}
        for name, fn in (("triton", attention_triton), ("reference", attention_reference)):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            o = fn(qq, kk, vv, key_lengths=key_lengths)
            o.backward(do)
            outs[name] = (o, qq.grad, kk.grad, vv.grad)
        for what, a, b in zip(("o", "dq", "dk", "dv"), outs["triton"], outs["reference"]):
            err = _rel(a, b)
            if not err < tol:
                failures.append(f"attention {(B, H, Lq, Lk, D, kl)} {what}: relative error {err:.2e}")
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
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
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
            per = {}
            for name, ctx in backends.items():
                t = _time_attention(F.scaled_dot_product_attention, q, k, v, ctx)
                if t is not None:
                    per[name] = [tf(t[0], 1), tf(t[1], 2.5), tf(t[2], 3.5)]
            mine = [tf(ours[0], 1), tf(ours[1], 2.5), tf(ours[2], 3.5)]
            best = [max((p[i] for p in per.values()), default=float("nan")) for i in range(3)]
            detail = ", ".join(f"{n} {p[0]:.0f}/{p[1]:.0f}/{p[2]:.0f}" for n, p in per.items())
            rows.append(f"| {D} | {L} | {B} x {H} | " + " | ".join(f"{x:.0f}" for x in mine + best) + " | "
                        + " | ".join(f"{a / b:.2f}x" for a, b in zip(mine, best)) + f" | {detail} |")
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
    print("\nRMSNorm, GB/s (fwd bytes 2*M*N*e, fwd+bwd 5*M*N*e; copy = device-to-device copy of x)\n")
    print("\n".join(bench_rms_norm(dtype, args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""kernels/: the real Triton code (TRITON_INTERPRET=1, CPU tensors) and the PyTorch reference path, each checked
against float64 math written here; plus the dispatch and the bench's CPU self-check.

TRITON_INTERPRET=1 only takes effect if it is set before triton is first imported (triton decorates its own
helpers, tl.zeros etc., at import), and in a full pytest run another test file, or torch itself, may import triton
first. So the `test_triton_*` tests run where the interpreter is live: in this process when it was started with
TRITON_INTERPRET=1, otherwise in one subprocess (started by the first such test) that runs them all with the
variable set; each test here then reports the subprocess' verdict for itself.
Every kernel output is allocated NaN-filled (POISON_OUTPUTS) so an element a kernel never writes fails the test.

Tolerances (max |got - want| / max(max |want|, 1) over each tensor; inputs are rounded to the dtype first and the
float64 reference uses the rounded values, so only the kernel's own arithmetic is measured):
    fp32: 2e-5  (fp32 accumulation over <= 130 keys; observed ~1e-6)
    fp16: 5e-3  (outputs and P / dS operands rounded to fp16, 2^-11)
    bf16: 2e-2  (outputs and P / dS operands rounded to bf16, 2^-8 relative; observed ~5e-3)
A masking or indexing bug gives errors of order 1.
"""
import functools
import os
import subprocess
import sys
import tempfile
import types
import xml.etree.ElementTree as ET

import pytest
import torch

import kernels
import kernels.attention  # noqa: F401  (the module; `kernels.attention` the attribute is the function)
import kernels.rmsnorm  # noqa: F401

attn_mod = sys.modules["kernels.attention"]
rms_mod = sys.modules["kernels.rmsnorm"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _interpreter_live():
    """True when triton (and so kernels/) was imported in interpreter mode in this process."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.zeros, InterpretedFunction) and attn_mod.INTERPRET and rms_mod.INTERPRET


@functools.lru_cache(maxsize=None)
def _subprocess_verdicts():
    """Run every test_triton_* test in a TRITON_INTERPRET=1 subprocess once; {test name: None if passed, else why}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_triton_",
                            f"--junitxml={report}", os.path.abspath(__file__)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
        if not os.path.exists(report):
            return {"": f"interpreter subprocess wrote no report (rc {r.returncode}):\n"
                        f"{r.stdout[-3000:]}{r.stderr[-3000:]}"}
        verdicts = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
            verdicts[case.get("name")] = (f"in the TRITON_INTERPRET=1 subprocess: {bad[0].get('message')}\n"
                                          f"{(bad[0].text or '')[-3000:]}" if bad else None)
        return verdicts


@pytest.fixture
def run_here(request, monkeypatch):
    """Call first in a test_triton_* body. True: run the body here (interpreter live, outputs NaN-poisoned).
    False: the subprocess ran this test and it passed there (a failure there fails this test with its message)."""
    pytest.importorskip("triton")

    def decide():
        if _interpreter_live():
            monkeypatch.setattr(attn_mod, "POISON_OUTPUTS", True)
            monkeypatch.setattr(rms_mod, "POISON_OUTPUTS", True)
            return True
        verdicts = _subprocess_verdicts()
        name = request.node.name
        if name not in verdicts:
            pytest.fail(verdicts.get("", f"{name} missing from the interpreter subprocess' report"))
        if verdicts[name] is not None:
            pytest.fail(verdicts[name])
        return False
    return decide


def rel_err(got, want):
    """max |got - want| / max(max |want|, 1); NaN anywhere -> inf. The floor of 1 (inputs are O(1)) keeps a
    reference that is exactly 0 (dq with a single key) from turning rounding noise into a large ratio."""
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


def leaves(*ts, dtype=None):
    """Fresh leaf copies (optionally cast) that require grad."""
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in ts]


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------

def attention_f64(q, k, v, key_lengths, scale):
    """softmax(scale q k^T, padded keys excluded) v in float64; a row with no valid key gives 0."""
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * scale
    valid = torch.ones(s.shape[-1], dtype=torch.bool).expand(q.shape[0], -1)
    if key_lengths is not None:
        valid = torch.arange(s.shape[-1])[None, :] < key_lengths[:, None]
    valid = valid[:, None, None, :]
    m = s.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(s - m) * valid
    return (w / w.sum(-1, keepdim=True).clamp_min(1e-300)) @ v


# (B, H, Lq, Lk, D, dtype, key_lengths): Lq = Lk and Lq != Lk, lengths 1 / 17 / 130 that are no block multiple,
# rows padded down to one key (and one to zero keys), every listed head dim (80 is padded to 128 inside).
ATTN_CASES = [
    (1, 2, 17, 17, 16, torch.float32, None),
    (2, 1, 130, 33, 80, torch.float32, [1, 20]),
    (1, 1, 1, 130, 64, torch.float32, None),
    (2, 1, 33, 1, 32, torch.float32, None),
    (2, 1, 9, 40, 16, torch.float32, [0, 40]),
    (2, 1, 40, 70, 128, torch.bfloat16, [70, 1]),
    (2, 1, 17, 130, 64, torch.bfloat16, [130, 1]),
    (1, 1, 130, 130, 32, torch.bfloat16, None),
    (1, 1, 20, 45, 80, torch.float16, [45]),
]


@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype,kl", ATTN_CASES, ids=lambda p: str(p).replace("torch.", ""))
def test_triton_attention_vs_float64_and_reference(run_here, B, H, Lq, Lk, D, dtype, kl):
    if not run_here():
        return                                           # ran (and passed) in the interpreter subprocess
    torch.manual_seed(hash((B, H, Lq, Lk, D, str(dtype))) % 2**31)
    q = torch.randn(B, H, Lq, D).to(dtype)
    k = torch.randn(B, H, Lk, D).to(dtype)
    v = torch.randn(B, H, Lk, D).to(dtype)
    do = torch.randn(B, H, Lq, D).to(dtype)
    key_lengths = None if kl is None else torch.tensor(kl)
    scale = 0.3 if D == 80 else None          # an explicit scale on some cases, the 1/sqrt(D) default on others
    want_scale = scale if scale is not None else D ** -0.5

    q64, k64, v64 = leaves(q, k, v, dtype=torch.float64)
    want = attention_f64(q64, k64, v64, key_lengths, want_scale)
    want.backward(do.double())
    wants = [want.detach(), q64.grad, k64.grad, v64.grad]

    results = {}
    for name, fn in (("triton", attn_mod.attention_triton), ("reference", attn_mod.attention_reference)):
        qx, kx, vx = leaves(q, k, v)
        o = fn(qx, kx, vx, key_lengths=key_lengths, scale=scale)
        assert o.shape == q.shape and o.dtype == dtype
        o.backward(do)
        results[name] = [o.detach(), qx.grad, kx.grad, vx.grad]
        for what, got, w in zip(("o", "dq", "dk", "dv"), results[name], wants):
            assert got.dtype == dtype
            err = rel_err(got, w)
            assert err <= TOL[dtype], f"{name} {what}: relative error {err:.2e} > {TOL[dtype]:.0e}"
    # The two paths agree with each other (each is within TOL of float64, so within 2 TOL of each other).
    for what, a, b in zip(("o", "dq", "dk", "dv"), results["triton"], results["reference"]):
        assert rel_err(a, b.double()) <= 2 * TOL[dtype], what
    if key_lengths is not None:
        # Padded keys receive exactly zero gradient; a row without keys outputs exactly 0.
        for b_, n in enumerate(kl):
            assert (results["triton"][2][b_, :, n:] == 0).all() and (results["triton"][3][b_, :, n:] == 0).all()
            if n == 0:
                assert (results["triton"][0][b_] == 0).all()


def test_triton_attention_non_contiguous_inputs(run_here):
    """[B, L, H, D] projections transposed to [B, H, L, D] (the layout the model scripts produce)."""
    if not run_here():
        return
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, n, 3, 16).transpose(1, 2) for n in (19, 23, 23))
    got = attn_mod.attention_triton(q, k, v)
    assert rel_err(got, attention_f64(q, k, v, None, 0.25)) <= TOL[torch.float32]


def test_attention_input_errors():
    """Bad shapes fail with a message naming what was expected (the Triton checks run before any launch)."""
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="k, v"):
        kernels.attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="key_lengths"):
        kernels.attention(q, q, q, key_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="D=160"):
        attn_mod.attention_triton(*(torch.randn(1, 1, 4, 160),) * 3)


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------------------

def rms_norm_f64(x, w, eps):
    x = x.double()
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w.double()


RMS_CASES = [
    ((5, 123, 123), torch.float32, True),       # 615 rows: several row tiles per program in the capped backward grid
    ((5, 123, 123), torch.float32, False),
    ((3, 16), torch.float32, True),             # QK-norm over a 16-wide head dim
    ((3, 16), torch.float32, False),
    ((2, 7, 1536), torch.bfloat16, True),
    ((2, 7, 1536), torch.float32, False),
    ((3, 5000), torch.float16, True),           # long non-power-of-two rows
]


@pytest.mark.parametrize("shape,dtype,has_w", RMS_CASES, ids=lambda p: str(p).replace("torch.", ""))
def test_triton_rms_norm_vs_float64_and_reference(run_here, shape, dtype, has_w):
    if not run_here():
        return
    torch.manual_seed(len(shape) * 1000 + shape[-1])
    eps = 1e-5
    x = (torch.randn(shape) * 3 + 0.5).to(dtype)
    w = (torch.randn(shape[-1]) * 0.5 + 1.0) if has_w else None   # fp32 weight, as the model scripts keep it
    dy = torch.randn(shape).to(dtype)

    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True) if has_w else None
    want = rms_norm_f64(x64, w64, eps)
    want.backward(dy.double())

    results = {}
    for name, fn in (("triton", rms_mod.rms_norm_triton), ("reference", rms_mod.rms_norm_reference)):
        xx = x.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True) if has_w else None
        y = fn(xx, ww, eps=eps)
        assert y.shape == x.shape and y.dtype == dtype
        y.backward(dy)
        results[name] = [y.detach(), xx.grad] + ([ww.grad] if has_w else [])
        checks = [("y", y, want), ("dx", xx.grad, x64.grad)] + ([("dw", ww.grad, w64.grad)] if has_w else [])
        for what, got, ref in checks:
            err = rel_err(got, ref.detach())
            assert err <= TOL[dtype], f"{name} {what}: relative error {err:.2e} > {TOL[dtype]:.0e}"
        if has_w:
            assert ww.grad.dtype == w.dtype
    for a, b in zip(results["triton"], results["reference"]):
        assert rel_err(a, b.double()) <= 2 * TOL[dtype]


def test_triton_rms_norm_dw_partials_do_not_grow_with_rows(run_here, monkeypatch):
    """The backward grid (and so the fp32 partial buffer) is capped, whatever the row count."""
    if not run_here():
        return
    seen = []
    real = rms_mod._empty
    monkeypatch.setattr(rms_mod, "_empty", lambda shape, dtype, device: seen.append(tuple(shape)) or
                        real(shape, dtype, device))
    x = torch.randn(4000, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    rms_mod.rms_norm_triton(x, w).sum().backward()
    partials = [s for s in seen if len(s) == 2 and s[1] == 16 and s[0] != 4000]
    assert partials and all(s[0] <= rms_mod._max_programs(x) for s in partials)
    assert torch.allclose(w.grad.double(), rms_norm_f64(x.detach(), None, 1e-6).sum(0), rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch and bench
# ----------------------------------------------------------------------------------------------------------------

def test_dispatch(monkeypatch):
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("KERNELS_REFERENCE", raising=False)
    assert kernels.use_triton(fake_cuda)
    monkeypatch.setenv("KERNELS_REFERENCE", "1")
    assert not kernels.use_triton(fake_cuda)
    assert not kernels.use_triton(torch.zeros(1))
    # CPU tensors go through the reference path (bit-identical), which is differentiable.
    monkeypatch.delenv("KERNELS_REFERENCE")
    q = torch.randn(2, 2, 6, 8, requires_grad=True)
    kl = torch.tensor([6, 3])
    assert torch.equal(kernels.attention(q, q, q, kl), attn_mod.attention_reference(q, q, q, kl))
    x, w = torch.randn(3, 8), torch.randn(8)
    assert torch.equal(kernels.rms_norm(x, w), rms_mod.rms_norm_reference(x, w))


def test_bench_without_cuda_runs_self_check():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "bench.py")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no CUDA" in r.stdout and "self-check passed" in r.stdout


def test_kernels_compile_for_hopper_without_gpu():
    """The interpreter cannot catch what only the GPU compiler rejects: build each kernel for sm_90 (triton's
    ahead-of-time path with its bundled ptxas, no GPU needed) and check it fits in shared memory."""
    pytest.importorskip("triton")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "bench.py"), "--compile-only", "90", "--quick"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("| yes |") == 5 and "FAILED" not in r.stdout

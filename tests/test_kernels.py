"""kernels/: the real Triton code (TRITON_INTERPRET=1, CPU tensors) and the PyTorch reference path, each checked
against float64 math written here; plus the dispatch and the bench's CPU self-check.

TRITON_INTERPRET=1 only takes effect if it is set before triton is first imported (triton decorates its own
helpers, tl.zeros etc., at import), and in a full pytest run another test file, or torch itself, may import triton
first. So the `test_triton_*` tests run where the interpreter is live: in this process when it was started with
TRITON_INTERPRET=1, otherwise in subprocesses with the variable set (tests/interpreter_runs.py: started by the first
such test, they run every selected one, two at a time on the 2 CI cores); each test here then reports its own
verdict from there.
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
import types

import pytest
import torch

import interpreter_runs
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
def _subprocess_verdicts(names):
    """Run the test_triton_* tests `names` in TRITON_INTERPRET=1 subprocesses once; {test name: None or why}."""
    return interpreter_runs.verdicts(__file__, names, timeout=900)


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
        verdicts = _subprocess_verdicts(interpreter_runs.selected_names(request.session, __file__))
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
    """softmax(scale q k^T, padded keys excluded) v in float64; a row with no valid key gives 0. The mask is applied
    to the scores before the exponential (masking after it would compute exp of a padded key's score, which can
    overflow and give inf * 0 = NaN when the valid scores are far below it)."""
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * scale
    valid = torch.ones(s.shape[-1], dtype=torch.bool).expand(q.shape[0], -1)
    if key_lengths is not None:
        valid = torch.arange(s.shape[-1])[None, :] < key_lengths[:, None]
    valid = valid[:, None, None, :]
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(s - m)                                 # exp(-inf) = 0 for padded keys
    return (w / w.sum(-1, keepdim=True).clamp_min(1e-300)) @ v


def attention_term_scales(q, k, v, do, key_lengths, scale):
    """For each of o, dq, dk, dv: the float64 sum of the ABSOLUTE values of the terms that make it up, e.g.
    |P| |V| for O, s * (|P| o (|dO| |V|^T + rowsum |dO| |O|)) |K| for dQ. A kernel's rounding error is a small
    multiple of the unit roundoff times this (standard error analysis), whatever cancellation makes the result
    itself small: with inputs scaled x30 the softmax is nearly one-hot, dS = P (dP - Delta) cancels almost to 0,
    and an error measured relative to |dQ| would mostly measure the dtype of O (Delta is computed from the stored
    O, as in every FlashAttention)."""
    q, k, v, do = q.double(), k.double(), v.double(), do.double()
    s = (q @ k.transpose(-1, -2)) * scale
    if key_lengths is not None:
        valid = (torch.arange(s.shape[-1])[None, :] < key_lengths[:, None])[:, None, None, :]
        s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    o_mag = p @ v.abs()
    ds_mag = p * (do.abs() @ v.abs().transpose(-1, -2) + (do.abs() * o_mag).sum(-1, keepdim=True))
    mags = [o_mag, scale * ds_mag @ k.abs(), scale * ds_mag.transpose(-1, -2) @ q.abs(),
            p.transpose(-1, -2) @ do.abs()]
    s_abs = (abs(scale) * q.abs() @ k.abs().transpose(-1, -2)).max().item()
    return mags, s_abs


def term_err(got, want, mag):
    """max |got - want| / max(term magnitude); NaN or inf anywhere -> inf."""
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / mag.max().clamp_min(1e-30)).item()


# Errors relative to the term magnitudes above: a few units of roundoff of the dtype (fp32 here is IEEE on the
# CPU; the P and dS operands and the outputs are rounded to fp16 / bf16 in those dtypes), plus the error of the
# recomputed P = exp(S - LSE): S is summed in fp32, so its absolute error is ~2^-24 * sum |q_d k_d| * scale, which
# becomes a relative error of P (scores of several thousand with the x30 inputs: ~1e-4 in fp32).
TERM_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def term_tol(dtype, s_abs):
    return TERM_TOL[dtype] + 16 * 2.0 ** -24 * s_abs

# Every head dim a preset uses (kernels/model_calls.py walks them: ldm_multicond paper 40 / 80 / 160 in bf16 and
# 96 in fp32 for its condition transformer; DiT-XL and its ControlNet 72; RadiT, VAE, DiT 16 / 32 / 64;
# tests/test_kernel_presets.py runs each preset's own calls), 128, the largest supported (256) and small ones
# (8, 24) that pad to one 16- or 32-wide tile. Lengths from {1, 2, 17, 129, 300}; with key lengths, the
# batch rows are padded to 0 keys, 1 key and all keys. Inputs are scaled x3 in fp16 and x30 in fp32 / bf16: scores
# of several hundred, where a padded key's P = 2^(-LSE) overflows (the dQ defect this guards against).
HEAD_DIMS = [8, 16, 24, 32, 40, 64, 72, 80, 96, 128, 160, 256]
LENGTHS = [(1, 1), (2, 17), (17, 129), (129, 2), (300, 1), (17, 300), (129, 129)]


def _attn_cases():
    """(B, H, Lq, Lk, D, dtype, masked): each head dim in bf16 and fp32 and every other one in fp16 (no preset
    trains in fp16), the length pairs and the key mask cycling through the cases; one 300 x 300 case (H = 1, to
    keep the interpreter's time down)."""
    cases = []
    for i, D in enumerate(HEAD_DIMS):
        for j, dtype in enumerate((torch.bfloat16, torch.float32, torch.float16)):
            if dtype == torch.float16 and i % 2:
                continue
            Lq, Lk = LENGTHS[(i + j) % len(LENGTHS)]
            masked = (i + j) % 3 != 2
            cases.append((3 if masked else 2, 2, Lq, Lk, D, dtype, masked))
    cases.append((3, 1, 300, 300, 64, torch.bfloat16, True))
    return cases


ATTN_CASES = _attn_cases()


def _run_case(B, H, Lq, Lk, D, dtype, key_lengths, scale, mult, seed, make_qkv=None):
    """Triton and reference attention (forward + the three gradients) against float64 on the dtype-rounded inputs;
    returns {path: [o, dq, dk, dv]} after asserting each is finite and within TERM_TOL of float64."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Lq, D, generator=g) * mult).to(dtype)
    k = (torch.randn(B, H, Lk, D, generator=g) * mult).to(dtype)
    v = torch.randn(B, H, Lk, D, generator=g).to(dtype)
    do = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    want_scale = scale if scale is not None else D ** -0.5
    q64, k64, v64 = leaves(q, k, v, dtype=torch.float64)
    want = attention_f64(q64, k64, v64, key_lengths, want_scale)
    want.backward(do.double())
    wants = [want.detach(), q64.grad, k64.grad, v64.grad]
    mags, s_abs = attention_term_scales(q, k, v, do, key_lengths, want_scale)
    tol = term_tol(dtype, s_abs)
    results = {}
    for name, fn in (("triton", attn_mod.attention_triton), ("reference", attn_mod.attention_reference)):
        if make_qkv is None:
            qx, kx, vx = leaves(q, k, v)
            grads = lambda: [qx.grad, kx.grad, vx.grad]  # noqa: E731
        else:
            qx, kx, vx, grads = make_qkv(q, k, v)
        o = fn(qx, kx, vx, key_lengths=key_lengths, scale=scale)
        assert o.shape == q.shape and o.dtype == dtype
        o.backward(do)
        results[name] = [o.detach(), *grads()]
        for what, got, w, mag in zip(("o", "dq", "dk", "dv"), results[name], wants, mags):
            assert got.dtype == dtype and got.shape == w.shape
            assert torch.isfinite(got).all(), f"{name} {what}: not finite"
            err = term_err(got, w, mag)
            assert err <= tol, f"{name} {what}: error {err:.2e} > {tol:.1e} (term-relative)"
    return results


@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype,masked", ATTN_CASES, ids=lambda p: str(p).replace("torch.", ""))
def test_triton_attention_vs_float64_and_reference(run_here, B, H, Lq, Lk, D, dtype, masked):
    if not run_here():
        return                                           # ran (and passed) in the interpreter subprocess
    key_lengths = torch.tensor([0, 1, Lk]) if masked else None      # padded to no key, one key, all keys
    scale = 0.3 if D == 80 else None          # an explicit scale on some cases, the 1/sqrt(D) default on others
    mult = 3.0 if dtype == torch.float16 else 30.0
    results = _run_case(B, H, Lq, Lk, D, dtype, key_lengths, scale, mult, seed=D * 7 + Lq + Lk)
    if key_lengths is not None:
        # Padded keys receive exactly zero gradient; a row without keys outputs exactly 0.
        for b_, n in enumerate(key_lengths.tolist()):
            assert (results["triton"][2][b_, :, n:] == 0).all() and (results["triton"][3][b_, :, n:] == 0).all()
            if n == 0:
                assert (results["triton"][0][b_] == 0).all() and (results["triton"][1][b_] == 0).all()


def test_triton_attention_dq_finite_when_padded_keys_would_overflow(run_here):
    """The dQ defect, as it was found: fp16 inputs x3 with one valid key (Lk = 1, or key_lengths 1 of 40). The
    padded keys' P = 2^(-LSE) overflowed to inf and inf * 0 made dQ NaN; P is now zeroed for padded keys."""
    if not run_here():
        return
    for Lk, kl in ((1, None), (40, torch.tensor([1, 40]))):
        B = 1 if kl is None else 2
        _run_case(B, 1, 17, Lk, 64, torch.float16, kl, None, 3.0, seed=Lk)


def test_triton_attention_strided_views_of_a_fused_qkv(run_here, monkeypatch):
    """q, k, v as the models make them: one [B, L, 3, H, D] projection, unbound and permuted to [B, H, L, D] views
    (strides 3*H*D per position). They go to the kernels without a copy, and the gradients reach the fused tensor."""
    if not run_here():
        return
    copies = []
    real_contiguous = attn_mod._last_dim_contiguous
    monkeypatch.setattr(attn_mod, "_last_dim_contiguous",
                        lambda t: copies.append(t.shape) or real_contiguous(t) if t.stride(-1) != 1 else t)

    def fused(q, k, v):
        qkv = torch.stack([q, k, v], 2).permute(0, 3, 2, 1, 4).contiguous()     # [B, L, 3, H, D]
        qkv.requires_grad_(True)
        views = [t.permute(0, 2, 1, 3) for t in qkv.unbind(2)]                  # [B, H, L, D], non-contiguous
        assert not any(t.is_contiguous() for t in views)
        return (*views, lambda: [g.permute(0, 2, 1, 3) for g in qkv.grad.unbind(2)])

    for D, dtype in ((72, torch.bfloat16), (40, torch.float32)):
        mult = 3.0 if dtype == torch.float16 else 30.0
        _run_case(2, 2, 33, 33, D, dtype, None, None, mult, seed=D, make_qkv=fused)
    assert not copies


TMA_CASES = [(16, torch.float32, False, False), (72, torch.bfloat16, True, True), (40, torch.float16, True, False),
             (160, torch.bfloat16, True, True)]


@pytest.mark.parametrize("D,dtype,masked,strided", TMA_CASES)
def test_triton_attention_tma_forward_vs_float64(run_here, monkeypatch, D, dtype, masked, strided):
    """The forward's TMA path (tensor descriptors, sm_90+ on a GPU; forced here with KERNELS_TMA=1, which the
    interpreter runs): the same results as float64, with the descriptors' zero fill standing in for the masks."""
    if not run_here():
        return
    monkeypatch.setenv("KERNELS_TMA", "1")
    used = []
    real = attn_mod.tma_eligible
    monkeypatch.setattr(attn_mod, "tma_eligible", lambda *a: used.append(real(*a)) or used[-1])

    def fused(q, k, v):
        qkv = torch.stack([q, k, v], 2).permute(0, 3, 2, 1, 4).contiguous().requires_grad_(True)
        views = [t.permute(0, 2, 1, 3) for t in qkv.unbind(2)]
        return (*views, lambda: [g.permute(0, 2, 1, 3) for g in qkv.grad.unbind(2)])

    Lk = 33 if strided else 70
    key_lengths = torch.tensor([0, 1, Lk]) if masked else None
    mult = 3.0 if dtype == torch.float16 else 30.0
    _run_case(3 if masked else 2, 2, 33, Lk, D, dtype, key_lengths, None, mult, seed=D + 1,
              make_qkv=fused if strided else None)
    assert used and all(used)


def test_triton_attention_rejects_bad_input(run_here):
    """Bad input to the Triton entry point: a one-line ValueError naming the argument and what was expected."""
    if not run_here():
        return
    q = torch.randn(2, 2, 5, 16)
    for call, match in ((lambda: attn_mod.attention_triton(q.double(), q.double(), q.double()), "float64"),
                        (lambda: attn_mod.attention_triton(q, q[:, :1], q[:, :1]), "k, v"),
                        (lambda: attn_mod.attention_triton(q, q, q.half()), "dtypes differ"),
                        (lambda: attn_mod.attention_triton(q, q, q, key_lengths=torch.tensor([1, 6])), r"\[0, Lk=5\]"),
                        (lambda: attn_mod.attention_triton(q, q, q, key_lengths=torch.tensor([-1, 2])), "key_lengths"),
                        (lambda: attn_mod.attention_triton(q, q, q, key_lengths=torch.tensor([1.0, 2.0])), "integer"),
                        (lambda: attn_mod.attention_triton(q, q, q, key_lengths=torch.tensor([1])), r"shape \[2\]"),
                        (lambda: attn_mod.attention_triton(q, q, q, scale=float("nan")), "scale")):
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_triton_attention_beyond_max_head_dim_falls_back_with_one_warning(run_here, monkeypatch):
    if not run_here():
        return
    monkeypatch.setattr(attn_mod, "_warned", set())
    q = torch.randn(1, 2, 5, attn_mod.MAX_HEAD_DIM + 8)
    with pytest.warns(UserWarning, match="D=264"):
        got = attn_mod.attention_triton(q, q, q)
    assert torch.equal(got, attn_mod.attention_reference(q, q, q))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn_mod.attention_triton(q, q, q)                # the second call is silent


def test_split_head_dim_pads_less_than_the_next_power_of_two():
    """D = DA + DB with DA, DB powers of two >= 16 (or one tile), never more columns than one padded tile."""
    for D in range(1, attn_mod.MAX_HEAD_DIM + 1):
        da, db = attn_mod.split_head_dim(D)
        whole = max(16, 1 << (D - 1).bit_length())
        assert da & (da - 1) == 0 and da >= 16 and (db == 0 or (db & (db - 1) == 0 and db >= 16))
        assert D <= da + db <= whole
    assert [attn_mod.split_head_dim(D) for D in (40, 72, 80, 160, 64, 24)] == \
        [(32, 16), (64, 16), (64, 16), (128, 32), (64, 0), (32, 0)]
    with pytest.raises(ValueError, match="D=257"):
        attn_mod.split_head_dim(257)


def test_triton_attention_needs_cuda_tensors_outside_the_interpreter():
    pytest.importorskip("triton")
    if attn_mod.INTERPRET:
        pytest.skip("this process runs the interpreter, which takes CPU tensors on purpose")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="must be CUDA tensors"):
        attn_mod.attention_triton(q, q, q)


def test_attention_input_errors():
    """Bad shapes fail with a message naming what was expected (the checks run before any launch)."""
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="k, v"):
        kernels.attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="key_lengths"):
        kernels.attention(q, q, q, key_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[0, Lk=5\]"):
        kernels.attention(q, q, q, key_lengths=torch.tensor([9]))


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
    """The interpreter cannot catch what only the GPU compiler decides: build each kernel for sm_90 (triton's
    ahead-of-time path with its bundled ptxas, no GPU needed) with the JIT's run-time specialisation, and check what
    the report reads off the binary: it fits in shared memory, does not spill (cuobjdump STACK + LOCAL), multiplies
    with wgmma (no mma.sync); the forward moves q / k / v / o through TMA (cp.async.bulk.tensor), the backward
    kernels load 16 bytes at a time with cp.async pipelining, also for the head dim 72 that is no power of two
    (its rows are 144 bytes: the JIT alone would give 4-byte loads and no cp.async)."""
    pytest.importorskip("triton")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "bench.py"), "--compile-only", "90", "--quick"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in r.stdout.splitlines()
            if line.startswith("| attn") or line.startswith("| rmsnorm")]
    attn = [c for c in rows if c[0].startswith("attn")]
    assert len(attn) == 6 and {c[1].split()[0] for c in attn} == {"D=64", "D=72"} and len(rows) == 8
    for kernel, shape, config, shared, regs, spill, cp_async, tma, loads, wgmma, mma_sync, fits in rows:
        where = f"{kernel} {shape} {config}"
        assert fits == "yes" and int(spill) == 0, where
        if kernel == "attn fwd":
            assert int(tma) > 0, where                  # (its only plain loads left are the key length and LSE)
        else:
            assert int(tma) == 0 and loads == "16 B", where
        if kernel.startswith("attn"):
            assert int(wgmma) > 0 and int(mma_sync) == 0, where
        if kernel.startswith("attn d"):
            count, width = cp_async.split(" / ")
            assert int(count) > 0 and width == "16 B", where

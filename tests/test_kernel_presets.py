"""Every attention call of every preset of every model script is one the Triton path supports (kernels issue 18,
defect 2: ldm_multicond --size paper has head dims 40 / 80 / 160 and DiT-XL 72, which the old kernel rejected).

kernels/model_calls.py walks each preset's training and sampling forward on the meta device and records what
kernels.attention receives. Here:
- each call is checked against the Triton path's limits (head dim, dtype, grid, key_lengths), per preset;
- the walker must find the cases known to matter (so it cannot pass by finding nothing), and a preset added with
  an unsupported head dim must be caught;
- a handful of the distinct (head dim, dtype, key lengths, layout) kinds run through attention_triton in triton's
  interpreter at small B, H, L, forward and gradients against float64 math.
The interpreter tests (test_triton_*) run as in tests/test_kernels.py: in this process when it was started with
TRITON_INTERPRET=1, else in TRITON_INTERPRET=1 subprocesses (tests/interpreter_runs.py: the selected ones, two at a
time on the 2 CI cores), whose verdicts the tests here report. The subprocesses get the chosen cases through
KERNEL_PRESET_CASES, so they do not walk the models again.
"""
import functools
import importlib
import json
import os
import sys
import time

import pytest
import torch

import interpreter_runs
import kernels
import kernels.attention  # noqa: F401  (the module; `kernels.attention` the attribute is the function)
from kernels import model_calls

attn_mod = sys.modules["kernels.attention"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAX_HEAD_DIM = getattr(attn_mod, "MAX_HEAD_DIM", 256)
GRID_LIMIT = 2 ** 31                    # CUDA's limit on grid dimension x; the kernels use a 1-D grid
BLOCK_M = 16                            # the smallest query / key tile: the most programs one call can launch
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}     # as tests/test_kernels.py
CASES_ENV = "KERNEL_PRESET_CASES"


def _presets():
    """(script, preset) of every preset of every script that imports kernels.attention (cheap: no walk)."""
    return [(s, p) for s in model_calls.attention_scripts() for p in importlib.import_module(s).PRESETS]


def unsupported(c):
    """Why the Triton path cannot take call c as it is (empty: it can)."""
    why = []
    if c.path != "kernels":
        why.append(f"goes through {c.path}, not kernels.attention")
    if not 1 <= c.D <= MAX_HEAD_DIM:
        why.append(f"head dim D={c.D} outside 1..{MAX_HEAD_DIM}")
    if c.dtype not in DTYPES:
        why.append(f"dtype {c.dtype} not one of {list(DTYPES)}")
    if c.programs(BLOCK_M) >= GRID_LIMIT:
        why.append(f"{c.programs(BLOCK_M)} programs of {BLOCK_M} rows >= 2^31")
    if min(c.B, c.H, c.Lq, c.Lk) < 1:
        why.append(f"empty dimension B={c.B} H={c.H} Lq={c.Lq} Lk={c.Lk}")
    if c.key_lengths and c.key_lengths_shape != (c.B,):
        why.append(f"key_lengths of shape {c.key_lengths_shape}, expected ({c.B},)")
    return why


def describe(c):
    return (f"{c.script} --size {c.preset} {c.phase} ({c.setting}) {', '.join(c.modules[:3])}: B={c.B} H={c.H} "
            f"Lq={c.Lq} Lk={c.Lk} D={c.D} {c.dtype}{' key_lengths' if c.key_lengths else ''}")


# ----------------------------------------------------------------------------------------------------------------
# (a) every call supported, per preset
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,preset", _presets(), ids=lambda v: str(v))
def test_preset_attention_calls_supported_by_triton_path(script, preset):
    calls = model_calls.attention_calls([script], [preset])
    assert any(c.phase == "train" for c in calls), f"{script} --size {preset}: no training forward walked"
    bad = [f"{describe(c)}: {'; '.join(unsupported(c))}" for c in calls if unsupported(c)]
    assert not bad, "calls the Triton path does not support:\n" + "\n".join(bad)


def test_preset_attention_inputs_need_no_copy():
    """The kernels take any batch / head / row strides but need the head dim contiguous: every q, k, v the models
    pass (permuted views of fused projections included) has unit stride there, so nothing is copied."""
    bad = [f"{describe(c)}: strides q {c.q_stride} k {c.k_stride} v {c.v_stride}"
           for c in model_calls.attention_calls() if any(s[-1] != 1 for s in (c.q_stride, c.k_stride, c.v_stride))]
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------------------------------------------
# (b) the walker finds what is known to be there, and catches a bad new preset
# ----------------------------------------------------------------------------------------------------------------

def test_walker_covers_every_script_and_preset():
    scripts = model_calls.attention_scripts()
    assert {"vae", "ldm_multicond", "dit_text2img", "controlnet", "rectified_flow"} <= set(scripts), scripts
    calls = model_calls.attention_calls()
    for script, preset in _presets():
        mine = [c for c in calls if (c.script, c.preset) == (script, preset)]
        assert {"train"} <= {c.phase for c in mine}, f"{script} --size {preset}: {sorted({c.phase for c in mine})}"
        assert len({c.phase for c in mine}) >= 2, f"{script} --size {preset}: no sampling / inference forward"


def test_walker_finds_ldm_paper_head_dims():
    """LDM U-Net at 320 / 640 / 1280 channels, 8 heads: D = 40, 80, 160, each in self-attention over the latent
    grid and in cross-attention to the 2 + max_length condition tokens (key_lengths); tau runs in fp32."""
    ldm = importlib.import_module("ldm_multicond")
    cfg = ldm.PRESETS["paper"]
    calls = model_calls.attention_calls(["ldm_multicond"], ["paper"])
    unet = [c for c in calls if c.phase == "train" and any(m.endswith((".attn1", ".attn2")) for m in c.modules)]
    want = {cfg["channels"] * int(m) // cfg["heads"] for i, m in enumerate(cfg["channel_mult"].split(","))
            if str(i) in cfg["attn_levels"].split(",")}
    assert want == {40, 80, 160}
    for d in want:
        assert any(c.D == d and not c.key_lengths and c.Lq == c.Lk for c in unet), f"self-attention D={d}"
        assert any(c.D == d and c.key_lengths and c.Lk == 2 + ldm.Config.max_length for c in unet), f"cross D={d}"
    assert all(c.dtype == "bf16" for c in unet)
    tau = [c for c in calls if any(".tau." in m for m in c.modules)]
    assert tau and all(c.D == cfg["dim"] // cfg["tau_heads"] and c.dtype == "fp32" and c.key_lengths for c in tau)


def test_walker_finds_dit_xl_head_dim_72():
    dit = importlib.import_module("dit_text2img")
    xl = dit.PRESETS["XL"]
    calls = [c for c in model_calls.attention_calls(["dit_text2img"], ["XL"]) if c.phase == "train"]
    assert xl["hidden"] // xl["heads"] == 72 and {c.D for c in calls} == {72}
    self_attn = [c for c in calls if not c.key_lengths]
    cross = [c for c in calls if c.key_lengths]
    assert self_attn and cross and all(c.Lk == dit.Config.max_length for c in cross)
    assert all(c.calls == xl["depth"] for c in calls)           # one self- and one cross-attention a block
    assert all(c.strided for c in self_attn)                  # permuted views of the fused qkv projection


def test_walker_finds_every_rectified_flow_preset():
    rf = importlib.import_module("rectified_flow")
    for preset, p in rf.PRESETS.items():
        if p.get("arch", "transformer") != "transformer":
            continue              # RadUNet presets: tests/test_rectified_flow.py checks their attention calls
        train = [c for c in model_calls.attention_calls(["rectified_flow"], [preset]) if c.phase == "train"]
        cfg = rf.resolve(rf.Config(**{**p, "size": preset}))
        tokens = (cfg.image_size // cfg.patch) ** 2
        assert len(train) == 1, (preset, train)
        c = train[0]
        assert (c.H, c.D, c.Lq, c.Lk, c.calls) == (p["heads"], p["hidden"] // p["heads"], tokens, tokens, p["depth"])
        assert not c.key_lengths and c.dtype == "bf16"


def test_a_new_preset_with_an_unsupported_head_dim_is_caught(monkeypatch):
    """The guard works: a preset with D > MAX_HEAD_DIM added to a script is walked and reported."""
    rf = importlib.import_module("rectified_flow")
    heads = 2
    name = "test-too-wide"
    monkeypatch.setitem(rf.PRESETS, name, dict(rf.PRESETS["tiny"], hidden=heads * (MAX_HEAD_DIM + 8), heads=heads))
    calls = model_calls.attention_calls(["rectified_flow"], [name])
    assert calls and all(c.D == MAX_HEAD_DIM + 8 for c in calls)
    assert all(any("head dim" in w for w in unsupported(c)) for c in calls)


def test_walk_is_fast_and_leaves_nothing_patched():
    """The walk runs on the meta device: the largest presets in a second or two (all of them in seconds);
    afterwards the scripts, kernels and torch are as before (the stand-ins are gone)."""
    mods = [importlib.import_module(s) for s in ("ldm_multicond", "rectified_flow")]
    before = [m.attention for m in mods] + [mods[1].rms_norm, kernels.attention, torch.autocast]
    t0 = time.perf_counter()
    for script, preset in (("dit_text2img", "chexgen"), ("controlnet", "chexgen")):
        assert model_calls._walk.__wrapped__(script, preset)           # uncached
    took = time.perf_counter() - t0
    assert [m.attention for m in mods] + [mods[1].rms_norm, kernels.attention, torch.autocast] == before
    assert took < 15, f"walking two of the largest presets took {took:.1f} s"


# ----------------------------------------------------------------------------------------------------------------
# (c) the distinct kinds of call, run in triton's interpreter
# ----------------------------------------------------------------------------------------------------------------

def _dense(shape, stride):
    """True when `stride` lays out exactly prod(shape) elements with no gap (in some dim order)."""
    dims = sorted(range(len(shape)), key=lambda d: -stride[d])
    acc = 1
    for d in reversed(dims):
        if shape[d] > 1 and stride[d] != acc:
            return False
        acc *= shape[d]
    return True


def _needs_wide_or_padded(d):
    """Head dims the old kernel got wrong or never tried (defect 2): not a power of two (padded tiles) or > 128."""
    return d & (d - 1) != 0 or d > 128


def _layout(c):
    """contiguous; permuted (views of [B, L, H, D] projections); sliced (views of a fused qkv / kv projection)."""
    if not c.strided:
        return "contiguous"
    shapes = ((c.B, c.H, c.Lq, c.D), (c.B, c.H, c.Lk, c.D), (c.B, c.H, c.Lk, c.D))
    gaps = [not _dense(shape, s) for shape, s in zip(shapes, (c.q_stride, c.k_stride, c.v_stride))]
    return "sliced" if any(gaps) else "permuted"


def _kind(c):
    return (c.D, c.dtype, c.key_lengths, _layout(c))


def _features(kind):
    d, dtype, kl, layout = kind
    return ({("D", d, dtype)} if _needs_wide_or_padded(d) else set()) | {("kl", dtype, kl), ("layout", dtype, layout)}


def _select_cases():
    """A handful of the distinct (D, dtype, key_lengths, layout) kinds of call: every head dim that is not a power
    of two or is above 128, with each dtype it runs in, and every (dtype, key_lengths) and (dtype, layout) pair the
    presets use; greedily, the fewest kinds that cover all of these. Each case keeps the layout of the first call
    of its kind: per tensor, the order of its strides and whether it is a slice of a wider buffer (a gap)."""
    kinds = {}
    for c in model_calls.attention_calls():
        shapes = ((c.B, c.H, c.Lq, c.D), (c.B, c.H, c.Lk, c.D), (c.B, c.H, c.Lk, c.D))
        strides = (c.q_stride, c.k_stride, c.v_stride)
        kinds.setdefault(_kind(c), dict(self_attention=c.Lq == c.Lk,
                                        gaps=[not _dense(shape, st) for shape, st in zip(shapes, strides)],
                                        orders=[sorted(range(4), key=lambda d: -st[d]) for st in strides]))
    todo, cases = set().union(*(_features(k) for k in kinds)), []
    while todo:
        best = max(sorted(kinds), key=lambda k: len(_features(k) & todo))
        todo -= _features(best)
        d, dtype, kl, layout = best
        cases.append(dict(D=d, dtype=dtype, key_lengths=kl, layout=layout, **kinds[best]))
    return sorted(cases, key=lambda c: (c["D"], c["dtype"]))


def _cases():
    if os.environ.get(CASES_ENV):
        return json.loads(os.environ[CASES_ENV])
    try:
        return _select_cases()
    except Exception as e:              # reported by test_triton_preset_kinds, not as a collection error
        return [dict(error=f"{type(e).__name__}: {e}")]


CASES = _cases()


def _interpreter_live():
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.zeros, InterpretedFunction) and attn_mod.INTERPRET


@functools.lru_cache(maxsize=None)
def _subprocess_verdicts(names):
    """Run the test_triton_* tests `names` of this file in TRITON_INTERPRET=1 subprocesses once; {name: None or
    why}."""
    return interpreter_runs.verdicts(__file__, names, extra_env={CASES_ENV: json.dumps(CASES)}, timeout=600)


@pytest.fixture
def run_here(request, monkeypatch):
    """Call first in a test_triton_* body. True: run the body here (interpreter live, outputs NaN-poisoned).
    False: the subprocess ran this test and it passed there (a failure there fails this test with its message)."""
    pytest.importorskip("triton")

    def decide():
        if _interpreter_live():
            monkeypatch.setattr(attn_mod, "POISON_OUTPUTS", True)
            return True
        verdicts = _subprocess_verdicts(interpreter_runs.selected_names(request.session, __file__))
        name = request.node.name
        if name not in verdicts:
            pytest.fail(verdicts.get("", f"{name} missing from the interpreter subprocess' report"))
        if verdicts[name] is not None:
            pytest.fail(verdicts[name])
        return False
    return decide


def _make(shape, order, gap, gen, dtype):
    """A [B, H, L, D] tensor whose strides rank the dims as `order` does (outermost first) and, with `gap`, whose
    rows are slices of a 3x wider buffer: the layout class of the model's q / k / v (e.g. a fused qkv view)."""
    if order[-1] != 3:                   # head dim not innermost: the models never do that; plain tensor
        order = [0, 1, 2, 3]
    phys = [shape[d] for d in order]
    wide = phys[:-1] + [phys[-1] * (3 if gap else 1)]
    buf = torch.randn(wide, generator=gen).to(dtype)
    t = buf[..., :phys[-1]]
    inverse = [order.index(d) for d in range(4)]
    return t.permute(inverse)


def attention_f64(q, k, v, key_lengths, scale):
    """softmax(scale q k^T) v in float64, keys past key_lengths masked before the exp; no valid key gives 0."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    Lk = k.shape[2]
    valid = torch.ones(q.shape[0], Lk, dtype=torch.bool)
    if key_lengths is not None:
        valid = torch.arange(Lk)[None, :] < key_lengths[:, None]
    valid = valid[:, None, None, :]
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(s - m) * valid
    return (w / w.sum(-1, keepdim=True).clamp_min(1e-300)) @ v.double()


def rel_err(got, want):
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


def _case_id(case):
    if "error" in case:
        return "walker-error"
    return f"D{case['D']}-{case['dtype']}-{'kl' if case['key_lengths'] else 'nokl'}-{case['layout']}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_preset_kinds(run_here, case):
    """Small B, H, L with the head dim, dtype, key-length use and layout of calls the presets make: Lq = 33 and
    Lk = 40 (cross-attention) / 33 (self-attention) are no tile multiple; with key_lengths one row has a single
    valid key and the other a length that ends inside a key tile."""
    assert "error" not in case, f"the walk failed: {case.get('error')}"
    if not run_here():
        return
    dtype, D = DTYPES[case["dtype"]], case["D"]
    B, H, Lq = 2, 2, 33
    Lk = Lq if case["self_attention"] else 40
    gen = torch.Generator().manual_seed(D * 7 + len(case["dtype"]))
    q, k, v = (_make((B, H, n, D), order, gap, gen, dtype)
               for n, order, gap in zip((Lq, Lk, Lk), case["orders"], case["gaps"]))
    assert (not all(t.is_contiguous() for t in (q, k, v))) == (case["layout"] != "contiguous")   # layout kept
    do = torch.randn(B, H, Lq, D, generator=gen).to(dtype)
    key_lengths = torch.tensor([1, Lk - 3]) if case["key_lengths"] else None
    scale = D ** -0.5

    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = attention_f64(q64, k64, v64, key_lengths, scale)
    want.backward(do.double())

    qx, kx, vx = (t.detach().requires_grad_(True) for t in (q, k, v))     # the same (strided) views, as leaves
    o = attn_mod.attention_triton(qx, kx, vx, key_lengths=key_lengths)
    assert o.shape == (B, H, Lq, D) and o.dtype == dtype
    o.backward(do)
    for what, got, ref in (("o", o, want), ("dq", qx.grad, q64.grad), ("dk", kx.grad, k64.grad),
                           ("dv", vx.grad, v64.grad)):
        assert got is not None and got.dtype == dtype, what
        assert torch.isfinite(got).all(), f"{what}: not finite"
        err = rel_err(got, ref.detach())
        assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"
    if key_lengths is not None:                  # padded keys get exactly zero gradient
        for b, n in enumerate(key_lengths.tolist()):
            assert (kx.grad[b, :, n:] == 0).all() and (vx.grad[b, :, n:] == 0).all()


def test_interpreter_cases_cover_the_kinds_that_matter():
    """(c) runs every head dim that is not a power of two or is above 128 in each dtype the presets use it in, and
    every (dtype, key_lengths) and (dtype, layout) pair; it is a handful, not every kind."""
    assert all("error" not in c for c in CASES), CASES
    calls = model_calls.attention_calls()
    ran = {(c["D"], c["dtype"], c["key_lengths"], c["layout"]) for c in CASES}
    assert ran <= {_kind(c) for c in calls}
    for c in calls:
        for f in _features(_kind(c)):
            assert any(f in _features(r) for r in ran), f"{f} ({describe(c)}) not run in the interpreter"
    assert {d for d, *_ in ran} >= {40, 72, 80, 160}              # issue 18, defect 2
    assert {layout for *_, layout in ran} == {"contiguous", "permuted", "sliced"}
    assert len(CASES) < len({_kind(c) for c in calls})

"""The attention calls the model scripts make, per preset, found by running their real forward on the meta device.

    from kernels.model_calls import attention_calls
    calls = attention_calls()                               # every script, every preset
    calls = attention_calls(["ldm_multicond"], ["paper"])   # some of them

What it is for: tests/test_kernel_presets.py checks that every call is one the Triton path supports (head dim,
dtype, grid, key lengths) and runs each distinct kind in triton's interpreter, so that a new preset cannot bring
back a head dim the kernel rejects (kernels issue 18, defect 2); kernels/bench.py can time exactly these calls
(each preset's B, H, Lq, Lk, D, key lengths, strides) on a GPU besides its square tables.

How: every script at the repository root that does `from kernels import ... attention ...` is imported; for each
entry of its PRESETS dict the model is built on the meta device (no memory, no arithmetic, so paper sizes walk
as fast as tiny ones) and one forward is run with meta inputs of the shapes training uses, then the forward the
sampler makes (the script's own guidance function, so the guidance batch is the one it builds). Repeated identical
blocks are replayed, not re-run (see _Replay): every preset of every script walks in a few seconds. During the walk:
- the script's `attention` name (and the `kernels.attention` attribute) is a recorder: it notes the call and
  returns an empty [B, H, Lq, D] tensor, as the kernel would; wrappers such as ldm_multicond's `attend` call that
  name once the model's `set_attention("kernels")` (cfg.attn = "kernels") selected the kernel path;
- torch.nn.functional.scaled_dot_product_attention is noted too (path "sdpa"): a layer that bypasses the kernels;
- CUDA's bf16 autocast is emulated (meta tensors get no autocast): `torch.autocast` is replaced by a context that
  keeps an emulated state, whatever device type the scripts name (they disable it around their fp32 embeddings),
  and a TorchFunctionMode casts the inputs of autocast's lower-precision ops (linear, conv, matmul, ...) to bf16
  and of its fp32 ops (layer_norm, group_norm, softmax, ...) to fp32, as CUDA autocast does. The dtype recorded
  is then the one the kernel runs in on the GPU: attention_triton casts q, k, v to the autocast dtype when
  autocast is on, so it is bf16 under autocast and q's own dtype where a script disabled autocast (ldm_multicond
  runs its condition transformer tau in fp32);
- the script's `rms_norm` (kernels.rms_norm, rectified_flow's QK-RMSNorm) is replaced by the reference math on a
  contiguous copy of its input: rms_norm_triton normalises x.contiguous() and returns that layout on the GPU, so
  the strides recorded for q and k are the ones the attention kernel gets there.
Strides are the meta tensors' strides, which are the strides the same ops give on CUDA.

Shapes: image / latent sides and text lengths from each script's own `resolve(cfg)` without data (its documented
defaults: e.g. ldm_multicond 64 x 64 latents and 2 + 128 condition tokens, dit_text2img 120 text tokens), plus the
second-stage resolution the scripts document (dit_text2img / controlnet 512 px, vae 512 px). Training batch per
GPU: the preset's micro-batch, else its global batch over the 8 processes of the `torchrun --nproc_per_node=8`
line every script documents; sampling batch: the script's InferConfig.batch_size (16) times its guidance branches.
Backward calls have the shapes of their forward calls, so only forwards are walked.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:                     # `python kernels/model_calls.py`; the scripts import from the root too
    sys.path.insert(0, ROOT)

import kernels  # noqa: E402

_ATTENTION, _RMS_NORM = kernels.attention, kernels.rms_norm        # the real functions, replaced during a walk
TRAIN_PROCESSES = 8          # `torchrun --nproc_per_node=8` in every script's usage
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass(frozen=True)
class AttentionCall:
    """One distinct attention call: a (script, preset, phase, input) and everything the kernel sees.
    `modules` are the layers (module paths in the model) that make it, `calls` how many calls one forward makes."""
    script: str
    preset: str
    phase: str                    # "train" (one micro-batch forward under bf16 autocast) | "sample" | "encode" ...
    setting: str                  # the input the forward ran on, e.g. "latent 4x32x32, 120 text tokens"
    path: str                     # "kernels" (kernels.attention) | "sdpa" (F.scaled_dot_product_attention)
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    dtype: str                    # the dtype the kernel runs in on the GPU: bf16 / fp16 / fp32
    key_lengths: bool             # key_lengths given (cross-attention to padded tokens)
    key_lengths_shape: tuple | None
    scale: float | None
    q_stride: tuple
    k_stride: tuple
    v_stride: tuple
    modules: tuple = ()
    calls: int = 0

    @property
    def strided(self):
        """True when any of q, k, v is not a contiguous [B, H, L, D] tensor (a view of a fused projection)."""
        return not all(_is_contiguous(shape, s) for s, shape in (
            (self.q_stride, (self.B, self.H, self.Lq, self.D)), (self.k_stride, (self.B, self.H, self.Lk, self.D)),
            (self.v_stride, (self.B, self.H, self.Lk, self.D))))

    def programs(self, block=16):
        """Programs of the kernels' 1-D grid with the smallest tile of `block` rows: cdiv(max(Lq, Lk), block) B H
        (the forward and dQ kernels walk query blocks, dK/dV key blocks)."""
        return -(-max(self.Lq, self.Lk) // block) * self.B * self.H

    def row(self):
        """A short dict for tables and for kernels/bench.py."""
        return dict(script=self.script, preset=self.preset, phase=self.phase, B=self.B, H=self.H, Lq=self.Lq,
                    Lk=self.Lk, D=self.D, dtype=self.dtype, key_lengths=self.key_lengths, strided=self.strided,
                    calls=self.calls)


def _is_contiguous(shape, stride):
    """Tensor.is_contiguous() from shape and strides: row-major, the strides of size-1 dims not mattering."""
    acc = 1
    for n, s in zip(reversed(shape), reversed(stride)):
        if n != 1 and s != acc:
            return False
        acc *= n
    return True


# ----------------------------------------------------------------------------------------------------------------
# Emulated CUDA autocast on the meta device
# ----------------------------------------------------------------------------------------------------------------

# CUDA autocast's op lists (torch.amp docs, "CUDA Ops that can autocast to float16" / "to float32"), for the ops
# these models use; ops in neither list run in their inputs' dtype (type promotion), as under autocast.
_LOWER = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
          "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "addr", "mv",
          "prelu", "chain_matmul", "scaled_dot_product_attention")
_FP32 = ("layer_norm", "group_norm", "softmax", "log_softmax", "softmin", "cross_entropy", "nll_loss", "mse_loss",
         "l1_loss", "smooth_l1_loss", "kl_div", "binary_cross_entropy_with_logits", "cosine_similarity", "normalize",
         "exp", "expm1", "log", "log2", "log10", "log1p", "pow", "__pow__", "__rpow__", "rsqrt", "reciprocal",
         "softplus", "cumsum", "cumprod", "sum", "prod", "norm", "dist", "cdist", "acos", "asin", "cosh", "sinh",
         "tan", "erfinv")


def _funcs(names):
    out = set()
    for owner in (torch, torch.Tensor, F, torch.nn.functional):
        for n in names:
            f = getattr(owner, n, None)
            if f is not None:
                out.add(f)
    return frozenset(out)


_LOWER_FUNCS, _FP32_FUNCS = _funcs(_LOWER), _funcs(_FP32)
_STATE = [(False, torch.bfloat16)]           # stack of (enabled, dtype) of the emulated autocast


class _EmulatedAutocast:
    """Stands in for torch.autocast during the walk: any device type means the (emulated) GPU."""

    def __init__(self, device_type="cuda", dtype=None, enabled=True, cache_enabled=None):
        self.enabled, self.dtype = bool(enabled), dtype

    def __enter__(self):
        _STATE.append((self.enabled, self.dtype or _STATE[-1][1]))
        return self

    def __exit__(self, *exc):
        _STATE.pop()
        return False

    def __call__(self, fn):                  # as a decorator
        @functools.wraps(fn)
        def wrapped(*a, **kw):
            with self:
                return fn(*a, **kw)
        return wrapped


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype not in (dtype, torch.float64) else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    return obj


class _Walk(TorchFunctionMode):
    """Emulated autocast casts, and notes the SDPA calls (layers that bypass kernels.attention)."""

    def __init__(self, on_sdpa):
        super().__init__()
        self.on_sdpa = on_sdpa

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        enabled, dtype = _STATE[-1]
        if enabled and func in _LOWER_FUNCS:
            args, kwargs = _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}
        elif enabled and func in _FP32_FUNCS:
            args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            return self.on_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _autocast(enabled, dtype=torch.bfloat16):
    """The training / sampling loops' `with autocast(device)` on a GPU (bf16), emulated."""
    with _EmulatedAutocast("cuda", dtype, enabled):
        yield


# ----------------------------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------------------------

def _gpu_layout_rms_norm(x, weight=None, eps=1e-6):
    """kernels.rms_norm as it behaves on the GPU for the walk: rms_norm_triton normalises x.contiguous() and returns
    that (contiguous) layout in x's dtype; the math is the reference's (meta tensors)."""
    return kernels.rms_norm_reference(x.contiguous(), weight, eps)


class _Recorder:
    def __init__(self, model):
        self.raw, self.stack, self.handles = [], [], []
        for name, m in model.named_modules():             # the stack of modules running: the caller's path
            self.handles.append(m.register_forward_pre_hook(functools.partial(self._enter, name)))
            self.handles.append(m.register_forward_hook(self._exit))

    def _enter(self, name, module, args):
        self.stack.append(name)                                 # (a hook returning non-None would replace args)

    def _exit(self, module, args, out):
        self.stack.pop()

    def close(self):
        for h in self.handles:
            h.remove()

    def note(self, path, q, k, v, key_lengths, scale):
        enabled, dtype = _STATE[-1]
        if path == "kernels" and enabled:
            # attention_triton: "if q.is_cuda and torch.is_autocast_enabled('cuda'): q, k, v = q.to(dt), ..."
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        B, H, Lq, D = q.shape
        self.raw.append(dict(
            path=path, B=B, H=H, Lq=Lq, Lk=k.shape[2], D=D, dtype=DTYPE_NAMES.get(q.dtype, str(q.dtype)),
            key_lengths=key_lengths is not None,
            key_lengths_shape=None if key_lengths is None else tuple(key_lengths.shape),
            scale=None if scale is None else float(scale),
            q_stride=tuple(q.stride()), k_stride=tuple(k.stride()), v_stride=tuple(v.stride()),
            module=self.stack[-1] if self.stack else "?"))

    def attention(self, q, k, v, key_lengths=None, scale=None):
        self.note("kernels", q, k, v, key_lengths, scale)
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)       # the kernel's output: contiguous

    def sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        self.note("sdpa", q, k, v, attn_mask, scale)
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@contextlib.contextmanager
def _patched(obj, name, value):
    if not hasattr(obj, name):
        yield
        return
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _recording(mod, model):
    """Inside: the script's attention / rms_norm names, kernels.attention and torch.autocast are stand-ins, and the
    emulated autocast is active (off until a phase enables it)."""
    rec = _Recorder(model)
    try:
        with contextlib.ExitStack() as st:
            for name, value in list(vars(mod).items()):        # `from kernels import attention [as name]`
                if value is _ATTENTION:
                    st.enter_context(_patched(mod, name, rec.attention))
                elif value is _RMS_NORM:
                    st.enter_context(_patched(mod, name, _gpu_layout_rms_norm))
            st.enter_context(_patched(kernels, "attention", rec.attention))
            st.enter_context(_patched(torch, "autocast", _EmulatedAutocast))
            st.enter_context(_autocast(False))
            st.enter_context(_Walk(rec.sdpa))
            yield rec
    finally:
        rec.close()


def _meta(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype, device="meta")


# Replaying repeated modules. Meta tensors cost no memory but each op still runs a (mostly Python) meta kernel,
# ~1 ms: DiT-XL's 28 identical blocks would take seconds a forward. A module call whose module has the same
# structure (class, plain attributes, parameter / buffer shapes, dtypes and requires_grad, recursively) and whose
# inputs have the same shapes, strides and dtypes as an earlier call, under the same autocast and grad mode, runs
# the same code on the same metadata: its output metadata and attention calls are replayed instead of recomputed.
# A module with any other kind of attribute (a function, an object) always runs.

_SIMPLE = (int, float, str, bool, type(None), torch.dtype, torch.device)
_NOT_MEMO = object()


def _plain(v):
    if isinstance(v, _SIMPLE):
        return v
    if isinstance(v, (tuple, list)):
        items = tuple(_plain(x) for x in v)
        return _NOT_MEMO if any(x is _NOT_MEMO for x in items) else (type(v).__name__, items)
    return _NOT_MEMO


def _tensor_sig(t):
    return ("T", tuple(t.shape), tuple(t.stride()), t.dtype, t.requires_grad)


def _sig(obj):
    """Hashable metadata of call arguments / outputs; _NOT_MEMO when something else is in there."""
    if isinstance(obj, torch.Tensor):
        return _tensor_sig(obj) if obj.device.type == "meta" else _NOT_MEMO
    if isinstance(obj, (tuple, list)):
        items = tuple(_sig(x) for x in obj)
        return _NOT_MEMO if any(x is _NOT_MEMO for x in items) else (type(obj).__name__, items)
    if isinstance(obj, dict):
        items = tuple((k, _sig(v)) for k, v in sorted(obj.items()))
        return _NOT_MEMO if any(x is _NOT_MEMO for _, x in items) else ("dict", items)
    return _plain(obj)


def _rebuild(sig):
    kind = sig[0] if isinstance(sig, tuple) and sig else None
    if kind == "T":
        _, shape, stride, dtype, grad = sig
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta").requires_grad_(grad)
    if kind in ("tuple", "list"):
        items = [_rebuild(x) for x in sig[1]]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _rebuild(v) for k, v in sig[1]}
    return sig


def _structure(module, cache):
    key = id(module)
    if key not in cache:
        attrs = []
        for k, v in sorted(vars(module).items()):
            if k == "forward" or (k.startswith("_") and isinstance(v, (dict, set))):
                continue                            # our wrapper; nn.Module's parameter / buffer / hook tables
            pv = _plain(v)
            if pv is _NOT_MEMO:
                cache[key] = _NOT_MEMO
                return _NOT_MEMO
            attrs.append((k, pv))
        tensors = tuple((n, _tensor_sig(t)) for n, t in [*module._parameters.items(), *module._buffers.items()]
                        if t is not None)
        children = tuple((n, _structure(c, cache)) for n, c in module._modules.items() if c is not None)
        ok = all(c is not _NOT_MEMO for _, c in children)
        cache[key] = (type(module).__qualname__, tuple(attrs), tensors, children) if ok else _NOT_MEMO
    return cache[key]


class _Replay:
    """Wraps every module's forward for one walk (see above); undo() restores them."""

    def __init__(self, model, rec):
        self.rec, self.memo, self.structures, self.wrapped = rec, {}, {}, []
        for name, m in model.named_modules():
            if _structure(m, self.structures) is not _NOT_MEMO and "forward" not in vars(m):
                m.forward = self._wrap(m, name, m.forward)
                self.wrapped.append(m)

    def undo(self):
        for m in self.wrapped:
            del m.forward

    def _wrap(self, module, name, forward):
        def wrapped(*args, **kwargs):
            key = (self.structures[id(module)], _sig(args), _sig(kwargs), torch.is_grad_enabled(), _STATE[-1])
            if any(x is _NOT_MEMO for x in key[1:3]):
                return forward(*args, **kwargs)
            if key in self.memo:
                out, calls = self.memo[key]
                for suffix, r in calls:
                    self.rec.raw.append(dict(r, module=name + suffix))
                return _rebuild(out)
            start = len(self.rec.raw)
            result = forward(*args, **kwargs)
            out = _sig(result)
            if out is not _NOT_MEMO:
                calls = [(r["module"][len(name):], r) for r in self.rec.raw[start:]]
                if all(r["module"].startswith(name) for _, r in calls):
                    self.memo[key] = (out, calls)
            return result
        return wrapped


class _Walker:
    """Collects the calls of one script: run(preset, phase, setting, model, fn) runs fn() under the recorder."""

    def __init__(self, mod, script):
        self.mod, self.script, self.calls = mod, script, []

    def run(self, preset, phase, setting, model, fn, train):
        model.train(train)
        with _recording(self.mod, model) as rec, torch.set_grad_enabled(train), _autocast(True):
            replay = _Replay(model, rec)
            try:
                fn()
            finally:
                replay.undo()
        for r in rec.raw:
            self.calls.append(dict(r, script=self.script, preset=preset, phase=phase, setting=setting))


def _build(fn):
    with torch.device("meta"):
        return fn()


def _train_batch(cfg):
    return cfg.micro_batch or max(1, cfg.batch_size // TRAIN_PROCESSES)


def _infer_batch(mod):
    return mod.InferConfig().batch_size


def _config(mod, preset, **over):
    return mod.Config(**{**mod.PRESETS[preset], "size": preset, **over})


# ----------------------------------------------------------------------------------------------------------------
# The scripts (one function each: how a training step and the sampler call the model)
# ----------------------------------------------------------------------------------------------------------------

def _walk_vae(w, preset):
    mod = w.mod
    base = _config(mod, preset)
    # resolve() without data: 256 px; radit trains RadVAE at 512 px (64 x 64 latents, vae.py docstring).
    sizes = sorted({mod.resolve(base).image_size} | ({512} if preset != "tiny" else set()))
    for s in sizes:
        cfg = mod.resolve(dataclasses.replace(base, image_size=s))
        model = _build(lambda: mod.RadVAE(cfg))
        f, c = mod.factor_of(cfg), cfg.latent_channels
        B, Bi = _train_batch(cfg), _infer_batch(mod)
        setting = f"{s} px"
        w.run(preset, "train", setting, model, lambda: model(_meta(B, 1, s, s), _meta(B, c, s // f, s // f)), True)
        w.run(preset, "encode", setting, model, lambda: model.encoder(_meta(Bi, 1, s, s)), False)
        w.run(preset, "decode", setting, model, lambda: model.decoder(_meta(Bi, c, s // f, s // f)), False)


def _walk_ldm_multicond(w, preset):
    mod = w.mod
    cfg = mod.resolve(_config(mod, preset, attn="kernels"))     # 64 x 64 x 3 latents, 768-wide text, 128 tokens
    model = _build(lambda: mod.MultiCondLDM(cfg))
    model.set_attention("kernels")
    S, C, n = cfg.image_size, cfg.in_channels, cfg.max_length
    setting = f"latent {C}x{S}x{S}, {n} text tokens"

    def inputs(B):
        return (_meta(B, 17), _meta(B, cfg.image_dim), _meta(B, n, cfg.text_dim), _meta(B, dtype=torch.long))

    B = _train_batch(cfg)
    w.run(preset, "train", setting, model, lambda: model(_meta(B, C, S, S), _meta(B, dtype=torch.long), *inputs(B),
                                                         _meta(B, 3, dtype=torch.bool)), True)
    icfg, Bi = mod.InferConfig(), _infer_batch(mod)
    use, against = mod.modality_mask(icfg.use, "--use"), mod.modality_mask(icfg.guide_against, "--guide-against")
    w.run(preset, "sample", setting, model, lambda: mod.guided_eps(model, _meta(Bi, C, S, S), mod.Schedule().T - 1,
                                                                   inputs(Bi), use, against, icfg.cfg), False)


def _walk_dit_text2img(w, preset):
    mod = w.mod
    # stage I at 256 px, stage II at 512 px (--resolution 512, dit_text2img.py docstring); tiny: resolve's default.
    for res in ([0] if preset == "tiny" else [256, 512]):
        cfg = mod.resolve(_config(mod, preset, attn="kernels", resolution=res))
        model = _build(lambda: mod.DiT(cfg))
        model.set_attention("kernels")
        S, C, n = cfg.image_size, cfg.in_channels, cfg.max_length
        setting = f"{cfg.space} {C}x{S}x{S} (patch {cfg.patch}), {n} text tokens"

        def text(B):
            return _meta(B, n, cfg.text_dim), _meta(B, dtype=torch.long)

        B = _train_batch(cfg)
        w.run(preset, "train", setting, model, lambda: model(_meta(B, C, S, S), _meta(B, dtype=torch.long), *text(B),
                                                             _meta(B, dtype=torch.bool)), True)
        icfg, Bi = mod.InferConfig(), _infer_batch(mod)
        w.run(preset, "sample", setting, model, lambda: mod.guided_eps(
            model, mod.Schedule(), _meta(Bi, C, S, S), 999, *text(Bi), scale=icfg.cfg, pred=cfg.pred), False)


def _walk_controlnet(w, preset):
    mod = w.mod
    # dry_model: the backbone of the --size preset at 256 px latents (a backbone path that does not exist, so a
    # run folder lying around is not read); chexgen's ControlNet trains on the 512 px stage-II backbone.
    cfg = _config(mod, preset, attn="kernels", backbone=os.path.join(ROOT, "no-such-backbone"))
    dcfg, model, ck = mod.dry_model(cfg)
    for S in ([dcfg.image_size] if preset == "tiny" else [dcfg.image_size, 2 * dcfg.image_size]):
        if S != dcfg.image_size:
            dcfg = mod.DiTConfig(**{**dataclasses.asdict(dcfg), "image_size": S, "pe_base": S // dcfg.patch})
            model = _build(lambda: mod.build_model(dcfg, ck, min(cfg.control_blocks, dcfg.depth)))
        model.base.set_attention("kernels")
        C, n = dcfg.in_channels, dcfg.max_length
        setting = f"latent {C}x{S}x{S} (patch {dcfg.patch}), {ck} condition channels, {n} text tokens"

        def text(B):
            return _meta(B, n, dcfg.text_dim), _meta(B, dtype=torch.long)

        def train():
            model.base.eval()                          # the frozen backbone stays in eval mode (controlnet.train)
            model(_meta(B, C, S, S), _meta(B, dtype=torch.long), *text(B), _meta(B, dtype=torch.bool),
                  _meta(B, ck, S, S), _meta(B, dtype=torch.bool))

        B = _train_batch(cfg)
        w.run(preset, "train", setting, model, train, True)
        icfg, Bi = mod.InferConfig(), _infer_batch(mod)
        w.run(preset, "sample", setting, model, lambda: mod.guided_eps(
            model, mod.Schedule(), _meta(Bi, C, S, S), 999, *text(Bi), _meta(Bi, ck, S, S), scale=icfg.cfg,
            cond_scale=icfg.cfg_cond, pred=dcfg.pred), False)


def _walk_rectified_flow(w, preset):
    mod = w.mod
    # radit Table 5: 32 x 64 x 64 latents, patch 2; the unet-* presets: radit Table 6's inputs (unet-pixel 512 px)
    cfg = mod.resolve(_config(mod, preset, attn="kernels"))
    model = _build(lambda: mod.build_model(cfg))               # RadiT or RadUNet (--arch)
    model.set_attention("kernels")
    S, C = cfg.image_size, cfg.in_channels
    setting = f"{cfg.space} {C}x{S}x{S} (patch {cfg.patch})"
    B = _train_batch(cfg)
    w.run(preset, "train", setting, model, lambda: model(_meta(B, C, S, S), _meta(B), _meta(B, 19)), True)
    icfg, Bi = mod.InferConfig(), _infer_batch(mod)
    guide = [s.strip() for s in icfg.guide.split(",") if s.strip()] or None
    w.run(preset, "sample", setting, model, lambda: mod.guided_velocity(
        model, _meta(Bi, C, S, S), 0.5, _meta(Bi, 19), icfg.cfg, guide), False)


WALKERS = {"vae": _walk_vae, "ldm_multicond": _walk_ldm_multicond, "dit_text2img": _walk_dit_text2img,
           "controlnet": _walk_controlnet, "rectified_flow": _walk_rectified_flow}


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------

_IMPORT = re.compile(r"^from[ \t]+kernels[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)", re.M)


def _kernels_imports(src):
    """Names a source imports with `from kernels import ...` (one line or parenthesised, `as` aliases dropped)."""
    for m in _IMPORT.finditer(src):
        for line in m.group(1).strip("()").splitlines():
            for part in line.split("#")[0].split(","):
                if part.strip():
                    yield part.split(" as ")[0].strip()


def attention_scripts(root=ROOT):
    """Names (without .py) of the scripts at the repository root that import `attention` from kernels."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, encoding="utf-8") as f:
            if "attention" in set(_kernels_imports(f.read())):
                out.append(os.path.splitext(os.path.basename(path))[0])
    return out


def _dedupe(raw):
    groups = {}
    for r in raw:
        key = tuple((k, v) for k, v in r.items() if k != "module")
        mods, n = groups.get(key, ((), 0))
        groups[key] = (mods if r["module"] in mods else mods + (r["module"],), n + 1)
    return [AttentionCall(**dict(key), modules=mods, calls=n) for key, (mods, n) in groups.items()]


@functools.lru_cache(maxsize=None)
def _walk(script, preset):
    mod = importlib.import_module(script)
    if script not in WALKERS:
        raise LookupError(f"{script}.py imports kernels.attention but kernels/model_calls.py has no walker for it "
                          f"(add one to WALKERS: how its training step and sampler call the model)")
    w = _Walker(mod, script)
    WALKERS[script](w, preset)
    if not w.calls:
        raise RuntimeError(f"{script}.py --size {preset}: the walk found no attention call")
    return tuple(_dedupe(w.calls))


def attention_calls(scripts=None, sizes=None):
    """Distinct attention calls of every preset (`sizes`: preset names, any case; None: all) of every script
    (`scripts`: names with or without .py; None: every script importing kernels.attention). A list of
    AttentionCall, in script, preset, phase order; raises when a script has no walker or a preset no call."""
    names = attention_scripts() if scripts is None else [os.path.splitext(os.path.basename(s))[0] for s in scripts]
    want = None if sizes is None else {s.lower() for s in sizes}
    out = []
    for script in names:
        mod = importlib.import_module(script)
        for preset in mod.PRESETS:
            if want is None or preset.lower() in want:
                out.extend(_walk(script, preset))
    return out


def table(calls):
    """Markdown table of the calls (one line per distinct call)."""
    head = "| script | preset | phase | path | B | H | Lq | Lk | D | dtype | key_lengths | strided | calls |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in calls:
        lines.append(f"| {c.script} | {c.preset} | {c.phase} | {c.path} | {c.B} | {c.H} | {c.Lq} | {c.Lk} | {c.D} | "
                     f"{c.dtype} | {'yes' if c.key_lengths else 'no'} | {'yes' if c.strided else 'no'} | {c.calls} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(attention_calls(sys.argv[1:] or None)))

"""The skeleton's memory_plan (issue 21 item 4): --dry-run's GPU memory per rank, planned on the meta device.

Checked against hand-computed bytes (a two-layer MLP, fp32 and emulated bf16 autocast), against the same step run on
real CPU tensors (saved-tensor hooks, an independent count of what autograd holds), and the truncated-and-extrapolated
walk of repeated blocks against the full walk.

    python tests/test_memory_plan.py --measure      # BENCHMARKS.md "Memory planning": estimate vs CPU peak RSS
    python tests/test_memory_plan.py --measure-vae  # the same for vae.py's RadVAE
"""
import json
import os
import resource
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import skeleton_reference as S  # noqa: E402

import rectified_flow as rf  # noqa: E402

B = 5


def mlp(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(device)


def mlp_loss(model, device):
    return lambda: model(torch.randn(B, 8, device=device)).pow(2).mean()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_mlp_bytes_by_hand(device):
    model = mlp(device)
    saved, peak = S.step_bytes(model, mlp_loss(model, device), bf16=False)
    # fp32: autograd holds x [B, 8] (for the first linear's weight gradient), the first linear's output and GELU's
    # output [B, 16] each, the last output [B, 4] (pow's input), and the 4-byte loss; pow's output is freed.
    assert saved == 4 * B * (8 + 16 + 16 + 4) + 4
    assert saved < peak < saved + 4 * 2 * sum(p.numel() for p in model.parameters())  # + gradients, temporaries
    saved16, _ = S.step_bytes(model, mlp_loss(model, device), bf16=True)
    # emulated CUDA bf16 autocast: linear runs on bf16 casts of x, weights and biases (held, 2 bytes each); the
    # fp32 x is freed; GELU runs in bf16; pow (autocast's fp32 list) on an fp32 copy of the bf16 output, which is
    # then freed. Bytes: x 2*B*8, weights and biases 2*(16*8 + 16 + 4*16 + 4), hidden 2 * 2*B*16, fp32 out 4*B*4.
    assert saved16 == 2 * B * 8 + 2 * (16 * 8 + 16 + 4 * 16 + 4) + 2 * 2 * B * 16 + 4 * B * 4 + 4


def test_kernels_walk_as_the_gpu_runs_them():
    """kernels.attention and kernels.rms_norm keep what the Triton kernels save (kernels/attention.py: q, k, v, o,
    an fp32 log-sum-exp per row; kernels/rmsnorm.py: x, weight, an fp32 rstd per row), not the reference math's."""
    import kernels
    shape = (2, 3, 40, 16)
    N, M = 2 * 3 * 40 * 16, 2 * 3 * 40

    def loss_fn():
        q = torch.randn(shape, device="meta", requires_grad=True)
        return (kernels.attention(q, q, q) + kernels.rms_norm(q)).sum()
    saved, _ = S.step_bytes(torch.nn.Module(), loss_fn, bf16=False)
    # q and the attention output (N fp32 each; the flash kernel saves its output), the two fp32 row statistics
    # (M each), the loss; the RMSNorm output is freed after the add (Triton RMSNorm's backward does not need it)
    assert saved == 4 * (2 * N + 2 * M) + 4
    assert kernels.rms_norm_reference.__module__ == "kernels.rmsnorm"          # restored after the walk
    assert kernels.attention_reference.__module__ == "kernels.attention"


def small_cfg(**kw):
    return rf.Config(**{**dict(hidden=64, depth=4, heads=2, in_channels=4, image_size=16, patch=2,
                               datasets="a,b,c", batch_size=4), **kw})


def rf_step(cfg, device, micro=3):
    torch.manual_seed(0)
    with torch.device(device):
        model = rf.build_model(cfg).train()

    def loss_fn():
        x0 = torch.randn(micro, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
        t, cond = torch.rand(micro, device=device), torch.zeros(micro, 19, device=device)
        return rf.flow_loss(model, x0, torch.randn_like(x0), t, cond).mean()
    return model, loss_fn


def test_meta_walk_counts_what_autograd_holds_on_cpu():
    """The meta walk's bytes are the real CPU step's, and those are what saved-tensor hooks see autograd keep."""
    cfg = small_cfg()
    meta = S.step_bytes(*rf_step(cfg, "meta"), bf16=False)
    cpu = S.step_bytes(*rf_step(cfg, "cpu"), bf16=False)
    assert meta == cpu
    model, loss_fn = rf_step(cfg, "cpu")
    held, params = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            held[s.data_ptr()] = s.nbytes()
        return t
    # attention and RMSNorm as the walk runs them (_PlanKernels: the GPU kernels' saved tensors and contiguous
    # outputs; CPU SDPA's output layout differs, its reshape would copy), every other op as is
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), S._PlanKernels(), S._PlanCasts():
        loss = loss_fn()
    # what the walk counts beyond the saved tensors: the loss and any output no backward needs (here none else)
    assert sum(held.values()) <= meta[0] <= sum(held.values()) + loss.untyped_storage().nbytes()


@pytest.mark.parametrize("bf16", [False, True])
def test_repeated_blocks_extrapolate_to_the_full_walk(bf16, monkeypatch):
    monkeypatch.delenv("MEMORY_PLAN", raising=False)            # tests/conftest.py skips the walk by default
    cfg = small_cfg()
    model, _ = rf_step(cfg, "meta")
    assert S._plan_repeats(model) == {"blocks": cfg.depth}
    plan = S.memory_plan(lambda ckpt: rf_step(rf.replace(cfg, grad_ckpt=ckpt), "meta"), 3, bf16=bf16)
    for ckpt, key in ((False, "no_ckpt"), (True, "ckpt")):
        full = S.step_bytes(*rf_step(rf.replace(cfg, grad_ckpt=ckpt), "meta"), bf16=bf16)
        assert plan[f"activations_{key}"] == full[0]
        assert abs(plan[f"step_peak_{key}"] / full[1] - 1) < 0.02          # the peak: linear only nearly
    # activation checkpointing keeps each block's input, not its insides
    assert plan["activations_ckpt"] < plan["activations_no_ckpt"] / 2
    n = sum(p.numel() for p in model.parameters())
    assert (plan["parameters"], plan["gradients"], plan["adam"], plan["ema"]) == (4 * n, 4 * n, 8 * n, 4 * n)
    assert plan["total_ckpt"] < plan["total_no_ckpt"]


def test_dry_run_prints_the_plan(capsys, monkeypatch):
    monkeypatch.delenv("MEMORY_PLAN", raising=False)
    n = rf.main(["--size", "tiny", "--dry-run", "--data", "/nonexistent", "--space", "latent", "--micro-batch", "4"])
    out = capsys.readouterr().out
    assert "GPU memory per rank" in out and "without --grad-ckpt (fits)" in out
    plan = json.loads(out.strip().split("\n")[-1])["memory_plan"]
    assert plan["micro_batch"] == 4 and plan["trainable"] == n and plan["ddp_buckets"] == 0


# ----------------------------------------------------------------------------------------------------------------
# vae.py, flow_scm.py, downstream.py: --dry-run prints the plan of what each keeps per rank. The closed-form parts
# (fp32 parameters, AdamW's two moments, the fp32 EMA or none) are checked against parameter counts made here.

def printed_plan(out):
    assert "GPU memory per rank (planned on the meta device)" in out
    return json.loads(out.strip().split("\n")[-1])["memory_plan"]


def check_static(plan, trained, frozen=0, ema=True):
    assert (plan["trainable"], plan["frozen"]) == (trained, frozen)
    assert plan["parameters"] == 4 * (trained + frozen) and plan["gradients"] == 4 * trained
    assert plan["adam"] == 8 * trained and plan["ema"] == (4 * trained if ema else 0) and plan["ddp_buckets"] == 0
    for key in ("no_ckpt", "ckpt"):
        assert plan[f"total_{key}"] == (plan["parameters"] + plan["adam"] + plan["ema"] + plan["context"]
                                        + plan[f"step_peak_{key}"])
        assert 0 < plan[f"activations_{key}"] < plan[f"step_peak_{key}"]


def test_vae_dry_run_plans_the_vae_its_ema_and_the_frozen_perceptual_network(capsys, monkeypatch, tmp_path):
    """A tiny Dinov2 config saved locally stands in for Rad-DINO (offline: built from its config, no weights)."""
    import vae
    from transformers import Dinov2Config, Dinov2Model
    monkeypatch.delenv("MEMORY_PLAN", raising=False)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        frozen = sum(p.numel() for p in Dinov2Model(config).parameters())
    argv = ["--size", "tiny", "--dry-run", "--image-size", "32", "--batch-size", "2", "--perceptual-size", "28"]
    n = vae.main(argv + ["--perceptual", str(tmp_path)])
    out = capsys.readouterr().out
    assert "frozen, from its local config, at 28 px, 2 layer(s)" in out
    plan = printed_plan(out)
    check_static(plan, n, frozen)
    assert plan["micro_batch"] == 2 and plan["activations_ckpt"] < plan["activations_no_ckpt"]
    assert vae.main(argv + ["--perceptual", "none"]) == n
    bare = printed_plan(capsys.readouterr().out)
    check_static(bare, n)
    # the perceptual loss back-propagates through the frozen network into the reconstruction: more is held
    assert bare["activations_no_ckpt"] < plan["activations_no_ckpt"]


def test_flow_scm_dry_run_plans_the_mlps_and_their_ema(capsys, monkeypatch):
    import flow_scm as fs
    monkeypatch.delenv("MEMORY_PLAN", raising=False)
    assert fs.main(["--size", "tiny", "--bench", "--dry-run", "--batch-size", "8"]) is None
    plan = printed_plan(capsys.readouterr().out)
    model = fs.FlowSCM(fs.resolve_graph(), ["a", "b", "c"], fs.Config(**fs.PRESETS["tiny"]))
    check_static(plan, sum(p.numel() for p in model.parameters()))
    assert plan["micro_batch"] == 8


def test_downstream_dry_run_plans_the_cnn_without_ema(capsys, monkeypatch):
    import downstream as D
    monkeypatch.delenv("MEMORY_PLAN", raising=False)
    n = D.main(["--dry-run", "--size", "tiny", "--img-size", "32", "--batch-size", "4"])
    plan = printed_plan(capsys.readouterr().out)
    check_static(plan, n, ema=False)
    # no activation checkpointing in downstream.py: both walks are the same step
    assert plan["micro_batch"] == 4 and plan["activations_ckpt"] == plan["activations_no_ckpt"]


# ----------------------------------------------------------------------------------------------------------------
# BENCHMARKS.md "Memory planning": the plan's forward+backward peak (fp32, as --bench runs on a CPU) vs the growth
# of resident memory over real CPU training steps, in a fresh process per case. Before the measured steps one
# micro-batch-1 step allocates Adam's moments, thread pools and lazily loaded code, and its gradients are freed;
# MALLOC_MMAP_THRESHOLD_ makes glibc map (and unmap) every block over 64 KiB itself, so resident memory follows the
# live tensors instead of a heap that keeps freed memory.

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(size, micro, image_size, ckpt, steps=2):
    """Child: -> (planned forward+backward peak bytes, measured peak resident growth) of `steps` training steps."""
    cfg = rf.resolve(rf.Config(**{**rf.PRESETS[size], "size": size, "space": "latent", "image_size": image_size,
                                  "in_channels": 4, "micro_batch": micro, "grad_ckpt": ckpt}))
    plan = S.memory_plan(lambda c: rf_step(rf.replace(cfg, grad_ckpt=c), "meta", micro), micro, bf16=False,
                         gpu_kernels=False)                      # the CPU steps run kernels/' reference path
    model = rf.build_model(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(b):
        x = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size)
        rf.flow_loss(model, x, torch.randn_like(x), torch.rand(b), torch.zeros(b, 19)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return plan["step_peak_ckpt" if ckpt else "step_peak_no_ckpt"], peak_growth(step, micro, steps)


def peak_growth(step, micro, steps):
    """Peak resident-memory growth (bytes) over `steps` optimizer steps of `micro` images, after one warm-up step of
    one image (allocator pools, lazy state) as the baseline."""
    step(1)
    base = rss()
    for _ in range(steps):
        step(micro)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def measure_vae(size, micro, image_size, ckpt, steps=2):
    """Child: measure() for vae.py's RadVAE (--perceptual none: no weights offline), every block walked."""
    import vae
    cfg = vae.resolve(vae.Config(**{**vae.PRESETS[size], "size": size, "image_size": image_size,
                                    "perceptual": "none", "batch_size": micro}))

    def build(grad_ckpt, device):
        with torch.device(device):
            model = vae.RadVAE(vae.Config(**{**vae.asdict(cfg), "grad_ckpt": grad_ckpt})).train()
        side = image_size // vae.factor_of(cfg)

        def loss_fn(b=micro):
            img = torch.randn(b, 1, image_size, image_size, device=device)
            noise = torch.randn(b, cfg.latent_channels, side, side, device=device)
            return vae.vae_loss(model, img, noise, cfg)[:, 0].mean()
        return model, loss_fn
    plan = S.memory_plan(lambda c: build(c, "meta"), micro, bf16=False, cut=False, gpu_kernels=False)
    model, loss_fn = build(ckpt, "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(b):
        loss_fn(b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return plan["step_peak_ckpt" if ckpt else "step_peak_no_ckpt"], peak_growth(step, micro, steps)


if __name__ == "__main__":
    if sys.argv[1:2] in (["--child"], ["--child-vae"]):
        fn = measure_vae if sys.argv[1] == "--child-vae" else measure
        print(json.dumps(fn(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1")))
    elif sys.argv[1:2] == ["--measure-vae"]:
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, fp32 CPU steps (no autocast), vae.py RadVAE")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        for size, micro, side in (("tiny", 8, 128),):
            for ckpt in (0, 1):
                out = subprocess.run([sys.executable, __file__, "--child-vae", size, str(micro), str(side),
                                      str(ckpt)], capture_output=True, text=True, check=True, env=env)
                est, peak = json.loads(out.stdout.strip().split("\n")[-1])
                flag = "--grad-ckpt" if ckpt else ""
                print(f"  vae {size:5s} micro-batch {micro:2d} at {side}x{side} {flag:11s}: "
                      f"planned {est / 2**20:7.1f} MiB, peak RSS growth {peak / 2**20:7.1f} MiB, "
                      f"measured / planned {peak / est:.2f}", flush=True)
    elif sys.argv[1:2] == ["--measure"]:
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, fp32 CPU steps (no autocast), latent 4 channels")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        for size, micro, side in (("tiny", 16, 32), ("S", 8, 32), ("B", 2, 32)):
            for ckpt in (0, 1):
                out = subprocess.run([sys.executable, __file__, "--child", size, str(micro), str(side), str(ckpt)],
                                     capture_output=True, text=True, check=True, env=env)
                est, peak = json.loads(out.stdout.strip().split("\n")[-1])
                flag = "--grad-ckpt" if ckpt else ""
                print(f"  {size:5s} micro-batch {micro:2d} at {side}x{side} {flag:11s}: "
                      f"planned {est / 2**20:7.1f} MiB, peak RSS growth {peak / 2**20:7.1f} MiB, "
                      f"measured / planned {peak / est:.2f}", flush=True)

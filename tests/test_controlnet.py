"""Tests of controlnet.py (ControlNet adapter on the ChexGen DiT): CPU, reduced tiny models on the 32 px phantom of
conftest.py, a tiny random BERT for the captions, a dit_text2img.py checkpoint as the frozen backbone."""
import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file as save_np

import controlnet as cn
import dit_text2img as dt
from tiny_text import phantom_texts, write_tiny_bert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = ["--hidden", "32", "--depth", "2", "--heads", "2", "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9"]
CN = ["--batch-size", "8", "--lr", "2e-3", "--ema", "0.9", "--log-every", "1", "--sample-every", "0"]
MASKS = "Lungs,Pleural Effusion"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contended ones; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny random BERT (2 layers, 32 wide) with a WordPiece vocabulary of the phantom's report words."""
    return write_tiny_bert(str(tmp_path_factory.mktemp("bert")), phantom_texts(), layers=2, max_positions=128)


@pytest.fixture(scope="module")
def data32(tmp_path_factory, phantom_dir, bert):
    dst = str(tmp_path_factory.mktemp("cn32") / "data")
    shutil.copytree(phantom_dir, dst, ignore=shutil.ignore_patterns("text", "latents"))
    dt.main(["embed-text", "--data", dst, "--text-encoder", bert, "--name", "bert"])
    return dst


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, data32):
    """A reduced tiny dit_text2img.py model trained 40 steps on the phantom (pixel space, 32 px, patch 4)."""
    out = str(tmp_path_factory.mktemp("dit") / "run")
    dt.main(["--data", data32, "--out", out, *SMALL, "--max-steps", "40", "--log-every", "40", "--sample-every", "0"])
    return out


def train(data, backbone, out, *extra):
    return cn.main(["--data", data, "--backbone", backbone, "--out", out, *CN, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory, data32, backbone):
    """The adapter (1 of 2 blocks copied) trained 150 steps on the phantom's lung and effusion masks."""
    out = str(tmp_path_factory.mktemp("cn") / "run")
    train(data32, backbone, out, "--cond-masks", MASKS, "--control-blocks", "1", "--max-steps", "150",
          "--ckpt-every", "1000", "--sample-every", "150")
    return out


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def tensors(path, prefix=""):
    path = os.path.join(path, "ckpt.safetensors") if os.path.isdir(path) else path
    with safe_open(path, "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def small_backbone(seed=0):
    """A reduced DiT of dit_text2img.py with non-zero output layers (their zero init would hide everything)."""
    cfg = dt.Config(hidden=32, depth=3, heads=2, in_channels=1, image_size=16, patch=4, text_dim=16, max_length=12,
                    pe_base=4, space="pixel")
    torch.manual_seed(seed)
    model = dt.DiT(cfg).eval()
    for lin in [b.cross_attn.proj for b in model.blocks] + [model.final_layer.linear]:
        torch.nn.init.normal_(lin.weight, std=0.1)
    return cfg, model


def as_backbone(cfg, model):
    """The same weights as controlnet.py's DiT (state_dict names must match exactly)."""
    dcfg = cn.DiTConfig(**{f.name: getattr(cfg, f.name) for f in cn.fields(cn.DiTConfig) if hasattr(cfg, f.name)})
    return cn.build_model(dcfg, 3, 2, model.state_dict(), "test")


def inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 1, 16, 16, generator=g), torch.tensor([10, 500, 990][:B]),
            torch.randn(B, 12, 16, generator=g),
            torch.tensor([3, 7, 12][:B]), (torch.rand(B, 3, 16, 16, generator=g) > 0.5).float() * 2 - 1)


# ---------------------------------------------------------------------------------------------------- model


def test_zero_init_output_equals_backbone_and_residuals_enter_the_matching_blocks():
    cfg, ref = small_backbone()
    model = as_backbone(cfg, ref)
    x, t, text, n, cond = inputs()
    with torch.no_grad():
        want = ref(x, t, text, n)
        assert torch.equal(model(x, t, text, n, cond=cond), want)            # zero before/after_proj: exact
        assert torch.equal(model(x, t, text, n), want)                       # no condition: the backbone alone
        for k, cb in enumerate(model.adapter.controlnet):                     # the copies start as the backbone
            for (a, p), (b, q) in zip(cb.copied_block.named_parameters(), ref.blocks[k].named_parameters()):
                assert a == b and torch.equal(p, q)
        torch.nn.init.normal_(model.adapter.controlnet[1].after_proj.weight, std=0.1)
        torch.nn.init.normal_(model.adapter.controlnet[0].before_proj.weight, std=0.1)
        out = model(x, t, text, n, cond=cond)
        assert (out - want).abs().max() > 1e-3                                # the adapter now acts ...
        keep = torch.tensor([True, False, True])
        dropped = model(x, t, text, n, cond=cond, keep=keep)
        assert torch.equal(dropped[1], want[1]) and torch.allclose(dropped[0], out[0], atol=1e-6)   # ... unless dropped
        # independent reference: the backbone's blocks by hand, copy 0 on block 0's output, copy 1's residual
        # added after block 1 only (into block 2's input)
        h = ref.x_embedder(x) + dt.sincos_2d(32, 4, 4, 4, "cpu")      # dit_text2img's own modules, by hand
        temb = ref.t_embedder(t)
        t6 = ref.t_block(temb)
        y, lens = ref.y_embedder(text, n)
        ad = model.adapter.controlnet
        h = ref.blocks[0](h, y, lens, t6)
        c = h + ad[0].before_proj(model.adapter.cond_embedder(cond))
        c = ad[1].copied_block(ad[0].copied_block(c, y, lens, t6), y, lens, t6)
        h = ref.blocks[1](h, y, lens, t6) + ad[1].after_proj(c)
        h = ref.blocks[2](h, y, lens, t6)
        h = ref.final_layer(h, temb).view(3, 4, 4, 4, 4, 1).permute(0, 5, 1, 3, 2, 4).reshape(x.shape)
        assert torch.allclose(h, out, atol=1e-5)


def test_wiring_matches_the_released_pixart_controlnet_loop():
    """The loop of PixArt-alpha's ControlPixArtHalf.forward / ChexGen's ControlT2IDiT.forward, restated: block 0
    first; copy k-1 takes (x, c) (copy 0: x + before_proj(c)) and returns (c, after_proj(c)); block k runs on
    x + that skip for k = 1..N; the remaining blocks plain. Every projection non-zero, so each wire shows."""
    cfg, ref = small_backbone(seed=3)
    model = as_backbone(cfg, ref)
    ad = model.adapter
    torch.manual_seed(4)
    with torch.no_grad():
        for cb in ad.controlnet:
            for lin in (cb.after_proj, cb.before_proj):
                if lin is not None:
                    torch.nn.init.normal_(lin.weight, std=0.2)
                    torch.nn.init.normal_(lin.bias, std=0.2)
        x, t, text, n, cond = inputs()
        out = model(x, t, text, n, cond=cond)
        xx = ref.x_embedder(x) + dt.sincos_2d(32, 4, 4, 4, "cpu")
        temb = ref.t_embedder(t)
        t6 = ref.t_block(temb)
        y, lens = ref.y_embedder(text, n)
        c = ad.cond_embedder(cond)
        xx = ref.blocks[0](xx, y, lens, t6)
        for k in range(1, len(ad.controlnet) + 1):
            cb = ad.controlnet[k - 1]
            c = cb.copied_block(xx + cb.before_proj(c) if k == 1 else c, y, lens, t6)
            xx = ref.blocks[k](xx + cb.after_proj(c), y, lens, t6)
        for k in range(len(ad.controlnet) + 1, len(ref.blocks)):
            xx = ref.blocks[k](xx, y, lens, t6)
        want = ref.final_layer(xx, temb).view(3, 4, 4, 4, 4, 1).permute(0, 5, 1, 3, 2, 4).reshape(x.shape)
        assert torch.allclose(out, want, atol=1e-5)


def test_only_adapter_parameters_get_gradients():
    cfg, ref = small_backbone()
    model = as_backbone(cfg, ref)
    torch.nn.init.normal_(model.adapter.controlnet[1].after_proj.weight, std=0.1)
    x, t, text, n, cond = inputs()
    loss = model(x, t, text, n, cond=cond).pow(2).mean()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.base.parameters())
    assert all(p.grad is not None for p in model.adapter.parameters())
    assert model.adapter.controlnet[1].after_proj.weight.grad.abs().sum() > 0
    grads = [p.grad.clone() for p in model.adapter.parameters()]
    model.adapter.zero_grad()
    model.base.grad_ckpt = True                                   # activation checkpointing: the same gradients
    model(x, t, text, n, cond=cond).pow(2).mean().backward()
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.adapter.parameters(), grads))


def test_no_condition_dropout_every_sample_trains_the_adapter(tmp_path):
    """'No condition' is the frozen backbone by construction: the training draws drop no condition, so every sample's
    loss has a non-zero gradient on the adapter; --p-drop-cond is gone, and a checkpoint that stored it loads."""
    cfg, ref = small_backbone()
    model = as_backbone(cfg, ref)
    torch.nn.init.normal_(model.adapter.controlnet[1].after_proj.weight, std=0.1)
    x, t, text, n, cond = inputs()
    ccfg = cn.Config(batch_size=3, p_uncond=0.0)
    draws = cn.draw_step(ccfg, cn.Schedule(), 5, x.shape[1:], torch.device("cpu"))
    assert len(draws) == 3                                       # noise, timesteps, caption dropout: nothing else
    eps, tt, drop = draws
    losses = cn.diffusion_loss(model, cn.Schedule(), x, eps, tt, text, n, drop, cond, None)
    w = model.adapter.controlnet[1].after_proj.weight
    for i in range(3):
        g, = torch.autograd.grad(losses[i], w, retain_graph=True)
        assert g.abs().sum() > 0, i
    with pytest.raises(SystemExit):
        cn.parse_config(["--p-drop-cond", "0.1"])
    dcfg = cn.DiTConfig(**{f.name: getattr(cfg, f.name) for f in cn.fields(cn.DiTConfig) if hasattr(cfg, f.name)})
    path = str(tmp_path / "old.safetensors")
    cn.write_checkpoint(path, {f"controlnet.{k}": v for k, v in model.adapter.state_dict().items()},
                        {"config": json.dumps({**cn.asdict(cn.Config()), "p_drop_cond": 0.1}),
                         "backbone_config": json.dumps(cn.asdict(dcfg)), "step": "7", "param_groups": "[]"},
                        "controlnet/1")
    old = cn.read_checkpoint(path, ("controlnet.",))
    assert isinstance(old[0], cn.Config) and old[2] == 7 and not hasattr(old[0], "p_drop_cond")


# ---------------------------------------------------------------------------------------------------- conditions


def test_box_rasteriser_matches_hand_drawn_maps():
    boxes = {"A": [[0.25, 0.0, 0.75, 0.5]], "B": [[0.5, 0.5, 1.0, 1.0], [0.0, 0.75, 0.25, 1.0]]}
    got = cn.rasterize_boxes(boxes, ["A", "B", "C"], 4)
    A = [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    B = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [1, 0, 1, 1]]
    assert got.dtype == np.uint8 and np.array_equal(got, np.array([A, B, np.zeros((4, 4))]))
    # a pixel belongs to a box when its centre does: x 1.2 .. 3.6 px holds centres 1.5, 2.5, 3.5; y 0.4 .. 1.6 px
    # holds 0.5, 1.5; y 0.6 .. 1.4 holds none (a box between centres is empty)
    got = cn.rasterize_boxes({"A": [0.3, 0.1, 0.9, 0.4], "B": [0.3, 0.15, 0.9, 0.35]}, ["A", "B"], 4)
    assert np.array_equal(got[0], [[0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert not got[1].any()
    # the phantom's boxes (whole-pixel edges of its masks) cover exactly the mask's bounding rectangle
    m = np.zeros((32, 32), np.uint8)
    m[5:12, 20:31] = 1
    box = [20 / 32, 5 / 32, 31 / 32, 12 / 32]
    assert np.array_equal(cn.rasterize_boxes({"X": box}, ["X"], 32)[0], m)
    assert np.array_equal(cn.rasterize_boxes({"X": box}, ["X"], 64)[0], np.kron(m, np.ones((2, 2), np.uint8)))


def test_box_bad_input(capsys):
    got = cn.rasterize_boxes({"A": [-0.5, 0.5, 0.5, 1.7]}, ["A"], 4)               # outside: clipped, warned
    assert np.array_equal(got[0], [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    assert "clipped" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown box class 'Z'"):
        cn.rasterize_boxes({"Z": [0, 0, 1, 1]}, ["A"], 4, "boxes.json")
    with pytest.raises(SystemExit, match="expected x0 < x1"):
        cn.rasterize_boxes({"A": [0.5, 0, 0.2, 1]}, ["A"], 4)
    with pytest.raises(SystemExit, match=r"expected \[x0, y0, x1, y1\]"):
        cn.parse_boxes({"A": [0, 1]}, "f.json")


def test_mask_png_resized_and_thresholded(tmp_path, capsys):
    a = np.zeros((8, 8), np.uint8)
    a[2:6, 4:8] = 255
    Image.fromarray(a).save(tmp_path / "m.png")
    assert np.array_equal(cn.read_mask_png(str(tmp_path / "m.png"), 8), a // 255)
    assert capsys.readouterr().err == ""
    big = np.kron(a, np.ones((2, 2), np.uint8))
    big[big == 255] = 200                                          # grey levels: thresholded at half the range
    big[0, 0] = 100
    Image.fromarray(big).save(tmp_path / "g.png")
    assert np.array_equal(cn.read_mask_png(str(tmp_path / "g.png"), 8), a // 255)
    err = capsys.readouterr().err
    assert "thresholded at 127.5" in err and "resized" in err
    m = torch.zeros(1, 2, 16, 16, dtype=torch.uint8)
    m[0, 1, :8] = 1
    assert torch.equal(cn.cond_encoder(None, "cpu")(m), m.float() * 2 - 1)   # pixel space: the maps in [-1, 1]


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_dit_checkpoint_loads_as_backbone(backbone):
    saved, _, parts, _, _ = dt.read_checkpoint(backbone, ("ema.",))
    ref = dt.DiT(dt.Config(**saved)).eval()
    ref.load_state_dict(parts["ema."])
    dcfg, state = cn.load_backbone(backbone)
    model = cn.build_model(dcfg, 2, 2, state, backbone).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 32, 32, generator=g), torch.tensor([0, 100, 500, 999])
    text, n = torch.randn(4, dcfg.max_length, dcfg.text_dim, generator=g), torch.tensor([1, 5, 9, dcfg.max_length])
    drop = torch.tensor([False, True, False, False])
    with torch.no_grad():
        want = ref(x, t, text, n, drop)
        assert torch.equal(model.base(x, t, text, n, drop), want)
        assert torch.equal(model(x, t, text, n, drop, cond=torch.randn(4, 2, 32, 32)), want)
    assert dcfg.size == "tiny" and dcfg.space == "pixel" and (dcfg.hidden, dcfg.depth) == (32, 2)


def test_backbone_of_another_preset_or_file_is_refused(tmp_path, data32, backbone):
    with pytest.raises(SystemExit, match="backbone checkpoint of preset 'tiny'.*--size 'B'"):
        train(data32, backbone, str(tmp_path / "a"), "--size", "B", "--max-steps", "1")
    with pytest.raises(SystemExit, match="not a dit_text2img.py checkpoint"):
        cn.load_backbone(os.path.join(data32, "shards", "00000.safetensors"))
    with pytest.raises(SystemExit, match="--cond-masks asks for \\['Spleen'\\]"):
        train(data32, backbone, str(tmp_path / "b"), "--cond-masks", "Lungs,Spleen", "--max-steps", "1")


# ---------------------------------------------------------------------------------------------------- training


def test_training_lowers_loss_and_keeps_backbone_frozen(run, backbone):
    losses = [r["loss"] for r in log(run)]
    assert len(losses) == 150 and all(np.isfinite(losses))
    assert np.mean(losses[-30:]) < 0.85 * np.mean(losses[:10]), (np.mean(losses[:10]), np.mean(losses[-30:]))
    base, ema = tensors(run, "base."), tensors(backbone, "ema.")
    assert base.keys() == ema.keys() and all(torch.equal(base[k], ema[k]) for k in ema)   # bit-identical
    ctrl = tensors(run, "controlnet.")
    assert ctrl["controlnet.0.after_proj.weight"].abs().sum() > 0                          # left zero init
    n_adapter = sum(v.numel() for v in ctrl.values())
    with safe_open(os.path.join(run, "ckpt.safetensors"), "pt") as f:          # AdamW state: adapter params only
        n_opt = sum(f.get_slice(k).get_shape()[0] if f.get_slice(k).get_shape() else 1
                    for k in f.keys() if k.startswith("optim.") and k.endswith(".exp_avg"))
        cfg = json.loads(f.metadata()["config"])
    opt_numel = sum(v.numel() for k, v in tensors(run, "optim.").items() if k.endswith(".exp_avg"))
    assert opt_numel == n_adapter and n_opt > 0
    assert cfg["cond_names"] == MASKS and cfg["cond_size"] == 32
    assert os.path.isfile(os.path.join(run, "grids", "0000150.png"))


def test_trained_adapter_uses_the_condition(run, data32):
    """On held-out rows the true masks predict the noise better than the masks of other rows (paired over rows)."""
    from scipy import stats
    cfg, dcfg, model = cn.load_model(run, "cpu")
    data = cn.ControlData(cn.Config(**{**cn.asdict(cfg), "data": data32}), dcfg, "test")
    idx = torch.arange(len(data))
    x0, (text, n), maps = data.load(idx), data.load_text(idx), data.load_cond(idx)
    cond = cn.cond_encoder(None, "cpu")(maps)                       # pixel space: maps in [-1, 1]
    g = torch.Generator().manual_seed(0)
    sched, wrong, diff = cn.Schedule(), cond.roll(1, 0), []
    with torch.no_grad():
        for t in (50, 200, 400):
            eps, tt = torch.randn(x0.shape, generator=g), torch.full((len(idx),), t)
            diff.append(cn.diffusion_loss(model, sched, x0, eps, tt, text, n, None, wrong, None)
                        - cn.diffusion_loss(model, sched, x0, eps, tt, text, n, None, cond, None))
    diff = torch.cat(diff).numpy()
    assert len(diff) >= 90 and diff.mean() > 0 and stats.ttest_1samp(diff, 0).pvalue < 1e-3, (diff.mean(), len(diff))


def test_presets_are_table_4_in_epochs_of_the_data(tmp_path, data32, backbone):
    """chexgen Ext. Data Table 4 (Annotation-to-Image): batch 32 x 32 GPUs, 200 epochs, AdamW 1e-4, wd 0.01, clip
    1.0; Ext. Data Fig. 3d: 21K pairs. With data, the steps come from its row count."""
    for size in ("XL", "chexgen"):
        cfg = cn.parse_config(["--size", size, "--backbone", str(tmp_path / "none")])
        assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.clip) == (200, 32 * 32, 1e-4, 0.01, 1.0)
        assert cn.epoch_steps(cfg, 21_000) == 4102 == cfg.max_steps              # ceil(200 x 21,000 / 1024)
    assert cn.parse_config(["--size", "XL", "--max-steps", "9", "--backbone", "x"]).epochs == 0
    with pytest.raises(SystemExit, match="--epochs 1.0 and --max-steps 9"):
        cn.parse_config(["--epochs", "1", "--max-steps", "9", "--backbone", "x"])
    n_train = sum(r["split"] == "train" for r in rows(os.path.join(data32, "meta.csv")))
    out = str(tmp_path / "ep")
    train(data32, backbone, out, "--cond-masks", MASKS, "--control-blocks", "1", "--epochs", "0.02")
    want = math.ceil(0.02 * n_train / 8)
    assert 1 < want < 20 and log(out)[-1]["step"] == want
    assert json.load(open(os.path.join(out, "config.json")))["max_steps"] == want


def test_resume_reproduces_straight_run(tmp_path, data32, backbone):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--cond-type", "box", "--control-blocks", "2", "--ckpt-every", "100"]
    train(data32, backbone, a, *common, "--max-steps", "8")
    train(data32, backbone, b, *common, "--max-steps", "5")
    train(data32, os.path.join(str(tmp_path), "gone"), b, *common, "--max-steps", "8")   # backbone from the ckpt
    la, lb = [r["loss"] for r in log(a)], [r["loss"] for r in log(b)]
    assert [r["step"] for r in log(b)] == list(range(1, 9))
    assert np.allclose(la, lb, rtol=1e-6, atol=0), (la[5:], lb[5:])
    wa, wb = tensors(a), tensors(b)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    with pytest.raises(SystemExit, match="checkpoint has cond_names="):
        train(data32, backbone, b, "--cond-type", "box", "--box-classes", "Edema", "--max-steps", "9")



def test_torchrun_two_processes_equal_one(tmp_path, data32, backbone):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--control-blocks", "1", "--max-steps", "3", "--ckpt-every", "100", "--p-uncond", "0.3"]
    train(data32, backbone, one, *args, "--micro-batch", "4")   # 1 process, 2 accumulated micro-batches of 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as sock:                                # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           os.path.join(ROOT, "controlnet.py"), "--data", data32, "--backbone", backbone, "--out", two, *CN, *args]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    w1, w2 = tensors(one, "controlnet."), tensors(two, "controlnet.")
    assert w1.keys() == w2.keys() and len(w1) > 0
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(log(one), log(two))) < 1e-5
    assert [r["step"] for r in log(two)] == [1, 2, 3]
    after = [k for k in w1 if k.endswith("after_proj.weight")]   # zero-initialised: 3 steps moved them
    assert after and all(torch.count_nonzero(w1[k]) > 0 for k in after), after


# ---------------------------------------------------------------------------------------------------- sampling


def test_sample_cli_writes_image_annotation_pairs(tmp_path, run, data32, bert):
    import downstream as ds
    masks = tmp_path / "masks"
    masks.mkdir()
    with safe_open(os.path.join(data32, "shards", "00000.safetensors"), "pt") as f:
        m = f.get_slice("masks")[:2].numpy()                       # two real conditions: channels Lungs, Effusion
    info = json.load(open(os.path.join(data32, "info.json")))
    ch = [info["mask_names"].index(n) for n in MASKS.split(",")]
    for j in range(2):
        for k, c in enumerate(ch):
            Image.fromarray(m[j, c] * 255).save(masks / f"c{j}_{k}.png")
    out = str(tmp_path / "fake")
    ids = cn.main(["sample", "--ckpt", run, "--masks", str(masks), "--prompt", "left pleural effusion",
                   "--n-per-cond", "2", "--steps", "5", "--out", out, "--mask-out", "Pleural Effusion",
                   "--text-encoder", bert])
    assert ids == ["c0_s0", "c0_s1", "c1_s0", "c1_s1"]
    meta = rows(os.path.join(out, "meta.csv"))
    assert [r["id"] for r in meta] == ids and {r["prompt"] for r in meta} == {"left pleural effusion"}
    src = ds.Source(f"syn={out}", ds.Config())                     # downstream.py reads the pairs as they are
    src.load_masks("Pleural Effusion")
    assert src.size == 32 and src.images(range(4)).shape == (4, 1, 32, 32)
    for i, name in enumerate(ids):
        j = int(name[1])
        assert np.array_equal(src.masks[i, 0].numpy(), m[j, ch[1]])
        with Image.open(os.path.join(out, f"{name}_mask_0.png")) as im:
            assert np.array_equal(np.asarray(im) > 0, m[j, ch[0]] > 0)
    with Image.open(os.path.join(out, "grid.png")) as im:
        assert im.size == (2 * 128, 3 * 128 + 14)                 # condition row + 2 sample rows, 2 columns
    a = np.asarray(Image.open(os.path.join(out, "c0_s0.png")))
    assert a.dtype == np.uint16 and a.std() > 0
    before = np.asarray(Image.open(os.path.join(out, "c1_s1.png")))
    os.remove(os.path.join(out, "c1_s1.png"))                    # resumable: only the missing image is made again,
    cn.main(["sample", "--ckpt", run, "--masks", str(masks), "--prompt", "left pleural effusion", "--n-per-cond", "2",
             "--steps", "5", "--out", out, "--text-encoder", bert, "--batch-size", "1"])
    # Alone (batch 1 instead of 4), the same image: the noise is drawn per image id, but a batch of 1 takes another
    # GEMM blocking than a batch of 4, so float sums differ in the last bits and a pixel may land one uint16 level
    # (out of 65535) away. Bit-identity across batch sizes is not something the computation guarantees.
    again = np.asarray(Image.open(os.path.join(out, "c1_s1.png"))).astype(np.int64)
    assert np.abs(again - before.astype(np.int64)).max() <= 64          # <= 0.1 % of the range; a wrong image: ~1e4
    with pytest.raises(SystemExit, match="a mask model; give --masks instead"):
        cn.main(["sample", "--ckpt", run, "--boxes", str(tmp_path / "b.json"), "--prompt", "x", "--out", out])


def test_sample_boxes_writes_box_pairs_and_refuses_unknown_classes(tmp_path, data32, backbone, bert, capsys):
    out = str(tmp_path / "box")
    train(data32, backbone, out, "--cond-type", "box", "--max-steps", "3", "--control-blocks", "1")
    with safe_open(os.path.join(out, "ckpt.safetensors"), "pt") as f:
        names = json.loads(f.metadata()["config"])["cond_names"].split(",")
    assert "Pleural Effusion" in names and names == sorted(names)
    boxes = {"a": {"Pleural Effusion": [0.5, 0.5, 1.2, 0.9]}, "b": {"Pleural Effusion": [[0, 0, 0.25, 0.5]],
                                                                      "Cardiomegaly": [0.3, 0.4, 0.7, 0.8]}}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    fake = str(tmp_path / "fake")
    ids = cn.main(["sample", "--ckpt", out, "--boxes", str(tmp_path / "boxes.json"), "--prompt", "cardiomegaly",
                   "--n-per-cond", "1", "--steps", "3", "--out", fake, "--mask-out", "Pleural Effusion",
                   "--text-encoder", bert])
    assert ids == ["a", "b"] and "clipped to [0.5, 0.5, 1.0, 0.9]" in capsys.readouterr().err
    assert json.load(open(os.path.join(fake, "b_boxes.json"))) == {"Pleural Effusion": [[0, 0, 0.25, 0.5]],
                                                                   "Cardiomegaly": [[0.3, 0.4, 0.7, 0.8]]}
    want = np.zeros((32, 32), np.uint8)            # hand-drawn: pixel centres 16.5 .. 28.5 < 0.9 x 32 = 28.8, cols 16..
    want[16:29, 16:] = 255
    assert np.array_equal(np.asarray(Image.open(os.path.join(fake, "a_mask.png"))), want)
    assert {r["id"]: json.loads(r["boxes"]) for r in rows(os.path.join(fake, "meta.csv"))}["a"] == {
        "Pleural Effusion": [[0.5, 0.5, 1.2, 0.9]]}
    (tmp_path / "bad.json").write_text(json.dumps({"x": {"Spleen": [0, 0, 1, 1]}}))
    with pytest.raises(SystemExit, match="unknown box class 'Spleen'"):
        cn.main(["sample", "--ckpt", out, "--boxes", str(tmp_path / "bad.json"), "--prompt", "x", "--out", fake])


def test_evaluate_scores_with_the_downstream_segmenter(tmp_path, run, data32, phantom_dir, bert):
    import downstream as ds
    seg = str(tmp_path / "seg")
    ds.main(["segment", "--train", f"real={phantom_dir}:train", "--mask", "Pleural Effusion", "--width", "8",
             "--batch-size", "16", "--max-steps", "40", "--eval-every", "40", "--lr", "5e-3", "--out", seg])
    seg_run = os.path.join(seg, "real", "run0")
    net, scfg = cn.load_segmenter(seg_run, "cpu")                 # the U-Net here predicts what downstream's does
    meta, parts, _ = ds.read_checkpoint(seg_run)
    ref = ds.UNet(1, width=8).eval()
    ref.load_state_dict(parts["model."])
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        want = (torch.sigmoid(ref(ds.normalize(x))) > 0.5)[:, 0].numpy()
    assert np.array_equal(cn.segment(net, x, 32, "cpu"), want)
    out = str(tmp_path / "eval")
    res = cn.main(["evaluate", "--ckpt", run, "--seg-ckpt", seg_run, "--data", data32, "--n", "12", "--n-per-cond", "1",
                   "--steps", "4", "--out", out, "--text-encoder", bert, "--allow-random-weights"])
    assert res == json.load(open(os.path.join(out, "results.json")))
    assert res["n_conditions"] == 12 and len(rows(os.path.join(out, "fake", "meta.csv"))) == 12
    # the real images' Dice, recomputed here from the dataset's own masks and downstream's U-Net
    test = [r for r in rows(os.path.join(data32, "meta.csv")) if r["split"] == "test"][:12]
    info = json.load(open(os.path.join(data32, "info.json")))
    k = info["mask_names"].index("Pleural Effusion")
    imgs, masks = [], []
    for r in test:
        with safe_open(os.path.join(data32, "shards", f"{int(r['shard']):05d}.safetensors"), "pt") as f:
            imgs.append((f.get_slice("images")[int(r["index"]):int(r["index"]) + 1].float() + 0.5) / 65536)
            masks.append(f.get_slice("masks")[int(r["index"]):int(r["index"]) + 1][0, k].numpy() > 0)
    with torch.no_grad():
        pred = (torch.sigmoid(ref(ds.normalize(torch.cat(imgs)))) > 0.5)[:, 0].numpy()
    d = [1.0 if p.sum() + g.sum() == 0 else 2 * (p & g).sum() / (p.sum() + g.sum()) for p, g in zip(pred, masks)]
    assert res["real"]["dice"] == pytest.approx(np.mean(d), abs=1e-9)
    assert 0 <= res["generated"]["dice"] <= 1 and res["generated"]["n"] == 12
    fid = res["fid"]
    assert fid["random_weights"] and fid["n_real"] == fid["n_fake"] == 12 and np.isfinite(fid["value"])
    with pytest.raises(SystemExit, match="not a checkpoint of `downstream.py segment`|not a downstream.py"):
        cn.main(["evaluate", "--ckpt", run, "--seg-ckpt", run, "--data", data32, "--out", out])


class ToyEncoder(torch.nn.Module):
    """Image [B, 1, 32, 32] -> 4 x 8 x 8 latents: 4 x 4 means, channel c scaled by c + 1 and shifted by c / 10."""
    def forward(self, x):
        p = torch.nn.functional.avg_pool2d(x, 4)
        return torch.cat([p * (c + 1) + c / 10 for c in range(4)], 1)


def test_latent_space_conditions_are_encoded_by_the_folders_vae(tmp_path, data32, bert):
    """A toy latent folder (4 x 8 x 8, f = 4, torch.export encoder.pt2 + decoder.pt2) as vae.py writes: the condition
    maps go channel by channel through encoder.pt2, normalised; backbone, adapter and sampling run end to end."""
    lat = tmp_path / "data"
    shutil.copytree(data32, lat)
    folder = lat / "latents" / "toy"
    os.makedirs(folder / "shards")
    zs = []
    for name in sorted(n for n in os.listdir(os.path.join(data32, "shards")) if n.endswith(".safetensors")):
        with safe_open(os.path.join(data32, "shards", name), "numpy") as f:
            img = f.get_tensor("images").astype(np.float32) / 32768 - 1
        with torch.no_grad():
            z = ToyEncoder()(torch.from_numpy(img)).numpy()
        save_np({"latents": z}, str(folder / "shards" / name))
        zs.append(z)
    z = np.concatenate(zs).astype(np.float64)
    mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3))

    class Decoder(torch.nn.Module):
        def forward(self, z):
            return torch.nn.functional.interpolate(z[:, :1], scale_factor=4.0, mode="nearest")
    batch = {0: torch.export.Dim("b")}
    ep = torch.export.export(Decoder(), (torch.randn(2, 4, 8, 8),), dynamic_shapes={"z": batch})
    torch.export.save(ep, str(folder / "decoder.pt2"))
    info = {"format_version": 1, "shape": [4, 8, 8], "mean": mean.tolist(), "std": std.tolist(),
            "decoder": "decoder.pt2"}
    json.dump(info, open(folder / "info.json", "w"))
    dit = str(tmp_path / "dit")
    dt.main(["--data", str(lat), "--out", dit, *SMALL, "--max-steps", "2", "--sample-every", "0"])
    out = str(tmp_path / "cn")
    with pytest.raises(SystemExit, match="re-run vae.py encode to write encoder.pt2"):    # no encoder yet
        train(str(lat), dit, out, "--cond-masks", MASKS, "--max-steps", "1")
    ep = torch.export.export(ToyEncoder(), (torch.randn(2, 1, 32, 32),), dynamic_shapes={"x": batch})
    torch.export.save(ep, str(folder / "encoder.pt2"))
    json.dump({**info, "encoder": "encoder.pt2"}, open(folder / "info.json", "w"))

    # the condition latents: channel k*C + c is latent channel c of mask k as an image (0 -> -1, 1 -> +1), normalised
    names = json.load(open(lat / "info.json"))["mask_names"]
    with safe_open(str(lat / "shards" / "00000.safetensors"), "numpy") as f:
        maps = (f.get_tensor("masks")[:5, [names.index(n) for n in MASKS.split(",")]] > 0).astype(np.uint8)
    got = cn.cond_encoder(str(folder), "cpu")(torch.from_numpy(maps))
    x = maps.astype(np.float64) * 2 - 1                                       # float64 closed form of ToyEncoder
    pooled = x.reshape(5, 2, 8, 4, 8, 4).mean((3, 5))
    ref = np.stack([(pooled * (c + 1) + c / 10 - mean[c]) / std[c] for c in range(4)], 2).reshape(5, 8, 8, 8)
    assert got.shape == (5, 8, 8, 8) and maps[:, 0].any() and not maps[:, 0].all()
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    prog = torch.export.load(str(folder / "encoder.pt2")).module()           # and encoder.pt2 applied per channel
    for k in range(2):
        with torch.no_grad():
            zk = prog(torch.from_numpy(x[:, k:k + 1]).float())
        torch.testing.assert_close(got[:, 4 * k:4 * k + 4], (zk - torch.tensor(mean).float().view(-1, 1, 1))
                                   / torch.tensor(std).float().view(-1, 1, 1), rtol=1e-5, atol=1e-5)

    train(str(lat), dit, out, "--cond-masks", MASKS, "--max-steps", "3", "--sample-every", "3")
    ctrl = tensors(out, "controlnet.")
    assert ctrl["cond_embedder.proj.weight"].shape == (32, 2 * 4, 2, 2)         # 2 masks x 4 latent channels
    assert all(np.isfinite(r["loss"]) for r in log(out)) and os.path.isfile(os.path.join(out, "grids", "0000003.png"))
    masks = tmp_path / "m"
    masks.mkdir()
    for k in range(2):
        Image.fromarray(np.full((32, 32), 255 * k, np.uint8)).save(masks / f"c_{k}.png")
    cn.main(["sample", "--ckpt", out, "--masks", str(masks), "--prompt", "no acute process", "--n-per-cond", "1",
             "--steps", "2", "--out", str(tmp_path / "fake"), "--text-encoder", bert])
    assert np.asarray(Image.open(tmp_path / "fake" / "c.png")).shape == (32, 32)        # decoded to pixels

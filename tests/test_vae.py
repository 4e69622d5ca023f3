"""Tests of vae.py: magnitude-preserving layers vs float64 / closed forms, shapes, training, resume, encode /
decode through the standalone decoders (in a fresh process without vae.py), latent statistics, perceptual loss
with a random-weight Dinov2 built offline, bad input."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small convolutions on a loaded 2-core machine run up to 40x slower with 2 OpenMP threads than with 1 (threads
# spin-wait on each other): these tests and their subprocesses use one thread.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
SMALL = ["--channels", "8", "--mults", "1,2,2,2", "--head-channels", "8", "--perceptual", "none"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cfg_of(*argv):
    return vae.resolve(vae.parse_config(list(SMALL) + list(argv)))


# ---------------------------------------------------------------------------------------------------------------
# Magnitude-preserving layers: the property they exist for


def test_mp_layers_keep_unit_magnitude():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, 16, 16, generator=g, dtype=torch.float64)
    # MPConv: each output channel's effective weight has unit L2 norm (float64 reference from the raw weights)
    conv = vae.MPConv(32, 48, 3)
    w = conv.weight.detach().double().numpy().reshape(48, -1)
    ref = w / (1e-4 + np.linalg.norm(w, axis=1, keepdims=True) / math.sqrt(w.shape[1])) / math.sqrt(w.shape[1])
    eff = conv.effective_weight().detach().double().numpy().reshape(48, -1)
    np.testing.assert_allclose(eff, ref, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(eff, axis=1), 1.0, atol=1e-3)
    # ... so unit-variance input gives unit-variance output
    y = conv.double()(x)
    assert abs(y.std().item() - 1) < 0.05
    # forced weight normalisation: the stored weights are rescaled to unit RMS per output channel, in place
    with torch.no_grad():
        conv.weight.mul_(7.0)
    conv.renormalize_()
    rms = conv.weight.detach().reshape(48, -1).pow(2).mean(1).sqrt()
    assert torch.allclose(rms, torch.ones(48, dtype=rms.dtype), atol=1e-3)
    # mp_silu: E[silu(x)^2] under N(0, 1) by quadrature -> RMS 1 after dividing by 0.596
    from scipy import integrate
    silu2_gauss = lambda t: (t / (1 + math.exp(-t))) ** 2 * math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    m2 = integrate.quad(silu2_gauss, -40, 40)[0]
    assert abs(math.sqrt(m2) / 0.596 - 1) < 2e-3
    assert abs(vae.mp_silu(x).pow(2).mean().sqrt().item() - 1) < 0.01
    # mp_sum of two independent unit-variance tensors keeps unit variance for any balance
    b = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for t in (0.3, 0.5, 0.9):
        assert abs(vae.mp_sum(x, b, t).std().item() - 1) < 0.01
    # mp_cat: unit magnitude overall, the two parts weighted (1 - t) : t in energy share
    a = torch.randn(4096, 16, generator=g, dtype=torch.float64)
    c = torch.randn(4096, 4, generator=g, dtype=torch.float64)
    out = vae.mp_cat(a, c, t=0.3)
    assert abs(out.pow(2).mean().item() - 1) < 0.02
    ea, ec = out[:, :16].pow(2).sum(1).mean(), out[:, 16:].pow(2).sum(1).mean()
    assert abs((ea / ec).sqrt().item() - 0.7 / 0.3) < 0.05
    # pixel norm: exactly unit RMS over channels at every position
    pn = vae.normalize(x * 5 + 1, dim=1)
    assert torch.allclose(pn.pow(2).mean(1).sqrt(), torch.ones(1, dtype=torch.float64), atol=1e-4)
    # a whole residual block with attention keeps the magnitude near 1 (no growth with depth)
    blk = vae.Block(32, 32, "dec", heads=4).double()
    h = x[:8]
    for _ in range(6):
        h = blk(h)
    assert 0.5 < h.pow(2).mean().sqrt().item() < 2.0


def test_shapes_64_and_256_and_parameter_count():
    cfg = cfg_of()
    model = vae.RadVAE(cfg).eval()
    for s in (64, 256):
        x = torch.rand(2, 1, s, s) * 2 - 1
        with torch.no_grad():
            mean, logvar = model.encoder(x)
            rec = model.decoder(mean)
        assert mean.shape == logvar.shape == (2, 16, s // 8, s // 8)
        assert rec.shape == (2, 1, s, s)
    # radvae preset: radit B.1 states 88M parameters; counted on the meta device
    with torch.device("meta"):
        n = sum(p.numel() for p in vae.RadVAE(vae.parse_config(["--size", "radvae"])).parameters())
    assert 85e6 < n < 91e6


# ---------------------------------------------------------------------------------------------------------------
# Training, resume, encode / decode


@pytest.fixture(scope="module")
def data32(phantom_dir, tmp_path_factory):
    """A private copy of the shared phantom (encode writes latents/ into the dataset folder)."""
    dst = str(tmp_path_factory.mktemp("vae") / "phantom")
    shutil.copytree(phantom_dir, dst, ignore=shutil.ignore_patterns("latents"))
    return dst


@pytest.fixture(scope="module")
def trained(data32, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vae_run"))
    vae.main(SMALL + ["--data", data32, "--out", out, "--max-steps", "100", "--batch-size", "8", "--lr", "3e-3",
                      "--warmup", "10", "--ema", "0.9", "--log-every", "10", "--ckpt-every", "100",
                      "--sample-every", "100"])
    return out


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_falls_over_100_steps(trained):
    log = read_log(trained)
    assert [r["step"] for r in log] == list(range(10, 101, 10))
    first, last = log[0]["rec"], min(r["rec"] for r in log[-2:])
    assert last < 0.6 * first, (first, last)
    assert all(math.isfinite(r["loss"]) and r["perceptual"] == 0 for r in log)
    assert os.path.isfile(os.path.join(trained, "grids", "0000100.png"))


def test_resume_reproduces_the_same_run(data32, tmp_path):
    base = SMALL + ["--data", data32, "--batch-size", "4", "--log-every", "1", "--ckpt-every", "2", "--sample-every",
                    "0", "--warmup", "3", "--kl-weight", "0.01"]                  # 0: no grids (it once crashed)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    vae.main(base + ["--out", a, "--max-steps", "4"])
    vae.main(base + ["--out", b, "--max-steps", "2"])
    with open(os.path.join(b, "log.jsonl"), "a") as f:           # a killed run: a record past its checkpoint, and
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')       # half a line (issue 19)
    vae.main(base + ["--out", b, "--max-steps", "4"])                 # resumes at step 2, drops both
    la, lb = read_log(a), read_log(b)
    grids = os.path.join(a, "grids")
    assert not os.path.isdir(grids) or not any(f.endswith(".png") for f in os.listdir(grids))
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-7)
    ta, tb = load_file(os.path.join(a, "ckpt.safetensors")), load_file(os.path.join(b, "ckpt.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def encoded(trained, data32):
    folder = vae.main(["encode", "--ckpt", trained, "--data", data32, "--name", "tiny", "--batch-size", "64"])
    return folder


def in_script(trained):
    cfg, model, *_ = vae.load_for_inference(vae.InferConfig(ckpt=trained, device="cpu"))
    return cfg, model


def test_encode_writes_aligned_latents_and_correct_stats(trained, data32, encoded):
    import csv
    cfg, model = in_script(trained)
    info = json.load(open(os.path.join(encoded, "info.json")))
    assert info["shape"] == [16, 4, 4] and info["vae"] == "tiny" and info["vae_id"] == vae.vae_id(model)
    rows = list(csv.DictReader(open(os.path.join(data32, "meta.csv"))))
    lat = {}
    for sh in sorted({int(r["shard"]) for r in rows}):
        with safe_open(os.path.join(encoded, "shards", f"{sh:05d}.safetensors"), "pt") as f:
            assert f.metadata()["vae_id"] == info["vae_id"]
            lat[sh] = f.get_tensor("latents")
        with safe_open(os.path.join(data32, "shards", f"{sh:05d}.safetensors"), "pt") as f:
            n_img = f.get_slice("images").get_shape()[0]
        assert lat[sh].shape == (n_img, 16, 4, 4)
    # per-channel mean / std over the train rows, float64 numpy from the shards
    z = np.stack([lat[int(r["shard"])][int(r["index"])].numpy() for r in rows if r["split"] == "train"])
    z = z.astype(np.float64)
    np.testing.assert_allclose(info["mean"], z.mean((0, 2, 3)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(info["std"], z.std((0, 2, 3)), rtol=1e-5, atol=1e-9)
    assert np.all(np.array(info["std"]) > 1e-3)
    # alignment: the latent of meta.csv row (shard, index) is the encoding of that row's own image
    pick = [rows[0], rows[len(rows) // 2], rows[-1]]
    for r in pick:
        with safe_open(os.path.join(data32, "shards", f"{int(r['shard']):05d}.safetensors"), "pt") as f:
            img = f.get_slice("images")[int(r["index"]):int(r["index"]) + 1]
        x = (img.double() + 0.5) / 32768 - 1                         # uint16 -> [-1, 1], written out here
        with torch.no_grad():
            mu = model.encoder(x.float())[0][0]
        torch.testing.assert_close(lat[int(r["shard"])][int(r["index"])], mu, rtol=1e-4, atol=1e-5)


FRESH = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
src = open(sys.argv[1]).read()
block = src[src.index("# --- skeleton: radvae_decoder"):src.index("# --- end skeleton: radvae_decoder ---")]
ns = {}
exec(block, ns)                                        # the documented copy-paste block, not an import of vae.py
z = load_file(sys.argv[2])["z"]
dec, spec = ns["load_radvae_decoder"](sys.argv[3] + "/decoder.safetensors")
prog = torch.export.load(sys.argv[3] + "/decoder.pt2").module()
assert "vae" not in sys.modules, "vae.py was imported"
save_file({"safe": dec(z), "pt2": prog(z), "pt2_one": prog(z[:1])}, sys.argv[4])
print(json.dumps({"format": spec["format"], "modules": sorted(m for m in sys.modules if m == "vae")}))
"""


def test_decoders_load_in_a_fresh_process_and_match_the_in_script_decoder(trained, encoded, tmp_path):
    cfg, model = in_script(trained)
    z = load_file(os.path.join(encoded, "shards", "00000.safetensors"))["latents"][:5].contiguous()
    with torch.no_grad():
        ref = model.decoder(z).clamp(-1, 1)
    assert ref.std() > 1e-2                                       # a real decoder output, not the zero init
    save_file({"z": z}, str(tmp_path / "z.safetensors"))
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    r = subprocess.run([sys.executable, str(script), os.path.join(ROOT, "vae.py"), str(tmp_path / "z.safetensors"),
                        encoded, str(tmp_path / "o.safetensors")], cwd=str(tmp_path), env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"format": "radvae-decoder/1", "modules": []}
    o = load_file(str(tmp_path / "o.safetensors"))
    torch.testing.assert_close(o["safe"], ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(o["pt2"], ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(o["pt2_one"], ref[:1], rtol=1e-4, atol=1e-5)   # dynamic batch
    # rectified_flow.py's consumer contract: normalised latents * std + mean -> the pt2 decoder -> [-1, 1]
    info = json.load(open(os.path.join(encoded, "info.json")))
    assert info["decoder"] == "decoder.pt2" and info["decoder_safetensors"] == "decoder.safetensors"


def test_exported_encoder_equals_the_posterior_mean_on_the_encoded_data(trained, data32, encoded):
    """encoder.pt2 (controlnet.py encodes condition maps with it): images -> raw posterior means, dynamic batch."""
    cfg, model = in_script(trained)
    info = json.load(open(os.path.join(encoded, "info.json")))
    assert info["encoder"] == "encoder.pt2"
    prog = torch.export.load(os.path.join(encoded, info["encoder"])).module()
    with safe_open(os.path.join(data32, "shards", "00000.safetensors"), "pt") as f:
        img = f.get_slice("images")[:7]
    x = ((img.double() + 0.5) / 32768 - 1).float()                   # uint16 -> [-1, 1], written out here
    stored = load_file(os.path.join(encoded, "shards", "00000.safetensors"))["latents"][:7]
    with torch.no_grad():
        mu = model.encoder(x)[0]
        out, one = prog(x), prog(x[:1])
    assert out.shape == (7, 16, 4, 4) and mu.std() > 1e-2
    torch.testing.assert_close(out, mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, stored, rtol=1e-4, atol=1e-5)   # the latents encode wrote for these rows
    torch.testing.assert_close(one, mu[:1], rtol=1e-4, atol=1e-5)   # dynamic batch
    # a masks-like input (two levels, -1 / +1) as controlnet.py feeds it
    m = torch.zeros(3, 1, 32, 32)
    m[:, :, 8:20, 4:28] = 1
    with torch.no_grad():
        torch.testing.assert_close(prog(m * 2 - 1), model.encoder(m * 2 - 1)[0], rtol=1e-4, atol=1e-5)


def test_exported_decoder_takes_the_latent_side_of_its_folder(trained, tmp_path):
    """64 px data has 8x8 latents: the .pt2 program written beside them must decode 8x8 (it once was fixed at 4x4)."""
    cfg, model = in_script(trained)
    vae.write_decoders(str(tmp_path), cfg, model, "t", 8)
    z = torch.randn(3, cfg.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.decoder(z).clamp(-1, 1)
        out = torch.export.load(str(tmp_path / "decoder.pt2")).module()(z)
    assert out.shape == (3, 1, 64, 64)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_decode_cli_writes_pngs_and_rejects_bad_input(trained, encoded, tmp_path):
    from PIL import Image
    cfg, model = in_script(trained)
    lat_file = os.path.join(encoded, "shards", "00000.safetensors")
    out = str(tmp_path / "png")
    assert vae.main(["decode", "--latents", lat_file, "--out", out, "--device", "cpu"]) > 0
    z = load_file(lat_file)["latents"]
    with torch.no_grad():
        ref = model.decoder(z[:3]).clamp(-1, 1)
    for i in range(3):
        png = np.asarray(Image.open(os.path.join(out, f"00000_{i:06d}.png"))).astype(np.int64)
        expect = np.floor((ref[i, 0].double().numpy() + 1) * 32768).clip(0, 65535)
        assert np.abs(png - expect).max() <= 2
    assert vae.main(["decode", "--latents", lat_file, "--out", out]) == 0        # resumable: nothing left to do
    # normalised latents round-trip through info.json's mean / std
    info = json.load(open(os.path.join(encoded, "info.json")))
    zn = (z[:2] - torch.tensor(info["mean"]).view(1, -1, 1, 1)) / torch.tensor(info["std"]).view(1, -1, 1, 1)
    save_file({"latents": zn.float().contiguous()}, str(tmp_path / "n.safetensors"))
    vae.main(["decode", "--latents", str(tmp_path / "n.safetensors"), "--decoder", encoded, "--normalised",
              "--out", str(tmp_path / "pn")])
    png = np.asarray(Image.open(str(tmp_path / "pn" / "n_000001.png"))).astype(np.int64)
    assert np.abs(png - np.floor((ref[1, 0].double().numpy() + 1) * 32768).clip(0, 65535)).max() <= 4
    # a latent file from another VAE
    save_file({"latents": z[:2].contiguous()}, str(tmp_path / "other.safetensors"),
              metadata={"vae_id": "0123456789abcdef", "vae": "x"})
    with pytest.raises(SystemExit, match="another VAE"):
        vae.main(["decode", "--latents", str(tmp_path / "other.safetensors"), "--decoder", encoded, "--out", out])
    # a decoder file of another version
    with safe_open(os.path.join(encoded, "decoder.safetensors"), "pt") as f:
        spec, w = json.loads(f.metadata()["spec"]), {k: f.get_tensor(k) for k in f.keys()}
    spec["format"] = "radvae-decoder/0"
    save_file(w, str(tmp_path / "old.safetensors"), metadata={"spec": json.dumps(spec)})
    with pytest.raises(SystemExit, match="radvae-decoder/1"):
        vae.main(["decode", "--latents", lat_file, "--decoder", str(tmp_path / "old.safetensors"), "--out", out])
    # latents with the wrong channel count
    save_file({"latents": torch.zeros(1, 4, 4, 4)}, str(tmp_path / "c4.safetensors"))
    with pytest.raises(SystemExit, match=r"expected \[N, 16, h, w\]"):
        vae.main(["decode", "--latents", str(tmp_path / "c4.safetensors"), "--decoder", encoded, "--out", out])


def test_evaluate_psnr_matches_float64(trained, data32, tmp_path):
    res = vae.main(["evaluate", "--ckpt", trained, "--data", data32, "--split", "test", "--n", "16",
                    "--fd-features", "none", "--out", str(tmp_path)])
    cfg, model = in_script(trained)
    data = vae.CXRData(data32, "test")
    x = data.load(range(16)).double()
    with torch.no_grad():
        y = model(x.float())[0].double().clamp(-1, 1)
    mse = (((x + 1) / 2 - (y + 1) / 2) ** 2).mean((1, 2, 3))
    assert res["rows"]["model"]["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), abs=1e-3)
    assert -1 <= res["rows"]["model"]["ssim"] <= 1 and res["rows"]["bicubic x8"]["psnr"] > 10
    assert json.load(open(tmp_path / "vae_eval.json"))["n"] == 16


def test_bad_input_sizes(tmp_path):
    d = tmp_path / "odd"
    (d / "shards").mkdir(parents=True)
    (d / "meta.csv").write_text("id,split,shard,index\na,train,0,0\n")
    (d / "info.json").write_text(json.dumps({"size": 36}))
    save_file({"images": torch.zeros(1, 1, 36, 36, dtype=torch.uint16)}, str(d / "shards" / "00000.safetensors"))
    with pytest.raises(SystemExit, match="36 px; expected a side divisible by 8"):
        vae.main(SMALL + ["--data", str(d), "--out", str(tmp_path / "r"), "--max-steps", "1"])
    with pytest.raises(SystemExit, match="--mults"):
        vae.main(SMALL[:2] + ["--mults", "1,x", "--dry-run"])


# ---------------------------------------------------------------------------------------------------------------
# Perceptual loss through transformers, offline


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    net = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   image_size=32, patch_size=8))
    path = str(tmp_path_factory.mktemp("dinov2") / "tiny-dinov2")
    net.save_pretrained(path)
    return path, net.eval()


def test_perceptual_loss_random_dinov2_offline(tiny_dinov2, data32, tmp_path, monkeypatch):
    path, net = tiny_dinov2
    cfg = cfg_of("--perceptual", path, "--perceptual-size", "32")
    per = vae.load_perceptual(cfg, torch.device("cpu"))
    assert per.layers == [1, 2] and per.size == 32
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 1, 32, 32, generator=g)).clamp(-1, 1).requires_grad_(True)
    d = per(y, x)
    # independent reference: transformers hidden states, ImageNet normalisation, float64 unit-normalised tokens
    def feats(img):
        px = ((img.detach().double() + 1) / 2).repeat(1, 3, 1, 1)
        px = (px - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)) / \
            torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
        with torch.no_grad():
            hs = net(pixel_values=px.float(), output_hidden_states=True).hidden_states
        return [h.double() / h.double().pow(2).mean(-1, keepdim=True).sqrt() for h in hs[1:]]
    ref = sum(((a - b) ** 2).mean((1, 2)) for a, b in zip(feats(y), feats(x))) / 2
    torch.testing.assert_close(d.double(), ref, rtol=1e-3, atol=1e-6)
    assert torch.all(d > 0) and per(x, x).abs().max() < 1e-6
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    # integrated in training (2 steps), and the missing default fails with one line naming model and flag
    out = str(tmp_path / "p")
    vae.main(SMALL[:-2] + ["--perceptual", path, "--perceptual-size", "32", "--data", data32, "--out", out,
                           "--max-steps", "2", "--batch-size", "2", "--log-every", "1", "--sample-every", "100"])
    assert all(r["perceptual"] > 0 for r in read_log(out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        vae.load_perceptual(cfg_of("--perceptual", "raddino"), torch.device("cpu"))
    msg = str(e.value)
    assert "microsoft/rad-dino" in msg and "--perceptual none" in msg and "\n" not in msg

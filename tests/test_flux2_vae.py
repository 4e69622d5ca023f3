"""Tests of vae.py's FLUX.2 autoencoder reader (issue 26 item 4): the released checkpoint's tensor names and shapes
at the published configuration, a tiny-width instance against a float64 reference written here from BFL's
architecture, the latent normalisation (2x2 patches, BatchNorm statistics) against float64 index arithmetic, the
grey <-> RGB conversions of radit §5.1 / Table 8, `vae.py encode --vae flux2` writing a latent folder that the
latent models' reader takes, and one-line errors for missing or foreign weights. Random weights only, offline."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vae

# 32 latent channels as published, 32 and 64 wide (GroupNorm's 32 groups need >= 32 channels), two levels (f = 2:
# every kind of layer, at a fraction of the four levels' torch.export time); f = 8 is checked at the published config.
TINY = vae.Flux2Config(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def published_layout():
    """{name: shape} of the released ae.safetensors, enumerated here from BFL's src/flux2/autoencoder.py
    (AutoEncoderParams: ch 128, ch_mult [1, 2, 4, 4], num_res_blocks 2, z_channels 32, 3 in / out channels;
    Encoder, Decoder, ResnetBlock, AttnBlock, Downsample, Upsample; bn = BatchNorm2d(4 * 32, affine=False))."""
    ch = 128              # base channels
    mult = [1, 2, 4, 4]   # channel multiplier per level
    nres = 2              # residual blocks per level
    z = 32                # latent channels
    out = {}

    def conv(name, cin, cout, k):
        out[name + ".weight"] = (cout, cin, k, k)
        out[name + ".bias"] = (cout,)

    def norm(name, c):
        out[name + ".weight"] = (c,)
        out[name + ".bias"] = (c,)

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cin, cout, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cin, cout, 1)

    def mid(name, c):
        resnet(name + ".block_1", c, c)
        norm(name + ".attn_1.norm", c)
        for m in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{m}", c, c, 1)
        resnet(name + ".block_2", c, c)

    conv("encoder.conv_in", 3, ch, 3)
    in_mult = [1] + mult
    for i in range(4):
        cin = ch * in_mult[i]
        for j in range(nres):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 3:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    mid("encoder.mid", 512)
    norm("encoder.norm_out", 512)
    conv("encoder.conv_out", 512, 2 * z, 3)
    conv("encoder.quant_conv", 2 * z, 2 * z, 1)
    conv("decoder.post_quant_conv", z, z, 1)
    conv("decoder.conv_in", z, 512, 3)
    mid("decoder.mid", 512)
    cin = 512
    for i in reversed(range(4)):
        for j in range(nres + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", 128)
    conv("decoder.conv_out", 128, 3, 3)
    out["bn.running_mean"] = (128,)
    out["bn.running_var"] = (128,)
    out["bn.num_batches_tracked"] = ()
    return out


def test_published_layout_is_the_released_checkpoints():
    want = published_layout()
    got = vae.flux2_layout(vae.Flux2Config())                   # the model at the published config, meta device
    assert sorted(got) == sorted(want)
    assert {k: got[k] for k in want} == want
    # BFL's own AutoEncoder(AutoEncoderParams()) at flux2 commit ab7cca6, built and counted once by hand: 251
    # state-dict tensors, 84,046,115 parameters (encoder 34,425,856, decoder 49,620,259)
    assert len(got) == 251
    with torch.device("meta"):
        model = vae.Flux2AE()
    assert sum(p.numel() for p in model.encoder.parameters()) == 34_425_856
    assert sum(p.numel() for p in model.decoder.parameters()) == 49_620_259
    assert sum(p.numel() for p in model.parameters()) == 84_046_115
    # the config read back from those shapes is the published one (what load_flux2 builds for the release)
    assert vae.flux2_config_of(want, "ae.safetensors") == vae.Flux2Config()
    # the shape contract of the published depth (4 levels, 2 blocks, f = 8; a quarter of the width, 32 px images
    # for speed): grey [B, 1, S, S] -> [B, 32, S/8, S/8] -> normalised [B, 128, S/16, S/16] -> grey [B, 1, S, S]
    # (radit App. B.2: 32 x 64 x 64 latents at 512 px)
    quarter = vae.Flux2AE(vae.Flux2Config(ch=32)).eval()
    assert quarter.factor == 8
    with torch.no_grad():
        z = quarter.encode(vae.gray_to_rgb(torch.zeros(2, 1, 32, 32)))
        assert z.shape == (2, 32, 4, 4)
        assert quarter.normalize(z).shape == (2, 128, 2, 2)
        assert quarter.inv_normalize(quarter.normalize(z)).shape == z.shape
        assert vae.rgb_to_gray(quarter.decode(z), vae.GRAY_WEIGHTS["mean"]).shape == (2, 1, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# A tiny-width instance with random weights, saved in the released layout


def random_tiny(seed=0):
    """A TINY autoencoder whose every tensor is random (GroupNorm affines, BatchNorm statistics too)."""
    torch.manual_seed(seed)
    model = vae.Flux2AE(TINY).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        model.bn.running_mean.copy_(0.5 * torch.randn(128, generator=g))
        model.bn.running_var.copy_(0.2 + torch.rand(128, generator=g))
    return model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """DIR/ae.safetensors of a random TINY model, as released (no num_batches_tracked: it is optional)."""
    folder = tmp_path_factory.mktemp("flux2_weights")
    sd = {k: v.contiguous() for k, v in random_tiny().state_dict().items() if k != "bn.num_batches_tracked"}
    save_file(sd, str(folder / "ae.safetensors"))
    return str(folder)


def ref_gn(x, w, b):
    """GroupNorm, 32 groups, eps 1e-6 (BFL), by hand in float64."""
    B, C, H, W = x.shape
    g = x.reshape(B, 32, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
    return g.reshape(B, C, H, W) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def reference(sd, cfg):
    """encode(rgb) -> posterior mean, decode(z) -> rgb: BFL's forward in float64 from the state dict by name."""
    sd = {k: v.double() for k, v in sd.items()}
    levels = len(cfg.ch_mult)

    def conv(x, name, stride=1, pad=None):
        w = sd[name + ".weight"]
        return F.conv2d(x, w, sd[name + ".bias"], stride, w.shape[-1] // 2 if pad is None else pad)

    def silu(x):
        return x / (1 + torch.exp(-x))

    def gn(x, name):
        return ref_gn(x, sd[name + ".weight"], sd[name + ".bias"])

    def resnet(x, p):
        h = conv(silu(gn(x, p + ".norm1")), p + ".conv1")
        h = conv(silu(gn(h, p + ".norm2")), p + ".conv2")
        return (conv(x, p + ".nin_shortcut") if p + ".nin_shortcut.weight" in sd else x) + h

    def attn(x, p):
        B, C, H, W = x.shape
        h = gn(x, p + ".norm")
        q, k, v = (conv(h, f"{p}.{m}").reshape(B, C, H * W) for m in "qkv")
        a = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / C ** 0.5, -1)
        return x + conv(torch.einsum("bij,bcj->bci", a, v).reshape(B, C, H, W), p + ".proj_out")

    def middle(x, p):
        return resnet(attn(resnet(x, p + ".block_1"), p + ".attn_1"), p + ".block_2")

    def encode(x):
        x = conv(x, "encoder.conv_in")
        for i in range(levels):
            for j in range(cfg.num_res_blocks):
                x = resnet(x, f"encoder.down.{i}.block.{j}")
            if i < levels - 1:
                x = conv(F.pad(x, (0, 1, 0, 1)), f"encoder.down.{i}.downsample.conv", stride=2, pad=0)
        x = conv(silu(gn(middle(x, "encoder.mid"), "encoder.norm_out")), "encoder.conv_out")
        return conv(x, "encoder.quant_conv")[:, :cfg.z_channels]

    def decode(z):
        x = middle(conv(conv(z, "decoder.post_quant_conv"), "decoder.conv_in"), "decoder.mid")
        for i in reversed(range(levels)):
            for j in range(cfg.num_res_blocks + 1):
                x = resnet(x, f"decoder.up.{i}.block.{j}")
            if i > 0:
                x = conv(x.repeat_interleave(2, 2).repeat_interleave(2, 3), f"decoder.up.{i}.upsample.conv")
        return conv(silu(gn(x, "decoder.norm_out")), "decoder.conv_out")
    return encode, decode


def test_tiny_forward_matches_float64_reference_and_shape_contract(weights, tmp_path):
    ae, path, sha = vae.load_flux2(weights)
    assert path == os.path.join(weights, "ae.safetensors") and ae.config == TINY
    assert sha == hashlib.sha256(open(path, "rb").read()).hexdigest()
    ref_enc, ref_dec = reference(load_file(path), TINY)
    g = torch.Generator().manual_seed(1)
    rgb = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1                       # small: float64 convs are slow
    with torch.no_grad():
        z = ae.encode(rgb)
        out = ae.decode(z)
    assert z.shape == (2, 32, 8, 8) and out.shape == (2, 3, 16, 16)          # f = 2, 32 channels, RGB out
    zr = ref_enc(rgb.double())
    assert zr.std() > 0.05                                                    # a real signal, not a constant
    torch.testing.assert_close(z.double(), zr, rtol=1e-4, atol=1e-4 * zr.abs().max().item())
    dr = ref_dec(z.double())
    torch.testing.assert_close(out.double(), dr, rtol=1e-4, atol=1e-4 * dr.abs().max().item())
    # a bfloat16 copy of the same tensors (a released dtype) loads too, as those values in float32
    bf = str(tmp_path / "bf16.safetensors")
    save_file({k: v.bfloat16() for k, v in load_file(path).items()}, bf)
    ae16 = vae.load_flux2(bf)[0]
    w = ae16.state_dict()["decoder.conv_out.weight"]
    assert w.dtype == torch.float32
    assert torch.equal(w, ae.state_dict()["decoder.conv_out.weight"].bfloat16().float())


def test_latent_normalisation_matches_float64_index_arithmetic(weights):
    ae = vae.load_flux2(weights)[0]
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 32, 6, 8, generator=g, dtype=torch.float64)
    zn = ae.double().normalize(z)
    m = ae.bn.running_mean.numpy()
    v = ae.bn.running_var.numpy()
    zz = z.numpy()
    ref = np.zeros((2, 128, 3, 4))
    for c in range(32):                        # BFL: "c (i pi) (j pj) -> (c pi pj) i j", then (x - mean) / sd
        for pi in range(2):
            for pj in range(2):
                k = 4 * c + 2 * pi + pj
                ref[:, k] = (zz[:, c, pi::2, pj::2] - m[k]) / np.sqrt(v[k] + 1e-4)
    np.testing.assert_allclose(zn.numpy(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ae.inv_normalize(zn), z, rtol=1e-12, atol=1e-12)


def test_gray_to_rgb_and_back():
    x = torch.tensor([[[[0.3, -0.6], [1.0, -1.0]]]])
    rgb = vae.gray_to_rgb(x)
    assert rgb.shape == (1, 3, 2, 2) and all(torch.equal(rgb[:, c:c + 1], x) for c in range(3))
    px = torch.tensor([0.3, -0.6, 0.9]).view(1, 3, 1, 1)
    assert vae.rgb_to_gray(px, vae.GRAY_WEIGHTS["mean"]).item() == pytest.approx(0.2, abs=1e-7)
    luma = 0.29894 * 0.3 + 0.58704 * -0.6 + 0.11402 * 0.9                  # radit App. C, Table 8's weights
    assert vae.rgb_to_gray(px, vae.GRAY_WEIGHTS["luma"]).item() == pytest.approx(luma, abs=1e-7)
    # each channel is clamped to [-1, 1] before the average: (1.5, 0, 0) -> 1/3, not 0.5
    over = torch.tensor([1.5, 0.0, 0.0]).view(1, 3, 1, 1)
    assert vae.rgb_to_gray(over, vae.GRAY_WEIGHTS["mean"]).item() == pytest.approx(1 / 3, abs=1e-7)
    for name, w in vae.GRAY_WEIGHTS.items():                                 # a grey RGB image stays itself
        assert sum(w) == pytest.approx(1.0, abs=1e-9)
        torch.testing.assert_close(vae.rgb_to_gray(rgb, w), x, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# vae.py encode --vae flux2: the latent folder contract (FORMAT.md §7)


@pytest.fixture(scope="module")
def encoded(weights, tmp_path_factory):
    import prep_data
    data = str(tmp_path_factory.mktemp("flux2_data") / "phantom")          # 64 images: encoding stays cheap
    prep_data.make_phantom(data, n=64, size=32, seed=0, masks=False)
    folder = vae.main(["encode", "--vae", "flux2", "--weights", weights, "--data", data, "--batch-size", "256",
                       "--device", "cpu"])
    return data, folder


def test_encode_writes_the_latent_folder_contract(weights, encoded):
    import csv

    import rectified_flow
    data, folder = encoded
    assert folder == os.path.join(data, "latents", "flux2")                # --name defaults to the --vae's
    ae, path, sha = vae.load_flux2(weights)
    info = json.load(open(os.path.join(folder, "info.json")))
    assert info["format_version"] == 1 and info["shape"] == [32, 16, 16] and info["factor"] == 2
    assert info["vae"] == "flux2" and info["vae_id"] == "flux2-" + sha[:16] and info["image_size"] == 32
    assert info["weights"] == os.path.abspath(path) and info["weights_sha256"] == sha
    assert info["decoder"] == "decoder.pt2" and info["encoder"] == "encoder.pt2"
    assert info["decoder_safetensors"] is None and not os.path.exists(os.path.join(folder, "decoder.safetensors"))
    assert info["to_gray"] == "mean" and info["flux2_config"]["z_channels"] == 32
    rows = list(csv.DictReader(open(os.path.join(data, "meta.csv"))))
    lat = {}
    for sh in sorted({int(r["shard"]) for r in rows}):
        with safe_open(os.path.join(folder, "shards", f"{sh:05d}.safetensors"), "pt") as f:
            assert f.metadata()["vae_id"] == info["vae_id"]
            lat[sh] = f.get_tensor("latents")
        assert lat[sh].dtype == torch.float32 and lat[sh].shape[1:] == (32, 16, 16)
    z = np.stack([lat[int(r["shard"])][int(r["index"])].numpy() for r in rows if r["split"] == "train"])
    z = z.astype(np.float64)                                               # per channel over the train rows
    np.testing.assert_allclose(info["mean"], z.mean((0, 2, 3)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(info["std"], z.std((0, 2, 3)), rtol=1e-5, atol=1e-9)
    # row (shard, index) holds the posterior mean of its own image, repeated to RGB (written out here)
    r = rows[len(rows) // 2]
    with safe_open(os.path.join(data, "shards", f"{int(r['shard']):05d}.safetensors"), "pt") as f:
        img = f.get_slice("images")[int(r["index"]):int(r["index"]) + 1]
    x = ((img.double() + 0.5) / 32768 - 1).float()
    with torch.no_grad():
        mu = ae.encode(torch.cat([x, x, x], 1))
    torch.testing.assert_close(lat[int(r["shard"])][int(r["index"])][None], mu, rtol=1e-4, atol=1e-5)
    # the latent models' own reader takes the folder: decoder.pt2 (no decoder.safetensors) on normalised latents
    li = rectified_flow.latent_info(folder)
    assert li["shape"] == (32, 16, 16) and li["decoder_safetensors"] is None
    dec = rectified_flow.load_latent_decoder(folder, li, li["mean"], li["std"], torch.device("cpu"))
    zs = lat[0][:3]
    zn = (zs - li["mean"]) / li["std"]
    with torch.no_grad():
        want = ae.decode(zs).clamp(-1, 1).mean(1, keepdim=True)           # radit §5.1: the RGB average
        got = dec(zn)
    assert got.shape == (3, 1, 32, 32) and float(got.abs().max()) <= 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    enc = torch.export.load(os.path.join(folder, "encoder.pt2")).module()
    torch.testing.assert_close(enc(x), mu, rtol=1e-4, atol=1e-5)


def test_decode_from_the_weights_writes_the_rgb_average(weights, encoded, tmp_path):
    data, folder = encoded
    z = load_file(os.path.join(folder, "shards", "00000.safetensors"))["latents"][:2].contiguous()
    lat = str(tmp_path / "z.safetensors")
    save_file({"latents": z}, lat, metadata={"vae_id": json.load(open(os.path.join(folder, "info.json")))["vae_id"]})
    out = str(tmp_path / "png")
    vae.main(["decode", "--vae", "flux2", "--weights", weights, "--latents", lat, "--out", out, "--to-gray", "luma",
              "--device", "cpu"])
    ae = vae.load_flux2(weights)[0]
    with torch.no_grad():
        rgb = ae.decode(z).clamp(-1, 1).double()
    want = 0.29894 * rgb[:, 0] + 0.58704 * rgb[:, 1] + 0.11402 * rgb[:, 2]
    png = np.asarray(Image.open(os.path.join(out, "z_000001.png"))).astype(np.float64)
    np.testing.assert_allclose((png + 0.5) / 32768 - 1, want[1].numpy(), atol=1 / 32768 + 1e-5)   # to_float
    # --normalised: the mean / std of the latent folder (--decoder) are undone first: the same images
    info = json.load(open(os.path.join(folder, "info.json")))
    mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["std"]).view(1, -1, 1, 1)
    save_file({"latents": ((z - mean) / std).contiguous()}, lat, metadata={"vae_id": info["vae_id"]})
    vae.main(["decode", "--vae", "flux2", "--weights", weights, "--latents", lat, "--out", str(tmp_path / "n"),
              "--to-gray", "luma", "--normalised", "--decoder", folder, "--device", "cpu"])
    png_n = np.asarray(Image.open(os.path.join(str(tmp_path / "n"), "z_000001.png"))).astype(np.float64)
    assert np.abs(png_n - png).max() <= 2                                  # float32 round trip: a level or two
    # latents of another VAE are refused
    save_file({"latents": z}, lat, metadata={"vae_id": "flux2-0000000000000000"})
    with pytest.raises(SystemExit, match="another VAE"):
        vae.main(["decode", "--vae", "flux2", "--weights", weights, "--latents", lat, "--out", str(tmp_path / "b")])


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and how to get it


def test_missing_or_foreign_weights_give_one_line(weights, tmp_path):
    phantom_dir = str(tmp_path / "data")                 # never read: the weights are checked first
    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as e:
        vae.main(["encode", "--vae", "flux2", "--weights", nowhere, "--data", phantom_dir])
    msg = str(e.value)
    assert "\n" not in msg and os.path.join(nowhere, "ae.safetensors") in msg
    assert "huggingface.co/black-forest-labs/FLUX.2-dev" in msg and "hf download" in msg
    with pytest.raises(SystemExit, match="--weights: not given"):
        vae.main(["encode", "--vae", "flux2", "--data", phantom_dir])
    with pytest.raises(SystemExit, match="--to-gray 'red'"):
        vae.main(["encode", "--vae", "flux2", "--weights", weights, "--to-gray", "red", "--data", phantom_dir])
    with pytest.raises(SystemExit, match="--vae 'sdxl'"):
        vae.main(["encode", "--vae", "sdxl", "--data", phantom_dir])
    sd = load_file(os.path.join(weights, "ae.safetensors"))
    cases = {"renamed": {("encoder.mid.attn_1.q_proj.weight" if k == "encoder.mid.attn_1.q.weight" else k): v
                         for k, v in sd.items()},
             "reshaped": {**sd, "decoder.post_quant_conv.weight": torch.zeros(32, 32, 3, 3)},
             "diffusers": {"encoder.conv_in.weight": sd["encoder.conv_in.weight"]}}
    for name, bad in cases.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(bad, path)
        with pytest.raises(SystemExit) as e:
            vae.load_flux2(path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(path) and "layout" in msg, (name, msg)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit, match="not a readable safetensors file"):
        vae.load_flux2(str(tmp_path / "junk.safetensors"))

"""Tests of ldm_multicond.py (U-Net LDM with the multi-conditional unit): CPU, a reduced tiny model, the 32 px
phantom of conftest.py, a tiny random BERT (WordPiece vocabulary of the phantom's report words) and a tiny random
ViT as the frozen encoders, written by the tests (no network)."""
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
from scipy import stats

import ldm_multicond as lm
from tiny_text import phantom_texts, write_tiny_bert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--channels", "16", "--dim", "32", "--heads", "2", "--tau-layers", "1", "--tau-heads", "2", "--tau-ff", "64",
         "--batch-size", "8", "--max-length", "24", "--lr", "2e-3", "--ema", "0.9"]

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contended ones; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny random BERT (1 layer, 32 wide; a vocabulary of every phantom report word, tests/tiny_text.py) and a
    tiny random ViT (1 layer, 24 wide) saved as transformers folders."""
    from transformers import ViTConfig, ViTModel
    d = tmp_path_factory.mktemp("enc")
    bert = write_tiny_bert(str(d / "bert"), phantom_texts(), layers=1, max_positions=160)
    vit = str(d / "vit")
    ViTModel(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=24, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=48)).save_pretrained(vit)
    return bert, vit


def with_caches(src, dst, encoders, max_length=24):
    """A copy of a phantom dataset with its reports and images cached by the tiny encoders."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("text", "images", "latents"))
    lm.main(["embed-text", "--data", dst, "--text-encoder", encoders[0], "--name", "bert",
             "--max-length", str(max_length)])
    lm.main(["embed-images", "--data", dst, "--image-encoder", encoders[1], "--name", "vit"])
    return dst


@pytest.fixture(scope="module")
def data32(tmp_path_factory, phantom_dir, encoders):
    return with_caches(phantom_dir, str(tmp_path_factory.mktemp("d32") / "data"), encoders)


def train(data, out, *extra):
    return lm.main(["--data", data, "--out", out, *SMALL, "--log-every", "1", "--sample-every", "0", *extra])


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out, prefix="model."):
    with safe_open(os.path.join(out, "ckpt.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def png(path):
    return np.asarray(Image.open(path)).astype(np.int64)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data32):
    """The reduced tiny model trained 30 steps on the phantom: the loss test and the sampling tests use it."""
    out = str(tmp_path_factory.mktemp("ldm") / "run")
    train(data32, out, "--max-steps", "30", "--ckpt-every", "1000", "--sample-every", "30")
    return out


def small_cfg(**kw):
    base = dict(channels=16, dim=32, heads=2, tau_layers=1, tau_heads=2, tau_ff=64, in_channels=1, image_size=16,
                text_dim=16, image_dim=24, max_length=128)
    return lm.Config(**{**base, **kw})


def randomise(model, seed=0):
    """Zero-initialised output layers hide the conditioning path; give every parameter a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def cond_inputs(B, cfg, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, cfg.max_length + 1, (B,), generator=g) if lengths is None else lengths
    return (torch.randn(B, 17, generator=g), torch.randn(B, cfg.image_dim, generator=g),
            torch.randn(B, cfg.max_length, cfg.text_dim, generator=g), lengths)


# ---------------------------------------------------------------------------------------------------------------
# Model: encoders, C, null tokens


def test_encoder_outputs_and_the_130_token_condition():
    cfg = small_cfg()
    unit = lm.MultiCondUnit(cfg)
    labels, img, text, lengths = cond_inputs(3, cfg)
    assert unit.label(labels).shape == (3, 32) and unit.image(img).shape == (3, 32)
    assert unit.text(text).shape == (3, 128, 32)
    drop = torch.zeros(3, 3, dtype=torch.bool)
    C, klen = unit(labels, img, text, lengths, drop)
    assert C.shape == (3, 130, 32) and torch.equal(klen, lengths + 2)
    # the paper's unit (multicond App. A.1): 768-wide tokens, tau 3 layers x 8 heads, FF 2048; Bio_ClinicalBERT is
    # 768 wide (no adapter), ELIXR-C 1376
    with torch.device("meta"):
        paper = lm.MultiCondUnit(lm.Config(**{**lm.asdict(lm.Config()), **lm.PRESETS["paper"], "text_dim": 768,
                                              "image_dim": 1376}))
        C, _ = paper(torch.zeros(2, 17), torch.zeros(2, 1376), torch.zeros(2, 128, 768),
                     torch.full((2,), 128), torch.zeros(2, 3, dtype=torch.bool))
    assert C.shape == (2, 130, 768) and isinstance(paper.text, torch.nn.Identity)
    assert len(paper.tau) == 3 and paper.tau[0].attn.heads == 8 and paper.tau[0].ff[0].weight.shape == (2048, 768)
    assert paper.label[0].weight.shape == (768, 17) and paper.image[0].weight.shape == (768, 1376)


def test_all_null_is_the_unconditional_model_and_padding_is_ignored():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = randomise(lm.MultiCondLDM(cfg))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 700])
    a, b = cond_inputs(2, cfg, seed=1), cond_inputs(2, cfg, seed=2)
    null = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        Ca, ka = model.cond(*a, null)
        Cb, kb = model.cond(*b, null)
        Cn, kn = model.cond(None, None, None, None, null)
        assert torch.equal(Ca, Cb) and torch.equal(Ca, Cn) and torch.equal(ka, kn) and (ka == 3).all()  # L, I, 1 null T
        ea, eb, en = model(x, t, *a, null), model(x, t, *b, null), model(x, t, None, None, None, None, null)
        assert torch.equal(ea, eb) and torch.equal(ea, en)
        full = torch.zeros(2, 3, dtype=torch.bool)
        assert (model(x, t, *a, full) - model(x, t, *b, full)).abs().max() > 1e-3      # conditions do act
        for j in range(3):                                       # each modality alone changes the output
            one = null.clone()
            one[:, j] = False
            assert (model(x, t, *a, one) - en).abs().max() > 1e-4, "LIT"[j]
        # text states past each report's length never reach the output
        lengths = torch.tensor([5, 9])
        lab, img, text, _ = cond_inputs(2, cfg, seed=3)
        noisy = text.clone()
        noisy[0, 5:], noisy[1, 9:] = 100.0, -50.0
        e1, e2 = model(x, t, lab, img, text, lengths, full), model(x, t, lab, img, noisy, lengths, full)
        assert torch.allclose(e1, e2, atol=1e-5)


def test_model_without_a_modality_keeps_it_null():
    cfg = small_cfg(modalities="L,T", image_dim=0)
    torch.manual_seed(0)
    model = randomise(lm.MultiCondLDM(cfg))
    assert model.cond.image is None
    lab, _, text, lengths = cond_inputs(2, small_cfg(), seed=4)
    lengths = lengths.clamp(max=128)
    drop = torch.zeros(2, 3, dtype=torch.bool)
    with torch.no_grad():
        C1, _ = model.cond(lab, torch.randn(2, 5), text[..., :16], lengths, drop)
        C2, _ = model.cond(lab, None, text[..., :16], lengths, drop)
    assert torch.equal(C1, C2)


def test_activation_checkpointing_and_sdpa_give_the_same_gradients():
    cfg = small_cfg()
    grads = []
    for ckpt, impl in ((False, "kernels"), (True, "kernels"), (False, "sdpa")):
        torch.manual_seed(0)
        model = randomise(lm.MultiCondLDM(lm.Config(**{**lm.asdict(cfg), "grad_ckpt": ckpt}))).train()
        model.set_attention(impl)
        x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 900])
        model(x, t, *cond_inputs(2, cfg, seed=5), torch.zeros(2, 3, dtype=torch.bool)).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert torch.allclose(grads[0], grads[2], rtol=1e-4, atol=1e-6)


def test_label_vector_encoding():
    row = {lab: "" for lab in lm.LABELS}
    row.update({"Cardiomegaly": "1", "Edema": "-1.0", "No Finding": "0", "age": "70", "sex": "F", "race": "BLACK"})
    v = lm.label_vector(row, "row")
    want = [0.0] * 14
    want[1], want[3] = 1.0, -1.0
    assert v == want + [0.7, -1.0, 2 / 3]
    assert lm.label_vector({}, "row") == [0.0] * 17
    with pytest.raises(SystemExit, match="Edema='2'"):
        lm.label_vector({"Edema": "2"}, "row")


# ---------------------------------------------------------------------------------------------------------------
# Method: schedule, null assignment, DDIM, guidance


def test_schedule_endpoints_and_shape_against_float64_closed_form():
    T, b0, b1 = 1000, 0.0015, 0.0295
    k = np.arange(T, dtype=np.float64)
    sq = (math.sqrt(b0) + k / (T - 1) * (math.sqrt(b1) - math.sqrt(b0))) ** 2
    lin = b0 + k / (T - 1) * (b1 - b0)
    for kind, ref in (("sqrt-linear", sq), ("linear", lin)):
        s = lm.Schedule(T, b0, b1, kind)
        betas = s.betas.numpy()
        assert s.betas.dtype == torch.float64 and betas.shape == (T,)
        assert abs(betas[0] - b0) < 1e-15 and abs(betas[-1] - b1) < 1e-15
        np.testing.assert_allclose(betas, ref, rtol=1e-12, atol=0)
        np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - ref), rtol=1e-10)
    d2_sq, d2_lin = np.diff(lm.Schedule(kind="sqrt-linear").betas.numpy(), 2), np.diff(lin, 2)
    step = (math.sqrt(b1) - math.sqrt(b0)) / (T - 1)
    np.testing.assert_allclose(d2_sq, 2 * step ** 2, rtol=1e-6)  # sqrt-linear: convex, constant curvature
    assert np.abs(d2_lin).max() < 1e-15                          # linear: straight
    assert np.all(sq[1:-1] < lin[1:-1])                          # the sqrt-linear betas lie below the chord
    assert lm.Schedule().alphas_cumprod[-1] > lm.Schedule(kind="linear").alphas_cumprod[-1]


def test_null_assignment_rates_are_binomial_and_independent():
    cfg = lm.Config(batch_size=4096)
    sched = lm.Schedule()
    drop = torch.cat([lm.draw_step(cfg, sched, s, (1, 2, 2), "cpu")[2] for s in range(5)]).numpy()
    n, p = len(drop), np.array([0.4, 0.5, 0.4])                 # multicond App. A.2
    rate = drop.mean(0)
    assert np.all(np.abs(rate - p) < 4.5 * np.sqrt(p * (1 - p) / n)), rate
    cells = np.bincount(drop[:, 0] * 4 + drop[:, 1] * 2 + drop[:, 2], minlength=8)
    expect = np.array([np.prod([p[j] if (c >> (2 - j)) & 1 else 1 - p[j] for j in range(3)]) for c in range(8)]) * n
    assert stats.chisquare(cells, expect).pvalue > 1e-4         # the joint law is the product of the marginals
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert abs(stats.pearsonr(drop[:, a], drop[:, b])[0]) < 4.5 / np.sqrt(n)
    again = lm.draw_step(cfg, sched, 3, (1, 2, 2), "cpu")
    assert torch.equal(again[2], torch.from_numpy(drop[3 * 4096:4 * 4096]))    # a function of (seed, step)
    t = torch.cat([lm.draw_step(cfg, sched, s, (1, 2, 2), "cpu")[1] for s in range(5)]).numpy()
    assert t.min() >= 0 and t.max() <= 999 and stats.kstest(t / 1000, "uniform").pvalue > 1e-4


def test_ddim_75_steps_on_a_gaussian_with_the_exact_noise_predictor():
    """Data N(mu, s^2): the exact eps(x_t) = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab). DDIM (eta 0) is
    then an affine map x = a z + b of the noise, computed here by an independent scalar float64 recursion."""
    sched, mu, s = lm.Schedule(), 0.3, 0.5
    abar = np.cumprod(1 - (np.linspace(0.0015 ** 0.5, 0.0295 ** 0.5, 1000) ** 2))
    def eps(x, t):
        ab = abar[t]
        return math.sqrt(1 - ab) * (x - math.sqrt(ab) * mu) / (ab * s * s + 1 - ab)
    ts = np.unique(np.round(np.linspace(0, 999, 75)).astype(int))
    a, b = 1.0, 0.0                                              # x = a z + b along the way
    for i in range(len(ts) - 1, -1, -1):
        ab, ab_prev = abar[ts[i]], (abar[ts[i - 1]] if i else 1.0)
        k = math.sqrt(1 - ab) / (ab * s * s + 1 - ab)            # e = k (x - sqrt(ab) mu)
        x0_a, x0_b = (1 - math.sqrt(1 - ab) * k) / math.sqrt(ab), math.sqrt(1 - ab) * k * mu
        e_a, e_b = k, -k * math.sqrt(ab) * mu
        a, b = (math.sqrt(ab_prev) * x0_a + math.sqrt(1 - ab_prev) * e_a) * a, \
            (math.sqrt(ab_prev) * x0_a + math.sqrt(1 - ab_prev) * e_a) * b + math.sqrt(ab_prev) * x0_b + \
            math.sqrt(1 - ab_prev) * e_b
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = lm.ddim_sample(eps, sched, noise, steps=75)
    assert len(ts) == 75 and torch.allclose(x, a * noise + b, rtol=0, atol=1e-10)
    assert abs(b + a * 0 - mu) < 0.02 and abs(a - s) / s < 0.06   # and near the data law (75 steps: a few % off)
    assert torch.equal(x, lm.ddim_sample(eps, sched, noise.clone(), steps=75))
    assert lm.respace(1000, 75)[0] == 0 and lm.respace(1000, 75)[-1] == 999


def test_guidance_combines_the_right_branches_on_every_channel():
    seen = []
    def model(x, t, labels, img, text, lengths, drop):         # a recording stand-in: 1 + 2 [L kept] + 0.5 [T null]
        seen.append(drop.clone())
        return (1.0 + 2.0 * ~drop[:, 0] + 0.5 * drop[:, 2]).view(-1, 1, 1, 1).expand_as(x)
    x = torch.zeros(2, 4, 3, 3)
    inputs = (torch.zeros(2, 17), None, None, torch.zeros(2, dtype=torch.long))
    out = lm.guided_eps(model, x, 5, inputs, [True, False, True], [False] * 3, 4.0)
    c, u = 3.0 + 0.0, 1.0 + 0.5                                  # e_c: L, T kept; e_u: all null
    assert torch.allclose(out, torch.full_like(x, u + 4 * (c - u)))
    assert seen[-1].tolist() == [[False, True, False]] * 2 + [[True, True, True]] * 2
    lm.guided_eps(model, x, 5, inputs, [True, True, True], [False, True, False], 2.0)
    assert seen[-1].tolist() == [[False, False, False]] * 2 + [[True, False, True]] * 2
    one = lm.guided_eps(model, x, 5, inputs, [True, False, False], [False] * 3, 1.0)
    assert len(seen[-1]) == 2 and torch.allclose(one, torch.full_like(x, 3.5))   # w = 1: the conditional model


# ---------------------------------------------------------------------------------------------------------------
# Caches, data


def test_embed_caches_match_the_encoders(data32, encoders):
    from transformers import AutoModel, AutoTokenizer
    meta = rows(os.path.join(data32, "meta.csv"))
    r = meta[3]
    tok, bert = AutoTokenizer.from_pretrained(encoders[0]), AutoModel.from_pretrained(encoders[0]).eval()
    ids = tok(r["report"], truncation=True, max_length=24, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = bert(input_ids=ids).last_hidden_state[0]
    with safe_open(os.path.join(data32, "text", "bert", "shards", f"{int(r['shard']):05d}.safetensors"), "pt") as f:
        h, n = f.get_tensor("hidden")[int(r["index"])].float(), int(f.get_tensor("lengths")[int(r["index"])])
    assert n == ids.shape[1] and torch.allclose(h[:n], ref, atol=0.05 * ref.abs().max().item())   # bf16 cache
    assert (h[n:] == 0).all()
    vit = AutoModel.from_pretrained(encoders[1]).eval()
    with safe_open(os.path.join(data32, "shards", f"{int(r['shard']):05d}.safetensors"), "pt") as f:
        img = f.get_tensor("images")[int(r["index"])].float()
    x = (img / 65535.0).expand(3, -1, -1)[None]                 # 32 px already: no resize; normalise by 0.5 / 0.5
    with torch.no_grad():
        ref = vit(pixel_values=(x - 0.5) / 0.5).pooler_output[0]
    with safe_open(os.path.join(data32, "images", "vit", "shards", f"{int(r['shard']):05d}.safetensors"), "pt") as f:
        feat = f.get_tensor("features")[int(r["index"])]
    assert torch.allclose(feat, ref, atol=1e-3)
    info = json.load(open(os.path.join(data32, "images", "vit", "info.json")))
    assert info["encoder"] == os.path.abspath(encoders[1]) and info["dim"] == 24


def test_conditioning_image_is_another_of_the_same_study_else_patient(data32):
    meta = rows(os.path.join(data32, "meta.csv"))
    a, b, c, d, e = [dict(r) for r in meta[:5]]
    b["study_id"] = a["study_id"]                                # a, b: one study; c, d: one patient; e alone
    d["patient_id"] = c["patient_id"]
    cfg = lm.Config(data=data32, modalities="L,I", max_length=24)
    feats = lm.CondSource(data32, [a, b, c, d, e], cfg, [True, True, False], "same-study").img
    own = lm.CondSource(data32, [a, b, c, d, e], cfg, [True, True, False], "same-image").img
    assert [int(torch.nonzero((own == f).all(1))[0]) for f in feats] == [1, 0, 3, 2, 4]
    assert len({tuple(f.tolist()) for f in own}) == 5


# ---------------------------------------------------------------------------------------------------------------
# Training, sampling


def test_loss_falls_on_phantom(run):
    losses = [r["loss"] for r in log(run)]
    assert len(losses) == 30 and all(np.isfinite(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-10:])
    assert first > 0.7 and last < 0.5 * first, (first, last)    # zero-initialised output: loss starts at E eps^2 = 1
    assert os.path.exists(os.path.join(run, "grids", "0000030.png"))
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert (cfg["space"], cfg["text_dim"], cfg["image_dim"], cfg["max_length"]) == ("pixel", 32, 24, 24)


@pytest.mark.parametrize("use", ["L,I,T", "L", "I", "T", "L,T", "L,I", ""])
def test_every_subset_samples(tmp_path, run, data32, use):
    out = str(tmp_path / "fake")
    cond = ["--cond", os.path.join(data32, "meta.csv"), "--split", "train"] if use else []
    against = ["--guide-against", "L"] if use.startswith("L,") else []
    lm.main(["sample", "--ckpt", run, *cond, "--use", use, *against, "--n", "3", "--steps", "4", "--out", out])
    meta = rows(os.path.join(out, "meta.csv"))
    src = {r["id"]: r for r in rows(os.path.join(data32, "meta.csv"))}
    assert len(meta) == 3 and all(r["cond_use"] == use and r["guide_against"] == ("L" if against else "")
                                  for r in meta)
    for r in meta:
        x = png(os.path.join(out, r["id"] + ".png"))
        assert x.shape == (32, 32) and x.std() > 0
        if use:
            s = src[r["source_id"]]
            assert s["split"] == "train" and all(r[k] == s[k] for k in lm.LABELS + ["sex", "age", "race", "report"])


def test_ddim_75_step_sampling_is_deterministic_and_resumable(tmp_path, run, data32):
    cond = ["--cond", os.path.join(data32, "meta.csv"), "--split", "train", "--n", "2", "--use", "L,I,T"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    lm.main(["sample", "--ckpt", run, *cond, "--steps", "75", "--out", a])
    lm.main(["sample", "--ckpt", run, *cond, "--steps", "75", "--out", b, "--batch-size", "1"])
    img = lambda k, i: png(os.path.join(k, f"{i:06d}.png"))
    for i in range(2):                                           # batch composition: float rounding only
        assert np.abs(img(a, i) - img(b, i)).max() <= 256, np.abs(img(a, i) - img(b, i)).max()
    assert np.abs(img(a, 0) - img(a, 1)).mean() > 1000           # image i has its own noise
    os.remove(os.path.join(a, "000001.png"))
    assert lm.main(["sample", "--ckpt", run, *cond, "--steps", "75", "--out", a]) == 1
    assert np.array_equal(img(a, 1), img(b, 1))                  # resumed alone, as in b: the same image


def test_latent_space_training_and_decoding(tmp_path, data32):
    # a latent folder as vae.py encode writes it: 3 x 8 x 8 latents (4 x 4 mean pooling, 3 scaled copies; multicond
    # App. A.2's latents have 3 channels), per-channel mean/std, and a torch.export decoder
    from safetensors.numpy import save_file
    lat = tmp_path / "data"
    shutil.copytree(data32, lat)
    os.makedirs(lat / "latents" / "toy" / "shards")
    scales = np.array([1.0, 2.0, -1.0], np.float32)
    zs = []
    for name in sorted(n for n in os.listdir(os.path.join(data32, "shards")) if n.endswith(".safetensors")):
        with safe_open(os.path.join(data32, "shards", name), "numpy") as f:
            img = f.get_tensor("images").astype(np.float32) / 32768 - 1
        z = (img.reshape(len(img), 1, 8, 4, 8, 4).mean((3, 5)) * scales[None, :, None, None]).astype(np.float16)
        save_file({"latents": z}, str(lat / "latents" / "toy" / "shards" / name))
        zs.append(z.astype(np.float32))
    z = np.concatenate(zs)

    class Decoder(torch.nn.Module):
        def forward(self, z):
            x = (z / torch.tensor([1.0, 2.0, -1.0]).view(1, 3, 1, 1)).mean(1, keepdim=True)
            return torch.nn.functional.interpolate(x, scale_factor=4.0, mode="nearest")
    ep = torch.export.export(Decoder(), (torch.randn(2, 3, 8, 8),), dynamic_shapes={"z": {0: torch.export.Dim("b")}})
    torch.export.save(ep, str(lat / "latents" / "toy" / "decoder.pt2"))
    json.dump({"format_version": 1, "shape": [3, 8, 8], "mean": z.mean((0, 2, 3)).tolist(),
               "std": z.std((0, 2, 3)).tolist(), "decoder": "decoder.pt2"},
              open(lat / "latents" / "toy" / "info.json", "w"))
    data = lm.MultiCondData(lm.Config(data=str(lat), max_length=24))
    x = data.load(range(len(data)))                              # normalised per channel by the folder's statistics
    assert data.space == "latent" and x.shape[1:] == (3, 8, 8) and abs(x.mean().item()) < 0.1
    out = str(tmp_path / "run")
    train(str(lat), out, "--max-steps", "2", "--sample-every", "2")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["space"], cfg["in_channels"], cfg["image_size"], cfg["vae"]) == ("latent", 3, 8, "toy")
    assert np.asarray(Image.open(os.path.join(out, "grids", "0000002.png"))).shape[1] == 5 * 128
    fake = str(tmp_path / "fake")
    assert lm.main(["sample", "--ckpt", out, "--cond", str(lat / "meta.csv"), "--n", "1", "--steps", "2",
                    "--out", fake]) == 1
    assert png(os.path.join(fake, "000000.png")).shape == (32, 32)   # decoded to pixels
    with pytest.raises(SystemExit, match="image-size"):          # a latent shape that does not match
        train(str(lat), str(tmp_path / "bad"), "--image-size", "16", "--max-steps", "1")


def test_torchrun_two_processes_equal_one(tmp_path, data32):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--max-steps", "3", "--ckpt-every", "100"]
    train(data32, one, *args, "--micro-batch", "4")             # 1 process, 2 accumulated micro-batches
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as sock:                                # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           os.path.join(ROOT, "ldm_multicond.py"), "--data", data32, "--out", two, *SMALL,
           "--log-every", "1", "--sample-every", "0", *args]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w1, w2 = weights(one), weights(two)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(log(one), log(two))) < 1e-5
    assert torch.count_nonzero(w1["model.unet.out.2.weight"]) > 0


# ---------------------------------------------------------------------------------------------------------------
# Bad input, CLI


def test_bad_input_is_one_line_error(tmp_path, run, data32, encoders):
    def fails(argv, *words):
        with pytest.raises(SystemExit) as e:
            lm.main(argv)
        msg = str(e.value)
        assert "\n" not in msg and all(w in msg for w in words), msg
    lt = str(tmp_path / "lt")
    train(data32, lt, "--max-steps", "1", "--modalities", "L,T")
    cond = ["--cond", os.path.join(data32, "meta.csv"), "--n", "1", "--steps", "2", "--out", str(tmp_path / "x")]
    fails(["sample", "--ckpt", lt, *cond, "--use", "L,I"], "'I'", "trained without")
    fails(["sample", "--ckpt", run, *cond, "--use", "L", "--guide-against", "T"], "subset of --use")
    fails(["--data", data32, "--out", str(tmp_path / "o"), *SMALL, "--text-encoder", "/elsewhere/bert"],
          "text/bert", "/elsewhere/bert")
    fails(["--data", data32, "--out", str(tmp_path / "o"), *SMALL, "--image-encoder", "other/vit"], "images/vit")
    other = str(tmp_path / "other")                              # the same data cached by another encoder
    shutil.copytree(data32, other, ignore=shutil.ignore_patterns("images"))
    from transformers import ViTConfig, ViTModel
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=48)).save_pretrained(str(tmp_path / "vit2"))
    lm.main(["embed-images", "--data", other, "--image-encoder", str(tmp_path / "vit2"), "--name", "vit"])
    fails(["sample", "--ckpt", run, "--cond", os.path.join(other, "meta.csv"), "--n", "1", "--use", "I",
           "--out", str(tmp_path / "y")], "vit2", "embed with that encoder")
    lm.main(["embed-images", "--data", other, "--image-encoder", encoders[1], "--name", "vit-b"])
    assert lm.main(["sample", "--ckpt", run, "--cond", os.path.join(other, "meta.csv"), "--n", "1", "--use", "I",
                    "--steps", "2", "--out", str(tmp_path / "y")]) == 1   # of two caches, the checkpoint's encoder's
    noreport = str(tmp_path / "noreport")                        # a condition CSV without reports, T requested
    os.makedirs(noreport)
    with open(os.path.join(noreport, "meta.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id"] + lm.LABELS + ["sex", "age", "race"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows(os.path.join(data32, "meta.csv"))[:2])
    fails(["sample", "--ckpt", run, "--cond", os.path.join(noreport, "meta.csv"), "--use", "L,T", "--out",
           str(tmp_path / "z")], "no 'report' column", "T")
    fails(["sample", "--ckpt", run, "--cond", os.path.join(noreport, "meta.csv"), "--use", "L,X"], "'X'")
    fails(["embed-images", "--data", data32, "--image-encoder", str(tmp_path / "vit2"), "--name", "vit"],
          "images/vit/info.json", "another --name")
    fails(["--data", data32, "--out", str(tmp_path / "o"), "--size", "huge"], "--size 'huge'")
    fails(["--data", data32, "--out", run, *SMALL, "--channels", "8", "--max-steps", "31"], "channels=16")
    fails(["embed-text", "--data", data32, "--text-encoder", "./nowhere/bert", "--name", "t2"], "./nowhere/bert")


def test_dry_run_and_bench(capsys):
    n = lm.main(["--size", "paper", "--dry-run", "--data", "/nonexistent"])
    # the SD-1 / LDM text-to-image U-Net at 4 latent channels has 859.5M parameters; ours has 3 latent channels
    # (multicond App. A.2), a 768-wide context, and the unit (label MLP, image MLP from 1376, tau, positions)
    unit = (17 * 768 + 768 + 768 * 768 + 768) + (1376 * 768 + 768 + 768 * 768 + 768) + 130 * 768 + 2 * 768 + \
        3 * (4 * 768 + 3 * 768 * 768 + 768 * 768 + 768 + 768 * 2048 + 2048 + 2048 * 768 + 768)
    unet = 859_520_964 - 2 * (3 * 3 * 320 + 1) + (4 - 3) * 0
    assert abs(n - unit - unet) < 0.0025 * unet, (n, unit, unet)
    res = lm.main(["--bench", "--bench-steps", "1", *SMALL, "--image-size", "16", "--in-channels", "1",
                   "--device", "cpu"])
    assert set(res) == {"kernels", "sdpa"} and all(v > 0 for v in res.values())

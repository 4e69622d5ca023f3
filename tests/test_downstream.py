"""Tests of downstream.py: network layouts against torchvision's published state_dicts, AUROC / bootstrap / F1 /
Dice against scipy and hand references, masked BCE, data sources and mixing, a short classification run on the
phantom, fairness on a planted bias, segmentation, pretrain-finetune, resume and determinism, bad input."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from scipy import stats

import downstream as D

LABELS3 = "Cardiomegaly,Pleural Effusion,Pneumothorax"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 spinning OpenMP threads per process run the small
    convolutions here many times slower than one (measured: 0.12 s vs 2.3 s a step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------------
# Layouts: the published torchvision state_dicts, written out from the architectures' definitions
# (DenseNet-121: growth 32, blocks 6/12/24/16, 64 stem features, bottleneck 128; ResNet-50: bottlenecks 3/4/6/3,
# expansion 4, stride on the 3x3 conv, downsample.0 / downsample.1), plus the published parameter counts.


def bn(prefix, c):
    return [(f"{prefix}.{k}", (c,)) for k in ("weight", "bias", "running_mean", "running_var")] + \
        [(f"{prefix}.num_batches_tracked", ())]


def densenet121_keys():
    keys = [("features.conv0.weight", (64, 3, 7, 7))] + bn("features.norm0", 64)
    c = 64
    for b, n in enumerate([6, 12, 24, 16], 1):
        for i in range(1, n + 1):
            p = f"features.denseblock{b}.denselayer{i}"
            keys += bn(f"{p}.norm1", c) + [(f"{p}.conv1.weight", (128, c, 1, 1))]
            keys += bn(f"{p}.norm2", 128) + [(f"{p}.conv2.weight", (32, 128, 3, 3))]
            c += 32
        if b < 4:
            keys += bn(f"features.transition{b}.norm", c) + [(f"features.transition{b}.conv.weight", (c // 2, c, 1, 1))]
            c //= 2
    return keys + bn("features.norm5", 1024) + [("classifier.weight", (1000, 1024)), ("classifier.bias", (1000,))]


def resnet50_keys():
    keys = [("conv1.weight", (64, 3, 7, 7))] + bn("bn1", 64)
    cin = 64
    for layer, (n, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], 1):
        for i in range(n):
            p = f"layer{layer}.{i}"
            keys += [(f"{p}.conv1.weight", (width, cin, 1, 1))] + bn(f"{p}.bn1", width)
            keys += [(f"{p}.conv2.weight", (width, width, 3, 3))] + bn(f"{p}.bn2", width)
            keys += [(f"{p}.conv3.weight", (4 * width, width, 1, 1))] + bn(f"{p}.bn3", 4 * width)
            if i == 0:
                keys += [(f"{p}.downsample.0.weight", (4 * width, cin, 1, 1))] + bn(f"{p}.downsample.1", 4 * width)
            cin = 4 * width
    return keys + [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]


@pytest.mark.parametrize("cls,expected,n_params", [(D.DenseNet121, densenet121_keys, 7_978_856),
                                                   (D.ResNet50, resnet50_keys, 25_557_032)])
def test_layouts_match_torchvision(cls, expected, n_params):
    """Names, order and shapes of every state_dict entry; parameter counts as torchvision documents them."""
    net = cls(1000, in_ch=3)                                    # (the meta device is slower here: 5 s vs 0.6 s)
    got = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert got == expected()
    assert sum(p.numel() for p in net.parameters()) == n_params
    small = cls(14)                                              # 1 channel, 14 labels: only the stem and head differ
    shapes = [(k, tuple(v.shape)) for k, v in small.state_dict().items()]
    diff = {k for (k, s), (_, s2) in zip(expected(), shapes) if s != s2}
    assert diff == ({"features.conv0.weight", "classifier.weight", "classifier.bias"} if cls is D.DenseNet121
                    else {"conv1.weight", "fc.weight", "fc.bias"})


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_imagenet_init_loads_legacy_checkpoint(tmp_path, fmt):
    """A torchvision-format DenseNet-121 checkpoint (old 'norm.1' key spelling, RGB stem, 1000 classes) loads:
    the stem becomes the sum over RGB, every other tensor is copied, the head is new."""
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) if s else torch.tensor(7)) for k, s in densenet121_keys()}
    legacy = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in sd.items()
              if not k.endswith("num_batches_tracked")}             # as in densenet121-a639ec97.pth
    path = str(tmp_path / f"densenet121.{fmt}")
    torch.save(legacy, path) if fmt == "pth" else save_file({k: v.contiguous() for k, v in legacy.items()}, path)
    net = D.DenseNet121(3)
    D.load_init(net, f"imagenet:{path}")
    own = net.state_dict()
    torch.testing.assert_close(own["features.conv0.weight"], sd["features.conv0.weight"].sum(1, keepdim=True))
    for k in ("features.denseblock3.denselayer7.norm1.running_var", "features.denseblock4.denselayer16.conv2.weight",
              "features.transition2.conv.weight", "features.norm5.bias"):
        torch.testing.assert_close(own[k], sd[k])
    assert own["classifier.weight"].shape == (3, 1024)
    with pytest.raises(SystemExit, match="not a torchvision ResNet50"):
        D.load_imagenet(D.ResNet50(3), path)


# ---------------------------------------------------------------------------------------------------------------
# Metrics against independent references


def ref_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return stats.mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))


def test_auroc_and_bootstrap_ci_match_scipy():
    rng = np.random.default_rng(3)
    n = 300
    y = (rng.random((n, 3)) < [0.3, 0.1, 0.5]).astype(float)
    s = np.round(y * 0.8 + rng.normal(size=(n, 3)), 1)          # rounding makes ties
    y[rng.random((n, 3)) < 0.1] = np.nan                        # missing labels
    for j in range(3):
        k = ~np.isnan(y[:, j])
        assert D.auroc(y[k, j], s[k, j]) == pytest.approx(ref_auroc(y[k, j], s[k, j]), abs=1e-12)
    table = D.auroc_table(y, s, n_boot=200, seed=5)
    idx = np.random.default_rng(5).integers(0, n, (200, n))     # the documented resampling
    boots = np.array([[ref_auroc(y[i, j][~np.isnan(y[i, j])], s[i, j][~np.isnan(y[i, j])]) for j in range(3)]
                      for i in idx])
    for j in range(3):
        assert table["auroc_ci"][j] == pytest.approx(list(np.percentile(boots[:, j], [2.5, 97.5])), abs=1e-12)
    assert table["macro"] == pytest.approx(np.mean(table["auroc"]), abs=1e-12)
    assert table["macro_ci"] == pytest.approx(list(np.percentile(boots.mean(1), [2.5, 97.5])), abs=1e-12)
    assert np.isnan(D.auroc(np.array([1, 1.0]), np.array([0.2, 0.3])))   # one class only: undefined


def test_thresholds_f1_dice_against_brute_force():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 2)) < 0.3).astype(float)
    s = y * 0.5 + rng.random((200, 2))
    t = D.best_thresholds(y, s)
    for j in range(2):
        f1 = lambda th: 2 * ((s[:, j] >= th) & (y[:, j] == 1)).sum() / ((s[:, j] >= th).sum() + y[:, j].sum())
        assert f1(t[j]) == pytest.approx(max(f1(th) for th in s[:, j]), abs=1e-12)
    m = D.threshold_metrics(y, s, t)
    pred = s >= t
    assert m["accuracy"][0] == pytest.approx(((pred[:, 0]) == (y[:, 0] == 1)).mean())
    sup = y.sum(0)
    assert m["weighted_f1"] == pytest.approx((np.array(m["f1"]) * sup).sum() / sup.sum())
    g = np.zeros((3, 4, 4), bool)
    p = np.zeros((3, 4, 4), bool)
    g[0, :2, :2], p[0, :2, :3] = True, True                      # 2 * 4 / (4 + 6) = 0.8
    p[1, 0, 0] = True                                            # empty truth, false alarm: 0
    r = D.dice_summary(p, g)                                     # image 2: both empty: 1
    assert (r["dice"], r["positive_dice"], r["negative_dice"]) == pytest.approx((0.6, 0.8, 0.5))


def test_masked_bce_ignores_missing_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, requires_grad=True)
    target = torch.tensor([[1, 0, float("nan"), 1]] * 3 + [[float("nan"), 1, 0, 0]] * 3)
    loss = D.masked_bce(logits, target)
    loss.backward()
    z, t = logits.detach().double(), target.double()
    known = ~torch.isnan(t)
    ref = -(t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z)))[known].mean()
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-6)
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()
    assert D.var_value("Edema", "-1", "ones", "x") == 1.0 and D.var_value("Edema", "-1.0", "zeros", "x") == 0.0
    assert np.isnan(D.var_value("Edema", "-1", "ignore", "x")) and np.isnan(D.var_value("Edema", "", "ones", "x"))


# ---------------------------------------------------------------------------------------------------------------
# Data sources: sampler folders (PNG + meta.csv), mixing, synthetic ratio, balancing


def export_png_folder(data_dir, out, split=None, bits=16, n=None):
    """A dataset folder -> the samplers' layout: <out>/<id>.png + meta.csv (labels, demographics)."""
    with open(os.path.join(data_dir, "meta.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if split is None or r["split"] == split][:n]
    os.makedirs(out, exist_ok=True)
    by_shard = {}
    for r in rows:
        by_shard.setdefault(int(r["shard"]), []).append(r)
    for shard, rs in by_shard.items():
        with safe_open(os.path.join(data_dir, "shards", f"{shard:05d}.safetensors"), "numpy") as f:
            imgs = f.get_tensor("images")
        for r in rs:
            a = imgs[int(r["index"]), 0]
            Image.fromarray(a if bits == 16 else (a >> 8).astype(np.uint8)).save(os.path.join(out, f"{r['id']}.png"))
    cols = ["id", "sex", "age", "race", "view"] + D.LABELS
    with open(os.path.join(out, "meta.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return rows


def test_png_folder_source_equals_dataset_pixels(phantom_dir, tmp_path):
    cfg = D.parse_config([])
    export_png_folder(phantom_dir, str(tmp_path / "syn16"), "test", 16)
    export_png_folder(phantom_dir, str(tmp_path / "syn8"), "test", 8)
    real = D.Source(f"real={phantom_dir}:test", cfg)
    s16, s8 = D.Source(f"syn={tmp_path / 'syn16'}", cfg), D.Source(f"syn={tmp_path / 'syn8'}", cfg)
    assert s16.synthetic and not real.synthetic and s16.kind == "png" and real.kind == "dataset"
    for s in (real, s16, s8):
        s.preload(32)
    idx = np.arange(len(real))
    torch.testing.assert_close(s16.images(idx), real.images(idx), rtol=0, atol=0)
    assert (s8.images(idx) - real.images(idx)).abs().max() < 1 / 255
    np.testing.assert_array_equal(s16.targets(D.LABELS, "ignore"), real.targets(D.LABELS, "ignore"))
    real.load_masks("Pleural Effusion")                          # segmentation pairs: <id>_mask.png beside <id>.png
    k = json.load(open(os.path.join(phantom_dir, "info.json")))["mask_names"].index("Pleural Effusion")
    for r, m in zip(real.rows, real.masks):
        Image.fromarray(m[0].numpy() * 255).save(tmp_path / "syn16" / f"{r['id']}_mask.png")
    s16.load_masks("Pleural Effusion")
    assert torch.equal(s16.masks, real.masks) and real.masks.sum() > 0
    with safe_open(os.path.join(phantom_dir, "shards", "00000.safetensors"), "numpy") as f:
        raw = f.get_tensor("masks")[:, k]
    first = [(int(r["index"]), i) for i, r in enumerate(real.rows) if r["shard"] == "0"][:5]
    assert all((raw[j] == real.masks[i, 0].numpy()).all() for j, i in first)


def test_mix_shares_and_syn_ratio(phantom_dir, tmp_path):
    export_png_folder(phantom_dir, str(tmp_path / "syn"), "train")
    cfg = D.parse_config(["--train", f"real={phantom_dir}:val,syn={tmp_path / 'syn'}", "--mix", "1:3",
                          "--batch-size", "16"])
    (row, srcs), = D.experiments(cfg)
    assert row == "real+syn" and len(srcs[1]) > 4 * len(srcs[0])
    pool = D.Pool(srcs, cfg, ["Cardiomegaly"], 32)
    stream = D.TrainStream(pool, cfg, 0)
    for step in range(3):
        rows = stream.rows(step).numpy()
        assert (rows < len(srcs[0])).sum() == 4 and len(rows) == 16
    seen = np.concatenate([stream.rows(s).numpy() for s in range(int(np.ceil(len(srcs[0]) / 4)))])
    assert set(seen[seen < len(srcs[0])]) == set(range(len(srcs[0])))   # the real source's epoch covers every row
    cfg = D.parse_config(["--train", f"real={phantom_dir}:val,syn={tmp_path / 'syn'}", "--syn-ratio", "2"])
    (row, srcs), = D.experiments(cfg)
    assert len(srcs[1]) == 2 * len(srcs[0])


def test_balance_tops_up_minority_groups(phantom_dir, tmp_path):
    syn = tmp_path / "minority"
    export_png_folder(phantom_dir, str(syn), "train")            # rows only: images are not read by balancing
    cfg = D.parse_config(["fairness", "--balance", str(syn), "--balance-by", "race"])
    real = [D.Source(f"real={phantom_dir}:val", cfg)]
    srcs, info = D.balance_sources(cfg, real)
    count = {}
    for r in real[0].rows:
        if r["race"]:
            count[r["race"]] = count.get(r["race"], 0) + 1
    avail = {}
    for r in srcs[-1].rows:
        avail[r["race"]] = avail.get(r["race"], 0) + 1
    target, pool = max(count.values()), D.Source(f"s={syn}", cfg).rows
    assert info["target"] == target
    for race, n in count.items():
        assert avail.get(race, 0) == info["added"][race] == min(target - n, sum(r["race"] == race for r in pool))
    assert sum(avail.values()) > 0


# ---------------------------------------------------------------------------------------------------------------
# End to end on the phantom: one shared classification run


@pytest.fixture(scope="module")
def big_phantom(tmp_path_factory):
    """The training phantom of the classifier and metadata-predictor tests. 1200 images (our choice; 2400 before):
    rendering them was a third of the classify set-up's time; the 300-step runs of 32 now see each frontal image
    ~10 times instead of ~5. Measured with 1200: test AUROCs 0.995 / 1.000 / 0.911 (2400: 0.996 / 1.000 / 0.870)."""
    import prep_data
    out = str(tmp_path_factory.mktemp("ds") / "ph")
    prep_data.make_phantom(out, n=1200, size=32, seed=7, masks=False)
    return out


@pytest.fixture(scope="module")
def classify_run(big_phantom, phantom_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("classify"))
    argv = ["--train", f"real={big_phantom}:all", "--val", f"{phantom_dir}:val", "--test", f"ph={phantom_dir}:all",
            "--labels", LABELS3, "--views", "PA,AP", "--out", out, "--batch-size", "32", "--max-steps", "300",
            "--eval-every", "100",
            "--weighted-sampling", "--n-boot", "200", "--roc-plot", os.path.join(out, "roc.png")]
    return out, D.main(argv)


def test_classify_reaches_auroc_on_phantom(classify_run, capsys):
    out, results = classify_run
    res = json.load(open(os.path.join(out, "results.json")))
    auc = res["results"]["real"]["runs"][0]["ph"]["auroc"]
    assert min(auc) > 0.8, auc
    ci = res["results"]["real"]["runs"][0]["ph"]["macro_ci"]
    assert ci[0] < res["results"]["real"]["runs"][0]["ph"]["macro"] < ci[1]
    md = open(os.path.join(out, "results.md")).read()
    assert "| Training data | Crm | Ple | Ptx | Avg | F1 | Acc |" in md and "| real |" in md
    with Image.open(os.path.join(out, "roc.png")) as im:
        assert im.size[0] > 500 and len(im.convert("RGB").getcolors(1 << 20)) > 3


def test_fairness_reports_planted_gap(classify_run, phantom_dir, tmp_path):
    """Labels shuffled among the women of the test cohort: their AUROC falls to chance, the men's does not."""
    out, _ = classify_run
    biased = tmp_path / "biased"
    os.makedirs(biased)
    for f in ("info.json", "shards"):
        os.symlink(os.path.join(phantom_dir, f), biased / f)
    with open(os.path.join(phantom_dir, "meta.csv"), newline="") as f:
        reader = csv.DictReader(f)
        cols, rows = reader.fieldnames, list(reader)
    women = [i for i, r in enumerate(rows) if r["sex"] == "F"]
    perm = np.random.default_rng(0).permutation(women)
    labels = LABELS3.split(",")
    shuffled = {i: {k: rows[j][k] for k in labels} for i, j in zip(women, perm)}
    for i, v in shuffled.items():
        rows[i].update(v)
    with open(biased / "meta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    export_png_folder(str(biased), str(tmp_path / "syncohort"))  # the 'synthetic' cohort: same images as PNGs
    fout = str(tmp_path / "fair")
    res = D.main(["fairness", "--eval", "--ckpt", os.path.join(out, "real", "run0"), "--test", f"{biased}:all",
                  "--syn-test", str(tmp_path / "syncohort"), "--val", f"{phantom_dir}:val", "--labels", LABELS3,
                  "--fair-metric", "auroc", "--out", fout])
    real = res["original"]["real"]
    assert real["summary"]["sex"]["worst"] == "F" and real["summary"]["sex"]["best"] == "M"
    # the reported gap, recomputed with scipy from the written predictions
    with open(os.path.join(fout, "predictions", "original_real.csv"), newline="") as f:
        pred = list(csv.DictReader(f))
    macro = {}
    for sex in ("F", "M"):
        sel = [p for p in pred if p["sex"] == sex]
        aucs = []
        for lab in labels:
            yy = np.array([float(p[lab]) for p in sel if p[lab] in ("0", "1")])
            ss = np.array([float(p[f"score:{lab}"]) for p in sel if p[lab] in ("0", "1")])
            aucs.append(ref_auroc(yy, ss))
        macro[sex] = np.mean(aucs)
    assert real["summary"]["sex"]["gap"] == pytest.approx(macro["M"] - macro["F"], abs=1e-9)
    assert macro["M"] - macro["F"] > 0.25 and abs(macro["F"] - 0.5) < 0.15
    r = res["original"]["pearson"]
    assert r["sex x race"]["r"] == pytest.approx(1.0, abs=1e-6) and r["age"]["n"] == 3


def test_predict_metadata_learns_sex_and_view(big_phantom, phantom_dir, tmp_path):
    """radit App. C.4's multi-task predictor on the phantom: sex and view from the image alone, ROC-AUC > 0.9 after
    a short run; the reported ROC-AUCs and age MAE equal scipy's on the saved model's own outputs."""
    out, labels = str(tmp_path / "pm"), ["sex", "view"]
    res = D.main(["predict-metadata", "--train", f"real={big_phantom}:all", "--val", f"{phantom_dir}:val", "--test",
                  f"ph={phantom_dir}:all", "--labels", ",".join(labels), "--batch-size", "32", "--max-steps", "300",
                  "--eval-every", "100", "--out", out])
    r = res["real"]["runs"][0]["ph"]
    assert r["sex"] > 0.9 and r["view"] > 0.9, r
    model, saved, _ = D.load_classifier(os.path.join(out, "real", "run0"), "predictor")
    assert saved.rotate == 0 and saved.intensity == 0 and saved.warmup == 100     # radit App. C.4, Table 15
    cfg = D.parse_config(["predict-metadata", "--labels", ",".join(labels)])
    pool = D.Pool([D.Source(f"ph={phantom_dir}:all", cfg)], cfg, labels, 32)
    p, y = D.predict(model, pool, cfg, torch.device("cpu")), pool.y       # columns: F, M | PA, AP, LATERAL
    assert np.allclose(p[:, :2].sum(1), 1) and np.allclose(p[:, 2:5].sum(1), 1)
    k = ~np.isnan(y[:, 0])
    assert r["sex"] == pytest.approx(ref_auroc(y[k, 0], p[k, 1]), abs=1e-9)
    k = ~np.isnan(y[:, 1])
    present = [c for c in range(3) if (y[k, 1] == c).any()]
    ovr = [ref_auroc((y[k, 1] == c).astype(float), p[k, 2 + c]) for c in present]   # one-vs-rest, macro
    assert r["view"] == pytest.approx(np.mean(ovr), abs=1e-9)


def test_eval_mode_reproduces_training_evaluation(classify_run, phantom_dir, tmp_path):
    out, results = classify_run
    res = D.main(["--eval", "--ckpt", os.path.join(out, "real", "run0"), "--test", f"ph={phantom_dir}:all",
                  "--views", "PA,AP", "--val", f"{phantom_dir}:val", "--n-boot", "200", "--out", str(tmp_path)])
    a, b = res["run0"]["runs"][0]["ph"], results["real"]["runs"][0]["ph"]
    assert a["auroc"] == pytest.approx(b["auroc"], abs=1e-9) and a["macro_ci"] == pytest.approx(b["macro_ci"], abs=1e-9)
    assert a["f1"] == pytest.approx(b["f1"], abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Training skeleton: resume, determinism; pretrain-finetune; segmentation


def ckpt_tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}


def test_resume_and_determinism(phantom_dir, tmp_path):
    base = ["--train", f"real={phantom_dir}:train", "--labels", LABELS3, "--batch-size", "16", "--schedule", "constant",
            "--eval-every", "10", "--patience", "0", "--n-boot", "0", "--width", "8"]
    D.main(base + ["--max-steps", "20", "--out", str(tmp_path / "a")])
    D.main(base + ["--max-steps", "10", "--out", str(tmp_path / "b")])
    D.main(base + ["--max-steps", "20", "--out", str(tmp_path / "b")])          # resumes at step 10
    D.main(base + ["--max-steps", "20", "--out", str(tmp_path / "c"), "--seed", "1"])
    a, b, c = (ckpt_tensors(str(tmp_path / r / "real" / "run0" / "ckpt.safetensors")) for r in "abc")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    log = [json.loads(line) for line in open(tmp_path / "b" / "real" / "run0" / "log.jsonl")]
    assert [r["step"] for r in log] == [10, 20]


def test_pretrain_finetune_curve(phantom_dir, tmp_path):
    export_png_folder(phantom_dir, str(tmp_path / "syn"), "train")
    out = str(tmp_path / "pf")
    res = D.main(["pretrain-finetune", "--train", f"syn={tmp_path / 'syn'}", "--finetune", f"real={phantom_dir}:train",
                  "--val", f"{phantom_dir}:val", "--fractions", "0.25,1", "--labels", LABELS3, "--batch-size", "16",
                  "--max-steps", "6", "--eval-every", "3", "--n-boot", "0", "--width", "8", "--out", out])
    test = os.path.basename(phantom_dir)
    assert set(res["pretrained"][test]) == set(res["baseline"][test]) == {"0.25", "1"}
    for f in ("0.25", "1"):
        init = json.load(open(os.path.join(out, f"pretrained-{f}", "run0", "config.json")))["init"]
        assert init == os.path.join(out, "pretrain", "run0")
        assert json.load(open(os.path.join(out, f"baseline-{f}", "run0", "config.json")))["init"] == ""
    assert "| pretrained on syn |" in open(os.path.join(out, "results.md")).read()


def test_segment_effusion_dice(phantom_dir, tmp_path):
    out = str(tmp_path / "seg")
    res = D.main(["segment", "--train", f"real={phantom_dir}:train", "--mask", "Pleural Effusion", "--width", "8",
                  "--batch-size", "16", "--max-steps", "120", "--eval-every", "40", "--lr", "5e-3", "--out", out])
    s = res["real"]["runs"][0][os.path.basename(phantom_dir)]
    assert s["positive_dice"] > 0.5 and s["negative_dice"] > 0.5 and s["n_positive"] > 5, s


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line naming the value and what was expected


def test_bad_input(phantom_dir, tmp_path):
    os.makedirs(tmp_path / "nometa")
    cases = [
        (["--train", f"syn={tmp_path / 'nometa'}"], "meta.csv: no such file"),
        (["--train", f"real={phantom_dir}:train", "--test", f"{tmp_path / 'nolabels'}"], "no column"),
        (["pretrain-finetune", "--train", f"real={phantom_dir}:train", "--finetune", f"{phantom_dir}:train",
          "--fractions", "0.5,1.5"], "1.5 is outside (0, 1]"),
        (["--train", f"real={phantom_dir}:train,syn={phantom_dir}:val", "--mix", "1:1:1"], "--mix '1:1:1': expected 2"),
        (["--train", f"real={phantom_dir}:train", "--labels", "Cardiomegaly,Flu"], "'Flu' is not a CheXpert label"),
        (["--uncertain", "maybe"], "--uncertain 'maybe'"),
        (["--eval", "--ckpt", str(tmp_path), "--test", f"{phantom_dir}:test", "--val", f"{phantom_dir}:val"],
         "no such checkpoint"),
        (["--eval", "--ckpt", str(tmp_path)], "expected --test"),
        (["--train", f"real={phantom_dir}:train,syn={phantom_dir}:val", "--mix", "1:x"], "--mix '1:x'"),
    ]
    os.makedirs(tmp_path / "nolabels")
    with open(tmp_path / "nolabels" / "meta.csv", "w") as f:
        f.write("id,sex,age\na,F,40\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "nolabels" / "a.png")
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            D.main(argv + ["--out", str(tmp_path / "o")])
        assert msg in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))


def test_fairness_balance_trains_both_arms(phantom_dir, tmp_path):
    """Bias mitigation end to end: the original and the balanced model, both on the same real cohort."""
    syn = str(tmp_path / "minority")
    export_png_folder(phantom_dir, syn, "train")
    out = str(tmp_path / "fb")
    res = D.main(["fairness", "--train", f"real={phantom_dir}:val", "--val", f"{phantom_dir}:test", "--test",
                  f"{phantom_dir}:test", "--balance", syn, "--balance-by", "race", "--labels", LABELS3, "--width", "8",
                  "--batch-size", "16", "--max-steps", "10", "--eval-every", "5", "--out", out])
    info = json.load(open(os.path.join(out, "results.json")))["balance"]
    assert set(res) == {"original", "balanced"} and sum(info["added"].values()) > 0
    for race, n in info["real"].items():                         # parity, or the folder ran out of that group
        assert n + info["added"][race] == info["target"] or info["added"][race] == sum(
            r["race"] == race for r in csv.DictReader(open(os.path.join(syn, "meta.csv"))))
    for arm in res.values():
        assert arm["real"]["summary"]["race"]["gap"] is not None and set(arm["real"]["groups"]["sex"]) == {"F", "M"}


def test_dry_run_and_bench():
    """--dry-run counts DenseNet-121's parameters for 14 labels and one channel (torchvision's 7,978,856 minus the
    1000-class head and two of three stem input channels); --bench times training steps."""
    expected = 7_978_856 - (1024 * 1000 + 1000) + (1024 * 14 + 14) - 2 * 64 * 49
    assert D.main(["--dry-run", "--size", "densenet121"]) == expected
    assert D.main(["--bench", "--img-size", "32", "--batch-size", "4", "--width", "8"]) > 0

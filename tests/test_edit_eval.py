"""Tests of downstream.py's metadata predictor pieces and of `edit-eval` (radit App. C.1 Eq. 13-15, App. C.4
Tables 14, 16): the multi-task loss and metrics against float64 / scipy references, the attribute-specialised
cosine, and edit-eval end to end on true phantom counterfactuals (prep_data.py counterfactual_pairs), with a tiny
transformers ViT written to disk as the LPIPS feature space and as a frozen predictor encoder."""
import csv
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from scipy import stats

import downstream as D
import metrics
import prep_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                   # no network: random or local weights only


# ---------------------------------------------------------------------------------------------------------------
# Units against independent references


def test_metadata_loss_matches_float64_reference():
    """Cross-entropy per categorical variable, MSE of (age - 60) / 20, missing targets skipped (radit App. C.4)."""
    g = torch.Generator().manual_seed(0)
    sizes = [2, 3, 1]                                            # a label, race, age
    out = torch.randn(7, sum(sizes), generator=g, requires_grad=True)
    nan = float("nan")
    y = torch.tensor([[1, 0, 50], [0, 2, nan], [nan, 1, 80], [1, nan, 30], [0, 0, 61], [nan, nan, nan], [1, 2, 45.]])
    loss = D.metadata_loss(out, y, sizes)
    loss.backward()
    z, t = out.detach().double(), y.double()
    terms = []
    for j, (lo, k) in enumerate([(0, 2), (2, 3), (5, 1)]):
        known = ~torch.isnan(t[:, j])
        if k == 1:
            terms.append(((z[known, lo] - (t[known, j] - 60) / 20) ** 2).mean())
        else:
            logp = torch.log_softmax(z[known, lo:lo + k], 1)
            terms.append(-logp[torch.arange(int(known.sum())), t[known, j].long()].mean())
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-6)
    assert (out.grad[5] == 0).all() and (out.grad[1, 5] == 0) and (out.grad[3, 2:5] == 0).all()
    assert (out.grad[0] != 0).all()


def test_metadata_metrics_one_vs_rest_and_mae():
    rng = np.random.default_rng(0)
    n = 200
    y = np.stack([rng.integers(0, 2, n), rng.integers(0, 3, n), rng.uniform(20, 90, n)], 1).astype(float)
    y[rng.random(n) < 0.1, 1] = np.nan
    p = np.concatenate([rng.dirichlet([1, 1], n), rng.dirichlet([1, 1, 1], n), rng.uniform(20, 90, (n, 1))], 1)
    p[:, 2 + 2] += 0.3 * (y[:, 1] == 2)                          # class 2 of the 3-way variable is detectable
    res, pred = D.metadata_metrics(y, p, ["sex", "race", "age"], [2, 3, 1])
    mw = lambda yy, s: stats.mannwhitneyu(s[yy], s[~yy]).statistic / (yy.sum() * (~yy).sum())
    assert res["sex"] == pytest.approx(mw(y[:, 0] == 1, p[:, 1]), abs=1e-12)
    k = ~np.isnan(y[:, 1])
    assert res["race"] == pytest.approx(np.mean([mw(y[k, 1] == c, p[k, 2 + c]) for c in range(3)]), abs=1e-12)
    assert res["age"] == pytest.approx(np.abs(p[:, 5] - y[:, 2]).mean(), abs=1e-12)
    np.testing.assert_array_equal(pred[:, 1], p[:, 2:5].argmax(1))


def test_attribute_cosine_eq15():
    """1 for identical embeddings; otherwise the mean over the unchanged attributes of the cosine (float64 ref)."""
    rng = np.random.default_rng(1)
    variables = ["sex", "race", "view", "age", "Edema"]          # a finding's head is not an attribute (Eq. 15)
    a, b = rng.normal(size=(5, 5, 8)), rng.normal(size=(5, 5, 8))
    edits = [["sex"], ["view"], ["Edema"], [], ["sex", "race", "view", "age"]]
    np.testing.assert_allclose(D.attribute_cosine(a, a, variables, edits)[:4], 1.0, atol=1e-12)
    got = D.attribute_cosine(a, b, variables, edits)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    keep = [[1, 2, 3], [0, 1, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    np.testing.assert_allclose(got[:4], [cos[i, k].mean() for i, k in enumerate(keep)], atol=1e-12)
    assert np.isnan(got[4])                                      # nothing left unchanged


def test_variable_values_and_errors():
    assert D.var_value("sex", "M", "ignore", "x") == 1.0 and D.var_value("view", "lateral", "ignore", "x") == 2.0
    assert D.var_value("dataset", "phantom-b", "ignore", "x", ["phantom-a", "phantom-b"]) == 1.0
    assert D.var_value("age", "57", "ignore", "x") == 57.0 and np.isnan(D.var_value("race", "", "ignore", "x"))
    for var, v, msg in (("sex", "X", "expected one of ['F', 'M']"), ("age", "old", "expected years"),
                        ("Edema", "2", "expected 1, 0, -1")):
        with pytest.raises(SystemExit, match=re.escape(msg)):
            D.var_value(var, v, "ignore", "row 3")


# ---------------------------------------------------------------------------------------------------------------
# edit-eval end to end


def tiny_vit(folder):
    """A 4-layer ViT (DINOv2 layout, random weights) and its image processor, saved as a local transformers model."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, image_size=32)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[.5] * 3,
                      image_std=[.25] * 3).save_pretrained(folder)
    return folder


def write_edits(phantom, out, noise=0.03):
    """E/ as rectified_flow.py edit writes it, from the TRUE counterfactuals T/ (prep_data.py counterfactual):
    sex edits E = T exactly, view and finding edits E = T + Gaussian noise, 16-bit PNGs; ids = source ids."""
    rows = [r for r in csv.DictReader(open(os.path.join(phantom, "meta.csv"))) if r["split"] != "train"]
    front = [r for r in rows if r["view"] in ("PA", "AP")]
    edits = [{"id": r["id"], "source_id": r["id"], "intervention": f"sex={'M' if r['sex'] == 'F' else 'F'}"}
             for r in rows[:8]]
    edits += [{"id": r["id"], "source_id": r["id"], "intervention": f"view={'AP' if r['view'] == 'PA' else 'PA'}"}
              for r in front[8:16]]
    edits += [{"id": r["id"], "source_id": r["id"],
               "intervention": f"Pleural Effusion={'0' if r['Pleural Effusion'] == '1' else '1'}"}
              for r in front[16:24]]
    truth = os.path.join(out, "T")
    prep_data.counterfactual_pairs(phantom, edits, truth, masks=False, what="--interventions")
    cf = list(csv.DictReader(open(os.path.join(truth, "meta.csv"))))
    E, rng = os.path.join(out, "E"), np.random.default_rng(0)
    os.makedirs(E)
    for r in cf:
        with safe_open(os.path.join(truth, "shards", f"{int(r['shard']):05d}.safetensors"), "numpy") as f:
            a = f.get_tensor("images")[int(r["index"]), 0].astype(np.float64)
        if not r["intervention"].startswith("sex"):
            a = np.clip(a + rng.normal(0, noise * 65535, a.shape), 0, 65535)
        Image.fromarray(a.round().astype(np.uint16)).save(os.path.join(E, f"{r['id']}.png"))
    with open(os.path.join(E, "meta.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(cf[0]))
        w.writeheader()
        w.writerows(cf)
    return E, truth, cf


def original_pixels(phantom, ids):
    """The originals read straight from the shards, float64 in [0, 1], in the order of ids."""
    by_id = {r["id"]: r for r in csv.DictReader(open(os.path.join(phantom, "meta.csv")))}
    out = []
    for i in ids:
        with safe_open(os.path.join(phantom, "shards", f"{int(by_id[i]['shard']):05d}.safetensors"), "numpy") as f:
            out.append(f.get_tensor("images")[int(by_id[i]["index"])].astype(np.float64) / 65535)
    return torch.from_numpy(np.stack(out))


@pytest.fixture(scope="module")
def setup(phantom_dir, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("edits"))
    E, T, cf = write_edits(phantom_dir, root)
    pred = os.path.join(root, "pred")
    D.main(["predict-metadata", "--train", f"real={phantom_dir}:train", "--width", "8", "--batch-size", "32",
            "--max-steps", "30", "--eval-every", "15", "--out", pred])
    return {"E": E, "T": T, "cf": cf, "pred": os.path.join(pred, "real", "run0"),
            "vit": tiny_vit(os.path.join(root, "vit"))}


def test_edit_eval_end_to_end_with_truth(setup, phantom_dir, tmp_path):
    out = str(tmp_path / "ee")
    D.main(["edit-eval", "--original", phantom_dir, "--edited", setup["E"], "--truth", setup["T"], "--predictor",
          setup["pred"], "--lpips", setup["vit"], "--n-pairs", "64", "--out", out])
    md = open(os.path.join(out, "results.md")).read()
    assert "Identity preservation (radit Table 14" in md and "Edit effectiveness" in md
    assert "|  | n | SSIM | cosine | LPIPS vit | rLPIPS vit |" in md
    assert "|  | Sex | Race | View | Dataset | Age MAE | Atl |" in md and "| hit | n |" in md
    saved = json.load(open(os.path.join(out, "results.json")))["results"]
    ident, eff = saved["identity"], saved["effectiveness"]
    assert ident["random pairs"]["rLPIPS vit"] == 1.0 and ident["random pairs"]["n"] == 64
    # sex edits are the true counterfactuals themselves: identity is exact, the predictor sees the same images
    same = ident["truth vs edited: sex"]
    assert same["SSIM"] == pytest.approx(1, abs=1e-6) and same["cosine"] == pytest.approx(1, abs=1e-6)
    assert same["LPIPS vit"] == pytest.approx(0, abs=1e-9) and same["n"] == 8
    assert eff["edited images, truth labels: sex"] == eff["truth images, truth labels: sex"]
    noisy = ident["truth vs edited: view"]
    assert ident["random pairs"]["SSIM"] < noisy["SSIM"] < 1 and noisy["LPIPS vit"] > 0
    assert noisy["rLPIPS vit"] == pytest.approx(noisy["LPIPS vit"] / ident["random pairs"]["LPIPS vit"], rel=1e-6)
    # pairing by id: SSIM of the view edits recomputed from files read here
    cf = [r for r in setup["cf"] if r["intervention"].startswith("view")]
    x = original_pixels(phantom_dir, [r["id"] for r in cf])
    e = torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(setup["E"], f"{r['id']}.png")), np.float64)
                                      / 65535)[None] for r in cf])
    assert ident["original vs edited: view"]["SSIM"] == pytest.approx(float(metrics.ssim(x, e).mean()), abs=1e-5)
    # the LPIPS column is metrics.FeatureLPIPS on the same pairs
    lp = metrics.FeatureLPIPS(setup["vit"])
    assert ident["original vs edited: view"]["LPIPS vit"] == pytest.approx(float(lp.distance(x, e).mean()), rel=1e-4)
    for k in ("sex", "view", "finding"):
        assert eff[f"edited images, edited labels: {k}"]["n"] == 8
        assert 0 <= eff[f"truth images, truth labels: {k}"]["hit"] <= 1
    assert set(eff["observed"]) >= {"sex", "race", "view", "dataset", "age", "Pleural Effusion"}


def test_edit_eval_without_truth_and_bad_input(setup, phantom_dir, tmp_path):
    res = D.main(["edit-eval", "--original", f"{phantom_dir}:all", "--edited", setup["E"], "--predictor", setup["pred"],
                  "--lpips", "", "--n-pairs", "32", "--out", str(tmp_path / "o")])
    assert set(res["identity"]) == {"random pairs", "original vs edited: sex", "original vs edited: view",
                                    "original vs edited: finding"}
    assert set(res["effectiveness"]) == {"observed"} | {f"edited images, edited labels: {k}" for k in ("sex", "view",
                                                                                                     "finding")}
    bad_e = tmp_path / "bad"
    os.makedirs(bad_e)
    rows = setup["cf"][:3]
    for r in rows:
        os.symlink(os.path.join(setup["E"], f"{r['id']}.png"), bad_e / f"{r['id']}.png")
    with open(bad_e / "meta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**rows[0], "intervention": "mood=happy"}] + rows[1:])
    classifier = tmp_path / "clf"
    D.main(["--train", f"real={phantom_dir}:val", "--labels", "Edema", "--width", "4", "--batch-size", "8",
            "--max-steps", "1", "--eval-every", "1", "--out", str(classifier)])
    narrow = tmp_path / "narrow"
    D.main(["predict-metadata", "--train", f"real={phantom_dir}:val", "--labels", "sex,age", "--width", "4",
            "--batch-size", "8", "--max-steps", "1", "--eval-every", "1", "--out", str(narrow)])
    base = ["edit-eval", "--original", phantom_dir, "--lpips", "", "--out", str(tmp_path / "x")]
    cases = [(["--edited", setup["E"], "--predictor", setup["pred"], "--truth", str(tmp_path / "o")], "meta.csv"),
             (["--edited", setup["E"], "--predictor", setup["pred"], "--original", setup["T"] + "x"], "no such file"),
             (["--edited", str(bad_e), "--predictor", setup["pred"]], "intervention 'mood=happy'"),
             (["--edited", setup["E"], "--predictor", str(narrow / "real" / "run0")], "the predictor lacks ['Pleural"),
             (["--edited", setup["E"], "--predictor", str(classifier / "real" / "run0")],
              "expected a predict-metadata"),
             (["--edited", setup["E"]], "expected --original D --edited E --predictor")]
    half = tmp_path / "half"                                     # a truth folder missing most ids
    prep_data.counterfactual_pairs(phantom_dir, [{"id": r["id"], "source_id": r["id"], "intervention": "sex=F"}
                                                 for r in setup["cf"][:2]], str(half), masks=False)
    cases.append((["--edited", setup["E"], "--predictor", setup["pred"], "--truth", str(half)], "no rows with ids"))
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            D.main(base + argv)
        assert msg in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))


def test_frozen_encoder_predictor(setup, phantom_dir, tmp_path):
    """--encoder: a frozen transformers ViT's layers under attention-pooling heads; its weights stay out of the
    checkpoint, so a reload (here: of the local tiny ViT) predicts exactly what the trained model did."""
    out = str(tmp_path / "enc")
    D.main(["predict-metadata", "--train", f"real={phantom_dir}:val", "--encoder", setup["vit"], "--enc-layers", "2,4",
            "--labels", "sex,view,age", "--batch-size", "8", "--max-steps", "2", "--eval-every", "2", "--out", out])
    run = os.path.join(out, "real", "run0")
    with safe_open(os.path.join(run, "best.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("encoder" in k or "backbone" in k for k in keys) and "model.query" in keys
    model, saved, _ = D.load_classifier(run, "predictor")
    assert model.sizes == [2, 3, 1] and model.query.shape == (3, 64)       # 2 layers x 32 channels
    x = torch.rand(3, 1, 32, 32)
    model2, _, _ = D.load_classifier(run, "predictor")
    torch.testing.assert_close(model.eval()(x), model2.eval()(x), rtol=0, atol=0)
    e = model.embed(x)
    assert e.shape == (3, 3, 64)
    np.testing.assert_allclose(D.attribute_cosine(e.detach(), e.detach(), model.variables, [[]] * 3), 1.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# cond-eval (issue 28): the predictor on samples against their requested conditions, beside real test images

COND_VARS = "sex,view,dataset,age,Cardiomegaly,Pleural Effusion,Support Devices"


def write_samples(phantom, folder, rows, meta_rows):
    """A sampler-style folder: the phantom images of `rows` as 16-bit <id>.png, meta.csv = meta_rows."""
    os.makedirs(folder)
    for r, m in zip(rows, meta_rows):
        with safe_open(os.path.join(phantom, "shards", f"{int(r['shard']):05d}.safetensors"), "numpy") as f:
            Image.fromarray(f.get_tensor("images")[int(r["index"]), 0]).save(os.path.join(folder, f"{m['id']}.png"))
    with open(os.path.join(folder, "meta.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta_rows[0]))
        w.writeheader()
        w.writerows(meta_rows)
    return folder


@pytest.fixture(scope="module")
def cond(phantom_dir, tmp_path_factory):
    """A predictor of 7 variables (200 tiny steps, ~5 s) and three folders: real val + test images with their own
    rows (R), the same images with their rows shuffled (X), and train images with no conditions (U, the floor)."""
    root = tmp_path_factory.mktemp("cond")
    D.main(["predict-metadata", "--train", f"real={phantom_dir}:train", "--labels", COND_VARS, "--width", "8",
            "--batch-size", "32", "--max-steps", "200", "--eval-every", "100", "--out", str(root / "pred")])
    rows = list(csv.DictReader(open(os.path.join(phantom_dir, "meta.csv"))))
    held, train = [r for r in rows if r["split"] != "train"], [r for r in rows if r["split"] == "train"]
    perm = np.random.default_rng(0).permutation(len(held))
    return {"pred": str(root / "pred" / "real" / "run0"), "rows": held,
            "R": write_samples(phantom_dir, str(root / "R"), held, held),
            "X": write_samples(phantom_dir, str(root / "X"), held,
                               [{**held[int(p)], "id": r["id"]} for r, p in zip(held, perm)]),
            "U": write_samples(phantom_dir, str(root / "U"), train[:len(held)],
                               [{"id": f"u{k}"} for k in range(len(held))])}


def pairwise_auroc(y, s):
    """P(s_pos > s_neg) + P(tie) / 2 over all positive-negative pairs, float64."""
    pos, neg = s[y == 1].astype(np.float64), s[y == 0].astype(np.float64)
    d = pos[:, None] - neg[None, :]
    return float(((d > 0) + 0.5 * (d == 0)).mean())


def test_cond_eval_real_near_ceiling_shuffled_near_chance(cond, phantom_dir, tmp_path):
    base = ["cond-eval", "--data", phantom_dir, "--predictor", cond["pred"], "--device", "cpu"]
    real = D.main(base + ["--samples", cond["R"], "--floor", cond["U"], "--out", str(tmp_path / "r")])
    shuf = D.main(base + ["--samples", cond["X"], "--out", str(tmp_path / "x")])
    md = open(tmp_path / "r" / "results.md").read()
    assert "| samples |" in md and "| real test (ceiling) |" in md and "| unconditional (floor) |" in md
    assert "| skipped (missing, uncertain) |" in md and "|  | Sex | View | Dataset | Age MAE | Crm | Ple | Sdv |" in md
    assert json.load(open(tmp_path / "r" / "results.json"))["results"] == json.loads(json.dumps(D.clean(real)))
    ceil = {v: r["real test (ceiling)"] for v, r in real.items()}
    assert ceil["dataset"] > 0.8 and ceil["Support Devices"] > 0.8 and ceil["Pleural Effusion"] > 0.7
    for v in ("view", "dataset", "Cardiomegaly", "Pleural Effusion", "Support Devices"):   # what the predictor reads
        assert abs(real[v]["samples"] - ceil[v]) < 0.12, v                # real images as samples: at the ceiling
        assert shuf[v]["samples"] < ceil[v] - 0.15, v                     # shuffled requests: the metric fails them
    for v in ("Cardiomegaly", "Pleural Effusion", "Support Devices"):
        assert abs(shuf[v]["samples"] - 0.5) < 0.2 and abs(real[v]["unconditional (floor)"] - 0.5) < 0.2, v
    for v in ("sex", "view", "dataset"):
        assert shuf[v]["samples"] <= shuf[v]["majority rate"] + 0.1, v
    assert shuf["age"]["samples"] > real["age"]["samples"] + 2
    # skipped = empty cells in meta.csv; the metrics recomputed here from the PNGs and the checkpoint
    rows, names = cond["rows"], ["phantom-a", "phantom-b", "phantom-c"]
    model, saved, _ = D.load_classifier(cond["pred"], "predictor")
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(cond["R"], f"{r['id']}.png")), np.float64)
                                      / 65535)[None].float() for r in rows])
    with torch.no_grad():
        out = model.eval()((x - 0.449) / 0.226).double().split(model.sizes, 1)
    for j, v in enumerate(model.variables):
        cells = [r[v] for r in rows]
        assert real[v]["skipped"] == sum(c == "" for c in cells) + sum(c == "-1" for c in cells), v
        keep = [i for i, c in enumerate(cells) if c not in ("", "-1")]
        if v == "age":
            mae = np.abs(out[j][keep, 0].numpy() * 20 + 60 - np.array([float(cells[i]) for i in keep])).mean()
            assert real[v]["samples"] == pytest.approx(mae, abs=1e-4)
        elif v in D.LABELS:
            p1 = out[j].softmax(1)[keep, 1].numpy()
            assert real[v]["samples"] == pytest.approx(pairwise_auroc(np.array([int(cells[i]) for i in keep]), p1),
                                                       abs=1e-9), v
        else:
            classes = {"sex": ["F", "M"], "view": ["PA", "AP", "LATERAL"], "dataset": names}[v]
            acc = np.mean([int(out[j][i].argmax()) == classes.index(cells[i]) for i in keep])
            assert real[v]["samples"] == pytest.approx(acc, abs=1e-12), v


def test_cond_eval_bad_input(cond, phantom_dir, tmp_path):
    nometa, nopng, holes = tmp_path / "nometa", tmp_path / "nopng", tmp_path / "holes"
    os.makedirs(nometa)
    os.symlink(os.path.join(cond["R"], f"{cond['rows'][0]['id']}.png"), nometa / "a.png")
    os.makedirs(nopng)
    os.symlink(os.path.join(cond["R"], "meta.csv"), nopng / "meta.csv")
    os.makedirs(holes)
    os.symlink(os.path.join(cond["R"], "meta.csv"), holes / "meta.csv")
    for r in cond["rows"][1:]:
        os.symlink(os.path.join(cond["R"], f"{r['id']}.png"), holes / f"{r['id']}.png")
    classifier = tmp_path / "clf"
    D.main(["--train", f"real={phantom_dir}:val", "--labels", "Edema", "--width", "4", "--batch-size", "8",
            "--max-steps", "1", "--eval-every", "1", "--out", str(classifier)])
    base = ["cond-eval", "--data", phantom_dir, "--out", str(tmp_path / "o")]
    ok = ["--predictor", cond["pred"]]
    cases = [(["--samples", str(nometa)] + ok, "meta.csv: no such file"),
             (["--samples", str(nopng)] + ok, "no PNGs for its"),
             (["--samples", str(holes)] + ok, f"1 of {len(cond['rows'])} ids have no PNG"),
             (["--samples", cond["R"], "--ckpt", str(classifier / "real" / "run0")], "expected a predict-metadata"),
             (["--samples", cond["U"]] + ok, "no requested value of the predictor's variables"),
             (["--samples", cond["R"], "--floor", str(nopng)] + ok, "--floor"),
             (["--samples", cond["R"]], "expected --samples S --predictor")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            D.main(base + argv)
        assert msg in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))

"""Tests of prep_data.py: the phantom SCM against its stated mechanisms and graph, the renderer, true
counterfactuals, the dataset writer/reader, resume, bad input, and that the findings are visible to a CNN."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

import prep_data as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The parents of each finding as FORMAT.md §6 lists them (radit Table 1), written out independently of prep_data.
FORMAT_PARENTS = {
    "Atelectasis": {"Pleural Effusion", "Pneumonia"}, "Cardiomegaly": {"age", "race", "sex"},
    "Consolidation": {"Pneumonia"}, "Edema": {"age", "race", "sex"},
    "Enlarged Cardiomediastinum": {"Cardiomegaly"}, "Fracture": {"age", "sex"}, "Lung Lesion": {"Lung Opacity"},
    "Lung Opacity": {"Atelectasis", "Consolidation", "Edema", "Pleural Other"},
    "No Finding": set(P.LABELS) - {"No Finding"},
    "Pleural Effusion": {"Cardiomegaly", "Pleural Other", "Pneumonia"}, "Pleural Other": {"age", "sex"},
    "Pneumonia": {"age", "sex"}, "Pneumothorax": {"age", "sex", "Fracture"},
    "Support Devices": {"Pleural Effusion", "Pneumothorax"},
    "age": set(), "sex": set(), "race": set(), "view": set(), "dataset": set()}

N_SCM = 20000


@pytest.fixture(scope="module")
def scm_sample():
    seeds = np.arange(N_SCM) + 123_000_000
    return seeds, P.sample_scm(seeds)


def stated_probability(var, values):
    """P(var positive or uncertain | parents) from the PHANTOM_SCM spec, in float64 written out here."""
    spec = P.PHANTOM_SCM[var]
    z = np.full(len(values["age"]), float(spec["bias"]))
    for key, w in spec["weights"].items():
        name, _, level = key.partition("=")
        v = values[name]
        if name == "age":
            g = (v - 60.0) / 20.0
        elif name == "sex":
            g = (v == {"F": 1, "M": 2}[level]).astype(float)
        elif name == "race":
            g = (v == {"ASIAN": 1, "BLACK": 2, "WHITE": 3}[level]).astype(float)
        else:
            g = np.select([v == 2, v == 3], [1.0, 0.5], 0.0)
        z += w * g
    return 1 / (1 + np.exp(-z))


# ---- the SCM --------------------------------------------------------------------------------------------------

def test_graph_matches_design():
    for var in P.VARIABLES:
        assert set(P.scm_parents(var)) == FORMAT_PARENTS[var], var
    order = P.topological_order()
    assert sorted(order) == sorted(P.VARIABLES)
    for var in P.VARIABLES:
        for parent in FORMAT_PARENTS[var]:
            assert order.index(parent) < order.index(var)


def test_cycle_is_an_error():
    scm = json.loads(json.dumps(P.PHANTOM_SCM))
    scm["Pneumothorax"]["weights"]["Support Devices"] = 1.0          # the bidirectional edge of radit B.3.1
    with pytest.raises(ValueError, match="cycle"):
        P.topological_order(scm)


def test_roots_match_stated_distributions(scm_sample):
    _, v = scm_sample
    for var in ("sex", "race", "view", "dataset"):
        probs = np.array(list(P.PHANTOM_SCM[var]["probs"].values()))
        counts = np.bincount(v[var], minlength=len(probs) + 1)
        assert counts[0] == 0                                       # the true value is never missing
        assert stats.chisquare(counts[1:], probs / probs.sum() * N_SCM).pvalue > 1e-4, var
    spec = P.PHANTOM_SCM["age"]
    assert v["age"].min() >= spec["min"] and v["age"].max() <= spec["max"]
    assert np.all(v["age"] == np.round(v["age"]))
    # Mean of the rounded, clipped normal by numerical integration.
    grid = np.arange(spec["min"], spec["max"] + 1)
    cdf = stats.norm.cdf(grid + 0.5, spec["mean"], spec["sd"]) - stats.norm.cdf(grid - 0.5, spec["mean"], spec["sd"])
    cdf[0] += stats.norm.cdf(spec["min"] - 0.5, spec["mean"], spec["sd"])
    cdf[-1] += stats.norm.sf(spec["max"] + 0.5, spec["mean"], spec["sd"])
    mean = (grid * cdf).sum()
    sd = math.sqrt(((grid - mean) ** 2 * cdf).sum())
    assert abs(v["age"].mean() - mean) < 4 * sd / math.sqrt(N_SCM)


def test_findings_match_stated_conditionals(scm_sample):
    _, v = scm_sample
    for var, spec in P.PHANTOM_SCM.items():
        if spec["type"] != "logistic":
            continue
        p = stated_probability(var, v)
        y = v[var] >= 2
        z = (y.sum() - p.sum()) / math.sqrt((p * (1 - p)).sum())
        assert abs(z) < 4.5, (var, z)
        # Calibration within deciles of the stated probability (a chi-square over bins).
        bins = np.quantile(p, np.linspace(0, 1, 6))
        idx = np.clip(np.searchsorted(bins, p, side="right") - 1, 0, 4)
        chi = sum((y[idx == b].sum() - p[idx == b].sum()) ** 2 / max((p[idx == b] * (1 - p[idx == b])).sum(), 1e-9)
                  for b in range(5))
        assert stats.chi2.sf(chi, 5) > 1e-4, (var, chi)
        # Share of uncertain among positive-or-uncertain equals the stated rate.
        unc = (v[var] == 3).sum()
        n = y.sum()
        r = spec["uncertain"]
        assert abs(unc - r * n) < 4.5 * math.sqrt(n * r * (1 - r)) + 1, var
    sick = np.zeros(N_SCM, bool)
    for lab in P.LABELS:
        if lab not in ("No Finding", "Support Devices"):
            sick |= v[lab] >= 2
    assert np.array_equal(v["No Finding"] == 2, ~sick)
    rate = (v["No Finding"] == 2).mean()
    assert 0.25 < rate < 0.42                                       # MIMIC-like
    assert 0.005 < (v["Pleural Other"] >= 2).mean() < 0.03


@pytest.mark.parametrize("child,other,given", [
    ("Consolidation", "age", ["Pneumonia"]),
    ("Lung Lesion", "Pneumonia", ["Lung Opacity"]),
    ("Atelectasis", "Cardiomegaly", ["Pleural Effusion", "Pneumonia"]),
    ("Enlarged Cardiomediastinum", "sex", ["Cardiomegaly"]),
])
def test_independent_of_non_descendants_given_parents(scm_sample, child, other, given):
    _, v = scm_sample
    x = v[other] > 60 if other == "age" else v[other] >= 2 if other in P.LABELS else v[other]
    strata = np.stack([v[g] for g in given], 1)
    for key in np.unique(strata, axis=0):
        sel = np.all(strata == key, 1)
        table = np.array([[np.sum(sel & (x == a) & (v[child] >= 2)), np.sum(sel & (x == a) & (v[child] < 2))]
                          for a in np.unique(x[sel])])
        if table.shape[0] < 2 or (table.sum(0) < 5).any():
            continue
        assert stats.chi2_contingency(table).pvalue > 1e-4, (child, other, key)
    # The same test has power: without conditioning, the child depends on its (first) parent.
    parent = v[given[0]] >= 2
    table = [[np.sum(parent & (v[child] >= 2)), np.sum(parent & (v[child] < 2))],
             [np.sum(~parent & (v[child] >= 2)), np.sum(~parent & (v[child] < 2))]]
    assert stats.chi2_contingency(table).pvalue < 1e-6


def test_exogenous_uniform_is_uniform_and_stream_independent():
    seeds = np.arange(50000)
    u1, u2 = P.exogenous_uniform(seeds, 3), P.exogenous_uniform(seeds, 4)
    assert stats.kstest(u1, "uniform").pvalue > 1e-4
    assert abs(np.corrcoef(u1, u2)[0, 1]) < 0.03
    assert np.all((u1 > 0) & (u1 < 1))


# ---- rendering, masks, counterfactuals ------------------------------------------------------------------------

def test_render_deterministic_shapes_and_range(phantom64_dir):
    info = P.read_info(phantom64_dir)
    rows = P.read_dataset_meta(phantom64_dir)
    images = P.load_pixels(phantom64_dir, rows)
    masks = P.load_pixels(phantom64_dir, rows, "masks")
    assert images.dtype == np.uint16 and images.shape == (len(rows), 1, 64, 64)
    assert masks.dtype == np.uint8 and masks.shape == (len(rows), len(info["mask_names"]), 64, 64)
    assert set(np.unique(masks)) <= {0, 1}
    assert np.all(images.reshape(len(rows), -1).min(1) == 0) and np.all(images.reshape(len(rows), -1).max(1) == 65535)
    assert len(np.unique(images[0])) > 1000                        # noise and texture: not trivially smooth
    # Same seed -> identical rows and pixels; another dataset seed -> other images.
    r2, im2, m2 = P.phantom_rows_and_pixels([int(rows[5]["seed"])], 64)
    assert np.array_equal(im2[0], images[5]) and np.array_equal(m2[0], masks[5])
    assert {k: r2[0][k] for k in P.VARIABLES} == {k: rows[5][k] for k in P.VARIABLES}
    _, im3, _ = P.phantom_rows_and_pixels([int(rows[5]["seed"]) + 10_000_000], 64)
    assert not np.array_equal(im3[0], images[5])


def _brighter_inside_mask(finding, n_min=5):
    """For frontal images with the finding, render the same image without it (only it: no causal descendants
    change): the pixels it brightens lie inside its mask, and the mask is brighter than without the finding."""
    seeds = np.arange(3000)
    v = P.sample_scm(seeds)
    sides, severity = P.finding_details(v, seeds)
    chosen = np.flatnonzero((v[finding] == 2) & (v["view"] != 3))[:8]
    checked = 0
    for j in chosen:
        values = {k: v[k][j] for k in P.VARIABLES}
        with_f, masks = P.render(values, sides[j], severity[j], int(seeds[j]), 128)
        without, _ = P.render({**values, finding: P.NEG}, sides[j], severity[j], int(seeds[j]), 128)
        diff = with_f.astype(np.float64) - without.astype(np.float64)
        mask = masks[P.MASK_NAMES.index(finding)].astype(bool)
        changed = diff > 0.5 * diff.max()                            # clearly brighter, not partial-volume edges
        assert changed.sum() > 0                                     # every finding changes the image
        if mask.sum() < 8:                                           # hidden (e.g. behind a large heart)
            continue
        checked += 1
        rim = ndimage.binary_dilation(mask)                          # + one pixel of partial volume
        assert (changed & rim).sum() / changed.sum() > 0.9, (finding, j)
        assert (diff[mask] > 0).mean() > 0.9, (finding, j)              # the mask is brighter with the finding
        assert diff[mask].mean() > 10 * max(np.abs(diff[~mask]).mean(), 1.0), (finding, j)
    assert checked >= n_min, (finding, checked)


@pytest.mark.parametrize("finding", ["Pleural Effusion", "Consolidation", "Lung Lesion", "Atelectasis"])
def test_masks_cover_the_rendered_finding(finding):
    _brighter_inside_mask(finding)


def test_true_counterfactual_identity_and_descendants(phantom64_dir):
    rows = P.read_dataset_meta(phantom64_dir)
    images = P.load_pixels(phantom64_dir, rows[:20])
    for i in range(20):
        row, img, _ = P.true_counterfactual(rows[i], {}, size=64)
        assert img.shape == (1, 64, 64) and np.array_equal(img, images[i])   # bit-identical, no intervention
        assert {k: row[k] for k in P.VARIABLES + ["id", "report", "boxes"]} == \
            {k: rows[i][k] for k in P.VARIABLES + ["id", "report", "boxes"]}
    seeds = np.arange(4000)
    base = P.sample_scm(seeds)

    def descendants(var):
        out, frontier = set(), {var}
        while frontier:
            frontier = {c for c, ps in FORMAT_PARENTS.items() if ps & frontier} - out
            out |= frontier
        return out

    for var, value in (("race", 2), ("sex", 1), ("age", 85.0), ("Pneumonia", P.POS), ("Fracture", P.POS)):
        cf = P.sample_scm(seeds, {var: value})
        changed = {k for k in P.VARIABLES if not np.array_equal(cf[k], base[k])}
        assert changed - {var} <= descendants(var), (var, changed - {var} - descendants(var))
        assert changed - {var}, var                                  # something downstream did change
    for leaf in ("No Finding",):
        cf = P.sample_scm(seeds, {leaf: P.NEG})
        assert all(np.array_equal(cf[k], base[k]) for k in P.VARIABLES if k != leaf)
    cf = P.sample_scm(seeds, {"Support Devices": P.POS})           # its only child ignores it (CheXpert rule)
    assert all(np.array_equal(cf[k], base[k]) for k in P.VARIABLES if k != "Support Devices")


def test_counterfactual_cli_keeps_ids_and_seeds(phantom64_dir, tmp_path):
    rows = P.read_dataset_meta(phantom64_dir)
    ids = [r["id"] for r in rows[:6]]
    out = str(tmp_path / "cf")
    P.main(["counterfactual", "--data", phantom64_dir, "--set", "sex=F,age=80", "--ids", ",".join(ids), "--out", out])
    cf_rows = P.read_dataset_meta(out)
    assert [r["id"] for r in cf_rows] == ids
    assert [r["seed"] for r in cf_rows] == [r["seed"] for r in rows[:6]]
    assert all(r["sex"] in ("F", "") and r["age"] in ("80", "") for r in cf_rows)
    assert all(r["view"] == s["view"] and r["dataset"] == s["dataset"] for r, s in zip(cf_rows, rows[:6]))


# ---- the dataset format: writer / reader, resume, bad input ---------------------------------------------------

def test_writer_reader_round_trip(tmp_path):
    out = str(tmp_path / "d")
    rows = P.make_phantom(out, n=50, size=32, seed=3, shard_size=16)
    assert sorted(os.listdir(os.path.join(out, "shards"))) == [f"{s:05d}.{e}" for s in range(4) for e in
                                                               ("csv", "safetensors")]
    with open(os.path.join(out, "meta.csv"), newline="") as f:
        header = next(csv.reader(f))
    assert header == P.META_COLUMNS + P.PHANTOM_COLUMNS               # FORMAT.md §2 columns, in order
    meta = P.read_dataset_meta(out)
    direct_rows, direct_images, direct_masks = P.phantom_rows_and_pixels(np.arange(50) + 30_000_000, 32)
    assert np.array_equal(P.load_pixels(out, meta), direct_images)
    assert np.array_equal(P.load_pixels(out, meta, "masks"), direct_masks)
    assert [r["id"] for r in meta] == [r["id"] for r in direct_rows]
    assert [(int(r["shard"]), int(r["index"])) for r in meta] == [(i // 16, i % 16) for i in range(50)]
    info = P.read_info(out)
    assert info["size"] == 32 and info["n"] == 50 and sum(info["counts"].values()) == 50
    train = [r for r in meta if r["split"] == "train"]
    eff = info["prevalence"]["train"]["Pleural Effusion"]
    assert eff["pos"] == sum(r["Pleural Effusion"] == "1" for r in train)
    assert eff["pos"] + eff["neg"] + eff["unc"] + eff["missing"] == len(train)
    assert info["mask_names"] == P.MASK_NAMES and info["datasets"] == P.PHANTOM_SOURCES
    for folder in (out, os.path.join(out, "shards")):            # atomic_save's temporaries: .tmp-<name>
        assert not [f for f in os.listdir(folder) if f.startswith(".tmp-") or f.endswith(".tmp")]
    # Patient-level split: a patient never appears in two splits.
    splits = {}
    for r in meta:
        splits.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert rows == P.make_phantom(out, n=50, size=32, seed=3, shard_size=16)   # re-run: everything skipped


def test_workers_give_the_same_dataset(tmp_path):
    one = P.make_phantom(str(tmp_path / "one"), n=40, size=32, seed=5, shard_size=10, workers=1)
    two = P.make_phantom(str(tmp_path / "two"), n=40, size=32, seed=5, shard_size=10, workers=2)
    assert one == two
    assert np.array_equal(P.load_pixels(str(tmp_path / "one"), one), P.load_pixels(str(tmp_path / "two"), two))


def test_resume_after_killed_run(tmp_path):
    out, ref = str(tmp_path / "killed"), str(tmp_path / "clean")
    cmd = [sys.executable, os.path.join(ROOT, "prep_data.py"), "phantom", "--n", "300", "--size", "64",
           "--shard-size", "10", "--seed", "7"]
    proc = subprocess.Popen(cmd + ["--out", out], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    shards = os.path.join(out, "shards")
    deadline = time.time() + 60
    while time.time() < deadline:
        if os.path.isdir(shards) and sum(f.endswith(".csv") for f in os.listdir(shards)) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "meta.csv")), "the run finished before it could be killed"
    finished = sorted(f for f in os.listdir(shards) if f.endswith(".csv"))
    mtimes = {f: os.path.getmtime(os.path.join(shards, f)) for f in finished}
    stale = os.path.join(shards, ".tmp-abc00099.safetensors")    # what a kill inside atomic_save leaves
    with open(stale, "wb") as f:
        f.write(b"x" * 1000)
    subprocess.run(cmd + ["--out", out], check=True, capture_output=True)
    assert all(os.path.getmtime(os.path.join(shards, f)) == t for f, t in mtimes.items())   # not redone
    assert not os.path.exists(stale)
    subprocess.run(cmd + ["--out", ref], check=True, capture_output=True)
    assert P.read_dataset_meta(out) == P.read_dataset_meta(ref)
    assert np.array_equal(P.load_pixels(out, P.read_dataset_meta(out)), P.load_pixels(ref, P.read_dataset_meta(ref)))


def test_every_file_is_fsynced_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """prep_data.py writes through the atomic_save piece: the temporary is fsynced, then renamed over the file (before
    its own atomic_write renamed without fsync: a power cut could leave an empty meta.csv in place)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", a, b)), real_replace(a, b))[1])
    path = str(tmp_path / "d" / "info.json")
    P.write_json(path, {"n": 1})
    P.write_csv(str(tmp_path / "d" / "meta.csv"), [{"id": "a"}], ["id"])
    assert [e[0] for e in events] == ["fsync", "replace"] * 2
    assert events[0][1] == events[1][1] and os.path.basename(events[1][1]).startswith(".tmp-")
    assert events[1][2] == path and json.load(open(path)) == {"n": 1}
    assert sorted(os.listdir(tmp_path / "d")) == ["info.json", "meta.csv"]          # no temporary left


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prep_data.py"), *args], capture_output=True, text=True)


def test_bad_input(tmp_path, phantom64_dir):
    out = str(tmp_path / "x")
    r = _cli("phantom", "--size", "16", "--out", out)
    assert r.returncode != 0 and "--size 16" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out)                                   # nothing half-written
    r = _cli("phantom", "--bogus")
    assert r.returncode == 2 and "--bogus" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("phantom", "--n", "30", "--size", "32", "--out", phantom64_dir)
    assert r.returncode != 0 and "different dataset" in r.stderr
    assert len(P.read_dataset_meta(phantom64_dir)) == 256                    # the existing dataset is untouched
    r = _cli("counterfactual", "--data", phantom64_dir, "--set", "smoker=1", "--out", out)
    assert r.returncode != 0 and "smoker" in r.stderr
    r = _cli("sheet", "--data", str(tmp_path / "nothing"))
    assert r.returncode != 0 and "meta.csv" in r.stderr


def test_contact_sheet(phantom64_dir, tmp_path):
    out = str(tmp_path / "sheet.png")
    P.contact_sheet(phantom64_dir, out, n=12, cols=4, tile=96, overlay_masks=True)
    from PIL import Image
    im = Image.open(out)
    assert im.size == (4 * 96, 3 * (96 + 30))
    assert np.asarray(im).std() > 10


# ---- the findings are visible ----------------------------------------------------------------------------------

def test_small_cnn_sees_cardiomegaly_and_effusion(tmp_path):
    """A small CNN trained for a few seconds separates the findings on held-out phantoms (AUC > 0.9)."""
    torch.manual_seed(0)
    seeds = np.arange(1800) + 900_000_000
    rows, images, _ = P.phantom_rows_and_pixels(seeds, 32, with_masks=False)
    x = torch.from_numpy(images.astype(np.float32) / 65535.0 * 2 - 1)
    names = ["Cardiomegaly", "Pleural Effusion"]
    y = torch.tensor([[{"1": 1.0, "0": 0.0}.get(r[n], float("nan")) for n in names] for r in rows])
    n_train = 1400
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(256, 2))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(250):
        idx = torch.randint(0, n_train, (64,), generator=g)
        logits, target = net(x[idx]), y[idx]
        ok = ~torch.isnan(target)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[ok], target[ok])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = net(x[n_train:]).numpy()
    for j, name in enumerate(names):
        t = y[n_train:, j].numpy()
        ok = ~np.isnan(t)
        pos, neg = scores[ok][t[ok] == 1, j], scores[ok][t[ok] == 0, j]
        auc = stats.mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg))
        print(name, auc)
        assert auc > 0.9, (name, auc, len(pos))

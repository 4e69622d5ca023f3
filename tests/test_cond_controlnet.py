"""controlnet.py on the 2-class toy of tests/toy_cond.py (issue 28, item 3): does the mask decide the image?

The toy's disk lies in the `Heart` mask channel, left half for class 1, right half for class 0. Its report differs
by class too, so the copy of the toy used here has one report for every row (TEXT): backbone, adapter, sampler and
evaluate all see the same text for both classes, and only the mask can tell them apart. A tiny backbone
(dit_text2img.py) and adapter are trained through their own entry points, and samples are drawn by controlnet.py
sample with each class's mask at the paper's guidance (chexgen: w = 4, DDIM; no condition guidance, the script's
default). CPU only, one thread (tiny models run faster on one thread than on two contended ones).

`PYTHONPATH=. python tests/test_cond_controlnet.py OUT` runs the measurements of RESULTS.md (floor, probe, budget)."""
import contextlib
import csv
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import controlnet as cn
import dit_text2img as dt
import toy_cond
from tiny_text import write_tiny_bert

TEXT = "PA view of the chest."          # the toy's findings start with it; at least --min-chars 7 characters
# Our choice: TEXT is 8 tokens with [CLS] and [SEP], so --max-length 8 holds it and keeps the cross-attention cheap;
# hidden 32, 2 blocks, patch 4 (an 8 x 8 token grid: patch 8 did not learn the disk in 100 steps); batch 8, lr 2e-3,
# EMA 0.9 as tests/test_controlnet.py's reduced tiny models.
SMALL = ["--batch-size", "8", "--lr", "2e-3", "--ema", "0.9", "--sample-every", "0"]
STEPS = 100                  # optimizer steps of the backbone, and again of the adapter: 200 CPU steps in all


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_bert(d):
    """A tiny random BERT (2 layers, 32 wide) in folder d, with a WordPiece vocabulary of TEXT's words."""
    return write_tiny_bert(d, [TEXT], layers=2, max_positions=16)


def toy_data(toy_dir, bert, data):
    """A copy of the toy dataset at `data` (the session fixture stays shared) whose every report is TEXT, and its
    text cache. The index is left out: it would be stale (meta.csv is read instead)."""
    shutil.copytree(toy_dir, data, ignore=shutil.ignore_patterns("text", "latents", "meta_index.safetensors"))
    path = os.path.join(data, "meta.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, [{**r, "report": TEXT} for r in reader]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    dt.main(["embed-text", "--data", data, "--text-encoder", bert, "--name", "bert", "--max-length", "8"])
    return data


def train_backbone(data, out, steps=STEPS):
    dt.main(["--data", data, "--out", out, "--hidden", "32", "--depth", "2", "--heads", "2", "--max-length", "8",
             *SMALL, "--max-steps", str(steps), "--log-every", str(steps)])
    return out


def train_adapter(data, backbone, out, steps=STEPS, extra=()):
    cn.main(["--data", data, "--backbone", backbone, "--out", out, *SMALL, "--cond-masks", "Heart",
             "--control-blocks", "1", "--max-steps", str(steps), "--log-every", str(steps), *extra])
    return out


def write_masks(folder):
    """c0.png, c1.png: each class's disk, the `Heart` condition of that class."""
    os.makedirs(folder, exist_ok=True)
    for c in (0, 1):
        Image.fromarray(toy_cond.toy_disk(32, c).astype(np.uint8) * 255).save(os.path.join(folder, f"c{c}.png"))
    return folder


def sample_args(run, masks, bert, out, steps=25, n=16, extra=()):
    """controlnet.py sample with each class's mask under one prompt, n samples a class. chexgen's guidance w = 4
    (the script's default, given here to be seen); 25 DDIM steps instead of chexgen's 100: our choice, for time
    (100 steps follow the mask as well: RESULTS.md)."""
    return ["sample", "--ckpt", run, "--masks", masks, "--prompt", TEXT, "--n-per-cond", str(n), "--cfg", "4",
            "--steps", str(steps), "--batch-size", str(2 * n), "--out", out, "--text-encoder", bert, *extra]


def follow_rates(out, ids):
    """Share of each class's samples (ids c<class>_s<k>) that are that class, read by toy_class."""
    want = np.array([int(i[1]) for i in ids])
    imgs = np.stack([np.asarray(Image.open(os.path.join(out, f"{i}.png"))) / 65535.0 for i in ids])
    got = toy_cond.toy_class(imgs)
    return [float((got[want == c] == c).mean()) for c in (0, 1)]


@pytest.fixture(scope="module")
def toy_bert(tmp_path_factory):
    return make_bert(str(tmp_path_factory.mktemp("toybert")))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, toy2_dir, toy_bert):
    """(dataset copy with the constant-text cache, backbone run, adapter run): 100 + 100 steps on the toy."""
    root = tmp_path_factory.mktemp("cn_toy")
    data = toy_data(toy2_dir, toy_bert, str(root / "data"))
    dit = train_backbone(data, str(root / "dit"))
    return data, dit, train_adapter(data, dit, str(root / "cn"))


def test_toy_samples_put_the_disk_where_the_mask_says(tmp_path, toy_run, toy_bert):
    """16 samples a class under the same prompt, each class's disk as the mask: > 90 % of each class's samples are
    that class (toy_class). A model that ignored the mask would draw either class from each noise (the noise is
    drawn per condition and sample), about half of each; RESULTS.md has that floor (the frozen backbone alone)."""
    out = str(tmp_path / "fake")
    ids = cn.main(sample_args(toy_run[2], write_masks(str(tmp_path / "masks")), toy_bert, out))
    follow = follow_rates(out, ids)
    print(f"toy controlnet: follows the mask {follow} (class 0, 1)")
    assert min(follow) > 0.9, follow


# ---------------------------------------------------------------------------------------------------- measurements


def probe(data, run, ts=(10, 100, 250, 500, 750, 990), seed=0):
    """On the test split's real images noised to x_t: RMS over pixels of eps(text, C) - eps(text, no C) (what the
    adapter adds; 'no C' is the frozen backbone, the script's design) and the eps MSE with the row's own mask, with
    the other class's mask (the toy's disks are mirror images: C flipped left-right) and with none."""
    cfg, dcfg, model = cn.load_model(run, "cpu")
    d = cn.ControlData(cn.Config(**{**cn.asdict(cfg), "data": data}), dcfg, "test")
    idx = torch.arange(len(d))
    x0, cond = d.load(idx), cn.cond_encoder(None, "cpu")(d.load_cond(idx))
    text, n = d.load_text(idx)
    sched, g = cn.Schedule(), torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        for t in ts:
            eps, tt = torch.randn(x0.shape, generator=g), torch.full((len(idx),), t)
            ab = sched.ab(tt, "cpu")
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            conds = {"own": cond, "other": cond.flip(-1), "none": None}
            e = {k: model(xt, tt, text, n, cond=c) for k, c in conds.items()}
            rows.append({"t": t, "rms_c_minus_none": float((e["own"] - e["none"]).pow(2).mean().sqrt()),
                         **{f"mse_{k}": float((v - eps).pow(2).mean()) for k, v in e.items()}})
    return rows


def floor_rates(run, masks, bert, out):
    """The same samples (noise, prompt, guidance) from the frozen backbone alone: the adapter's after_proj zeroed,
    which is the backbone exactly (tests/test_controlnet.py), through the script's own generate."""
    cfg, dcfg, model = cn.load_model(run, "cpu")
    for blk in model.adapter.controlnet:
        torch.nn.init.zeros_(blk.after_proj.weight)
        torch.nn.init.zeros_(blk.after_proj.bias)
    icfg = cn.InferConfig(**vars(cn.build_parser(cn.InferConfig, "sample", "", "sample").parse_args(
        sample_args(run, masks, bert, out)[1:])))
    conds = cn.read_mask_conditions(masks, ["Heart"], 32)
    items = [{"cid": c, "maps": m, "boxes": None, "prompt": TEXT} for c, m, _ in conds]
    return follow_rates(out, cn.generate(model, cfg, dcfg, items, icfg, out, torch.device("cpu")))


def measure(root, long_steps=1000, seg_steps=150):
    """RESULTS.md's figures: CPU seconds of the test's phases, its follow rates (25 and 100 DDIM steps), the floor,
    the probe, follow rates against the adapter's and backbone's steps, and evaluate's Dice at the test's budget and
    at long_steps + long_steps (a downstream.py U-Net of seg_steps steps on the toy's real training images)."""
    import json
    import time
    import downstream as ds
    torch.set_num_threads(1)
    os.makedirs(os.path.join(root, "bert"))
    res, clock = {"cpu_s": {}}, [time.process_time()]

    def lap(name):                                                 # CPU seconds since the last lap
        now = time.process_time()
        res["cpu_s"][name] = now - clock[0]
        clock[0] = now
    bert = make_bert(os.path.join(root, "bert"))
    lap("bert")
    toy = os.path.join(root, "toy2")
    toy_cond.make_toy2(toy, n=256, size=32, seed=0)                    # as the toy2_dir fixture
    lap("toy2")
    data = toy_data(toy, bert, os.path.join(root, "data"))
    lap("text")
    dit = train_backbone(data, os.path.join(root, "dit"))
    lap("backbone")
    run = train_adapter(data, dit, os.path.join(root, "cn"))
    lap("adapter")
    masks = write_masks(os.path.join(root, "masks"))
    out = os.path.join(root, "fake")
    res["follow"] = follow_rates(out, cn.main(sample_args(run, masks, bert, out)))
    lap("sample")
    out = os.path.join(root, "fake100")
    res["follow_ddim100"] = follow_rates(out, cn.main(sample_args(run, masks, bert, out, steps=100)))
    res["floor"] = floor_rates(run, masks, bert, os.path.join(root, "floor"))
    res["probe"] = probe(data, run)
    res["budget"] = []
    for b, a in ((100, 10), (100, 25), (100, 50), (25, 100), (50, 100)):
        bb = dit if b == STEPS else train_backbone(data, os.path.join(root, f"dit{b}"), b)
        r = train_adapter(data, bb, os.path.join(root, f"cn{b}_{a}"), a)
        out = os.path.join(root, f"fake{b}_{a}")
        res["budget"].append({"backbone": b, "adapter": a, "follow": follow_rates(out, cn.main(
            sample_args(r, masks, bert, out)))})
    seg = os.path.join(root, "seg")
    ds.main(["segment", "--train", f"real={data}:train", "--mask", "Heart", "--width", "8", "--batch-size", "16",
             "--max-steps", str(seg_steps), "--eval-every", str(seg_steps), "--lr", "5e-3", "--out", seg])
    long_run = train_adapter(data, train_backbone(data, os.path.join(root, "dit_long"), long_steps),
                             os.path.join(root, "cn_long"), long_steps)
    res["evaluate"] = {}
    for name, r in (("test_budget", run), ("long", long_run)):
        ev = cn.main(["evaluate", "--ckpt", r, "--seg-ckpt", os.path.join(seg, "real", "run0"), "--data", data,
                      "--n-per-cond", "1", "--cfg", "4", "--steps", "25", "--fid-features", "none",
                      "--text-encoder", bert, "--out", os.path.join(root, f"eval_{name}")])
        res["evaluate"][name] = {"generated": ev["generated"], "real": ev["real"]}
    out = os.path.join(root, "fake_long")
    res["follow_long"] = follow_rates(out, cn.main(sample_args(long_run, masks, bert, out)))
    print(json.dumps(res, indent=1))
    with open(os.path.join(root, "measure.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


# Issue 25 item 1, measured: controlnet.py's "no C" is the frozen backbone (arm A, the shipped design) against
# condition dropout to a LEARNED null condition map fed through the adapter (arm B, built here and not shipped).


class NullCondDiT(cn.ControlDiT):
    """Arm B: where keep is False the sample's condition map is replaced by the adapter's learned null map
    (adapter.null_cond, [K C, H, W], the shape of an encoded condition) and goes through the adapter like any map;
    the residuals are never zeroed. So guided_eps's third branch (keep False, --cfg-cond) is e(text, null C)."""

    def forward(self, x, t, text, lengths, drop=None, cond=None, keep=None):
        if cond is not None and keep is not None:
            null = self.adapter.null_cond.to(cond.dtype).expand_as(cond)
            cond = torch.where(keep.view(-1, 1, 1, 1), cond, null)
        return super().forward(x, t, text, lengths, drop, cond, None)


@contextlib.contextmanager
def learned_null(p_drop=0.1, seed=0):
    """controlnet.py with arm B patched in for the runs inside: build_model adds adapter.null_cond (zeros: our
    choice, halfway between an empty map, -1, and a full one, +1; it is a parameter of the adapter, so AdamW, the
    EMA, the checkpoint and load_model carry it), and the training loss drops each sample's condition with
    probability p_drop (0.1, the flag issue 25 removed; a generator of its own, seeded per run, so both the
    caption draws of draw_step and the adapter's initial weights stay the same as arm A's)."""
    build, loss = cn.build_model, cn.diffusion_loss
    g = torch.Generator().manual_seed(seed)

    def build_b(dcfg, cond_channels, n_blocks, base_state=None, where=""):
        m = build(dcfg, cond_channels, n_blocks, base_state, where)
        m = NullCondDiT(m.base, adapter=m.adapter)
        m.adapter.null_cond = torch.nn.Parameter(torch.zeros(cond_channels, dcfg.image_size, dcfg.image_size))
        return m

    def loss_b(model, sched, x0, eps, t, text, lengths, drop, cond, keep, pred="eps"):
        if keep is None and torch.is_grad_enabled():               # training (sampling runs under no_grad)
            keep = (torch.rand(len(x0), generator=g) >= p_drop).to(x0.device)
        return loss(model, sched, x0, eps, t, text, lengths, drop, cond, keep, pred)
    cn.build_model, cn.diffusion_loss = build_b, loss_b
    try:
        yield
    finally:
        cn.build_model, cn.diffusion_loss = build, loss


def measure_null(root, backbone_steps=1000, budgets=(100, 300, 1000), seeds=(0, 1), seg_steps=150, arms="AB"):
    """Arms A and B on one backbone (backbone_steps; 1000 is where the test budget's noisy samples are gone:
    RESULTS.md), the same data, adapter seed, steps and sampler: at each adapter budget, follow rates (16 samples
    a class) and evaluate's Dice on the 29 test conditions, with --cfg 4 and with --cfg 4 --cfg-cond 2. (arms="A",
    budgets=(90, 270, 900): arm A given arm B's number of conditioned samples, RESULTS.md's control row.)"""
    import json
    import time
    import downstream as ds
    torch.set_num_threads(1)
    os.makedirs(os.path.join(root, "bert"))
    t0 = time.process_time()
    bert = make_bert(os.path.join(root, "bert"))
    toy = os.path.join(root, "toy2")
    toy_cond.make_toy2(toy, n=256, size=32, seed=0)                    # as the toy2_dir fixture
    data = toy_data(toy, bert, os.path.join(root, "data"))
    dit = train_backbone(data, os.path.join(root, "dit"), backbone_steps)
    seg = os.path.join(root, "seg")
    ds.main(["segment", "--train", f"real={data}:train", "--mask", "Heart", "--width", "8", "--batch-size", "16",
             "--max-steps", str(seg_steps), "--eval-every", str(seg_steps), "--lr", "5e-3", "--out", seg])
    masks = write_masks(os.path.join(root, "masks"))
    res = {"backbone_steps": backbone_steps, "rows": [], "cpu_s_setup": time.process_time() - t0}
    for seed in seeds:
        for steps in budgets:
            for arm in arms:
                t1, name = time.process_time(), f"{arm}_{steps}_s{seed}"
                with learned_null(seed=seed) if arm == "B" else contextlib.nullcontext():
                    run = train_adapter(data, dit, os.path.join(root, f"cn_{name}"), steps, ["--seed", str(seed)])
                    row = {"arm": arm, "adapter_steps": steps, "seed": seed}
                    for tag, extra in (("cfg4", []), ("cfg4_c2", ["--cfg-cond", "2"])):
                        out = os.path.join(root, f"fake_{name}_{tag}")
                        row[f"follow_{tag}"] = follow_rates(out, cn.main(sample_args(run, masks, bert, out,
                                                                                     extra=extra)))
                        ev = cn.main(["evaluate", "--ckpt", run, "--seg-ckpt", os.path.join(seg, "real", "run0"),
                                      "--data", data, "--n-per-cond", "1", "--cfg", "4", "--steps", "25",
                                      "--fid-features", "none", "--text-encoder", bert,
                                      "--out", os.path.join(root, f"eval_{name}_{tag}"), *extra])
                        row[f"dice_{tag}"] = ev["generated"]["dice"]
                        res["real_dice"] = ev["real"]["dice"]
                    if arm == "B":                                 # how far the learned null moved from 0
                        _, _, m = cn.load_model(run, "cpu")
                        nc = m.adapter.null_cond
                        row["null_mean_sd"] = [float(nc.mean()), float(nc.std())]
                row["cpu_s"] = time.process_time() - t1
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
    res["cpu_s_total"] = time.process_time() - t0
    print(json.dumps(res, indent=1))
    with open(os.path.join(root, "measure_null.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":  # PYTHONPATH=. python tests/test_cond_controlnet.py OUT [null] (OUT: a new folder)
    import sys
    if sys.argv[2:] == ["null"]:
        measure_null(sys.argv[1])
    else:
        measure(sys.argv[1])

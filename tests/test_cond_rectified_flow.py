"""rectified_flow.py on the 2-class toy of tests/toy_cond.py (issue 28, item 3): does RadiT obey its condition?

The toy's class sets Cardiomegaly, No Finding and sex together (class 1: Cardiomegaly=1, No Finding=0, M, disk in
the left half; class 0: the opposite, disk in the right half); every other variable is constant. A model that
ignores its condition draws the same class mixture under both conditions, so "> 90 % of each class's samples
follow the condition" cannot pass without the condition reaching the velocity field.

Run as a script, this file is the conditioning probe of RESULTS.md on a trained checkpoint and a phantom dataset
(true counterfactual images from prep_data.py as the reference):
    python tests/test_cond_rectified_flow.py --ckpt R --data P [--n 64] [--vars "Support Devices,sex"]
"""
import argparse
import csv
import os
import sys

import numpy as np
import torch
from PIL import Image

import rectified_flow as rf
import toy_cond

# A reduced tiny RadiT (the SMALL of tests/test_rectified_flow.py) at patch 4 (8 x 8 tokens on 32 px; patch 8's
# 4 x 4 tokens had not learned the disk's side after 300 steps) and lr 4e-3: 200 steps follow the condition in
# 100 % of samples for seeds 0, 1 and 2, where 150 steps gave 84 % / 56 % for seed 1 (measured; RESULTS.md).
TOY = ["--hidden", "64", "--depth", "2", "--heads", "2", "--patch", "4", "--batch-size", "8", "--lr", "4e-3",
       "--ema", "0.9", "--max-steps", "200", "--log-every", "200", "--sample-every", "0"]


def rms(v):
    return float(v.double().pow(2).mean().sqrt())


def sample_classes(run, data, out, scale, n=64):
    """`sample` conditioned on the toy's own meta.csv rows (alternating classes) -> (requested, drawn) classes."""
    rf.main(["sample", "--ckpt", run, "--cond", os.path.join(data, "meta.csv"), "--n", str(n), "--solver", "euler",
             "--steps", "16", "--cfg", str(scale), "--batch-size", str(n), "--out", out])
    with open(os.path.join(out, "meta.csv"), newline="") as f:
        want = np.array([int(r["Cardiomegaly"] == "1") for r in csv.DictReader(f)])
    images = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:06d}.png"))) for i in range(n)])
    return want, toy_cond.toy_class(images.astype(np.float64))


def test_radit_samples_follow_the_condition_on_the_toy(tmp_path, toy2_dir):
    run = str(tmp_path / "run")
    rf.main(["--data", toy2_dir, "--out", run, *TOY])
    # Guidance: radit samples without it (App. C.3 / C.4 name none: scale 1, the paper's); 4 is the scale issue 28's
    # user tried. Both must follow the condition.
    for scale in (1, 4):
        want, got = sample_classes(run, toy2_dir, str(tmp_path / f"cfg{scale}"), scale)
        assert set(want) == {0, 1}
        for cls in (0, 1):
            follow = (got[want == cls] == cls).mean()
            assert follow > 0.9, (scale, cls, follow)
    # The probe against its closed form at t = 1 (rf.condition_gap): class 1 vs class 0 should move v by
    # E[x0 | class 0] - E[x0 | class 1], the difference of the training images' class means (float64).
    _, model, *_ = rf.load_for_inference(rf.parse_infer("sample", ["--ckpt", run]))
    data = rf.CXRData(toy2_dir, "pixel")
    x0 = data.load(range(len(data))).double()
    cls1 = data.cond[:, rf.VARIABLES.index("Cardiomegaly")] == 2                 # code 2 = "1"
    ref = (x0[~cls1].mean(0) - x0[cls1].mean(0)).float()
    c1 = data.cond[cls1][:1].expand(32, 19)
    c0 = data.cond[~cls1][:1].expand(32, 19)
    eps = torch.randn(32, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    gap = rf.condition_gap(model, x0[:32].float(), eps, 1.0, c1, c0).mean(0)
    cosine = float((gap * ref).sum() / (gap.norm() * ref.norm()))
    assert cosine > 0.9 and 0.7 < rms(gap) / rms(ref) < 1.3, (cosine, rms(gap), rms(ref))

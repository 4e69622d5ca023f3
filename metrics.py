"""metrics.py: fidelity, diversity, per-condition and privacy metrics for synthetic chest radiographs.

One file, usable alone or imported by the training scripts for in-loop evaluation:

    from metrics import frechet_distance, kid, prdc, extract_features, ms_ssim, ssim, psnr

What it computes (papers in ../shared/papers):
- Frechet distance (FID with Inception-v3, FD_x in other feature spaces), float64, ddof=1 covariances
  (chexgenbench §2.2, radit App. C.1 Eq. 12, multicond §3.3 FID / FID_XRV, roentgen Table 2);
- KID / KD_x: unbiased MMD^2 with the cubic polynomial kernel (radit App. C.1, chexgenbench Table 7);
- precision, recall, density, coverage (Naeem et al. 2020; chexgenbench §2.2, multicond App. A.3);
- diversity: mean pairwise MS-SSIM among images generated for one condition (chexgen, roentgen §5: window 11,
  sigma 1.5); paired SSIM / PSNR for reconstructions and edits (radit App. C.1);
- every distribution metric per pathology and for Finding / No Finding (chexgenbench §2.2, multicond Table 2);
- memorisation / privacy: nearest training image over the whole training set by pixel L2 and by feature
  distance, and an optional Siamese re-identification score (chexgenbench §2.3, Packhaeuser et al. 2022);
- factual correctness: Pearson correlation of a classifier's predictions on paired real / synthetic images (chexgen).

Commands:
    python metrics.py --real data/phantom --split test --fake samples/ --out results.json
    python metrics.py --real real/ --fake fake/ --features inception,xrv --metrics fd,kid,prdc
    python metrics.py --real data/phantom --fake samples/ --train data/phantom --out r.json   # + privacy
    python metrics.py convert-xrv ~/.torchxrayvision/models_data/<file>.pt --dst xrv.safetensors
    python metrics.py bench --n 10000 --dim 2048      # CPU: FD vs scipy.linalg.sqrtm, PRDC vs full matrices
Offline, an extractor whose weights are not found is skipped with a message naming the file and --weights-dir;
--allow-random-weights runs it anyway and labels every number it gives "random weights, not comparable".
"""
import argparse
import csv
import dataclasses
import hashlib
import json
import os
import pickle
import platform
import socket
import sys
import time
import urllib.request
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file as load_np, save_file as save_np
from safetensors.torch import load_file as load_pt, save_file as save_pt

VERSION = "1.0"
PREP_VERSION = "1"  # bump when preprocessing changes: it is part of the feature-cache key
LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]  # DESIGN.md §4, CheXpert names
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ALL_METRICS = ("fd", "kid", "prdc", "diversity", "paired", "conditions", "privacy", "factual")

# ----------------------------------------------------------------------------------------------------------------
# Config: one dataclass; the CLI is generated from its fields


@dataclass
class Config:
    """Every option of an evaluation run (CLI flags are these fields with dashes)."""
    real: str = "data/phantom"  # folder of images, or a DESIGN.md §4 dataset folder (meta.csv + shards/)
    fake: str = ""  # folder of synthetic images (optionally with meta.csv), or a dataset folder
    train: str = ""  # training set for memorisation / privacy search (folder or dataset folder)
    split: str = "test"  # rows of the real dataset's meta.csv to use (ignored for plain folders; '' = all)
    fake_split: str = ""  # rows of the fake dataset's meta.csv ('' = all)
    train_split: str = "train"  # rows of the train dataset's meta.csv ('' = all)
    features: str = "inception,xrv,raddino,dinov2,clip"  # feature spaces; also any transformers model id / path
    metrics: str = "all"  # comma list of: fd,kid,prdc,diversity,paired,conditions,privacy,factual
    weights_dir: str = ""  # folder searched first for weights (files or transformers model folders)
    allow_random_weights: bool = False  # run extractors whose weights are missing (numbers not comparable)
    offline: bool = False  # never try to download weights (also implied by HF_HUB_OFFLINE=1)
    chexgenbench_compat: bool = False  # squash every image to 299x299 first, as CheXGenBench's code does
    fit: str = "crop"  # crop | pad: how a non-square image becomes square (aspect ratio is never squashed)
    pixel_size: int = 256  # side for pixel-space metrics (SSIM, PSNR, MS-SSIM)
    privacy_size: int = 128  # side for the pixel nearest-neighbour search
    batch_size: int = 64  # images per extractor forward
    workers: int = 4  # image decoding threads
    device: str = "auto"  # auto | cpu | cuda
    k: int = 5  # PRDC nearest neighbours (Naeem et al. 2020 default)
    kid_subsets: int = 100  # KID random subsets (Binkowski et al. 2018)
    kid_subset_size: int = 1000  # KID subset size; min(this, N) is used and reported
    seed: int = 0  # KID subsets and MS-SSIM pair sampling
    group_by: str = "auto"  # fake meta.csv column grouping images of one prompt/condition for MS-SSIM diversity
    max_pairs: int = 50  # MS-SSIM pairs sampled per group at most
    pix_threshold: float = 0.02  # per-pixel RMS distance under which a synthetic image counts as a near-copy
    feat_threshold: float = 0.1  # distance between unit-normalised features under which it counts as a copy
    privacy_features: str = ""  # feature space for the latent distance ('' = raddino if run, else the first one)
    reid_weights: str = ""  # Packhaeuser Siamese ResNet-50 weights (safetensors) for the re-identification score
    reid_threshold: float = 0.5  # re-id probability above which a synthetic image counts as re-identified
    classifier: str = ""  # 'xrv' or an xrv-layout DenseNet safetensors, for factual correctness (Pearson)
    grid: str = ""  # PNG of the closest (synthetic, training) pairs ('' = next to --out)
    grid_pairs: int = 8  # closest pairs listed in results.json and drawn in the grid
    out: str = ""  # results.json path
    cache_dir: str = ""  # feature cache ('' = ~/.cache/cxr-gen/metrics)
    no_cache: bool = False  # neither read nor write the feature cache
    strict: bool = False  # an unreadable image is fatal instead of skipped and counted


def build_parser(cls=Config, **kw):
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=comments.get(f.name, ""))
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            p.add_argument(flag, type=typ, default=f.default, help=comments.get(f.name, " "))
    return p


def _field_comments(cls):
    """Help strings are the trailing comments of the dataclass fields (one source of truth)."""
    try:
        with open(__file__, encoding="utf-8") as fh:
            src = fh.read().split(f"class {cls.__name__}", 1)[1].split("\n\n\n", 1)[0].splitlines()
    except (OSError, IndexError):
        return {}
    return {ln.split(":", 1)[0].strip(): ln.split("#", 1)[1].strip().replace("%", "%%") for ln in src
            if ":" in ln and "#" in ln and not ln.strip().startswith(("#", '"'))}


# ----------------------------------------------------------------------------------------------------------------
# Model: the networks transformers lacks, with the parameter names of their published checkpoints


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm(eps=1e-3) + ReLU, named conv/bn as in torchvision and pytorch-fid."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TF's average pool ignores the zero padding (count_include_pad=False): the FID graph's behaviour.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Block(nn.Module):
    """An Inception block's named BasicConv2d branches, built from (name, cin, cout, kernel, padding, stride) rows."""

    def __init__(self, spec):
        super().__init__()
        for name, cin, cout, k, pad, stride in spec:
            self.add_module(name, BasicConv2d(cin, cout, kernel_size=k, padding=pad, stride=stride))

    def seq(self, x, *names):
        for n in names:
            x = getattr(self, n)(x)
        return x


class FIDInceptionA(_Block):
    """Inception-A block of the TF FID graph (Mixed_5b/c/d)."""

    def __init__(self, cin, pool_features):
        super().__init__([("branch1x1", cin, 64, 1, 0, 1), ("branch5x5_1", cin, 48, 1, 0, 1),
                          ("branch5x5_2", 48, 64, 5, 2, 1), ("branch3x3dbl_1", cin, 64, 1, 0, 1),
                          ("branch3x3dbl_2", 64, 96, 3, 1, 1), ("branch3x3dbl_3", 96, 96, 3, 1, 1),
                          ("branch_pool", cin, pool_features, 1, 0, 1)])

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.seq(x, "branch5x5_1", "branch5x5_2"),
                          self.seq(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(_Block):
    """Grid-reduction block Mixed_6a."""

    def __init__(self, cin):
        super().__init__([("branch3x3", cin, 384, 3, 0, 2), ("branch3x3dbl_1", cin, 64, 1, 0, 1),
                          ("branch3x3dbl_2", 64, 96, 3, 1, 1), ("branch3x3dbl_3", 96, 96, 3, 0, 2)])

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.seq(x, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
                          F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(_Block):
    """Inception-C block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, cin, c7):
        h, v = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the 1x7 and 7x1 factors
        super().__init__([("branch1x1", cin, 192, 1, 0, 1), ("branch7x7_1", cin, c7, 1, 0, 1),
                          ("branch7x7_2", c7, c7, *h, 1), ("branch7x7_3", c7, 192, *v, 1),
                          ("branch7x7dbl_1", cin, c7, 1, 0, 1), ("branch7x7dbl_2", c7, c7, *v, 1),
                          ("branch7x7dbl_3", c7, c7, *h, 1), ("branch7x7dbl_4", c7, c7, *v, 1),
                          ("branch7x7dbl_5", c7, 192, *h, 1), ("branch_pool", cin, 192, 1, 0, 1)])

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.seq(x, *(f"branch7x7_{i}" for i in (1, 2, 3))),
                          self.seq(x, *(f"branch7x7dbl_{i}" for i in range(1, 6))),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(_Block):
    """Grid-reduction block Mixed_7a."""

    def __init__(self, cin):
        super().__init__([("branch3x3_1", cin, 192, 1, 0, 1), ("branch3x3_2", 192, 320, 3, 0, 2),
                          ("branch7x7x3_1", cin, 192, 1, 0, 1), ("branch7x7x3_2", 192, 192, (1, 7), (0, 3), 1),
                          ("branch7x7x3_3", 192, 192, (7, 1), (3, 0), 1), ("branch7x7x3_4", 192, 192, 3, 0, 2)])

    def forward(self, x):
        return torch.cat([self.seq(x, "branch3x3_1", "branch3x3_2"),
                          self.seq(x, *(f"branch7x7x3_{i}" for i in range(1, 5))), F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(_Block):
    """Inception-E block; the FID graph's second one (Mixed_7c, 'E_2') pools with max instead of average."""

    def __init__(self, cin, max_pool=False):
        h, v = ((1, 3), (0, 1)), ((3, 1), (1, 0))
        super().__init__([("branch1x1", cin, 320, 1, 0, 1), ("branch3x3_1", cin, 384, 1, 0, 1),
                          ("branch3x3_2a", 384, 384, *h, 1), ("branch3x3_2b", 384, 384, *v, 1),
                          ("branch3x3dbl_1", cin, 448, 1, 0, 1), ("branch3x3dbl_2", 448, 384, 3, 1, 1),
                          ("branch3x3dbl_3a", 384, 384, *h, 1), ("branch3x3dbl_3b", 384, 384, *v, 1),
                          ("branch_pool", cin, 192, 1, 0, 1)])
        self.max_pool = max_pool

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.seq(x, "branch3x3dbl_1", "branch3x3dbl_2")
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(bd),
                          self.branch3x3dbl_3b(bd), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """TF 2015-12-05 Inception-v3 of FID (Heusel et al. 2017), names of pytorch-fid's pt_inception checkpoint."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 TF classes; unused for FID, present in the checkpoint

    def forward(self, x):
        """x: [B, 3, 299, 299] in [-1, 1] -> [B, 2048] pool3 features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean((2, 3))


class _DenseLayer(nn.Sequential):
    """DenseNet-BC layer: BN-ReLU-conv1x1-BN-ReLU-conv3x3, output concatenated to the input."""

    def __init__(self, cin, growth=32, bn_size=4):
        super().__init__(OrderedDict([
            ("norm1", nn.BatchNorm2d(cin)), ("relu1", nn.ReLU()),
            ("conv1", nn.Conv2d(cin, bn_size * growth, 1, bias=False)),
            ("norm2", nn.BatchNorm2d(bn_size * growth)), ("relu2", nn.ReLU()),
            ("conv2", nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False))]))

    def forward(self, x):
        return torch.cat([x, super().forward(x)], 1)


class XRVDenseNet(nn.Module):
    """torchxrayvision DenseNet-121 (densenet121-res224-all): 1 channel, 224 px, input range [-1024, 1024]."""
    PATHOLOGIES = ["Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
                   "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
                   "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]  # xrv default_pathologies

    def __init__(self, num_classes=18, blocks=(6, 12, 24, 16)):
        super().__init__()
        layers = [("conv0", nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)), ("norm0", nn.BatchNorm2d(64)),
                  ("relu0", nn.ReLU()), ("pool0", nn.MaxPool2d(3, stride=2, padding=1))]
        c = 64
        for i, n in enumerate(blocks):
            block = nn.Sequential(OrderedDict((f"denselayer{j + 1}", _DenseLayer(c + j * 32)) for j in range(n)))
            layers.append((f"denseblock{i + 1}", block))
            c += n * 32
            if i < len(blocks) - 1:
                layers.append((f"transition{i + 1}", nn.Sequential(OrderedDict([
                    ("norm", nn.BatchNorm2d(c)), ("relu", nn.ReLU()), ("conv", nn.Conv2d(c, c // 2, 1, bias=False)),
                    ("pool", nn.AvgPool2d(2, stride=2))]))))
                c //= 2
        layers.append(("norm5", nn.BatchNorm2d(c)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Linear(c, num_classes)

    def embed(self, x):
        """x: [B, 1, 224, 224] in [-1024, 1024] -> [B, 1024] (ReLU + global average pool, xrv `features2`)."""
        return F.relu(self.features(x)).mean((2, 3))

    def forward(self, x):
        return self.classifier(self.embed(x))  # logits; xrv applies sigmoid (+ op_norm calibration, not used here)


class _Bottleneck(nn.Module):
    """torchvision ResNet-50 v1.5 bottleneck (stride on the 3x3 conv)."""

    def __init__(self, cin, width, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
        self.downsample = None
        if stride != 1 or cin != width * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """torchvision ResNet-50 layout (conv1, bn1, layer1..4, fc)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        cin = 64
        for i, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(_Bottleneck(cin, width, stride=2 if (j == 0 and i > 0) else 1))
                cin = width * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class SiameseReID(nn.Module):
    """Packhaeuser et al. 2022 patient-verification Siamese net: ResNet-50 -> 128 sigmoid, |e1-e2| -> fc_end."""

    def __init__(self):
        super().__init__()
        self.model = ResNet50(num_classes=128)
        self.fc_end = nn.Linear(128, 1)

    def embed(self, x):
        return torch.sigmoid(self.model(x))

    def score(self, e1, e2):
        """Probability that two embedded images show the same patient (chexgenbench §2.3: s_reid after a sigmoid)."""
        return torch.sigmoid(self.fc_end((e1 - e2).abs())).squeeze(-1)

    def forward(self, x1, x2):
        return self.score(self.embed(x1), self.embed(x2))


# ----------------------------------------------------------------------------------------------------------------
# The method: Frechet distance, KID, PRDC, SSIM / MS-SSIM / PSNR, nearest neighbours, Pearson


def feature_stats(x):
    """Mean and covariance (ddof=1, float64) of features [N, D]."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be [N>=2, D], got shape {x.shape}")
    mu, xc = x.mean(0), x - x.mean(0)
    return mu, (xc.T @ xc) / (len(x) - 1)


def _trace_sqrt_product(s1, s2):
    """tr sqrt(S1 S2) and the size of its imaginary part, from symmetric eigenvalue problems only.

    With S1 = L L^T, L^T S2 L is similar to S1 S2 and symmetric PSD, so tr sqrt(S1 S2) = sum sqrt(eig(L^T S2 L)):
    one Cholesky and one eigvalsh instead of scipy.linalg.sqrtm's complex Schur form (5-15x faster at d=2048).
    """
    try:
        lo = np.linalg.cholesky(s1)
    except np.linalg.LinAlgError:  # singular S1 (N <= D): symmetric square root via eigh, negative round-off clipped
        w, v = np.linalg.eigh(s1)
        lo = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = lo.T @ s2 @ lo
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    if not np.all(np.isfinite(ev)):
        return float("nan"), float("inf")
    return float(np.sqrt(np.clip(ev, 0, None)).sum()), float(np.sqrt(np.clip(-ev, 0, None)).sum())


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1-mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64 (Heusel et al. 2017; radit App. C.1 Eq. 12)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    tr, imag = _trace_sqrt_product(s1, s2)
    if not np.isfinite(tr) or imag > 1e-3 * max(tr, 1.0):
        # pytorch-fid's fallback for a near-singular product: add eps to the diagonals and retry
        warnings.warn(f"Frechet distance: singular product (imaginary part {imag:.3g}); adding {eps} to the diagonals")
        off = np.eye(len(s1)) * eps
        tr, imag = _trace_sqrt_product(s1 + off, s2 + off)
        if not np.isfinite(tr) or imag > 1e-3 * max(tr, 1.0):
            raise ValueError(f"Frechet distance: imaginary component {imag:.3g} in the matrix square root")
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2.0 * tr)


def frechet_distance(x, y, eps=1e-6):
    """Frechet distance between two feature sets [N, D] (FID when the features are Inception pool3)."""
    x, y = np.asarray(x), np.asarray(y)
    if min(len(x), len(y)) < x.shape[1]:
        warnings.warn(f"Frechet distance with N={min(len(x), len(y))} < feature dim {x.shape[1]}: the covariance is "
                      "rank-deficient and the value is biased upwards; compare only at equal N")
    return frechet_distance_from_stats(*feature_stats(x), *feature_stats(y), eps=eps)


def _as_tensor(x, device=None):
    t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    t = t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if device is None else t.to(device)


def kid(x, y, subsets=100, subset_size=1000, seed=0, device=None):
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2, kernel (x.y/d + 1)^3, mean and std over
    `subsets` random subsets of min(subset_size, N) drawn without replacement (seeded). Matrix products run in the
    input's precision on `device`; kernel sums in float64."""
    x, y = _as_tensor(x, device), _as_tensor(y, device)
    n1, n2, d = len(x), len(y), x.shape[1]
    m = min(subset_size, n1, n2)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {n1} and {n2}")
    rng = np.random.default_rng(seed)
    z = torch.cat([x, y]) if n1 + n2 <= 4096 else None  # small sets: one Gram matrix, subsets index into it
    gram = None if z is None else ((z @ z.T).double() / d + 1) ** 3
    vals = []
    for _ in range(subsets):
        ix = torch.as_tensor(rng.choice(n1, m, replace=False), device=x.device)
        iy = torch.as_tensor(rng.choice(n2, m, replace=False), device=x.device)
        if gram is not None:
            kxx, kyy, kxy = gram[ix][:, ix], gram[n1 + iy][:, n1 + iy], gram[ix][:, n1 + iy]
        else:
            a, b = x[ix], y[iy]
            kxx, kyy, kxy = [((p @ q.T).double() / d + 1) ** 3 for p, q in ((a, a), (b, b), (a, b))]
        mmd = ((kxx.sum() - kxx.diagonal().sum()) + (kyy.sum() - kyy.diagonal().sum())) / (m * (m - 1))
        vals.append(float(mmd - 2 * kxy.mean()))
    return float(np.mean(vals)), float(np.std(vals))


def _sqdist(a, b, bb=None):
    """Squared Euclidean distances [len(a), len(b)] as |a|^2 + |b|^2 - 2 a.b (one fused GEMM), clamped at 0."""
    bb = (b * b).sum(1) if bb is None else bb
    return torch.addmm((a * a).sum(1)[:, None] + bb[None, :], a, b.T, alpha=-2).clamp_min_(0)


def knn_radii(x, k=5, mem_mb=256):
    """Squared distance of every row of x to its k-th nearest other row (itself excluded by index, so duplicates
    count as neighbours at distance 0). Each square block of the symmetric distance matrix is computed once and
    serves its row and its column chunk (about 40% fewer matrix products); memory stays bounded by mem_mb."""
    n, xx, inf = len(x), (x * x).sum(1), float("inf")
    step = max(1, min(int((mem_mb * 2 ** 20 / (x.element_size() * 3)) ** 0.5), max(1024, -(-n // 4))))
    best = torch.full((n, k), inf, dtype=x.dtype, device=x.device)
    for s in range(0, n, step):
        for t in range(s, n, step):
            d = _sqdist(x[s:s + step], x[t:t + step], xx[t:t + step])
            if s == t:
                d.fill_diagonal_(inf)
            for a, blk in ((s, d),) + (((t, d.T.contiguous()),) if t != s else ()):
                top = torch.cat([best[a:a + step], blk.topk(min(k, blk.shape[1]), 1, largest=False).values], 1)
                best[a:a + step] = top.topk(k, 1, largest=False).values
    return best[:, -1]


def prdc(real, fake, k=5, device=None, mem_mb=256):
    """Precision, recall, density, coverage (Naeem et al. 2020): k-NN balls with strict '<', real radii for
    precision / density / coverage, fake radii for recall. Chunked over real rows; runs on `device`."""
    real, fake = _as_tensor(real, device), _as_tensor(fake, device)
    fake = fake.to(real.dtype)
    n, m = len(real), len(fake)
    if n < k + 1 or m < k + 1:
        raise ValueError(f"PRDC with k={k} needs at least {k + 1} images per set, got {n} real and {m} fake")
    center = real.mean(0, keepdim=True)  # distances are shift-invariant; centring reduces cancellation
    real, fake = real - center, fake - center
    r_real, r_fake = knn_radii(real, k, mem_mb), knn_radii(fake, k, mem_mb)
    balls_per_fake = torch.zeros(m, dtype=torch.float64, device=real.device)
    covered = torch.zeros(n, dtype=torch.bool, device=real.device)
    recalled = torch.zeros(n, dtype=torch.bool, device=real.device)
    step, ff = max(1, int(mem_mb * 2 ** 20 // (m * real.element_size() * 3))), (fake * fake).sum(1)
    for s in range(0, n, step):
        d = _sqdist(real[s:s + step], fake, ff)
        inside = d < r_real[s:s + step, None]
        balls_per_fake += inside.sum(0)
        covered[s:s + step] = inside.any(1)
        recalled[s:s + step] = (d < r_fake[None, :]).any(1)
    return {"precision": float((balls_per_fake > 0).double().mean()), "recall": float(recalled.double().mean()),
            "density": float(balls_per_fake.sum() / (k * m)), "coverage": float(covered.double().mean())}


def _gauss_1d(size=11, sigma=1.5, dtype=torch.float32, device=None):
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _as_images(x):
    x = _as_tensor(x)
    return x.reshape(1, 1, *x.shape) if x.ndim == 2 else (x[None] if x.ndim == 3 else x)


def _ssim_cs(x, y, data_range, win=11, sigma=1.5):
    """Per-image SSIM and contrast-structure terms (Wang et al. 2004: Gaussian 11 / 1.5, K1=0.01, K2=0.03),
    'valid' filtering as in the reference MS-SSIM code."""
    c = x.shape[1]
    g = _gauss_1d(win, sigma, x.dtype, x.device)
    wh, ww = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def filt(t):
        return F.conv2d(F.conv2d(t, wh, groups=c), ww, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (lum * cs).mean((1, 2, 3)), cs.mean((1, 2, 3))


def ssim(x, y, data_range=1.0):
    """SSIM per image; x, y: [H, W], [C, H, W] or [N, C, H, W]; data_range explicit (1 for [0,1], 65535 uint16)."""
    x, y = _as_images(x), _as_images(y).to(_as_images(x).dtype)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11 px, got {tuple(x.shape[-2:])}")
    s, _ = _ssim_cs(x, y, data_range)
    return s if len(s) > 1 else s[0]


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003


def ms_ssim_scales(side):
    """Scales that fit: each (halved, rounded up) must keep >= 11 px for the 11-tap window: 5 need > 160 px."""
    n = 0
    while n < 5 and side >= 11:
        n, side = n + 1, (side + 1) // 2
    return n


def ms_ssim(x, y, data_range=1.0, scales=None):
    """Multi-scale SSIM per image (Wang et al. 2003), standard weights; below 161 px fewer scales are used, their
    weights renormalised to sum to 1 (returned value is then not comparable with 5-scale numbers, and stated)."""
    x, y = _as_images(x), _as_images(y).to(_as_images(x).dtype)
    n = scales or ms_ssim_scales(min(x.shape[-2:]))
    if n < 1:
        raise ValueError(f"MS-SSIM needs images of at least 11 px, got {tuple(x.shape[-2:])}")
    w = torch.tensor(MS_SSIM_WEIGHTS[:n], dtype=torch.float64)
    w = w / w.sum() if n < 5 else w  # the 5 standard weights are used as published (they sum to 1.0001)
    vals = []
    for i in range(n):
        s, cs = _ssim_cs(x, y, data_range)
        vals.append(torch.relu(cs if i < n - 1 else s).double())  # relu: negative cs has no real fractional power
        if i < n - 1:
            pad = (0, x.shape[-1] % 2, 0, x.shape[-2] % 2)
            x, y = F.avg_pool2d(F.pad(x, pad, mode="replicate"), 2), F.avg_pool2d(F.pad(y, pad, mode="replicate"), 2)
    out = torch.prod(torch.stack(vals, 0) ** w[:, None].to(x.device), 0)
    return out if len(out) > 1 else out[0]


def psnr(x, y, data_range=1.0):
    """PSNR in dB per image, 10 log10(range^2 / MSE); identical images give inf."""
    out = 10 * torch.log10(data_range ** 2 / ((_as_images(x).double() - _as_images(y).double()) ** 2).mean((1, 2, 3)))
    return out if len(out) > 1 else out[0]


def nearest_neighbours(queries, bank_batches, device=None):
    """For each query row, the Euclidean distance to and index of its nearest row over an iterable of bank
    batches (streamed, so the bank never needs to fit in memory). Distances of the winners are recomputed exactly
    in float64, so a near-copy's reported distance carries no cancellation error."""
    q = _as_tensor(queries, device)
    best = torch.full((len(q),), float("inf"), dtype=q.dtype, device=q.device)
    arg, win, offset = torch.full((len(q),), -1, dtype=torch.long, device=q.device), torch.zeros_like(q), 0
    for b in bank_batches:
        b = _as_tensor(b, q.device).to(q.dtype)
        d, j = _sqdist(q, b).min(1)
        better = d < best
        best, arg = torch.where(better, d, best), torch.where(better, j + offset, arg)
        win[better] = b[j[better]]  # the current winner rows, for the exact recomputation
        offset += len(b)
    if offset == 0:
        raise ValueError("nearest_neighbours: the bank is empty")
    return (q.double() - win.double()).norm(dim=1).cpu().numpy(), arg.cpu().numpy()


def pearson(a, b):
    """Pearson correlation of two equal-shaped arrays (flattened), float64."""
    a, b = (np.asarray(v, np.float64).ravel() for v in (a, b))
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Data: image folders and DESIGN.md §4 datasets, preprocessing, weights, feature extractors, cache


def _read_meta(path, need=()):
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if missing := [c for c in need if not rows or c not in rows[0]]:
        raise SystemExit(f"metrics: {path} lacks the column(s) {missing} (expected the DESIGN.md §4 columns)")
    return rows


class ImageSet:
    """Images of a folder (recursive, sorted, case-insensitive extensions) or a §4 dataset (meta.csv + shards)."""

    def __init__(self, root, split=""):
        self.root = root = os.path.abspath(root)
        if not os.path.isdir(root):
            raise SystemExit(f"metrics: {root} is not a folder (expected images or a dataset with meta.csv)")
        meta_path = os.path.join(root, "meta.csv")
        self.is_dataset = os.path.isdir(os.path.join(root, "shards")) and os.path.isfile(meta_path)
        self.meta = None
        if self.is_dataset:
            rows = _read_meta(meta_path, ["id", "shard", "index"] + (["split"] if split else []))
            rows = [r for r in rows if not split or r["split"] == split]
            if not rows:
                raise SystemExit(f"metrics: {meta_path} has no rows with split={split!r}")
            self.items, self.ids = [(int(r["shard"]), int(r["index"])) for r in rows], [r["id"] for r in rows]
            self.meta = rows
        else:
            files = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                           if n.lower().endswith(IMAGE_EXTS))
            if not files:
                raise SystemExit(f"metrics: no images in {root} (looked recursively for {', '.join(IMAGE_EXTS)})")
            self.items = files
            self.ids = [os.path.splitext(os.path.relpath(f, root))[0].replace(os.sep, "/") for f in files]
            if os.path.isfile(meta_path):
                self.meta = self._match_meta(_read_meta(meta_path), meta_path)
        self._shards = {}

    def _match_meta(self, rows, path):
        """Rows of a folder's meta.csv belong to images by `id` (relative path or file stem) or by `file`/`path`."""
        key, by = next((c for c in ("id", "file", "path", "filename") if rows and c in rows[0]), None), {}
        for r in rows if key else []:
            v = os.path.splitext(r[key].replace("\\", "/"))[0]
            by[v] = by[v.rsplit("/", 1)[-1]] = r
        meta = [by.get(i, by.get(i.rsplit("/", 1)[-1], {})) for i in self.ids]
        if not any(meta):
            warnings.warn(f"{path}: no row matches an image of {self.root} by id/file/path/filename; ignoring it")
        return meta if any(meta) else None

    def __len__(self):
        return len(self.items)

    def fingerprint(self, extra=""):
        """Cache key: sorted file list + sizes + mtimes (+ meta.csv and shards for datasets) + extractor/prep."""
        h = hashlib.sha256((self.root + "\0" + extra).encode())
        if self.is_dataset:
            files = [os.path.join(self.root, "meta.csv")] + sorted(
                os.path.join(self.root, "shards", f) for f in os.listdir(os.path.join(self.root, "shards")))
            h.update("\0".join(f"{s}:{i}" for s, i in self.items).encode())
        else:
            files = self.items
        for f in files:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def load(self, i):
        """Image i as float32 [H, W] in [0, 1] (16-bit data keeps its precision), or None if unreadable."""
        try:
            if self.is_dataset:
                shard, idx = self.items[i]
                path = os.path.join(self.root, "shards", f"{shard:05d}.safetensors")
                if path not in self._shards:
                    self._shards[path] = safe_open(path, framework="np")
                a = self._shards[path].get_slice("images")[idx:idx + 1]
                return (np.asarray(a, np.float32)[0, 0] / 65535.0)
            return read_image(self.items[i])
        except Exception as e:  # noqa: BLE001 - an unreadable file is counted, or fatal under --strict
            self.last_error = f"{self.items[i]}: {e}"
            return None


def read_image(path):
    """PNG 8/16-bit, JPEG, TIFF; gray or RGB(A) -> float32 gray [H, W] in [0, 1]."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float32) / 65535.0  # 16-bit PNGs open as I;16 (or I in older Pillow)
        elif im.mode == "F":
            a = np.asarray(im, dtype=np.float32)
        else:
            a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0  # RGB -> ITU-R 601 luma
    return np.clip(a, 0.0, 1.0)


def square(img, fit="crop"):
    """Centre-crop (or zero-pad) to a square: the aspect ratio is never squashed."""
    h, w = img.shape
    if h == w:
        return img
    if fit == "pad":
        s = max(h, w)
        out = np.zeros((s, s), np.float32)
        out[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = img
        return out
    s = min(h, w)
    return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def resize(img, size):
    """Bilinear resize with antialiasing (PIL-like when downsampling), float32 [H, W] -> [size, size]."""
    if img.shape == (size, size):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img, np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def prepare(img, size, fit="crop", compat=False):
    """The one preprocessing path: [CheXGenBench 299 squash] -> square by crop/pad -> resize to `size`."""
    if compat:  # chexgenbench's code: PIL resize to (299, 299) regardless of aspect ratio
        img = np.asarray(Image.fromarray(img).resize((299, 299), Image.BILINEAR), np.float32)
    return resize(square(img, fit), size) if size else square(img, fit)


def _online(offline=False, host="github.com"):
    """False under --offline / HF_HUB_OFFLINE=1 / CXR_OFFLINE=1, or when `host` does not resolve (fail fast)."""
    if offline or os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("CXR_OFFLINE") == "1":
        return False
    try:
        return bool(socket.getaddrinfo(host, 443))
    except OSError:
        return False


class WeightsMissing(Exception):
    """Raised when a network's weights are not found locally and cannot be fetched."""


def find_weights(filenames, url, weights_dir="", extra_dirs=(), offline=False):
    """First existing file among `filenames` in --weights-dir and the standard caches; else download `url` when
    online; else WeightsMissing naming the file, its source and the flag."""
    dirs = [weights_dir] if weights_dir else []
    dirs += [os.path.expanduser(d) for d in extra_dirs]
    for d in dirs:
        for f in filenames:
            if os.path.isfile(os.path.join(d, f)):
                return os.path.join(d, f)
    if url and _online(offline):
        dst = os.path.join(os.path.expanduser(extra_dirs[0]) if extra_dirs else weights_dir, os.path.basename(url))
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            print(f"metrics: downloading {url}", file=sys.stderr)
            tmp = dst + ".part"
            with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as fh:
                fh.write(r.read())
            os.replace(tmp, dst)
            return dst
        except OSError as e:
            raise WeightsMissing(f"could not download {filenames[-1]} from {url} ({e}); put it in a folder "
                                 f"given by --weights-dir") from e
    raise WeightsMissing(f"weights file {filenames[-1]} not found (from {url}); offline: download it and pass "
                         f"--weights-dir DIR, or --allow-random-weights for a smoke test")


def load_state(path):
    """State dict from safetensors, or from a tensor-only pickle with torch.load(weights_only=True)."""
    if path.endswith(".safetensors"):
        return load_pt(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def load_into(model, sd, name):
    """Strict load ignoring BatchNorm's num_batches_tracked (absent from old checkpoints); errors name the keys."""
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    own = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or extra:
        raise SystemExit(f"metrics: {name} does not match the expected layout: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    model.load_state_dict(sd, strict=False)
    return model


class _Stub:
    """Stand-in for any class named in a pickled checkpoint: records its state, runs none of its code."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state


def _stub_class(qualified):
    mod, _, name = qualified.rpartition(".")
    return type(name, (_Stub,), {"__module__": mod, "__qualname__": name})


def safe_load_pickled_module(path, max_rounds=200):
    """Tensors of a whole pickled nn.Module (torchxrayvision saves the model object, not a state dict) without
    running its code: torch.load(weights_only=True), retried with an inert stub for each class the unpickler
    refuses (torch.serialization.safe_globals), then parameters and buffers are read from the stubs' state."""
    stubs = []
    for _ in range(max_rounds):
        try:
            with torch.serialization.safe_globals(stubs):
                obj = torch.load(path, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as e:  # "... GLOBAL module.Name was not an allowed global ..."
            name = str(e).split("GLOBAL ", 1)[1].split()[0].rstrip(".,") if "GLOBAL " in str(e) else ""
            if not name or any(f"{s.__module__}.{s.__qualname__}" == name for s in stubs):
                raise
            stubs.append(_stub_class(name))
    else:
        raise SystemExit(f"metrics: {path}: too many unknown classes in the pickle")
    if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
        return dict(obj)
    out = {}

    def walk(o, prefix):
        st = getattr(o, "_state", None) or getattr(o, "__dict__", {})
        st = st[0] if isinstance(st, tuple) and len(st) == 2 else st  # (dict, slotstate) form
        if isinstance(st, dict):
            out.update({prefix + k: v.detach().clone() for kind in ("_parameters", "_buffers")
                        for k, v in (st.get(kind) or {}).items() if torch.is_tensor(v)})
            for k, child in (st.get("_modules") or {}).items():
                if child is not None:
                    walk(child, prefix + k + ".")

    walk(obj, "")
    if not out:
        raise SystemExit(f"metrics: {path} holds no module parameters that could be read")
    return out


XRV_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
XRV_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/" + XRV_FILE
XRV_SAFE = "xrv-densenet121-res224-all.safetensors"
FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_FILE
HF_ALIASES = {"raddino": "microsoft/rad-dino", "dinov2": "facebook/dinov2-base",
              "clip": "openai/clip-vit-base-patch32"}


def convert_xrv(src, dst):
    """Pickled torchxrayvision model -> safetensors with the DenseNet's parameter names (atomic write)."""
    sd = safe_load_pickled_module(src)
    sd = {k: v.contiguous() for k, v in sd.items() if k.startswith(("features.", "classifier."))}
    load_into(XRVDenseNet(num_classes=sd["classifier.weight"].shape[0]), sd, src)  # validates the layout
    tmp = dst + ".tmp"
    save_pt(sd, tmp, metadata={"source": os.path.basename(src), "converted_by": f"metrics.py {VERSION}"})
    os.replace(tmp, dst)
    return dst


class Extractor:
    """A feature space: preprocessing, network, and the facts that go into results.json."""

    def __init__(self, name, net, size, dim, preprocessing, weights, random_weights, device, processor=None):
        self.name, self.net, self.size, self.dim, self.processor, self.device = name, net, size, dim, processor, device
        self.preprocessing, self.weights, self.random_weights = preprocessing, weights, random_weights
        self.net.eval().requires_grad_(False).to(device)

    def prepare(self, img, fit="crop", compat=False):
        if self.processor is not None:  # transformers processors resize/crop themselves: hand over a square RGB
            sq = prepare(img, 0, fit, compat)
            return np.repeat((sq * 255 + 0.5).astype(np.uint8)[:, :, None], 3, axis=2)
        return prepare(img, self.size, fit, compat)

    @torch.no_grad()
    def __call__(self, batch):
        """batch: list of prepare() outputs, or a float tensor [B, C, H, W] in [0, 1] -> float32 [B, dim]."""
        if torch.is_tensor(batch):
            x = batch.float().mean(1, keepdim=True) if batch.shape[1] != 1 else batch.float()
            if self.processor is not None:
                batch = [np.repeat((im[0].cpu().numpy() * 255 + 0.5).astype(np.uint8)[:, :, None], 3, 2) for im in x]
            else:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        if self.processor is not None:
            x = self.processor(images=list(batch), return_tensors="pt")["pixel_values"]
        elif not torch.is_tensor(batch):
            x = torch.from_numpy(np.stack(batch))[:, None]
        x = x.to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):  # bf16 GPU, fp32 CPU
            if self.name == "inception":
                f = self.net((2 * x - 1).expand(-1, 3, -1, -1))  # [0,1] -> [-1,1], gray replicated to RGB
            elif self.name == "xrv":
                f = self.net.embed(x * 2048 - 1024)  # xrv.datasets.normalize: [0, 1] -> [-1024, 1024]
            else:
                f = self.net(pixel_values=x).pooler_output  # CLS after the final norm (CLIP: pre-projection)
        return f.float().cpu()


def get_extractor(name, weights_dir="", allow_random_weights=False, device="cpu", offline=False):
    """Build a feature extractor by name ('inception', 'xrv', 'raddino', 'dinov2', 'clip', or a transformers
    model id / local path). Missing weights raise WeightsMissing unless allow_random_weights."""
    device = torch.device(device)
    if name in ("inception", "xrv"):
        inc = name == "inception"
        net, src, rnd = (FIDInceptionV3() if inc else XRVDenseNet()), "random", False
        files, url, cache = ((["pt_inception-2015-12-05.safetensors", FID_FILE], FID_URL,
                              "~/.cache/torch/hub/checkpoints") if inc else
                             ([XRV_SAFE, XRV_FILE], XRV_URL, "~/.torchxrayvision/models_data"))
        try:
            src = find_weights(files, url, weights_dir, [cache], offline)
            if src.endswith(".pt"):  # torchxrayvision pickles the whole model: converted once, read without its code
                src = convert_xrv(src, os.path.join(os.path.dirname(src), XRV_SAFE))
            load_into(net, load_state(src), src)
        except WeightsMissing:
            if not allow_random_weights:
                raise
            rnd = True
            for m in net.modules():  # variance-preserving init, so random features do not vanish with depth
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)
        prep = ("gray->RGB, square by crop/pad, bilinear+antialias to 299, [0,1] -> [-1,1] (pytorch-fid); pool3"
                if inc else "1 channel, square by crop/pad, bilinear+antialias to 224, [0,1] -> [-1024,1024] "
                "(xrv normalize); ReLU + global average pool")
        return Extractor(name, net, 299 if inc else 224, 2048 if inc else 1024, prep, src, rnd, device)
    return _hf_extractor(name, weights_dir, allow_random_weights, device, offline)


def _hf_extractor(name, weights_dir, allow_random_weights, device, offline):
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel
    transformers.logging.set_verbosity_error()
    repo = HF_ALIASES.get(name, name)
    wd = [os.path.join(weights_dir, repo.replace("/", "--")), os.path.join(weights_dir, repo.split("/")[-1])]
    cands, err = [c for c in [repo] + (wd if weights_dir else []) if os.path.isdir(c)] + [repo], None
    for c in cands:
        try:
            local = os.path.isdir(c) or not _online(offline, "huggingface.co")
            cfg = AutoConfig.from_pretrained(c, local_files_only=local)
            cls = CLIPVisionModel if cfg.model_type in ("clip", "clip_vision_model") else AutoModel
            net = cls.from_pretrained(c, local_files_only=local)
            proc = AutoImageProcessor.from_pretrained(c, local_files_only=local)
            return Extractor(name, net, None, int(getattr(net.config, "hidden_size", 0)),
                             f"square by crop/pad, 8-bit RGB, then {type(proc).__name__} of {repo}; feature = "
                             "pooler_output (CLS)", c, False, device, proc)
        except (OSError, ValueError) as e:
            err = e
    if not allow_random_weights or name not in HF_ALIASES:
        raise WeightsMissing(f"transformers model {repo} not found locally ({type(err).__name__}); offline: "
                             f"save it with save_pretrained into --weights-dir DIR/{repo.replace('/', '--')}")
    # Random weights with the published architecture defaults (ViT-B): smoke tests only.
    from transformers import BitImageProcessor, CLIPImageProcessor, CLIPVisionConfig, Dinov2Config, Dinov2Model
    net, proc = ((CLIPVisionModel(CLIPVisionConfig()), CLIPImageProcessor()) if name == "clip" else (
        Dinov2Model(Dinov2Config()), BitImageProcessor(size={"shortest_edge": 224}, image_mean=[.485, .456, .406],
                                                       crop_size={"height": 224, "width": 224},
                                                       image_std=[.229, .224, .225])))
    return Extractor(name, net, None, 768, f"random ViT-B, {type(proc).__name__} 224", "random", True, device, proc)


class Progress:
    """Rate / ETA line on stderr, at most every 2 s."""

    def __init__(self, total, what):
        self.total, self.what, self.t0, self.last, self.done = total, what, time.time(), 0.0, 0

    def update(self, n):
        self.done, now = self.done + n, time.time()
        if now - self.last > 2 or self.done >= self.total:
            self.last, rate = now, self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"  {self.what}: {self.done}/{self.total} {rate:.1f} img/s ETA {eta:.0f}s", file=sys.stderr)


def iter_images(images, indices, size, fit="crop", compat=False, workers=4, batch_size=64, strict=False, fn=None):
    """Yield (indices kept, list of prepared images) in batches, decoding in threads; unreadable images are
    skipped (counted in images.skipped) or fatal when strict."""
    fn = fn or (lambda a: prepare(a, size, fit, compat))
    images.skipped = getattr(images, "skipped", set())
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for s in range(0, len(indices), batch_size):
            idx = indices[s:s + batch_size]
            loaded = list(pool.map(lambda i: (lambda a: None if a is None else fn(a))(images.load(i)), idx))
            keep, out = [], []  # decoding and resizing both run in the threads (PIL and torch release the GIL)
            for i, a in zip(idx, loaded):
                if a is None:
                    if strict:
                        raise SystemExit(f"metrics: unreadable image {images.last_error}")
                    images.skipped.add(i)
                    continue
                keep.append(i)
                out.append(a)
            yield keep, out


def extract_features(images, extractor="inception", batch_size=64, device=None, fit="crop", compat=False,
                     workers=4, strict=False, cache_dir=None, weights_dir="", allow_random_weights=False,
                     progress=True):
    """Features [N, D] float32 of an ImageSet / folder path / tensor [N, C, H, W] in [0, 1].

    With an ImageSet and cache_dir, features are cached under a key of the sorted file list, sizes, mtimes,
    extractor, weights and preprocessing version. Under torchrun each rank extracts a disjoint share.
    Returns (features, kept indices, cache_status) for ImageSets, features alone for tensors."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ex = extractor if isinstance(extractor, Extractor) else get_extractor(
        extractor, weights_dir, allow_random_weights, device)
    if torch.is_tensor(images) or isinstance(images, np.ndarray):
        t = torch.as_tensor(images)
        return torch.cat([ex(t[s:s + batch_size]) for s in range(0, len(t), batch_size)]).numpy()
    if isinstance(images, str):
        images = ImageSet(images)
    key = images.fingerprint(f"{ex.name}|{ex.weights}|{ex.preprocessing}|{fit}|{compat}|{PREP_VERSION}")
    cache = os.path.join(cache_dir, f"{ex.name.replace('/', '--')}-{key[:24]}.safetensors") if cache_dir else None
    if cache and os.path.isfile(cache):
        d = load_np(cache)
        return d["features"], d["indices"].tolist(), "hit"
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    idx = list(range(rank, len(images), world))
    prog = Progress(len(idx), f"{ex.name} {os.path.basename(images.root)}") if progress else None
    feats, kept = [], []
    for keep, batch in iter_images(images, idx, None, workers=workers, batch_size=batch_size, strict=strict,
                                   fn=lambda a: ex.prepare(a, fit, compat)):
        if batch:
            feats.append(ex(batch))
            kept += keep
        if prog:
            prog.update(len(keep))
    f = torch.cat(feats).numpy() if feats else np.zeros((0, ex.dim), np.float32)
    if world > 1:  # gather every rank's share, restore file order
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (kept, f))
        kept = sum((p[0] for p in parts), [])
        f = np.concatenate([p[1] for p in parts])
        order = np.argsort(kept)
        kept, f = [kept[i] for i in order], f[order]
    if cache and rank == 0:
        os.makedirs(cache_dir, exist_ok=True)
        save_np({"features": np.ascontiguousarray(f), "indices": np.asarray(kept, np.int64)}, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    return f, kept, ("miss" if cache else "off")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: feature spaces, per-condition groups, diversity, paired, privacy, factual correctness


def _pos(row, label):
    return str((row or {}).get(label, "")).strip() in ("1", "1.0")


def condition_groups(meta):
    """Indices per pathology (label = 1) plus Finding (any of the 13 others = 1) and No Finding
    (chexgenbench §2.2 conditional analysis; multicond Table 2 Finding / No Finding split). None without labels."""
    if not meta or not any(lab in (meta[0] or {}) for lab in LABELS):
        return None
    groups = {lab: [i for i, r in enumerate(meta) if _pos(r, lab)] for lab in LABELS}
    groups["Finding"] = [i for i, r in enumerate(meta) if any(_pos(r, lab) for lab in LABELS if lab != "No Finding")]
    return groups


def distribution_metrics(fr, ff, cfg, chosen, device):
    """FD, KID and PRDC between two feature sets, with N, skipping (with the reason) what the sizes do not allow."""
    out = {"n_real": int(len(fr)), "n_fake": int(len(ff))}
    notes = []
    if "fd" in chosen:
        if min(len(fr), len(ff)) >= 2:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                out["fd"] = frechet_distance(fr, ff)
            notes += [str(x.message) for x in w]
        else:
            notes.append("fd skipped: fewer than 2 images")
    if "kid" in chosen:
        m = min(cfg.kid_subset_size, len(fr), len(ff))
        if m >= 2:
            out["kid_mean"], out["kid_std"] = kid(fr, ff, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed, device)
            out["kid_subset_size"] = m
            if m < cfg.kid_subset_size:
                notes.append(f"kid subsets of {m} < {cfg.kid_subset_size} (fewer images than a subset)")
        else:
            notes.append("kid skipped: fewer than 2 images")
    if "prdc" in chosen:
        if min(len(fr), len(ff)) >= cfg.k + 1:
            out.update(prdc(fr, ff, cfg.k, device))
        else:
            notes.append(f"prdc skipped: fewer than k+1={cfg.k + 1} images")
    if notes:
        out["notes"] = notes
    return out


def _rows(kept, wanted):
    pos = {i: r for r, i in enumerate(kept)}
    return [pos[i] for i in wanted if i in pos]


def _iter(images, indices, size, cfg, batch_size=None):
    return iter_images(images, indices, size, cfg.fit, cfg.chexgenbench_compat, cfg.workers,
                       batch_size or cfg.batch_size, cfg.strict)


def _pixels(images, indices, size, cfg):
    out, kept = [], []
    for keep, batch in _iter(images, indices, size, cfg):
        kept += keep
        out += batch
    return kept, (np.stack(out) if out else np.zeros((0, size, size), np.float32))


def _group_column(meta, group_by):
    if group_by != "auto":
        if not meta or group_by not in meta[0]:
            raise SystemExit(f"metrics: the fake meta.csv has no column {group_by!r} (--group-by)")
        return group_by
    for c in ("group", "prompt_id", "prompt", "report"):
        if meta and c in meta[0] and any(r.get(c) for r in meta):
            return c
    return "labels" if meta and any(lab in meta[0] for lab in LABELS) else None


def diversity(fake, cfg):
    """Mean pairwise MS-SSIM among synthetic images of one prompt / condition (chexgen, roentgen §5): lower is
    more diverse. Groups come from the fake meta.csv; at most cfg.max_pairs random pairs per group."""
    col = _group_column(fake.meta, cfg.group_by)
    if col is None:
        return {"skipped": "the fake folder has no meta.csv with a group/prompt/report or label column"}
    groups = {}
    for i, r in enumerate(fake.meta):
        if r:
            key = tuple(r.get(lab, "") for lab in LABELS) if col == "labels" else r.get(col, "")
            groups.setdefault(key, []).append(i)
    groups = [g for g in groups.values() if len(g) >= 2]
    if not groups:
        return {"skipped": f"no group of >= 2 images by column {col!r}"}
    rng = np.random.default_rng(cfg.seed)
    means, npairs = [], 0
    for g in groups:
        if len(g) * (len(g) - 1) // 2 <= cfg.max_pairs:
            pairs = [(a, b) for ai, a in enumerate(g) for b in g[ai + 1:]]
        else:  # large group: random distinct pairs, never the full list of n^2/2
            pairs = sorted({tuple(sorted(rng.choice(g, 2, replace=False).tolist())) for _ in range(cfg.max_pairs)})
        need = sorted({i for p in pairs for i in p})
        kept, px = _pixels(fake, need, cfg.pixel_size, cfg)
        row = {i: r for r, i in enumerate(kept)}
        pairs = [(row[a], row[b]) for a, b in pairs if a in row and b in row]
        if not pairs:
            continue
        a, b = (torch.from_numpy(px[[p[i] for p in pairs]])[:, None] for i in (0, 1))
        means.append(float(torch.atleast_1d(ms_ssim(a, b, 1.0)).mean()))
        npairs += len(pairs)
    scales = ms_ssim_scales(cfg.pixel_size)
    return {"ms_ssim_mean": float(np.mean(means)), "ms_ssim_std": float(np.std(means)), "groups": len(means),
            "pairs": npairs, "group_by": col, "size": cfg.pixel_size, "scales": scales,
            "note": "5 scales, standard weights" if scales == 5 else
            f"{scales} scales (images <= 160 px), weights renormalised: not comparable with 5-scale values"}


def paired_ids(real, fake):
    """(real index, fake index) for images sharing an id (exact, else by file stem)."""
    for key in (lambda i: i, lambda i: i.rsplit("/", 1)[-1]):
        rid = {key(i): n for n, i in enumerate(real.ids)}
        if pairs := [(rid[key(i)], n) for n, i in enumerate(fake.ids) if key(i) in rid]:
            return pairs
    return []


def paired(real, fake, pairs, cfg):
    """SSIM / PSNR between paired real and synthetic images (reconstructions, edits; radit App. C.1), streamed."""
    s, p = [], []
    for c in range(0, len(pairs), 256):
        (kr, xr), (kf, xf) = (_pixels(im, [q[i] for q in pairs[c:c + 256]], cfg.pixel_size, cfg)
                              for i, im in ((0, real), (1, fake)))
        rr, fr = {i: r for r, i in enumerate(kr)}, {i: r for r, i in enumerate(kf)}
        ok = [(rr[a], fr[b]) for a, b in pairs[c:c + 256] if a in rr and b in fr]
        a, b = (torch.from_numpy(x[[o[i] for o in ok]])[:, None] for i, x in ((0, xr), (1, xf)))
        s.append(torch.atleast_1d(ssim(a, b, 1.0)).double().numpy())
        p.append(torch.atleast_1d(psnr(a, b, 1.0)).numpy())
    s, p = np.concatenate(s), np.concatenate(p)
    fin = p[np.isfinite(p)]
    return {"n": len(s), "ssim_mean": float(s.mean()), "ssim_std": float(s.std()),
            "psnr_mean": float(fin.mean()) if len(fin) else float("inf"),
            "psnr_std": float(fin.std()) if len(fin) else 0.0, "n_identical": int((~np.isfinite(p)).sum()),
            "size": cfg.pixel_size, "data_range": 1.0}


def privacy(fake, train, cfg, fake_feats=None, train_feats=None, device="cpu"):
    """Memorisation (chexgenbench §2.3, done over the whole training set): each synthetic image's nearest
    training image by pixel L2 (same crop/resize, float) and by distance of unit-normalised features."""
    (fk, q), bank_kept = _pixels(fake, list(range(len(fake))), cfg.privacy_size, cfg), []

    def bank():
        for keep, batch in _iter(train, list(range(len(train))), cfg.privacy_size, cfg, 256):
            bank_kept.extend(keep)
            if batch:
                yield np.stack(batch).reshape(len(batch), -1)

    d, j = nearest_neighbours(q.reshape(len(q), -1), bank(), device)
    rms, out = d / cfg.privacy_size, {}
    out["pixel"] = {"n_fake": len(fk), "n_train": len(bank_kept), "size": cfg.privacy_size,
                    "l2_mean": float(d.mean()), "l2_min": float(d.min()), "rms_mean": float(rms.mean()),
                    "rms_min": float(rms.min()), "threshold_rms": cfg.pix_threshold,
                    "count_under_threshold": int((rms < cfg.pix_threshold).sum()),
                    "closest": [{"fake": fake.ids[fk[r]], "train": train.ids[bank_kept[j[r]]], "rms": float(rms[r])}
                                for r in np.argsort(d)[:cfg.grid_pairs]]}
    grid = cfg.grid or (os.path.splitext(cfg.out)[0] + "_closest_pairs.png" if cfg.out else "")
    if grid:
        rows = [np.concatenate([q[r], np.ones((cfg.privacy_size, 4), np.float32), prepare(
            train.load(bank_kept[j[r]]), cfg.privacy_size, cfg.fit, cfg.chexgenbench_compat)], 1)
            for r in np.argsort(d)[:cfg.grid_pairs]]
        Image.fromarray((np.clip(np.concatenate(rows, 0), 0, 1) * 255 + 0.5).astype(np.uint8)).save(grid + ".tmp.png")
        os.replace(grid + ".tmp.png", grid)
        out["pixel"]["grid"] = grid
    if fake_feats is not None and train_feats is not None:
        name, (ff, fkept), (tf, tkept) = fake_feats[0], fake_feats[1], train_feats
        unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
        tf = unit(tf)
        dl, _ = nearest_neighbours(unit(ff), (tf[s:s + 4096] for s in range(0, len(tf), 4096)), device)
        out["latent"] = {"features": name, "n_fake": len(fkept), "n_train": len(tkept), "mean": float(dl.mean()),
                         "min": float(dl.min()), "threshold": cfg.feat_threshold,
                         "count_under_threshold": int((dl < cfg.feat_threshold).sum())}
    if cfg.reid_weights:
        out["reid"] = reid_scores(fake, train, cfg, device)
    return out


def reid_scores(fake, train, cfg, device):
    """Max Siamese re-identification probability of each synthetic image over the training set (Packhaeuser et
    al. 2022; chexgenbench §2.3 Avg / Max Re-ID score, Count[s > delta]). Input assumed 256 px, gray replicated
    to RGB, ImageNet mean/std (torchvision pretrained ResNet-50 convention)."""
    net = load_into(SiameseReID(), load_state(cfg.reid_weights), cfg.reid_weights).eval().to(device)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in ([.485, .456, .406], [.229, .224, .225]))

    @torch.no_grad()
    def embed(images):
        es = []
        for _, batch in _iter(images, list(range(len(images))), 256, cfg):
            if batch:
                x = torch.from_numpy(np.stack(batch))[:, None].to(device).expand(-1, 3, -1, -1)
                es.append(net.embed((x - mean) / std))
        return torch.cat(es)

    ef, et, best = embed(fake), embed(train), []
    step = max(1, 2 ** 22 // (len(et) * 128))
    with torch.no_grad():
        for s in range(0, len(ef), step):
            best.append(net.score(ef[s:s + step, None], et[None]).max(1).values)
    s = torch.cat(best).cpu().numpy()
    return {"mean": float(s.mean()), "max": float(s.max()), "threshold": cfg.reid_threshold,
            "count_over_threshold": int((s > cfg.reid_threshold).sum()), "n_fake": len(ef), "n_train": len(et)}


def factual(real, fake, pairs, cfg, device):
    """Pearson correlation between a classifier's predictions on real and paired synthetic images (chexgen:
    XRV DenseNet-121, N x C prediction matrix flattened), plus the mean of the per-class correlations."""
    if cfg.classifier == "xrv":
        ex = get_extractor("xrv", cfg.weights_dir, cfg.allow_random_weights, device, cfg.offline)
        net, rnd, src = ex.net, ex.random_weights, ex.weights
    else:
        sd, rnd, src = load_state(cfg.classifier), False, cfg.classifier
        if "classifier.weight" not in sd:
            raise SystemExit(f"metrics: {src} is not an xrv-layout DenseNet-121 (no classifier.weight)")
        net = load_into(XRVDenseNet(sd["classifier.weight"].shape[0]), sd, src).eval().to(device)

    @torch.no_grad()
    def predict(images, idx):
        ps, kept = [], []
        for keep, batch in _iter(images, idx, 224, cfg):
            if batch:
                x = torch.from_numpy(np.stack(batch))[:, None].to(device)
                ps.append(torch.sigmoid(net(x * 2048 - 1024)).float().cpu())
                kept += keep
        return dict(zip(kept, torch.cat(ps).numpy()))

    pr, pf = predict(real, [p[0] for p in pairs]), predict(fake, [p[1] for p in pairs])
    ok = [(pr[a], pf[b]) for a, b in pairs if a in pr and b in pf]
    a, b = np.stack([o[0] for o in ok]), np.stack([o[1] for o in ok])
    per = [pearson(a[:, c], b[:, c]) for c in range(a.shape[1])]
    return {"n": len(ok), "pearson": pearson(a, b), "pearson_per_class_mean": float(np.nanmean(per)),
            "classifier": src, "random_weights": rnd}


def _versions():
    import scipy, transformers  # noqa: E401
    return {"metrics.py": VERSION, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "transformers": transformers.__version__}


def evaluate(cfg):
    """Everything the inputs allow; returns the results dict (also written to cfg.out)."""
    if not cfg.fake:
        raise SystemExit("metrics: --fake is required (a folder of synthetic images)")
    chosen = ALL_METRICS if cfg.metrics == "all" else tuple(m.strip() for m in cfg.metrics.split(","))
    if bad := [m for m in chosen if m not in ALL_METRICS]:
        raise SystemExit(f"metrics: unknown --metrics {bad}; expected some of {','.join(ALL_METRICS)}")
    if cfg.fit not in ("crop", "pad"):
        raise SystemExit(f"metrics: --fit {cfg.fit!r}; expected crop or pad")
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    real, fake = ImageSet(cfg.real, cfg.split), ImageSet(cfg.fake, cfg.fake_split)
    train = ImageSet(cfg.train, cfg.train_split) if cfg.train and "privacy" in chosen else None
    cache_dir = None if cfg.no_cache else (cfg.cache_dir or os.path.expanduser("~/.cache/cxr-gen/metrics"))
    res = {"versions": _versions(), "device": str(device), "config": dataclasses.asdict(cfg),
           "real": {"path": real.root, "n": len(real), "split": cfg.split if real.is_dataset else None},
           "fake": {"path": fake.root, "n": len(fake)}, "features": {}, "skipped_features": {}}
    spaces, feats = [s.strip() for s in cfg.features.split(",") if s.strip()], {}
    rgroups, fgroups = condition_groups(real.meta), condition_groups(fake.meta)
    kw = dict(batch_size=cfg.batch_size, device=device, fit=cfg.fit, compat=cfg.chexgenbench_compat,
              workers=cfg.workers, strict=cfg.strict, cache_dir=cache_dir)
    for name in spaces if set(chosen) & {"fd", "kid", "prdc", "conditions", "privacy"} else []:
        try:
            ex = get_extractor(name, cfg.weights_dir, cfg.allow_random_weights, device, cfg.offline)
        except WeightsMissing as e:
            print(f"metrics: skipping {name}: {e}", file=sys.stderr)
            res["skipped_features"][name] = str(e)
            continue
        fr, kr, cr = extract_features(real, ex, **kw)
        ff, kf, cf = extract_features(fake, ex, **kw)
        feats[name] = (ex, fr, kr, ff, kf)
        res["features"][name] = dict(extractor=ex.name, dim=ex.dim, preprocessing=ex.preprocessing, weights=ex.weights,
                                     random_weights=ex.random_weights, cache={"real": cr, "fake": cf},
                                     **distribution_metrics(fr, ff, cfg, chosen, device))
        if "conditions" in chosen and rgroups and fgroups:
            res.setdefault("conditions", {})[name] = {
                g: distribution_metrics(fr[_rows(kr, rgroups[g])], ff[_rows(kf, fgroups[g])], cfg, chosen, device)
                for g in rgroups}
    for key, s in (("real", real), ("fake", fake)):
        if getattr(s, "skipped", None):
            res[key]["unreadable_skipped"] = len(s.skipped)
            print(f"metrics: skipped {len(s.skipped)} unreadable image(s), e.g. {s.last_error}", file=sys.stderr)
    if "conditions" in chosen and not (rgroups and fgroups):
        res["conditions_skipped"] = "per-condition metrics need label columns in the meta.csv of both real and fake"
    if "diversity" in chosen:
        res["diversity"] = diversity(fake, cfg) if fake.meta else {"skipped": "the fake folder has no meta.csv"}
    pairs = paired_ids(real, fake)
    if "paired" in chosen and pairs:
        res["paired"] = paired(real, fake, pairs, cfg)
    if "factual" in chosen and cfg.classifier:
        res["factual"] = factual(real, fake, pairs, cfg, device) if pairs else {"skipped": "no paired ids"}
    if train is not None:
        pf = cfg.privacy_features or ("raddino" if "raddino" in feats else next(iter(feats), ""))
        fake_f = train_f = None
        if pf in feats:
            ex, _, _, ff, kf = feats[pf]
            tf, kt, _ = extract_features(train, ex, **kw)
            fake_f, train_f = (pf, (ff, kf)), (tf, kt)
        res["privacy"] = privacy(fake, train, cfg, fake_f, train_f, device)
        res["train"] = {"path": train.root, "n": len(train)}
    if cfg.out and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out + ".tmp", "w") as fh:
            json.dump(res, fh, indent=1, default=float)
        os.replace(cfg.out + ".tmp", cfg.out)
    return res


def format_table(res):
    """The readable stdout summary of a results dict (every number is also in results.json)."""
    lines = [f"real {res['real']['path']} (N={res['real']['n']})   fake {res['fake']['path']} (N={res['fake']['n']})",
             f"{'feature space':<16}{'FD':>11}{'KID x1e3':>17}{'prec':>7}{'rec':>7}{'dens':>7}{'cov':>7}{'N r/f':>10}"]
    rnd = "   random weights, not comparable"

    def row(label, d):
        f = lambda k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
        kid_s = f"{d['kid_mean'] * 1e3:.2f}+-{d['kid_std'] * 1e3:.2f}" if "kid_mean" in d else "-"
        return (f"{label[:15]:<16}{f('fd'):>11}{kid_s:>17}{f('precision'):>7}{f('recall'):>7}{f('density'):>7}"
                f"{f('coverage'):>7}{str(d['n_real']) + '/' + str(d['n_fake']):>10}")

    for name, d in res["features"].items():
        lines += [row(name.rsplit("/", 1)[-1], d) + (rnd if d.get("random_weights") else "")]
        lines += ["  note: " + n for n in d.get("notes", [])]
    lines += [f"{name:<16}skipped: {msg}" for name, msg in res.get("skipped_features", {}).items()]
    for name, groups in res.get("conditions", {}).items():
        lines.append(f"per condition, {name}:" + (rnd if res["features"][name].get("random_weights") else ""))
        lines += [row("  " + g, d) for g, d in groups.items()]

    def flat(d):
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()
                         if not isinstance(v, (list, dict)))

    for sec in ("diversity", "paired", "factual"):
        if sec in res:
            lines.append(f"{sec}: {flat(res[sec])}" + (rnd if res[sec].get("random_weights") else ""))
    for sec, d in res.get("privacy", {}).items():
        lines.append(f"privacy, {sec}: {flat(d)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Subcommands: convert-xrv, bench


def _mem_mb(field):
    """VmRSS / VmHWM of this process in MB; _mem_mb('reset') zeroes the peak (Linux clear_refs "5")."""
    if field == "reset":
        with open("/proc/self/clear_refs", "w") as fh:
            return fh.write("5")
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field)) / 1024


def _prdc_full_matrix(real, fake, k):
    """Baseline: the reference PRDC code's algorithm (sklearn pairwise_distances, which computes float32 inputs
    in float64, three full N x M matrices, np.partition for the k-th neighbour), in numpy."""
    def pdist(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0))
    r_real = np.partition(pdist(real, real), k, axis=1)[:, k]  # k+1-th smallest includes self
    r_fake = np.partition(pdist(fake, fake), k, axis=1)[:, k]
    d = pdist(real, fake)
    return {"precision": float((d < r_real[:, None]).any(0).mean()), "recall": float((d < r_fake[None]).any(1).mean()),
            "density": float((d < r_real[:, None]).sum(0).mean() / k), "coverage": float((d.min(1) < r_real).mean())}


def _fid_sqrtm(x, y):
    """Baseline: pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm of S1 S2)."""
    import scipy.linalg
    mu1, mu2 = x.mean(0, dtype=np.float64), y.mean(0, dtype=np.float64)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def bench(argv):
    """CPU ratios measured in one run: Frechet distance vs scipy sqrtm; PRDC vs full pairwise matrices."""
    p = argparse.ArgumentParser(prog="metrics.py bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for flag, default, hlp in (("--n", 10000, "features per set"), ("--dim", 2048, "feature dimension"),
                               ("--k", 5, "PRDC k"), ("--seed", 0, "feature generator seed"),
                               ("--device", "cpu", "device for prdc()")):
        p.add_argument(flag, type=type(default), default=default, help=hlp)
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    mix = rng.standard_normal((a.dim, a.dim)).astype(np.float32) / np.sqrt(a.dim)  # correlated, non-negative
    real = np.maximum(rng.standard_normal((a.n, a.dim)).astype(np.float32) @ mix, 0)
    fake = np.maximum((rng.standard_normal((a.n, a.dim)).astype(np.float32) * 1.02 + 0.01) @ mix, 0)
    out = {"n": a.n, "dim": a.dim, "k": a.k, "torch_threads": torch.get_num_threads(), **_versions()}
    for name, fn in (("fd", lambda: frechet_distance(real, fake)), ("fd_sqrtm", lambda: _fid_sqrtm(real, fake)),
                     ("prdc", lambda: prdc(real, fake, a.k, a.device)),
                     ("prdc_full_matrix", lambda: _prdc_full_matrix(real, fake, a.k))):
        _mem_mb("reset")
        base, t = _mem_mb("VmRSS"), time.perf_counter()
        out[name] = fn()
        out[name + "_s"], out[name + "_peak_mb"] = time.perf_counter() - t, _mem_mb("VmHWM") - base
    out["fd_rel_diff"] = abs(out["fd"] - out["fd_sqrtm"]) / abs(out["fd_sqrtm"])
    out["fd_speedup"] = out["fd_sqrtm_s"] / out["fd_s"]
    out["prdc_speedup"] = out["prdc_full_matrix_s"] / out["prdc_s"]
    out["prdc_max_abs_diff"] = max(abs(out["prdc"][m] - out["prdc_full_matrix"][m]) for m in out["prdc"])
    print(json.dumps(out, indent=1))
    return out


# ----------------------------------------------------------------------------------------------------------------
# main: subcommands first (convert-xrv, bench); none means evaluate


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    if argv and argv[0] == "convert-xrv":
        p = argparse.ArgumentParser(prog="metrics.py convert-xrv", description="torchxrayvision pickle -> safetensors")
        p.add_argument("src", help=f"the pickled model, e.g. ~/.torchxrayvision/models_data/{XRV_FILE}")
        p.add_argument("--dst", default="", help=f"output ('' = {XRV_SAFE} beside src)")
        a = p.parse_args(argv[1:])
        if not os.path.isfile(a.src):
            raise SystemExit(f"metrics: {a.src} not found (expected the pickled torchxrayvision model, {XRV_URL})")
        dst = convert_xrv(a.src, a.dst or os.path.join(os.path.dirname(os.path.abspath(a.src)), XRV_SAFE))
        print(f"wrote {dst}")
        return dst
    p = build_parser(description=__doc__.split("\n\n")[0], epilog="subcommands: convert-xrv SRC [--dst DST], bench")
    cfg = Config(**vars(p.parse_args(argv)))
    if torch.distributed.is_available() and "RANK" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    res = evaluate(cfg)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(format_table(res))
    return res


if __name__ == "__main__":
    main()

"""metrics.py: fidelity, diversity, per-condition and privacy metrics for synthetic chest radiographs.

One file, usable alone or imported by the training scripts for in-loop evaluation:

    from metrics import frechet_distance, kid, prdc, extract_features, ms_ssim, ssim, psnr, FeatureLPIPS

What it computes (papers in ../shared/papers):
- Frechet distance (FID with Inception-v3, FD_x in other feature spaces), float64, ddof=1 covariances
  (chexgenbench §2.2, radit App. C.1 Eq. 12, multicond §3.3 FID / FID_XRV, roentgen Table 2);
- KID / KD_x: unbiased MMD^2 with the cubic polynomial kernel (radit App. C.1, chexgenbench Table 7);
- precision, recall, density, coverage (Naeem et al. 2020; chexgenbench §2.2, multicond App. A.3);
- diversity: mean pairwise MS-SSIM among images generated for one condition (chexgen, roentgen §5: window 11,
  sigma 1.5); paired SSIM / PSNR for reconstructions and edits, LPIPS-style distances in a transformers
  feature space and their relative version against random real pairs (radit App. C.1 Eq. 13-14);
- every distribution metric per pathology and for Finding / No Finding (chexgenbench §2.2, multicond Table 2);
- privacy, two modes (--privacy): 'chexgenbench', the benchmark's protocol (§2.3, §3.2, Table 3): each synthetic
  image against its own source training row (fake meta.csv source_id, or --privacy-pairs), per training sample the
  max Siamese Re-ID score (Packhaeuser et al. 2022; 224 px, no normalisation, as its code) and the min pixel /
  Rad-DINO latent distances, then Avg / Max Re-ID and Count[max > delta = 0.85]; 'nearest' (default), a different
  question, "is any training image copied?": each synthetic image's nearest image over the whole training set by
  pixel L2 and by unit-normalised feature distance, and its max Re-ID score over the training set;
- factual correctness: Pearson correlation of a classifier's predictions on paired real / synthetic images (chexgen:
  --classifier xrv_mimic, torchxrayvision's densenet121-res224-mimic_ch, its 11 named outputs);
- alignment score (chexgenbench, its code metrics/img_text_alignment_scores.py): per synthetic image the cosine between
  BioViL-T's image embedding and CXR-BERT's embedding of the image's prompt (fake meta.csv `report`), overall and per
  pathology (label = 1 in the fake meta.csv); both encoders written here with the released parameter names, loaded
  unchanged from a folder of the Hub files (no trust_remote_code).

Commands:
    python metrics.py --real data/phantom --split test --fake samples/ --out results.json
    python metrics.py --real real/ --fake fake/ --features inception,xrv --metrics fd,kid,prdc
    python metrics.py --real data/phantom --fake samples/ --train data/phantom --out r.json   # + privacy
    python metrics.py --real data/phantom --fake samples/ --train data/phantom --privacy chexgenbench \
        --reid-weights reid.safetensors --out r.json        # samples/meta.csv: source_id = the prompt's training row
    python metrics.py fetch-weights --weights-dir W   # online: every feature network's weights into W (layout below)
    python metrics.py --real data/phantom --fake samples/ --metrics alignment --weights-dir W   # W/microsoft--Biomed...
    python metrics.py --real data/phantom --fake samples/ --metrics factual --classifier xrv_mimic --weights-dir W
    python metrics.py --paired --real originals/ --fake edited/ --lpips raddino,dinov2 --out id.json  # Table 14
    python metrics.py convert-xrv ~/.torchxrayvision/models_data/<file>.pt --dst xrv.safetensors
    python metrics.py bench --n 10000 --dim 2048      # CPU: FD vs sqrtm, PRDC vs full matrices, KID vs torch-fidelity
Offline, an extractor whose weights are not found is skipped with a message naming the file and --weights-dir;
when FD / KID / PRDC were asked for and no extractor could be loaded, the first lines of the output say so, list
each network's file / folder in the --weights-dir layout and its source, and the exit status is 3
(EXIT_NO_FIDELITY; results.json is written all the same, with "no_fidelity"). `--metrics alignment` named without
its BioViL-T folder: the same, with "no_alignment" (under --metrics all it is skipped with the message).
--allow-random-weights runs it anyway and labels every number it gives "random weights, not comparable"; those
weights come from a fixed seed (RANDOM_WEIGHTS_SEED), so two runs agree. The feature cache is keyed by the sha256 of
the weights actually used (recorded in results.json as features.<name>.weights_sha256), never by their name.

The default preprocessing (square by --fit, bilinear with antialiasing) is ours; other tools' numbers need their
conventions. Each feature space's convention is recorded in results.json (features.<name>.resize, kid_sampler).
To reproduce tool X's number on the same files and weights, use flags Y:

  tool X                           flags Y                                         what they select
  pytorch-fid (python -m           --features inception --metrics fd               squash to 299, bilinear without
    pytorch_fid a b)                 --resize pytorch-fid                            antialias, 2x - 1
  torch-fidelity (fidelity         --features inception --metrics fd,kid           squash, TF1 bilinear, (x-128)/128;
    --fid --kid)                     --resize tf1 --kid-sampler torch-fidelity       KID subsets of RandomState(2020);
                                                                                     it needs N >= --kid-subset-size
  torchmetrics FID / KID           --features inception --metrics fd,kid           torch-fidelity's extractor; KID
                                     --resize tf1                                    subsets its own: same expectation
  clean-fid (mode="clean")         --features inception --metrics fd               squash, PIL bicubic on floats,
                                     --resize clean                                  (x-128)/128; its own TF-graph port
  CheXGenBench                     --chexgenbench-compat --resize tf1              PIL squash to 299, then tf1
  prdc (Naeem et al. 2020)         --metrics prdc --k 5                            same; exact on ties
  pytorch-msssim ms_ssim           --metrics diversity (--pixel-size >= 161)       same window, relu, odd-side padding
  torchxrayvision, documented      --features xrv --xrv-resize skimage             XRayCenterCrop + XRayResizer
  torchxrayvision, in-model        --features xrv (default --xrv-resize model)     bilinear + antialias, xrv's crop

16-bit files: the peers read them through PIL convert('RGB'), which clips; metrics.py keeps the 16 bits and prints
a note. To reproduce a peer's number on 16-bit data, give both tools the same 8-bit copies.
"""
import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import pickle
import platform
import re
import socket
import sys
import tempfile
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
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file as load_np, save_file as save_np
from safetensors.torch import load_file as load_pt, save_file as save_pt


# --- skeleton: safe_names (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def file_in(folder, name, suffix="", where=None):
    """The path of a file named from data (an id from meta.csv, a JSON key) inside `folder`; one-line error for a
    name that could leave the folder or hide a file: empty, starting with '.', holding '/', '\\' or a NUL.
    `where`: the table the name comes from, for the message (default: the folder)."""
    name = str(name)
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise SystemExit(f"{where or folder}: id {name!r} is not usable as a file name (expected no '/', '\\', "
                         f"NUL or leading '.': files are only written inside their output folder)")
    return os.path.join(folder, name + suffix)


def check_ids(ids, where):
    """Ids that name output files: each a file name (file_in's rule) and each once; one line naming the first
    duplicate otherwise. `where`: the table they come from, e.g. 'data/meta.csv'."""
    seen = set()
    for i in ids:
        file_in("", i, where=where)
        if i in seen:
            raise SystemExit(f"{where}: id {i!r} appears more than once; expected unique ids")
        seen.add(i)
# --- end skeleton: safe_names ---


# --- skeleton: meta_table (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
AGE_RANGE = (0.0, 120.0)               # FORMAT.md §2; radit §3.1 (i) drops implausible ages, the bounds are ours


def read_meta(path, required=(), split=None, what="a dataset folder (meta.csv, shards/, info.json)"):
    """-> (rows, columns) of a meta.csv (FORMAT.md §2), rows as dicts of strings, filtered to `split` unless it is
    None or 'all'. One-line errors: no such file, not a table, a `required` column (or `split`) missing (all
    missing ones named), an id that is not a file name or appears twice (check_ids)."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected {what}")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f"{path}: not a readable CSV table ({e}); expected {what}") from None
    needed = ["id", *required] + (["split"] if split not in (None, "all") else [])
    absent = [c for c in dict.fromkeys(needed) if c not in columns]
    if absent:
        raise SystemExit(f"{path}: no column(s) {', '.join(absent)}; expected FORMAT.md §2 columns")
    if any(None in r or None in r.values() for r in rows):
        bad = next(i for i, r in enumerate(rows) if None in r or None in r.values())
        raise SystemExit(f"{path}: row {bad + 2} has {'more' if None in rows[bad] else 'fewer'} cells than the "
                         f"header's {len(columns)}; expected one cell per column")
    check_ids([r["id"] for r in rows], path)
    if split not in (None, "all"):
        rows = [r for r in rows if r["split"] == split]
    return rows, columns


def check_age(value, where):
    """An age in years (a number or numeric text) -> float; NaN for missing ('' or nan); one line otherwise."""
    if isinstance(value, str) and value.strip().lower() in ("", "nan"):
        return float("nan")
    try:
        age = float(value)
    except (TypeError, ValueError):
        age = None
    if age is None or not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise SystemExit(f"{where}: age {value!r}; expected years in {AGE_RANGE[0]:g}-{AGE_RANGE[1]:g} or empty")
    return age


def check_shard_rows(rows, sizes, where):
    """meta.csv rows against their shards: `sizes` maps a shard number to its row count. One line naming the first
    row whose shard or index is not an integer, whose shard is absent, or whose index is outside 0..size-1."""
    for r in rows:
        try:
            shard, index = int(r["shard"]), int(r["index"])
        except (KeyError, TypeError, ValueError):
            raise SystemExit(f"{where}: row {r.get('id')!r} has shard {r.get('shard')!r}, index "
                             f"{r.get('index')!r}; expected integers (FORMAT.md §2)") from None
        if shard not in sizes:
            raise SystemExit(f"{where}: row {r['id']!r} names shard {shard}, which does not exist")
        if not 0 <= index < sizes[shard]:
            raise SystemExit(f"{where}: row {r['id']!r} has index {index}; shard {shard} holds rows "
                             f"0..{sizes[shard] - 1}")


def shard_tensor_shape(path, key, dtype):
    """The shape of tensor `key` in a shard, checked against the format's dtypes (`dtype`: safetensors' code or a
    tuple of them, e.g. 'U16' for images, ('F32', 'F16', 'BF16') for latents): one line naming the file when it is
    missing, unreadable, lacks the key or stores another dtype (a float or uint8 shard of images would otherwise
    train on near-black inputs)."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such shard; expected the shards/ that meta.csv names")
    try:
        with safe_open(path, "numpy") as f:
            keys = list(f.keys())
            if key not in keys:
                raise SystemExit(f"{path}: no tensor {key!r} (has {', '.join(sorted(keys)) or 'none'}); "
                                 f"expected FORMAT.md's shard layout")
            piece = f.get_slice(key)
            shape, stored = list(piece.get_shape()), piece.get_dtype()
    except (SafetensorError, OSError) as e:
        raise SystemExit(f"{path}: not a readable safetensors shard ({e})") from None
    wanted = (dtype,) if isinstance(dtype, str) else tuple(dtype)
    if stored not in wanted:
        raise SystemExit(f"{path}: {key!r} stored as {stored}; expected {' or '.join(wanted)} (FORMAT.md)")
    return shape


def check_shards(folder, rows, key, dtype, shape=None, where=None):
    """At start, not mid-training: every shard in folder/shards/ that the rows name is readable, stores `key` as
    `dtype` (shard_tensor_shape) with rows of `shape` when given, and holds each row's index (check_shard_rows;
    `where`: the table for the messages, default folder/meta.csv). -> {shard: rows}."""
    where = where or os.path.join(folder, "meta.csv")
    sizes = {}
    for r in rows:
        try:
            shard = int(r["shard"])
        except (KeyError, TypeError, ValueError):
            break                                                # check_shard_rows names the row
        path = os.path.join(folder, "shards", f"{shard:05d}.safetensors")
        if shard in sizes or shard < 0 or not os.path.isfile(path):
            continue                                             # check_shard_rows: "names shard k, which does not"
        got = shard_tensor_shape(path, key, dtype)
        if shape is not None and tuple(got[1:]) != tuple(shape):
            raise SystemExit(f"{path}: {key!r} rows have shape {got[1:]}; expected {list(shape)} (info.json)")
        sizes[shard] = got[0]
    check_shard_rows(rows, sizes, where)
    return sizes
# --- end skeleton: meta_table ---


VERSION = "1.0"
PREP_VERSION = "2"  # bump when preprocessing changes: it is part of the feature-cache key
LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]  # FORMAT.md §5, CheXpert names
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ALL_METRICS = ("fd", "kid", "prdc", "diversity", "paired", "conditions", "privacy", "factual", "alignment")
RESIZE_MODES = ("antialias", "pytorch-fid", "clean", "tf1")  # Inception input conventions (--resize)
XRV_RESIZE_MODES = ("model", "skimage")  # XRV input conventions (--xrv-resize)
PRIVACY_MODES = ("nearest", "chexgenbench", "both")  # --privacy: whole-training-set search, the benchmark's protocol
# Our choice: --allow-random-weights builds every random network from this seed (torch's global RNG is forked and
# restored around it), so two runs on the same images give the same numbers; results.json records it.
RANDOM_WEIGHTS_SEED = 20240601


# --- skeleton: atomic_save (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def atomic_save(path, save_fn):
    """Write through a temporary file in the same folder, fsync, then os.replace: readers never see half a file and
    a crash leaves the old one. The file gets the mode that open() would give it (0o666 less the umask), set after
    save_fn has written it. A write that fails (a full disk, a read-only folder, a file where a folder should be)
    stops with one line naming the file; the previous version of the file is intact."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        os.close(fd)
        save_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0o022)                                  # read the umask (set and restored at once)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                            # mkstemp's 0600 is too strict for outputs
        os.replace(tmp, path)
    except OSError as e:
        raise SystemExit(f"{path}: cannot write ({e.strerror or e}); any previous version of it is intact") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
# --- end skeleton: atomic_save ---

# ----------------------------------------------------------------------------------------------------------------
# Config: one dataclass; the CLI is generated from its fields


def arg(default, help):
    """A dataclass field with its CLI help string (the --help text is built from these, not from the source)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every option of an evaluation run (CLI flags are these fields with dashes)."""
    real: str = arg("data/phantom", "folder of images, or a FORMAT.md §1 dataset folder (meta.csv + shards/)")
    fake: str = arg("", "folder of synthetic images (optionally with meta.csv), or a dataset folder")
    train: str = arg("", "training set for memorisation / privacy search (folder or dataset folder)")
    split: str = arg("test", "rows of the real dataset's meta.csv to use (ignored for plain folders; '' = all)")
    fake_split: str = arg("", "rows of the fake dataset's meta.csv ('' = all)")
    train_split: str = arg("train", "rows of the train dataset's meta.csv ('' = all)")
    features: str = arg("inception,xrv,raddino,dinov2,clip", "feature spaces; also any transformers model id / path")
    metrics: str = arg("all", "comma list of: fd,kid,prdc,diversity,paired,conditions,privacy,factual,"
                              "alignment")
    weights_dir: str = arg("", "folder searched first for weights (files or transformers model folders)")
    allow_random_weights: bool = arg(False, "run extractors whose weights are missing (numbers not comparable)")
    offline: bool = arg(False, "never try to download weights (also implied by HF_HUB_OFFLINE=1)")
    chexgenbench_compat: bool = arg(False, "squash every image to 299x299 first, as CheXGenBench's code does")
    fit: str = arg("crop", "crop | pad: how a non-square image becomes square (aspect ratio is never squashed)")
    resize: str = arg("antialias", "Inception input convention: antialias (square by --fit, bilinear + antialias, "
                                   "[-1,1]) | pytorch-fid (squash, bilinear without antialias, [-1,1]) | clean "
                                   "(clean-fid: squash, PIL bicubic, (x-128)/128) | tf1 (torch-fidelity, torchmetrics: "
                                   "squash, TF1 bilinear, (x-128)/128)")
    xrv_resize: str = arg("model", "XRV input convention: model (square by --fit with xrv's crop offsets, bilinear + "
                                   "antialias, as its in-model resize) | skimage (xrv's documented XRayCenterCrop + "
                                   "XRayResizer)")
    pixel_size: int = arg(256, "side for pixel-space metrics (SSIM, PSNR, MS-SSIM)")
    privacy_size: int = arg(128, "side for the pixel nearest-neighbour search")
    privacy_block: int = arg(4096, "synthetic images searched per pass over the training set (nearest mode): "
                                   "memory ~ 3 x block x privacy_size^2 x 4 bytes, independent of N (our choice)")
    batch_size: int = arg(64, "images per extractor forward")
    workers: int = arg(4, "image decoding threads")
    device: str = arg("", "cpu | cuda ('' = cuda when available; 'auto' is accepted as '')")
    k: int = arg(5, "PRDC nearest neighbours (Naeem et al. 2020 default)")
    kid_subsets: int = arg(100, "KID random subsets (Binkowski et al. 2018)")
    kid_subset_size: int = arg(1000, "KID subset size; min(this, N) is used and reported")
    kid_sampler: str = arg("cxr-gen", "cxr-gen (numpy default_rng(--seed)) | torch-fidelity (its subsets exactly: "
                                      "RandomState(2020), its loop)")
    seed: int = arg(0, "KID subsets and MS-SSIM pair sampling")
    group_by: str = arg("auto", "fake meta.csv column grouping images of one prompt/condition for MS-SSIM diversity")
    max_pairs: int = arg(50, "MS-SSIM pairs sampled per group at most")
    pix_threshold: float = arg(0.02, "per-pixel RMS distance under which a synthetic image counts as a near-copy")
    feat_threshold: float = arg(0.1, "distance between unit-normalised features under which it counts as a copy")
    privacy_features: str = arg("", "feature space for the latent distance ('' = raddino if run, else the first one)")
    reid_weights: str = arg("", "Packhaeuser Siamese ResNet-50 weights (safetensors or tensor-only .pth) for the "
                                "re-identification score")
    reid_threshold: float = arg(0.85, "delta: re-id probability above which a synthetic image (nearest mode) or a "
                                      "training sample (chexgenbench mode) counts as re-identified (chexgenbench "
                                      "§3.2: 0.85)")
    reid_size: int = arg(224, "Re-ID input side (chexgenbench's code: Resize((224, 224)), ToTensor, no "
                              "normalisation)")
    privacy: str = arg("nearest", "nearest (each synthetic image against the whole training set: is any training "
                                  "image copied?) | chexgenbench (each synthetic image against its own source "
                                  "training row, per training sample max Re-ID / min distances, chexgenbench "
                                  "§2.3, §3.2, Table 3) | both")
    privacy_pairs: str = arg("", "chexgenbench mode: CSV with columns id (synthetic image) and source_id (training "
                                 "row id) ('' = the source_id column of the fake folder's meta.csv)")
    privacy_pixel_size: int = arg(512, "chexgenbench mode: side of the pixel distance and of the latent-distance "
                                       "input (its code resizes both images to 512 x 512)")
    classifier: str = arg("", "factual correctness (Pearson): xrv_mimic (chexgen's: densenet121-res224-mimic_ch, "
                              "its 11 named outputs) | xrv (the 'all' model, 18) | an xrv-layout DenseNet "
                              "safetensors")
    alignment_text: str = arg("report", "fake meta.csv column holding each image's prompt for the "
                                        "alignment score (chexgenbench: BioViL-T cosine)")
    grid: str = arg("", "PNG of the closest (synthetic, training) pairs ('' = next to --out)")
    grid_pairs: int = arg(8, "closest pairs listed in results.json and drawn in the grid")
    out: str = arg("", "results.json path")
    cache_dir: str = arg("", "feature cache ('' = ~/.cache/cxr-gen/metrics)")
    no_cache: bool = arg(False, "neither read nor write the feature cache")
    strict: bool = arg(False, "an unreadable image is fatal instead of skipped and counted")
    paired: bool = arg(False, "identity metrics only, for (original=--real, edited=--fake) images matched by id")
    lpips: str = arg("", "feature spaces of the LPIPS-style paired distance (radit Eq. 13) "
                         "('' = raddino with --paired)")
    lpips_layers: str = arg("", "hidden layers for LPIPS, e.g. 3,6,9,12 ('' = 4 evenly spaced, radit Table 15)")
    random_pairs: int = arg(256, "random pairs of distinct real images: the SSIM / LPIPS reference row (radit Eq. 14)")


def build_parser(cls=Config, **kw):
    """CLI from the dataclass: one flag per field (dashes), its help string from the field's metadata."""
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)
    for f in dataclasses.fields(cls):
        flag, hlp = "--" + f.name.replace("_", "-"), f.metadata.get("help", " ").replace("%", "%%")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=hlp)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=hlp)
    return p


# ----------------------------------------------------------------------------------------------------------------
# Model: the networks transformers lacks, with the parameter names of their published checkpoints


class BasicConv2d(nn.Sequential):
    """Conv (no bias) + BatchNorm(eps=1e-3) + ReLU, named conv/bn as in torchvision and pytorch-fid."""

    def __init__(self, cin, cout, **kw):
        super().__init__(OrderedDict(conv=nn.Conv2d(cin, cout, bias=False, **kw), bn=nn.BatchNorm2d(cout, eps=0.001),
                                     relu=nn.ReLU()))


def _tf_avg_pool(x):  # TF's average pool ignores the zero padding (count_include_pad=False), as the FID graph
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Block(nn.Module):
    """An Inception block: named BasicConv2d layers from (name, cin, cout, kernel, padding, stride) rows; the output
    concatenates each path (a chain of layer names whose last entry may fork into several) and the pool branch:
    'avg' / 'max' (3x3 stride 1, then branch_pool) or 'reduce' (3x3 max pool, stride 2, no conv)."""

    def __init__(self, spec, paths, pool):
        super().__init__()
        for name, cin, cout, k, pad, stride in spec:
            self.add_module(name, BasicConv2d(cin, cout, kernel_size=k, padding=pad, stride=stride))
        self.paths, self.pool = paths, pool

    def forward(self, x):
        out = []
        for path in self.paths:
            y = x
            for name in path[:-1]:
                y = getattr(self, name)(y)
            out += [getattr(self, n)(y) for n in (path[-1] if isinstance(path[-1], tuple) else (path[-1],))]
        if self.pool == "reduce":
            return torch.cat(out + [F.max_pool2d(x, 3, stride=2)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _tf_avg_pool(x)
        return torch.cat(out + [self.branch_pool(pooled)], 1)


class FIDInceptionA(_Block):
    """Inception-A block of the TF FID graph (Mixed_5b/c/d)."""

    def __init__(self, cin, pool_features):
        super().__init__([("branch1x1", cin, 64, 1, 0, 1), ("branch5x5_1", cin, 48, 1, 0, 1),
                          ("branch5x5_2", 48, 64, 5, 2, 1), ("branch3x3dbl_1", cin, 64, 1, 0, 1),
                          ("branch3x3dbl_2", 64, 96, 3, 1, 1), ("branch3x3dbl_3", 96, 96, 3, 1, 1),
                          ("branch_pool", cin, pool_features, 1, 0, 1)],
                         [("branch1x1",), ("branch5x5_1", "branch5x5_2"),
                          ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")], "avg")


class InceptionB(_Block):
    """Grid-reduction block Mixed_6a."""

    def __init__(self, cin):
        super().__init__([("branch3x3", cin, 384, 3, 0, 2), ("branch3x3dbl_1", cin, 64, 1, 0, 1),
                          ("branch3x3dbl_2", 64, 96, 3, 1, 1), ("branch3x3dbl_3", 96, 96, 3, 0, 2)],
                         [("branch3x3",), ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")], "reduce")


class FIDInceptionC(_Block):
    """Inception-C block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, cin, c7):
        h, v = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the 1x7 and 7x1 factors
        super().__init__([("branch1x1", cin, 192, 1, 0, 1), ("branch7x7_1", cin, c7, 1, 0, 1),
                          ("branch7x7_2", c7, c7, *h, 1), ("branch7x7_3", c7, 192, *v, 1),
                          ("branch7x7dbl_1", cin, c7, 1, 0, 1), ("branch7x7dbl_2", c7, c7, *v, 1),
                          ("branch7x7dbl_3", c7, c7, *h, 1), ("branch7x7dbl_4", c7, c7, *v, 1),
                          ("branch7x7dbl_5", c7, 192, *h, 1), ("branch_pool", cin, 192, 1, 0, 1)],
                         [("branch1x1",), tuple(f"branch7x7_{i}" for i in (1, 2, 3)),
                          tuple(f"branch7x7dbl_{i}" for i in range(1, 6))], "avg")


class InceptionD(_Block):
    """Grid-reduction block Mixed_7a."""

    def __init__(self, cin):
        super().__init__([("branch3x3_1", cin, 192, 1, 0, 1), ("branch3x3_2", 192, 320, 3, 0, 2),
                          ("branch7x7x3_1", cin, 192, 1, 0, 1), ("branch7x7x3_2", 192, 192, (1, 7), (0, 3), 1),
                          ("branch7x7x3_3", 192, 192, (7, 1), (3, 0), 1), ("branch7x7x3_4", 192, 192, 3, 0, 2)],
                         [("branch3x3_1", "branch3x3_2"), tuple(f"branch7x7x3_{i}" for i in range(1, 5))], "reduce")


class FIDInceptionE(_Block):
    """Inception-E block; the FID graph's second one (Mixed_7c, 'E_2') pools with max instead of average."""

    def __init__(self, cin, max_pool=False):
        h, v = ((1, 3), (0, 1)), ((3, 1), (1, 0))
        super().__init__([("branch1x1", cin, 320, 1, 0, 1), ("branch3x3_1", cin, 384, 1, 0, 1),
                          ("branch3x3_2a", 384, 384, *h, 1), ("branch3x3_2b", 384, 384, *v, 1),
                          ("branch3x3dbl_1", cin, 448, 1, 0, 1), ("branch3x3dbl_2", 448, 384, 3, 1, 1),
                          ("branch3x3dbl_3a", 384, 384, *h, 1), ("branch3x3dbl_3b", 384, 384, *v, 1),
                          ("branch_pool", cin, 192, 1, 0, 1)],
                         [("branch1x1",), ("branch3x3_1", ("branch3x3_2a", "branch3x3_2b")),
                          ("branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b"))],
                         "max" if max_pool else "avg")


class FIDInceptionV3(nn.Module):
    """TF 2015-12-05 Inception-v3 of FID (Heusel et al. 2017), names of pytorch-fid's pt_inception checkpoint."""

    MIXED = ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c")

    def __init__(self):
        super().__init__()
        for name, cin, cout, k, stride, pad in (("Conv2d_1a_3x3", 3, 32, 3, 2, 0), ("Conv2d_2a_3x3", 32, 32, 3, 1, 0),
                                                ("Conv2d_2b_3x3", 32, 64, 3, 1, 1), ("Conv2d_3b_1x1", 64, 80, 1, 1, 0),
                                                ("Conv2d_4a_3x3", 80, 192, 3, 1, 0)):
            self.add_module(name, BasicConv2d(cin, cout, kernel_size=k, stride=stride, padding=pad))
        for name, block in zip(self.MIXED, [FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64),
                                            InceptionB(288), FIDInceptionC(768, 128), FIDInceptionC(768, 160),
                                            FIDInceptionC(768, 160), FIDInceptionC(768, 192), InceptionD(768),
                                            FIDInceptionE(1280), FIDInceptionE(2048, max_pool=True)]):
            self.add_module("Mixed_" + name, block)
        self.fc = nn.Linear(2048, 1008)  # 1008 TF classes; unused for FID, present in the checkpoint

    def forward(self, x):
        """x: [B, 3, 299, 299] in [-1, 1] -> [B, 2048] pool3 features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2))), 3, stride=2)
        for name in self.MIXED:
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean((2, 3))


class _DenseLayer(nn.Sequential):
    """DenseNet-BC layer: BN-ReLU-conv1x1-BN-ReLU-conv3x3, output concatenated to the input."""

    def __init__(self, cin, growth=32, bn_size=4):
        super().__init__(OrderedDict(norm1=nn.BatchNorm2d(cin), relu1=nn.ReLU(), conv1=nn.Conv2d(
            cin, bn_size * growth, 1, bias=False), norm2=nn.BatchNorm2d(bn_size * growth), relu2=nn.ReLU(),
            conv2=nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)))

    def forward(self, x):
        return torch.cat([x, super().forward(x)], 1)


class XRVDenseNet(nn.Module):
    """torchxrayvision DenseNet-121 (densenet121-res224-all): 1 channel, 224 px, input range [-1024, 1024]; its 18
    outputs follow xrv's default_pathologies order."""

    def __init__(self, num_classes=18, blocks=(6, 12, 24, 16)):
        super().__init__()
        layers = [("conv0", nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)), ("norm0", nn.BatchNorm2d(64)),
                  ("relu0", nn.ReLU()), ("pool0", nn.MaxPool2d(3, stride=2, padding=1))]
        c = 64
        for i, n in enumerate(blocks):
            layers.append((f"denseblock{i + 1}", nn.Sequential(OrderedDict((f"denselayer{j + 1}", _DenseLayer(
                c + j * 32)) for j in range(n)))))
            c += n * 32
            if i < len(blocks) - 1:
                layers.append((f"transition{i + 1}", nn.Sequential(OrderedDict(norm=nn.BatchNorm2d(c), relu=nn.ReLU(),
                               conv=nn.Conv2d(c, c // 2, 1, bias=False), pool=nn.AvgPool2d(2, stride=2)))))
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
        for i, (a, b, kw) in enumerate([(cin, width, {}), (width, width, dict(kernel_size=3, stride=stride, padding=1)),
                                        (width, width * 4, {})]):
            self.add_module(f"conv{i + 1}", nn.Conv2d(a, b, bias=False, **({"kernel_size": 1} | kw)))
            self.add_module(f"bn{i + 1}", nn.BatchNorm2d(b))
        self.downsample = None if stride == 1 and cin == width * 4 else nn.Sequential(
            nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))

    def forward(self, x):
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """torchvision ResNet-50 layout (conv1, bn1, layer1..4, fc)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        for i, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
            setattr(self, f"layer{i + 1}", nn.Sequential(*[_Bottleneck(width * (2 if i else 1) if j == 0 else width * 4,
                                                                       width, 2 if j == 0 and i else 1)
                                                           for j in range(n)]))
        self.fc = nn.Linear(2048, num_classes)

    def trunk(self, x):
        """The feature map before pooling, [B, 2048, H / 32, W / 32] (hi-ml's ResNetHIML.forward)."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(self.trunk(x).mean((2, 3)))


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


# BioViL-T (Bannur et al. 2023) and CXR-BERT (Boecking et al. 2022): the image-text model of chexgenbench's
# alignment score. Parameter names are those of the released files in huggingface.co/microsoft/BiomedVLP-BioViL-T
# as hi-ml-multimodal builds and strictly loads them (health_multimodal/image/model: ImageModel with a
# "resnet50_multi_image" encoder; text/model/modelling_cxrbert.py: CXRBertModel).
BIOVIL_T_JOINT = 128      # hi-ml pretrained.py JOINT_FEATURE_SIZE: the joint image-text space
BIOVIL_T_PATCH = 256      # MultiImageEncoder output_dim: [f_static, f_diff] are 2 x 256 channels
BIOVIL_T_BLOCKS = 3       # VisionTransformerPooler num_blocks (8 heads, mlp_ratio 1)


class _PoolerAttention(nn.Module):
    """hi-ml's MultiHeadAttentionLayer: separate q / k / v projections without bias, output projection with."""

    def __init__(self, dim, heads=8):
        super().__init__()
        self.heads = heads
        self.proj_q = nn.Linear(dim, dim, bias=False)
        self.proj_k = nn.Linear(dim, dim, bias=False)
        self.proj_v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        shape = (*x.shape[:2], self.heads, x.shape[2] // self.heads)  # [B, N, heads, head dim]
        qkv = [p(x).view(shape).transpose(1, 2) for p in (self.proj_q, self.proj_k, self.proj_v)]
        return self.proj(F.scaled_dot_product_attention(*qkv).transpose(1, 2).reshape(x.shape))


class _PoolerMlp(nn.Module):
    """timm's Mlp as the pooler uses it: fc1, GELU, fc2 (hidden = dim, mlp_ratio 1.0)."""

    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _PoolerBlock(nn.Module):
    """hi-ml transformer.py Block: pre-norm; the positional + type embedding is added to the normed tokens that
    feed q, k and v (its forward_as_mhsa on x_with_emb), not to the residual stream. Dropout / drop-path: eval."""

    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _PoolerAttention(dim), _PoolerMlp(dim)

    def forward(self, x, emb):
        x = x + self.attn(self.norm1(x) + emb)
        return x + self.mlp(self.norm2(x))


def sine_position_embedding(h, w, dim):
    """hi-ml's SinePositionEmbedding(embedding_dim=dim // 2, normalize=True) on an all-ones h x w mask -> [1, h*w,
    dim]: DETR's 2-D sine embedding, y half then x half, coordinates (1..n) / (n + 1e-6) * 2 pi."""
    half = dim // 2
    y = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w) / (h + 1e-6) * 2 * math.pi
    x = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w) / (w + 1e-6) * 2 * math.pi
    t = 10000 ** (2 * torch.div(torch.arange(half), 2, rounding_mode="floor") / half)

    def enc(c):  # interleaved sin (even channels) / cos (odd channels)
        a = c[..., None] / t
        return torch.stack((a[..., 0::2].sin(), a[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((enc(y), enc(x)), dim=-1).view(1, h * w, dim)


class _VisionTransformerPooler(nn.Module):
    """BioViL-T's temporal pooler (hi-ml VisionTransformerPooler, 14 x 14 grid): attends over the current and the
    prior image's patch tokens and returns the current image's, [B, C, H, W]. Only reached with a prior image;
    the alignment score has none (see BioViLTImageModel)."""

    def __init__(self, dim=BIOVIL_T_PATCH, grid=(14, 14)):
        super().__init__()
        self.blocks = nn.ModuleList([_PoolerBlock(dim) for _ in range(BIOVIL_T_BLOCKS)])
        self.norm_post = nn.LayerNorm(dim, eps=1e-6)
        self.type_embed = nn.Parameter(torch.zeros(2, 1, dim))  # [current, prior]
        self.register_buffer("pos_embed", sine_position_embedding(*grid, dim), persistent=False)  # not in the file

    def forward(self, current, previous):
        x = torch.cat([current.flatten(2).transpose(1, 2), previous.flatten(2).transpose(1, 2)], 1)
        pos = self.pos_embed.expand(len(x), -1, -1)
        emb = torch.cat([pos + self.type_embed[0], pos + self.type_embed[1]], 1)
        for blk in self.blocks:
            x = blk(x, emb)
        n = current.shape[2] * current.shape[3]  # the current image's tokens come first
        return self.norm_post(x)[:, :n].transpose(1, 2).reshape(current.shape)


class _BioViLTEncoder(nn.Module):
    """hi-ml MultiImageEncoder: ResNet-50 trunk (torchvision names, its unused fc included, as the file holds it),
    1x1 conv to 256 channels, the temporal pooler, and the learned 'missing prior image' embedding."""

    def __init__(self):
        super().__init__()
        self.encoder = ResNet50(num_classes=1000)
        self.backbone_to_vit = nn.Conv2d(2048, BIOVIL_T_PATCH, 1, bias=False)
        self.vit_pooler = _VisionTransformerPooler()
        self.missing_previous_emb = nn.Parameter(torch.zeros(1, BIOVIL_T_PATCH, 1, 1))

    def forward(self, current, previous=None):
        """-> fused patch embeddings [B, 512, H / 32, W / 32]: [static features, difference features]."""
        x = self.backbone_to_vit(self.encoder.trunk(current if previous is None else torch.cat([current, previous])))
        if previous is None:  # single image: the difference half is the learned missing-prior embedding
            return torch.cat([x, self.missing_previous_emb.expand(len(x), -1, *x.shape[2:])], 1)
        cur, prev = x[:len(current)], x[len(current):]
        return torch.cat([cur, self.vit_pooler(cur, prev)], 1)


class BioViLTImageModel(nn.Module):
    """BioViL-T image model (hi-ml ImageModel, 'resnet50_multi_image', joint_feature_size 128), the layout of
    biovil_t_image_model_proj_size_128.pt: encoder.* and projector.model.{0,1,3} (1x1 conv, BatchNorm, ReLU,
    1x1 conv). Global embedding = mean over positions of the projected patch embeddings, L2-normalised
    (hi-ml ImageInferenceEngine.get_projected_global_embedding)."""

    def __init__(self):
        super().__init__()
        self.encoder = _BioViLTEncoder()
        self.projector = nn.Module()
        self.projector.model = nn.Sequential(nn.Conv2d(2 * BIOVIL_T_PATCH, BIOVIL_T_JOINT, 1, bias=False),
                                             nn.BatchNorm2d(BIOVIL_T_JOINT), nn.ReLU(),
                                             nn.Conv2d(BIOVIL_T_JOINT, BIOVIL_T_JOINT, 1))

    def forward(self, x, previous=None):
        """x: [B, 3, H, W] in [0, 1] (biovil_prepare; no mean / std) -> unit embeddings [B, 128]."""
        return F.normalize(self.projector.model(self.encoder(x, previous)).mean((2, 3)), dim=-1)


class _BertProjectionHead(nn.Module):
    """CXR-BERT's cls_projection_head: dense_to_hidden, GELU (erf), LayerNorm(eps=1e-12), dense_to_output."""

    def __init__(self, hidden, proj):
        super().__init__()
        self.dense_to_hidden = nn.Linear(hidden, proj)
        self.LayerNorm = nn.LayerNorm(proj, eps=1e-12)
        self.dense_to_output = nn.Linear(proj, proj)

    def forward(self, h):
        return self.dense_to_output(self.LayerNorm(F.gelu(self.dense_to_hidden(h))))


class CXRBertTextModel(nn.Module):
    """CXR-BERT as BioViL-T's text encoder: transformers' BertModel under `bert` (no pooler, as in
    BertForMaskedLM) + cls_projection_head on the last layer's [CLS] state, L2-normalised (hi-ml
    CXRBertModel.get_projected_text_embeddings). The MLM head (cls.predictions.*) of the file is not needed."""

    def __init__(self, config, projection_size=BIOVIL_T_JOINT):
        super().__init__()
        from transformers import BertModel
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls_projection_head = _BertProjectionHead(config.hidden_size, projection_size)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.cls_projection_head(h[:, 0]), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# The method: Frechet distance, KID, PRDC, SSIM / MS-SSIM / PSNR, nearest neighbours, Pearson


def feature_stats(x):
    """Mean and covariance (ddof=1, float64) of features [N, D]."""
    x = np.asarray(x)
    x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be [N>=2, D], got shape {x.shape}")
    mu = x.mean(0, dtype=np.float64)
    xc = np.subtract(x, mu, dtype=np.float64)  # one float64 pass over the features, no float64 copy beside it
    return mu, (xc.T @ xc) / (len(x) - 1)


def _trace_sqrt_product(s1, s2):
    """tr sqrt(S1 S2) and the size of its imaginary part, from symmetric eigenvalue problems only: with S1 = L L^T,
    L^T S2 L is similar to S1 S2 and symmetric PSD, so tr sqrt(S1 S2) = sum sqrt(eig(L^T S2 L)); one Cholesky and
    one eigvalsh instead of scipy.linalg.sqrtm's complex Schur form (5-15x faster at d=2048)."""
    from scipy.linalg.blas import dtrmm
    try:
        lo = np.linalg.cholesky(s1)  # triangular products: half the work of two general ones
        m = dtrmm(1.0, lo, dtrmm(1.0, lo, s2, side=1, lower=1), side=0, lower=1, trans_a=1)  # L^T S2 L
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
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):  # else a LinAlgError from the eigen solver
        raise ValueError("Frechet distance: the statistics hold NaN or inf (non-finite features)")
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
    """Frechet distance between two feature sets [N, D] (FID when the features are Inception pool3). With fewer
    rows than dimensions in a set, tr sqrt(S1 S2) comes from the features themselves (_trace_sqrt_low_rank)."""
    x, y = np.asarray(x), np.asarray(y)
    if min(len(x), len(y)) < x.shape[1]:
        warnings.warn(f"Frechet distance with N={min(len(x), len(y))} < feature dim {x.shape[1]}: the covariance is "
                      "rank-deficient and the value is biased upwards; compare only at equal N")
    same_dims = x.ndim == 2 and y.ndim == 2 and x.shape[1] == y.shape[1]
    if same_dims and 2 <= min(len(x), len(y)) <= x.shape[1]:
        return _frechet_distance_low_rank(x, y)
    return frechet_distance_from_stats(*feature_stats(x), *feature_stats(y), eps=eps)  # (refuses bad shapes too)


def _frechet_distance_low_rank(x, y):
    """FD when a set has N <= D rows. Its covariance is then singular and the symmetric square root of
    _trace_sqrt_product sums the square roots of ~D - N round-off eigenvalues (each ~ sqrt(eps) of the largest):
    on 300 x 2048 Inception features that path and scipy's sqrtm (pytorch-fid, which warns that the matrix is
    singular) were 7e-6 and 9e-6 relative from the exact value. Exact instead: with A the centred rows of the
    smaller set (n_a <= D) and S_b = C C^T the other set's covariance, the nonzero eigenvalues of S_a S_b are
    those of A S_b A^T / (n_a - 1), i.e. the squared singular values of A C / sqrt(n_a - 1), so tr sqrt(S_a S_b)
    is that matrix's nuclear norm; singular values of a rank-deficient matrix carry round-off ~ eps, not
    sqrt(eps). C is B^T / sqrt(n_b - 1) when the other set is small too (n_b <= D), else S_b's Cholesky factor."""
    if len(x) > len(y):
        x, y = y, x                                   # FD is symmetric: x is the smaller set
    mu_x, mu_y = x.mean(0, dtype=np.float64), y.mean(0, dtype=np.float64)
    a = np.subtract(x, mu_x, dtype=np.float64)
    b = np.subtract(y, mu_y, dtype=np.float64)
    tr_x = float(np.einsum("ij,ij->", a, a)) / (len(x) - 1)
    tr_y = float(np.einsum("ij,ij->", b, b)) / (len(y) - 1)
    if len(y) <= y.shape[1]:
        m = (a @ b.T) / np.sqrt((len(x) - 1) * (len(y) - 1))   # n_a x n_b: A B^T / sqrt((n_a - 1)(n_b - 1))
    else:
        s_y = (b.T @ b) / (len(y) - 1)
        try:
            c = np.linalg.cholesky(s_y)
        except np.linalg.LinAlgError:                 # S_b singular although n_b > D (duplicated rows)
            w, v = np.linalg.eigh(s_y)
            c = v * np.sqrt(np.clip(w, 0, None))
        m = (a @ c) / np.sqrt(len(x) - 1)
    if not np.all(np.isfinite(m)):
        raise ValueError("Frechet distance: the features hold NaN or inf (non-finite features)")
    trace_sqrt = float(np.linalg.svd(m, compute_uv=False).sum())
    diff = mu_x - mu_y
    return float(diff @ diff + tr_x + tr_y - 2.0 * trace_sqrt)


def _as_tensor(x, device=None):
    t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    t = t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if device is None else t.to(device)


KID_SAMPLERS = ("cxr-gen", "torch-fidelity")


def kid_subsets(n1, n2, m, subsets=100, seed=None, sampler="cxr-gen"):
    """Index pairs (ix, iy) of the KID subsets, each drawn without replacement. 'cxr-gen': numpy default_rng(seed,
    default 0); 'torch-fidelity': its loop exactly, numpy RandomState(seed, default 2020 = its --rng-seed), per
    subset choice(n1, m, replace=False) then choice(n2, m, replace=False)."""
    if sampler not in KID_SAMPLERS:
        raise ValueError(f"KID sampler {sampler!r}; expected one of {', '.join(KID_SAMPLERS)}")
    if sampler == "torch-fidelity":
        rng = np.random.RandomState(2020 if seed is None else seed)
    else:
        rng = np.random.default_rng(0 if seed is None else seed)
    return [(rng.choice(n1, m, replace=False), rng.choice(n2, m, replace=False)) for _ in range(subsets)]


def _matmul_t(a, b, out=None):
    """a @ b.T (into out); on the CPU through numpy's BLAS, about 1.8x torch's GEMM on the shared 2-core machine."""
    if a.device.type != "cpu":
        return torch.mm(a, b.T, out=out)
    if out is None:
        return torch.from_numpy(a.numpy() @ b.numpy().T)
    np.matmul(a.numpy(), b.numpy().T, out=out.numpy())
    return out


def _kernel_sums(z, cols, mem_mb=256):
    """C^T K C and diag(K) for the cubic kernel K = (z z^T / d + 1)^3 and weights C = cols [N, c] (float64), from
    one Gram computation: whole when it fits in mem_mb (numpy computes z @ z.T as a symmetric rank-k update, half
    the products), else over the block upper triangle, row chunk s meeting z[s:] only, its diagonal block counted
    once and the rest twice (K is symmetric). Products in z's precision, kernel values and sums in float64."""
    n, d = z.shape
    if n * n * 12 <= mem_mb * 2 ** 20:
        kern = _matmul_t(z, z).double().div_(d).add_(1).pow_(3)
        return cols.T @ (kern @ cols), kern.diagonal().clone()
    q = torch.zeros(cols.shape[1], cols.shape[1], dtype=torch.float64, device=z.device)
    diag = torch.empty(n, dtype=torch.float64, device=z.device)
    step = max(1, min(n, int(mem_mb * 2 ** 20 / (12 * n))))
    for s in range(0, n, step):
        b = min(step, n - s)
        kern = _matmul_t(z[s:s + b], z[s:]).double().div_(d).add_(1).pow_(3)  # [b, n - s]
        diag[s:s + b] = kern[:, :b].diagonal()
        both = kern @ cols[s:]  # contiguous operands (a column slice of kern would take torch's slow path)
        rest = both - kern[:, :b].contiguous() @ cols[s:s + b]
        q += cols[s:s + b].T @ both + rest.T @ cols[s:s + b]
    return q, diag


def kid(x, y, subsets=100, subset_size=1000, seed=None, device=None, sampler="cxr-gen", mem_mb=256):
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2, kernel (x.y/d + 1)^3, mean and std over
    `subsets` random subsets of min(subset_size, N) drawn without replacement (kid_subsets: seeded, or exactly
    torch-fidelity's). The kernel sums of all subsets come from one Gram computation over the rows that any
    subset uses (C^T K C with C the subsets' indicator columns) when that costs fewer products than one Gram per
    subset (then each subset's block upper triangle only). Matrix products in the input's precision on `device`,
    kernel values and sums in float64."""
    x, y = _as_tensor(x, device), _as_tensor(y, device)
    y = y.to(x.dtype)
    n1, n2 = len(x), len(y)
    d = x.shape[1]
    m = min(subset_size, n1, n2)  # subset size actually used
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {n1} and {n2}")
    draws = kid_subsets(n1, n2, m, subsets, seed, sampler)
    ux, uy = (np.unique(np.concatenate([dr[i] for dr in draws])) for i in (0, 1))
    u = len(ux) + len(uy)
    one_gram = u * u / 2 * (d + 8 * subsets) < subsets * 2 * m * m * (d + 8)  # symmetric halves; float64 C x2
    sxx = np.empty(subsets)  # per subset: sum of k(x, x'), k(y, y'), k(x, y); diagonals of the first two
    syy = np.empty(subsets)
    sxy = np.empty(subsets)
    dx = np.empty(subsets)
    dy = np.empty(subsets)
    if one_gram:
        z = torch.cat([x[torch.as_tensor(ux, device=x.device)], y[torch.as_tensor(uy, device=x.device)]])
        cols = torch.zeros(u, 2 * subsets, dtype=torch.float64, device=x.device)
        for t, (ix, iy) in enumerate(draws):
            cols[np.searchsorted(ux, ix), t] = 1
            cols[len(ux) + np.searchsorted(uy, iy), subsets + t] = 1
        q, diag = _kernel_sums(z, cols, mem_mb)
        dsum = (cols.T @ diag).cpu().numpy()
        q = q.cpu().numpy()
        t = np.arange(subsets)
        sxx = q[t, t]
        syy = q[subsets + t, subsets + t]
        sxy = q[t, subsets + t]
        dx, dy = dsum[:subsets], dsum[subsets:]
    else:
        cols = torch.zeros(2 * m, 2, dtype=torch.float64, device=x.device)
        cols[:m, 0], cols[m:, 1] = 1, 1
        for t, (ix, iy) in enumerate(draws):
            z = torch.cat([x[torch.as_tensor(ix, device=x.device)], y[torch.as_tensor(iy, device=x.device)]])
            q, diag = _kernel_sums(z, cols, mem_mb)
            sxx[t] = float(q[0, 0])
            syy[t] = float(q[1, 1])
            sxy[t] = float(q[0, 1])
            dx[t], dy[t] = float(diag[:m].sum()), float(diag[m:].sum())
    vals = ((sxx - dx) + (syy - dy)) / (m * (m - 1)) - 2 * sxy / (m * m)
    return float(np.mean(vals)), float(np.std(vals))


def _augment(x, center=0.0, bank=None):
    """Queries [x - c, |x - c|^2, 1]; with `bank`, bank rows [-2 (x - c), 1, |x - c|^2] written into it. One GEMM of
    the two is |a|^2 + |b|^2 - 2 a.b, the squared distances, with no further pass over the result."""
    d, q = x.shape[1], x.new_empty(len(x), x.shape[1] + 2)
    torch.sub(x, center, out=q[:, :d])
    q[:, d], q[:, d + 1] = torch.linalg.vector_norm(q[:, :d], dim=1) ** 2, 1
    if bank is not None:
        torch.mul(q[:, :d], -2, out=bank[:, :d])
        bank[:, d], bank[:, d + 1] = 1, q[:, d]
    return q


_UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                  torch.float64: 2.0 ** -53}


def _distance_tolerance(dtype, d):
    """c such that a squared distance from _augment + one GEMM in `dtype` is within c (|a|^2 + |b|^2) of the
    float64 difference-based value (|a|, |b| relative to the centre), for any summation order: the standard
    bound gamma_n = n u / (1 - n u) on the GEMM (d + 2 terms) and on the norms, plus one rounding of the centred
    inputs and the float64 reference's own gamma_d, times 2 as margin."""
    u, u64 = _UNIT_ROUNDOFF[dtype], 2.0 ** -53
    gamma = lambda n, v: n * v / (1 - n * v)  # noqa: E731
    return 2 * (2 * gamma(d + 2, u) + gamma(d, u) + 5 * u + 2 * gamma(d, u64))


def _exact_sqdist(a, b, ia, ib, chunk_bytes=2 ** 21):
    """Squared distances of the row pairs (a[ia], b[ib]) from differences, in int64 for integer inputs (exact)
    and float64 otherwise, summed row by row in numpy's fixed order: equal inputs give equal results. Chunks of
    chunk_bytes stay in cache."""
    ia, ib = np.asarray(ia, np.int64), np.asarray(ib, np.int64)
    integer = np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)
    out, step = np.empty(len(ia), np.float64), max(1, chunk_bytes // (8 * a.shape[1]))
    for s in range(0, len(ia), step):
        diff = a[ia[s:s + step]].astype(np.int64 if integer else np.float64)
        diff -= b[ib[s:s + step]]
        out[s:s + step] = np.add.reduce(np.multiply(diff, diff, out=diff), axis=1)
    return out


def _rounded(x, dtype, up):
    """float64 thresholds x as `dtype`, rounded outwards (up or down), so a comparison in `dtype` stays safe."""
    y = x.to(dtype)
    off = y.double() < x if up else y.double() > x
    return torch.where(off, torch.nextafter(y, torch.full_like(y, float("inf") if up else -float("inf"))), y)


def _centred(x, raw, center, rows=4096):
    """x - center in x's dtype, computed in float64 from the raw values chunk by chunk (one rounding)."""
    out = torch.empty_like(x)
    for s in range(0, len(x), rows):
        out[s:s + rows] = (torch.as_tensor(raw[s:s + rows], device=x.device).double() - center).to(x.dtype)
    return out


def _knn_pass(q, bank, k, tol, exact, visit=None, mem_mb=256):
    """Exact squared distance of each row of q = _augment(x) to its k-th nearest other row of x (self excluded by
    index: duplicates count at 0); bank[:len(q)] are x's bank rows. Chunk s meets bank[s:] only (each block of the
    symmetric matrix once: a row top-k' for its rows, a column top-k' for later rows) and, in the same GEMM, the
    extra rows bank[len(q):]. The GEMM's squared distances are within e_i = tol (|x_i|^2 + max_j |x_j|^2) of the
    exact ones, so every row whose distance may reach the exact radius lies among the k' kept with d <= r~ + 2 e_i
    (r~: the k-th smallest GEMM value): those are recomputed by exact(i, j), and a row whose k' kept values all
    pass that test is recomputed in full. visit(s, exact radii, GEMM distances to the extra rows) then runs."""
    n, m = len(q), len(bank) - len(q)  # own rows, extra rows
    inf = float("inf")
    kk = min(n - 1, 2 * k + 8)
    step = max(1, min(n, 512, int(mem_mb * 2 ** 20 / (q.element_size() * (n + m + 2 * kk)))))
    buf, radii = q.new_empty(step * (n + m)), torch.empty(n, dtype=torch.float64, device=q.device)
    best_v, best_i = q.new_full((n, kk), inf), torch.full((n, kk), -1, dtype=torch.long, device=q.device)
    norms = q[:, -2].double()
    err = tol * (norms + norms.max())
    for s in range(0, n, step):
        b = min(step, n - s)
        d = _matmul_t(q[s:s + b], bank[s:], out=buf[:b * (n + m - s)].view(b, n + m - s))
        d[:, :b].diagonal().fill_(inf)
        v, i = d[:, :n - s].topk(min(kk, n - s), 1, largest=False)
        v, pos = torch.cat([best_v[s:s + b], v], 1).topk(kk, 1, largest=False)
        radii[s:s + b] = _exact_radii(s, v, torch.cat([best_i[s:s + b], i + s], 1).gather(1, pos), k,
                                      err[s:s + b], exact, n, lambda j: _matmul_t(q[j:j + 1], bank[:n])[0])
        if s + b < n:  # later rows: this block's columns, merged into their running k' smallest
            cv, ci = d[:, b:n - s].topk(min(kk, b), 0, largest=False)
            best_v[s + b:], pos = torch.cat([best_v[s + b:], cv.T], 1).topk(kk, 1, largest=False)
            best_i[s + b:] = torch.cat([best_i[s + b:], ci.T + s], 1).gather(1, pos)
        if visit is not None:
            visit(s, radii[s:s + b], d[:, n - s:])
    return radii


def _exact_radii(s, v, idx, k, err, exact, n, gemm_row):
    """k-th smallest exact distance of rows s.. from their k' nearest by GEMM value (v ascending, idx), see
    _knn_pass. The exact radius lies within err of the k-th GEMM value v_k; rows whose GEMM value is below
    v_k - 2 err are exactly below it and rows above v_k + 2 err exactly above, so only the band between is
    recomputed: the radius is its (k - #below)-th smallest exact value."""
    vk = v[:, k - 1:k].double()
    below, band = (v.double() < vk - 2 * err[:, None]), (v.double() - vk).abs() <= 2 * err[:, None]
    rows, cols = band.nonzero(as_tuple=True)
    ex = torch.full(v.shape, float("inf"), dtype=torch.float64, device=v.device)
    ex[rows, cols] = torch.as_tensor(exact((s + rows).cpu().numpy(), idx[rows, cols].cpu().numpy()),
                                     device=v.device)
    rank = k - below.sum(1)  # >= 1: the k-th GEMM value itself is in the band
    out = ex.sort(1).values.gather(1, (rank - 1)[:, None]).squeeze(1)
    if v.shape[1] < n - 1:  # the k'-th kept value is still in the band: the list may be cut short, so the row's
        for r in band[:, -1].nonzero().view(-1).tolist():  # GEMM values are recomputed and the same rule applied
            row = gemm_row(s + r)
            row[s + r] = float("inf")
            lo_r, hi_r = vk[r, 0] - 2 * err[r], vk[r, 0] + 2 * err[r]
            cols = ((row.double() >= lo_r) & (row.double() <= hi_r)).nonzero().view(-1)
            ranked = np.sort(exact(np.full(len(cols), s + r), cols.cpu().numpy()))
            out[r] = float(ranked[k - int((row.double() < lo_r).sum()) - 1])
    return out


def prdc(real, fake, k=5, device=None, mem_mb=256):
    """Precision, recall, density, coverage (Naeem et al. 2020): k-NN balls with strict '<', real radii for
    precision / density / coverage, fake radii for recall. Two passes, GEMMs in the input's precision (integer
    inputs: float32): fake radii, then one over real row chunks whose GEMM against [real; fake] gives the real
    radii and the real x fake block. Exact on ties: every radius, and every comparison that the GEMM's error
    bound leaves undecided, is recomputed from differences (int64 for integer features, else float64), so equal
    inputs compare equal (duplicated images, quantised features) and integer features give the exact counts."""
    raw_r, raw_f = (x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x) for x in (real, fake))
    real = _as_tensor(real, device)
    fake = _as_tensor(fake, device).to(real.dtype)
    n, m = len(real), len(fake)
    dim = real.shape[1]
    if n < k + 1 or m < k + 1:
        raise ValueError(f"PRDC with k={k} needs at least {k + 1} images per set, got {n} real and {m} fake")
    tol = _distance_tolerance(real.dtype, dim)
    center = torch.as_tensor(raw_r.mean(0, dtype=np.float64), device=real.device)  # distances are shift-invariant
    if raw_r.dtype.kind == raw_f.dtype.kind == "f":  # float inputs are exact in the GEMM dtype: centred at a
        cr, cf = real - center.to(real.dtype), fake - center.to(real.dtype)  # representable c, one rounding
    else:  # integer (or mixed) inputs: centred in float64 from the raw values, one rounding
        cr, cf = (_centred(x, raw, center) for x, raw in ((real, raw_r), (fake, raw_f)))
    del real, fake
    bank = cr.new_empty(n + m, dim + 2)
    qf = _augment(cf, bank=bank[n:])
    r_fake = _knn_pass(qf, bank[n:], k, tol, lambda i, j: _exact_sqdist(raw_f, raw_f, i, j), mem_mb=mem_mb)
    norms_f = qf[:, -2].double()
    del qf, cf
    qr = _augment(cr, bank=bank[:n])
    norms_r = qr[:, -2].double()
    err_f = tol * (norms_f + norms_r.max())  # recall: per fake column
    lo_f, hi_f = _rounded(r_fake - err_f, qr.dtype, False), _rounded(r_fake + err_f, qr.dtype, True)
    balls_per_fake = torch.zeros(m, dtype=torch.int64, device=qr.device)
    covered, recalled = (torch.zeros(n, dtype=torch.bool, device=qr.device) for _ in range(2))

    def inside(s, d, lo, hi, radius, real_rows=None):
        """d < radius for real rows (s.. or s + real_rows) x fake block d: sure below lo; between lo and hi (the
        GEMM's error band) decided from exact distances; radius(rows, cols): the exact radii of those entries."""
        out = d < lo
        rows, cols = ((d <= hi) & ~out).nonzero(as_tuple=True)
        if len(rows):
            ids = rows + s if real_rows is None else real_rows[rows] + s
            ex = _exact_sqdist(raw_r, raw_f, ids.cpu().numpy(), cols.cpu().numpy())
            hit = torch.as_tensor(ex, device=d.device) < radius(rows, cols)
            out[rows[hit], cols[hit]] = True
        return out

    def visit(s, r, d):  # d: [chunk, m] GEMM squared real-fake distances, r: the chunk's exact real radii
        err = tol * (norms_r[s:s + len(r)] + norms_f.max())
        lo, hi = _rounded(r - err, d.dtype, False)[:, None], _rounded(r + err, d.dtype, True)[:, None]
        in_real = inside(s, d, lo, hi, lambda a, c: r[a])
        balls_per_fake.add_(in_real.view(torch.uint8).sum(0, dtype=torch.int32))
        covered[s:s + len(r)] = in_real.any(1)
        rec = (d < lo_f[None]).any(1)  # recall needs any(): only the rows not yet sure look at the band
        if len(rest := (~rec).nonzero().view(-1)):
            rec[rest] = inside(s, d[rest], lo_f[None], hi_f[None], lambda a, c: r_fake[c], rest).any(1)
        recalled[s:s + len(r)] = rec

    _knn_pass(qr, bank, k, tol, lambda i, j: _exact_sqdist(raw_r, raw_r, i, j), visit, mem_mb)
    return {"precision": float((balls_per_fake > 0).double().mean()), "recall": float(recalled.double().mean()),
            "density": int(balls_per_fake.sum()) / (k * m), "coverage": float(covered.double().mean())}


def _as_images(x):
    x = _as_tensor(x)
    if x.ndim == 2:
        return x.reshape(1, 1, *x.shape)
    return x[None] if x.ndim == 3 else x


def _ssim_cs(x, y, data_range, win=11, sigma=1.5):
    """Per-image SSIM and contrast-structure terms (Wang et al. 2004: Gaussian 11 / 1.5, K1=0.01, K2=0.03),
    'valid' filtering as in the reference MS-SSIM code."""
    c, g = x.shape[1], torch.exp(-((torch.arange(win, dtype=torch.float64) - (win - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype).to(x.device)
    wh, ww = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    filt = lambda t: F.conv2d(F.conv2d(t, wh, groups=c), ww, groups=c)  # noqa: E731 - separable, 'valid'
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx  # local variances and covariance
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
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
    weights renormalised to sum to 1 (returned value is then not comparable with 5-scale numbers, and stated).
    Convention of pytorch-msssim (ms_ssim, 1.0): 11-tap Gaussian 1.5, 'valid' filtering, relu on cs and on the last
    ssim, 2x2 average pooling between scales where an odd side is zero-padded by one on both ends and the padding
    counts in the mean (avg_pool2d(padding=side % 2)); at 5 scales (sides >= 161) the values equal its ms_ssim."""
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
            pad = (x.shape[-2] % 2, x.shape[-1] % 2)  # pytorch-msssim: an odd side gets one zero on both ends,
            x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)  # counted in the 2x2 mean
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
    qa, best = _augment(q), torch.full((len(q),), float("inf"), dtype=q.dtype, device=q.device)
    arg = torch.full((len(q),), -1, dtype=torch.long, device=q.device)  # the nearest bank row so far
    win = torch.zeros_like(q)                                            # and its values
    offset = 0                                                           # bank rows seen before this batch
    for b in bank_batches:
        b = _as_tensor(b, q.device).to(q.dtype)
        _augment(b, bank=(bb := b.new_empty(len(b), b.shape[1] + 2)))
        d, j = (qa @ bb.T).min(1)
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


def ranks(values, higher_is_better=False):
    """1 = best; tied values share the mean of their ranks (our choice: the Spearman / scipy rankdata 'average'
    convention; chexgenbench Table 10's tied ranks follow no stated rule). NaN values are not allowed."""
    v = np.asarray(values, np.float64)
    if not np.isfinite(v).all():
        raise ValueError(f"ranks of non-finite values {v.tolist()}")
    v = -v if higher_is_better else v
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(1, len(v) + 1)
    for x in np.unique(v):  # ties: the mean rank of the group
        r[v == x] = r[v == x].mean()
    return r


def rank_correlation(a, b):
    """Pearson correlation of two rank vectors (chexgenbench App. A.3 / A.4 correlate ranks: Table 9's 0.947,
    Table 10's 0.77 / 0.78); on ranks without ties this is Spearman's rho."""
    return pearson(a, b)


def prevalence_fidelity(counts, fd):
    """chexgenbench App. A.3 / Table 9: per pathology its training count (prevalence rank 1 = most frequent) and
    per-pathology FD (fidelity rank 1 = lowest FD), and the correlation of the two rankings. counts, fd: dicts by
    pathology; only pathologies with both (and an FD) count."""
    names = [n for n in counts if n in fd and fd[n] is not None and np.isfinite(fd[n])]
    if len(names) < 3:
        return {"skipped": f"per-pathology FD for {len(names)} pathologies with a count; need at least 3"}
    pr = ranks([counts[n] for n in names], higher_is_better=True)
    fr = ranks([fd[n] for n in names])
    return {"correlation": rank_correlation(pr, fr), "n": len(names),
            "table": [{"pathology": n, "count": int(counts[n]), "prevalence_rank": float(a), "fd": float(fd[n]),
                       "fidelity_rank": float(b)} for n, a, b in zip(names, pr, fr)]}


def fidelity_utility(fd, utility):
    """chexgenbench App. A.4 / Table 10: across models (or pathologies), fidelity rank (1 = lowest FD) against
    utility rank (1 = highest downstream score, e.g. AUROC), Pearson of the ranks. fd, utility: dicts by name."""
    names = [n for n in fd if n in utility]
    if len(names) < 3:
        return {"skipped": f"{len(names)} names with both an FD and a utility value; need at least 3"}
    fr, ur = ranks([fd[n] for n in names]), ranks([utility[n] for n in names], higher_is_better=True)
    return {"correlation": rank_correlation(fr, ur), "n": len(names),
            "table": [{"name": n, "fd": float(fd[n]), "fidelity_rank": float(a), "utility": float(utility[n]),
                       "utility_rank": float(b)} for n, a, b in zip(names, fr, ur)]}


class FeatureLPIPS:
    """LPIPS-style distance in a transformers ViT's feature space (radit App. C.1 Eq. 13; Zhang et al. 2018 without
    learned weights): patch-token hidden states at `layers` (1-based; default 4 evenly spaced, radit Table 15's
    [3, 6, 9, 12] for 12 layers), each unit-normalised along channels, squared distance averaged over positions,
    then over layers. Images float [N, 1, H, W] in [0, 1]; preprocessing is the model's image processor (resize,
    centre crop, mean / std) done on float tensors, so 16-bit detail is kept and gradients flow when asked for."""

    def __init__(self, name, layers=None, weights_dir="", allow_random_weights=False, device="cpu", offline=False,
                 batch_size=16):
        self.ex = ex = _hf_extractor(name, weights_dir, allow_random_weights, torch.device(device), offline)
        self.name = name
        self.weights, self.random_weights = ex.weights, ex.random_weights
        self.batch_size = batch_size
        c, p = getattr(ex.net.config, "vision_config", ex.net.config), ex.processor
        n = c.num_hidden_layers  # radit Table 15 (attention pooling over [3, 6, 9, 12] of Rad-DINO's 12)
        self.layers = tuple(int(v) for v in layers or sorted({max(1, round(n * q / 4)) for q in (1, 2, 3, 4)}))
        if bad := [v for v in self.layers if not 1 <= v <= n]:
            raise ValueError(f"FeatureLPIPS: layers {bad} outside 1..{n} of {name}")
        self.skip = 1 + int(getattr(c, "num_register_tokens", 0) or 0)  # CLS (+ registers) are not positions
        crop, size = getattr(p, "crop_size", None), getattr(p, "size", None) or {}
        self.crop = (crop["height"], crop["width"]) if crop and getattr(p, "do_center_crop", False) else None
        self.short, self.resize = size.get("shortest_edge"), None if size.get("shortest_edge") else (size["height"],
                                                                                                    size["width"])
        self.size = self.crop[0] if self.crop else (self.short or self.resize[0])  # side to load images at
        self.mode = "bicubic" if int(getattr(p, "resample", 2)) == 3 else "bilinear"
        self.mean, self.std = (torch.tensor(v, device=ex.device).view(1, 3, 1, 1) for v in (p.image_mean, p.image_std))

    def pixel_values(self, x):
        """The image processor on float tensors: resize (shortest edge), centre crop, gray -> RGB, mean / std."""
        h, w = x.shape[-2:]
        hw = self.resize or (round(h * self.short / min(h, w)), round(w * self.short / min(h, w)))
        if hw != (h, w):
            x = F.interpolate(x, size=hw, mode=self.mode, antialias=True, align_corners=False).clamp(0, 1)
        if self.crop:
            t, s = (hw[0] - self.crop[0]) // 2, (hw[1] - self.crop[1]) // 2
            x = x[..., t:t + self.crop[0], s:s + self.crop[1]]
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std

    def distance(self, x, y):
        """Eq. 13 per pair: Tensor [N] (float64, CPU) for paired batches x, y [N, 1, H, W] in [0, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"FeatureLPIPS: expected two [N, 1, H, W] batches, got {[*x.shape]}, {[*y.shape]}")
        out, dev = [], self.ex.device
        with torch.set_grad_enabled(x.requires_grad or y.requires_grad):
            for s in range(0, len(x), self.batch_size):
                z = self.pixel_values(torch.cat([x[s:s + self.batch_size], y[s:s + self.batch_size]]).float().to(dev))
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    hs = self.ex.net(pixel_values=z, output_hidden_states=True).hidden_states
                d = 0
                for layer in self.layers:  # hidden_states[0] is the embedding output, [l] the l-th block's
                    f = hs[layer][:, self.skip:].float()
                    a, b = (f / (f.norm(dim=-1, keepdim=True) + 1e-10)).chunk(2)  # unit norm along channels
                    d = d + ((a - b) ** 2).sum(-1).mean(-1) / len(self.layers)
                out.append(d.double().cpu())
        return torch.cat(out)


def random_pairs(n, n_pairs=256, seed=0):
    """Indices (i, j) of n_pairs random ordered pairs of distinct items among n (seeded; radit Eq. 14's set P)."""
    if n < 2:
        raise ValueError(f"random pairs need at least 2 images, got {n}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_pairs)
    return i, (i + rng.integers(1, n, n_pairs)) % n  # uniform over j != i


def random_pair_distance(lp, x, n_pairs=256, seed=0):
    """Mean FeatureLPIPS distance of random pairs of distinct real images x [N, 1, H, W] (Eq. 14's denominator)."""
    i, j = random_pairs(len(x), n_pairs, seed)
    return float(lp.distance(x[torch.as_tensor(i)], x[torch.as_tensor(j)]).mean())


def relative_lpips(d, d_random):
    """rLPIPS (radit App. C.1 Eq. 14): an edit's distance as a fraction of the mean random-pair distance."""
    if not float(d_random) > 0:
        raise ValueError(f"relative_lpips: the random-pair distance must be > 0, got {float(d_random)}")
    return d / float(d_random)


# ----------------------------------------------------------------------------------------------------------------
# Data: image folders and FORMAT.md §1 datasets, preprocessing, weights, feature extractors, cache


def _read_folder_meta(path):
    """Rows of the optional meta.csv beside a folder of images (any columns; _match_meta picks the key)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f"metrics: {path}: not a readable CSV table ({e}); expected a meta.csv") from None


def _check_dataset_rows(root, rows, where):
    """A dataset's rows against its shards, before any image is read: each shard a readable safetensors file with
    uint16 `images` (shard_tensor_shape: a float or uint8 shard is refused, so no NaN pixels), each index inside it
    (check_shard_rows). Without this a bad row was skipped as 'unreadable' and the metrics ran on fewer images."""
    listed = set()
    for r in rows:
        try:
            listed.add(int(r["shard"]))
        except (TypeError, ValueError):
            check_shard_rows([r], {}, where)            # names the row and its cell
    sizes = {s: shard_tensor_shape(os.path.join(root, "shards", f"{s:05d}.safetensors"), "images", "U16")[0]
             for s in sorted(listed)}
    check_shard_rows(rows, sizes, where)


class ImageSet:
    """Images of a folder (recursive, sorted, case-insensitive extensions) or a §4 dataset (meta.csv + shards)."""

    def __init__(self, root, split=""):
        self.root = root = os.path.abspath(root)
        if not os.path.isdir(root):
            raise SystemExit(f"metrics: {root} is not a folder (expected images or a dataset with meta.csv)")
        meta_path = os.path.join(root, "meta.csv")
        self.is_dataset = os.path.isdir(os.path.join(root, "shards")) and os.path.isfile(meta_path)
        self.meta = None                   # rows of meta.csv, one per image, when there is one
        self._shards = {}                  # open shard files
        self.info = {"high_bit": False}    # set when a 16-bit / float file is read
        if self.is_dataset:  # read_meta: the columns, ids valid and unique (one-line errors)
            rows, _ = read_meta(meta_path, required=("shard", "index"), split=split or None,
                                what="a dataset folder (meta.csv + shards/)")
            if not rows:
                raise SystemExit(f"metrics: {meta_path} has no rows with split={split!r}")
            _check_dataset_rows(root, rows, meta_path)
            self.items, self.meta = [(int(r["shard"]), int(r["index"])) for r in rows], rows
            self.ids = [r["id"] for r in rows]
        else:
            self.items = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                                if n.lower().endswith(IMAGE_EXTS))
            if not self.items:
                raise SystemExit(f"metrics: no images in {root} (looked recursively for {', '.join(IMAGE_EXTS)})")
            self.ids = [os.path.splitext(os.path.relpath(f, root))[0].replace(os.sep, "/") for f in self.items]
            if os.path.isfile(meta_path):
                self.meta = self._match_meta(_read_folder_meta(meta_path), meta_path)

    def _match_meta(self, rows, path):
        """Rows of a folder's meta.csv belong to images by `id` (relative path or file stem) or by `file`/`path`."""
        key, by = next((c for c in ("id", "file", "path", "filename") if rows and c in rows[0]), None), {}
        seen = set()
        for r in rows if key else []:
            if r[key] in seen:  # two rows for one image: which one labels it would be an accident of order
                raise SystemExit(f"metrics: {path}: {key} {r[key]!r} appears more than once; expected unique ids")
            seen.add(r[key])
            v = os.path.splitext((r[key] or "").replace("\\", "/"))[0]
            by[v] = by[v.rsplit("/", 1)[-1]] = r
        if not any(meta := [by.get(i, by.get(i.rsplit("/", 1)[-1], {})) for i in self.ids]):
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
        for f, st in ((f, os.stat(f)) for f in files):
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
                self.info["high_bit"] = True  # shards hold uint16
                return np.asarray(self._shards[path].get_slice("images")[idx:idx + 1], np.float32)[0, 0] / 65535.0
            return read_image(self.items[i], self.info)
        except Exception as e:  # noqa: BLE001 - an unreadable file is counted, or fatal under --strict
            self.last_error = f"{self.items[i]}: {e}"
            return None


def read_image(path, info=None):
    """PNG 8/16-bit, JPEG, TIFF; gray or RGB(A) -> float32 gray [H, W] in [0, 1]. info (a dict): 'high_bit' is set
    to True for a 16-bit / integer / float file (peer tools read those through convert('RGB'), which clips)."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit PNGs open as I;16 (I in older Pillow)
            if info is not None:
                info["high_bit"] = True
            a = np.asarray(im, dtype=np.float32) / (1.0 if im.mode == "F" else 65535.0)
            if im.mode == "F" and not np.isfinite(a).all():  # np.clip below would keep a NaN, and FD would fail
                raise SystemExit(f"metrics: {path}: NaN or infinite pixel values; expected finite intensities")
        else:
            a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0  # RGB -> ITU-R 601 luma
    return np.clip(a, 0.0, 1.0)


def square(img, fit="crop", centre="floor"):
    """Centre-crop (or zero-pad) to a square: the aspect ratio is never squashed. centre='xrv' places the crop as
    torchxrayvision's XRayCenterCrop (start w // 2 - s // 2: one pixel later than (w - s) // 2 when w is even and
    the side s odd)."""
    h, w = img.shape
    s = max(h, w) if fit == "pad" else min(h, w)
    if h == w or fit != "pad":
        top, left = (h // 2 - s // 2, w // 2 - s // 2) if centre == "xrv" else ((h - s) // 2, (w - s) // 2)
        return img[top:top + s, left:left + s]
    out = np.zeros((s, s), np.float32)
    out[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = img
    return out


def resize(img, size):
    """Bilinear resize with antialiasing (PIL-like when downsampling), float32 [H, W] -> [size, size]."""
    if img.shape == (size, size):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img, np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def _tf1_bilinear(img, size):
    """TensorFlow 1.x resize_bilinear(align_corners=False), as torch-fidelity re-implements it: source coordinate
    dst * (in / out) in float32 (no half-pixel offset), upper neighbour clamped to the last pixel, no antialiasing."""
    def taps(n):
        src = np.arange(size, dtype=np.float32) * np.float32(n / size)
        lo = src.astype(np.int64)
        return lo, np.minimum(lo + 1, n - 1), src - lo.astype(np.float32)
    (y0, y1, dy), (x0, x1, dx) = taps(img.shape[0]), taps(img.shape[1])
    top, bottom = img[y0], img[y1]
    top, bottom = (r[:, x0] + (r[:, x1] - r[:, x0]) * dx for r in (top, bottom))
    return (top + (bottom - top) * dy[:, None]).astype(np.float32)


def resize_as(img, size, mode="antialias"):
    """Float [H, W] in [0, 1] -> [size, size] by one tool's convention (RESIZE_MODES): 'antialias' (ours, bilinear
    + antialias), 'pytorch-fid' (F.interpolate bilinear, align_corners=False, no antialias), 'clean' (clean-fid:
    PIL bicubic on the float image in [0, 255], clipped), 'tf1' (torch-fidelity / torchmetrics: TF1 bilinear)."""
    if mode == "antialias":
        return resize(img, size)
    if mode == "pytorch-fid":
        t = torch.from_numpy(np.ascontiguousarray(img, np.float32))[None, None]
        return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    if mode == "clean":
        im = Image.fromarray(np.ascontiguousarray(img, np.float32) * 255, mode="F").resize((size, size),
                                                                                         Image.BICUBIC)
        return np.clip(np.asarray(im, np.float32), 0, 255) / 255
    if mode == "tf1":
        return _tf1_bilinear(np.asarray(img, np.float32) * 255, size) / 255
    raise ValueError(f"resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")


def xrv_skimage_resize(img, size=224):
    """torchxrayvision's documented XRayResizer: skimage.transform.resize(img, (1, size, size), mode='constant',
    preserve_range=True) on xrv-normalised values [-1024, 1024], i.e. a Gaussian pre-filter of sigma
    max(0, (factor - 1) / 2) per downsampled axis (zero padding), bilinear zoom on the pixel grid (half-pixel
    centres, zero outside), clipped to the input's range. In float64 on [0, 1] input; returns [0, 1] float32."""
    import scipy.ndimage as ndi
    v = np.asarray(img, np.float64) * 2048 - 1024
    factors = np.asarray(v.shape, np.float64) / size
    if (factors > 1).any():
        v_f = ndi.gaussian_filter(v, np.maximum(0, (factors - 1) / 2), mode="constant", cval=0.0)
    else:
        v_f = v
    out = ndi.zoom(v_f, 1 / factors, order=1, mode="grid-constant", cval=0.0, grid_mode=True)
    lo, hi = v.min(), v.max()
    keep = (out == 0) if not lo <= 0 <= hi else None  # skimage keeps cval-valued pixels when cval is out of range
    out = np.clip(out, lo, hi)
    if keep is not None:
        out[keep] = 0
    return ((out + 1024) / 2048).astype(np.float32)


def prepare(img, size, fit="crop", compat=False, centre="floor"):
    """The default preprocessing path: [CheXGenBench 299 squash] -> square by crop/pad -> resize to `size`."""
    if compat:  # chexgenbench's code: PIL resize to (299, 299) regardless of aspect ratio
        img = np.asarray(Image.fromarray(img).resize((299, 299), Image.BILINEAR), np.float32)
    return resize(square(img, fit, centre), size) if size else square(img, fit, centre)


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
    dirs = ([weights_dir] if weights_dir else []) + [os.path.expanduser(d) for d in extra_dirs]
    if found := [os.path.join(d, f) for d in dirs for f in filenames if os.path.isfile(os.path.join(d, f))]:
        return found[0]
    if url and _online(offline):
        dst = os.path.join(os.path.expanduser(extra_dirs[0]) if extra_dirs else weights_dir, os.path.basename(url))
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            print(f"metrics: downloading {url}", file=sys.stderr)
            with urllib.request.urlopen(url, timeout=30) as r:
                data = r.read()

            def write(tmp):
                with open(tmp, "wb") as fh:
                    fh.write(data)
            atomic_save(dst, write)
            return dst
        except OSError as e:
            raise WeightsMissing(f"could not download {filenames[-1]} from {url} ({e}); put it in a folder "
                                 f"given by --weights-dir") from e
    raise WeightsMissing(f"weights file {filenames[-1]} not found (from {url}); offline: download it and pass "
                         f"--weights-dir DIR, or --allow-random-weights for a smoke test")


def _first_line(e):
    """An exception's message as one line (torch's and safetensors' errors can span several)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load_state(path):
    """State dict from safetensors, or from a tensor-only pickle with torch.load(weights_only=True); one line naming
    the file when it is missing, truncated, empty or neither format."""
    if not os.path.isfile(path):
        raise SystemExit(f"metrics: {path}: no such weights file")
    try:
        if path.endswith(".safetensors"):
            return load_pt(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling foreign bytes fails in many ways (KeyError, EOFError ...)
        raise SystemExit(f"metrics: {path}: not a readable weights file ({_first_line(e)}); expected safetensors "
                         f"or a tensor-only PyTorch pickle") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise SystemExit(f"metrics: {path}: holds {type(sd).__name__}, not a state dict of tensors")
    return sd


def load_into(model, sd, name):
    """Strict load ignoring BatchNorm's num_batches_tracked (absent from old checkpoints); errors name the keys."""
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    own = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    if (missing := sorted(own - set(sd))) + (extra := sorted(set(sd) - own)):
        raise SystemExit(f"metrics: {name} does not match the layout: missing {missing[:5]}, unexpected {extra[:5]}")
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # same names, other shapes
        raise SystemExit(f"metrics: {name} does not match the layout ({_first_line(e)})") from None
    return model


class _Stub:
    """Stand-in for any class named in a pickled checkpoint: records its state, runs none of its code."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state


def safe_load_pickled_module(path, max_rounds=200):
    """Tensors of a whole pickled nn.Module (torchxrayvision saves the model object, not a state dict) without
    running its code: torch.load(weights_only=True), retried with an inert stub for each class the unpickler
    refuses (torch.serialization.safe_globals), then parameters and buffers are read from the stubs' state."""
    stubs, obj = [], None
    for _ in range(max_rounds):
        try:
            with torch.serialization.safe_globals(stubs):
                obj = torch.load(path, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as e:  # "... GLOBAL module.Name was not an allowed global ..."
            name = str(e).split("GLOBAL ", 1)[1].split()[0].rstrip(".,") if "GLOBAL " in str(e) else ""
            if not name or any(f"{s.__module__}.{s.__qualname__}" == name for s in stubs):
                raise
            mod, cls = name.rpartition(".")[::2]
            stubs.append(type(cls, (_Stub,), {"__module__": mod, "__qualname__": cls}))
    if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
        return dict(obj)
    out, todo = {}, [(obj, "")]
    while todo:  # walk the module tree through the stubs' recorded state
        o, prefix = todo.pop()
        st = getattr(o, "_state", None) or getattr(o, "__dict__", {})
        st = st[0] if isinstance(st, tuple) and len(st) == 2 else st  # (dict, slotstate) form
        if isinstance(st, dict):
            out.update({prefix + k: v.detach().clone() for kind in ("_parameters", "_buffers")
                        for k, v in (st.get(kind) or {}).items() if torch.is_tensor(v)})
            todo += [(c, prefix + k + ".") for k, c in (st.get("_modules") or {}).items() if c is not None]
    if not out:
        raise SystemExit(f"metrics: {path} holds no module parameters that could be read (or too many unknown classes)")
    return out


XRV_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
XRV_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/" + XRV_FILE
XRV_SAFE = "xrv-densenet121-res224-all.safetensors"
XRV_MIMIC_FILE = "mimic_ch-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"  # densenet121-res224-mimic_ch
XRV_MIMIC_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/" + XRV_MIMIC_FILE
XRV_MIMIC_SAFE = "xrv-densenet121-res224-mimic_ch.safetensors"
XRV_SIZE = 224  # the xrv models' input side (model_urls[...]['input_resolution'])
# torchxrayvision models.py model_urls[...]: each model's output order ("labels"; '' = an output that model was
# not trained for) and its operating points ("op_threshs", NaN for those outputs), as its DenseNet.forward uses them.
XRV_LABELS = {
    "all": ["Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
            "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion",
            "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"],
    "mimic_ch": ["Atelectasis", "Consolidation", "", "Pneumothorax", "Edema", "", "", "Effusion", "Pneumonia", "",
                 "Cardiomegaly", "", "", "", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]}
XRV_OP_THRESHS = {
    "all": [0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724, 0.103246614,
            0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766, 0.053369623, 0.035975814,
            0.20204692, 0.05015312],
    "mimic_ch": [0.09121389, 0.010573786, math.nan, 0.005023008, 0.003698257, math.nan, math.nan, 0.08001232,
                 0.037242252, math.nan, 0.05006329, math.nan, math.nan, math.nan, 0.019866971, 0.03823637,
                 0.11303808, 0.0069147074]}
XRV_MODELS = {  # --classifier / fetch-weights name: the xrv model, its released file and URL, the converted file
    "xrv": {"kind": "all", "file": XRV_FILE, "url": XRV_URL, "safe": XRV_SAFE},
    "xrv_mimic": {"kind": "mimic_ch", "file": XRV_MIMIC_FILE, "url": XRV_MIMIC_URL, "safe": XRV_MIMIC_SAFE}}
FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_FILE
HF_ALIASES = {"raddino": "microsoft/rad-dino", "dinov2": "facebook/dinov2-base",
              "clip": "openai/clip-vit-base-patch32"}
EXIT_NO_FIDELITY = 3  # exit status when FD / KID / PRDC were asked for and no feature network could be loaded
CNN_WEIGHTS = {  # name: (file looked for in --weights-dir / the cache, where it comes from, the cache it goes to)
    "inception": (FID_FILE, FID_URL, "~/.cache/torch/hub/checkpoints"),
    "xrv": (XRV_FILE, XRV_URL, "~/.torchxrayvision/models_data"),
    "xrv_mimic": (XRV_MIMIC_FILE, XRV_MIMIC_URL, "~/.torchxrayvision/models_data")}

BIOVIL_T_REPO = "microsoft/BiomedVLP-BioViL-T"
BIOVIL_T_REVISION = "v1.0"  # hi-ml pretrained.py BIOVIL_T_COMMIT_TAG
BIOVIL_T_IMAGE_FILE = "biovil_t_image_model_proj_size_128.pt"  # hi-ml pretrained.py BIOVIL_T_IMAGE_WEIGHTS_NAME
BIOVIL_T_TEXT_FILES = ("model.safetensors", "pytorch_model.bin")  # the CXR-BERT weights, either format
BIOVIL_T_FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "pytorch_model.bin", BIOVIL_T_IMAGE_FILE)
BIOVIL_T_RESIZE, BIOVIL_T_CROP = 512, 448  # hi-ml image/utils.py: Resize(512), CenterCrop(448) for BioViL-T


def biovil_t_folder_name(weights_dir):
    return os.path.join(weights_dir or "DIR", BIOVIL_T_REPO.replace("/", "--"))


def find_biovil_t(weights_dir="", offline=False):
    """The folder holding BioViL-T's released files: --weights-dir/microsoft--BiomedVLP-BioViL-T (or
    --weights-dir itself), else the Hugging Face cache (what fetch-weights without --weights-dir fills). A folder
    that lacks a file is named with that file; no folder: WeightsMissing naming the folder, files and fetch-weights.
    Never downloads here (our choice: about 1 GB, fetched only on request by fetch-weights)."""
    cands = [biovil_t_folder_name(weights_dir), weights_dir] if weights_dir else []
    try:
        from huggingface_hub import snapshot_download
        cands.append(snapshot_download(BIOVIL_T_REPO, revision=BIOVIL_T_REVISION, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (LocalEntryNotFoundError, or no huggingface_hub)
        pass
    get = (f"online: python metrics.py fetch-weights --only biovil_t --weights-dir {weights_dir or 'DIR'}, "
           f"or copy the files of https://huggingface.co/{BIOVIL_T_REPO} (revision {BIOVIL_T_REVISION})")
    for c in (c for c in cands if os.path.isfile(os.path.join(c, "config.json"))):
        need = [("image weights", (BIOVIL_T_IMAGE_FILE, BIOVIL_T_IMAGE_FILE.replace(".pt", ".safetensors"))),
                ("text weights", BIOVIL_T_TEXT_FILES), ("vocabulary", ("vocab.txt",))]
        for what, names in need:
            if not any(os.path.isfile(os.path.join(c, n)) for n in names):
                raise WeightsMissing(f"BioViL-T {what} {names[0]} missing from {c}; {get}")
        return c
    raise WeightsMissing(f"BioViL-T not found: expected {biovil_t_folder_name(weights_dir)}/ holding "
                         f"{', '.join(BIOVIL_T_FILES)}; {get}")


def _state_as_safetensors(path, keep=lambda k: True):
    """State dict of a released weights file, read once with torch.load(weights_only=True) and kept beside it as
    safetensors (later runs read that; as convert_xrv does). `keep` selects the keys this file uses. A folder that
    is not writable is used as it is, reading the pickle each time."""
    safe = os.path.splitext(path)[0] + ".safetensors"
    if os.path.isfile(safe):
        return load_pt(safe), safe
    sd = {k: v.contiguous() for k, v in load_state(path).items() if keep(k)}
    if os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        meta = {"source": os.path.basename(path), "converted_by": f"metrics.py {VERSION}"}
        atomic_save(safe, lambda tmp: save_pt(sd, tmp, metadata=meta))
        return sd, safe
    return sd, path


def _cxr_bert_key(k):
    """Keys of CXR-BERT's file that the text embedding uses: bert.* and cls_projection_head.*; not the MLM head
    (cls.predictions.*, BertForMaskedLM's), nor bert.embeddings.position_ids (a buffer older transformers saved)."""
    return k.startswith(("bert.", "cls_projection_head.")) and k != "bert.embeddings.position_ids"


@dataclass
class BioViLT:
    """The alignment score's networks as load_biovil_t returns them."""
    image: nn.Module      # BioViLTImageModel
    text: nn.Module       # CXRBertTextModel
    tokenizer: object     # transformers BertTokenizer of the folder's vocab.txt
    files: dict           # the weights files read: {"image": path, "text": path}


def load_biovil_t(folder, device="cpu"):
    """BioViLT (image model, text model, tokenizer, weights files) from a folder of BioViL-T's released files, read
    without trust_remote_code: config.json -> transformers.BertConfig (its CXR-BERT fields: BertConfig's plus
    projection_size), vocab.txt (+ tokenizer_config.json's do_lower_case) -> BertTokenizer, the .pt image state dict
    and the CXR-BERT state dict loaded unchanged by name into BioViLTImageModel / CXRBertTextModel (strict)."""
    from transformers import BertConfig, BertTokenizer
    try:
        with open(os.path.join(folder, "config.json")) as fh:
            cfg = json.load(fh)
        tok_cfg = {}
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            with open(os.path.join(folder, "tokenizer_config.json")) as fh:
                tok_cfg = json.load(fh)
        with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as fh:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(fh)}
    except (OSError, ValueError) as e:
        raise SystemExit(f"metrics: {folder}: BioViL-T config.json / tokenizer_config.json / vocab.txt not readable "
                         f"({_first_line(e)})") from None
    proj = int(cfg.get("projection_size", BIOVIL_T_JOINT))
    drop = ("architectures", "auto_map", "model_type", "transformers_version", "projection_size")
    bert_cfg = BertConfig(**{k: v for k, v in cfg.items() if k not in drop})
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=bool(tok_cfg.get("do_lower_case", True)))
    image_src = os.path.join(folder, BIOVIL_T_IMAGE_FILE)
    if os.path.isfile(image_src):
        sd, image_src = _state_as_safetensors(image_src)
    else:  # only the converted file was copied here
        image_src = image_src.replace(".pt", ".safetensors")
        sd = load_pt(image_src)
    image = load_into(BioViLTImageModel(), sd, image_src).eval().requires_grad_(False).to(device)
    text_src = next(os.path.join(folder, n) for n in BIOVIL_T_TEXT_FILES if os.path.isfile(os.path.join(folder, n)))
    if text_src.endswith(".bin"):
        sd, text_src = _state_as_safetensors(text_src, _cxr_bert_key)
    else:
        sd = {k: v for k, v in load_state(text_src).items() if _cxr_bert_key(k)}
    text = load_into(CXRBertTextModel(bert_cfg, proj), sd, text_src).eval().requires_grad_(False).to(device)
    return BioViLT(image, text, tokenizer, {"image": image_src, "text": text_src})


def biovil_prepare(img):
    """hi-ml's BioViL-T input for a float image [H, W] in [0, 1] -> float32 [448, 448] in [0, 1]: remap_to_uint8
    (min-max to 0..255, truncated to uint8; a constant image gives 0, where hi-ml divides by zero: our choice),
    torchvision Resize(512) on the PIL image (shorter side 512, longer int(512 * long / short), PIL bilinear),
    CenterCrop(448) (offsets int(round((side - 448) / 2))), ToTensor (/ 255). No mean / std normalisation."""
    a = np.asarray(img, np.float64) - np.min(img)
    a = a / a.max() * 255 if a.max() > 0 else a
    im = Image.fromarray(a.astype(np.uint8))
    w, h = im.size
    s, c = BIOVIL_T_RESIZE, BIOVIL_T_CROP
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    im = im.resize(size, Image.BILINEAR) if size != (w, h) else im
    left, top = int(round((im.size[0] - c) / 2.0)), int(round((im.size[1] - c) / 2.0))
    return np.asarray(im.crop((left, top, left + c, top + c)), np.float32) / 255.0


def cxr_bert_inputs(tokenizer, texts, max_length=512):
    """hi-ml TextInput.tokenize_input_prompts: trailing '!', '?', '.' stripped, [CLS] ... [SEP], padded to the
    longest. hi-ml refuses a prompt over max_position_embeddings tokens; here it is truncated and counted (our
    choice: one long report does not stop a 50k-image run). -> ({input_ids, attention_mask}, n truncated)."""
    texts = [t.rstrip("!?.") for t in texts]
    n_long = sum(len(ids) > max_length for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])
    enc = tokenizer(texts, add_special_tokens=True, padding="longest", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, n_long


def weights_guide(names, weights_dir=""):
    """Lines saying, per feature network in `names`, which file or folder --weights-dir must hold and where it comes
    from; plus fetch-weights, which downloads them on a machine that is online."""
    d = weights_dir or "DIR"
    lines = [f"get the weights onto this machine, then rerun with --weights-dir {d}:",
             f"  online:  python metrics.py fetch-weights --weights-dir {d} --only {','.join(names)}   "
             f"(on another machine if this one is offline, then copy {d} here)",
             "  by hand, the layout --weights-dir expects:"]
    for n in names:
        if n in CNN_WEIGHTS:
            f, url = CNN_WEIGHTS[n][:2]
            cache = CNN_WEIGHTS[n][2]
            extra = f" (converted once to {XRV_MODELS[n]['safe']} beside it)" if n in XRV_MODELS else ""
            lines.append(f"    {n:<10} {d}/{f}{extra}  from {url}  (or in {cache})")
        elif n == "biovil_t":
            lines.append(f"    {n:<10} {biovil_t_folder_name(d)}/  {', '.join(BIOVIL_T_FILES)} of "
                         f"https://huggingface.co/{BIOVIL_T_REPO} (revision {BIOVIL_T_REVISION}; or in the Hugging "
                         "Face cache); the .pt / .bin are converted once to .safetensors beside them")
        else:
            repo = HF_ALIASES.get(n, n)
            lines.append(f"    {n:<10} {d}/{repo.replace('/', '--')}/  a transformers save_pretrained folder "
                         f"(config.json, model.safetensors, preprocessor_config.json) of https://huggingface.co/{repo}"
                         "  (or in the Hugging Face cache)")
    return lines


def correlate(argv):
    """metrics.py correlate: chexgenbench App. A.4's fidelity-utility rank correlation from metrics.py's own
    results.json files. --utility CSV with columns results (a results.json) and utility (higher = better, e.g. a
    downstream macro AUROC), one row per model: FD of --space in each file; or columns pathology and utility with
    --results one results.json: per-pathology FD (its conditions section) against per-pathology utility."""
    p = argparse.ArgumentParser(prog="metrics.py correlate", description=correlate.__doc__.split(":", 1)[1])
    p.add_argument("--utility", required=True, help="CSV: results,utility (per model) or pathology,utility")
    p.add_argument("--results", default="", help="the results.json of the per-pathology form")
    p.add_argument("--space", default="raddino", help="feature space whose FD is the fidelity (Table 9: RadDino)")
    p.add_argument("--out", default="", help="JSON of the table and the correlation")
    a = p.parse_args(argv)
    rows = _read_folder_meta(a.utility)

    def fd_of(path, group=None):
        try:
            with open(path) as fh:
                res = json.load(fh)
        except (OSError, ValueError) as e:
            raise SystemExit(f"metrics: correlate: {path}: not a readable results.json ({e})") from None
        d = res.get("conditions", {}).get(a.space, {}).get(group, {}) if group else \
            res.get("features", {}).get(a.space, {})
        if "fd" not in d:
            raise SystemExit(f"metrics: correlate: {path} has no FD for feature space {a.space!r}"
                             + (f", pathology {group!r}" if group else "") + "; expected metrics.py results")
        return d["fd"]

    def number(r, col):
        try:
            return float(r[col])
        except (KeyError, TypeError, ValueError):
            raise SystemExit(f"metrics: correlate: {a.utility}: {col} {r.get(col)!r}; expected a number") from None

    if rows and "pathology" in rows[0]:
        if not a.results:
            raise SystemExit("metrics: correlate: a pathology,utility CSV needs --results RESULTS.json")
        out = fidelity_utility({r["pathology"]: fd_of(a.results, r["pathology"]) for r in rows},
                               {r["pathology"]: number(r, "utility") for r in rows})
    elif rows and "results" in rows[0]:
        out = fidelity_utility({r["results"]: fd_of(r["results"]) for r in rows},
                               {r["results"]: number(r, "utility") for r in rows})
    else:
        raise SystemExit(f"metrics: correlate: {a.utility}: expected columns results,utility or pathology,utility")
    out |= {"space": a.space, "section": "chexgenbench App. A.4 (Pearson of ranks)"}
    for t in out.get("table", []):
        print(f"{t['name'][-40:]:<40} FD {t['fd']:>10.3f} rank {t['fidelity_rank']:>5g}   utility "
              f"{t['utility']:>8.4f} rank {t['utility_rank']:>5g}")
    print(f"fidelity-utility rank correlation: {out.get('correlation', out.get('skipped'))}")
    if a.out:
        def write(tmp):
            with open(tmp, "w") as fh:
                json.dump(out, fh, indent=1)
        atomic_save(a.out, write)
    return out


def fetch_weights(argv):
    """metrics.py fetch-weights: download each feature network's weights into --weights-dir (the layout
    weights_guide describes) when the machine is online; offline, one message naming every file and its URL."""
    p = argparse.ArgumentParser(prog="metrics.py fetch-weights", description=fetch_weights.__doc__.split(":")[1])
    p.add_argument("--weights-dir", default="", help="destination ('' = each network's standard cache)")
    p.add_argument("--only", default="inception,xrv,raddino,dinov2,clip,biovil_t,xrv_mimic",
                   help="comma list of networks (biovil_t: the alignment score's; xrv_mimic: factual correctness')")
    p.add_argument("--offline", action="store_true", help="never download (the message lists what to fetch)")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    hf = (*HF_ALIASES, "biovil_t")
    if bad := [n for n in names if n not in CNN_WEIGHTS and n not in hf]:
        raise SystemExit(f"metrics: fetch-weights --only {bad[0]!r}; expected some of "
                         f"{', '.join(list(CNN_WEIGHTS) + list(hf))}")
    offline = [n for n in names if not _online(a.offline, "huggingface.co" if n in hf else "github.com")]
    if offline:
        raise SystemExit("metrics: fetch-weights: this machine is offline (or --offline / HF_HUB_OFFLINE=1 / "
                         "CXR_OFFLINE=1); nothing was downloaded.\n" + "\n".join(weights_guide(offline, a.weights_dir)))
    done = {}
    for n in names:
        if n in CNN_WEIGHTS:
            f, url = CNN_WEIGHTS[n][:2]
            cache = CNN_WEIGHTS[n][2]
            try:
                got = find_weights([f], url, a.weights_dir, [] if a.weights_dir else [cache])
            except WeightsMissing as e:
                raise SystemExit(f"metrics: fetch-weights {n}: {e}") from None
            done[n] = convert_xrv(got, os.path.join(os.path.dirname(got), xrv_safe_name(got))) if n in XRV_MODELS \
                else got
        elif n == "biovil_t":
            from huggingface_hub import snapshot_download
            dst = biovil_t_folder_name(a.weights_dir) if a.weights_dir else None
            try:
                done[n] = snapshot_download(BIOVIL_T_REPO, revision=BIOVIL_T_REVISION, local_dir=dst,
                                            allow_patterns=[*BIOVIL_T_FILES, "model.safetensors"])
            except Exception as e:  # noqa: BLE001 - network and hub errors come in many classes
                raise SystemExit(f"metrics: fetch-weights {n}: {BIOVIL_T_REPO} could not be downloaded "
                                 f"({_first_line(e)})") from None
        else:
            from transformers import AutoImageProcessor, AutoModel
            repo = HF_ALIASES[n]
            try:
                model, proc = AutoModel.from_pretrained(repo), AutoImageProcessor.from_pretrained(repo)
            except OSError as e:
                raise SystemExit(f"metrics: fetch-weights {n}: {repo} could not be downloaded ({_first_line(e)})") \
                    from None
            done[n] = os.path.join(a.weights_dir, repo.replace("/", "--")) if a.weights_dir else f"HF cache ({repo})"
            if a.weights_dir:
                model.save_pretrained(done[n]), proc.save_pretrained(done[n])
        print(f"{n}: {done[n]}")
    return done


def xrv_safe_name(src):
    """The converted file's name for a torchxrayvision pickle: its own model's (the mimic_ch file never becomes
    the file the 'all' feature space looks for); other xrv files keep their stem."""
    base = os.path.basename(src)
    known = {m["file"]: m["safe"] for m in XRV_MODELS.values()}
    return known.get(base, os.path.splitext(base)[0] + ".safetensors")


def convert_xrv(src, dst):
    """Pickled torchxrayvision model -> safetensors with the DenseNet's parameter names (atomic write)."""
    try:
        state = safe_load_pickled_module(src)
    except Exception as e:  # noqa: BLE001 - as load_state: any failure to unpickle means 'not that file'
        raise SystemExit(f"metrics: {src}: not a readable PyTorch pickle ({_first_line(e)}); expected the "
                         f"torchxrayvision model file {XRV_FILE}") from None
    sd = {k: v.contiguous() for k, v in state.items() if k.startswith(("features.", "classifier."))}
    if "classifier.weight" not in sd:
        raise SystemExit(f"metrics: {src}: no classifier.weight; expected a torchxrayvision DenseNet-121")
    load_into(XRVDenseNet(num_classes=sd["classifier.weight"].shape[0]), sd, src)  # validates the layout
    meta = {"source": os.path.basename(src), "converted_by": f"metrics.py {VERSION}"}
    atomic_save(dst, lambda tmp: save_pt(sd, tmp, metadata=meta))
    return dst


class Extractor:
    """A feature space: preprocessing, network, and the facts that go into results.json."""

    def __init__(self, name, net, size, dim, preprocessing, weights, random_weights, device, processor=None,
                 resize="antialias"):
        self.name, self.net = name, net
        self.size, self.dim = size, dim            # input side (None: the processor's), feature dimension
        self.processor, self.device = processor, device
        self.preprocessing = preprocessing         # its description, recorded in results.json
        self.weights, self.random_weights = weights, random_weights
        self.resize = resize  # the input convention (RESIZE_MODES for inception, XRV_RESIZE_MODES for xrv)
        self.net.eval().requires_grad_(False).to(device)
        self._digest = None

    @property
    def weights_sha256(self):
        """sha256 of the weights this extractor holds (every state-dict tensor's name, dtype, shape and bytes):
        the feature cache is keyed by it, so features of one weight set (random or pretrained, or two different
        random inits) are never read for another, whatever `weights` says. Computed once (weights are frozen)."""
        if self._digest is None:
            h = hashlib.sha256()
            for k, v in sorted(self.net.state_dict().items()):
                v = v.detach().cpu().contiguous()
                h.update(f"{k}\0{v.dtype}\0{tuple(v.shape)}\n".encode())
                h.update(v.reshape(-1).view(torch.uint8).numpy())
            self._digest = h.hexdigest()
        return self._digest

    def prepare(self, img, fit="crop", compat=False):
        if self.processor is not None:  # transformers processors resize/crop themselves: hand over a square RGB
            return np.repeat((prepare(img, 0, fit, compat) * 255 + 0.5).astype(np.uint8)[:, :, None], 3, axis=2)
        if self.resize in ("skimage", "pytorch-fid", "clean", "tf1"):
            img = prepare(img, 0, "crop", compat) if compat and img.shape != (299, 299) else img  # CheXGenBench squash
            if self.resize == "skimage":  # xrv's documented XRayCenterCrop + XRayResizer (always a crop)
                return xrv_skimage_resize(square(img, "crop", "xrv"), self.size)
            return resize_as(img, self.size, self.resize)  # these tools squash the whole image to 299 x 299
        return prepare(img, self.size, fit, compat, "xrv" if self.name == "xrv" else "floor")

    @torch.no_grad()
    def __call__(self, batch):
        """batch: list of prepare() outputs, or a float tensor [B, C, H, W] in [0, 1] -> float32 [B, dim]."""
        if torch.is_tensor(batch):
            x = batch.float().mean(1, keepdim=True)
            if self.processor is not None:
                batch = [np.repeat((im[0].cpu().numpy() * 255 + 0.5).astype(np.uint8)[:, :, None], 3, 2) for im in x]
            elif self.resize in ("antialias", "model"):
                batch = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                                      align_corners=False)
            else:
                batch = [self.prepare(im[0].cpu().numpy()) for im in x]
        if self.processor is not None:
            x = self.processor(images=list(batch), return_tensors="pt")["pixel_values"]
        else:
            x = batch if torch.is_tensor(batch) else torch.from_numpy(np.stack(batch))[:, None]
        x = x.to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):  # bf16 GPU, fp32 CPU
            if self.name == "inception":
                # [0,1] -> [-1,1] (pytorch-fid) or (255 x - 128) / 128 (TF graph: torch-fidelity, clean-fid)
                x = (x * 255 - 128) / 128 if self.resize in ("clean", "tf1") else 2 * x - 1
                f = self.net(x.expand(-1, 3, -1, -1))  # gray replicated to RGB
            elif self.name == "xrv":
                f = self.net.embed(x * 2048 - 1024)  # xrv.datasets.normalize: [0, 1] -> [-1024, 1024]
            else:
                f = self.net(pixel_values=x).pooler_output  # CLS after the final norm (CLIP: pre-projection)
        # a copy of its own: pooler_output is a view of the whole [B, tokens, D] hidden state on the CPU (float()
        # and cpu() return it as it is), and keeping the views kept every batch's hidden states (memory grew ~ N)
        return f.float().cpu().clone()


def load_cnn(name, weights_dir="", allow_random_weights=False, offline=False):
    """(network, weights file or 'random') of 'inception', 'xrv' or 'xrv_mimic' (XRV_MODELS): the file
    by name in --weights-dir and the standard cache, downloaded when online (find_weights); a torchxrayvision pickle
    is converted once to its own safetensors (xrv_safe_name). Missing: WeightsMissing, or with
    allow_random_weights a network seeded by RANDOM_WEIGHTS_SEED (the caller's RNG untouched)."""
    if name == "inception":
        build = FIDInceptionV3
        spec = {"files": ["pt_inception-2015-12-05.safetensors", FID_FILE], "url": FID_URL,
                "cache": "~/.cache/torch/hub/checkpoints"}
    else:
        m = XRV_MODELS[name]
        build = lambda: XRVDenseNet(len(XRV_LABELS[m["kind"]]))  # noqa: E731
        spec = {"files": [m["safe"], m["file"]], "url": m["url"], "cache": "~/.torchxrayvision/models_data"}
    try:
        src = find_weights(spec["files"], spec["url"], weights_dir, [spec["cache"]], offline)
        if src.endswith(".pt"):  # torchxrayvision pickles the whole model: converted once, read without its code
            src = convert_xrv(src, os.path.join(os.path.dirname(src), xrv_safe_name(src)))
        return load_into(build(), load_state(src), src), src
    except WeightsMissing:
        if not allow_random_weights:
            raise
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        net = build()
        for c in (c for c in net.modules() if isinstance(c, nn.Conv2d)):
            nn.init.kaiming_normal_(c.weight)  # variance-preserving: random features do not vanish
    return net, "random"


def get_extractor(name, weights_dir="", allow_random_weights=False, device="cpu", offline=False, resize="antialias",
                  xrv_resize="model"):
    """Build a feature extractor by name ('inception', 'xrv', 'raddino', 'dinov2', 'clip', or a transformers
    model id / local path). Missing weights raise WeightsMissing unless allow_random_weights. resize: the
    Inception input convention (RESIZE_MODES), xrv_resize: the XRV one (XRV_RESIZE_MODES)."""
    device = torch.device(device)
    if resize not in RESIZE_MODES or xrv_resize not in XRV_RESIZE_MODES:
        raise ValueError(f"resize {resize!r} / xrv_resize {xrv_resize!r}; expected one of {', '.join(RESIZE_MODES)} "
                         f"/ {', '.join(XRV_RESIZE_MODES)}")
    if name in ("inception", "xrv"):
        inc = name == "inception"
        net, src = load_cnn(name, weights_dir, allow_random_weights, offline)
        rnd = src == "random"
        mode = resize if inc else xrv_resize
        prep = {"antialias": "gray->RGB, square by crop/pad, bilinear+antialias to 299, [0,1] -> [-1,1]; pool3",
                "pytorch-fid": "gray->RGB, squashed to 299 by F.interpolate bilinear (no antialias), [0,1] -> [-1,1] "
                "(pytorch-fid); pool3",
                "clean": "gray->RGB, squashed to 299 by PIL bicubic on floats in [0,255], (x - 128) / 128 "
                "(clean-fid); pool3",
                "tf1": "gray->RGB, squashed to 299 by TF1 bilinear, (x - 128) / 128 (torch-fidelity, torchmetrics); "
                "pool3",
                "model": "1 channel, square by crop/pad (xrv crop offsets), bilinear+antialias to 224, [0,1] -> "
                "[-1024,1024] (xrv normalize); ReLU + global average pool",
                "skimage": "1 channel, XRayCenterCrop, XRayResizer (skimage resize, float64) to 224, [-1024,1024] "
                "(xrv's documented pipeline); ReLU + global average pool"}[mode]
        return Extractor(name, net, 299 if inc else 224, 2048 if inc else 1024, prep, src, rnd, device, resize=mode)
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
        except (OSError, ValueError, SafetensorError) as e:  # absent, or a truncated / foreign weights file
            err = e
    if not allow_random_weights or name not in HF_ALIASES:
        raise WeightsMissing(f"transformers model {repo} not found or not readable locally ({type(err).__name__}: "
                             f"{_first_line(err)}); offline: "
                             f"save it with save_pretrained into --weights-dir DIR/{repo.replace('/', '--')}")
    # Random weights with the published architecture defaults (ViT-B): smoke tests only.
    from transformers import BitImageProcessor, CLIPImageProcessor, CLIPVisionConfig, Dinov2Config, Dinov2Model
    sq = {"height": 224, "width": 224}
    with torch.random.fork_rng(devices=[]):  # seeded as the CNNs' random weights (RANDOM_WEIGHTS_SEED)
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        net, proc = ((CLIPVisionModel(CLIPVisionConfig()), CLIPImageProcessor()) if name == "clip" else (
            Dinov2Model(Dinov2Config()), BitImageProcessor(size={"shortest_edge": 224}, crop_size=sq,
                                                           image_mean=[.485, .456, .406],
                                                           image_std=[.229, .224, .225])))
    return Extractor(name, net, None, 768, f"random ViT-B, {type(proc).__name__} 224", "random", True, device, proc)


def _progress(total, what):
    """update(n) prints a rate / ETA line on stderr, at most every 2 s."""
    st = {"t0": time.time(), "last": 0.0, "done": 0}

    def update(n):
        st["done"], now = st["done"] + n, time.time()
        if now - st["last"] > 2 or st["done"] >= total:
            st["last"], rate = now, st["done"] / max(now - st["t0"], 1e-9)
            print(f"  {what}: {st['done']}/{total} {rate:.1f} img/s ETA {(total - st['done']) / max(rate, 1e-9):.0f}s",
                  file=sys.stderr)
    return update


def iter_images(images, indices, size, fit="crop", compat=False, workers=4, batch_size=64, strict=False, fn=None):
    """Yield (indices kept, list of prepared images) in batches, decoding in threads; unreadable images are
    skipped (counted in images.skipped) or fatal when strict."""
    fn = fn or (lambda a: prepare(a, size, fit, compat))
    images.skipped = getattr(images, "skipped", set())
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for s in range(0, len(indices), batch_size):
            idx = indices[s:s + batch_size]
            loaded = list(pool.map(lambda i: (lambda a: None if a is None else fn(a))(images.load(i)), idx))
            keep = [i for i, a in zip(idx, loaded) if a is not None]  # decoded and resized in the threads
            if strict and len(keep) < len(idx):
                raise SystemExit(f"metrics: unreadable image {images.last_error}")
            images.skipped.update(set(idx) - set(keep))
            yield keep, [a for a in loaded if a is not None]


def extract_features(images, extractor="inception", batch_size=64, device=None, fit="crop", compat=False, workers=4,
                     strict=False, cache_dir=None, weights_dir="", allow_random_weights=False, progress=True):
    """Features [N, D] float32 of an ImageSet / folder path / tensor [N, C, H, W] in [0, 1]. With an ImageSet and
    cache_dir, features are cached under a key of the sorted file list, sizes, mtimes, extractor, weights and
    preprocessing version. Under torchrun each rank extracts a disjoint share.
    Returns (features, kept indices, cache_status) for ImageSets, features alone for tensors."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ex = extractor if isinstance(extractor, Extractor) else get_extractor(extractor, weights_dir,
                                                                          allow_random_weights, device)
    if torch.is_tensor(images) or isinstance(images, np.ndarray):
        return torch.cat([ex(t) for t in torch.as_tensor(images).split(batch_size)]).numpy()
    images = ImageSet(images) if isinstance(images, str) else images
    cache = None
    if cache_dir:  # keyed by the weights' own hash: ex.weights ('random', a path) does not say which weights
        key = images.fingerprint(f"{ex.name}|{ex.weights_sha256}|{ex.preprocessing}|{fit}|{compat}|{PREP_VERSION}")
        stem = re.sub(r"[^A-Za-z0-9_.-]", "-", ex.name).lstrip(".") or "features"  # a plain file name in cache_dir
        cache = os.path.join(cache_dir, f"{stem}-{key[:24]}.safetensors")
    if cache and os.path.isfile(cache):
        f, kept = _read_cache(cache, ex, len(images))
        return _finite_features(f, images, ex), kept, "hit"
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    idx = list(range(rank, len(images), world))
    prog = _progress(len(idx), f"{ex.name} {os.path.basename(images.root)}") if progress else (lambda n: None)
    feats, kept = [], []
    for keep, batch in iter_images(images, idx, None, workers=workers, batch_size=batch_size, strict=strict,
                                   fn=lambda a: ex.prepare(a, fit, compat)):
        if batch:  # only features [B, D] are kept: the images of a batch are dropped after its forward
            feats.append(ex(batch))
        kept.extend(keep)
        prog(len(keep))
    f = torch.cat(feats).numpy() if feats else np.zeros((0, ex.dim), np.float32)
    if world > 1:  # gather every rank's share, restore file order
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (kept, f))
        kept, f = sum((p[0] for p in parts), []), np.concatenate([p[1] for p in parts])
        kept, f = sorted(kept), f[np.argsort(kept)]
    if not kept:  # every image unreadable: the metrics would be skipped silently for want of images
        raise SystemExit(f"metrics: no readable image in {images.root} ({len(images)} listed), e.g. "
                         f"{getattr(images, 'last_error', '?')}")
    _finite_features(f, images, ex)  # before caching: a NaN entry would be served again
    if cache and rank == 0:
        entry = {"features": np.ascontiguousarray(f), "indices": np.asarray(kept, np.int64)}
        atomic_save(cache, lambda tmp: save_np(entry, tmp))
    return f, kept, ("miss" if cache else "off")


def _read_cache(path, ex, n_images):
    """(features, kept indices) of a cache entry; one line naming it when it is not one (truncated, foreign)."""
    try:
        d = load_np(path)
    except (SafetensorError, OSError) as e:
        raise SystemExit(f"metrics: feature cache {path}: not readable ({_first_line(e)}); delete it or run with "
                         f"--no-cache") from None
    f, idx = d.get("features"), d.get("indices")
    if f is None or idx is None or f.ndim != 2 or (ex.dim and f.shape[1] != ex.dim) or idx.shape != (len(f),) \
            or (len(idx) and not 0 <= idx.min() <= idx.max() < n_images):
        raise SystemExit(f"metrics: feature cache {path}: not {ex.name} features of these {n_images} images; delete "
                         f"it or run with --no-cache")
    return f, idx.tolist()


def _finite_features(f, images, ex):
    """f, or one line naming the input whose features hold NaN / inf (FD would stop with a LinAlgError)."""
    if not np.isfinite(f).all():
        bad = int((~np.isfinite(f)).any(1).sum())
        raise SystemExit(f"metrics: {ex.name} features of {images.root} hold NaN or inf ({bad} of {len(f)} images); "
                         f"expected finite features (non-finite pixels or weights?)")
    return f


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
    n, m = min(len(fr), len(ff)), min(cfg.kid_subset_size, len(fr), len(ff))
    out, notes = {"n_real": int(len(fr)), "n_fake": int(len(ff))}, []
    for name, need in [(q, v) for q, v in (("fd", 2), ("kid", 2), ("prdc", cfg.k + 1)) if q in chosen]:
        if n < need:
            notes.append(f"{name} skipped: fewer than {need} images")
        elif name == "fd":
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                out["fd"] = frechet_distance(fr, ff)
            notes += [str(x.message) for x in w]
        elif name == "kid":
            seed = cfg.seed if cfg.kid_sampler == "cxr-gen" else None  # torch-fidelity: its RandomState(2020)
            out["kid_mean"], out["kid_std"] = kid(fr, ff, cfg.kid_subsets, cfg.kid_subset_size, seed, device,
                                                  cfg.kid_sampler)
            out["kid_subset_size"], out["kid_sampler"] = m, cfg.kid_sampler
            notes += [f"kid subsets of {m} < {cfg.kid_subset_size} (fewer images than a subset)"] * (
                m < cfg.kid_subset_size)
        else:
            out.update(prdc(fr, ff, cfg.k, device))
    return out | ({"notes": notes} if notes else {})


def _rows(kept, wanted):
    pos = {i: r for r, i in enumerate(kept)}
    return [pos[i] for i in wanted if i in pos]


def _iter(images, indices, size, cfg, batch_size=None):
    return iter_images(images, indices, size, cfg.fit, cfg.chexgenbench_compat, cfg.workers,
                       batch_size or cfg.batch_size, cfg.strict)


def _pixels(images, indices, size, cfg):
    got = list(_iter(images, indices, size, cfg))
    out = [a for _, batch in got for a in batch]
    return sum((k for k, _ in got), []), (np.stack(out) if out else np.zeros((0, size, size), np.float32))


@torch.no_grad()
def _apply(fn, images, indices, size, cfg, device):
    """{index: fn(image batch [B, 1, size, size] on device)[row] on the CPU} over the images that load."""
    out = {}
    for keep, batch in _iter(images, list(indices), size, cfg):
        out.update(zip(keep, fn(torch.from_numpy(np.stack(batch))[:, None].to(device)).float().cpu()) if batch else [])
    return out


def _group_column(meta, group_by):
    if group_by != "auto":
        if not meta or group_by not in meta[0]:
            raise SystemExit(f"metrics: the fake meta.csv has no column {group_by!r} (--group-by)")
        return group_by
    # cond_id (controlnet.py: one mask / box set) and source_id (dit_text2img.py, ldm_multicond.py: one training
    # row's conditions) name the condition itself; prompt text can be shared by different masks or patients, so
    # grouping by it would pair images of different conditions (our order: the most specific column first).
    for c in ("group", "cond_id", "source_id", "prompt_id", "prompt", "report"):
        if meta and c in meta[0] and any(r.get(c) for r in meta):
            return c
    return "labels" if meta and any(lab in meta[0] for lab in LABELS) else None


def diversity_groups(meta, col):
    """Lists of image indices sharing the value of `col` (or the 14 labels for 'labels'); rows with an empty value
    belong to no group (an image without a condition id is not one condition with the others); size >= 2 only."""
    groups = {}
    for i, r in ((i, r) for i, r in enumerate(meta) if r):
        key = tuple(r.get(lab, "") for lab in LABELS) if col == "labels" else r.get(col, "")
        if key != "":
            groups.setdefault(key, []).append(i)
    return [g for g in groups.values() if len(g) >= 2]


def diversity_pairs(g, max_pairs, rng):
    """Every pair of group g when there are at most max_pairs, else max_pairs random distinct pairs (at most)."""
    if len(g) * (len(g) - 1) // 2 <= max_pairs:
        return [(a, b) for ai, a in enumerate(g) for b in g[ai + 1:]]
    return sorted({tuple(sorted(rng.choice(g, 2, replace=False).tolist())) for _ in range(max_pairs)})


def diversity(fake, cfg):
    """Mean pairwise MS-SSIM among synthetic images of one prompt / condition (chexgen, roentgen §5): lower is
    more diverse. Groups come from the fake meta.csv (_group_column: cond_id / source_id before prompt text); at
    most cfg.max_pairs random pairs per group."""
    col = _group_column(fake.meta, cfg.group_by)
    if col is None:
        return {"skipped": "the fake folder has no meta.csv with a group/cond_id/source_id/prompt/report or label "
                           "column"}
    groups = diversity_groups(fake.meta, col)
    if not groups:
        return {"skipped": f"no group of >= 2 images by column {col!r}"}
    rng = np.random.default_rng(cfg.seed)
    means, npairs = [], 0
    for g in groups:
        pairs = diversity_pairs(g, cfg.max_pairs, rng)
        a, b = _pair_pixels(fake, fake, pairs, cfg.pixel_size, cfg)
        if len(a):
            means.append(float(torch.atleast_1d(ms_ssim(a, b, 1.0)).mean()))
            npairs += len(a)
    scales = ms_ssim_scales(cfg.pixel_size)
    return {"ms_ssim_mean": float(np.mean(means)), "ms_ssim_std": float(np.std(means)), "groups": len(means),
            "pairs": npairs, "group_by": col, "size": cfg.pixel_size, "scales": scales, "convention": "pytorch-msssim",
            "note": "5 scales, standard weights" if scales == 5 else
            f"{scales} scales (images <= 160 px), weights renormalised: not comparable with 5-scale values"}


def paired_ids(real, fake):
    """(real index, fake index) for images sharing an id (exact, else by file stem)."""
    for key in (lambda i: i, lambda i: i.rsplit("/", 1)[-1]):
        rid = {key(i): n for n, i in enumerate(real.ids)}
        if pairs := [(rid[key(i)], n) for n, i in enumerate(fake.ids) if key(i) in rid]:
            return pairs
    return []


def _pair_pixels(ims_a, ims_b, pairs, size, cfg):
    """Tensors [n, 1, size, size] of the pairs (index in ims_a, index in ims_b) whose two images both load."""
    (ka, xa), (kb, xb) = (_pixels(im, [q[i] for q in pairs], size, cfg) for i, im in ((0, ims_a), (1, ims_b)))
    ra, rb = {i: r for r, i in enumerate(ka)}, {i: r for r, i in enumerate(kb)}
    ok = [(ra[a], rb[b]) for a, b in pairs if a in ra and b in rb]
    return [torch.from_numpy(x[[o[i] for o in ok]])[:, None] for i, x in ((0, xa), (1, xb))]


def _pair_scores(ims_a, ims_b, pairs, cfg, lps):
    """SSIM, PSNR (at cfg.pixel_size) and each FeatureLPIPS's distance (at its input size) of image pairs."""
    out = {"ssim": [], "psnr": [], **{name: [] for name in lps}}
    for c in range(0, len(pairs), 64):  # streamed: 64 pairs in memory at a time
        a, b = _pair_pixels(ims_a, ims_b, pairs[c:c + 64], cfg.pixel_size, cfg)
        out["ssim"].append(ssim(a, b, 1.0).double().view(-1))
        out["psnr"].append(psnr(a, b, 1.0).view(-1))
        for name, lp in lps.items():
            out[name].append(lp.distance(*_pair_pixels(ims_a, ims_b, pairs[c:c + 64], lp.size, cfg)))
    return {key: torch.cat(v).numpy() for key, v in out.items()}


def paired(real, fake, pairs, cfg, device="cpu"):
    """Paired identity metrics (reconstructions, edits; radit App. C.1): SSIM / PSNR and, for the --lpips feature
    spaces, the LPIPS-style distance (Eq. 13) and rLPIPS (Eq. 14) against random pairs of distinct real images,
    whose SSIM and distances form the 'Random Pairs' reference row of radit Table 14."""
    lps, skipped = {}, {}  # FeatureLPIPS per feature space; the ones whose weights are missing
    layers = [int(v) for v in cfg.lpips_layers.split(",") if v.strip()] or None
    for name in [v.strip() for v in (cfg.lpips or ("raddino" if cfg.paired else "")).split(",") if v.strip()]:
        try:
            lps[name] = FeatureLPIPS(name, layers, cfg.weights_dir, cfg.allow_random_weights, device, cfg.offline)
        except WeightsMissing as e:
            print(f"metrics: skipping LPIPS in {name}: {e}", file=sys.stderr)
            skipped[name] = str(e)
    s, p = (sc := _pair_scores(real, fake, pairs, cfg, lps))["ssim"], sc["psnr"]
    fin = p[np.isfinite(p)] if np.isfinite(p).any() else np.array([np.inf])
    out = {"n": len(s), "ssim_mean": float(s.mean()), "ssim_std": float(s.std()), "psnr_mean": float(fin.mean()),
           "psnr_std": float(fin.std()) if np.isfinite(fin).all() else 0.0, "n_identical": int((~np.isfinite(p)).sum()),
           "size": cfg.pixel_size, "data_range": 1.0}
    if lps or cfg.paired:
        ref = _pair_scores(real, real, list(zip(*random_pairs(len(real), cfg.random_pairs, cfg.seed))), cfg, lps)
        out["random_pairs"] = {"n": len(ref["ssim"]), "seed": cfg.seed, "ssim_mean": float(ref["ssim"].mean()),
                               **{f"lpips_{k}": float(ref[k].mean()) for k in lps}}
        out["lpips"] = {k: {"mean": float(sc[k].mean()), "std": float(sc[k].std()), "random_pairs_mean":
                            float(ref[k].mean()), "rlpips_mean": float(relative_lpips(sc[k], ref[k].mean()).mean()),
                            "rlpips_std": float(relative_lpips(sc[k], ref[k].mean()).std()), "layers": list(lp.layers),
                            "weights": lp.weights, "random_weights": lp.random_weights} for k, lp in lps.items()}
        out |= {"lpips_skipped": skipped} if skipped else {}
    return out


def privacy(fake, train, cfg, fake_feats=None, train_feats=None, device="cpu"):
    """Memorisation (chexgenbench §2.3, done over the whole training set): each synthetic image's nearest
    training image by pixel L2 (same crop/resize, float) and by distance of unit-normalised features. The synthetic
    images are searched in blocks of cfg.privacy_block, the training set streamed once per block, so memory holds
    one block of pixels (about 3 x block x privacy_size^2 x 4 bytes) whatever the number of images."""
    fk, bank_kept = [], []  # synthetic / training indices that loaded
    d, j = [], []           # per block: nearest distances and the rows of bank_kept they point to
    for s in range(0, len(fake), cfg.privacy_block):
        kq, q = _pixels(fake, list(range(s, min(s + cfg.privacy_block, len(fake)))), cfg.privacy_size, cfg)
        if not kq:
            continue
        bank_kept = []  # the same training rows each pass (the same images load)
        batches = _iter(train, list(range(len(train))), cfg.privacy_size, cfg, 256)  # streamed
        bank = (np.stack(b).reshape(len(b), -1) for k, b in batches if bank_kept.extend(k) or b)
        db, jb = nearest_neighbours(q.reshape(len(q), -1), bank, device)
        fk += kq
        d.append(db)
        j.append(jb)
    if not fk:
        raise SystemExit(f"metrics: no readable image in {fake.root} for the privacy search")
    d, j = np.concatenate(d), np.concatenate(j)
    rms, out = d / cfg.privacy_size, {}
    out["pixel"] = {"n_fake": len(fk), "n_train": len(bank_kept), "size": cfg.privacy_size,
                    "l2_mean": float(d.mean()), "l2_min": float(d.min()), "rms_mean": float(rms.mean()),
                    "rms_min": float(rms.min()), "threshold_rms": cfg.pix_threshold,
                    "count_under_threshold": int((rms < cfg.pix_threshold).sum()),
                    "closest": [{"fake": fake.ids[fk[r]], "train": train.ids[bank_kept[j[r]]], "rms": float(rms[r])}
                                for r in np.argsort(d)[:cfg.grid_pairs]]}
    grid = cfg.grid or (os.path.splitext(cfg.out)[0] + "_closest_pairs.png" if cfg.out else "")
    if grid:
        pair = [(fake.load(fk[r]), train.load(bank_kept[j[r]])) for r in np.argsort(d)[:cfg.grid_pairs]]
        rows = [np.concatenate([prepare(a, cfg.privacy_size, cfg.fit, cfg.chexgenbench_compat),
                                np.ones((cfg.privacy_size, 4), np.float32),
                                prepare(b, cfg.privacy_size, cfg.fit, cfg.chexgenbench_compat)], 1) for a, b in pair]
        sheet = Image.fromarray((np.clip(np.concatenate(rows, 0), 0, 1) * 255 + 0.5).astype(np.uint8))
        atomic_save(grid, lambda tmp: sheet.save(tmp, format="PNG"))
        out["pixel"]["grid"] = grid
    if fake_feats is not None and train_feats is not None:
        name = fake_feats[0]
        ff, fkept = fake_feats[1]
        tf, tkept = train_feats
        unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
        dl, _ = nearest_neighbours(unit(ff), torch.from_numpy(unit(tf)).split(4096), device)
        out["latent"] = {"features": name, "n_fake": len(fkept), "n_train": len(tkept), "mean": float(dl.mean()),
                         "min": float(dl.min()), "threshold": cfg.feat_threshold,
                         "count_under_threshold": int((dl < cfg.feat_threshold).sum())}
    if cfg.reid_weights:
        out["reid"] = reid_scores(fake, train, cfg, device)
    return out


def reid_input(x, size=224):
    """Re-ID network input as chexgenbench's code builds it (metrics/privacy_metrics.py): RGB, Resize((size, size)),
    ToTensor, no mean / std normalisation. x: [B, 1, H, W] in [0, 1] -> [B, 3, size, size]. Our resize is bilinear
    with antialiasing (torchvision's Resize on a PIL image is PIL bilinear, also antialiased: close, not bitwise)."""
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.expand(-1, 3, -1, -1)


def load_reid(path, device):
    """The Siamese Re-ID network (269 tensors, the benchmark's SiameseNetwork keys) from a weights file."""
    return load_into(SiameseReID(), load_state(path), path).eval().to(device)


def reid_scores(fake, train, cfg, device):
    """Nearest mode: max Siamese re-identification probability of each synthetic image over the whole training
    set (Packhaeuser et al. 2022; chexgenbench §2.3 Avg / Max Re-ID score, Count[s > delta]). Input: the
    benchmark's convention (reid_input: cfg.reid_size px, gray replicated to RGB, [0, 1], no normalisation)."""
    net = load_reid(cfg.reid_weights, device)
    ef, et = (torch.stack(list(_apply(lambda x: net.embed(reid_input(x, cfg.reid_size)), im, range(len(im)),
                                      cfg.reid_size, cfg, device).values())).to(device) for im in (fake, train))
    best, step = [], max(1, 2 ** 22 // (len(et) * 128))
    with torch.no_grad():
        for s in range(0, len(ef), step):
            best.append(net.score(ef[s:s + step, None], et[None]).max(1).values)
    s = torch.cat(best).cpu().numpy()
    return {"mean": float(s.mean()), "max": float(s.max()), "threshold": cfg.reid_threshold,
            "count_over_threshold": int((s > cfg.reid_threshold).sum()), "n_fake": len(ef), "n_train": len(et),
            "input": f"{cfg.reid_size} px, gray -> RGB, [0, 1], no normalisation (chexgenbench's code)"}


def privacy_pairs(fake, train, cfg):
    """[(fake index, train index)] of the prompt-and-seed protocol (chexgenbench §3.2: every synthetic image was
    generated from one training row's prompt), from --privacy-pairs (columns id, source_id) or the fake meta.csv's
    source_id column (dit_text2img.py, ldm_multicond.py, controlnet.py sample write it). Synthetic images without a
    source are left out (counted); a source id that is not in the training set stops with one line."""
    if cfg.privacy_pairs:
        rows, _ = read_meta(cfg.privacy_pairs, required=("id", "source_id"),
                            what="a CSV pairing synthetic images with training rows (id, source_id)")
        by_id = {r["id"]: r["source_id"] for r in rows}
        where = cfg.privacy_pairs
        src = [by_id.get(i, by_id.get(i.rsplit("/", 1)[-1], "")) for i in fake.ids]
    else:
        where = os.path.join(fake.root, "meta.csv")
        if not fake.meta or not any((r or {}).get("source_id") for r in fake.meta):
            raise SystemExit(f"metrics: --privacy chexgenbench: {where} has no source_id column; expected the "
                             "synthetic images' training rows there or in --privacy-pairs CSV (id, source_id)")
        src = [(r or {}).get("source_id", "") for r in fake.meta]
    tid = {i: n for n, i in enumerate(train.ids)}
    if missing := sorted({s for s in src if s and s not in tid}):
        raise SystemExit(f"metrics: {where}: source_id {missing[0]!r} ({len(missing)} ids in all) is not a row of "
                         f"the training set {train.root} (split {cfg.train_split!r}); expected training ids")
    pairs = sorted(((n, tid[s]) for n, s in enumerate(src) if s), key=lambda p: (p[1], p[0]))
    if not pairs:
        raise SystemExit(f"metrics: {where}: no synthetic image of {fake.root} names a source_id")
    return pairs, len(src) - len(pairs)


def pixel_distance(a, b):
    """chexgenbench §2.3 l_pix = ||x_hat - x||_2, divided by sqrt(number of values) as its code does (Table 3's
    magnitudes), in 8-bit units [0, 255] and float64. Its code subtracts uint8 arrays (wrap-around: 111.6 instead
    of 55.6 on one pair); here the difference is taken in float, as the paper defines it. a, b: [..., H, W] in
    [0, 1]; gray replicated to RGB (as its code's convert('RGB')) gives the same value."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) * 255.0
    return np.sqrt((d * d).reshape(len(d), -1).mean(1))


def latent_distance(fa, fb):
    """chexgenbench §2.3 l_lat, 'normalized Euclidean distance' as its code computes it: ||a - b|| / sqrt(D) on raw
    Rad-DINO CLS features (pooler_output, not unit-normalised), float64. fa, fb: [n, D]."""
    fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    return np.linalg.norm(fa - fb, axis=1) / np.sqrt(fa.shape[1])


def chexgenbench_summary(src, reid=None, pix=None, lat=None, delta=0.85):
    """Per training sample and dataset-level statistics of chexgenbench §3.2 / Table 3 from per-pair values.
    src[p]: the training sample of pair p. Per sample: max Re-ID score, min pixel and latent distances over its
    own generations (§3.2, 'the greatest privacy risk posed for each training sample'); the means over its
    generations too (its code records them). Dataset: Avg Re-ID = mean over samples of their max (our reading
    of §2.3's M values s^(j) together with §3.2's per-sample max), Max Re-ID, Count[max > delta] (§2.3 Eq.: strict
    '>'), Avg latent / pixel distance = mean over samples of their min."""
    src = np.asarray(src)
    keys, inv = np.unique(src, return_inverse=True)
    out, per = {"n_pairs": int(len(src)), "n_train_samples": int(len(keys))}, {"source": keys.tolist(),
                                                                              "n": np.bincount(inv).tolist()}
    for name, v, red in (("reid", reid, np.maximum), ("pixel", pix, np.minimum), ("latent", lat, np.minimum)):
        if v is None:
            continue
        v = np.asarray(v, np.float64)
        ext = np.full(len(keys), -np.inf if red is np.maximum else np.inf)
        red.at(ext, inv, v)
        mean = np.bincount(inv, v, len(keys)) / np.bincount(inv, minlength=len(keys))
        word = "max" if red is np.maximum else "min"
        per[f"{word}_{name}"], per[f"mean_{name}"] = ext.tolist(), mean.tolist()
        if name == "reid":
            out["reid"] = {"avg": float(ext.mean()), "max": float(ext.max()), "delta": delta,
                           "count_over_delta": int((ext > delta).sum()), "avg_over_pairs": float(v.mean()),
                           "pairs_over_delta": int((v > delta).sum())}
        else:
            out[name] = {"avg": float(ext.mean()), "min": float(ext.min()), "avg_over_pairs": float(v.mean())}
    return out | {"per_sample": per}


@torch.no_grad()
def privacy_chexgenbench(fake, train, cfg, latent_ex=None, device="cpu", chunk=64):
    """chexgenbench's privacy protocol (§2.3, §3.2, Table 3): each synthetic image against its own source training
    image (prompt-and-seed protocol), pixel distance (pixel_distance), latent distance (latent_distance, with
    latent_ex: the Rad-DINO extractor), Re-ID score (reid_input, with --reid-weights), then chexgenbench_summary.
    Both images are brought to cfg.privacy_pixel_size (its code: 512) by --fit and bilinear + antialias (its code
    squashes with PIL: our images are square by crop / pad, as everywhere in metrics.py). Streamed in chunks of
    pairs sorted by training sample, so memory holds one chunk's images.
    Where we follow the paper, not the benchmark's code (metrics/privacy_metrics.py): its pixel distance subtracts
    uint8 arrays (wrap-around) and compares every seed against the last generated image (the loop variable
    gen_image); here each synthetic image is compared, in float, against its own source image. Its 10 random seeds
    per prompt are the sampler's business: any number of synthetic images per training sample is taken."""
    pairs, unpaired = privacy_pairs(fake, train, cfg)
    net = load_reid(cfg.reid_weights, device) if cfg.reid_weights else None
    size, got = cfg.privacy_pixel_size, {"src": [], "fake": [], "reid": [], "pixel": [], "latent": []}
    for c in range(0, len(pairs), chunk):
        part = pairs[c:c + chunk]
        (ka, xa), (kb, xb) = _pixels(fake, [p[0] for p in part], size, cfg), _pixels(train, sorted({
            p[1] for p in part}), size, cfg)  # each training image of the chunk loaded once
        ra, rb = {i: r for r, i in enumerate(ka)}, {i: r for r, i in enumerate(kb)}
        part = [p for p in part if p[0] in ra and p[1] in rb]  # pairs whose two images both load
        if not part:
            continue
        ia, ib = [ra[p[0]] for p in part], [rb[p[1]] for p in part]
        got["src"] += [train.ids[p[1]] for p in part]
        got["fake"] += [fake.ids[p[0]] for p in part]
        got["pixel"].append(pixel_distance(xa[ia], xb[ib]))
        ta, tb = (torch.from_numpy(x)[:, None] for x in (xa, xb))  # each image embedded once per chunk
        if net is not None:
            ea, eb = (net.embed(reid_input(x.to(device), cfg.reid_size)) for x in (ta, tb))
            got["reid"].append(net.score(ea[ia], eb[ib]).double().cpu().numpy())
        if latent_ex is not None:
            fa, fb = latent_ex(ta).numpy(), latent_ex(tb).numpy()
            got["latent"].append(latent_distance(fa[ia], fb[ib]))
    if not got["src"]:
        raise SystemExit(f"metrics: --privacy chexgenbench: none of the {len(pairs)} (synthetic, source) pairs has "
                         "two readable images, e.g. "
                         f"{getattr(fake, 'last_error', '') or getattr(train, 'last_error', '')}")
    cat = {k: np.concatenate(v) if v else None for k, v in got.items() if k not in ("src", "fake")}
    out = chexgenbench_summary(got["src"], cat["reid"], cat["pixel"], cat["latent"], cfg.reid_threshold)
    out["per_sample"]["fakes"] = {}
    for f, s in zip(got["fake"], got["src"]):
        out["per_sample"]["fakes"].setdefault(s, []).append(f)
    out |= {"protocol": "chexgenbench §3.2: each synthetic image against its source training image; per training "
                        "sample max Re-ID, min distances", "pixel_size": size, "pixel_units": "8-bit RMS [0, 255]",
            "n_fake_unpaired": unpaired, "n_pairs_unreadable": len(pairs) - len(got["src"])}
    out["latent_features"] = latent_ex.name if latent_ex is not None else None
    if net is None:
        out["reid_skipped"] = ("no --reid-weights: the Packhaeuser et al. 2022 Siamese ResNet-50 the benchmark loads "
                               "(ResNet-50_epoch11_data_handling_RPN.pth, from its authors; fetch-weights cannot)")
    if latent_ex is None:
        out["latent_skipped"] = "no feature space for the latent distance (raddino, or --privacy-features)"
    return out


def xrv_predict(logits, op_threshs=None):
    """torchxrayvision DenseNet.forward's output for a pretrained model: sigmoid, then op_norm with its operating
    points t (p < t: p / (2 t); else 1 - (1 - p) / (2 (1 - t)); 0.5 where t is NaN). Without t: the sigmoid."""
    p = torch.sigmoid(logits)
    if op_threshs is None:
        return p
    t = torch.as_tensor(op_threshs, dtype=p.dtype, device=p.device).expand_as(p)
    out = torch.where(p < t, p / (t * 2), 1 - (1 - p) / ((1 - t) * 2))
    return torch.where(torch.isnan(t), torch.full_like(p, 0.5), out)


def factual(real, fake, pairs, cfg, device):
    """Factual correctness (chexgen Results, Methods 'Quality Assessment'): Pearson correlation between a
    classifier's predictions on real images and on their paired synthetic images, the N x C prediction matrix
    flattened, plus the mean of the per-class correlations. chexgen's classifier is xrv's mimic-trained
    DenseNet-121 (--classifier xrv_mimic: densenet121-res224-mimic_ch, its own weights file); its outputs are
    xrv's (xrv_predict: sigmoid + op_norm with the model's published operating points) and only the outputs its
    pathology list names are used. chexgen says '14 common chest pathologies'; the released mimic_ch model names 11
    of its 18 outputs (the other 7 were not trained: op_norm makes them a constant 0.5), so C = 11 here.
    --classifier xrv: the 'all' model, its 18 outputs; a safetensors path: an xrv-layout DenseNet, every output
    after a sigmoid."""
    if cfg.classifier in XRV_MODELS:
        net, src = load_cnn(cfg.classifier, cfg.weights_dir, cfg.allow_random_weights, cfg.offline)
        kind = XRV_MODELS[cfg.classifier]["kind"]
        thr, names = XRV_OP_THRESHS[kind], XRV_LABELS[kind]
    else:
        sd, src = load_state(cfg.classifier), cfg.classifier
        if "classifier.weight" not in sd:
            raise SystemExit(f"metrics: {src} is not an xrv-layout DenseNet-121 (no classifier.weight)")
        net = load_into(XRVDenseNet(sd["classifier.weight"].shape[0]), sd, src)
        thr, names = None, [f"output {c}" for c in range(sd["classifier.weight"].shape[0])]
    net = net.eval().to(device)
    cols = [c for c, n in enumerate(names) if n]

    def predict(x):
        return xrv_predict(net(x * 2048 - 1024), thr)[:, cols]  # xrv normalize: [0, 1] -> [-1024, 1024]

    pr, pf = (_apply(predict, im, [p[i] for p in pairs], XRV_SIZE, cfg, device) for i, im in ((0, real), (1, fake)))
    ok = [(pr[a], pf[b]) for a, b in pairs if a in pr and b in pf]
    a, b = np.stack([o[0].numpy() for o in ok]), np.stack([o[1].numpy() for o in ok])
    per = [pearson(a[:, c], b[:, c]) for c in range(a.shape[1])]
    return {"n": len(ok), "pearson": pearson(a, b), "pearson_per_class_mean": float(np.nanmean(per)),
            "outputs": [names[c] for c in cols], "prediction": "sigmoid + xrv op_norm" if thr else "sigmoid",
            "classifier": src, "random_weights": src == "random"}


@torch.no_grad()
def alignment(fake, cfg, device="cpu", models=None):
    """chexgenbench's image-text alignment score (README 'Image-Text Alignment'; its code
    metrics/img_text_alignment_scores.py through hi-ml's ImageTextInferenceEngine.get_similarity_score_from_raw_data):
    per synthetic image, the cosine between BioViL-T's L2-normalised global image embedding and CXR-BERT's
    L2-normalised projected [CLS] embedding of the image's prompt (the fake meta.csv's cfg.alignment_text column);
    the mean over images, and per CheXpert pathology the mean over images whose label is 1 (its conditional mode:
    prompts of real rows with that label = 1, NaN counted as 0). Its code rounds each score to 3 decimals before
    averaging; here scores are kept in full (the means differ by < 5e-4). Images stream in batches; each distinct
    prompt is embedded once. models: a BioViLT to reuse, else load_biovil_t."""
    col = cfg.alignment_text
    if not fake.meta or not any(col in (r or {}) for r in fake.meta):
        return {"skipped": f"the fake folder has no meta.csv with a {col!r} column (--alignment-text)"}
    nets = models or load_biovil_t(find_biovil_t(cfg.weights_dir, cfg.offline), device)
    texts = [((r or {}).get(col) or "").strip() for r in fake.meta]
    todo = [i for i, t in enumerate(texts) if t]
    scores, kept = [], []  # per batch: cosines, and the image indices they belong to
    emb, n_long = {}, 0    # prompt -> its unit text embedding; prompts truncated to max_len tokens
    max_len = nets.text.bert.config.max_position_embeddings
    for keep, batch in iter_images(fake, todo, None, workers=cfg.workers, batch_size=cfg.batch_size,
                                   strict=cfg.strict, fn=biovil_prepare):
        if not batch:
            continue
        new = list(dict.fromkeys(texts[i] for i in keep if texts[i] not in emb))
        if new:
            enc, n = cxr_bert_inputs(nets.tokenizer, new, max_len)
            emb.update(zip(new, nets.text(**{k: v.to(device) for k, v in enc.items()}).double().cpu()))
            n_long += n
        x = torch.from_numpy(np.stack(batch))[:, None].expand(-1, 3, -1, -1).to(device)  # gray -> 3 channels
        img = nets.image(x).double().cpu()
        scores.append((img * torch.stack([emb[texts[i]] for i in keep])).sum(-1).numpy())
        kept += keep
    if not kept:
        return {"skipped": f"no readable image with a {col!r} text in {fake.root}"}
    s = np.concatenate(scores)
    per = {}
    for lab in LABELS:
        rows = [r for r, i in enumerate(kept) if _pos(fake.meta[i], lab)]
        if rows:
            per[lab] = {"mean": float(s[rows].mean()), "n": len(rows)}
    return {"mean": float(s.mean()), "std": float(s.std()), "n": len(s), "n_without_text": len(texts) - len(todo),
            "n_prompts": len(emb), "n_truncated": n_long, "text_column": col, "per_pathology": per,
            "weights": nets.files, "model": f"BioViL-T ({BIOVIL_T_REPO} {BIOVIL_T_REVISION}): image ResNet-50 + "
            "projector, text CXR-BERT + cls_projection_head",
            "preprocessing": f"min-max to uint8, shorter side {BIOVIL_T_RESIZE} (PIL bilinear), centre crop "
            f"{BIOVIL_T_CROP}, [0, 1], gray x 3 (hi-ml BioViL-T transform)"}


def _versions():
    import scipy, transformers  # noqa: E401
    return {"metrics.py": VERSION, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "transformers": transformers.__version__}


def evaluate(cfg):
    """Everything the inputs allow; returns the results dict (also written to cfg.out)."""
    if not cfg.fake:
        raise SystemExit("metrics: --fake is required (a folder of synthetic images)")
    chosen = ALL_METRICS if cfg.metrics == "all" else tuple(m.strip() for m in cfg.metrics.split(","))
    chosen = ("paired", "factual") if cfg.paired else chosen  # identity metrics only
    if bad := [m for m in chosen if m not in ALL_METRICS]:
        raise SystemExit(f"metrics: unknown --metrics {bad}; expected some of {','.join(ALL_METRICS)}")
    for flag, value, allowed in (("--fit", cfg.fit, ("crop", "pad")), ("--resize", cfg.resize, RESIZE_MODES),
                                 ("--xrv-resize", cfg.xrv_resize, XRV_RESIZE_MODES),
                                 ("--kid-sampler", cfg.kid_sampler, KID_SAMPLERS),
                                 ("--privacy", cfg.privacy, PRIVACY_MODES),
                                 ("--device", cfg.device, ("", "auto", "cpu", "cuda"))):
        if value not in allowed:
            raise SystemExit(f"metrics: {flag} {value!r}; expected one of {', '.join(a for a in allowed if a)}")
    check_options(cfg)
    if cfg.device in ("cpu", "cuda"):
        device = torch.device(cfg.device)
    else:  # '' or 'auto' (the older flag)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("metrics: --device cuda but torch sees no CUDA device (expected cpu, or a GPU build)")
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
            ex = get_extractor(name, cfg.weights_dir, cfg.allow_random_weights, device, cfg.offline, cfg.resize,
                               cfg.xrv_resize)
        except WeightsMissing as e:
            print(f"metrics: skipping {name}: {e}", file=sys.stderr)
            res["skipped_features"][name] = str(e)
            continue
        (fr, kr, cr), (ff, kf, cf) = (extract_features(im, ex, **kw) for im in (real, fake))
        feats[name] = (ex, fr, kr, ff, kf)
        res["features"][name] = dict(extractor=ex.name, dim=ex.dim, preprocessing=ex.preprocessing,
                                     resize=ex.resize if ex.processor is None else "processor", weights=ex.weights,
                                     weights_sha256=ex.weights_sha256, random_weights=ex.random_weights,
                                     **({"random_weights_seed": RANDOM_WEIGHTS_SEED} if ex.random_weights else {}),
                                     cache={"real": cr, "fake": cf},
                                     **distribution_metrics(fr, ff, cfg, chosen, device))
        if "conditions" in chosen and rgroups and fgroups:
            res.setdefault("conditions", {})[name] = {
                g: distribution_metrics(fr[_rows(kr, rgroups[g])], ff[_rows(kf, fgroups[g])], cfg, chosen, device)
                for g in rgroups}
    if set(chosen) & {"fd", "kid", "prdc"} and not res["features"]:
        names = list(res["skipped_features"])
        res["no_fidelity"] = ("NO FIDELITY METRIC COMPUTED (FD, KID, PRDC): " + (
            f"no weights found for {', '.join(names)}" if names else "no feature space given (--features)") +
            f"; exit status {EXIT_NO_FIDELITY}")
        res["weights_guide"] = weights_guide([n for n in names if n in CNN_WEIGHTS or n in HF_ALIASES],
                                             cfg.weights_dir) if names else []
        print("metrics: " + "\n".join([res["no_fidelity"]] + res["weights_guide"]), file=sys.stderr)
    if res.get("conditions"):  # App. A.3: counts of the training set's meta.csv (--train), else of the real set's
        tmeta = ImageSet(cfg.train, cfg.train_split).meta if cfg.train else None
        counts_of, meta = ("train", tmeta) if condition_groups(tmeta) else ("real", real.meta)
        counts = {lab: len(g) for lab, g in condition_groups(meta).items() if lab in LABELS}
        res["prevalence_fidelity"] = {name: prevalence_fidelity(counts, {g: d.get("fd") for g, d in groups.items()})
                                      | {"counts_of": counts_of} for name, groups in res["conditions"].items()}
    if "conditions" in chosen and not (rgroups and fgroups):
        res["conditions_skipped"] = "per-condition metrics need label columns in the meta.csv of both real and fake"
    if "diversity" in chosen:
        res["diversity"] = diversity(fake, cfg) if fake.meta else {"skipped": "the fake folder has no meta.csv"}
    pairs = paired_ids(real, fake)
    if cfg.paired and (miss := sorted(set(fake.ids) - {fake.ids[b] for _, b in pairs})):
        msg = f"{len(miss)} of {len(fake)} images of {fake.root} have no id in {real.root}, e.g. {miss[:3]}"
        if not pairs:
            raise SystemExit(f"metrics: --paired: {msg} (expected edited images named by their original's id)")
        print(f"metrics: --paired: {msg}; they are left out", file=sys.stderr)
        res["fake"]["unpaired"] = len(miss)
    if "paired" in chosen and pairs:
        res["paired"] = paired(real, fake, pairs, cfg, device)
    if "factual" in chosen and cfg.classifier:
        res["factual"] = factual(real, fake, pairs, cfg, device) if pairs else {"skipped": "no paired ids"}
    if "alignment" in chosen:
        try:
            res["alignment"] = alignment(fake, cfg, device)
        except WeightsMissing as e:
            print(f"metrics: skipping the alignment score: {e}", file=sys.stderr)
            res["alignment"] = {"skipped": str(e), "weights_guide": weights_guide(["biovil_t"], cfg.weights_dir)}
            if cfg.metrics != "all":  # asked for by name: the first lines and the exit status say it is missing
                res["no_alignment"] = f"NO ALIGNMENT SCORE COMPUTED: {e}; exit status {EXIT_NO_FIDELITY}"
    if train is not None:
        pf = cfg.privacy_features or ("raddino" if "raddino" in feats else next(iter(feats), ""))
        ex = feats[pf][0] if pf in feats else None
        ff, kf = feats[pf][3:] if pf in feats else (None, None)
        if cfg.privacy in ("nearest", "both"):
            tr = extract_features(train, ex, **kw)[:2] if ex else None
            res["privacy"] = privacy(fake, train, cfg, (pf, (ff, kf)) if ex else None, tr, device)
        if cfg.privacy in ("chexgenbench", "both"):
            res["privacy_chexgenbench"] = privacy_chexgenbench(fake, train, cfg, ex, device)
        res["train"] = {"path": train.root, "n": len(train)}
    elif cfg.privacy != "nearest" and "privacy" in chosen:
        raise SystemExit(f"metrics: --privacy {cfg.privacy} needs --train (the training set the synthetic images' "
                         "source_id rows come from)")
    if high := [key for key, s in (("real", real), ("fake", fake), ("train", train)) if s and s.info["high_bit"]]:
        note = (f"{' and '.join(high)} images are 16-bit: read here at full precision; pytorch-fid, torch-fidelity "
                "and clean-fid read them through PIL convert('RGB'), which clips them, so their numbers will disagree")
        res["notes"] = res.get("notes", []) + [note]
        print(f"metrics: note: {note}", file=sys.stderr)
    for key, s in (("real", real), ("fake", fake), ("train", train)):
        if getattr(s, "skipped", None):
            res[key]["unreadable_skipped"] = len(s.skipped)
            print(f"metrics: skipped {len(s.skipped)} unreadable image(s), e.g. {s.last_error}", file=sys.stderr)
    if cfg.out and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        def write(tmp):
            with open(tmp, "w") as fh:
                json.dump(res, fh, indent=1, default=float)
        atomic_save(cfg.out, write)
    return res


# Integer options that count things and their least value (0 allowed where it means 'none' or 'as few as needed').
# reid_size: ResNet-50 downsamples 32 times, so a smaller input leaves no spatial position.
COUNT_OPTIONS = {"batch_size": 1, "pixel_size": 1, "privacy_size": 1, "privacy_block": 1, "privacy_pixel_size": 1,
                 "reid_size": 32, "k": 1, "kid_subsets": 1, "kid_subset_size": 2, "max_pairs": 1, "random_pairs": 1,
                 "grid_pairs": 0, "workers": 0}


def check_options(cfg):
    """Counts and output paths, checked before any image is read: one line naming the flag (--batch-size 0 gave a
    ZeroDivisionError or an empty loop, --out a folder an IsADirectoryError after all the work)."""
    for name, low in COUNT_OPTIONS.items():
        if getattr(cfg, name) < low:
            raise SystemExit(f"metrics: --{name.replace('_', '-')} {getattr(cfg, name)}: expected an integer >= {low}")
    for flag, path in (("--out", cfg.out), ("--grid", cfg.grid)):
        if path and os.path.isdir(path):
            raise SystemExit(f"metrics: {flag} {path}: a folder; expected a file path")
    if cfg.cache_dir and os.path.exists(cfg.cache_dir) and not os.path.isdir(cfg.cache_dir):
        raise SystemExit(f"metrics: --cache-dir {cfg.cache_dir}: a file; expected a folder")


def format_table(res):
    """The readable stdout summary of a results dict (every number is also in results.json)."""
    def count(key):  # images used: the listed ones less the unreadable (the table's N counts the same)
        d = res.get(key) or {}
        bad = d.get("unreadable_skipped", 0)
        return f"N={d['n'] - bad}" + (f", {bad} of {d['n']} unreadable, skipped" if bad else "")

    lines = [f"!! {res['no_fidelity']}"] + [f"!! {g}" for g in res.get("weights_guide", [])] \
        if res.get("no_fidelity") else []
    if res.get("no_alignment"):
        lines += [f"!! {res['no_alignment']}"] + [f"!! {g}" for g in res["alignment"].get("weights_guide", [])]
    lines += [f"real {res['real']['path']} ({count('real')})   fake {res['fake']['path']} ({count('fake')})"]
    widths = (10, 18, 6, 6, 6, 6, 11)  # each cell right-aligned and preceded by one space: never glued together
    lines += ["feature space  " + "".join(" " + h.rjust(w) for h, w in zip(
        ("FD", "KID x1e3", "prec", "rec", "dens", "cov", "N r/f"), widths))] \
        if res["features"] or res["skipped_features"] else []
    rnd = "   random weights, not comparable"

    def row(label, d):
        def f(k):
            if k not in d:
                return "-"
            return f"{d[k]:.3f}" if abs(d[k]) < 1e4 else f"{d[k]:.3g}"
        kid_s = f"{d['kid_mean'] * 1e3:.3g}+-{d['kid_std'] * 1e3:.2g}" if "kid_mean" in d else "-"
        cells = (f("fd"), kid_s, f("precision"), f("recall"), f("density"), f("coverage"),
                 f"{d['n_real']}/{d['n_fake']}")
        return f"{label[:15]:<15}" + "".join(" " + c.rjust(w) for c, w in zip(cells, widths))

    for name, d in res["features"].items():
        lines += [row(name.rsplit("/", 1)[-1], d) + (rnd if d.get("random_weights") else "")] + [
            "  note: " + n for n in d.get("notes", [])]
    lines += [f"{name:<16}skipped: {msg}" for name, msg in res.get("skipped_features", {}).items()]
    for name, groups in res.get("conditions", {}).items():
        lines.append(f"per condition, {name}:" + (rnd if res["features"][name].get("random_weights") else ""))
        lines += [row("  " + g, d) for g, d in groups.items()]

    flat = lambda d: ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()  # noqa
                               if not isinstance(v, (list, dict)))
    for sec in ("diversity", "paired", "factual"):
        if sec in res:
            lines.append(f"{sec}: {flat(res[sec])}" + (rnd if res[sec].get("random_weights") else ""))
    if "random_pairs" in (pr := res.get("paired", {})):  # radit Table 14 layout: random-pair row, then the edits
        rp, lp = pr["random_pairs"], pr["lpips"]
        lines += ["", "| pairs | N | SSIM | PSNR | " + "".join(f"LPIPS ({k}) | rLPIPS ({k}) | " for k in lp),
                  "|---" * (4 + 2 * len(lp)) + "|", f"| random real pairs | {rp['n']} | {rp['ssim_mean']:.4f} | - | " +
                  "".join(f"{v['random_pairs_mean']:.5f} | 1.0 | " for v in lp.values()),
                  f"| paired (real, fake) | {pr['n']} | {pr['ssim_mean']:.4f} | {pr['psnr_mean']:.2f} | " +
                  "".join(f"{v['mean']:.5f} | {v['rlpips_mean']:.4f} | " for v in lp.values())]
        lines += [f"LPIPS ({k}): {rnd.strip()}" for k, v in lp.items() if v["random_weights"]]
    if "mean" in (al := res.get("alignment", {})):  # chexgenbench's alignment score
        lines.append(f"alignment (BioViL-T image-text cosine): {al['mean']:.4f} +- {al['std']:.4f} over {al['n']} "
                     f"images, {al['n_prompts']} prompts")
        lines += [f"  {lab:<27} {d['mean']:.4f}  N={d['n']}" for lab, d in al["per_pathology"].items()]
    elif al:
        lines.append(f"alignment: skipped: {al['skipped']}")
    for name, c in res.get("prevalence_fidelity", {}).items():  # App. A.3
        lines.append(f"prevalence-fidelity rank correlation (chexgenbench App. A.3), {name}: " + (
            f"{c['correlation']:.3f} over {c['n']} pathologies (counts of the {c['counts_of']} set)"
            if "correlation" in c else c["skipped"]))
    lines += [f"privacy, {sec}: {flat(d)}" for sec, d in res.get("privacy", {}).items()]
    if c := res.get("privacy_chexgenbench"):  # chexgenbench Table 3's rows, per training sample
        r, lat = c.get("reid"), c.get("latent")
        pix = c["pixel"]
        lines += [f"privacy (chexgenbench §3.2: {c['n_train_samples']} training samples, {c['n_pairs']} synthetic "
                  "images):",
                  f"  Avg Re-ID {r['avg']:.3f}, Max Re-ID {r['max']:.3f}, Count > {r['delta']:g}: "
                  f"{r['count_over_delta']}" if r else f"  Re-ID skipped: {c['reid_skipped']}",
                  f"  Avg latent distance {lat['avg']:.3f} ({c['latent_features']})" if lat else
                  f"  latent distance skipped: {c['latent_skipped']}",
                  f"  Avg pixel distance {pix['avg']:.1f} (8-bit RMS at {c['pixel_size']} px)"]
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
    r_real, r_fake = (np.partition(pdist(a, a), k, axis=1)[:, k] for a in (real, fake))  # k+1-th includes self
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
        covmean = scipy.linalg.sqrtm((s1 + np.eye(len(s1)) * 1e-6) @ (s2 + np.eye(len(s1)) * 1e-6))
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _kid_torch_fidelity(x, y, subsets=100, subset_size=1000, seed=2020):
    """Baseline: torch-fidelity's KID loop (numpy, features' float32 throughout, RandomState(2020), per subset three
    m x m kernel matrices)."""
    rng, vals = np.random.RandomState(seed), []
    d, m = x.shape[1], subset_size
    for _ in range(subsets):
        a, b = x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
        kxx, kyy = ((p @ p.T / d + 1) ** 3 for p in (a, b))
        kxy = (a @ b.T / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def bench(argv):
    """CPU ratios measured in one run: Frechet distance vs scipy sqrtm; PRDC vs full pairwise matrices; KID vs
    torch-fidelity's loop on the same subsets. Wall and process-CPU seconds are both recorded: on a machine shared
    with other jobs the CPU-time ratio is the fair one."""
    p = argparse.ArgumentParser(prog="metrics.py bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for flag, default, hlp in (("--n", 10000, "features per set"), ("--dim", 2048, "feature dimension"),
                               ("--k", 5, "PRDC k"), ("--seed", 0, "feature generator seed"),
                               ("--device", "cpu", "device for prdc() and kid()"), ("--kid-n", 0, "features per set "
                               "for KID (0 = --n)"), ("--only", "fd,prdc,kid", "what to time")):
        p.add_argument(flag, type=type(default), default=default, help=hlp)
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    mix = (rng.standard_normal((a.dim, a.dim)) / np.sqrt(a.dim)).astype(np.float32)  # float32 features, as extracted
    real = np.maximum(rng.standard_normal((a.n, a.dim)).astype(np.float32) @ mix, 0)
    fake = np.maximum((rng.standard_normal((a.n, a.dim)).astype(np.float32) * 1.02 + 0.01) @ mix, 0)
    out = {"n": a.n, "dim": a.dim, "k": a.k, "torch_threads": torch.get_num_threads(), **_versions()}
    runs = {"fd": (lambda: frechet_distance(real, fake), "fd_sqrtm", lambda: _fid_sqrtm(real, fake)),
            "prdc": (lambda: prdc(real, fake, a.k, a.device), "prdc_full_matrix",
                     lambda: _prdc_full_matrix(real, fake, a.k)),
            "kid": (lambda: kid(real[:kn], fake[:kn], device=a.device, sampler="torch-fidelity"), "kid_torch_fidelity",
                    lambda: _kid_torch_fidelity(real[:kn], fake[:kn]))}
    out["kid_n"] = kn = a.kid_n or a.n
    for m in a.only.split(","):
        ours, base = runs[m][:2]
        ref = runs[m][2]
        for name, fn in ((m, ours), (base, ref)):
            _mem_mb("reset")
            mem = _mem_mb("VmRSS")
            t, c = time.perf_counter(), time.process_time()
            out[name] = fn()
            out.update({name + "_s": time.perf_counter() - t, name + "_cpu_s": time.process_time() - c,
                        name + "_peak_mb": _mem_mb("VmHWM") - mem})
        out.update({f"{m}_speedup{x}": out[f"{base}{x}_s"] / out[f"{m}{x}_s"] for x in ("", "_cpu")})
        if m == "prdc":
            out["prdc_max_abs_diff"] = max(abs(out[m][q] - out[base][q]) for q in out[m])
        else:  # fd: relative difference; kid: of the mean (same subsets; the baseline sums in float32)
            out[f"{m}_rel_diff"] = abs(np.ravel(out[m])[0] - np.ravel(out[base])[0]) / abs(np.ravel(out[base])[0])
    print(json.dumps(out, indent=1))
    return out


# ----------------------------------------------------------------------------------------------------------------
# main: subcommands first (convert-xrv, bench); none means evaluate


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    if argv and argv[0] == "fetch-weights":
        return fetch_weights(argv[1:])
    if argv and argv[0] == "correlate":
        return correlate(argv[1:])
    if argv and argv[0] == "convert-xrv":
        p = argparse.ArgumentParser(prog="metrics.py convert-xrv", description="torchxrayvision pickle -> safetensors")
        p.add_argument("src", help=f"the pickled model, e.g. ~/.torchxrayvision/models_data/{XRV_FILE}")
        p.add_argument("--dst", default="", help=f"output ('' = beside src: {XRV_SAFE} for the 'all' model, "
                       f"{XRV_MIMIC_SAFE} for mimic_ch, else the source's stem)")
        a = p.parse_args(argv[1:])
        if not os.path.isfile(a.src):
            raise SystemExit(f"metrics: {a.src} not found (expected the pickled torchxrayvision model, {XRV_URL})")
        dst = convert_xrv(a.src, a.dst or os.path.join(os.path.dirname(os.path.abspath(a.src)), xrv_safe_name(a.src)))
        return print(f"wrote {dst}") or dst
    p = build_parser(description=__doc__.split("\n\n")[0], epilog="subcommands: convert-xrv SRC [--dst DST], bench, "
                     "fetch-weights [--weights-dir DIR] [--only NAMES], correlate --utility CSV; exit status "
                     f"{EXIT_NO_FIDELITY}: FD / KID / PRDC asked for, no feature network's weights found")
    cfg = Config(**vars(p.parse_args(argv)))
    if torch.distributed.is_available() and "RANK" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    res = evaluate(cfg)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(format_table(res))
    # results.json holds what was computed; the exit status says what was not
    if res.get("no_fidelity") or res.get("no_alignment"):
        raise SystemExit(EXIT_NO_FIDELITY)
    return res


if __name__ == "__main__":
    main()

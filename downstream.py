"""downstream.py: the utility of synthetic chest radiographs, measured by the models trained on them.

The papers' experiments, on any prepared dataset and any folder the samplers write (--task, default classify):
- classify: multi-label classifier over the 14 CheXpert labels (or --labels) trained on real, synthetic or mixed
  data; per-label and macro AUROC with 95% bootstrap CIs on each test set, mean +- std over --runs seeds, accuracy
  and F1 at thresholds chosen on validation (multicond §3.3, §4, Tables 1, 3; chexgenbench §2.4, Table 4, A.7).
- pretrain-finetune: pretrain on synthetic data, finetune on 1..100% of the real data (chexgen Fig. 4, Methods).
- fairness: metrics by sex, race, age (19-40 / 41-65 / 66+) and intersections, worst group, best-worst gap, Pearson
  r of the subgroup metrics between a real and a synthetic test cohort; --balance tops up under-represented groups
  with synthetic images until parity (chexgen Fig. 5c-d, Methods "Model bias detection and mitigation").
- segment: U-Net on dataset masks; Dice, positive and negative Dice (chexgen Fig. 3d, Methods).
- predict-metadata: one predictor of the 19 variables (CE per categorical, MSE for age; CNN or frozen Rad-DINO /
  DINOv2 with linear / MLP / attention-pooling heads), per-variable ROC-AUC and age MAE (radit §5.3, App. C.4).
- edit-eval: counterfactual edits scored by that predictor (radit Table 16) and by identity metrics, SSIM, LPIPS,
  rLPIPS, attribute cosine (Table 14, App. C.1 Eq. 13-15); --truth: against the phantom's true counterfactuals.
- cond-eval: does a conditional sampler draw what it is asked for? That predictor on the samples against their
  requested conditions (AUROC per finding, accuracy per categorical variable, age MAE), beside real test images
  (the ceiling) and unconditional samples (--floor). Mask Dice of ControlNet samples stays in controlnet.py evaluate.
- report-gen: image -> report models (CNN image tokens + a small causal transformer decoder, greedy decoding) trained
  on real, synthetic or mixed image-report pairs (the `report` column); corpus BLEU-1..4, ROUGE-L, CheXpert label
  F1 (micro / macro over the 5 competition labels and the 14) by prep_data.py extract-labels, beside a
  most-frequent-report and a nearest-neighbour-report baseline (chexgenbench §2.4, Table 6, App. A.7.2, Table 16).

Commands (the first word may also be the task):
    python downstream.py --data data/phantom                # CPU, minutes (tiny): = --train real=data/phantom:train
    python downstream.py \
        --train "real=data/mimic:train; syn=runs/rf/samples; real=data/mimic:train,syn=runs/rf/samples" \
        --mix 1:1 --test "mimic=data/mimic:test,chexpert=data/chexpert:test" --size densenet121 --runs 5 \
        --init imagenet:densenet121-a639ec97.pth --out runs/utility                        # multicond Tables 1, 3
    python downstream.py pretrain-finetune --train syn=runs/rf/samples --finetune real=data/mimic:train \
        --fractions 0.01,0.1,0.3,0.5,1 --size densenet121 --finetune-lr 1e-5               # chexgen Fig. 4
    python downstream.py fairness --train real=data/mimic:train --test data/mimic:test --syn-test runs/rf/cohort \
        --balance runs/rf/minority                                                         # chexgen Fig. 5c-d
    python downstream.py segment --train real=data/phantom:train --mask "Pleural Effusion"
    python downstream.py --eval --ckpt runs/downstream/real/run0 --test data/phantom:test --val data/phantom:val
    python downstream.py predict-metadata --train real=data/phantom:train --out runs/pred       # --encoder raddino
    python downstream.py edit-eval --original data/phantom --edited runs/rf/edits --truth data/cf \
        --predictor runs/pred/real/run0 --lpips raddino,dinov2 --out runs/edit-eval          # radit Tables 14, 16
    python downstream.py cond-eval --samples runs/rf/samples --data data/phantom --predictor runs/pred/real/run0 \
        --floor runs/rf/uncond --out runs/cond-eval                                         # issue 28
    python downstream.py report-gen --train "real=data/phantom:train; syn=runs/dit/samples; \
        real=data/phantom:train,syn=runs/dit/samples" --test ph=data/phantom:test --out runs/rrg   # chexgenbench T6
    torchrun --nproc_per_node=8 downstream.py --size densenet121 ...                       # DDP, bf16

Training data: `;` separates experiments (the rows of the table); within one, `,` joins sources `name=folder[:split]`.
A source is a FORMAT.md §1 dataset folder (`:split` picks train / val / test / all) or a folder of generated images:
`<folder>/meta.csv` (id + the 14 labels + sex / age / race / view, as the samplers write) and one greyscale 8- or
16-bit PNG per row, `<folder>/<id>.png` (segmentation: its mask `<folder>/<id>_mask.png`, non-zero = foreground).
Sources named `syn...` are synthetic: --syn-ratio R keeps R x (real images) of each; --mix 1:1 fixes the share of
each source in every batch. --out gets one folder per experiment and run (ckpt.safetensors to resume,
best.safetensors: early-stopped weights, log.jsonl), predictions/*.csv, results.json (every number), results.md.
report-gen writes reports/<test>.csv (reference and every system's report side by side), reports/all_reports.csv and
all_labels.csv (the labeller's input and output) and RUN/../vocab.json.
"""
from __future__ import annotations

import argparse
import colorsys
import copy
import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import sys
import tempfile
import time
import warnings
import weakref
from array import array
from collections import Counter, OrderedDict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from scipy.stats import pearsonr

# ----------------------------------------------------------------------------------------------------------------
# Config: one dataclass, size presets, CLI generated from the fields


def arg(default, help, only=None):
    """A dataclass field with its CLI help string (`only`: the one task that uses it)."""
    return field(default=default, metadata={"help": help, "only": only})


PM, EE, CE, RG = "predict-metadata", "edit-eval", "cond-eval", "report-gen"


@dataclass
class Config:
    """Experiment, model and training configuration; stored in every checkpoint."""
    task: str = arg("classify", "classify | pretrain-finetune | fairness | segment | predict-metadata | edit-eval | "
                    "cond-eval | report-gen")
    data: str = arg("data/phantom", "dataset folder (FORMAT.md); without --train, the source real=DATA:train")
    train: str = arg("", "experiments separated by ';', each name=folder[:split] sources by ','; '': real=DATA:train")
    val: str = arg("", "validation set (early stopping, thresholds); '': the first source's val split, or 10%% of it")
    test: str = arg("", "test sets name=folder[:split], ','-separated; '': the first source's test split")
    out: str = arg("runs/downstream", "output folder: one run folder per experiment and seed, results.json/.md")
    size: str = arg("tiny", "preset: tiny | densenet121 | resnet50 | unet")
    arch: str = arg("tiny", "network: tiny | densenet121 | resnet50 | unet (segment always uses unet)")
    width: int = arg(16, "base width of the tiny CNN and of the U-Net")
    init: str = arg("", "'': random; imagenet:FILE (torchvision .pth / .safetensors); or a run folder of this script")
    labels: str = arg("", "comma-separated labels to classify; '': the 14 CheXpert labels")
    uncertain: str = arg("ignore", "uncertain (-1) labels: ignore (masked like missing) | ones | zeros")
    views: str = arg("", "keep only these views, e.g. PA,AP (multicond §4: frontal only); '': all")
    mix: str = arg("", "share of each source in every batch, e.g. 1:1; '': sources concatenated")
    syn_ratio: float = arg(0.0, "use R x n_real images of each synthetic (syn...) source (chexgen: 1x, 2x); 0: all")
    weighted_sampling: bool = arg(False, "sample rows so every label is equally represented (chexgen Methods)")
    img_size: int = arg(0, "input side in pixels (papers: 224 or 256); 0: the first source's size")
    batch_size: int = arg(64, "global batch size (chexgen: 128)")
    micro_batch: int = arg(0, "per-process micro-batch; 0: the whole per-process batch (no accumulation)")
    max_steps: int = arg(400, "optimizer steps")
    lr: float = arg(3e-3, "AdamW learning rate (chexgenbench Table 12: 1e-4 ResNet-50, 5e-5 U-Net)")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    schedule: str = arg("cosine", "learning-rate schedule: cosine (chexgen Methods) | constant")
    clip: float = arg(1.0, "gradient-norm clipping")
    rotate: float = arg(10.0, "augmentation: random rotation in +-degrees (chexgen Methods: 10)")
    intensity: float = arg(0.1, "augmentation: random brightness / contrast / gamma amplitude")
    flip: float = arg(0.0, "augmentation: horizontal-flip probability (0: CXR laterality matters)")
    eval_every: int = arg(100, "steps between validation evaluations (early stopping)")
    patience: int = arg(4, "stop after this many evaluations without a better validation score; 0: never")
    runs: int = arg(1, "independent runs with seeds seed..seed+N-1 (papers: 5); tables show mean +- std")
    seed: int = arg(0, "seed of the initialisation, data order and augmentation")
    n_boot: int = arg(1000, "bootstrap resamples of the test set for the 95%% CIs")
    finetune: str = arg("", "real data to finetune on", only="pretrain-finetune")
    fractions: str = arg("0.01,0.1,0.3,0.5,1", "fractions of --finetune data (chexgen Fig. 4)",
                         only="pretrain-finetune")
    finetune_lr: float = arg(0.0, "finetuning learning rate (chexgen: 1e-5); 0: --lr", only="pretrain-finetune")
    finetune_steps: int = arg(0, "finetuning steps; 0: --max-steps", only="pretrain-finetune")
    syn_test: str = arg("", "synthetic test cohort (matched to --test) for bias detection", only="fairness")
    balance: str = arg("", "synthetic folder whose images top up under-represented groups", only="fairness")
    balance_by: str = arg("sex,race,age", "attributes whose intersections are balanced", only="fairness")
    fair_metric: str = arg("f1", "worst / gap / Pearson metric: f1 (chexgen: weighted F1) | auroc", only="fairness")
    min_group: int = arg(10, "subgroups with fewer test images are listed but not ranked", only="fairness")
    mask: str = arg("Pleural Effusion", "mask to segment (a name in info.json mask_names)", only="segment")
    pos_weight: float = arg(10.0, "weight of foreground pixels in the BCE", only="segment")
    encoder: str = arg("", "frozen transformers encoder (raddino | dinov2 | id | path) instead of --arch", only=PM)
    head: str = arg("attn", "linear | mlp | attn (attention pooling, a query per variable; radit Table 15)", only=PM)
    enc_layers: str = arg("3,6,9,12", "encoder layers whose tokens the head reads (radit Table 15)", only=PM)
    hidden: int = arg(1024, "mlp head width (radit Table 15: 1024, dropout 0.1)", only=PM)
    warmup: int = arg(0, "linear learning-rate warm-up steps (radit Table 15: 100)")
    datasets: str = arg("", "dataset names, codes 1..K; '': info.json's datasets (stored in the checkpoint)")
    original: str = arg("", "dataset of the source images (matched by id)", only=EE)
    edited: str = arg("", "folder of edited images: <id>.png, meta.csv with intervention + new profile", only=EE)
    truth: str = arg("", "dataset of the true counterfactuals (prep_data.py counterfactual)", only=EE)
    predictor: str = arg("", "run folder of predict-metadata (edit-eval, cond-eval; cond-eval also takes --ckpt)")
    samples: str = arg("", "folder of conditional samples: <id>.png, meta.csv with the requested conditions", only=CE)
    floor: str = arg("", "folder of unconditional samples (the floor), paired with --samples' rows by order; '': none",
                     only=CE)
    max_tokens: int = arg(64, "longest report in word tokens, end token included (longer ones are cut; greedy "
                          "decoding stops there)", only=RG)
    dec_dim: int = arg(128, "width of the report decoder (transformer, cross-attention to the image tokens)", only=RG)
    dec_layers: int = arg(2, "decoder blocks", only=RG)
    dec_heads: int = arg(4, "decoder attention heads", only=RG)
    lpips: str = arg("raddino", "feature spaces of the LPIPS-style distance (radit Eq. 13); '': none", only=EE)
    weights_dir: str = arg("", "local folder of pretrained transformers weights (offline use)")
    allow_random_weights: bool = arg(False, "random encoder weights when none are found (smoke tests only)")
    n_pairs: int = arg(1000, "random pairs of originals for the reference rows (radit Eq. 14)", only=EE)
    eval: bool = arg(False, "evaluate --ckpt on --test only, no training")
    ckpt: str = arg("", "run folder or checkpoint for --eval")
    roc_plot: str = arg("", "PNG with the ROC curves of the first run on the first test set")
    device: str = arg("", "cpu | cuda (default: cuda when available)")
    compile: bool = arg(False, "torch.compile the model")
    resume: bool = arg(True, "continue runs from their ckpt.safetensors (--no-resume starts over)")
    log_every: int = arg(50, "steps between log lines")
    ckpt_every: int = arg(200, "steps between checkpoints")
    cache_gb: float = arg(4.0, "hold a source's pixels in memory when they take less than this")
    dry_run: bool = arg(False, "build the model, print config and parameter count, exit")
    bench: bool = arg(False, "time 10 training steps of the network on random --img-size images (img/s, memory)")


# chexgen Methods: DenseNet-121, batch 128, AdamW, 256 px; chexgenbench Table 12: ResNet-50 lr 1e-4, U-Net lr 5e-5;
# chexgen segmentation: batch 32, lr 1e-3. tiny is for tests and the CPU demo.
_BIG = dict(img_size=224, batch_size=128, lr=1e-4, max_steps=20000, eval_every=1000, log_every=100, ckpt_every=1000)
PRESETS = {"tiny": dict(arch="tiny", width=16, img_size=0, batch_size=64, lr=3e-3, max_steps=400, eval_every=100),
           "densenet121": dict(_BIG, arch="densenet121"), "resnet50": dict(_BIG, arch="resnet50"),
           "unet": dict(_BIG, arch="unet", width=32, img_size=256, batch_size=32, lr=1e-3, max_steps=10000)}
SAFE = re.compile(r"[^A-Za-z0-9_.+-]")                          # run-folder names from row names
TASKS = ("classify", "pretrain-finetune", "fairness", "segment", "predict-metadata", "edit-eval", "cond-eval",
         "report-gen")
NO_AUG = dict(rotate=0.0, intensity=0.0, warmup=100)     # radit App. C.4: predictors trained without augmentation


def build_parser(cls, prog, doc):
    """argparse from dataclass fields: dashes on the CLI, defaults and help shown, booleans get --no-X."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        preset = " (set by --size)" if any(f.name in v for v in PRESETS.values()) else ""
        task = f" [{f.metadata['only']} only]" if f.metadata["only"] else ""
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool) else {"type": type(f.default)}
        p.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kind,
                       help=f"{f.metadata['help']}{task} [default: {f.default}{preset}]")
    return p


def parse_config(argv):
    """Config = dataclass defaults, then the --size preset, then the flags given explicitly."""
    argv = list(argv)
    if argv and argv[0] in TASKS:                                # `downstream.py segment ...` = `--task segment`
        argv = ["--task", argv.pop(0)] + argv
    given = vars(build_parser(Config, "downstream.py", __doc__).parse_args(argv))
    size = {k.lower(): k for k in PRESETS}.get(given.get("size", Config.size).lower())
    cfg = Config(**{**PRESETS.get(size, {}), **(NO_AUG if given.get("task") == "predict-metadata" else {}), **given,
                    "size": size or given.get("size")})
    for flag, ok in (("size", PRESETS), ("task", TASKS), ("uncertain", ("ignore", "ones", "zeros")), ("arch", ARCHS),
                     ("head", ("linear", "mlp", "attn")), ("fair_metric", ("f1", "auroc"))):
        if getattr(cfg, flag) not in ok:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(cfg, flag)!r}: expected one of {list(ok)}")
    if not cfg.train:
        cfg.train = f"real={cfg.data}:train"
    if cfg.task == "segment":
        cfg.arch = "unet"
    elif cfg.arch == "unet":
        raise SystemExit("--arch unet: only for --task segment; expected tiny, densenet121 or resnet50")
    return cfg

# ----------------------------------------------------------------------------------------------------------------
# Model: DenseNet-121 and ResNet-50 with torchvision's parameter names, a tiny CNN, a U-Net


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (4k channels) - BN-ReLU-Conv3x3 (k channels), concatenated to its input (DenseNet-BC)."""

    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))], 1)


class DenseNet121(nn.Module):
    """DenseNet-121 (Huang et al. 2017), torchvision layout: features.{conv0,norm0,denseblockN,transitionN,norm5},
    classifier; growth 32, blocks (6, 12, 24, 16), 64 initial features, bottleneck 4 (multicond §4, chexgen)."""

    def __init__(self, n_out, in_ch=1, growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4):
        super().__init__()
        f = nn.Sequential(OrderedDict(conv0=nn.Conv2d(in_ch, init, 7, stride=2, padding=3, bias=False),
                                      norm0=nn.BatchNorm2d(init), relu0=nn.ReLU(inplace=True),
                                      pool0=nn.MaxPool2d(3, stride=2, padding=1)))
        c = init
        for i, n in enumerate(blocks):
            f.add_module(f"denseblock{i + 1}", nn.Sequential(OrderedDict(
                (f"denselayer{j + 1}", DenseLayer(c + j * growth, growth, bn_size)) for j in range(n))))
            c += n * growth
            if i < len(blocks) - 1:
                f.add_module(f"transition{i + 1}", nn.Sequential(OrderedDict(
                    norm=nn.BatchNorm2d(c), relu=nn.ReLU(inplace=True), conv=nn.Conv2d(c, c // 2, 1, bias=False),
                    pool=nn.AvgPool2d(2, stride=2))))
                c //= 2
        f.add_module("norm5", nn.BatchNorm2d(c))
        self.features, self.classifier = f, nn.Linear(c, n_out)
        init_weights(self)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1))


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck, stride on the 3x3 convolution (torchvision's 'v1.5')."""

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
        self.downsample = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(
            width * 4)) if stride != 1 or cin != width * 4 else None

    def forward(self, x):
        h = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 (chexgenbench §2.4), torchvision layout: conv1, bn1, layer1..4 ([3, 4, 6, 3] bottlenecks), fc."""

    def __init__(self, n_out, in_ch=1, layers=(3, 4, 6, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_ch, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        for i, n in enumerate(layers):                           # stride 2 in the first block of layers 2-4
            blocks = [Bottleneck(256 * 2 ** i if j else 128 * 2 ** i if i else 64, 64 * 2 ** i, 2 if i and not j else 1)
                      for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(256 * 2 ** (len(layers) - 1), n_out)
        init_weights(self)

    def trunk(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.trunk(x), 1).flatten(1))


def conv_bn(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TinyCNN(nn.Module):
    """Conv-BN-ReLU stages, head on [mean, max] pooled features (max keeps a thin pneumothorax rim): tests, CPU demo."""

    def __init__(self, n_out, in_ch=1, width=16):
        super().__init__()
        self.features = nn.Sequential(*conv_bn(in_ch, w := width), nn.MaxPool2d(2), *conv_bn(w, 2 * w), nn.MaxPool2d(2),
                                      *conv_bn(2 * w, 4 * w), *conv_bn(4 * w, 4 * w))
        self.classifier = nn.Linear(8 * w, n_out)
        init_weights(self)

    def forward(self, x):
        return self.classifier(torch.cat([(h := self.features(x)).mean((2, 3)), h.amax((2, 3))], 1))


class UNet(nn.Module):
    """U-Net (chexgenbench §2.4, chexgen Methods): 4 levels of double conv-BN-ReLU, transposed-conv up, skips."""

    def __init__(self, n_out, in_ch=1, width=32, levels=4):
        super().__init__()
        ws = [width * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList(nn.Sequential(*conv_bn(c, w), *conv_bn(w, w)) for c, w in zip([in_ch] + ws, ws))
        self.up = nn.ModuleList(nn.ConvTranspose2d(w, w // 2, 2, stride=2) for w in ws[:0:-1])
        self.dec = nn.ModuleList(nn.Sequential(*conv_bn(w, w // 2), *conv_bn(w // 2, w // 2)) for w in ws[:0:-1])
        self.head = nn.Conv2d(width, n_out, 1)
        init_weights(self)
        nn.init.normal_(self.head.weight, std=0.01), nn.init.constant_(self.head.bias, -3.0)   # p ~ sigmoid(-3): rare

    def forward(self, x):
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, skips[-2::-1]):
            x = dec(torch.cat([up(x), skip], 1))
        return self.head(x)


def init_weights(model):
    """torchvision's initialisation: Kaiming-normal convolutions, BN weight 1 / bias 0, zero linear bias."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


AGE_MU, AGE_SD = 60.0, 20.0                                      # age regressed as (years - 60) / 20


class MetadataPredictor(nn.Module):
    """radit §5.3, App. C.4: one head per variable on a shared backbone (a CNN of --arch, or a frozen transformers
    encoder whose layers' tokens are concatenated: Table 15's layers 3, 6, 9, 12 -> 4 x 768); linear / MLP heads on
    mean-pooled tokens, or attention pooling with a learned query per variable. embed(): the heads' inputs (Eq. 15)."""

    def __init__(self, cfg):
        super().__init__()
        self.variables, names = resolve_labels(cfg), [v for v in cfg.datasets.split(",") if v]
        self.sizes = [1 if v == "age" else len(CATS.get(v, names)) or 1 for v in self.variables]
        if cfg.encoder:
            import metrics                                       # its loader: local folder, hub when online, random
            try:
                with torch.random.fork_rng():                    # (random weights seeded: the same on every reload)
                    torch.manual_seed(0)
                    enc = metrics.get_extractor(cfg.encoder, cfg.weights_dir, cfg.allow_random_weights).net
            except metrics.WeightsMissing as e:
                raise SystemExit(f"--encoder {cfg.encoder}: {e}") from None
            object.__setattr__(self, "encoder", enc.eval().requires_grad_(False))   # not a submodule: never saved
            self.layers = [int(v) for v in cfg.enc_layers.split(",")]
            dim = enc.config.hidden_size * len(self.layers)
        else:
            self.backbone = ARCHS[cfg.arch](1, **({"width": cfg.width} if cfg.arch == "tiny" else {}))
            self.backbone.classifier = self.backbone.fc = nn.Identity()          # its head: unused
            dim = {"tiny": 4 * cfg.width, "densenet121": 1024, "resnet50": 2048}[cfg.arch]
        V, self.kind = len(self.variables), cfg.head
        if cfg.head == "attn":
            self.norm, self.query = nn.LayerNorm(dim), nn.Parameter(torch.randn(V, dim) / dim ** 0.5)
        if cfg.head == "mlp":                                    # radit Table 15: hidden 1024, dropout 0.1
            self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, cfg.hidden), nn.GELU(), nn.Dropout(0.1))
                                     for _ in range(V))
        self.heads = nn.ModuleList(nn.Linear(cfg.hidden if cfg.head == "mlp" else dim, k) for k in self.sizes)

    def embed(self, x):
        """[B, 1, S, S] -> [B, variables, E]: the per-variable embeddings the heads read."""
        if hasattr(self, "encoder"):
            with torch.no_grad():
                hs = self.encoder.to(x.device)(pixel_values=x.expand(-1, 3, -1, -1), output_hidden_states=True)
            t = torch.cat([hs.hidden_states[k] for k in self.layers], -1)
        else:                                                    # CNN maps -> [B, h*w, C] tokens
            b = self.backbone
            t = (b.trunk(x) if hasattr(b, "trunk") else F.relu(b.features(x))).flatten(2).transpose(1, 2)
        if self.kind == "attn":
            t = self.norm(t.float())
            return torch.softmax(torch.einsum("btd,vd->bvt", t, self.query) / t.shape[-1] ** 0.5, -1) @ t
        t = t.float().mean(1)                                    # linear: one shared embedding for every head
        return torch.stack([m(t) for m in self.mlp] if self.kind == "mlp" else [t] * len(self.sizes), 1)

    def forward(self, x):
        e = self.embed(x)
        return torch.cat([h(e[:, i]) for i, h in enumerate(self.heads)], 1)


PAD, BOS, EOS, UNK = 0, 1, 2, 3                                  # the report vocabulary's special tokens
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


class ReportModel(nn.Module):
    """Image -> report (chexgenbench §2.4 trains LLaVA-Rad; this is the small stand-in of issue 24): the --arch CNN's
    last feature map as image tokens (+ learned row / column positions), a causal transformer decoder (pre-norm,
    self-attention, cross-attention to the image tokens, MLP) over word tokens, a linear head over the vocabulary."""
    MAX_SIDE = 128                                               # feature-map rows / columns with a position

    def __init__(self, cfg, vocab_size):
        super().__init__()
        if cfg.dec_dim % cfg.dec_heads:
            raise SystemExit(f"--dec-dim {cfg.dec_dim}: expected a multiple of --dec-heads {cfg.dec_heads}")
        self.backbone = ARCHS[cfg.arch](1, **({"width": cfg.width} if cfg.arch == "tiny" else {}))
        self.backbone.classifier = self.backbone.fc = nn.Identity()          # its classification head: unused
        dim, D = {"tiny": 4 * cfg.width, "densenet121": 1024, "resnet50": 2048}[cfg.arch], cfg.dec_dim
        self.proj = nn.Linear(dim, D)
        self.row, self.col = (nn.Parameter(torch.randn(self.MAX_SIDE, D) * 0.02) for _ in range(2))
        self.embed = nn.Embedding(vocab_size, D)
        self.pos = nn.Parameter(torch.randn(cfg.max_tokens, D) * 0.02)   # bos + max_tokens - 1 words are fed
        # our choice: dropout 0.1 (GPT-2's), pre-norm blocks (stable without warm-up at these sizes)
        block = nn.TransformerDecoderLayer(D, cfg.dec_heads, 4 * D, dropout=0.1, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(block, cfg.dec_layers)
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, vocab_size)

    def encode(self, x):
        """[B, 1, S, S] -> image tokens [B, h*w, D]."""
        b = self.backbone
        f = b.trunk(x) if hasattr(b, "trunk") else F.relu(b.features(x))
        h, w = f.shape[-2:]
        if max(h, w) > self.MAX_SIDE:
            raise SystemExit(f"--img-size {x.shape[-1]}: a {h}x{w} feature map; expected at most {self.MAX_SIDE} "
                             f"a side")
        pos = (self.row[:h, None] + self.col[None, :w]).reshape(h * w, -1)
        return self.proj(f.flatten(2).transpose(1, 2).float()) + pos

    def decode(self, mem, tokens):
        """Teacher forcing: logits [B, T, V] of the token after each of tokens [B, T] (T <= max_tokens)."""
        T = tokens.shape[1]
        causal = torch.triu(torch.full((T, T), float("-inf"), device=tokens.device), 1)
        h = self.decoder(self.embed(tokens) + self.pos[:T], mem, tgt_mask=causal, tgt_is_causal=True)
        return self.head(self.norm(h))

    def forward(self, x, tokens):
        return self.decode(self.encode(x), tokens)

    @torch.no_grad()
    def generate(self, x, max_tokens):
        """Greedy decoding (our choice: deterministic, the usual RRG baseline) -> [B, <= max_tokens] token ids after
        <bos>, <eos> included where it was reached; rows that ended are padded."""
        mem = self.encode(x)
        out = torch.full((x.shape[0], 1), BOS, dtype=torch.long, device=x.device)
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(max_tokens):
            nxt = self.decode(mem, out)[:, -1].float().argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            out, done = torch.cat([out, nxt[:, None]], 1), done | (nxt == EOS)
            if bool(done.all()):
                break
        return out[:, 1:]


ARCHS = {"tiny": TinyCNN, "densenet121": DenseNet121, "resnet50": ResNet50, "unet": UNet}
HEADS = ("classifier.", "fc.", "head.")                           # replaced when the label set differs


def build_model(cfg, n_out):
    if cfg.task == RG:                                           # n_out: the vocabulary size
        return ReportModel(cfg, n_out)
    return MetadataPredictor(cfg) if cfg.task in (PM, EE, CE) else ARCHS[cfg.arch](
        n_out, **({"width": cfg.width} if cfg.arch in ("tiny", "unet") else {}))


# Old torchvision DenseNet checkpoints (densenet121-a639ec97.pth) spell 'norm.1' for 'norm1' (torchvision's remap).
LEGACY_DENSE = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                          r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def load_imagenet(model, path):
    """A torchvision ImageNet state_dict (.pth, weights_only=True, or .safetensors) into `model`: legacy DenseNet keys
    remapped, the stem summed over RGB (same response to a grey image copied to 3 channels), the 1000-class head
    dropped."""
    if not os.path.isfile(path):
        raise SystemExit(f"--init imagenet:{path}: no such file; expected torchvision's ImageNet weights, e.g. "
                         f"https://download.pytorch.org/models/densenet121-a639ec97.pth or resnet50-0676ba61.pth")
    try:
        if path.endswith(".safetensors"):
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)       # tensors only: nothing executed
    except Exception as e:                                       # torch.load / safetensors raise many kinds
        raise SystemExit(f"--init imagenet:{path}: not a readable state_dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); expected torchvision's ImageNet weights "
                         f"(.pth or .safetensors)") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise SystemExit(f"--init imagenet:{path}: not a state_dict of tensors; expected torchvision's ImageNet "
                         f"weights")
    sd = {LEGACY_DENSE.sub(r"\1\2", k): v for k, v in sd.items()}
    own = model.state_dict()
    for k in ("features.conv0.weight", "conv1.weight"):
        if k in sd and k in own and sd[k].shape[1] == 3 and own[k].shape[1] == 1:
            sd[k] = sd[k].sum(1, keepdim=True)
    sd = {k: v for k, v in sd.items() if not k.startswith(HEADS)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(HEADS) and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"{path}: not a torchvision {type(model).__name__} state_dict (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model


def load_init(model, init):
    """--init: imagenet:FILE, or a run folder / checkpoint of this script (the head is kept when it fits)."""
    if not init or init.startswith("imagenet:"):
        return load_imagenet(getattr(model, "backbone", model), init[len("imagenet:"):]) if init else model
    _, parts, path = read_checkpoint(init, prefixes=("model.",))
    sd, own = parts["model."], model.state_dict()
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape and not k.startswith(HEADS)]
    if bad or set(own) - set(sd):
        raise SystemExit(f"{path}: weights of another network (e.g. {(bad or sorted(set(own) - set(sd)))[:2]}); "
                         f"expected a checkpoint of --arch {type(model).__name__}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}, strict=False)
    return model

# ----------------------------------------------------------------------------------------------------------------
# Method: losses, AUROC with bootstrap CIs, thresholds and F1, Dice, subgroup metrics


def report_loss(logits, target):
    """Next-token cross-entropy over the report tokens, padding ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=PAD)


def masked_bce(logits, target):
    """Binary cross-entropy over the known labels only: NaN targets (missing, ignored uncertain) add nothing."""
    known = ~torch.isnan(target)
    loss = F.binary_cross_entropy_with_logits(logits.float(), target.nan_to_num(0.0), reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def seg_loss(logits, target, pos_weight=10.0):
    """Foreground-weighted BCE + soft Dice over the batch: without the weight, a small U-Net learns to predict
    nothing first (findings cover ~2% of the pixels) and stays there for hundreds of steps."""
    p, w = torch.sigmoid(logits.float()), torch.tensor(pos_weight, device=logits.device)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=w) + dice


def metadata_loss(out, target, sizes):
    """radit App. C.4: cross-entropy per categorical variable, MSE for age, missing (NaN) targets skipped; the mean
    over variables of each one's mean over its known rows."""
    losses, o = [], 0
    for j, k in enumerate(sizes):
        z, t, o = out[:, o:o + k].float(), target[:, j], o + k
        known = ~torch.isnan(t)
        per = (F.mse_loss(z[:, 0], (t.nan_to_num(AGE_MU) - AGE_MU) / AGE_SD, reduction="none") if k == 1 else
               F.cross_entropy(z, t.nan_to_num(0).long(), reduction="none"))
        losses.append((per * known).sum() / known.sum().clamp(min=1))
    return torch.stack(losses).mean()


def activate(model, out):
    """Outputs -> scores: sigmoid per label; predictor heads: softmax per variable, age in years."""
    if not isinstance(model, MetadataPredictor):
        return torch.sigmoid(out.float())
    return torch.cat([z * AGE_SD + AGE_MU if k == 1 else z.softmax(1)
                      for z, k in zip(out.float().split(model.sizes, 1), model.sizes)], 1)


def metadata_metrics(y, p, variables, sizes):
    """Per variable: ROC-AUC (multi-class: one-vs-rest, the mean over classes present) or age MAE in years; and the
    predicted class / age of every row ([N, V], what the edit hit rates count)."""
    res, pred, o = {}, np.zeros(y.shape), 0
    for j, (v, k) in enumerate(zip(variables, sizes)):
        t, s, o = y[:, j], p[:, o:o + k], o + k
        ok = ~np.isnan(t)
        pred[:, j] = s[:, 0] if k == 1 else s.argmax(1)
        aucs = [a for a in (auroc(t[ok] == c, s[ok, c]) for c in range(k)) if a == a] if k > 1 and ok.any() else []
        res[v] = float(np.abs(s[ok, 0] - t[ok]).mean()) if k == 1 and ok.any() else np.mean(aucs) if aucs else None
    return res, pred


def attribute_cosine(ea, eb, variables, edited):
    """radit Eq. 15: per image pair, the mean over the attributes (sex, race, age, view, dataset) that its edit left
    unchanged of the cosine similarity of the two images' embeddings from that attribute's head. ea, eb [N, V, E]."""
    cos = F.cosine_similarity(*(torch.as_tensor(e, dtype=torch.float64) for e in (ea, eb)), dim=-1).numpy()
    keep = np.array([[v in META and v not in e for v in variables] for e in edited], bool).reshape(cos.shape)
    with np.errstate(invalid="ignore"):
        return (cos * keep).sum(1) / keep.sum(1)                 # NaN where nothing stayed unchanged


def weighted_auroc(y, s, w):
    """AUROC of scores s for binary y under row weights w [B, N] (bootstrap counts; ones: the plain AUROC).
    AUC = P(s_pos > s_neg) + P(s_pos = s_neg) / 2, the Mann-Whitney statistic, ties grouped exactly."""
    y = np.asarray(y, bool)
    _, inv = np.unique(np.asarray(s, np.float64), return_inverse=True)
    order = np.argsort(inv, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inv[order]) != 0])
    w = np.atleast_2d(w)[:, order]
    pos = np.add.reduceat(w * y[order], starts, axis=1)          # weight of positives per distinct score
    neg = np.add.reduceat(w * ~y[order], starts, axis=1)
    below = np.cumsum(neg, 1) - neg
    denom = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (pos * (below + 0.5 * neg)).sum(1) / denom, np.nan)


def auroc(y, s):
    return float(weighted_auroc(y, s, np.ones(len(y)))[0])


def auroc_table(y, s, n_boot=1000, seed=0):
    """Per-label and macro AUROC with 95% percentile-bootstrap CIs. y [N, L] with NaN unknown, s [N, L]. The
    same resampled rows serve every label, so the macro CI is the spread of the macro over resamples: rows
    np.random.default_rng(seed).integers(0, N, (n_boot, N)) (documented, so a reference can redraw them)."""
    idx, n = np.random.default_rng(seed).integers(0, len(y), (n_boot, len(y))), len(y)
    counts = np.stack([np.bincount(r, minlength=n) for r in idx]).astype(np.float64) if n_boot else np.zeros((0, n))
    point, boots = [], []
    for j in range(y.shape[1]):
        k = ~np.isnan(y[:, j])
        point.append(auroc(y[k, j], s[k, j]) if k.any() else math.nan)
        boots.append(weighted_auroc(y[k, j], s[k, j], counts[:, k]) if k.any() and n_boot else np.full(n_boot, np.nan))
    point, boots = np.array(point), np.stack(boots, 1)           # [L], [B, L]
    with warnings.catch_warnings():                              # all-NaN slices (labels absent) are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        macro_b = np.nanmean(np.where(np.isnan(point), np.nan, boots), 1)

        def ci(v):
            if not np.isfinite(v).any():
                return [None, None]
            return [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]

        return {"auroc": [None if math.isnan(p) else p for p in point],
                "auroc_ci": [ci(boots[:, j]) for j in range(len(point))],
                "macro": float(np.nanmean(point)) if np.isfinite(point).any() else None, "macro_ci": ci(macro_b)}


def best_thresholds(y, s):
    """Per label, the score threshold that maximises F1 on validation (predict positive when s >= t)."""
    ts = []
    for j in range(y.shape[1]):
        k = ~np.isnan(y[:, j])
        tp, fp, cut = cut_counts(y[k, j], s[k, j]) if 0 < (y[k, j] == 1).sum() < k.sum() else (None, None, None)
        ts.append(0.5 if tp is None else float(cut[np.argmax(2 * tp / (tp + fp + tp[-1]))]))   # F1 at each cut
    return np.array(ts)


def threshold_metrics(y, s, t):
    """Accuracy and F1 per label at thresholds t; macro F1 and support-weighted F1 (chexgen's fairness metric)."""
    k = ~np.isnan(y)                                             # known labels only
    yy, pp = (y == 1) & k, (s >= t) & k
    with np.errstate(invalid="ignore", divide="ignore"):         # 0 / 0: NaN (no known label / no positive at all)
        acc, f1a = ((yy == pp) & k).sum(0) / k.sum(0), 2 * (yy & pp).sum(0) / (yy.sum(0) + pp.sum(0))
    sup = yy.sum(0).astype(float)
    ok = ~np.isnan(f1a) & (sup > 0)
    return {"accuracy": acc.tolist(), "f1": f1a.tolist(), "macro_f1": float(np.nanmean(f1a)) if ok.any() else None,
            "weighted_f1": float((f1a[ok] * sup[ok]).sum() / sup[ok].sum()) if ok.any() else None}


def dice_summary(pred, target):
    """Per-image Dice of bool masks [N, H, W] (1 when both are empty, SIIM-ACR) averaged over all images, over those
    with foreground (positive Dice) and without (negative Dice), as chexgen reports for pneumothorax (Fig. 3d,
    Methods)."""
    p, g = pred.reshape(len(pred), -1).astype(bool), target.reshape(len(target), -1).astype(bool)
    inter, tot, has = (p & g).sum(1), p.sum(1) + g.sum(1), g.any(1)
    d = np.where(tot > 0, 2 * inter / np.maximum(tot, 1), 1.0)
    mean = lambda v: float(v.mean()) if len(v) else None
    return {"dice": mean(d), "positive_dice": mean(d[has]), "negative_dice": mean(d[~has]),
            "n_positive": int(has.sum()), "n_negative": int((~has).sum())}


def subgroup_metrics(rows, y, s, t, min_group):
    """Macro AUROC and weighted F1 per subgroup of sex, race, age bins and their intersections (chexgen Fig. 5c)."""
    families = {"sex": ("sex",), "race": ("race",), "age": ("age",), "sex x race": ("sex", "race"),
                "sex x age": ("sex", "age"), "race x age": ("race", "age"), "sex x race x age": ATTRIBUTES}
    out = {}
    for fam, attrs in families.items():
        keys = np.array([group_of(r, attrs) for r in rows])
        out[fam] = {g: {"n": len(idx), "auroc": auroc_table(y[idx], s[idx], n_boot=0)["macro"],
                        "f1": threshold_metrics(y[idx], s[idx], t)["weighted_f1"], "ranked": len(idx) >= min_group}
                    for g, idx in ((g, np.flatnonzero(keys == g)) for g in sorted(set(keys) - {""}))}
    return out


def worst_and_gap(groups, metric):
    """Worst subgroup and best-minus-worst gap over the ranked groups with a defined metric."""
    vals = {g: v[metric] for g, v in groups.items() if v["ranked"] and v[metric] is not None}
    if len(vals) < 2:
        return {"worst": None, "worst_value": None, "best": None, "gap": None}
    worst, best = min(vals, key=vals.get), max(vals, key=vals.get)
    return {"worst": worst, "worst_value": vals[worst], "best": best, "gap": vals[best] - vals[worst]}


def pearson(ga, gb, metric):
    """Pearson r, two-sided p (scipy) of a metric over two cohorts' shared subgroups (chexgen Fig. 5c); < 3: None."""
    common = [g for g in ga if g in gb and ga[g]["ranked"] and gb[g]["ranked"]
              and ga[g][metric] is not None and gb[g][metric] is not None]
    a, b = [ga[g][metric] for g in common], [gb[g][metric] for g in common]
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return {"r": None, "p": None, "n": len(a)}
    r = pearsonr(a, b)
    return {"r": float(r.statistic), "p": float(r.pvalue), "n": len(a)}


def cut_counts(y, s):
    """True and false positives when predicting s >= t, at every distinct score t (descending), and those t."""
    order = np.argsort(-s, kind="stable")
    yy, ss = y[order] == 1, s[order]
    last = np.r_[ss[1:] != ss[:-1], True]
    return np.cumsum(yy)[last], np.cumsum(~yy)[last], ss[last]


def roc_points(y, s):
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1)."""
    tp, fp, _ = cut_counts(y, s)
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]

# Report generation (chexgenbench §2.4, Table 6, App. A.7.2): word tokens, corpus BLEU, ROUGE-L, label F1


WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^a-z0-9\s]")    # words (right-sided, o2) and punctuation marks


def words(text):
    """A report -> lowercase word and punctuation tokens: the unit of the vocabulary, BLEU and ROUGE-L. Our choice:
    word-level, not characters: the phantom's and MIMIC's impressions use a few hundred to a few thousand words,
    so a report is ~20 tokens instead of ~100 characters (a shorter sequence to learn and decode), and BLEU /
    ROUGE-L count words anyway."""
    return WORD.findall((text or "").lower())


def detokenize(tokens):
    """Tokens -> text, punctuation attached to the word before it ("no effusion ." -> "no effusion.")."""
    return re.sub(r" ([.,;:?!)])", r"\1", " ".join(tokens))


def build_vocab(reports):
    """Training reports -> token list: the 4 special tokens, then every word by count (ties alphabetically)."""
    counts = Counter(w for r in reports for w in words(r))
    return SPECIAL + sorted(counts, key=lambda w: (-counts[w], w))


def encode_reports(reports, vocab, max_tokens):
    """Reports -> int64 [N, max_tokens + 1]: <bos> words <eos> <pad>...; words past max_tokens - 1 are cut (the
    number cut is returned)."""
    index, out, cut = {w: i for i, w in enumerate(vocab)}, np.full((len(reports), max_tokens + 1), PAD, np.int64), 0
    for i, r in enumerate(reports):
        ids = [index.get(w, UNK) for w in words(r)]
        cut += len(ids) > max_tokens - 1
        ids = [BOS] + ids[: max_tokens - 1] + [EOS]
        out[i, : len(ids)] = ids
    return out, cut


def decode_reports(ids, vocab):
    """Generated ids [N, T] -> text, up to the first <eos> (special tokens dropped)."""
    out = []
    for row in ids.tolist():
        row = row[: row.index(EOS)] if EOS in row else row
        out.append(detokenize([vocab[i] for i in row if i >= len(SPECIAL)]))
    return out


def ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(candidates, references, max_n=4):
    """Corpus BLEU-1..max_n (Papineni et al. 2002, one reference per candidate): p_n = clipped n-gram matches summed
    over the corpus / candidate n-grams summed over the corpus (§2.1.1), BP = exp(1 - r / c) when c <= r (§2.2.2,
    r and c the corpus reference and candidate lengths), BLEU-N = BP exp(mean_{n<=N} log p_n). No smoothing (our
    choice, Papineni's definition): a zero p_n gives BLEU-N = 0. -> {"bleu1": ..., "bleu4": ..., "p": [p_n]}."""
    match, total = np.zeros(max_n), np.zeros(max_n)
    c = r = 0
    for cand, ref in zip(candidates, references):
        ct, rt = words(cand), words(ref)
        c, r = c + len(ct), r + len(rt)
        for n in range(1, max_n + 1):
            cn, rn = ngrams(ct, n), ngrams(rt, n)
            match[n - 1] += sum(min(k, rn[g]) for g, k in cn.items())
            total[n - 1] += sum(cn.values())
    p = np.divide(match, total, out=np.zeros(max_n), where=total > 0)
    if c == 0:
        bp = 0.0                                                 # no candidate words: nothing to score
    elif c > r:
        bp = 1.0
    else:
        bp = math.exp(1 - r / c)                                 # the brevity penalty (Papineni et al. 2002)
    bleu = [bp * math.exp(np.log(p[:n]).mean()) if p[:n].min() > 0 else 0.0 for n in range(1, max_n + 1)]
    return {**{f"bleu{n}": bleu[n - 1] for n in range(1, max_n + 1)}, "p": p.tolist(), "bp": bp, "c": c, "r": r}


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists (dynamic programming, O(len a x len b))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidates, references, beta=1.2):
    """Mean sentence-level ROUGE-L F-measure (Lin 2004 §3.1): R = LCS / |ref|, P = LCS / |cand|,
    F = (1 + beta^2) R P / (R + beta^2 P), 0 when LCS = 0. beta = 1.2: our choice, pycocoevalcap's (the
    implementation report-generation papers score with); Lin leaves beta to the user."""
    scores = []
    for cand, ref in zip(candidates, references):
        ct, rt = words(cand), words(ref)
        lcs = lcs_length(ct, rt)
        if lcs == 0:
            scores.append(0.0)
            continue
        rec, prec = lcs / len(rt), lcs / len(ct)
        scores.append((1 + beta ** 2) * rec * prec / (rec + beta ** 2 * prec))
    return float(np.mean(scores)) if scores else 0.0


COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]   # CheXpert's 5 tasks


def label_f1(gen, ref, labels=None):
    """CheXpert label F1 of generated vs reference reports from their labels (bool [N, 14], LABELS' order, positive
    = True): per label F1 = 2 TP / (2 TP + FP + FN); micro over all (report, label) pairs, macro = the mean over
    labels of the per-label F1, a label with TP + FP + FN = 0 (never mentioned as positive) left out of the mean
    (our choice: its F1 is 0 / 0). Over the 14 labels and over the 5 competition labels (chexgenbench Table 6's
    Micro F1-5 / F1-14)."""
    gen, ref, labels = np.asarray(gen, bool), np.asarray(ref, bool), labels or LABELS
    tp, fp, fn = (gen & ref).sum(0), (gen & ~ref).sum(0), (~gen & ref).sum(0)
    per = [2 * a / d if (d := 2 * a + b + c) else None for a, b, c in zip(tp, fp, fn)]
    out = {"per_label": dict(zip(labels, per))}
    for name, keep in (("14", labels), ("5", COMPETITION)):
        j = [labels.index(lab) for lab in keep]
        d = 2 * tp[j].sum() + fp[j].sum() + fn[j].sum()
        out[f"micro_f1_{name}"] = float(2 * tp[j].sum() / d) if d else None
        vals = [per[k] for k in j if per[k] is not None]
        out[f"macro_f1_{name}"] = float(np.mean(vals)) if vals else None
    return out


def report_labels(csv_path, column, out_path):
    """CheXpert-14 positives of one text column, by prep_data.py's rule-based labeller run as a program (scripts
    import nothing from each other): `prep_data.py extract-labels` writes 1 / 0 / -1 / empty; positive = '1' only
    (our choice: uncertain '-1', e.g. "possible atelectasis", and unmentioned count as not positive, the U-Zeros
    reading) -> bool [N, 14] in the CSV's row order."""
    import subprocess
    prep = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prep_data.py")
    if not os.path.isfile(prep):
        raise SystemExit(f"{prep}: no such file; report-gen labels reports with prep_data.py extract-labels, expected "
                         f"next to downstream.py")
    done = subprocess.run([sys.executable, prep, "extract-labels", "--csv", csv_path, "--column", column,
                           "--out", out_path], capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SystemExit(f"prep_data.py extract-labels --csv {csv_path}: failed ({last})")
    with open(out_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([[(r.get(lab) or "").strip() == "1" for lab in LABELS] for r in rows], bool).reshape(-1, 14)


def report_metrics(gen, ref, gen_labels, ref_labels):
    """Every report-generation number of one test set: BLEU-1..4, ROUGE-L, label F1 (micro / macro, 5 and 14)."""
    bleu = corpus_bleu(gen, ref)
    return {**{k: bleu[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "bp")}, "rouge_l": rouge_l(gen, ref),
            **label_f1(gen_labels, ref_labels), "n": len(ref)}

# ----------------------------------------------------------------------------------------------------------------
# Data: labels and subgroups (FORMAT.md §5, chexgen Fig. 5), dataset and sampler folders, batches, augmentation


LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]
ABBR = dict(zip(LABELS, ["Atl", "Crm", "Cns", "Edm", "Ecm", "Frc", "Lls", "Lop", "Nfd", "Ple", "Plo", "Pnm",
                         "Ptx", "Sdv"]))                         # multicond Table 1's abbreviations, extended to 14
AGE_BINS = [("19-40", 41.0), ("41-65", 66.0), ("66+", math.inf)]   # chexgen Fig. 5 (ages < 19 join the first bin)
ATTRIBUTES = ("sex", "race", "age")
META = ["sex", "race", "view", "dataset", "age"]                 # + the 14 labels: the 19 variables (radit §4.2)
CATS = {"sex": ["F", "M"], "race": ["ASIAN", "BLACK", "WHITE"], "view": ["PA", "AP", "LATERAL"]}   # FORMAT.md §5


def var_value(var, s, policy, where, datasets=()):
    """A meta.csv cell -> target, '' missing (NaN, masked): a label '1' 1.0, '0' 0.0, '-1' uncertain as --uncertain
    says (CheXpert's U-Ignore NaN / U-Ones / U-Zeros); sex / race / view / dataset the class index; age in years."""
    s, cats = (s or "").strip(), [c.upper() for c in CATS.get(var, datasets)]
    if var in LABELS:
        v = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": math.nan}.get(s, "?")
        v = {"ignore": math.nan, "ones": 1.0, "zeros": 0.0}[policy] if v == -1.0 else v
    elif var == "age":                                           # one rule for ages (FORMAT.md §2 range)
        v = check_age(s, where)
    else:
        v = float(cats.index(s.upper())) if s.upper() in cats else "?" if s else math.nan
    if v == "?":
        raise SystemExit(f"{where}: {var} {s!r}; expected " + ("1, 0, -1" if var in LABELS else "years" if var == "age"
                         else f"one of {cats}" + " (--datasets names them)" * (var == "dataset")) + " or empty")
    return v


def age_years(s):
    return float(s) if re.fullmatch(r"\s*\d+(\.\d*)?\s*", str(s or "")) else math.nan      # '' / junk: NaN


def age_bin(s):
    return next(name for name, hi in AGE_BINS if a < hi) if (a := age_years(s)) == a else ""


def group_of(row, attrs):
    """The subgroup of a row under attributes like ('sex', 'race'): 'F/BLACK'; '' when any value is missing."""
    vals = [age_bin(row.get("age")) if a == "age" else (row.get(a) or "").strip() for a in attrs]
    return "/".join(vals) if all(vals) else ""


def generator(*keys, device="cpu"):
    """A torch.Generator seeded by a tuple of integers, e.g. (seed, purpose, step)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def read_png(path, size):
    """A greyscale PNG (8- or 16-bit) -> float32 [1, size, size] in [0, 1]; centre-padded to square first."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such image; expected one PNG per meta.csv row named <id>.png")
    with Image.open(path) as im:
        wide, a = im.mode.startswith("I"), np.asarray(im)          # I;16 / I: 16-bit greyscale
    a = (a[..., :3].mean(-1) if a.ndim == 3 else a).astype(np.float32) / (65535.0 if wide else 255.0)
    (h, w), s = a.shape, max(a.shape)                            # aspect-preserving pad to square, as FORMAT.md §3
    a = np.pad(a, (((s - h) // 2, s - h - (s - h) // 2), ((s - w) // 2, s - w - (s - w) // 2)))
    return fit(torch.from_numpy(np.ascontiguousarray(a))[None, None], size)[0]


def fit(x, size, mode="bilinear"):
    """[n, C, s, s] -> [n, C, size, size] (antialiased when shrinking; masks: nearest); size 0 keeps s."""
    kw = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    return x if not size or x.shape[-1] == size else F.interpolate(x, size=(size, size), mode=mode, **kw)


COLUMN_CODES = LABELS + META + ["split", "shard", "index"]      # meta.csv columns a Source keeps, as codes


def factorised(ids, values):
    """A column kept as (int32 code a row, its distinct cells in code order)."""
    return np.asarray(ids, np.int32), list(values)


def read_columns(path, required, what):
    """meta.csv in one pass, without a dict per row (issue 21): -> {"columns": the header, "position": each row's
    position (blank lines skipped), "vars": {column: factorised codes} for the COLUMN_CODES present}, every cell
    kept as written (the tasks' rules, var_value's, read them later). read_meta's one-line errors: no file, not a
    table, a `required` column missing, a row with more or fewer cells than the header, an id that is not a file
    name or appears twice (every row, whatever its split)."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected {what}")
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            columns = next(reader, [])
            absent = [c for c in dict.fromkeys(["id", *required]) if c not in columns]
            if absent:
                raise SystemExit(f"{path}: no column(s) {', '.join(absent)}; expected FORMAT.md §2 columns")
            kept = [c for c in COLUMN_CODES if c in columns]
            at = [columns.index(c) for c in kept]
            memos = [{} for _ in kept]                           # cell -> code, in order of appearance
            codes = [array("i") for _ in kept]
            i_id, ids = columns.index("id"), []
            for r in meta_csv_rows(path, reader, columns):
                ids.append(r[i_id])
                for memo, out, j in zip(memos, codes, at):
                    code = memo.get(r[j])
                    if code is None:
                        code = memo[r[j]] = len(memo)
                    out.append(code)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f"{path}: not a readable CSV table ({e}); expected {what}") from None
    check_ids(ids, path)
    return {"columns": columns, "position": np.arange(len(ids)),
            "vars": {c: factorised(np.frombuffer(out, np.int32), memo) for c, memo, out in zip(kept, memos, codes)}}


def index_columns(folder, datasets):
    """read_columns' dict from DIR/meta_index.safetensors when it holds meta.csv as it is (read_meta_index; None
    otherwise): the codes of FORMAT.md §5 as the cells they stand for (a code's canonical value; an age as the
    shortest text of its float32, which reads back as meta.csv's float64 for ages of up to 7 significant digits,
    e.g. '63.7'), shard and index as their decimal text."""
    cols = read_meta_index(folder, datasets) if datasets else None
    if cols is None:
        return None
    out = {"columns": cols["columns"], "position": np.arange(len(cols["age"])), "vars": {}}
    for k, v in enumerate(INDEX_VARIABLES[:18]):
        out["vars"][v] = factorised(cols["codes"][:, k], ["", *(datasets if v == "dataset" else INDEX_VALUES[v])])
    ages, inverse = np.unique(cols["age"], return_inverse=True)   # NaN (missing) sorts last, as one value
    out["vars"]["age"] = factorised(inverse.reshape(-1), ["" if a != a else str(a) for a in ages])
    out["vars"]["split"] = factorised(cols["split"], cols["splits"])
    for k in ("shard", "index"):
        values, inverse = np.unique(cols[k], return_inverse=True)
        out["vars"][k] = factorised(inverse.reshape(-1), [str(x) for x in values.tolist()])
    return out


def info_datasets(folder):
    """info.json's dataset names, for the index's freshness check only ([] when there is none: meta.csv is read;
    a broken info.json is reported later, where the folder's info.json is read)."""
    try:
        with open(os.path.join(folder, "info.json")) as f:
            names = json.load(f).get("datasets")
    except (OSError, ValueError, AttributeError):
        return []
    return list(names) if isinstance(names, list) else []


class Source:
    """One `name=folder[:split]` source: its meta.csv as columns, pixels (and masks) in memory or read per batch.
    The columns (issue 21: a million rows take ~100 MB, never a dict per row) come from DIR/meta_index.safetensors
    when it is fresh (index_columns), else from meta.csv (read_columns); the 19 variables, split, shard and index
    are a code a row and the distinct cells, which targets() reads with var_value's rules. `rows`, every column as
    dicts, is read on first use by the tasks that need ids, reports or subgroups (mostly of a test set)."""

    def __init__(self, spec, cfg, default_split=""):
        name, _, rest = spec.strip().partition("=") if "=" in spec else ("", "", spec.strip())
        folder, _, split = rest.rpartition(":")                  # a split only when it is one of the four
        explicit = bool(folder and split in ("train", "val", "test", "all"))
        if not explicit:
            folder, split = rest, default_split
        self.folder, self.split = folder.rstrip("/"), "" if split == "all" else split
        self.name = name.strip() or os.path.basename(self.folder) or self.folder
        self.synthetic = self.name.lower().startswith("syn")
        self.kind = "dataset" if os.path.isdir(f"{self.folder}/shards") else "png"
        # Our rule for a split: a dataset folder must have the `split` column whenever a split is used, and so must
        # a PNG folder when `:split` is written; a sampler's PNG folder without the column, under a default split
        # (e.g. --val FOLDER), is used whole, as the samplers write no split.
        strict = self.split and (explicit or self.kind == "dataset")
        what = ("a dataset folder (prep_data.py) or a folder of generated images with a meta.csv (id, labels, sex, "
                "age, race, view)")
        meta = os.path.join(self.folder, "meta.csv")
        required = ["shard", "index"] if self.kind == "dataset" else []
        required += ["split"] if strict else []
        cols = index_columns(self.folder, info_datasets(self.folder)) if self.kind == "dataset" else None
        if cols is not None:
            absent = [c for c in dict.fromkeys(["id", *required]) if c not in cols["columns"]]
            if absent:
                raise SystemExit(f"{meta}: no column(s) {', '.join(absent)}; expected FORMAT.md §2 columns")
            self.source = "index"
        else:
            cols = read_columns(meta, required, what)
            self.source = "meta.csv"
        self.meta_path = meta
        self.columns = set(cols["columns"])                      # the header, for the tasks' column checks
        self.vars = cols["vars"]                                 # column -> (a code a row, the distinct cells)
        self.position = cols["position"]                         # each row's position in meta.csv
        self._rows = None                                        # the dicts, read on first use (rows)
        if strict:
            self.keep(self.cells_in("split", [self.split]))
        if not len(self):
            raise SystemExit(f"{meta}: no rows{f' with split={self.split!r}' if strict else ''}; expected one row "
                             f"per image")
        if self.split and not strict and "split" in self.columns:
            self.keep(self.cells_in("split", [self.split]))
        views = [v.strip().upper() for v in cfg.views.split(",") if v.strip()]
        if views:
            self.keep(self.cells_in("view", views, str.upper))
        self.masks = None                                        # uint8 [n, 1, S, S] once load_masks ran
        self.info = {}                                           # a dataset's info.json
        self.size = 0                                            # the images' side
        self.shard = None                                        # a dataset's shard and index per row (int64)
        self.index = None
        if self.kind == "dataset":
            if not os.path.isfile(path := os.path.join(self.folder, "info.json")):
                raise SystemExit(f"{path}: no such file; expected the dataset's info.json (prep_data.py)")
            try:
                with open(path) as f:
                    self.info = json.load(f)
                self.size = int(self.info["size"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}: not a dataset's info.json with a size ({type(e).__name__}: {e})") from None
            shard, bad_shard = self.as_integers("shard")
            index, bad_index = self.as_integers("index")
            bad = np.flatnonzero(bad_shard | bad_index)
            if len(bad):                                         # check_shard_rows' words, at the first such row
                k = int(bad[0])
                cells = [self.vars[c][1][self.vars[c][0][k]] for c in ("shard", "index")]
                raise SystemExit(f"{meta}: row {meta_ids(meta, [self.position[k]])[0]!r} has shard {cells[0]!r}, "
                                 f"index {cells[1]!r}; expected integers (FORMAT.md §2)")
            self.shard, self.index = shard, index
            check_shard_arrays(self.folder, self.shard_columns(), "images", "U16", (1, self.size, self.size))
        elif len(self):                                          # the samplers' folders: the first image's side
            self.size = read_png(os.path.join(self.folder, f"{self.rows[0]['id']}.png"), 0).shape[-1]
        self.cache_gb, self._pix = cfg.cache_gb, None
        self._open = lru_cache(maxsize=16)(lambda p: safe_open(p, "pt"))

    def cells_in(self, column, wanted, fold=str):
        """Rows whose `column` cell, fold()ed, is among `wanted` (bool [n]; an absent column reads as '')."""
        if column not in self.vars:
            return np.full(len(self), "" in wanted)
        codes, values = self.vars[column]
        return np.array([fold(v) in wanted for v in values] + [False], bool)[codes]

    def keep(self, mask):
        """Keep the rows where `mask` holds (every column, in order)."""
        self.position = self.position[mask]
        self.vars = {c: (codes[mask], values) for c, (codes, values) in self.vars.items()}

    def as_integers(self, column):
        """The shard or index column as int64 [n], and where a cell is not an integer (bool [n])."""
        codes, values = self.vars[column]
        ints, bad = np.zeros(len(values) + 1, np.int64), np.zeros(len(values) + 1, bool)
        for k, v in enumerate(values):
            try:
                ints[k] = int(v)
            except (ValueError, OverflowError):
                bad[k] = True
        return ints[codes], bad[codes]

    def shard_columns(self):
        return {"shard": self.shard, "index": self.index, "position": self.position}

    @property
    def rows(self):
        """This source's meta.csv rows as dicts of strings (every column), in its order; read on first use."""
        if self._rows is None:
            rows, _ = read_meta(self.meta_path)
            self._rows = [rows[int(p)] for p in self.position]
        return self._rows

    def __len__(self):
        return len(self.position)

    def subset(self, idx):
        new, t = copy.copy(self), torch.as_tensor(np.asarray(idx, np.int64))
        new.keep(np.asarray(idx, np.int64))
        if self.shard is not None:
            new.shard, new.index = self.shard[t.numpy()], self.index[t.numpy()]
        new._rows = None if self._rows is None else [self._rows[int(i)] for i in idx]
        new._pix, new.masks = (v if v is None else v[t] for v in (self._pix, self.masks))
        return new

    def _shard(self, shard):                                     # (shard files checked to exist in __init__)
        return self._open(os.path.join(self.folder, "shards", f"{int(shard):05d}.safetensors"))

    def _read(self, key, idx, channel=None):
        """Rows idx of a shard tensor (`images` or one channel of `masks`), grouped by shard."""
        sl = [(self._shard(self.shard[int(j)]).get_slice(key), int(self.index[int(j)])) for j in idx]
        return torch.cat([s[k:k + 1] if channel is None else s[k:k + 1, channel:channel + 1] for s, k in sl])

    def preload(self, size):
        """Hold all pixels in memory (uint16 for datasets, float for PNGs) when they fit in --cache-gb."""
        n, png = len(self), self.kind == "png"
        if self._pix is not None or not n or n * self.size ** 2 * (4 if png else 2) > self.cache_gb * 2**30:
            return
        pix = self.images(range(n)) if png else torch.zeros((n, 1, self.size, self.size), dtype=torch.int32)
        for shard in [] if png else np.unique(self.shard).tolist():     # datasets: one read per shard
            i = np.flatnonzero(self.shard == shard)
            pix[torch.as_tensor(i)] = self._shard(shard).get_tensor("images")[torch.as_tensor(self.index[i])] \
                .to(torch.int32)
        self._pix = pix

    def images(self, idx):
        """Rows idx -> float32 [n, 1, S, S] in [0, 1] at the source's own size."""
        if self._pix is not None:
            x = self._pix[torch.as_tensor(np.asarray(idx, np.int64))]
        elif self.kind == "png":
            paths = [os.path.join(self.folder, f"{self.rows[int(i)]['id']}.png") for i in idx]
            x = torch.stack([read_png(path, self.size) for path in paths])
        else:
            x = self._read("images", idx).to(torch.int32)
        return x.float() / 65535.0 if x.dtype == torch.int32 else x

    def load_masks(self, mask_name):
        """All rows' masks for one name -> uint8 [n, 1, S, S] (held in memory: one bit of information a pixel)."""
        if self.kind == "dataset":
            names = self.info.get("mask_names") or []
            if mask_name not in names:
                raise SystemExit(f"{self.folder}/info.json: no mask {mask_name!r}; mask_names are {names}")
            check_shard_arrays(self.folder, self.shard_columns(), "masks", "U8", (len(names), self.size, self.size))
            self.masks = self._read("masks", range(len(self)), names.index(mask_name)).to(torch.uint8)
        else:
            self.masks = torch.stack([(read_png(os.path.join(self.folder, f"{r['id']}_mask.png"), self.size) > 0)
                                      .to(torch.uint8) for r in self.rows])

    def targets(self, labels, policy, datasets=()):
        """[n, L] float targets with NaN for unknown (var_value of each distinct cell, once); a clear error when the
        folder lacks a requested label, and var_value's for the first row (then its first label) holding a bad
        cell, as a row-by-row reading stops."""
        if absent := [lab for lab in labels if lab not in self.columns]:
            raise SystemExit(f"{self.folder}/meta.csv: no column(s) {absent}; the requested labels must be in "
                             f"every training and test set (choose others with --labels)")
        where = f"{self.folder}/meta.csv row"
        out = np.zeros((len(self), len(labels)), np.float64)
        bad = np.zeros((len(self), len(labels)), bool)
        for j, v in enumerate(labels):
            codes, values = self.vars[v]
            table = np.zeros(len(values) + 1, np.float64)
            wrong = np.zeros(len(values) + 1, bool)
            for k, cell in enumerate(values):
                try:
                    table[k] = var_value(v, cell, policy, where, datasets)
                except SystemExit:
                    wrong[k] = True
            out[:, j] = table[codes]
            bad[:, j] = wrong[codes]
        if bad.any():
            k = int(np.flatnonzero(bad.any(1))[0])
            v = labels[int(np.flatnonzero(bad[k])[0])]
            row = meta_ids(self.meta_path, [self.position[k]])[0]
            var_value(v, self.vars[v][1][self.vars[v][0][k]], policy, f"{where} {row} {v}", datasets)   # raises
        return out


def parse_sources(text, cfg, default_split="", what="--train"):
    srcs = [Source(s, cfg, default_split) for s in text.split(",") if s.strip()]
    if not srcs:
        raise SystemExit(f"{what} {text!r}: expected name=folder[:split] entries")
    for s in (s for s in srcs if not len(s)):
        raise SystemExit(f"{s.name}: no rows (check the split and --views)")
    return srcs


class Pool:
    """Sources resized to one side, with targets: what training and evaluation draw from."""

    def __init__(self, sources, cfg, labels, size, masks=False):
        self.sources, self.size, names = sources, size, cfg.datasets.split(",")
        self.y = np.concatenate([s.targets(labels, cfg.uncertain, names) for s in sources]) if labels else None
        for s in sources:                                        # labels checked first: bad input fails fast
            s.preload(size)
            if masks and s.masks is None:
                s.load_masks(cfg.mask)
        self.offsets = np.cumsum([0] + [len(s) for s in sources])

    @cached_property
    def rows(self):
        """Every source's rows as dicts, in pool order: read on first use (predictions, subgroups, reports)."""
        return [r for s in self.sources for r in s.rows]

    def __len__(self):
        return int(self.offsets[-1])

    def mask_array(self):
        """Every row's mask at the pool's side, bool [N, S, S] (the ground truth of the Dice scores)."""
        return np.concatenate([fit(s.masks.float(), self.size, "nearest")[:, 0].numpy() > 0 for s in self.sources])

    def fetch(self, idx, masks=False):
        """Global rows idx -> images [n, 1, S, S] in [0, 1] (and masks), every source resized to `size`."""
        idx = np.asarray(idx, np.int64)
        src = np.searchsorted(self.offsets, idx, side="right") - 1    # the source of every row
        x, m = (torch.zeros(len(idx), 1, self.size, self.size) for _ in range(2))
        for k in np.unique(src):
            sel, local = torch.as_tensor(np.flatnonzero(src == k)), torch.as_tensor(idx[src == k] - self.offsets[k])
            x[sel] = fit(self.sources[k].images(local.numpy()), self.size)
            if masks:
                m[sel] = fit(self.sources[k].masks[local].float(), self.size, "nearest")
        return (x, m) if masks else x


@lru_cache(maxsize=16)
def permutation(n, seed, epoch):
    return torch.randperm(n, generator=generator(seed, 1, epoch))


def stream_rows(step, n, count, seed, weights=None):
    """`count` rows of step `step`: seeded permutations epoch after epoch (resume-exact), or weighted draws."""
    if weights is not None:
        return torch.multinomial(weights, count, replacement=True, generator=generator(seed, 4, step))
    pos = torch.arange(step * count, (step + 1) * count)
    return torch.stack([permutation(n, seed, int(e))[o] for e, o in zip(pos // n, pos % n)])


class TrainStream:
    """Global batches over a Pool: one stream over all rows, or one per source with --mix shares per batch."""

    def __init__(self, pool, cfg, seed):
        self.pool, self.seed, self.B = pool, seed, cfg.batch_size
        sizes = [len(s) for s in pool.sources]
        if cfg.mix and len(sizes) > 1:                           # single-source experiments ignore --mix
            w = [float(v) for v in cfg.mix.split(":")] if re.fullmatch(r"\d*\.?\d+(:\d*\.?\d+)*", cfg.mix) else []
            if len(w) != len(sizes) or min(w) < 0 or sum(w) <= 0:
                raise SystemExit(f"--mix {cfg.mix!r}: expected {len(sizes)} non-negative shares like 1:1 for sources "
                                 f"{[s.name for s in pool.sources]}")
            raw = np.array(w) / sum(w) * self.B                  # largest remainder: counts sum to the batch
            counts = np.floor(raw).astype(int)
            counts[np.argsort(-(raw - counts))[: self.B - counts.sum()]] += 1
            self.parts = [(int(pool.offsets[k]), sizes[k], int(c)) for k, c in enumerate(counts) if c > 0]
        else:
            self.parts = [(0, len(pool), self.B)]
        self.weights = None
        if cfg.weighted_sampling and pool.y is not None:         # chexgen Methods: every class equally represented
            pos = np.nan_to_num(pool.y) == 1
            n_pos, none = pos.sum(0), ~pos.any(1)
            w = np.where(none, 1.0 / max(none.sum(), 1), 0.0)
            w = np.maximum(w, np.max(np.where(pos, 1.0 / np.maximum(n_pos, 1), 0.0), 1))
            self.weights = torch.as_tensor(w, dtype=torch.float64)

    def rows(self, step):
        """The global batch of a step, shuffled so that every rank's slice mixes the sources."""
        out = []
        for k, (off, n, c) in enumerate(self.parts):
            weights = None if self.weights is None else self.weights[off:off + n]
            out.append(stream_rows(step, n, c, self.seed * 1000 + k, weights) + off)
        return torch.cat(out)[torch.randperm(self.B, generator=generator(self.seed, 5, step))]


def augment(x, g, cfg, m=None):
    """Rotation (masks too), optional flip, brightness / contrast / gamma jitter; draws from g = f(seed, step)."""
    B, a = x.shape[0], cfg.intensity
    ang = (torch.rand(B, generator=g) * 2 - 1) * math.radians(cfg.rotate)
    flip = torch.where(torch.rand(B, generator=g) < cfg.flip, -1.0, 1.0)
    bright, contrast, gamma = [(torch.rand(B, generator=g) * 2 - 1) * a for _ in range(3)]
    if cfg.rotate or cfg.flip:
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros(B)], 1),
                             torch.stack([sin * flip, cos, torch.zeros(B)], 1)], 1)
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if m is not None:
            m = F.grid_sample(m, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if a:
        v = lambda t: t.view(B, 1, 1, 1).to(x.device)
        x = x.clamp(0, 1) ** torch.exp(v(gamma))
        x = ((x - 0.5) * (1 + v(contrast)) + 0.5 + v(bright)).clamp(0, 1)
    return x, m


def normalize(x):
    """[0, 1] grey -> ImageNet statistics averaged over RGB (matching the summed first convolution)."""
    return (x - 0.449) / 0.226


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

# --- skeleton: output_folder (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def check_counts(cfg, positive=(), non_negative=()):
    """Integer options that count things: one line naming the flag when one is below 1 (`positive`) or below 0
    (`non_negative`, where 0 means 'off' or 'all')."""
    for names, low, what in ((positive, 1, "a positive integer"), (non_negative, 0, "an integer >= 0")):
        for name in names:
            value = getattr(cfg, name)
            if value < low:
                raise SystemExit(f"--{name.replace('_', '-')} {value}: expected {what}")


def file_sha256(path):
    """sha256 of a file's bytes (read in 16 MB pieces), as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 24), b""):
            h.update(piece)
    return h.hexdigest()


def claim_output(out, record, mine=(), write=True):
    """Make `out` this command's output folder, or refuse with one line. A new or empty folder is claimed by writing
    out/output.json: `record`, what decides the outputs (command, checkpoint sha256, seed, condition, solver...). A
    folder whose output.json holds the same record is resumed; a different record names the first difference (the
    command first: another command's folder is named as such). A folder holding anything else (a dataset, another
    command's outputs) is refused and left as it is; `mine`: file names that mark a folder this command wrote
    before output.json existed (e.g. its checkpoint), claimed too.
    Under torchrun rank 0 passes write=True and the others False: they check, and see either no output.json or a
    whole one (atomic_save), never a half-written one; temporaries (.tmp-*) do not count as files. A sampler then
    holds every rank at a barrier before any of them writes into `out`, or rank 0 could find another rank's images
    in a folder it has not yet claimed."""
    record = json.loads(json.dumps(record))                      # compare in JSON terms (tuples read back as lists)
    path = os.path.join(out, "output.json")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out}: a file; expected a folder (new, empty, or written by this command)")
    entries = [e for e in os.listdir(out) if not e.startswith(".tmp-")] if os.path.isdir(out) else []
    if "output.json" in entries:                                 # (rank 0 writes it before anything else)
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: not readable JSON ({e}); expected the record this command wrote") from None
        if not isinstance(old, dict):
            raise SystemExit(f"{path}: holds a JSON {type(old).__name__}; expected the record this command wrote")
        for key in ["command"] + sorted(set(old) | set(record) - {"command"}, key=str):
            if old.get(key) != record.get(key):
                raise SystemExit(f"--out {out}: written with {key} = {old.get(key)!r}, this run has "
                                 f"{record.get(key)!r}; use a new --out (or the same settings to resume)")
    elif entries and not any(name in entries for name in mine):
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise SystemExit(f"--out {out}: holds files this command did not write ({shown}); expected a new or empty "
                         f"folder, or one with this command's output.json")
    if write:                                                    # ours: a killed write's leftovers go
        clean_temporaries(out)
        if "output.json" not in entries:
            atomic_save(path, lambda tmp: write_json_file(tmp, record))


def write_json_file(path, obj):
    """obj as indented JSON in a file (a plain write: atomic_save gives the temporary path)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def clean_temporaries(folder):
    """Remove the temporary files that a killed atomic_save left in a run folder (.tmp-*; each can be a whole
    checkpoint). Called by rank 0 at the start of a run, before anything is written there."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".tmp-") and os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
# --- end skeleton: output_folder ---


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


# --- skeleton: meta_index (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
INDEX_FILE = "meta_index.safetensors"                            # FORMAT.md §2.1, beside meta.csv
INDEX_FORMAT = "meta-index/1"
INDEX_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                "Pneumothorax", "Support Devices"]
INDEX_VARIABLES = INDEX_LABELS + ["sex", "race", "view", "dataset", "age"]  # FORMAT.md §5 order; age last
INDEX_VALUES = {**{lab: ["0", "1", "-1"] for lab in INDEX_LABELS},           # csv value -> code: position + 1
                "sex": ["F", "M"], "race": ["ASIAN", "BLACK", "WHITE"], "view": ["PA", "AP", "LATERAL"]}
INDEX_NEEDS = ["id", *INDEX_VARIABLES, "shard", "index"]         # the columns a data path reads (split: to select)


def meta_sha256(path):
    """sha256 of meta.csv's bytes: the index's freshness key (about 1 s for a million rows)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 24), b""):
            h.update(piece)
    return h.hexdigest()


def absent_columns(path, columns, split, codes=True):
    """One line naming every column a data path needs (INDEX_NEEDS, without the 19 variables when `codes` is False,
    and `split` when one is selected) that is not among `columns`, in read_meta's words."""
    needed = [c for c in INDEX_NEEDS if codes or c in ("id", "shard", "index")]
    needed += ["split"] if split not in (None, "all") else []
    absent = [c for c in needed if c not in columns]
    if absent:
        raise SystemExit(f"{path}: no column(s) {', '.join(absent)}; expected FORMAT.md §2 columns")


def meta_csv_rows(path, reader, columns):
    """The data rows of meta.csv's csv.reader after its header `columns`, as lists of cells: blank lines skipped
    (csv.DictReader skips them too), a row with more or fewer cells than the header stopped in one line."""
    for line, r in enumerate(reader, 2):
        if not r:
            continue
        if len(r) != len(columns):
            raise SystemExit(f"{path}: row {line} has {'more' if len(r) > len(columns) else 'fewer'} cells "
                             f"than the header's {len(columns)}; expected one cell per column")
        yield r


def meta_arrays(path, datasets, split=None, what="a dataset folder (meta.csv, shards/, info.json)", codes=True):
    """meta.csv parsed once into the columns training needs, as numpy arrays (never a dict per row):
    {"codes": uint8 [N, 18] (the 18 categorical codes of FORMAT.md §5, dataset codes in the order of `datasets`),
    "age": float32 [N] (NaN missing), "shard", "index": int32 [N], "split": uint8 [N] (code k = splits[k]),
    "splits": [names], "columns": meta.csv's header}. Every row is coded, whatever its split. One-line errors,
    read_meta's and encode_row's: no file, not a table, a column missing (`split` when one is to be selected), a
    row with more or fewer cells, an id that is not a file name or appears twice, a value outside §5 (naming the
    row's id), a shard or index that is not an integer. codes=False (a script that reads pixels only, vae.py):
    the 19 variables are neither required nor read ("codes" [N, 0], "age" NaN)."""
    from array import array
    coded = codes
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected {what}")
    maps = [{} for _ in INDEX_VARIABLES[:18]]                    # raw cell -> code, filled as values appear
    choices = [datasets if v == "dataset" else INDEX_VALUES[v] for v in INDEX_VARIABLES[:18]]
    codes = bytearray()                                          # 18 uint8 codes a row, appended as read
    split_codes, splits = bytearray(), {}                        # a code a row; split name -> code
    age = array("f")
    shard, index = array("i"), array("i")
    ids = []
    first_error = None                                           # raised after the ids are checked, as read_meta
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            columns = next(reader, [])
            absent_columns(path, columns, split, coded)
            at = [columns.index(c) for c in INDEX_VARIABLES[:18]] if coded else []
            i_id, i_shard, i_index = (columns.index(c) for c in ("id", "shard", "index"))
            i_age = columns.index("age") if coded else None
            i_split = columns.index("split") if "split" in columns else None
            for r in meta_csv_rows(path, reader, columns):
                ids.append(r[i_id])
                row = []
                for k, (m, j) in enumerate(zip(maps, at)):
                    c = m.get(r[j])
                    if c is None:
                        s = r[j].strip()
                        if k < 14:                               # labels written as floats by some tools
                            s = {"1.0": "1", "0.0": "0", "-1.0": "-1"}.get(s, s)
                        if s and s not in choices[k]:
                            first_error = first_error or (f"{path} row id={r[i_id]}: {INDEX_VARIABLES[k]}={s!r}; "
                                                          f"expected one of {choices[k]} or empty")
                            c = 0
                        else:
                            c = m[r[j]] = choices[k].index(s) + 1 if s else 0
                    row.append(c)
                codes.extend(row)
                a = r[i_age].strip() if coded else ""
                if a.lower() in ("", "nan"):
                    years = float("nan")
                else:
                    try:
                        years = float(a)
                    except ValueError:
                        years = None
                    if years is None or not AGE_RANGE[0] <= years <= AGE_RANGE[1]:
                        try:                                     # check_age's words for the error
                            check_age(a, f"{path} row id={r[i_id]}")
                        except SystemExit as e:
                            first_error, years = first_error or str(e), float("nan")
                age.append(years)
                try:
                    shard.append(int(r[i_shard]))
                    index.append(int(r[i_index]))
                except (ValueError, OverflowError):
                    first_error = first_error or (f"{path}: row {r[i_id]!r} has shard {r[i_shard]!r}, index "
                                                  f"{r[i_index]!r}; expected integers (FORMAT.md §2)")
                    del shard[len(index):]
                    shard.append(-1)
                    index.append(-1)
                name = r[i_split] if i_split is not None else ""
                if name not in splits:
                    if len(splits) == 255:
                        raise SystemExit(f"{path}: over 255 different split values; expected train, val, test")
                    splits[name] = len(splits)
                split_codes.append(splits[name])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f"{path}: not a readable CSV table ({e}); expected {what}") from None
    check_ids(ids, path)
    del ids
    if first_error:
        raise SystemExit(first_error)
    n = len(age)
    return {"codes": np.frombuffer(codes, np.uint8).reshape(n, 18 if coded else 0).copy(),
            "age": np.frombuffer(age, np.float32).copy(),
            "shard": np.frombuffer(shard, np.int32).copy(), "index": np.frombuffer(index, np.int32).copy(),
            "split": np.frombuffer(split_codes, np.uint8).copy(), "splits": list(splits), "columns": columns}


def read_meta_index(folder, datasets):
    """DIR/meta_index.safetensors (prep_data.py writes it beside meta.csv; FORMAT.md §2.1) as meta_arrays' dict,
    or None when there is none or it does not hold meta.csv as it is now: another meta.csv sha256 (edited since),
    other info.json datasets, or a file that is not a whole index. Our choice: such an index is ignored with a
    note, not refused: it is a cache of meta.csv, which stays the truth and gives the same arrays (slower)."""
    path, meta_path = os.path.join(folder, INDEX_FILE), os.path.join(folder, "meta.csv")
    if not os.path.isfile(path) or not os.path.isfile(meta_path):
        return None
    why = None
    try:
        with safe_open(path, "numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != INDEX_FORMAT:
                why = f"format {meta.get('format')!r}, expected {INDEX_FORMAT!r}"
            elif meta.get("meta_sha256") != meta_sha256(meta_path):
                why = "written for another meta.csv (edited since)"
            elif json.loads(meta["datasets"]) != list(datasets):
                why = f"dataset codes of {json.loads(meta['datasets'])}, info.json has {list(datasets)}"
            else:
                out = {k: f.get_tensor(k) for k in ("codes", "age", "shard", "index", "split")}
                out.update(splits=json.loads(meta["splits"]), columns=json.loads(meta["columns"]))
                n = len(out["age"])
                kinds = {"codes": (np.uint8, (n, 18)), "age": (np.float32, (n,)), "shard": (np.int32, (n,)),
                         "index": (np.int32, (n,)), "split": (np.uint8, (n,))}
                top = np.array([len(v) for v in INDEX_VALUES.values()][:17] + [len(datasets)])
                if any(out[k].dtype != d or out[k].shape != s for k, (d, s) in kinds.items()):
                    why = "tensors of other dtypes or shapes than FORMAT.md §2.1's"
                elif n and ((out["codes"] > top).any() or int(out["split"].max()) >= len(out["splits"])):
                    why = "codes outside FORMAT.md §5"
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        why = f"not a readable index ({type(e).__name__}: {e})"
    if why:
        print(f"{path}: {why}; ignored, reading meta.csv instead (rebuild: python prep_data.py index --data "
              f"{folder})", file=sys.stderr, flush=True)
        return None
    return out


def meta_columns(folder, datasets, split=None, what="a dataset folder (meta.csv, shards/, info.json)", codes=True):
    """The rows of `split` (None or 'all': every row) of DIR/meta.csv as arrays: from the index when it holds
    meta.csv as it is (read_meta_index), else parsed from meta.csv (meta_arrays; `codes`: whether the 19 variables
    are required and coded); the same arrays either way, plus "position": each row's position in meta.csv (int64),
    and "source": 'index' or 'meta.csv'. One-line errors as read_meta's (a column missing, split or not; no file)."""
    path = os.path.join(folder, "meta.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected {what}")
    cols = read_meta_index(folder, datasets)
    if cols is not None:
        absent_columns(path, cols["columns"], split, codes)
        cols["source"] = "index"
    else:
        cols = meta_arrays(path, datasets, split, what, codes)
        cols["source"] = "meta.csv"
    keep = np.arange(len(cols["age"]))
    if split not in (None, "all"):
        code = cols["splits"].index(split) if split in cols["splits"] else -1
        keep = np.flatnonzero(cols["split"] == code)
        for k in ("codes", "age", "shard", "index", "split"):
            cols[k] = cols[k][keep]
    cols["position"] = keep
    return cols


def meta_ids(path, positions):
    """The ids of meta.csv rows at `positions` (0-based, blank lines skipped), read on demand: only an error message
    or a sampled row needs one, so no process holds a million id strings."""
    want, out = {int(p): None for p in positions}, {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        at = next(reader).index("id")
        k = 0
        for r in reader:
            if r:
                if k in want:
                    out[k] = r[at]
                k += 1
    return [out.get(int(p)) for p in positions]


def check_shard_arrays(folder, cols, key, dtype, shape=None, where=None):
    """check_shards for meta_columns' arrays, at start: every shard the rows name is readable and stores `key` as
    `dtype` with rows of `shape` (shard_tensor_shape), and holds each row's index; one line naming the first bad row
    (its id read from `where`, check_shard_rows' words). `where`: the meta.csv of the rows (default
    folder/meta.csv; a latent folder's rows are its dataset's). -> {shard: rows}."""
    where = where or os.path.join(folder, "meta.csv")
    shard, index = cols["shard"], cols["index"]
    found, first = np.unique(shard, return_index=True)
    sizes = {}
    for s in found[np.argsort(first)].tolist():                  # in the order rows name them, as check_shards
        path = os.path.join(folder, "shards", f"{s:05d}.safetensors")
        if s < 0 or not os.path.isfile(path):
            continue
        got = shard_tensor_shape(path, key, dtype)
        if shape is not None and tuple(got[1:]) != tuple(shape):
            raise SystemExit(f"{path}: {key!r} rows have shape {got[1:]}; expected {list(shape)} (info.json)")
        sizes[s] = got[0]
    table = np.full(len(found), -1, np.int64)                    # rows held per shard, -1 for an absent one
    for j, s in enumerate(found.tolist()):
        table[j] = sizes.get(s, -1)
    held = table[np.searchsorted(found, shard)] if len(shard) else table[:0]
    bad = np.flatnonzero((held < 0) | (index < 0) | (index >= held))
    if len(bad):
        k = int(bad[0])
        s, i = int(shard[k]), int(index[k])
        name = meta_ids(where, [cols["position"][k]])[0]
        if held[k] < 0:
            raise SystemExit(f"{where}: row {name!r} names shard {s}, which does not exist")
        raise SystemExit(f"{where}: row {name!r} has index {i}; shard {s} holds rows 0..{held[k] - 1}")
    return sizes
# --- end skeleton: meta_index ---


# --- skeleton: memory_plan (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
# GPU memory per rank, planned before launch (--dry-run): the model is built on the meta device and one training
# micro-batch runs forward and backward there, with CUDA's bf16 autocast emulated (meta tensors get no autocast),
# while every storage the step creates is counted, alive or freed. Nothing is allocated and no arithmetic is done,
# so XL plans in seconds on a laptop. The idea is kernels/model_calls.py's; it is re-written here because the
# scripts import nothing but kernels/ and metrics.py.
_PLAN_LOWER = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "matmul",
               "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "einsum")   # CUDA autocast -> bf16
_PLAN_FP32 = ("layer_norm", "group_norm", "softmax", "log_softmax", "mse_loss", "l1_loss", "cross_entropy",
              "binary_cross_entropy_with_logits", "exp", "log", "pow", "__pow__", "rsqrt", "sum", "norm",
              "cumsum", "normalize", "cosine_similarity")                               # CUDA autocast -> fp32
PLAN_CONTEXT_GB = 1.0      # our choice: CUDA context + cuBLAS / cuDNN workspaces, ~0.5-1 GB per process on H100
PLAN_GPU_GB = 80.0         # the A100 / H100 80 GB the papers train on (radit Table 11)


def _plan_funcs(names):
    import torch.nn.functional as F
    return frozenset(getattr(owner, n) for owner in (torch, torch.Tensor, F) for n in names if hasattr(owner, n))


class _PlanAutocast:
    """Stands in for torch.autocast during the walk: any device type means the (emulated) GPU."""
    state = [(False, torch.bfloat16)]

    def __init__(self, device_type="cuda", dtype=None, enabled=True, cache_enabled=None):
        self.enabled, self.dtype = bool(enabled), dtype

    def __enter__(self):
        self.state.append((self.enabled, self.dtype or self.state[-1][1]))
        return self

    def __exit__(self, *exc):
        self.state.pop()
        return False


class _PlanFlash(torch.autograd.Function):
    """Attention as the GPU runs it (FlashAttention-2 in kernels/, SDPA's flash / efficient backends): saves q, k,
    v, the output and one fp32 log-sum-exp per query row, never the [Lq, Lk] probabilities that the reference math
    on a meta tensor would keep (they would overstate XL's activations several times)."""

    @staticmethod
    def forward(ctx, q, k, v):
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _PlanRMSNorm(torch.autograd.Function):
    """kernels.rms_norm as the GPU runs it (kernels/rmsnorm.py: saves x, the weight and one fp32 rstd per row); the
    reference math on a meta tensor would keep fp32 copies of q and k (12 GB of RadiT-XL's activations at 16)."""

    @staticmethod
    def forward(ctx, x, weight):
        x = x.contiguous()
        rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, weight, rstd)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad):
        x, weight, _ = ctx.saved_tensors
        return torch.empty_like(x), None if weight is None else torch.empty_like(weight)


def _plan_attention(q, k, v, key_lengths=None, scale=None):
    """kernels.attention on the GPU: q, k, v in the autocast dtype (attention_triton), then the flash kernel."""
    enabled, dtype = _PlanAutocast.state[-1]
    if enabled:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _PlanFlash.apply(q, k.to(q.dtype), v.to(q.dtype))


class _PlanKernels:
    """During the walk the scripts' kernels (kernels/ on a meta or CPU tensor takes its reference path) run as the
    Triton kernels do on a GPU, memory-wise: kernels.attention -> _plan_attention, kernels.rms_norm -> _PlanRMSNorm."""

    def __enter__(self):
        self.kernels = sys.modules.get("kernels")
        if self.kernels is not None:
            self.real = self.kernels.attention_reference, self.kernels.rms_norm_reference
            self.kernels.attention_reference = _plan_attention
            self.kernels.rms_norm_reference = lambda x, weight=None, eps=1e-6: _PlanRMSNorm.apply(x, weight)

    def __exit__(self, *exc):
        if self.kernels is not None:
            self.kernels.attention_reference, self.kernels.rms_norm_reference = self.real
        return False


class _PlanCasts(torch.overrides.TorchFunctionMode):
    """Emulated CUDA bf16 autocast: inputs of autocast's lower-precision ops cast to bf16 (a parameter once per
    forward, as autocast's weight cache does), of its fp32 ops to fp32; attention through _PlanFlash."""

    def __init__(self):
        super().__init__()
        self.lower, self.fp32, self.cache = _plan_funcs(_PLAN_LOWER), _plan_funcs(_PLAN_FP32), {}
        import torch.nn.functional as F
        self.sdpa = F.scaled_dot_product_attention

    def cast(self, x, dtype):
        if isinstance(x, (list, tuple)):
            return type(x)(self.cast(y, dtype) for y in x)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype in (dtype, torch.float64):
            return x
        if isinstance(x, torch.nn.Parameter):
            if (id(x), dtype) not in self.cache:
                self.cache[id(x), dtype] = x.to(dtype)
            return self.cache[id(x), dtype]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        enabled, dtype = _PlanAutocast.state[-1]
        if func is self.sdpa:
            q, k, v = (self.cast(t, dtype) if enabled else t for t in args[:3])
            return _PlanFlash.apply(q, k.to(q.dtype), v.to(q.dtype))
        if enabled and func in self.lower:
            args, kwargs = self.cast(args, dtype), {n: self.cast(a, dtype) for n, a in kwargs.items()}
        elif enabled and func in self.fp32:
            args, kwargs = self.cast(args, torch.float32), {n: self.cast(a, torch.float32) for n, a in kwargs.items()}
        return func(*args, **kwargs)


class _PlanRecompute:
    """The context in which activation checkpointing recomputes a block during backward: the autocast state of
    its forward and the casts (torch-function modes do not reach the recomputation, dispatch modes do)."""

    def __init__(self, state):
        self.state, self.casts = state, _PlanCasts()

    def __enter__(self):
        _PlanAutocast.state.append(self.state)
        self.casts.__enter__()

    def __exit__(self, *exc):
        self.casts.__exit__(*exc)
        _PlanAutocast.state.pop()
        return False


def _plan_checkpoint(real):
    """torch.utils.checkpoint.checkpoint (use_reentrant=False, as every script calls it) that recomputes under
    _PlanRecompute."""
    def checkpoint(fn, *args, **kwargs):
        state = _PlanAutocast.state[-1]
        return real(fn, *args, context_fn=lambda: (nullcontext(), _PlanRecompute(state)), **kwargs)
    return checkpoint


class _PlanBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the storages created while it is on (views share their base's storage: counted once), now alive
    (`live`) and at most (`peak`); a storage is uncounted when it is freed."""

    def __init__(self, existing=()):
        super().__init__()
        self.live, self.peak = 0, 0
        self.keys = {t.untyped_storage()._cdata for t in existing}     # e.g. parameters: a view of one is no new byte

    def _free(self, key, n):
        self.keys.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.keys:
                s = t.untyped_storage()
                self.keys.add(s._cdata)
                self.live += s.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(s, self._free, s._cdata, s.nbytes())
        return out


def step_bytes(model, loss_fn, bf16=True, gpu_kernels=True):
    """-> (bytes held for backward when the forward ends, peak bytes over forward + backward) of one training step:
    loss_fn() runs the forward of `model` (on any device; meta for planning) and returns the loss. Counted: every
    tensor the step creates (inputs made inside loss_fn, activations, autocast's bf16 weight copies, gradients);
    not counted: parameters, buffers and tensors made before. bf16 emulates CUDA bf16 autocast (as `with
    autocast(device)` on a GPU); the model's own `torch.autocast(..., enabled=False)` regions stay fp32.
    gpu_kernels: kernels/ as on a GPU (_PlanKernels), else its reference path as on a CPU."""
    real, real_checkpoint = torch.autocast, torch.utils.checkpoint.checkpoint
    torch.autocast, torch.utils.checkpoint.checkpoint = _PlanAutocast, _plan_checkpoint(real_checkpoint)
    try:
        existing = [*model.parameters(), *model.buffers()]
        with _PlanKernels() if gpu_kernels else nullcontext(), _PlanCasts(), _PlanBytes(existing) as count, \
                _PlanAutocast("cuda", torch.bfloat16, bf16):
            loss = loss_fn()
            saved = count.live
            loss.backward()
            peak = count.peak
        for p in model.parameters():
            p.grad = None
    finally:
        torch.autocast, torch.utils.checkpoint.checkpoint = real, real_checkpoint
    return saved, peak


def _plan_repeats(model):
    """-> {name: length} of the ModuleLists of `model` holding 3 or more blocks of one structure (a transformer's
    blocks), outermost only: the walk runs them truncated and extrapolates."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) >= 3 and not any(name.startswith(f + ".") for f in found):
            kinds = {(type(c), tuple((n, tuple(p.shape)) for n, p in c.named_parameters())) for c in m}
            if len(kinds) == 1:
                found[name] = len(m)
    return found


def _plan_walk(model, loss_fn, bf16, keep, gpu_kernels=True):
    """step_bytes of `model` with its repeated lists cut to keep[name] blocks for the walk (then restored)."""
    lists = {name: model.get_submodule(name) for name in keep}
    cut = {name: list(m)[keep[name]:] for name, m in lists.items()}
    for name, m in lists.items():
        del m[keep[name]:]
    try:
        return step_bytes(model, loss_fn, bf16, gpu_kernels)
    finally:
        for name, m in lists.items():
            m.extend(cut[name])


def memory_plan(build, micro, world=1, ema=True, bf16=True, cut=True, gpu_kernels=True):
    """GPU memory per rank, in bytes, of one training step at micro-batch `micro`. build(grad_ckpt) -> (model,
    loss_fn) on the meta device, model holding every parameter the process keeps on the GPU (frozen ones with
    requires_grad False). Trainable parameters carry an fp32 gradient and Adam's two fp32 moments; `ema` an fp32
    copy of them (the scripts' EMA is a deepcopy of the trained model). DDP's gradient buckets (world > 1): one
    more fp32 copy of the gradients (our assumption: DDP's default gradient_as_bucket_view=False). The optimizer
    step is fused Adam (the scripts' fused=True on CUDA): no full-size temporaries.
    Repeated blocks (_plan_repeats) cost the same bytes each: the walk runs each list at 1 and 2 blocks and
    extrapolates linearly to its length (XL's 32 blocks walk as 2; exact for the activations, tested against the
    full walk in tests/test_memory_plan.py), so that --dry-run stays a few seconds. cut=False walks every block:
    for models whose lists are not independent (controlnet.py's copies run beside the backbone's first blocks).
    MEMORY_PLAN=0 in the environment skips the walk (-> None): a U-Net's walk takes ~10 s of CPU."""
    if os.environ.get("MEMORY_PLAN", "1") == "0":
        return None
    plan = {"micro_batch": micro, "world": world, "precision": "bf16 autocast" if bf16 else "fp32"}
    for ckpt in (False, True):
        model, loss_fn = build(ckpt)
        repeats = _plan_repeats(model) if cut else {}
        one = {name: 1 for name in repeats}
        saved, peak = base = _plan_walk(model, loss_fn, bf16, one, gpu_kernels)
        for name, n in repeats.items():
            two = _plan_walk(model, loss_fn, bf16, {**one, name: 2}, gpu_kernels)
            saved, peak = saved + (n - 1) * (two[0] - base[0]), peak + (n - 1) * (two[1] - base[1])
        key = "ckpt" if ckpt else "no_ckpt"
        plan[f"activations_{key}"], plan[f"step_peak_{key}"] = saved, peak
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    plan.update(parameters=4 * (trainable + frozen), trainable=trainable, frozen=frozen, gradients=4 * trainable,
                adam=8 * trainable, ema=4 * trainable if ema else 0, ddp_buckets=4 * trainable if world > 1 else 0,
                context=int(PLAN_CONTEXT_GB * 2**30))
    static = sum(plan[k] for k in ("parameters", "adam", "ema", "ddp_buckets", "context"))
    for key in ("no_ckpt", "ckpt"):             # the step's peak holds its activations and the gradients it makes
        plan[f"total_{key}"] = static + plan[f"step_peak_{key}"]
    return plan


def print_memory_plan(plan):
    """One readable block: per rank, GB = 2^30 bytes."""
    if plan is None:
        print("GPU memory per rank: not planned (MEMORY_PLAN=0)")
        return
    def gb(n):
        return f"{n / 2**30:9.2f} GB"
    print(f"GPU memory per rank (planned on the meta device): micro-batch {plan['micro_batch']}, {plan['precision']}, "
          f"{plan['world']} process(es) (WORLD_SIZE=N plans N), GB = 2^30 bytes")
    print(f"  parameters (fp32)      {gb(plan['parameters'])}  ({plan['trainable']:,} trained, "
          f"{plan['frozen']:,} frozen)")
    print(f"  gradients (fp32)       {gb(plan['gradients'])}  (made during backward: inside the peak below)")
    print(f"  Adam moments (2 fp32)  {gb(plan['adam'])}")
    print(f"  EMA (fp32)             {gb(plan['ema'])}")
    print(f"  DDP buckets            {gb(plan['ddp_buckets'])}  (one gradient copy under torchrun; our assumption)")
    print(f"  CUDA context           {gb(plan['context'])}  (our allowance)")
    print(f"  activations            {gb(plan['activations_no_ckpt'])}  without --grad-ckpt, "
          f"{plan['activations_ckpt'] / 2**30:.2f} GB with (held for backward)")
    print(f"  forward+backward peak  {gb(plan['step_peak_no_ckpt'])}  without --grad-ckpt, "
          f"{plan['step_peak_ckpt'] / 2**30:.2f} GB with (activations + gradients + temporaries)")
    fits = {key: "fits" if plan[f"total_{key}"] <= PLAN_GPU_GB * 2**30 else "does NOT fit"
            for key in ("no_ckpt", "ckpt")}
    print(f"  total per rank         {gb(plan['total_no_ckpt'])}  without --grad-ckpt ({fits['no_ckpt']}), "
          f"{plan['total_ckpt'] / 2**30:.2f} GB with ({fits['ckpt']}) on an {PLAN_GPU_GB:.0f} GB GPU")
    print(json.dumps({"memory_plan": plan}))
# --- end skeleton: memory_plan ---


def write_text(path, text):
    atomic_save(path, lambda tmp: Path(tmp).write_text(text))

# ----------------------------------------------------------------------------------------------------------------
# Training loop: DDP, bf16 autocast, grad accumulation, clipping, atomic checkpoints, resume, early stopping


# --- skeleton: setup_distributed (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def setup_distributed(device_flag):
    """torchrun -> (rank, world, device) with nccl on CUDA, gloo on CPU; plain python -> one process.
    The rank comes from RANK, the GPU from LOCAL_RANK; --device '' means cuda when available."""
    if device_flag not in ("", "cpu", "cuda"):
        raise SystemExit(f"--device {device_flag!r}: expected cpu or cuda")
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; expected --device cpu")
    cuda = (device_flag or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")


def autocast(device):
    """bf16 autocast on GPU (no GradScaler needed); fp32 on CPU."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
# --- end skeleton: setup_distributed ---


# --- skeleton: batch_split (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def batch_split(batch_size, micro_batch, world):
    """The global batch, given once -> (micro-batch, accumulated micro-steps, rows per process); one-line error
    when it does not divide (micro_batch 0: the whole per-process batch, no accumulation)."""
    micro = micro_batch or batch_size // world
    if micro < 1 or batch_size % (world * micro):
        raise SystemExit(f"--batch-size {batch_size}: expected a multiple of {world} process(es) x --micro-batch "
                         f"{micro}")
    return micro, batch_size // (world * micro), batch_size // world
# --- end skeleton: batch_split ---


# --- skeleton: checkpoint_io (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def optimizer_tensors(opt):
    """An optimizer's state as tensors 'optim.<param index>.<name>', and its param_groups (for the metadata)."""
    osd = opt.state_dict()
    tensors = {}
    for i, state in osd["state"].items():
        for name, v in state.items():
            tensors[f"optim.{i}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, osd["param_groups"]


def load_optimizer(opt, optim, groups):
    """The inverse of optimizer_tensors: {'<param index>.<name>': tensor} and param_groups -> opt."""
    state = {}
    for k, v in optim.items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def write_checkpoint(path, tensors, meta, fmt):
    """One safetensors file, written atomically: the tensors (on the CPU) and string metadata, tagged with `fmt`."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**meta, "format": fmt}
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def open_checkpoint(path, fmt, what, prefixes):
    """-> (metadata, {prefix: {name: tensor}}) of a checkpoint file tagged `fmt`; one-line errors otherwise
    (`what` says what was expected, e.g. 'a vae.py run folder or checkpoint')."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such checkpoint; expected {what}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != fmt:
                raise SystemExit(f"{path}: not {what} (metadata format {meta.get('format')!r})")
            parts = {p: {k[len(p):]: f.get_tensor(k) for k in f.keys() if k.startswith(p)} for p in prefixes}
    except (SafetensorError, OSError) as e:
        raise SystemExit(f"{path}: not a readable safetensors file ({e}); expected {what}") from None
    return meta, parts
# --- end skeleton: checkpoint_io ---


def save_checkpoint(path, raw, opt, cfg, step, state):
    """model.* (+ optim.*) tensors and config / step / early-stopping state as metadata, written atomically."""
    tensors, groups = optimizer_tensors(opt) if opt else ({}, [])
    tensors.update({f"model.{k}": v for k, v in raw.state_dict().items()})
    meta = {"config": json.dumps(asdict(cfg)), "step": str(step), "state": json.dumps(state),
            "param_groups": json.dumps(groups)}
    write_checkpoint(path, tensors, meta, "downstream/1")


def read_checkpoint(path, prefixes=("model.", "optim.")):
    """-> (metadata, {prefix: {name: tensor}}, path); a run folder means RUN/best.safetensors, else ckpt."""
    if os.path.isdir(path):
        path = next((os.path.join(path, f) for f in ("best.safetensors", "ckpt.safetensors")
                     if os.path.isfile(os.path.join(path, f))), os.path.join(path, "best.safetensors"))
    what = "a downstream.py checkpoint (a run folder or a .safetensors file of downstream.py)"
    meta, parts = open_checkpoint(path, "downstream/1", what, prefixes)
    meta = {k: json.loads(v) for k, v in meta.items() if k != "format"}     # config, step, state, param_groups
    return meta, parts, path


@torch.no_grad()
def predict(model, pool, cfg, device, batch=128, fn=None):
    """Scores (activate) or fn(x) over a pool, in order, without augmentation (eval-mode BatchNorm)."""
    was, outs = model.training, []
    model.eval()
    for i in range(0, len(pool), batch):
        with autocast(device):
            x = normalize(pool.fetch(range(i, min(i + batch, len(pool)))).to(device))
            outs.append((fn(x) if fn else activate(model, model(x))).float().cpu())
    model.train(was)
    out = torch.cat(outs).numpy()
    return out.astype(np.float64) if out.ndim == 2 else out     # (segmentation maps stay float32)


@torch.no_grad()
def report_val_loss(model, pool, device, batch=128):
    """Mean next-token cross-entropy of a pool's reports (pool.tokens) under teacher forcing, per token."""
    was, total, count = model.training, 0.0, 0
    model.eval()
    for i in range(0, len(pool), batch):
        tok = torch.as_tensor(pool.tokens[i:i + batch]).to(device)
        with autocast(device):
            logits = model(normalize(pool.fetch(range(i, min(i + batch, len(pool)))).to(device)), tok[:, :-1])
        n = int((tok[:, 1:] != PAD).sum())
        total, count = total + float(report_loss(logits, tok[:, 1:])) * n, count + n
    model.train(was)
    return total / max(count, 1)


def val_score(model, pool, cfg, device):
    """Early stopping: macro AUROC, or mean of positive and negative Dice (plain Dice favours predicting nothing),
    or (report-gen) minus the validation cross-entropy."""
    if cfg.task == RG:                                         # our choice: teacher-forced CE (cheap, smooth)
        return -report_val_loss(model, pool, device)
    p = predict(model, pool, cfg, device)
    if cfg.task == "segment":
        d = dice_summary(p[:, 0] > 0.5, pool.mask_array())
        return float(np.mean([v for v in (d["positive_dice"], d["negative_dice"]) if v is not None]))
    if cfg.task == "predict-metadata":                         # mean ROC-AUC of the categorical variables
        return float(np.nanmean([v for k, v in metadata_metrics(pool.y, p, model.variables, model.sizes)[0].items()
                                 if k != "age" and v is not None] or [0.0]))
    return auroc_table(pool.y, p, n_boot=0)["macro"] or 0.0


# --- skeleton: health_check (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
class HealthCheck:
    """SIGTERM and non-finite values, agreed by all ranks at each check. A signal is acted on at the next check
    (the caller saves, then stops); a non-finite loss, or weights that an update made non-finite, stop the run
    before the next save, so the checkpoint on disk is the last good one."""

    def __init__(self, world, device, ckpt_path):
        self.world = world
        self.device = device
        self.ckpt_path = ckpt_path
        self.signalled = []
        self.old_handler = signal.signal(signal.SIGTERM, lambda *_: self.signalled.append(1))

    def __call__(self, step, bad, params):
        """-> whether any rank got SIGTERM. `bad`: a tensor, the first step with a non-finite loss (-1: none);
        `params`: the tensors the next checkpoint saves (weights, EMA)."""
        finite = torch.stack([p.detach().isfinite().all() for p in params]).all()
        signalled = torch.tensor(float(bool(self.signalled)), device=self.device)
        flags = torch.stack([bad.float(), (~finite).float(), signalled])
        if self.world > 1:
            dist.all_reduce(flags, dist.ReduceOp.MAX)
        if flags[0] >= 0 or flags[1] > 0:
            self.close()
            what = f"loss at step {int(flags[0])}" if flags[0] >= 0 else f"weights after step {step}"
            if os.path.isfile(self.ckpt_path):
                raise SystemExit(f"non-finite {what}; stopped, the last checkpoint {self.ckpt_path} is intact")
            raise SystemExit(f"non-finite {what}; stopped before the first checkpoint ({self.ckpt_path} not written)")
        return bool(flags[2])

    def close(self):
        """Give SIGTERM back to the handler that was there before."""
        signal.signal(signal.SIGTERM, self.old_handler)
# --- end skeleton: health_check ---


# --- skeleton: environment (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def environment(device, world):
    """What OUT/env.json records: versions, device, number of processes, command line."""
    env = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("numpy", "safetensors", "triton", "transformers"):
        env[package] = importlib.metadata.version(package) if importlib.util.find_spec(package) else None
    env.update(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               world=world, argv=sys.argv)
    return env
# --- end skeleton: environment ---


# --- skeleton: log_line (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def log_line(rec, max_steps, fields=()):
    """The printed line of a log record: 'step N/M | loss L | <fields> | gnorm G | lr R | X img/s [| Y tok/s]
    [| MFU m] [| mem g GB] | eta E min'; `fields`: the script's own (label, text) pairs."""
    parts = [f"step {rec['step']}/{max_steps}", f"loss {rec['loss']:.4f}"]
    parts += [f"{label} {text}" for label, text in fields]
    parts += [f"gnorm {rec['grad_norm']:.3f}", f"lr {rec['lr']:.1e}", f"{rec['img_s']:.1f} img/s"]
    if rec.get("tok_s") is not None:
        parts.append(f"{rec['tok_s']:.0f} tok/s")
    if rec.get("mfu"):
        parts.append(f"MFU {rec['mfu']:.1%}")
    if rec.get("mem_gb"):
        parts.append(f"mem {rec['mem_gb']:.1f} GB")
    parts.append(f"eta {rec['eta_s'] / 60:.1f} min")
    return " | ".join(parts)


def write_log(path, rec, line):
    """Print the line and append the record to OUT/log.jsonl (rank 0 calls it)."""
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def resume_log(path, step):
    """On resume from step `step`: keep OUT/log.jsonl's whole records of steps up to `step` and drop the rest (the
    records a killed run wrote after its last checkpoint, and a half-written last line), so the resumed run's
    records follow without duplicates."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(kept)
    atomic_save(path, write)
# --- end skeleton: log_line ---


def train(cfg, pool, val, run_dir, seed, n_out, init="", lr=None, max_steps=None):
    """Train one model on a Pool (resuming RUN/ckpt.safetensors; a finished run is only loaded); best-val weights."""
    rank, world, device = setup_distributed(cfg.device)
    cfg = Config(**{**asdict(cfg), "max_steps": max_steps or cfg.max_steps, "lr": lr or cfg.lr, "seed": seed,
                    "init": init})
    ckpt_path, best_path = os.path.join(run_dir, "ckpt.safetensors"), os.path.join(run_dir, "best.safetensors")
    micro, accum, per_rank = batch_split(cfg.batch_size, cfg.micro_batch, world)
    stream = TrainStream(pool, cfg, seed)                        # (checks --mix before anything is written)
    torch.manual_seed(seed)                                      # the same initial weights on every rank
    raw = load_init(build_model(cfg, n_out), init).to(device)
    opt = torch.optim.AdamW(raw.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)   # chexgen Methods
    step, state = 0, {"best": None, "best_step": 0, "bad": 0, "stopped": False}
    if cfg.resume and os.path.isfile(ckpt_path):
        meta, parts, _ = read_checkpoint(ckpt_path)
        raw.load_state_dict(parts["model."])
        step, state = meta["step"], meta["state"]
        load_optimizer(opt, parts["optim."], meta["param_groups"])
    claim_out(rank)                                              # inputs read; before DDP's first collective
    if step >= cfg.max_steps or state["stopped"]:                # a finished run: its best weights, no training
        print(f"{run_dir}: finished at step {step}", flush=True) if rank == 0 else None
        return load_best(raw, best_path)
    model = torch.compile(raw) if cfg.compile else raw          # load, then compile, then wrap in DDP
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        clean_temporaries(run_dir)                               # .tmp-* of a killed checkpoint write
        # log.jsonl records are numbered like the checkpoint (the step after the update): keep those up to the
        # step resumed from, drop what a killed run logged after its last checkpoint (all of it on a fresh start)
        resume_log(os.path.join(run_dir, "log.jsonl"), step)
        write_text(os.path.join(run_dir, "config.json"), json.dumps(asdict(cfg), indent=1))
        write_text(os.path.join(run_dir, "env.json"), json.dumps(environment(device, world), indent=1))
        print(f"{run_dir}: {cfg.encoder or cfg.arch} {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M trained "
              f"parameters, {len(pool)} training images ({', '.join(f'{s.name} {len(s)}' for s in pool.sources)}), "
              f"{len(val)} validation, {world} process(es) x {accum} micro-batch(es) of {micro}"
              + (f", resuming at step {step}" if step else ""), flush=True)
    lo, seg = rank * per_rank, cfg.task == "segment"
    health, stopping = HealthCheck(world, device, ckpt_path), False   # SIGTERM: save at the next check
    acc = torch.zeros(3, device=device)                          # loss sum, count, grad-norm sum
    bad = torch.full((), -1, dtype=torch.long, device=device)    # first step with a non-finite loss
    t_log, t_start, step0 = time.time(), time.time(), step
    while step < cfg.max_steps:
        rows = stream.rows(step)[lo:lo + per_rank]
        g = generator(seed, 2, step)
        x, m = pool.fetch(rows.numpy(), masks=True) if seg else (pool.fetch(rows.numpy()), None)
        x, target = augment(x, g, cfg, m)
        if cfg.task == RG:                                       # token ids: <bos> words <eos> <pad>...
            target = torch.as_tensor(pool.tokens[rows.numpy()])
        elif not seg:
            target = torch.as_tensor(pool.y[rows.numpy()], dtype=torch.float32)
        x, target = normalize(x).to(device), target.to(device)
        for gr in opt.param_groups:
            gr["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)) * (       # warm-up, then cosine / constant
                0.5 + 0.5 * math.cos(math.pi * step / cfg.max_steps) if cfg.schedule == "cosine" else 1)
        for k in range(accum):
            sl = slice(k * micro, (k + 1) * micro)
            with nullcontext() if world == 1 or k == accum - 1 else model.no_sync():
                with autocast(device):
                    out = model(x[sl], target[sl, :-1]) if cfg.task == RG else model(x[sl])
                if cfg.task == RG:
                    loss = report_loss(out, target[sl, 1:])
                elif seg:
                    loss = seg_loss(out, target[sl], cfg.pos_weight)
                elif cfg.task == "predict-metadata":
                    loss = metadata_loss(out, target[sl], raw.sizes)
                else:
                    loss = masked_bce(out, target[sl])
                (loss / accum).backward()
            acc[:2] += torch.stack([loss.detach(), torch.ones((), device=device)])
            bad = torch.where((bad < 0) & ~loss.detach().isfinite(), step + 1, bad)
        acc[2] += nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        eval_now = step % cfg.eval_every == 0 or step == cfg.max_steps
        log_now = step % cfg.log_every == 0 or eval_now
        ckpt_now = step % cfg.ckpt_every == 0 or step == cfg.max_steps
        if log_now or ckpt_now or step % 10 == 0:                # health check: NaN and SIGTERM, all ranks agree
            stopping = health(step, bad, list(raw.parameters()))
            ckpt_now |= stopping
        rec = None
        if log_now:
            if world > 1:
                dist.all_reduce(acc)
            a, dt = acc.tolist(), time.time() - t_log
            rec = {"step": step, "loss": a[0] / max(a[1], 1), "grad_norm": a[2] / max(a[1] / accum, 1),
                   "lr": opt.param_groups[0]["lr"], "img_s": (a[1] / accum) / world * cfg.batch_size / dt,
                   "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                   "eta_s": (cfg.max_steps - step) * (time.time() - t_start) / (step - step0)}
            acc, t_log = acc.zero_(), time.time()
        if eval_now:                                             # early stopping on validation (rank 0 decides)
            score = torch.zeros(2, device=device)
            if rank == 0:
                v = val_score(raw, val, cfg, device)
                if state["best"] is None or v > state["best"]:
                    state.update(best=v, best_step=step, bad=0)
                    save_checkpoint(best_path, raw, None, cfg, step, state)
                else:
                    state["bad"] += 1
                score[0], score[1] = v, float(cfg.patience and state["bad"] >= cfg.patience)
            if world > 1:
                dist.broadcast(score, 0)
            state["stopped"] = bool(score[1])
            rec["val"] = float(score[0])
            ckpt_now |= state["stopped"]
        if rec and rank == 0:
            if seg:
                what = "Dice"
            elif cfg.task == RG:
                what = "-CE"
            else:
                what = "macro AUROC"
            fields = [(f"val {what}", f"{rec['val']:.4f}")] if "val" in rec else []
            write_log(os.path.join(run_dir, "log.jsonl"), rec, log_line(rec, cfg.max_steps, fields))
        save_checkpoint(ckpt_path, raw, opt, cfg, step, state) if ckpt_now and rank == 0 else None
        if stopping or state["stopped"]:                         # the all-reduced flag: the one the save used
            break
    health.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        if stopping:
            why = "stopped by SIGTERM"
        elif state["stopped"]:
            why = f"early-stopped (best step {state['best_step']})"
        else:
            why = "done"
        print(f"{run_dir}: {why} at step {step}; best validation {state['best']}", flush=True)
    if stopping:                                                 # exit 0 as the other scripts; no further runs
        if rank == 0:
            print(f"SIGTERM: checkpoint {ckpt_path} saved at step {step}; rerun the command to resume", flush=True)
        raise SystemExit(0)
    return load_best(raw, best_path)


def load_best(raw, best_path):
    if os.path.isfile(best_path):                                # the early-stopped weights
        raw.load_state_dict(read_checkpoint(best_path, ("model.",))[1]["model."])
    return raw


def bench(cfg):
    """10 training steps (after 2 warm-up steps) on random --img-size images: images/s and peak memory."""
    _, _, device = setup_distributed(cfg.device)
    S, B, seg = cfg.img_size or 224, cfg.micro_batch or cfg.batch_size, cfg.task == "segment"
    model = build_model(cfg, 1 if seg else len(resolve_labels(cfg))).to(device)
    opt, x, times = torch.optim.AdamW(model.parameters(), lr=cfg.lr), torch.randn(B, 1, S, S, device=device), []
    for _ in range(12):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        times.append(time.time())
        with autocast(device):
            out = model(x).float()
        F.binary_cross_entropy_with_logits(out, torch.zeros_like(out)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    mem = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        mem = torch.cuda.max_memory_allocated(device) / 2**30
    ips = 10 * B / (time.time() - times[2])
    peak = f", peak mem {mem:.2f} GB" if mem else ""
    print(f"bench {cfg.arch} at {S} px, batch {B}, {device}: {ips:.1f} img/s{peak}")
    return ips

# ----------------------------------------------------------------------------------------------------------------
# Tasks: classify, pretrain-finetune, fairness, segment (evaluation, tables, ROC plot)


def resolve_labels(cfg):
    """--labels: CheXpert labels; for predict-metadata any of the 19 variables ('': all, radit Table 16's order)."""
    allowed = META + LABELS if cfg.task in (PM, EE, CE) else LABELS
    by_lower, out = {lab.lower(): lab for lab in allowed}, []
    for name in (n.strip() for n in cfg.labels.split(",") if n.strip()):
        if name.lower() not in by_lower:
            raise SystemExit(f"--labels: {name!r} is not a {'variable' if len(allowed) > 14 else 'CheXpert label'}; "
                             f"expected some of {allowed}")
        out.append(by_lower[name.lower()])
    return out or list(allowed)


def experiments(cfg):
    """--train -> [(row name, [Source])]: ';' separates experiments, ',' the sources of one."""
    exps = []
    for text in [t for t in cfg.train.split(";") if t.strip()] or [cfg.train]:   # (empty: parse_sources says so)
        srcs = parse_sources(text, cfg)
        want = round(cfg.syn_ratio * sum(len(s) for s in srcs if not s.synthetic))
        for k, s in enumerate(srcs):                             # --syn-ratio: experiments with a real source
            if s.synthetic and want:
                if want > len(s):
                    raise SystemExit(f"{s.name}: {len(s)} images; --syn-ratio {cfg.syn_ratio} needs {want}")
                srcs[k] = s.subset(np.sort(np.random.default_rng(cfg.seed).permutation(len(s))[:want]))
        exps.append(("+".join(s.name for s in srcs), srcs))
    return exps


def validation(cfg, srcs):
    """--val, or the first dataset source's val split, or 10% of the first source's rows held out (seeded)."""
    if cfg.val:
        return parse_sources(cfg.val, cfg, "val", "--val"), srcs
    first = srcs[0]
    if first.kind == "dataset" and first.split == "train" and len(v := Source(f"val={first.folder}:val", cfg)):
        return [v], srcs
    perm, k = np.random.default_rng(cfg.seed).permutation(len(first)), max(1, len(first) // 10)
    return [first.subset(np.sort(perm[:k]))], [first.subset(np.sort(perm[k:]))] + srcs[1:]


def test_sets(cfg, srcs):
    if cfg.test:
        return parse_sources(cfg.test, cfg, "test", "--test")
    if (ds := next((s for s in srcs if s.kind == "dataset"), None)) is None:
        raise SystemExit("--test: no default (no training source is a dataset folder); give name=folder[:split]")
    return [Source(f"{os.path.basename(ds.folder)}={ds.folder}:test", cfg)]


def evaluate_classifier(model, pools, val_pool, cfg, device):
    """Per test set: AUROC table with CIs, accuracy / F1 at validation thresholds; predictions kept for plots."""
    t, res = best_thresholds(val_pool.y, predict(model, val_pool, cfg, device)), {}
    for name, pool in pools.items():
        p = predict(model, pool, cfg, device)
        res[name] = {**auroc_table(pool.y, p, cfg.n_boot, cfg.seed), **threshold_metrics(pool.y, p, t), "_scores": p,
                     "thresholds": t.tolist(), "n": len(pool), "positives": (pool.y == 1).sum(0).tolist()}
    return res


def mean_std(values):
    v = np.array([x for x in values if x is not None], float)
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else (None, None)


def fmt(v, nd=3):
    return "-" if v is None or v != v else str(v) if isinstance(v, (int, str)) else f"{v:.{nd}f}"


def pm(mean, std, runs):
    """'mean +- std' over several runs, the mean alone for one."""
    return fmt(mean) + (f" +- {fmt(std)}" if runs > 1 else "")


def summarize(runs, labels):
    """Runs of one experiment on one test set -> per-label and macro mean / std (and the CI of one run)."""
    per = [mean_std([r["auroc"][j] for r in runs]) for j in range(len(labels))]
    macro = mean_std([r["macro"] for r in runs])
    return {"auroc_mean": [m for m, _ in per], "auroc_std": [s for _, s in per], "macro_mean": macro[0],
            "macro_std": macro[1], "macro_ci": runs[0]["macro_ci"] if len(runs) == 1 else None,
            "macro_f1_mean": mean_std([r["macro_f1"] for r in runs])[0],
            "accuracy_mean": mean_std([float(np.nanmean(np.array(r["accuracy"], float))) for r in runs])[0]}


def classify_tables(results, labels, test_names, n_runs):
    """Per test set: rows = training data, columns = labels + Avg (multicond Table 1, chexgenbench Table 4); then Avg by
    test set with the difference to the first row (multicond Table 3)."""
    out, base, cols = [], next(iter(results.values()))["summary"], labels + ["Avg", "F1", "Acc"]
    for t in test_names:
        ci = lambda s: f" [{fmt(s['macro_ci'][0])}, {fmt(s['macro_ci'][1])}]" if s["macro_ci"] and n_runs == 1 else ""
        rows = {row: {**dict(zip(labels, s["auroc_mean"])), "F1": s["macro_f1_mean"], "Acc": s["accuracy_mean"],
                      "Avg": pm(s["macro_mean"], s["macro_std"], n_runs) + ci(s)}
                for row, s in ((row, res["summary"][t]) for row, res in results.items())}
        how = f"mean +- std over {n_runs} runs" if n_runs > 1 else "Avg with 95% bootstrap CI"
        out.append(md_table(f"AUROC on {t} ({how})", rows, cols, [ABBR.get(c, c) for c in cols],
                            corner="Training data"))
    if len(results) > 1 or len(test_names) > 1:
        diff = lambda k, m, b: fmt(m) + (f" ({m - b:+.3f})" if k and None not in (m, b) else "")
        rows = {row: {t: diff(k, res["summary"][t]["macro_mean"], base[t]["macro_mean"]) for t in test_names}
                for k, (row, res) in enumerate(results.items())}
        out.append(md_table("Average AUROC by test set (difference to the first row)", rows, test_names, corner="Data"))
    return "\n".join(out)


def roc_plot(path, y, s, labels, title):
    """ROC curves, one per label with its AUROC in the legend, drawn with pillow (500 x 500 axes)."""
    W, pad = 500, 50
    d = ImageDraw.Draw(img := Image.new("RGB", (W + 2 * pad + 190, W + 2 * pad), "white"))
    d.rectangle([pad, pad, pad + W, pad + W], outline="black")
    d.line([pad, pad + W, pad + W, pad], fill=(180, 180, 180))
    for v in np.linspace(0, 1, 6):
        d.text((pad + v * W - 8, pad + W + 6), f"{v:.1f}", fill="black")
        d.text((pad - 30, pad + W - v * W - 6), f"{v:.1f}", fill="black")
    for xy, text in (((pad + W // 2 - 60, pad + W + 24), "false positive rate"), ((4, pad - 20), "true positive rate"),
                     ((pad, 10), title[:90])):
        d.text(xy, text, fill="black")
    for k, j in enumerate(j for j in range(len(labels)) if len(set(y[~np.isnan(y[:, j]), j])) == 2):
        ok, c = ~np.isnan(y[:, j]), tuple(int(255 * v) for v in colorsys.hsv_to_rgb(j / len(labels), 0.9, 0.75))
        fpr, tpr = roc_points(y[ok, j], s[ok, j])
        d.line([(pad + a * W, pad + W - b * W) for a, b in zip(fpr, tpr)], fill=c, width=2)
        legend = f"{ABBR[labels[j]]} {labels[j][:14]} {auroc(y[ok, j], s[ok, j]):.3f}"
        d.text((pad + W + 12, pad + 16 * k), legend, fill=c)
    atomic_save(path, lambda tmp: img.save(tmp, format="PNG"))


def write_predictions(path, pool, scores, labels):
    """id, demographics, the targets as used (1 / 0 / empty) and one score column per label: every number."""
    cols = ["id", "sex", "age", "race", "view"] + labels + [f"score:{lab}" for lab in labels]
    lines = [cols] + [[r.get(c, "") for c in cols[:5]] + ["" if np.isnan(v) else str(int(v)) for v in y] +
                      [f"{v:.6g}" for v in p] for r, y, p in zip(pool.rows, pool.y, scores)]
    write_text(path, "".join(",".join(f'"{c}"' if "," in c else c for c in line) + "\n" for line in lines))


def clean(o):
    """numpy -> Python, NaN -> null (strict JSON), recursively."""
    o = o.item() if isinstance(o, np.generic) else o
    if isinstance(o, dict):
        return {k: clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, np.ndarray)):
        return [clean(v) for v in o]
    return None if isinstance(o, float) and o != o else o


def finish(cfg, rank, results, md, extra=None):
    """Print the tables; write results.json (every number) and results.md."""
    if rank != 0:
        return results
    print(md, flush=True)
    claim_out(rank)
    write_text(os.path.join(cfg.out, "results.json"), json.dumps(clean({"config": asdict(cfg), **(extra or {}),
                                                                         "results": results}), indent=1))
    write_text(os.path.join(cfg.out, "results.md"), md.strip() + "\n")
    return results


def setup(cfg, masks=False):
    """Common set-up: devices, labels, experiments, validation and test pools at one input size."""
    rank, world, device = setup_distributed(cfg.device)
    labels, exps = [] if masks else resolve_labels(cfg), experiments(cfg)
    cfg.img_size = size = cfg.img_size or exps[0][1][0].size or 256   # stored resolved in the checkpoints
    if "dataset" in labels and not cfg.datasets:                # predictors: codes 1..K in info.json's order
        cfg.datasets = ",".join(next((s.info["datasets"] for s in exps[0][1] if s.info.get("datasets")), []))
        if not cfg.datasets:
            raise SystemExit("--datasets: no info.json lists the datasets; expected their names, e.g. mimic,chexpert")
    return rank, device, labels, exps, size


def run_experiments(cfg, evaluate, masks=False):
    """Each --train experiment x --runs seeds: train (or resume), then evaluate(model, test pools, val pool, device)."""
    rank, device, labels, exps, size = setup(cfg, masks)
    evals = {}
    for row, srcs in exps:
        val_srcs, srcs = validation(cfg, srcs)
        pool, val = Pool(srcs, cfg, labels, size, masks), Pool(val_srcs, cfg, labels, size, masks)
        tests = {s.name: Pool([s], cfg, labels, size, masks) for s in test_sets(cfg, srcs)}
        row_dir = file_in(cfg.out, SAFE.sub("_", row), where="--train")     # names from the CLI: stay in --out
        evals[row] = [evaluate(train(cfg, pool, val, os.path.join(row_dir, f"run{k}"), cfg.seed + k,
                                     len(labels) or 1, init=cfg.init).to(device), tests, val, device)
                      for k in range(cfg.runs)]
    return rank, labels, evals, tests


def task_classify(cfg):
    """Train on each experiment (--runs seeds), evaluate on every test set; tables in the papers' layout."""
    rank, labels, evals, tests = run_experiments(cfg, lambda m, ts, val, dev: evaluate_classifier(m, ts, val, cfg, dev))
    return report_classify(cfg, rank, evals, tests, labels)


def report_classify(cfg, rank, evals, tests, labels):
    """Predictions CSVs, the ROC plot of the first run on the first test set, tables, results.json."""
    results = {}
    for row, runs in evals.items():
        for k, ev in enumerate(runs):
            for t, r in ev.items():
                scores = r.pop("_scores")
                if rank == 0:
                    claim_out(rank)
                    name = file_in(os.path.join(cfg.out, "predictions"), SAFE.sub("_", f"{row}_run{k}_{t}"), ".csv",
                                   where="--train / --test names")
                    write_predictions(name, tests[t], scores, labels)
                    if cfg.roc_plot and not results and k == 0 and t == next(iter(tests)):
                        roc_plot(cfg.roc_plot, tests[t].y, scores, labels, f"{row} on {t}")
        results[row] = {"runs": runs, "summary": {t: summarize([r[t] for r in runs], labels) for t in tests}}
    return finish(cfg, rank, results, classify_tables(results, labels, list(tests), len(runs)), {"labels": labels})


def load_classifier(ckpt, labels=None):
    """A trained model and its config from a run folder or checkpoint: a classifier (trained on `labels` when they
    are given), or with labels='predictor' a predict-metadata run."""
    meta, parts, path = read_checkpoint(ckpt, ("model.",))
    saved = Config(**{k: v for k, v in meta["config"].items() if k in {f.name for f in fields(Config)}})
    if saved.task == "segment" or (saved.task == PM) != (labels == "predictor"):
        raise SystemExit(f"{path}: a {saved.task} run; expected " + ("a predict-metadata run" if labels == "predictor"
                         else "a classifier (segment evaluates its test sets after training)"))
    if labels not in (None, "predictor") and labels != (have := resolve_labels(saved)):
        raise SystemExit(f"{path}: trained on labels {have}; --labels asks for {labels}")
    model = build_model(saved, len(resolve_labels(saved)))
    try:
        model.load_state_dict(parts["model."])
    except RuntimeError as e:
        raise SystemExit(f"{path}: weights do not fit its own config ({str(e).splitlines()[0]})") from None
    return model, saved, path


def task_eval(cfg):
    """--eval --ckpt: a trained classifier on --test, F1 thresholds from --val; labels and size from the checkpoint."""
    if not (cfg.test and cfg.val):
        raise SystemExit("--eval: expected --test name=folder[:split] and --val (F1 thresholds) besides --ckpt")
    rank, _, device = setup_distributed(cfg.device)
    model, saved, path = load_classifier(cfg.ckpt)
    cfg.labels = saved.labels
    cfg.uncertain = saved.uncertain
    cfg.img_size = saved.img_size
    labels = resolve_labels(saved)
    val = Pool(parse_sources(cfg.val, cfg, "val", "--val"), cfg, labels, cfg.img_size)
    tests = {s.name: Pool([s], cfg, labels, cfg.img_size) for s in parse_sources(cfg.test, cfg, "test", "--test")}
    return report_classify(cfg, rank, {os.path.basename(os.path.dirname(os.path.abspath(path))): [
        evaluate_classifier(model.to(device), tests, val, cfg, device)]}, tests, labels)


def task_pretrain_finetune(cfg):
    """Pretrain on --train, finetune on --fractions of --finetune; baseline: the same from --init (chexgen Fig. 4)."""
    number = re.compile(r"\d*\.?\d+([eE][-+]?\d+)?")
    fractions = []
    for f in cfg.fractions.split(","):
        fractions.append(float(f) if number.fullmatch(f.strip()) else math.nan)
    for f in (f for f in fractions if not 0 < f <= 1):           # (NaN, from a non-number, fails the test too)
        raise SystemExit(f"--fractions {cfg.fractions!r}: {f} is outside (0, 1]; expected fractions of the real data")
    if not cfg.finetune:
        raise SystemExit("--finetune: expected the real data to finetune on, e.g. real=data/mimic:train")
    rank, device, labels, ((row, srcs), *_), size = setup(cfg)
    val_srcs, srcs = validation(cfg, srcs)
    real = parse_sources(cfg.finetune, cfg, "train", "--finetune")
    rval, real = validation(Config(**{**asdict(cfg), "val": ""}), real)
    pool, val = Pool(srcs, cfg, labels, size), Pool(val_srcs, cfg, labels, size)
    rval_pool, real_pool = Pool(rval, cfg, labels, size), Pool(real, cfg, labels, size)
    tests = {s.name: Pool([s], cfg, labels, size) for s in test_sets(cfg, real)}
    ft_lr, ft_steps = cfg.finetune_lr or cfg.lr, cfg.finetune_steps or cfg.max_steps
    results = {"pretrained": {}, "baseline": {}}
    for k in range(cfg.runs):
        pre_dir = os.path.join(cfg.out, "pretrain", f"run{k}")
        train(cfg, pool, val, pre_dir, cfg.seed + k, len(labels), init=cfg.init)
        for f, n_all in ((f, len(real_pool)) for f in fractions):
            order = np.random.default_rng([cfg.seed + k, int(f * 1e6)]).permutation(n_all)
            keep = np.sort(order[:max(1, round(f * n_all))])
            sub = Pool(split_pool_sources(real_pool, keep), cfg, labels, size)
            for arm, init in (("pretrained", pre_dir), ("baseline", cfg.init)):
                model = train(cfg, sub, rval_pool, os.path.join(cfg.out, f"{arm}-{f:g}", f"run{k}"), cfg.seed + k,
                              len(labels), init=init, lr=ft_lr, max_steps=ft_steps).to(device)
                for t, r in evaluate_classifier(model, tests, rval_pool, cfg, device).items():
                    results[arm].setdefault(t, {}).setdefault(f"{f:g}", []).append(r["macro"])
    cols, arms = [f"{f:g}" for f in fractions], {"pretrained": f"pretrained on {row}",
                                                 "baseline": cfg.init.split(":")[0] or "random"}
    md = [md_table(f"Macro AUROC on {t} vs fraction of real training data (finetuning)",
                   {name: {c: pm(*mean_std(results[arm][t][c]), cfg.runs) for c in cols} for arm, name in arms.items()},
                   cols, corner="Initialisation") for t in tests]
    return finish(cfg, rank, results, "\n".join(md), {"labels": labels, "fractions": fractions})


def split_pool_sources(pool, keep):
    """The sources of a pool restricted to global rows `keep`."""
    parts = [(s, [int(i - pool.offsets[k]) for i in keep if pool.offsets[k] <= i < pool.offsets[k + 1]])
             for k, s in enumerate(pool.sources)]
    return [s.subset(local) for s, local in parts if local]


def balance_sources(cfg, srcs):
    """Top up each --balance-by group with its --balance images to the largest group's size (chexgen Fig. 5d)."""
    attrs = tuple(a.strip() for a in cfg.balance_by.split(",") if a.strip())
    if not attrs or any(a not in ATTRIBUTES for a in attrs):
        raise SystemExit(f"--balance-by {cfg.balance_by!r}: expected some of {list(ATTRIBUTES)}")
    syn, by_group = Source(f"syn-balance={cfg.balance}", cfg), {}
    count = Counter(filter(None, (group_of(r, attrs) for s in srcs for r in s.rows)))
    for i, r in enumerate(syn.rows):
        by_group.setdefault(group_of(r, attrs), []).append(i)
    target = max(count.values())
    take = {g: by_group.get(g, [])[: target - n] for g, n in count.items()}
    pick = sorted(i for t in take.values() for i in t)
    return (srcs + [syn.subset(pick)] if pick else srcs), {"target": target, "real": dict(count),
                                                          "added": {g: len(t) for g, t in take.items()}}


def task_fairness(cfg):
    """Subgroup metrics on real and synthetic cohorts, their Pearson r; --balance: a second, debiased model."""
    if cfg.eval and not (cfg.val and cfg.test) or cfg.eval and cfg.balance:
        raise SystemExit("fairness --eval: expected --test (the real cohort) and --val (for the F1 thresholds); "
                         "--balance trains a new model, it does not combine with --eval")
    if cfg.eval:                                                 # bias detection of an existing model
        rank, _, device = setup_distributed(cfg.device)
        trained, saved, _ = load_classifier(cfg.ckpt, labels := resolve_labels(cfg))
        size, srcs, val_srcs = saved.img_size, [], parse_sources(cfg.val, cfg, "val", "--val")
    else:
        rank, device, labels, exps, size = setup(cfg)
        val_srcs, srcs = validation(cfg, exps[0][1])
    val, arms, extra = Pool(val_srcs, cfg, labels, size), {"original": srcs}, {}
    cohorts = {"real": test_sets(cfg, srcs)}
    if cfg.syn_test:
        cohorts["synthetic"] = parse_sources(cfg.syn_test, cfg, "", "--syn-test")
    for src in (s for c in cohorts.values() for s in c):         # subgroups need every attribute: one rule, an error
        if lacking := [a for a in ATTRIBUTES if a not in src.columns]:
            raise SystemExit(f"{src.folder}/meta.csv: no column(s) {', '.join(lacking)}; fairness needs "
                             f"{', '.join(ATTRIBUTES)} in every test cohort")
    if cfg.balance:
        arms["balanced"], extra["balance"] = balance_sources(cfg, srcs)
    results = {}
    for arm, arm_srcs in arms.items():
        model = (trained if cfg.eval else train(cfg, Pool(arm_srcs, cfg, labels, size), val, os.path.join(
            cfg.out, arm, "run0"), cfg.seed, len(labels), init=cfg.init)).to(device)
        t = best_thresholds(val.y, predict(model, val, cfg, device))
        results[arm] = {}
        for name, src in cohorts.items():
            pool = Pool(src, cfg, labels, size)
            p = predict(model, pool, cfg, device)
            if rank == 0:
                claim_out(rank)
                write_predictions(file_in(os.path.join(cfg.out, "predictions"), SAFE.sub("_", f"{arm}_{name}"),
                                          ".csv", where="--test / --syn-test names"), pool, p, labels)
            groups = subgroup_metrics(pool.rows, pool.y, p, t, cfg.min_group)
            overall = {"auroc": auroc_table(pool.y, p, n_boot=0)["macro"],
                       "f1": threshold_metrics(pool.y, p, t)["weighted_f1"]}
            results[arm][name] = {"overall": overall, "groups": groups,
                                  "summary": {fam: worst_and_gap(g, cfg.fair_metric) for fam, g in groups.items()}}
        if "synthetic" in results[arm]:                          # bias detection: do both cohorts rank groups alike?
            real, syn = results[arm]["real"]["groups"], results[arm]["synthetic"]["groups"]
            results[arm]["pearson"] = {fam: pearson(real[fam], syn[fam], cfg.fair_metric) for fam in real}
    return finish(cfg, rank, results, fairness_tables(results, cfg.fair_metric), {"labels": labels, **extra})


def fairness_tables(results, metric):
    """Per arm: every subgroup's n / AUROC / F1 in each cohort, then worst group, gap and Pearson r by attribute."""
    out, ms = [], ("n", "auroc", "f1")
    for arm, res in results.items():
        cs, none = [c for c in res if c != "pearson"], dict.fromkeys(ms)
        rows = {f"{fam}: {g}": {f"{c} {m}": res[c]["groups"][fam].get(g, none)[m] for c in cs for m in ms}
                for fam, groups in res["real"]["groups"].items() for g in groups}
        out.append(md_table(f"Subgroups, model trained on {arm} data (worst / gap / r use {metric})", rows,
                            list(rows[next(iter(rows))]) if rows else [], corner="Group"))
        cols, summary = [f"{c} {m}" for c in cs for m in ("worst", "gap")] + ["Pearson r (real vs syn)"], {}
        for fam in res["real"]["summary"]:
            r, sm = res.get("pearson", {}).get(fam), {c: res[c]["summary"][fam] for c in cs}
            summary[fam] = {**{f"{c} worst": f"{sm[c]['worst'] or '-'} {fmt(sm[c]['worst_value'])}" for c in cs},
                            **{f"{c} gap": sm[c]["gap"] for c in cs},
                            cols[-1]: f"{fmt(r['r'])} (n={r['n']})" if r else None}
        out.append(md_table(f"Worst group and best-worst gap by attribute ({arm})", summary, cols, corner="Attribute"))
    return "\n".join(out)


def task_segment(cfg):
    """U-Net on one mask per experiment; Dice, positive and negative Dice on every test set (chexgen Fig. 3d)."""
    rank, _, evals, tests = run_experiments(cfg, lambda m, tests, val, dev: {
        t: dice_summary(predict(m, p, cfg, dev)[:, 0] > 0.5, p.mask_array()) for t, p in tests.items()}, masks=True)
    dice = ["dice", "positive_dice", "negative_dice"]
    results = {row: {"runs": runs, "summary": {t: {m: mean_std([r[t][m] for r in runs]) for m in dice} for t in tests}}
               for row, runs in evals.items()}
    md = [md_table(f"Segmentation of {cfg.mask!r} on {t}", {row: {m: pm(*res["summary"][t][m], cfg.runs) for m in dice}
                                                             for row, res in results.items()}, dice,
                   ["Dice", "positive Dice", "negative Dice"], corner="Training data") for t in tests]
    return finish(cfg, rank, results, "\n".join(md), {"mask": cfg.mask})


def md_table(title, rows, cols, head=None, nd=3, corner=""):
    """A markdown table, one line per {name: {column: value}} (numbers to nd decimals, counts and text as they are)."""
    return "\n".join([f"\n{title}\n\n| {corner} | " + " | ".join(head or cols) + " |", "|---" * (len(cols) + 1) + "|"] +
                     [f"| {name} | " + " | ".join(fmt(r.get(c), nd) for c in cols) + " |" for name, r in rows.items()])


def metadata_table(title, rows, variables, extra=()):
    """radit Table 16's layout: metadata ROC-AUC, age MAE, then the findings."""
    cols = [v for v in META if v in variables] + [v for v in variables if v in LABELS] + list(extra)
    return md_table(title, rows, cols, [c.capitalize() if c in META[:4] else "Age MAE" if c == "age" else ABBR.get(c, c)
                                        for c in cols])


def task_predict_metadata(cfg):
    """radit App. C.4: the multi-task predictor of the 19 variables; per-variable ROC-AUC / age MAE per test set."""
    rank, labels, evals, tests = run_experiments(cfg, lambda m, tests, val, dev: {
        t: metadata_metrics(p.y, predict(m, p, cfg, dev), m.variables, m.sizes)[0] for t, p in tests.items()})
    summary = {f"{row} on {t}": {v: pm(*mean_std([r[t][v] for r in runs]), cfg.runs) for v in labels}
               for row, runs in evals.items() for t in tests}
    return finish(cfg, rank, {row: {"runs": runs} for row, runs in evals.items()}, metadata_table(
        "Predictor ROC-AUC / age MAE (years) by training data and test set", summary, labels),
        {"variables": labels, "datasets": cfg.datasets})


def matched(spec, ids, cfg, flag):
    """The rows of a folder in the order of `ids` (the edited images' ids); every id must be there."""
    src = Source(f"{flag[2:]}={spec}", cfg)
    where = {r["id"]: i for i, r in enumerate(src.rows)}
    if missing := [i for i in ids if i not in where]:
        raise SystemExit(f"{src.folder}/meta.csv: no rows with ids {missing[:3]} ({len(missing)} of --edited's "
                         f"{len(ids)}); expected {flag} and --edited to share ids (one edit per source image)")
    return src.subset([where[i] for i in ids])


def task_edit_eval(cfg):
    """radit App. C.4, Tables 14 and 16: edit effectiveness (the predictor on the edited images against their new
    profile; hit: the intervened variable predicted as set) and identity preservation (SSIM, LPIPS, rLPIPS, attribute
    cosine) with random-pair reference rows; --truth: the same against the true counterfactual images and labels."""
    if not (cfg.original and cfg.edited and cfg.predictor):
        raise SystemExit("edit-eval: expected --original D --edited E --predictor PRED_RUN (and optionally --truth T)")
    import metrics                                               # (scripts import metrics where they evaluate)
    rank, _, device = setup_distributed(cfg.device)
    model, saved, path = load_classifier(cfg.predictor, "predictor")
    model, V = model.to(device), model.variables
    cfg.labels, cfg.datasets, cfg.uncertain = saved.labels, saved.datasets, saved.uncertain
    E = Source(f"edited={cfg.edited}", cfg)
    edits = [[p.partition("=")[0].strip() for p in (r.get("intervention") or "").split(",") if p.strip()]
             for r in E.rows]
    for r, e in ((r, e) for r, e in zip(E.rows, edits) if not e or not set(e) <= set(META + LABELS)):
        raise SystemExit(f"{E.folder}/meta.csv row {r['id']}: intervention {r.get('intervention')!r}; expected "
                         f"variable=value with variables from {META + LABELS}")
    if lacking := sorted({v for e in edits for v in e} - set(V)):
        raise SystemExit(f"{path}: the predictor lacks {lacking}; expected a predict-metadata run trained on them")
    ids, n = [r["id"] for r in E.rows], len(E)
    sets = {"original": matched(cfg.original, ids, cfg, "--original"), "edited": E,
            **({"truth": matched(cfg.truth, ids, cfg, "--truth")} if cfg.truth else {})}
    kinds = [e[0] if e[0] in META else "finding" for e in edits]
    groups = {k: np.array([i for i, g in enumerate(kinds) if g == k]) for k in dict.fromkeys(kinds)}
    pix = {k: Pool([s], cfg, [], E.size).fetch(range(n)) for k, s in sets.items()}    # identity: at E's side
    pools = {k: Pool([s], cfg, V, saved.img_size) for k, s in sets.items()}
    p = {k: predict(model, q, cfg, device) for k, q in pools.items()}
    emb = {k: predict(model, q, cfg, device, fn=model.embed) for k, q in pools.items()}
    effect = {"observed": metadata_metrics(pools["original"].y, p["original"], V, model.sizes)[0]}
    for img, lab in [("edited", "edited")] + [("edited", "truth"), ("truth", "truth")] * bool(cfg.truth):
        y, pred = pools[lab].y, metadata_metrics(pools[lab].y, p[img], V, model.sizes)[1]
        for k, idx in groups.items():
            hit = [abs(pred[i, j] - y[i, j]) if V[j] == "age" else pred[i, j] == y[i, j]
                   for i in idx for j in map(V.index, edits[i]) if y[i, j] == y[i, j]]
            effect[f"{img} images, {lab} labels: {k}"] = {**metadata_metrics(y[idx], p[img][idx], V, model.sizes)[0],
                                                         "n": len(idx), "hit": float(np.mean(hit)) if hit else None}
    a = (rng := np.random.default_rng(cfg.seed)).integers(0, n, cfg.n_pairs)    # random pairs of distinct originals
    b = (a + rng.integers(1, max(n, 2), cfg.n_pairs)) % n                      # (radit Eq. 14)
    x0, e0 = pix["original"], emb["original"]                    # (all attributes unchanged in a random pair)
    ident = {"random pairs": {"n": cfg.n_pairs, "SSIM": float(metrics.ssim(x0[a], x0[b]).mean()),
                              "cosine": float(np.nanmean(attribute_cosine(e0[a], e0[b], V, [[]] * len(a))))}}
    pairs = [("original", "edited")] + [("truth", "edited"), ("original", "truth")] * bool(cfg.truth)
    per = {q: {"SSIM": metrics.ssim(pix[q[0]], pix[q[1]]).reshape(-1).numpy(),
               "cosine": attribute_cosine(emb[q[0]], emb[q[1]], V, edits)} for q in pairs}
    for name in filter(None, map(str.strip, cfg.lpips.split(","))):          # radit Eq. 13, 14 through metrics.py
        lp = metrics.FeatureLPIPS(name, None, cfg.weights_dir, cfg.allow_random_weights, str(device))
        d0, key = float(metrics.random_pair_distance(lp, x0, cfg.n_pairs, cfg.seed)), os.path.basename(name.rstrip("/"))
        ident["random pairs"].update({f"LPIPS {key}": d0, f"rLPIPS {key}": 1.0})
        for q in pairs:
            d = lp.distance(pix[q[0]], pix[q[1]]).double()
            per[q].update({f"LPIPS {key}": d.numpy(), f"rLPIPS {key}": np.asarray(metrics.relative_lpips(d, d0))})
    for q in pairs:
        ident.update({f"{q[0]} vs {q[1]}: {k}": {"n": len(idx), **{m: np.nanmean(v[idx]) for m, v in per[q].items()}}
                      for k, idx in groups.items()})
    md = md_table("Identity preservation (radit Table 14; cosine: the attribute heads' embeddings, Eq. 15)", ident,
                  ["n"] + list(per[pairs[0]]), nd=4)
    md += "\n" + metadata_table("Edit effectiveness: predictor ROC-AUC / age MAE (radit Table 16); hit: the intervened "
                                "variable predicted as set (age: MAE)", effect, V, ("hit", "n"))
    return finish(cfg, rank, {"identity": ident, "effectiveness": effect}, md, {"variables": V, "predictor": path})


def sample_source(spec, cfg, flag):
    """A folder of samples as a Source; a PNG folder must hold <id>.png for every meta.csv id (one-line errors)."""
    folder = spec.rstrip("/")
    if os.path.isfile(meta := os.path.join(folder, "meta.csv")) and not os.path.isdir(os.path.join(folder, "shards")):
        with open(meta, newline="") as f:
            ids = [r.get("id") or "" for r in csv.DictReader(f)]
        lacking = [i for i in ids if not os.path.isfile(os.path.join(folder, f"{i}.png"))]
        if ids and len(lacking) == len(ids):
            raise SystemExit(f"{flag} {folder}: no PNGs for its {len(ids)} meta.csv rows; expected <id>.png per row "
                             f"(a sampler's output folder)")
        if lacking:
            raise SystemExit(f"{meta}: {len(lacking)} of {len(ids)} ids have no PNG (e.g. {lacking[:3]}); expected "
                             f"<id>.png per row")
    return Source(f"{flag[2:]}={spec}", cfg)


def requested(src, variables, policy, datasets):
    """[n, V] values requested in a folder's meta.csv; NaN where missing (or uncertain, under --uncertain ignore)."""
    where = f"{src.folder}/meta.csv row"
    return np.array([[var_value(v, r.get(v), policy, f"{where} {r['id']} {v}", datasets) if v in src.columns
                      else math.nan for v in variables] for r in src.rows], np.float64).reshape(-1, len(variables))


def cond_scores(y, p, variables, sizes):
    """Per variable, the predictor's scores p (activate) against requested values y (NaN skipped): AUROC of
    P(finding = 1) for the findings, accuracy of the predicted class for categorical variables, age MAE (years)."""
    res, o = {}, 0
    for j, (v, k) in enumerate(zip(variables, sizes)):
        t, s, o = y[:, j], p[:, o:o + k], o + k
        ok = ~np.isnan(t)
        if not ok.any():
            res[v] = None
        elif v == "age":
            res[v] = float(np.abs(s[ok, 0] - t[ok]).mean())
        elif v in LABELS:
            res[v] = a if (a := auroc(t[ok] == 1, s[ok, 1])) == a else None       # one class requested: None
        else:
            res[v] = float((s[ok].argmax(1) == t[ok]).mean())
    return res


def task_cond_eval(cfg):
    """Issue 28: how often conditional samples show what they were asked for. The predict-metadata predictor on
    --samples against their meta.csv conditions, beside real test images with their own labels (the ceiling) and
    unconditional samples (--floor) paired row by row with the samples' requested conditions (the floor)."""
    pred_run = cfg.predictor or cfg.ckpt
    if not (cfg.samples and pred_run):
        raise SystemExit("cond-eval: expected --samples S --predictor PRED_RUN (or --ckpt), optionally --data D "
                         "(its test split: the ceiling; or --test) and --floor UNCOND")
    rank, _, device = setup_distributed(cfg.device)
    model, saved, path = load_classifier(pred_run, "predictor")
    model, V = model.to(device), model.variables
    cfg.labels, cfg.datasets, cfg.uncertain = saved.labels, saved.datasets, saved.uncertain
    names = cfg.datasets.split(",")
    S = sample_source(cfg.samples, cfg, "--samples")
    y = requested(S, V, cfg.uncertain, names)
    asked = [v for j, v in enumerate(V) if v in S.columns and (~np.isnan(y[:, j])).any()]
    if not asked:
        raise SystemExit(f"{S.folder}/meta.csv: no requested value of the predictor's variables {V}; expected "
                         f"the conditions the sampler was given (FORMAT.md §2 columns)")
    real = parse_sources(cfg.test or f"real={cfg.data}:test", cfg, "test", "--test")
    sets = {"samples": (S, y), "real test (ceiling)": (real[0], requested(real[0], V, cfg.uncertain, names))}
    if cfg.floor:
        U = sample_source(cfg.floor, cfg, "--floor")
        m = min(len(U), len(S))                                  # unconditional image i against request i
        sets["unconditional (floor)"] = (U.subset(range(m)), y[:m])
    scores = {k: cond_scores(t, predict(model, Pool([s], cfg, [], saved.img_size), cfg, device), V, model.sizes)
              for k, (s, t) in sets.items()}
    n = {v: int((~np.isnan(y[:, V.index(v)])).sum()) for v in asked}
    results = {}
    for v in asked:
        if v == "age":
            metric = "MAE (years)"
        elif v in LABELS:
            metric = "AUROC"
        else:
            metric = "accuracy"
        results[v] = {"metric": metric, **{k: scores[k][v] for k in sets}, "n": n[v], "skipped": len(S) - n[v]}
        if metric == "accuracy":                                 # what always answering the commonest value scores
            known = y[~np.isnan(y[:, V.index(v)]), V.index(v)]
            results[v]["majority rate"] = float(Counter(known).most_common(1)[0][1] / n[v])
    rows = {k: {v: scores[k][v] for v in asked} for k in sets}
    rows.update({"requested (n)": n, "skipped (missing, uncertain)": {v: len(S) - n[v] for v in asked},
                 "majority rate": {v: r.get("majority rate") for v, r in results.items()}})
    md = metadata_table(f"Conditioning: the predictor on {S.folder} against its requested conditions (AUROC for the "
                        f"findings, accuracy for sex / race / view / dataset, age MAE in years)", rows, asked)
    if S.kind == "png" and any(os.path.isfile(os.path.join(S.folder, f"{r['id']}_mask.png")) for r in S.rows[:8]):
        md += "\n\nMask pairs found: their Dice against the requested masks is controlnet.py evaluate's (not here)."
    return finish(cfg, rank, results, md, {"variables": asked, "predictor": path, "n_samples": len(S),
                                           "sets": {k: s.folder for k, (s, _) in sets.items()}})


def check_reports(srcs, what):
    """Every row of a report-gen source needs its report (FORMAT.md §2's `report`; dit_text2img.py sample copies
    it from --cond): one line naming the folder otherwise."""
    for s in srcs:
        if "report" not in s.columns:
            raise SystemExit(f"{s.folder}/meta.csv ({what}): no report column; expected each image's report text "
                             f"(FORMAT.md §2, §8: dit_text2img.py sample --cond META.csv copies it)")
        if empty := [r["id"] for r in s.rows if not words(r.get("report"))]:
            raise SystemExit(f"{s.folder}/meta.csv ({what}): {len(empty)} row(s) with an empty report (first "
                             f"{empty[0]!r}); expected a report in every row used")


def pool_reports(pool):
    return [r["report"].strip() for r in pool.rows]


@torch.no_grad()
def generate_reports(model, pool, vocab, cfg, device, batch=128):
    """Greedy reports for every image of a pool, in order."""
    was, out = model.training, []
    model.eval()
    for i in range(0, len(pool), batch):
        with autocast(device):
            ids = model.generate(normalize(pool.fetch(range(i, min(i + batch, len(pool)))).to(device)), cfg.max_tokens)
        out += decode_reports(ids.cpu(), vocab)
    model.train(was)
    return out


NN_SIDE = 32        # our choice: nearest neighbours between 32 px thumbnails (cost: 50k x 50k pairs stay cheap)


def nearest_reports(pool, test, device, batch=512):
    """Baseline: the report of the training image nearest to each test image in raw-pixel space (Euclidean distance
    between [0, 1] thumbnails of NN_SIDE px; our choice of space: it does not depend on the model it is compared
    with)."""
    thumbs = lambda p: torch.cat([fit(p.fetch(range(i, min(i + batch, len(p)))), NN_SIDE).flatten(1)
                                  for i in range(0, len(p), batch)]).to(device, torch.float64)
    a, b, reports = thumbs(pool), thumbs(test), pool_reports(pool)
    nearest = torch.cat([torch.cdist(b[i:i + batch], a).argmin(1) for i in range(0, len(b), batch)])
    return [reports[int(k)] for k in nearest]


def report_table(results, test_names):
    """Per test set: one row per system (model runs, baselines); BLEU in percent as chexgenbench Tables 6 and 16."""
    cols = ["BLEU-1", "BLEU-4", "ROUGE-L", "F1-5 micro", "F1-5 macro", "F1-14 micro", "F1-14 macro"]
    keys = ["bleu1", "bleu4", "rouge_l", "micro_f1_5", "macro_f1_5", "micro_f1_14", "macro_f1_14"]
    out = []
    for t in test_names:
        rows = {}
        for name, res in results.items():
            n = len(res["runs"])
            rows[name] = {c: pm(*(v * 100 if v is not None and c.startswith("BLEU") else v for v in mean_std(
                [r[t][k] for r in res["runs"]])), n) for c, k in zip(cols, keys)}
        out.append(md_table(f"Report generation on {t} (BLEU-1/4 x 100, ROUGE-L, CheXpert label F1; greedy decoding)",
                            rows, cols, corner="Training data / baseline"))
    return "\n".join(out)


def task_report_gen(cfg):
    """Image -> report models trained on each experiment (chexgenbench §2.4, App. A.7.2), and two baselines of the
    same training data: its most frequent report, and the report of the nearest training image (raw pixels). Each
    scored on the test sets' reports: BLEU-1..4, ROUGE-L, CheXpert-14 label F1 (prep_data.py extract-labels)."""
    rank, device, _, exps, size = setup(cfg)
    texts = {}                                                   # system -> runs -> {test: [report]}
    refs, ids = {}, {}
    test_names, prepared = [], []
    for row, srcs in exps:                                       # every experiment's input checked before training
        val_srcs, srcs = validation(cfg, srcs)
        test_srcs = test_sets(cfg, srcs)
        for group, what in ((srcs, "--train"), (val_srcs, "--val"), (test_srcs, "--test")):
            check_reports(group, what)
        pool, val = Pool(srcs, cfg, [], size), Pool(val_srcs, cfg, [], size)
        tests = {s.name: Pool([s], cfg, [], size) for s in test_srcs}
        if len(pool) < 2:
            raise SystemExit(f"--train {row}: {len(pool)} training image(s) after the validation hold-out; expected "
                             f"at least 2")
        if test_names and list(tests) != test_names:         # one table: every experiment on the same test sets
            raise SystemExit(f"--train {row}: default test set(s) {list(tests)}, another experiment's are "
                             f"{test_names}; expected one --test name=folder[:split] for all")
        test_names = list(tests)
        for t, tp in tests.items():
            refs[t], ids[t] = pool_reports(tp), [r["id"] for r in tp.rows]
        vocab = build_vocab(pool_reports(pool))                  # each experiment's own training reports
        pool.tokens, cut = encode_reports(pool_reports(pool), vocab, cfg.max_tokens)
        val.tokens, _ = encode_reports(pool_reports(val), vocab, cfg.max_tokens)
        prepared.append((row, pool, val, tests, vocab, cut))
    for row, pool, val, tests, vocab, cut in prepared:
        row_dir = file_in(cfg.out, SAFE.sub("_", row), where="--train")     # names from the CLI: stay in --out
        if rank == 0:
            print(f"{row}: vocabulary of {len(vocab)} tokens from {len(pool)} training reports ({cut} cut at "
                  f"--max-tokens {cfg.max_tokens})", flush=True)
        runs = []
        for k in range(cfg.runs):
            model = train(cfg, pool, val, os.path.join(row_dir, f"run{k}"), cfg.seed + k, len(vocab), init=cfg.init)
            runs.append({t: generate_reports(model.to(device), tp, vocab, cfg, device) for t, tp in tests.items()}
                        if rank == 0 else {})
        if rank == 0:
            write_text(os.path.join(row_dir, "vocab.json"), json.dumps(vocab, indent=0))
            top = Counter(pool_reports(pool)).most_common(1)[0][0]  # ties: the first in the training order
            texts[row] = runs
            texts[f"{row}: most-frequent"] = [{t: [top] * len(tp) for t, tp in tests.items()}]
            texts[f"{row}: nearest-neighbour"] = [{t: nearest_reports(pool, tp, device) for t, tp in tests.items()}]
    if rank != 0:
        return None
    claim_out(rank)
    # every report of every system through the labeller in one call: one table, row order = the order listed
    stack = [(name, k, t, i, text) for name, runs in texts.items() for k, run in enumerate(runs)
             for t in test_names for i, text in enumerate(run[t])]
    stack += [("reference", 0, t, i, text) for t in test_names for i, text in enumerate(refs[t])]
    folder = os.path.join(cfg.out, "reports")
    os.makedirs(folder, exist_ok=True)
    src, lab = os.path.join(folder, "all_reports.csv"), os.path.join(folder, "all_labels.csv")
    table = [{"id": str(j), "system": name, "run": k, "test": t, "image_id": ids[t][i], "report": text}
             for j, (name, k, t, i, text) in enumerate(stack)]
    atomic_save(src, lambda tmp: write_dict_csv(tmp, table))
    positives = report_labels(src, "report", lab)
    where = {(name, k, t): [] for name, k, t, _, _ in stack}
    for j, (name, k, t, _, _) in enumerate(stack):
        where[(name, k, t)].append(j)
    results = {}
    for name, runs in texts.items():
        results[name] = {"runs": [{t: report_metrics(run[t], refs[t], positives[where[(name, k, t)]],
                                                     positives[where[("reference", 0, t)]]) for t in test_names}
                                  for k, run in enumerate(runs)]}
    for t in test_names:                                         # every report side by side, readable
        cols = ["id", "reference"] + [f"{name} run{k}" for name, runs in texts.items() for k in range(len(runs))]
        rows = [dict(zip(cols, [ids[t][i], refs[t][i]] + [run[t][i] for runs in texts.values() for run in runs]))
                for i in range(len(refs[t]))]
        path = file_in(folder, SAFE.sub("_", t), ".csv", where="--test names")
        atomic_save(path, lambda tmp: write_dict_csv(tmp, rows))
    return finish(cfg, rank, results, report_table(results, test_names),
                  {"labeller": "prep_data.py extract-labels, positive = 1 (uncertain, negative, unmentioned: 0)"})


def write_dict_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["id"])
        w.writeheader()
        w.writerows(rows)

# ----------------------------------------------------------------------------------------------------------------
# main: task dispatch (classify is the default)


# What decides the outputs under --out (recorded in OUT/output.json; a rerun with other values is refused): every
# option except these, our choice: where and how fast it runs (--device, --compile, --cache-gb), how often it logs
# and saves, where the weights are looked up, the ROC plot's own path, and --max-steps / --finetune-steps, which a
# rerun may raise to continue the same runs (the runs resume from their checkpoints).
NOT_DECIDING = ("out", "device", "compile", "resume", "log_every", "ckpt_every", "cache_gb", "dry_run", "bench",
                "roc_plot", "weights_dir", "max_steps", "finetune_steps")
# Counting flags: 0 means none / all / off for these (--micro-batch 0: no accumulation, --img-size 0: the data's
# side, --patience 0: never stop early, --n-boot 0: no CIs, --warmup 0: none, --finetune-steps 0: --max-steps);
# every other count must be at least 1.
POSITIVE = ("batch_size", "max_steps", "eval_every", "log_every", "ckpt_every", "runs", "width", "hidden", "n_pairs",
            "dec_dim", "dec_layers", "dec_heads", "max_tokens")
NON_NEGATIVE = ("micro_batch", "img_size", "patience", "n_boot", "warmup", "finetune_steps", "min_group")
CLAIM = {}                                                       # --out and its record, claimed at the first write


def checkpoint_file(path):
    """The file read_checkpoint reads for a run folder or checkpoint path (None when there is none)."""
    if os.path.isdir(path):
        path = next((os.path.join(path, f) for f in ("best.safetensors", "ckpt.safetensors")
                     if os.path.isfile(os.path.join(path, f))), "")
    return path if path and os.path.isfile(path) else None


def output_record(cfg):
    """What decides this command's outputs: the task and the options outside NOT_DECIDING, and the sha256 of the
    checkpoints it reads (--ckpt, --predictor, --init), so that a rerun with other inputs is refused."""
    record = {"command": f"downstream.py {'eval' if cfg.eval and cfg.task != 'fairness' else cfg.task}"}
    record.update({k: v for k, v in asdict(cfg).items() if k not in NOT_DECIDING})
    init = cfg.init[len("imagenet:"):] if cfg.init.startswith("imagenet:") else cfg.init
    for flag, path in (("ckpt", cfg.ckpt), ("predictor", cfg.predictor), ("init", init)):
        found = checkpoint_file(path) if path else None
        if found:
            record[f"{flag}_sha256"] = file_sha256(found)
    return record


def claim_out(rank):
    """Claim --out (claim_output) before the first write into it, once: inputs are checked first, so a refused
    command leaves no output.json behind. Every rank calls it in train (before DDP); rank 0 writes."""
    if CLAIM and not CLAIM.get("done"):
        claim_output(CLAIM["out"], CLAIM["record"], mine=("results.json",), write=rank == 0)
        CLAIM["done"] = True


RUNNERS = {"classify": task_classify, "pretrain-finetune": task_pretrain_finetune, "fairness": task_fairness,
           "segment": task_segment, "predict-metadata": task_predict_metadata, "edit-eval": task_edit_eval,
           "cond-eval": task_cond_eval, "report-gen": task_report_gen}


def plan_memory(cfg, n_out):
    """The memory_plan of one training micro-batch of `cfg` as train() runs it on a GPU: bf16 autocast, AdamW, no
    EMA (train() keeps the best-validation weights on disk, not a second copy), the task's loss. The micro-batch is
    train()'s for WORLD_SIZE processes (1 unless set); the side is --img-size, else 224 (as bench(): without data
    the first source's size is unknown). None where the walk does not apply: the CNN tasks only (the metadata
    predictor's frozen encoder comes from metrics.py's weights, the report model is not planned; our choice)."""
    if cfg.task not in ("classify", "pretrain-finetune", "fairness", "segment"):
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro, S, seg = batch_split(cfg.batch_size, cfg.micro_batch, world)[0], cfg.img_size or 224, cfg.task == "segment"

    def build(grad_ckpt):                                        # the CNNs have no activation checkpointing
        with torch.device("meta"):
            model = build_model(cfg, n_out).train()

        def loss_fn():                                           # a micro-batch on the meta device (see train())
            x = torch.randn(micro, 1, S, S, device="meta")
            if seg:
                return seg_loss(model(x), torch.zeros(micro, 1, S, S, device="meta"), cfg.pos_weight)
            return masked_bce(model(x), torch.zeros(micro, n_out, device="meta"))
        return model, loss_fn
    return memory_plan(build, micro, world, ema=False)


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    check_counts(cfg, POSITIVE, NON_NEGATIVE)
    for name in ("syn_ratio", "cache_gb"):
        if not getattr(cfg, name) >= 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected a number >= 0")
    CLAIM.clear()
    if cfg.dry_run:
        n_out = 1 if cfg.task == "segment" else len(resolve_labels(cfg))
        with torch.device("meta"):
            n = sum(p.numel() for p in build_model(cfg, n_out).parameters())
        print(json.dumps(asdict(cfg)) + f"\n{cfg.arch}: {n:,} parameters, {n_out} output(s)")
        if cfg.task in ("classify", "pretrain-finetune", "fairness", "segment"):
            print(f"{cfg.arch} at {cfg.img_size or 224} px (--img-size; 224 without it), no EMA, no --grad-ckpt in "
                  f"downstream.py: the two activation columns below are the same")
            print_memory_plan(plan_memory(cfg, n_out))
        else:
            print(f"GPU memory per rank: not planned for --task {cfg.task} (the CNN tasks only)")
        return n
    if cfg.bench:
        return bench(cfg)
    if cfg.eval and cfg.task == RG:
        raise SystemExit("--eval: not for report-gen (it scores its test sets after training); expected no --eval")
    if cfg.eval and not cfg.ckpt:
        raise SystemExit("--eval: expected --ckpt RUN (a run folder or checkpoint of downstream.py)")
    if cfg.roc_plot and (not cfg.roc_plot.lower().endswith(".png") or any(os.path.exists(os.path.join(
            os.path.dirname(os.path.abspath(cfg.roc_plot)), m)) for m in ("info.json", "shards"))):
        raise SystemExit(f"--roc-plot {cfg.roc_plot}: expected a .png file name outside any dataset folder")
    CLAIM.update(out=cfg.out, record=output_record(cfg))
    claim_output(cfg.out, CLAIM["record"], mine=("results.json",), write=False)   # refuse now, write at first use
    return (task_eval if cfg.eval and cfg.task != "fairness" else RUNNERS[cfg.task])(cfg)


if __name__ == "__main__":
    main()

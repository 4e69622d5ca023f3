"""flow_scm.py: continuous-time flow structural causal model over the 19 CXR metadata variables (radit §4.3, B.3).

Each of the 19 variables (14 CheXpert findings, sex, race, view, dataset, age) is one rectified flow (radit Eq. 4-5):
categorical variables flow in one-hot space over their non-missing classes, age flows on its standardised value.
Every flow is an MLP of 3 residual blocks (radit Eq. 8) conditioned on a magnitude-preserving sum of its causal
parents' embeddings (radit Eq. 6-7); the graph is the pulmonologists' graph of radit Table 1. All 19 flows train
jointly; sampling, do() interventions and counterfactuals (abduction-action-prediction, radit Eq. 9-11) solve the
flows ancestrally in topological order with a dopri5 or Euler solver written below.

Flow convention (the paper's equation bodies are missing from our copy; we use the standard rectified flow):
    x_t = (1 - t) x0 + t x1,  x0 ~ N(0, I) the exogenous noise (t = 0),  x1 the one-hot / scaled data (t = 1),
    target velocity v = x1 - x0; sampling integrates t: 0 -> 1, abduction integrates t: 1 -> 0 (radit Eq. 11).
This is the opposite of rectified_flow.py, which follows radit Eq. 1 with the data at t = 0 and the noise at t = 1.

Commands:
    python flow_scm.py --size small --max-steps 3000 --out runs/scm      # train on data/phantom (CPU: ~15-30 min)
    torchrun --nproc_per_node=8 flow_scm.py --data data/cxr --out runs/scm           # the paper's width (512)
    python flow_scm.py sample --ckpt runs/scm --n 10000 --out cohort.csv
    python flow_scm.py intervene --ckpt runs/scm --set "age=80" --n 10000 --out old.csv
    python flow_scm.py counterfactual --ckpt runs/scm --data data/phantom --set "sex=F" --out profiles.csv
    python flow_scm.py counterfactual --ckpt runs/scm --data data/phantom --interventions E/meta.csv --out cf.csv
    python flow_scm.py evaluate --ckpt runs/scm --data data/phantom                   # vs the phantom's true SCM
The counterfactual CSV has the rows of meta.csv (same ids, FORMAT.md §2 schema) with the counterfactual profile, ready
for `rectified_flow.py edit --profile profiles.csv`. With --interventions (an edit plan: `id, source_id,
intervention` per row, as `rectified_flow.py edit --random-edit sex --plan-only --out E/` writes E/meta.csv) each row
gets the counterfactual of its own intervention, keyed by the plan's id, with `source_id` and `intervention` columns.
A missing value has no noise to abduct: it stays missing in the counterfactual and reaches its children as the null
embedding, as in training.

`evaluate` needs a phantom (prep_data.py): it re-implements the phantom's true SCM from info.json["scm"] (mechanisms
and noise streams, see "The phantom's true SCM" below) and the `seed` column of meta.csv, and reports TV distances of
marginals, of child | parents conditionals and of interventional distributions, and counterfactual accuracy against
the true counterfactual (same seed, do() applied), beside a no-abduction baseline.

Implementation notes: the 19 MLPs are independent but stored stacked ([19, in, out] weights) so that one batched
matmul runs them all in training; on a CPU the small flows run fastest with OMP_NUM_THREADS=1.
"""
import argparse
import csv
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import weakref
from array import array
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# ----------------------------------------------------------------------------------------------------------------
# Variables, codes and the causal graph (FORMAT.md §5-§6, radit Table 1, App. B.3.1) as data

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]
VARIABLES = LABELS + ["sex", "race", "view", "dataset", "age"]      # the 19 variables of radit §4.2, this order
CATEGORIES = {"sex": ["F", "M"], "race": ["ASIAN", "BLACK", "WHITE"], "view": ["PA", "AP", "LATERAL"]}
LABEL_VALUES = ["0", "1", "-1"]                                      # codes 1 negative, 2 positive, 3 uncertain
META_COLUMNS = (["id", "patient_id", "study_id", "split", "dataset", "view", "sex", "age", "race"] + LABELS +
                ["report", "findings", "shard", "index", "source_path"])
A, S, R = "age", "sex", "race"
GRAPH = {                                                            # child: parents (radit Table 1)
    "Atelectasis": ["Pleural Effusion", "Pneumonia"],
    "Cardiomegaly": [A, R, S],
    "Consolidation": ["Pneumonia"],
    "Edema": [A, R, S],
    "Enlarged Cardiomediastinum": ["Cardiomegaly"],
    "Fracture": [A, S],
    "Lung Lesion": ["Lung Opacity"],
    "Lung Opacity": ["Atelectasis", "Consolidation", "Edema", "Pleural Other"],
    "No Finding": [lab for lab in LABELS if lab != "No Finding"],
    "Pleural Effusion": ["Cardiomegaly", "Pleural Other", "Pneumonia"],
    "Pleural Other": [A, S],
    "Pneumonia": [A, S],
    "Pneumothorax": [A, S, "Fracture"],
    "Support Devices": ["Pleural Effusion", "Pneumothorax"],
}   # age, sex, race, view, dataset are roots
# radit App. B.3.1: pneumothorax <-> support devices is bidirectional (a drain treats a pneumothorax, a central line
# causes one); the user picks one direction. Table 1 lists Pneumothorax as a parent of Support Devices.
CYCLE_CHOICES = {"ptx->sd": ("Pneumothorax", "Support Devices"), "sd->ptx": ("Support Devices", "Pneumothorax")}


def resolve_graph(graph_path="", cycle="ptx->sd"):
    """Parents of every variable: Table 1 with the PTX/SD cycle resolved, or a user's graph.json (validated)."""
    if graph_path:
        try:
            with open(graph_path) as f:
                user = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--graph {graph_path}: cannot read a JSON object {{child: [parents]}} ({e})") from None
        if not isinstance(user, dict) or not all(isinstance(p, list) for p in user.values()):
            raise SystemExit(f"--graph {graph_path}: expected a JSON object {{child: [parent, ...]}}")
        for node in list(user) + [p for ps in user.values() for p in ps]:
            if node not in VARIABLES:
                raise SystemExit(f"--graph {graph_path}: unknown node {node!r}; expected one of {VARIABLES}")
        parents = {v: list(dict.fromkeys(user.get(v, []))) for v in VARIABLES}
    else:
        if cycle not in CYCLE_CHOICES:
            raise SystemExit(f"--cycle {cycle!r}; expected one of {list(CYCLE_CHOICES)}")
        parents = {v: list(GRAPH.get(v, [])) for v in VARIABLES}
        cause, effect = CYCLE_CHOICES[cycle]
        parents[cause] = [p for p in parents[cause] if p != effect]
        parents[effect] = list(dict.fromkeys(parents[effect] + [cause]))
    topological_order(parents, where=graph_path or "the causal graph")
    return parents


def topological_order(parents, where="the causal graph"):
    """Variables with every parent before its children (Kahn's algorithm); a one-line error names a cycle."""
    order, placed = [], set()
    while len(order) < len(VARIABLES):
        ready = [v for v in VARIABLES if v not in placed and all(p in placed for p in parents[v])]
        if not ready:
            raise SystemExit(f"{where}: has a cycle among {sorted(set(VARIABLES) - placed)}; "
                             f"a structural causal model needs a DAG")
        order += ready
        placed.update(ready)
    return order


def descendants(parents, roots):
    """All variables reachable from `roots` along parent -> child edges (the roots excluded)."""
    found, frontier = set(), set(roots)
    while frontier:
        frontier = {c for c in VARIABLES if any(p in frontier for p in parents[c])} - found
        found |= frontier
    return found - set(roots)


def n_classes(var, datasets):
    """Dimension of a variable's flow: its non-missing classes (labels: neg/pos/unc), 1 for age."""
    return 1 if var == "age" else 3 if var in LABELS else len(datasets) if var == "dataset" else len(CATEGORIES[var])


def encode(var, text, datasets, where=""):
    """meta.csv string -> code (0 missing; FORMAT.md §5) or age in years (NaN missing)."""
    text = (text or "").strip()
    if var == "age":                                             # one rule for every age (meta.csv, --set, plans)
        return check_age(text, where)
    if not text:
        return 0
    levels = LABEL_VALUES if var in LABELS else datasets if var == "dataset" else CATEGORIES[var]
    if var in LABELS and text in ("1.0", "0.0", "-1.0"):
        text = text[:-2]
    upper = [x.upper() for x in levels]
    if text.upper() not in upper:
        raise SystemExit(f"{where}: {var}={text!r}; expected one of {levels} or empty")
    return upper.index(text.upper()) + 1


def decode(var, value, datasets):
    """code (or age) -> meta.csv string."""
    if var == "age":
        return "" if not np.isfinite(value) else f"{float(value):.1f}"
    code = int(value)
    if code == 0:
        return ""
    levels = LABEL_VALUES if var in LABELS else datasets if var == "dataset" else CATEGORIES[var]
    return levels[code - 1]


def parse_set(text, datasets):
    """--set "sex=F,age=80,Pneumonia=1" -> {variable: code or age}; one-line errors on anything unknown."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, eq, value = (s.strip() for s in part.partition("="))
        match = [v for v in VARIABLES if v.lower() == name.lower()]
        if not eq or not match:
            raise SystemExit(f"--set: unknown variable {name!r} in {part!r}; expected one of {VARIABLES}")
        code = encode(match[0], value, datasets, where="--set") if value else math.nan
        if not value or (match[0] == "age" and math.isnan(code)):
            raise SystemExit(f"--set: {part!r} has no value (an intervention cannot set a value to missing)")
        out[match[0]] = code
    if not out:
        raise SystemExit(f"--set: {text!r} names no intervention; expected e.g. \"age=80\" or \"sex=F,Pneumonia=1\"")
    return out

# ----------------------------------------------------------------------------------------------------------------
# Config: one dataclass, size presets, CLI generated from the fields


# --- skeleton: cli (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def arg(default, help, only=None, alias=None):
    """A dataclass field with its CLI help string. `only`: the comma-separated subcommands that take it (None: all;
    'none': no flag, the script resolves the value); `alias`: a second spelling of the flag."""
    return field(default=default, metadata={"help": help, "only": only, "alias": alias})


def build_parser(cls, prog, doc, only=None):
    """argparse from dataclass fields: dashes on the CLI, defaults and help shown, booleans get --no-X."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        scope = f.metadata["only"]
        if scope is not None and only not in scope.split(","):
            continue
        preset = " (set by --size)" if any(f.name in v for v in PRESETS.values()) and cls is Config else ""
        kw = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} [default: {f.default}{preset}]", dest=f.name)
        flags = ["--" + f.name.replace("_", "-")] + ([f.metadata["alias"]] if f.metadata["alias"] else [])
        if isinstance(f.default, bool):
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(*flags, type=type(f.default), **kw)
    return p
# --- end skeleton: cli ---


@dataclass
class Config:
    """Model and training configuration; stored in every checkpoint."""
    data: str = arg("data/phantom", "dataset folder (meta.csv; info.json for the dataset names)")
    out: str = arg("runs/flow_scm", "run folder: checkpoints, log.jsonl, config.json")
    size: str = arg("base", "preset: tiny | small | base (radit App. B.3.2: width 512)")
    width: int = arg(512, "hidden width of each flow MLP (radit App. B.3.2)")
    depth: int = arg(3, "residual blocks per flow MLP (radit App. B.3.2)")
    emb_dim: int = arg(128, "parent embedding dimension d (not stated in radit; our choice)")
    fourier: int = arg(64, "Fourier features of age (EDM2 MPFourier, radit App. B.3.2)")
    cycle: str = arg("ptx->sd", "resolve the Pneumothorax <-> Support Devices cycle (radit App. B.3.1)")
    graph: str = arg("", "graph.json {child: [parents]} replacing radit Table 1")
    batch_size: int = arg(1024, "global batch (rows of meta.csv)")
    micro_batch: int = arg(0, "rows per process per micro-step (0: batch_size / world, no accumulation)")
    max_steps: int = arg(20000, "optimiser steps")
    lr: float = arg(1e-3, "AdamW learning rate (not stated in radit; our choice)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    warmup: int = arg(200, "linear learning-rate warm-up steps")
    clip: float = arg(1.0, "gradient-norm clipping (the old spelling grad-clip is still accepted)")
    ema: float = arg(0.999, "EMA decay (with the (1+s)/(10+s) warm-up)")
    seed: int = arg(0, "seed of data order, noise and initialisation")
    split: str = arg("train", "meta.csv split to train on ('all' for every row)")
    device: str = arg("", "cpu | cuda ('' picks cuda when available)")
    compile: bool = arg(False, "torch.compile the model")
    grad_ckpt: bool = arg(False, "activation checkpointing in the residual blocks")
    resume: bool = arg(True, "continue from the checkpoint in --out (--no-resume starts over)")
    log_every: int = arg(50, "steps between log lines")
    ckpt_every: int = arg(1000, "steps between checkpoints")
    sample_every: int = arg(0, "steps between sampled-cohort prevalence checks (0: off)")
    bench: bool = arg(False, "time a few steps on random tensors and exit")
    dry_run: bool = arg(False, "build the model, print config and parameter count, exit")


PRESETS = {
    "tiny": dict(width=32, emb_dim=16, fourier=16, batch_size=256, lr=3e-3, warmup=20, ema=0.99),   # tests
    "small": dict(width=128, emb_dim=64, fourier=32, batch_size=512, lr=2e-3),                   # phantom on CPU
    "base": dict(width=512, emb_dim=128, fourier=64),                                              # radit App. B.3.2
}


def parse_config(argv):
    """Config = dataclass defaults, then the --size preset, then the flags given explicitly (the cli piece's
    parser); --grad-clip, the old spelling of --clip, is still read and not listed."""
    parser = build_parser(Config, "flow_scm.py [train]", __doc__)
    parser.add_argument("--grad-clip", dest="clip", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    given = vars(parser.parse_args(argv))
    size = given.get("size", Config.size)
    if size not in PRESETS:
        raise SystemExit(f"--size {size!r}; expected one of {list(PRESETS)}")
    return Config(**{**PRESETS[size], **given, "size": size})

# ----------------------------------------------------------------------------------------------------------------
# Model: 19 flow MLPs with parent-embedding conditioning (radit App. B.3.2, Eq. 6-8)


class MPFourier(nn.Module):
    """EDM2 magnitude-preserving Fourier features (fixed random frequencies and phases), used for age."""

    def __init__(self, channels, bandwidth=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))

    def forward(self, x):
        return (x.to(self.freqs.dtype)[:, None] * self.freqs + self.phases).cos() * math.sqrt(2)   # fp32


class GroupedLinear(nn.Module):
    """G independent linear layers (one per flow) run as one batched matmul: x [G, B, in] -> [G, B, out]."""

    def __init__(self, groups, fan_in, fan_out, zero=False):
        super().__init__()
        bound = 0.0 if zero else 1 / math.sqrt(fan_in)                # nn.Linear's default init, or zeros
        self.weight = nn.Parameter(torch.empty(groups, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x, idx=None):
        w, b = (self.weight, self.bias) if idx is None else (self.weight[idx], self.bias[idx])
        return torch.baddbmm(b.to(x.dtype), x, w.to(x.dtype))


class GroupedLayerNorm(nn.Module):
    """LayerNorm with a separate affine transform per flow."""

    def __init__(self, groups, width):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(groups, 1, width)), nn.Parameter(torch.zeros(groups, 1, width))

    def forward(self, x, idx=None):
        w, b = (self.weight, self.bias) if idx is None else (self.weight[idx], self.bias[idx])
        y = F.layer_norm(x.to(torch.promote_types(x.dtype, torch.float32)), x.shape[-1:])   # norms in >= fp32
        return y.to(x.dtype) * w.to(x.dtype) + b.to(x.dtype)


class ResBlock(nn.Module):
    """h + W2 SiLU(W1 LN(h)) with W2 zero-initialised, so each block starts as the identity (radit Eq. 8)."""

    def __init__(self, groups, width):
        super().__init__()
        self.norm = GroupedLayerNorm(groups, width)
        self.fc1, self.fc2 = GroupedLinear(groups, width, width), GroupedLinear(groups, width, width, zero=True)

    def forward(self, h, idx=None):
        return h + self.fc2(F.silu(self.fc1(self.norm(h, idx), idx)), idx)


class FlowMLPs(nn.Module):
    """The 19 flow MLPs of radit App. B.3.2, stacked so that one batched matmul runs all of them (or a subset):
    concat(t, x_t, parent conditioning) -> SiLU(Linear) -> 3 residual blocks -> LayerNorm + Linear -> velocity.
    x_t is zero-padded to the largest one-hot dimension; padded inputs meet zero activations and padded outputs are
    ignored, so each flow is exactly an independent MLP over its own K_v dimensions."""

    def __init__(self, groups, dim, emb_dim, width, depth, grad_ckpt=False):
        super().__init__()
        self.proj = GroupedLinear(groups, 1 + dim + emb_dim, width)
        self.blocks = nn.ModuleList(ResBlock(groups, width) for _ in range(depth))
        self.norm, self.head = GroupedLayerNorm(groups, width), GroupedLinear(groups, width, dim)
        self.grad_ckpt = grad_ckpt

    def forward(self, t, x, cond, idx=None):
        """t [G, B], x [G, B, dim], cond [G, B, emb_dim] -> velocity [G, B, dim]."""
        h = F.silu(self.proj(torch.cat([t[..., None].to(x.dtype), x, cond.to(x.dtype)], dim=-1), idx))
        for blk in self.blocks:
            if self.grad_ckpt and self.training:
                h = torch.utils.checkpoint.checkpoint(blk, h, idx, use_reentrant=False)
            else:
                h = blk(h, idx)
        return self.head(self.norm(h, idx), idx)


def key(var):
    """Module name of a variable (no spaces)."""
    return var.replace(" ", "_")


class FlowSCM(nn.Module):
    """The 19 flows, the parent embeddings (a table per categorical parent, Fourier + MLP for age) and the graph."""

    def __init__(self, parents, datasets, cfg, age_mean=60.0, age_std=20.0):
        super().__init__()
        self.parents, self.datasets, self.order = parents, list(datasets), topological_order(parents)
        self.dims = {v: n_classes(v, datasets) for v in VARIABLES}
        self.dim = max(self.dims.values())
        self.used = sorted({p for ps in parents.values() for p in ps}, key=VARIABLES.index)  # parents get embeddings
        self.emb = nn.ModuleDict()
        for v in self.used:
            if v == "age":
                self.emb[key(v)] = nn.Sequential(nn.Linear(cfg.fourier, cfg.emb_dim), nn.SiLU(),
                                                 nn.Linear(cfg.emb_dim, cfg.emb_dim))
            else:       # row 0 is the null embedding of a missing value (FORMAT.md §5)
                self.emb[key(v)] = nn.Embedding(self.dims[v] + 1, cfg.emb_dim)
        if "age" in self.used:
            self.age_fourier = MPFourier(cfg.fourier)
            self.age_null = nn.Parameter(torch.randn(cfg.emb_dim) * 0.1)
        self.flows = FlowMLPs(len(VARIABLES), self.dim, cfg.emb_dim, cfg.width, cfg.depth, cfg.grad_ckpt)
        self.emb_dim = cfg.emb_dim
        # age flows on its standardised value; the statistics of the training data travel with the weights
        self.register_buffer("age_stats", torch.tensor([age_mean, age_std], dtype=torch.float32))
        # Eq. 7 for all flows at once: cond[v] = sum_p mix[v, p] e_p with mix = 1/sqrt(|pa(v)|) on the parents
        mix = torch.zeros(len(VARIABLES), max(1, len(self.used)))
        for i, v in enumerate(VARIABLES):
            for p in parents[v]:
                mix[i, self.used.index(p)] = 1 / math.sqrt(len(parents[v]))
        self.register_buffer("mix", mix, persistent=False)
        dmask = torch.tensor([[1.0] * self.dims[v] + [0.0] * (self.dim - self.dims[v]) for v in VARIABLES])
        self.register_buffer("dmask", dmask[:, None, :], persistent=False)              # [19, 1, dim]

    def embed(self, var, value):
        """Parent embedding e_var of codes (0 = null) or ages in years (NaN = null)."""
        if var == "age":
            ok = torch.isfinite(value)
            a = (torch.where(ok, value, torch.zeros_like(value)) - self.age_stats[0]) / self.age_stats[1]
            return torch.where(ok[:, None], self.emb["age"](self.age_fourier(a)), self.age_null)
        return self.emb[key(var)](value.long())

    def condition(self, var, values, n):
        """Magnitude-preserving scaled sum of the parents' embeddings (radit Eq. 6-7): sum_p e_p / sqrt(|pa|)."""
        ps = self.parents[var]
        if not ps:                                                   # roots: a flow with no conditioning
            return self.age_stats.new_zeros(n, self.emb_dim)
        return sum(self.embed(p, values[p]) for p in ps) / math.sqrt(len(ps))

    def condition_all(self, values, n):
        """`condition` of all 19 flows at once: [19, B, emb_dim]."""
        if not self.used:
            return self.age_stats.new_zeros(len(VARIABLES), n, self.emb_dim)
        e = torch.stack([self.embed(p, values[p]) for p in self.used])              # [P, B, d]
        return torch.einsum("vp,pbd->vbd", self.mix.to(e.dtype), e)

    def velocity(self, var, t, x, cond):
        """Velocity of one variable's flow: t [B], x [B, K_v], cond [B, d] -> [B, K_v]."""
        i, k = VARIABLES.index(var), self.dims[var]
        x = F.pad(x, (0, self.dim - k))
        return self.flows(t[None], x[None], cond[None], idx=[i])[0, :, :k]

    def to_flow(self, var, value):
        """Data point x1 of a variable: one-hot over its non-missing classes, or standardised age."""
        if var == "age":
            return ((value - self.age_stats[0]) / self.age_stats[1])[:, None]
        return F.one_hot((value.long() - 1).clamp(min=0), self.dims[var]).float()

    def from_flow(self, var, x):
        """ODE output -> value: argmax over the categories (radit Eq. 10), or age in years."""
        if var == "age":
            return x[:, 0] * self.age_stats[1] + self.age_stats[0]
        return (x.argmax(dim=1) + 1).float()

    def observed(self, var, value):
        return torch.isfinite(value) if var == "age" else value > 0

    def forward(self, values, noise, t):
        """Training forward (what DDP and torch.compile wrap): the per-row flow-matching errors."""
        return flow_loss(self, values, noise, t)

# ----------------------------------------------------------------------------------------------------------------
# The method: rectified-flow matching (radit Eq. 5), ODE solvers, sampling, interventions, counterfactuals


def flow_loss(model, values, noise, t):
    """Rectified-flow matching (radit Eq. 5): ||v(t, x_t | pa) - (x1 - x0)||^2 per row and variable, all 19 flows
    in one pass. values: {var: [B] codes / ages}; noise: {var: [B, K_v]} x0; t: [B, 19] (one time per variable).

    Returns (err [B, 19], observed [B, 19]); err is the mean over the variable's K_v dimensions. Missing values add
    nothing to their own variable's loss (err is zeroed there) and reach the children as the null embedding
    through `condition_all`. The caller normalises by the observed counts of the whole global batch.
    """
    pad = lambda v, x: F.pad(x, (0, model.dim - x.shape[1]))
    x1 = torch.stack([pad(v, model.to_flow(v, torch.nan_to_num(values[v]))) for v in VARIABLES])    # [19, B, dim]
    x0 = torch.stack([pad(v, noise[v]) for v in VARIABLES])
    ok = torch.stack([model.observed(v, values[v]) for v in VARIABLES], 1).float()                 # [B, 19]
    tt = t.T                                                                                        # [19, B]
    xt = (1 - tt[..., None]) * x0 + tt[..., None] * x1
    vel = model.flows(tt, xt, model.condition_all(values, t.shape[0]))
    k = model.dmask.sum(-1)                                                                         # [19, 1]
    err = ((vel.float() - (x1 - x0)).pow(2) * model.dmask).sum(-1) / k                              # [19, B]
    return err.T * ok, ok


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980; the dopri5 of torchdiffeq, radit App. C.4)
DP_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
DP_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
        [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
DP_B = DP_A[6] + [0.0]                                               # 5th order (FSAL: k7 = f at the new point)
DP_E = [b - e for b, e in zip(DP_B, [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100,
                                     1 / 40])]                       # 5th minus embedded 4th order weights


def dopri5(f, x, t0, t1, rtol=1e-6, atol=1e-6, max_steps=100000):
    """Adaptive Dormand-Prince 5(4) from t0 to t1 (either direction); error = worst row's RMS of err / tolerance.

    Returns (x(t1), number of function evaluations). Step control as Hairer, Norsett & Wanner (II.4).
    """
    direction = 1.0 if t1 >= t0 else -1.0
    tt = lambda s: torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
    norm = lambda y, scale: (y / scale).pow(2).flatten(1).mean(dim=1).sqrt().max().item() if y.numel() else 0.0
    k1, nfe, t = f(tt(t0), x), 1, t0
    scale = atol + rtol * x.abs()
    d0, d1 = norm(x, scale), norm(k1, scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    k2 = f(tt(t0 + direction * h0), x + direction * h0 * k1)
    nfe += 1
    d2 = norm(k2 - k1, scale) / h0
    h = min(100 * h0, (0.01 / max(d1, d2)) ** 0.2 if max(d1, d2) > 1e-15 else max(1e-6, h0 * 1e-3), abs(t1 - t0))
    for _ in range(max_steps):
        if direction * (t1 - t) <= 1e-12:
            return x, nfe
        h = min(h, abs(t1 - t))
        dt = direction * h
        ks = [k1]
        for i in range(1, 7):
            xi = x + dt * sum(a * k for a, k in zip(DP_A[i], ks) if a != 0.0)
            ks.append(f(tt(t + DP_C[i] * dt), xi))
        nfe += 6
        x_new = x + dt * sum(b * k for b, k in zip(DP_B, ks) if b != 0.0)
        err = dt * sum(e * k for e, k in zip(DP_E, ks) if e != 0.0)
        e = norm(err, atol + rtol * torch.maximum(x.abs(), x_new.abs()))
        if not math.isfinite(e):
            raise FloatingPointError(f"dopri5: non-finite state at t={t:.6f}")
        if e <= 1.0:                                                 # accept; FSAL reuses the last stage
            t, x, k1 = t + dt, x_new, ks[6]
        h *= min(10.0, max(0.2, 0.9 * (e if e > 0 else 1e-10) ** -0.2))
    raise RuntimeError(f"dopri5: more than {max_steps} steps between t={t0} and t={t1} (raise the tolerances)")


def euler(f, x, t0, t1, steps=32):
    """Fixed-step Euler from t0 to t1 (either direction)."""
    ts = torch.linspace(t0, t1, steps + 1).tolist()
    for a, b in zip(ts[:-1], ts[1:]):
        x = x + (b - a) * f(torch.full((x.shape[0],), a, dtype=x.dtype, device=x.device), x)
    return x, steps


@dataclass
class Solver:
    """ODE solver settings: dopri5 with atol = rtol = 1e-6 for the SCM (radit App. C.4), or fixed-step Euler."""
    name: str = "dopri5"
    rtol: float = 1e-6
    atol: float = 1e-6
    steps: int = 32

    def __call__(self, f, x, t0, t1):
        if self.name == "euler":
            return euler(f, x, t0, t1, self.steps)[0]
        return dopri5(f, x, t0, t1, self.rtol, self.atol)[0]


def noise_for(model, n, seed, device):
    """Exogenous x0 ~ N(0, I) of every variable for n units, drawn in a fixed order from one seed, so that the
    noise of a variable does not depend on which others are intervened upon or observed."""
    g = torch.Generator().manual_seed(seed)
    return {v: torch.randn(n, model.dims[v], generator=g).to(device) for v in VARIABLES}


@torch.no_grad()
def solve_var(model, var, x, values, solver, forward=True):
    """Integrate one variable's flow given its parents' values: noise -> data (forward) or data -> noise."""
    cond = model.condition(var, values, x.shape[0])
    f = lambda t, y: model.velocity(var, t, y, cond).float()
    return solver(f, x, 0.0, 1.0) if forward else solver(f, x, 1.0, 0.0)


@torch.no_grad()
def sample_values(model, n, solver, seed=0, intervention=None, fixed=None, device="cpu"):
    """Ancestral sampling in topological order (radit Eq. 9-10), under do(intervention) (radit App. B.3.2).

    Intervened variables are set and detached from their parents (no ODE solve); `fixed` holds values of
    non-intervened variables to keep as they are (the no-abduction baseline keeps the non-descendants).
    """
    intervention, fixed = intervention or {}, fixed or {}
    noise, values = noise_for(model, n, seed, device), {}
    for var in model.order:
        if var in intervention:
            values[var] = torch.full((n,), float(intervention[var]), device=device)
        elif var in fixed:
            values[var] = fixed[var].float().to(device)
        else:
            values[var] = model.from_flow(var, solve_var(model, var, noise[var], values, solver))
    return values


@torch.no_grad()
def counterfactual_values(model, observed, intervention, solver):
    """Abduction-action-prediction (radit Eq. 11, Pearl 2009) in topological order.

    Abduction: each observed variable's exogenous noise is its flow integrated backward (t: 1 -> 0) from its
    observed one-hot / value, given its observed parents. Action: intervened variables are set. Prediction: every
    other observed variable is integrated forward from its noise given its counterfactual parents, then argmax.
    A missing value has no noise to abduct: it stays missing and reaches its children as the null embedding.
    """
    n = next(iter(observed.values())).shape[0]
    cf = {}
    for var in model.order:
        obs = observed[var]
        if var in intervention:
            cf[var] = torch.full((n,), float(intervention[var]), device=obs.device)
            continue
        ok = model.observed(var, obs)
        u = solve_var(model, var, model.to_flow(var, torch.nan_to_num(obs)), observed, solver, forward=False)
        pred = model.from_flow(var, solve_var(model, var, u, cf, solver))
        cf[var] = torch.where(ok, pred, obs)
    return cf

# ----------------------------------------------------------------------------------------------------------------
# Data: meta.csv rows -> codes (FORMAT.md §5); deterministic batches in (seed, step), sharded by rank


def read_rows(data_dir, split=None):
    """meta.csv rows (dicts of strings, of `split` unless it is None or 'all') and its columns; one-line errors
    (read_meta) for a missing file, missing columns (the 19 variables; `split` when one is selected), ragged rows,
    invalid or duplicate ids."""
    return read_meta(os.path.join(data_dir, "meta.csv"), required=VARIABLES, split=split,
                     what="a dataset folder written by prep_data.py")


def dataset_names(data_dir, rows):
    """Dataset names in info.json["datasets"] order (codes 1..K); without info.json, sorted names in meta.csv."""
    path = os.path.join(data_dir, "info.json")
    if os.path.isfile(path):
        names = read_json(path, "the dataset's info.json").get("datasets")
        if names:
            return list(names)
    return sorted({r["dataset"] for r in rows if r["dataset"]}) or ["unknown"]


def read_json(path, what):
    """A JSON object from a file; one line naming the file when it is missing, unreadable or not an object."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected {what}")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"{path}: not readable JSON ({e}); expected {what}") from None
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: a JSON {type(obj).__name__}; expected {what} (an object)")
    return obj


def encode_rows(rows, datasets, where):
    """{var: float64 array of codes / ages} for a list of meta.csv rows (the inference commands' rows)."""
    return {v: np.array([encode(v, r[v], datasets, f"{where} row id={r.get('id', i)!r}") for i, r in enumerate(rows)],
                        np.float64) for v in VARIABLES}


def read_codes(data_dir, split=None):
    """What training reads of DIR/meta.csv, as one array (issue 21: never a dict per row; a million rows take 76 MB):
    -> (datasets, codes, source) with codes float32 [n, 19] of the rows of `split` (None or 'all': every row), in
    VARIABLES order: 18 integer codes (0 missing), then age in years (NaN missing); source 'index' or 'meta.csv'.
    From DIR/meta_index.safetensors when it holds meta.csv as it is and info.json names the datasets
    (read_meta_index), else parsed from meta.csv once (scm_columns). Either way the codes, the rows and their order
    are those that encode_rows gives for read_rows' rows (tests/test_meta_index.py), and so are the errors."""
    path = os.path.join(data_dir, "meta.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected a dataset folder written by prep_data.py")
    info = os.path.join(data_dir, "info.json")
    datasets = list(read_json(info, "the dataset's info.json").get("datasets") or []) if os.path.isfile(info) else []
    cols = read_meta_index(data_dir, datasets) if datasets else None
    if cols is None:
        datasets, codes = scm_columns(data_dir, datasets or None, split)
        return datasets, codes, "meta.csv"
    absent_columns(path, cols["columns"], split)                 # read_meta's words: the split column
    keep = slice(None)
    if split not in (None, "all"):
        keep = cols["split"] == (cols["splits"].index(split) if split in cols["splits"] else -1)
    codes = np.concatenate([cols["codes"][keep].astype(np.float32), cols["age"][keep, None]], 1)
    return datasets, codes, "index"


def scm_columns(data_dir, datasets, split):
    """DIR/meta.csv parsed once into read_codes' [n, 19] array, with read_rows' checks (the columns; a row with more
    or fewer cells; ids, each a file name and once, over every row) and encode's rules for the rows of `split` only
    (case-insensitive, labels written as floats; the first error of the first variable in VARIABLES order, at its
    first row, as encode_rows stops). Each distinct cell of a column is encoded once. datasets None (no info.json):
    the sorted dataset names of those rows (dataset_names). -> (datasets, codes). The meta_index piece's meta_arrays
    does not serve here: it is case-sensitive, needs the datasets up front and the shard / index columns, which
    flow_scm.py does not read."""
    path, where = os.path.join(data_dir, "meta.csv"), f"{data_dir}/meta.csv"
    what = "a dataset folder written by prep_data.py"
    memo = [{} for _ in VARIABLES]                               # per variable: raw cell -> code or age
    errors = [None] * len(VARIABLES)                             # per variable: its first bad row's message
    names, first_id = {}, {}                                     # raw dataset cell -> provisional code, its first id
    codes = bytearray()                                          # 18 codes a kept row (dataset: provisional)
    ages = array("f")                                            # (float32: what training reads)
    ids = []
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            columns = next(reader, [])
            needed = ["id", *VARIABLES] + (["split"] if split not in (None, "all") else [])
            absent = [c for c in dict.fromkeys(needed) if c not in columns]
            if absent:
                raise SystemExit(f"{path}: no column(s) {', '.join(absent)}; expected FORMAT.md §2 columns")
            at = [columns.index(v) for v in VARIABLES]
            i_id = columns.index("id")
            i_split = columns.index("split") if split not in (None, "all") else None
            for r in meta_csv_rows(path, reader, columns):
                ids.append(r[i_id])
                if i_split is not None and r[i_split] != split:
                    continue
                for k, j in enumerate(at):
                    cell = r[j]
                    if k == 17:                                  # datasets are coded once all names are known
                        if cell not in names:
                            names[cell] = len(names)
                            first_id[cell] = r[i_id]
                            if len(names) > 255:
                                raise SystemExit(f"{path}: over 255 different dataset values; expected FORMAT.md §5 "
                                                 f"names")
                        codes.append(names[cell])
                        continue
                    value = memo[k].get(cell)
                    if value is None:
                        try:
                            value = memo[k][cell] = encode(VARIABLES[k], cell, datasets, f"{where} row id={r[i_id]!r}")
                        except SystemExit as e:
                            errors[k] = errors[k] or str(e)
                            value = math.nan if k == 18 else 0
                    if k == 18:
                        ages.append(value)
                    else:
                        codes.append(value)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f"{path}: not a readable CSV table ({e}); expected {what}") from None
    check_ids(ids, path)
    del ids
    if datasets is None:                                         # dataset_names' rule, over the kept rows
        datasets = sorted(cell for cell in names if cell) or ["unknown"]
    final = np.zeros(max(1, len(names)), np.uint8)               # provisional -> final dataset code
    for cell, k in names.items():
        try:
            final[k] = encode("dataset", cell, datasets, f"{where} row id={first_id[cell]!r}")
        except SystemExit as e:
            errors[17] = errors[17] or str(e)
    first = next((e for e in errors if e), None)
    if first:
        raise SystemExit(first)
    table = np.frombuffer(codes, np.uint8).reshape(len(ages), 18).copy()
    table[:, 17] = final[table[:, 17]]
    return datasets, np.concatenate([table.astype(np.float32), np.frombuffer(ages, np.float32)[:, None]], 1)


@functools.lru_cache(maxsize=2)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


def batch_positions(step, batch, n, seed):
    """Row indices of global batch `step`: consecutive slices of per-epoch permutations (resume continues exactly)."""
    start, parts, got = step * batch, [], 0
    while got < batch:
        epoch, off = divmod(start + got, n)
        parts.append(epoch_permutation(n, seed, epoch)[off:off + batch - got])
        got += len(parts[-1])
    return torch.cat(parts)


def batch_noise(dims, batch, seed, step):
    """x0 and t for every row of a global batch, from (seed, step) alone: every rank slices the same tensors."""
    g = torch.Generator().manual_seed(seed * 7919 + step + 1)
    noise = {v: torch.randn(batch, dims[v], generator=g) for v in VARIABLES}
    return noise, torch.rand(batch, len(VARIABLES), generator=g)

# ----------------------------------------------------------------------------------------------------------------
# Training loop: DDP, EMA, atomic checkpoints, resume, logging, SIGTERM, NaN stop (README.md, Common flags)


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


CKPT_FORMAT = "flow_scm/1"
CKPT_WHAT = ("a flow_scm.py checkpoint (a run folder with latest.json, or a ckpt-*.safetensors file of flow_scm.py "
             "train)")


def save_checkpoint(out, step, model, ema, opt, cfg, meta):
    """ckpt-STEP.safetensors (weights, EMA, config; the checkpoint_io piece's write_checkpoint, tagged flow_scm/1) +
    ckpt-STEP.pt (optimizer, RNG), then latest.json points at them. Our choice: this script keeps its three-file
    layout (the tests and the bad-input table read latest.json and the .pt) rather than the other scripts' one file."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    md = {"config": json.dumps(dataclasses.asdict(cfg)), "step": str(step),
          **{k: json.dumps(v) for k, v in meta.items()}}
    name = f"ckpt-{step:07d}"
    write_checkpoint(os.path.join(out, name + ".safetensors"), tensors, md, CKPT_FORMAT)
    state = {"step": step, "opt": opt.state_dict(), "rng": torch.get_rng_state()}
    atomic_save(os.path.join(out, name + ".pt"), lambda p: torch.save(state, p))
    # latest.json last, through atomic_save too: fsynced, the mode open() gives, and a temporary that a kill
    # leaves is a .tmp-* file that clean_temporaries removes at the next start
    atomic_save(os.path.join(out, "latest.json"), lambda p: write_json_file(p, {"step": step, "name": name}))
    for fn in os.listdir(out):                                       # keep only the newest checkpoint
        if fn.startswith("ckpt-") and not fn.startswith(name) and fn.endswith((".safetensors", ".pt")):
            os.remove(os.path.join(out, fn))


def checkpoint_path(ckpt):
    """--ckpt RUN (folder with latest.json) or a .safetensors file -> the weights file; one-line errors for a
    missing, unreadable or incomplete latest.json and for a checkpoint file it names that is not there."""
    if os.path.isdir(ckpt):
        latest = os.path.join(ckpt, "latest.json")
        if not os.path.isfile(latest):
            raise SystemExit(f"--ckpt {ckpt}: no latest.json; expected a run folder written by flow_scm.py train")
        name = read_json(latest, "flow_scm.py's latest.json {step, name}").get("name")
        if not isinstance(name, str) or not name.startswith("ckpt-") or os.sep in name or "/" in name:
            raise SystemExit(f"{latest}: name {name!r}; expected the ckpt-STEP that flow_scm.py train wrote")
        path = os.path.join(ckpt, name + ".safetensors")
        if not os.path.isfile(path):
            raise SystemExit(f"{latest}: names {path}, which does not exist; expected {CKPT_WHAT}")
        return path
    if not os.path.isfile(ckpt) or not ckpt.endswith(".safetensors"):
        raise SystemExit(f"--ckpt {ckpt}: expected a run folder or a ckpt-*.safetensors file")
    return ckpt


def read_scm_checkpoint(path, prefixes):
    """-> (metadata with config / parents / datasets decoded, {prefix: {name: tensor}}) of a ckpt-*.safetensors
    (the checkpoint_io piece's open_checkpoint); one line naming the file when it is truncated, empty, not
    safetensors, or another script's checkpoint (e.g. a rectified_flow.py one, which has no causal graph).
    A checkpoint written before the flow_scm/1 tag (no "format" in its metadata) is read by its keys."""
    try:
        with safe_open(path, "pt") as f:
            tagged = "format" in (f.metadata() or {})
    except (SafetensorError, OSError):
        tagged = True                                            # open_checkpoint names the unreadable file
    md, parts = open_checkpoint(path, CKPT_FORMAT if tagged else None, CKPT_WHAT, prefixes)
    if not all(k in md for k in ("config", "parents", "datasets", "step")):
        raise SystemExit(f"{path}: not {CKPT_WHAT} (no config / parents / datasets / step metadata)")
    try:
        md = {**md, **{k: json.loads(md[k]) for k in ("config", "parents", "datasets", "step")}}
    except ValueError as e:
        raise SystemExit(f"{path}: metadata that is not JSON ({e}); expected {CKPT_WHAT}") from None
    if "grad_clip" in md["config"]:                                  # checkpoints written before the rename
        md["config"]["clip"] = md["config"].pop("grad_clip")
    return md, parts


def read_train_state(path):
    """ckpt-STEP.pt (optimizer and RNG state, read with weights_only=True: tensors and plain containers only);
    one line naming the file when it is missing, truncated or something else."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected the optimizer state beside its .safetensors checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                       # torch.load raises many kinds on a bad file
        raise SystemExit(f"{path}: not a readable optimizer state ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); expected flow_scm.py train's ckpt-STEP.pt") \
            from None
    if not isinstance(state, dict) or not all(k in state for k in ("step", "opt", "rng")):
        raise SystemExit(f"{path}: no step / opt / rng entries; expected flow_scm.py train's ckpt-STEP.pt")
    return state


def load_model(ckpt, device="cpu", use_ema=True):
    """Rebuild the FlowSCM from the config and graph stored in a checkpoint and load (EMA) weights."""
    path = checkpoint_path(ckpt)
    prefix = "ema." if use_ema else "model."
    md, parts = read_scm_checkpoint(path, ("model.", prefix))
    try:
        cfg = Config(**md["config"])
        model = FlowSCM(md["parents"], md["datasets"], cfg)
        model.load_state_dict({**parts["model."], **parts[prefix]})
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise SystemExit(f"{path}: weights or config do not fit this flow_scm.py ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return model.to(device).eval(), cfg, int(md["step"])


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


# --- skeleton: ema_decay (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def ema_decay(step, ema):
    """EMA decay after optimizer step `step` (0-based), warmed up as min(ema, (1 + step) / (10 + step)): the
    average does not stay near the initialisation for the first 1 / (1 - ema) steps."""
    return min(ema, (1 + step) / (10 + step))
# --- end skeleton: ema_decay ---


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


# Counting flags: --sample-every 0 means no prevalence checks, --micro-batch 0 the whole per-process batch, --warmup
# 0 none; every other count must be at least 1 (a 0 would divide by zero or train nothing).
POSITIVE = ("batch_size", "max_steps", "log_every", "ckpt_every", "width", "depth", "emb_dim", "fourier")
NON_NEGATIVE = ("micro_batch", "warmup", "sample_every")


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


def plan_memory(cfg, parents, datasets, world):
    """The memory_plan of one training micro-batch of `cfg` as train() runs it on a GPU: bf16 autocast, AdamW, an
    fp32 EMA of the state (train()'s dict; its buffers, a few hundred numbers, are left out), random codes of the
    right shapes for the values (as --bench)."""
    micro = batch_split(cfg.batch_size, cfg.micro_batch, world)[0]

    def build(grad_ckpt):
        with torch.device("meta"):
            model = FlowSCM(parents, datasets, dataclasses.replace(cfg, grad_ckpt=grad_ckpt)).train()

        def loss_fn():                                           # a micro-batch on the meta device (see train())
            vals = {v: (torch.randn(micro, device="meta") if v == "age" else
                        torch.randint(0, n_classes(v, datasets) + 1, (micro,), device="meta").float())
                    for v in VARIABLES}
            noise = {v: torch.randn(micro, model.dims[v], device="meta") for v in VARIABLES}
            err, _ = model(vals, noise, torch.rand(micro, len(VARIABLES), device="meta"))
            return (err.sum(0) / micro).mean()                  # train(): over the observed counts, ~micro
        return model, loss_fn
    return memory_plan(build, micro, world)


def train(cfg):
    check_counts(cfg, POSITIVE, NON_NEGATIVE)
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    parents = resolve_graph(cfg.graph, cfg.cycle)
    if cfg.bench:
        datasets, codes = ["a", "b", "c"], None
    else:
        datasets, codes, _ = read_codes(cfg.data, cfg.split)     # [n, 19] float32, VARIABLES order
        if not len(codes):
            raise SystemExit(f"{cfg.data}/meta.csv: no rows in split {cfg.split!r}")
    # the float32 ages, as the index stores them, in float64 (whole years, as the phantom's: the float64 parse's sum)
    ages = codes[:, 18][np.isfinite(codes[:, 18])].astype(np.float64) if codes is not None else np.array([60.0, 80.0])
    age_mean, age_std = (float(ages.mean()), float(ages.std() + 1e-6)) if len(ages) > 1 else (60.0, 20.0)
    torch.manual_seed(cfg.seed)
    model = FlowSCM(parents, datasets, cfg, age_mean, age_std).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if master:
        print(json.dumps(dataclasses.asdict(cfg)))
        print(f"flow_scm: {n_params / 1e6:.3f}M parameters, 19 flows, order {model.order}")
    if cfg.dry_run:
        print_memory_plan(plan_memory(cfg, parents, datasets, world))
        return None
    micro, accum, _ = batch_split(cfg.batch_size, cfg.micro_batch, world)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    meta = {"parents": parents, "datasets": datasets}
    step, out = 0, cfg.out
    # A run folder holds this command's latest.json (or output.json); a dataset or another command's outputs are
    # refused before anything is written. Every rank checks, rank 0 writes (and removes stale .tmp-* files).
    claim_output(out, {"command": "flow_scm.py train"}, mine=("latest.json",), write=master)
    if cfg.resume and os.path.isfile(os.path.join(out, "latest.json")):    # load, then compile, then wrap in DDP
        wpath = checkpoint_path(out)
        md, parts = read_scm_checkpoint(wpath, ("model.", "ema."))
        saved = md["config"]
        for k in ("width", "depth", "emb_dim", "fourier"):
            if saved.get(k) != getattr(cfg, k):
                raise SystemExit(f"{wpath}: checkpoint has {k}={saved.get(k)} but this run has {k}={getattr(cfg, k)} "
                                 f"(another preset); use another --out or --no-resume")
        if md["parents"] != parents or md["datasets"] != datasets:
            raise SystemExit(f"{wpath}: checkpoint was trained with another graph or dataset list; use another "
                             f"--out or --no-resume")
        state = read_train_state(wpath[:-len(".safetensors")] + ".pt")
        try:
            model.load_state_dict(parts["model."])
            opt.load_state_dict(state["opt"])
            torch.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{wpath}: weights or optimizer state do not fit this model ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); use another --out or --no-resume") from None
        ema = {k: v.to(device) for k, v in parts["ema."].items()}
        step = int(state["step"])
        if master:
            print(f"resumed from {wpath} at step {step}")
    if master:
        os.makedirs(out, exist_ok=True)
        # records carry the step after the update, as the checkpoints do: keep those up to the step resumed from
        resume_log(os.path.join(out, "log.jsonl"), step)
        config = {"config": dataclasses.asdict(cfg), **meta, "torch": torch.__version__, "device": str(device),
                  "world": world, "params": n_params}
        atomic_save(os.path.join(out, "config.json"), lambda tmp: write_json_file(tmp, config))
        atomic_save(os.path.join(out, "env.json"), lambda tmp: write_json_file(tmp, environment(device, world)))
    raw = model
    net = torch.compile(model) if cfg.compile else model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    health, stopping = HealthCheck(world, device, os.path.join(out, "latest.json")), False   # SIGTERM: save next check
    n_rows = len(codes) if codes is not None else cfg.batch_size
    all_vals = torch.from_numpy(codes) if codes is not None else None          # [n, 19] float32
    # running sums, reduced only at log time (no .item() in the step): per-variable loss, loss and count per
    # timestep bin (4 bins of t), gradient norm
    acc = torch.zeros(19 + 8 + 1, device=device)
    first_bad, since_log = torch.tensor(-1, device=device), 0
    t_log, log_path = time.time(), os.path.join(out, "log.jsonl")
    history = []
    while step < cfg.max_steps:
        idx = batch_positions(step, cfg.batch_size, n_rows, cfg.seed)
        if all_vals is None:                                         # --bench: random codes of the right shapes
            g = torch.Generator().manual_seed(step)
            vals = {v: (torch.randn(cfg.batch_size, generator=g) * 17 + 60 if v == "age" else
                        torch.randint(0, n_classes(v, datasets) + 1, (cfg.batch_size,), generator=g).float())
                    for v in VARIABLES}
        else:
            picked = all_vals[idx].t().contiguous()                  # [19, batch]: one contiguous row a variable
            vals = {v: picked[k] for k, v in enumerate(VARIABLES)}
        noise, tt = batch_noise(raw.dims, cfg.batch_size, cfg.seed, step)
        counts = torch.stack([raw.observed(v, vals[v]).float().sum() for v in VARIABLES]).clamp(min=1).to(device)
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        for group in opt.param_groups:
            group["lr"] = lr
        for m in range(accum):
            sl = slice((m * world + rank) * micro, (m * world + rank + 1) * micro)   # disjoint slices per rank/step
            v_m = {v: a[sl].to(device) for v, a in vals.items()}
            n_m = {v: a[sl].to(device) for v, a in noise.items()}
            t_m = tt[sl].to(device)
            with net.no_sync() if world > 1 and m < accum - 1 else torch.enable_grad():
                with autocast(device):
                    err, ok = net(v_m, n_m, t_m)
                # per-variable mean over the observed rows of the whole global batch; DDP averages over ranks: x world
                per_var = err.sum(0) / counts
                (per_var.mean() * world).backward()
            with torch.no_grad():
                tb = (t_m * 4).long().clamp(max=3)                   # loss by timestep bin
                acc[:19] += per_var.detach()
                acc[19:23].index_add_(0, tb.flatten(), err.detach().flatten())
                acc[23:27].index_add_(0, tb.flatten(), ok.flatten())
        gnorm = nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip)
        bad = ~torch.isfinite(acc[:19].sum() + gnorm)
        first_bad = torch.where(bad & (first_bad < 0), torch.tensor(step + 1, device=device), first_bad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = ema_decay(step, cfg.ema)                             # EMA in fp32, with warm-up
        with torch.no_grad():
            for k, v in raw.state_dict().items():
                ema[k].lerp_(v.float(), 1 - decay)
        acc[27] += gnorm.detach().float()
        step, since_log = step + 1, since_log + 1
        log_now = step % cfg.log_every == 0 or step == cfg.max_steps
        ckpt_now = step % cfg.ckpt_every == 0 or step == cfg.max_steps
        if log_now or ckpt_now or step % 10 == 0:                # health check: NaN and SIGTERM, all ranks agree
            stopping = health(step, first_bad, list(ema.values()) + list(raw.parameters()))
            ckpt_now |= stopping
        if log_now:
            if world > 1:
                dist.all_reduce(acc)
                acc[:19] /= world
                acc[27] /= world
            per = (acc[:19] / since_log).tolist()
            dt = time.time() - t_log
            # the log_line piece's record: img_s counts meta.csv rows (each one image's 19 variables) per second
            rec = {"step": step, "loss": sum(per) / 19, "grad_norm": acc[27].item() / since_log, "lr": lr,
                   "img_s": since_log * cfg.batch_size / max(dt, 1e-9),
                   "eta_s": (cfg.max_steps - step) * dt / since_log,
                   "loss_by_t": [round(x, 5) for x in (acc[19:23] / acc[23:27].clamp(min=1)).tolist()],
                   "loss_by_var": {v: round(x, 5) for v, x in zip(VARIABLES, per)},
                   "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
            history.append(rec)
            if master:
                bins = "/".join(f"{x:.3f}" for x in rec["loss_by_t"])           # t in quarters of [0, 1]
                write_log(log_path, rec, log_line(rec, cfg.max_steps, [("t-bins", bins)]))
            acc.zero_()
            t_log, since_log = time.time(), 0
        if master and cfg.sample_every and step % cfg.sample_every == 0 and all_vals is not None:
            ema_model = FlowSCM(parents, datasets, cfg).to(device)   # fixed noise: the same cohort seed every time
            ema_model.load_state_dict(ema)
            s = sample_values(ema_model.eval(), 512, Solver("euler", steps=16), seed=cfg.seed, device=device)
            gap = np.mean([abs((s[v] == 2).float().mean().item() - (all_vals[:, k] == 2).float().sum().item() /
                               max(1, (all_vals[:, k] > 0).sum().item())) for k, v in enumerate(LABELS)])
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "sample_positive_rate_gap": gap}) + "\n")
        if master and not cfg.bench and ckpt_now:
            save_checkpoint(out, step, raw, ema, opt, cfg, meta)
        if stopping:                                             # the all-reduced flag: the one the save used
            break
    health.close()
    if master and stopping:
        print(f"stopped by SIGTERM at step {step}; checkpoint {checkpoint_path(out) if not cfg.bench else None}",
              flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return history

# ----------------------------------------------------------------------------------------------------------------
# Inference subcommands: sample, intervene, counterfactual, evaluate


def check_csv_out(path, inputs=(), flag="--out"):
    """--out of sample / intervene / counterfactual (and evaluate's --json): one file. Our rule: it is written
    atomically and may replace an earlier CSV the user names again (a CSV is one whole result, nothing to resume),
    but it is refused, before any work, when it is a folder, when it is one of this run's own inputs (the
    --interventions plan, an --ids file, the --data meta.csv), or when its folder holds a dataset (info.json or
    shards/) or another command's outputs (output.json; a flow_scm.py run folder is allowed): a dataset's meta.csv
    is never replaced."""
    if os.path.isdir(path):
        raise SystemExit(f"{flag} {path}: a folder; expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    for marker in ("info.json", "shards", "output.json"):
        if marker == "output.json" and os.path.isfile(os.path.join(folder, marker)):
            try:                                                 # a flow_scm.py run folder may hold its cohorts
                with open(os.path.join(folder, marker)) as f:
                    if str(json.load(f).get("command", "")).startswith("flow_scm.py"):
                        continue
            except (OSError, ValueError, AttributeError):
                pass
        if os.path.exists(os.path.join(folder, marker)):
            raise SystemExit(f"{flag} {path}: its folder holds {marker} (a dataset or another command's outputs); "
                             f"expected a file outside it")
    for i in inputs:
        if i and os.path.isfile(i) and os.path.isfile(path) and os.path.samefile(i, path):
            raise SystemExit(f"{flag} {path}: is the input {i}; expected another file")


def write_rows(path, rows, columns):
    """Write dict rows to a CSV atomically."""
    def fn(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save(path, fn)


def values_to_rows(values, datasets, prefix="scm"):
    n = len(values["age"])
    rows = [{c: "" for c in META_COLUMNS} for _ in range(n)]
    for v in VARIABLES:
        col = values[v].cpu().numpy()
        for i in range(n):
            rows[i][v] = decode(v, col[i], datasets)
    for i, r in enumerate(rows):
        r["id"] = f"{prefix}-{i:07d}"
    return rows


def chunked(fn, n, chunk):
    """Run fn(start, stop) -> {var: tensor} over chunks of rows and concatenate."""
    parts = [fn(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    return {v: torch.cat([p[v] for p in parts]) for v in parts[0]}


def check_inference_counts(args):
    """--n (rows), --chunk, --steps: positive integers (--n 0 wrote 16 rows, --n -3 none, both with exit 0)."""
    check_counts(args, positive=[k for k in ("n", "chunk", "steps", "n_truth", "n_cf", "min_group", "max_groups",
                                             "per_group") if hasattr(args, k)])
    for name in ("rtol", "atol"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name} {getattr(args, name)}: expected a positive tolerance")


def cmd_sample(args, intervention=None):
    check_csv_out(args.out)
    model, cfg, _ = load_model(args.ckpt, args.device, not args.no_ema)
    if intervention is None and getattr(args, "set", None):
        intervention = parse_set(args.set, model.datasets)
    values = chunked(lambda a, b: sample_values(model, b - a, solver_of(args), args.seed + a, intervention,
                                                device=args.device), args.n, args.chunk)
    write_rows(args.out, values_to_rows(values, model.datasets), META_COLUMNS)
    print(f"wrote {args.n} rows to {args.out}" + (f" under do({args.set})" if intervention else ""))


def select_rows(rows, ids, split):
    """Rows named by --ids (comma list or @file), else the rows of --split ("all": every row)."""
    if ids:
        if ids.startswith("@"):
            try:
                with open(ids[1:]) as f:
                    wanted = f.read().split()
            except (OSError, UnicodeDecodeError) as e:
                raise SystemExit(f"--ids {ids}: cannot read the id list ({e}); expected a file of ids") from None
        else:
            wanted = [s.strip() for s in ids.split(",") if s]
        by_id = {r["id"]: r for r in rows}
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            raise SystemExit(f"--ids: unknown id(s) {unknown[:5]} (not in meta.csv)")
        return [by_id[i] for i in wanted]
    if split != "all" and rows and "split" not in rows[0]:
        raise SystemExit(f"--split {split}: meta.csv has no split column; expected FORMAT.md §2 columns (or --ids, or "
                         f"--split all)")
    return [r for r in rows if split == "all" or r.get("split") == split]


def read_interventions(path, rows):
    """An edit plan (rectified_flow.py edit --plan-only writes it as E/meta.csv): one row per edit with `id`,
    `source_id` (a row of --data) and `intervention` ("sex=F", "Pleural Effusion=1"). -> [(id, source row, text)]."""
    what = "rectified_flow.py edit --plan-only's meta.csv (id, source_id, intervention)"
    plan, _ = read_meta(path, required=("source_id", "intervention"), what=what)   # ids: file names, each once
    if not plan:
        raise SystemExit(f"--interventions {path}: no rows; expected {what}")
    by_id = {r["id"]: r for r in rows}
    for e in plan:
        if e["source_id"] not in by_id:
            raise SystemExit(f"--interventions {path}: source_id {e['source_id']!r} (edit {e['id']!r}) is not in "
                             f"the --data meta.csv")
    return [(e["id"], by_id[e["source_id"]], e["intervention"]) for e in plan]


def cmd_counterfactual(args):
    """Counterfactual profiles under one do(--set) for every selected row, or under each row's own intervention
    of an edit plan (--interventions), grouped by intervention so that each group is one batched solve."""
    if bool(args.set) == bool(args.interventions):
        raise SystemExit("counterfactual: give exactly one of --set (one intervention for all rows) and "
                         "--interventions (an edit plan, one intervention per row)")
    check_csv_out(args.out, (args.interventions, args.ids[1:] if args.ids.startswith("@") else "",
                             os.path.join(args.data, "meta.csv")))
    model, cfg, _ = load_model(args.ckpt, args.device, not args.no_ema)
    rows, columns = read_rows(args.data)
    if args.interventions:
        plan = read_interventions(args.interventions, rows)
        columns = columns + [c for c in ("source_id", "intervention") if c not in columns]
    else:
        plan = [(r["id"], r, args.set) for r in select_rows(rows, args.ids, args.split)]
    groups = {}
    for k, (_, _, text) in enumerate(plan):
        groups.setdefault(text, []).append(k)
    cf = {v: [None] * len(plan) for v in VARIABLES}
    for text, ks in groups.items():
        intervention = parse_set(text, model.datasets)
        obs = {v: torch.from_numpy(a).float().to(args.device) for v, a in
               encode_rows([plan[k][1] for k in ks], model.datasets, f"{args.data}/meta.csv").items()}
        got = chunked(lambda a, b: counterfactual_values(model, {v: x[a:b] for v, x in obs.items()}, intervention,
                                                         solver_of(args)), len(ks), args.chunk)
        for v in VARIABLES:
            for k, value in zip(ks, got[v].tolist()):
                cf[v][k] = decode(v, value, model.datasets)
    out = [{**r, **{v: cf[v][k] for v in VARIABLES}, "id": i} for k, (i, r, _) in enumerate(plan)]
    if args.interventions:
        for o, (_, r, text) in zip(out, plan):
            o.update(source_id=r["id"], intervention=text)
    write_rows(args.out, out, columns)
    changed = sum(any(o[v] != r[v] for v in VARIABLES) for o, (_, r, _) in zip(out, plan))
    what = f"the {len(groups)} interventions of {args.interventions}" if args.interventions else f"do({args.set})"
    print(f"wrote {len(out)} counterfactual profiles under {what} to {args.out} ({changed} changed)")


# The phantom's true SCM, re-implemented from info.json["scm"] (prep_data.py writes it; this file never imports
# prep_data.py). Mechanisms, as documented there: roots are inverse-CDF categoricals of U (codes 1..K in the order
# of "probs"), age = clip(round(mean + sd * Phi^-1(U)), min, max); a "logistic" finding has
# P = sigmoid(bias + sum_p w_p g_p) and is positive if U < P(1 - r_unc), uncertain if U < P, else negative, with
# g(age) = (age - 60) / 20, g("sex=M") = [sex is M], g(finding) = 1 / 0.5 / 0 for positive / uncertain / negative;
# "No Finding" is positive iff no parent other than the ignored ones (Support Devices) is positive or uncertain.
# U_v = splitmix64(seed * 1024 + index of v in info.json["scm"]["order"] (VARIABLES, the same order, if absent)),
# top 53 bits + 0.5, / 2^53. Truth for counterfactual accuracy: the same seeds under do(), computed here.


def exogenous_uniform(seeds, stream):
    x = np.asarray(seeds, dtype=np.uint64) * np.uint64(1024) + np.uint64(stream)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(2 ** 53)


def true_scm_sample(spec, seeds, intervention=None, datasets=None, streams=None):
    """True values {var: codes in this file's coding, age in years} of the phantom for each seed, under do().
    `streams`: info.json["scm"]["order"], the variable order that numbers the noise streams (default VARIABLES)."""
    streams = list(streams or VARIABLES)
    from scipy.special import ndtri
    intervention, values = intervention or {}, {}
    levels = lambda v: list(spec[v]["probs"])                        # the SCM's own level order per root
    parents = {v: (sorted({k.split("=")[0] for k in s["weights"]}) if s["type"] == "logistic" else
                   list(s.get("parents", []))) for v, s in spec.items()}
    for var in topological_order({v: parents.get(v, []) for v in VARIABLES}, "info.json scm"):
        s, u = spec[var], exogenous_uniform(seeds, streams.index(var))
        if var in intervention:
            values[var] = np.full(len(seeds), float(intervention[var]))
        elif s["type"] == "age":
            values[var] = np.clip(np.round(s["mean"] + s["sd"] * ndtri(u)), s["min"], s["max"])
        elif s["type"] == "categorical":
            cdf = np.cumsum(list(s["probs"].values()))
            own = np.searchsorted(cdf / cdf[-1], u, side="right")             # index into the SCM's levels
            ours = datasets if var == "dataset" else CATEGORIES[var]          # map by name to our codes
            values[var] = np.array([ours.index(levels(var)[j]) + 1 for j in range(len(cdf))], float)[own]
        elif s["type"] == "logistic":
            z = s["bias"]
            for k, w in s["weights"].items():
                pv, _, level = k.partition("=")
                x = values[pv]
                if pv == "age":
                    g = (x - 60.0) / 20.0
                elif level:
                    g = (x == ((datasets if pv == "dataset" else CATEGORIES[pv]).index(level) + 1)).astype(float)
                else:
                    g = np.where(x == 2, 1.0, np.where(x == 3, 0.5, 0.0))
                z = z + w * g
            p = 1 / (1 + np.exp(-z))
            values[var] = np.where(u < p * (1 - s["uncertain"]), 2.0, np.where(u < p, 3.0, 1.0))
        else:                                                        # no_finding
            sick = np.zeros(len(seeds), bool)
            for pv in s["parents"]:
                if pv not in s.get("ignores", []):
                    sick |= values[pv] >= 2
            values[var] = np.where(sick, 1.0, 2.0)
    return values


def tv(p, q):
    """Total-variation distance between two discrete distributions."""
    return 0.5 * float(np.abs(np.asarray(p, float) - np.asarray(q, float)).sum())


def histogram(var, x, datasets):
    """Distribution of a variable's values: class frequencies, or decade bins for age."""
    x = np.asarray(x, float)
    if var == "age":
        h = np.histogram(x[np.isfinite(x)], bins=np.arange(0, 130, 10))[0].astype(float)
    else:
        k = n_classes(var, datasets)
        h = np.bincount(x[x > 0].astype(int) - 1, minlength=k)[:k].astype(float)
    return h / max(h.sum(), 1)


def parent_config(parents, values):
    """A hashable parent configuration per row (age in decades) for conditional tables."""
    cols = [np.floor(np.nan_to_num(values[p], nan=-10) / 20) if p == "age" else values[p] for p in parents]
    return [tuple(c) for c in np.stack(cols, 1)]


def cmd_evaluate(args):
    if args.json:
        check_csv_out(args.json, flag="--json")
    model, cfg, step = load_model(args.ckpt, args.device, not args.no_ema)
    info_path = os.path.join(args.data, "info.json")
    info = read_json(info_path, "the phantom's info.json") if os.path.isfile(info_path) else {}
    spec, streams = (info.get("scm") or {}).get("variables"), (info.get("scm") or {}).get("order")
    if not spec:
        raise SystemExit(f"{info_path}: no 'scm' with 'variables'; evaluate needs a phantom dataset from prep_data.py")
    ds, solver, dev = model.datasets, solver_of(args), args.device
    t0 = time.time()
    truth_seeds = np.arange(10 ** 12, 10 ** 12 + args.n_truth)      # fresh units of the true SCM
    truth = true_scm_sample(spec, truth_seeds, datasets=ds, streams=streams)
    report = {"ckpt": checkpoint_path(args.ckpt), "step": step, "solver": dataclasses.asdict(solver)}

    # 1. marginals: learned ancestral samples vs the true SCM (age in decade bins)
    learned = {v: x.cpu().numpy() for v, x in chunked(lambda a, b: sample_values(
        model, b - a, solver, args.seed + a, device=dev), args.n, args.chunk).items()}
    report["marginal_tv"] = {v: tv(histogram(v, learned[v], ds), histogram(v, truth[v], ds)) for v in VARIABLES}
    progress = lambda what: print(f"evaluate: {what} done ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    progress("marginals")

    # 2. conditionals child | parents: on rows of the true SCM grouped by parent configuration (age in 20-year
    # bins), the learned child flow is solved given each row's true parents; TV against the true rows' child values
    cond = {}
    for var in model.order:
        ps = model.parents[var]
        if not ps:
            continue
        cfgs = parent_config(ps, truth)
        groups = {}
        for i, c in enumerate(cfgs):
            groups.setdefault(c, []).append(i)
        big = sorted((g for g in groups.values() if len(g) >= args.min_group), key=len, reverse=True)[:args.max_groups]
        rows = np.concatenate([g[:args.per_group] for g in big]) if big else np.zeros(0, int)
        if not len(rows):
            continue
        vals = {p: torch.from_numpy(truth[p][rows]).float().to(dev) for p in ps}
        x0 = torch.randn(len(rows), model.dims[var], generator=torch.Generator().manual_seed(args.seed)).to(dev)
        drawn = model.from_flow(var, solve_var(model, var, x0, vals, solver)).cpu().numpy()
        tvs, w, off = [], [], 0
        for g in big:
            m = min(len(g), args.per_group)
            tvs.append(tv(histogram(var, drawn[off:off + m], ds), histogram(var, truth[var][g], ds)))
            w.append(len(g))
            off += m
        cond[var] = {"tv": float(np.average(tvs, weights=w)), "max_tv": float(max(tvs)), "groups": len(big),
                     "coverage": float(sum(w) / args.n_truth)}
    report["conditional_tv"] = cond
    progress("conditionals")

    # 3. interventional distributions under a few do(): learned vs true marginals of every variable
    interventions = [s for s in args.interventions.split(";") if s.strip()]
    report["interventional"] = {}
    for text in interventions:
        do = parse_set(text, ds)
        lv = {v: x.cpu().numpy() for v, x in chunked(lambda a, b: sample_values(
            model, b - a, solver, args.seed + a, do, device=dev), args.n, args.chunk).items()}
        tv_ = true_scm_sample(spec, truth_seeds, do, ds, streams)
        desc = descendants(model.parents, do)
        tvs = {v: tv(histogram(v, lv[v], ds), histogram(v, tv_[v], ds)) for v in VARIABLES if v not in do}
        report["interventional"][text] = {
            "tv": tvs, "mean_tv_descendants": float(np.mean([tvs[v] for v in desc])) if desc else None,
            "mean_tv_others": float(np.mean([x for v, x in tvs.items() if v not in desc]))}
    progress("interventions")

    # 4. counterfactual accuracy on the dataset's units with seeds: the true counterfactual is the phantom's SCM
    # with the same seed (same U) under do(); abduction-action-prediction vs the no-abduction baseline, which
    # keeps the non-descendants and resamples the descendants from the interventional distribution
    rows, _ = read_rows(args.data)
    rows = [r for r in select_rows(rows, "", args.split) if r.get("seed", "") != ""][:args.n_cf]
    if not rows:
        raise SystemExit(f"{args.data}/meta.csv: no rows with a 'seed' in split {args.split!r}")
    seeds = np.array([int(r["seed"]) for r in rows])
    obs_np = encode_rows(rows, ds, f"{args.data}/meta.csv")
    fact = true_scm_sample(spec, seeds, datasets=ds, streams=streams)
    agree = [float(np.mean(fact[v][m] == obs_np[v][m])) for v in VARIABLES
             for m in [(obs_np[v] > 0) if v != "age" else np.isfinite(obs_np[v])] if m.any()]
    report["truth_check_agreement"] = float(np.mean(agree))         # the re-implemented SCM reproduces meta.csv
    obs = {v: torch.from_numpy(a).float().to(dev) for v, a in obs_np.items()}
    report["counterfactual"] = {}
    roundtrip = chunked(lambda a, b: counterfactual_values(model, {v: x[a:b] for v, x in obs.items()}, {},
                                                           solver), len(rows), args.chunk)
    report["roundtrip_exact"] = float(np.mean([np.mean(roundtrip[v].cpu().numpy()[obs_np[v] > 0] ==
                                                       obs_np[v][obs_np[v] > 0]) for v in VARIABLES if v != "age"]))
    for text in interventions:
        do = parse_set(text, ds)
        desc = sorted(descendants(model.parents, do) - set(do), key=VARIABLES.index)
        keep = np.ones(len(rows), bool)
        for v, x in do.items():                                      # units whose value the intervention changes
            keep &= ~np.isclose(obs_np[v], x) if v == "age" else obs_np[v] != x
        true_cf = true_scm_sample(spec, seeds, do, ds, streams)
        ours = chunked(lambda a, b: counterfactual_values(model, {v: x[a:b] for v, x in obs.items()}, do, solver),
                       len(rows), args.chunk)
        fixed = {v: obs[v] for v in VARIABLES if v not in desc and v not in do}
        base = chunked(lambda a, b: sample_values(model, b - a, solver, args.seed + 7 + a, do,
                                                  {v: x[a:b] for v, x in fixed.items()}, dev), len(rows), args.chunk)
        per = {}
        for v in desc:
            m = keep & (obs_np[v] > 0)
            if m.sum():
                per[v] = {"abduction": float(np.mean(ours[v].cpu().numpy()[m] == true_cf[v][m])),
                          "baseline": float(np.mean(base[v].cpu().numpy()[m] == true_cf[v][m])), "n": int(m.sum())}
        report["counterfactual"][text] = {
            "per_variable": per, "units": int(keep.sum()),
            "mean_abduction": float(np.mean([p["abduction"] for p in per.values()])) if per else None,
            "mean_baseline": float(np.mean([p["baseline"] for p in per.values()])) if per else None}
    report["seconds"] = round(time.time() - t0, 1)
    print_report(report)
    out = args.json or os.path.join(args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt),
                                    "evaluate.json")
    atomic_save(out, lambda p: write_json_file(p, report))
    print(f"wrote {out}")
    return report


def print_report(r):
    print(f"{'variable':28s} {'marginal TV':>12s} {'cond. TV':>9s} {'groups':>7s}")
    for v in VARIABLES:
        c = r["conditional_tv"].get(v)
        print(f"{v:28s} {r['marginal_tv'][v]:12.4f} {c['tv'] if c else float('nan'):9.4f} "
              f"{c['groups'] if c else 0:7d}")
    for text, x in r["interventional"].items():
        d = x["mean_tv_descendants"]
        print(f"do({text}): mean TV descendants {d if d is not None else float('nan'):.4f}, "
              f"others {x['mean_tv_others']:.4f}")
    for text, x in r["counterfactual"].items():
        a, b = (float("nan") if y is None else y for y in (x["mean_abduction"], x["mean_baseline"]))
        print(f"counterfactual do({text}) on {x['units']} units: accuracy abduction {a:.4f} "
              f"vs no-abduction baseline {b:.4f}")
    print(f"round trip (abduction + prediction, no intervention) exact: {r['roundtrip_exact']:.4f}; "
          f"true SCM reproduces meta.csv: {r['truth_check_agreement']:.4f}")

# ----------------------------------------------------------------------------------------------------------------
# main(): subcommands (train is the default)


def solver_of(args):
    return Solver(args.solver, args.rtol, args.atol, args.steps)


def inference_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="runs/flow_scm", help="run folder or ckpt-*.safetensors")
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda when available, as in training)")
    p.add_argument("--seed", type=int, default=0, help="seed of the exogenous noise")
    p.add_argument("--solver", default="dopri5", choices=["dopri5", "euler"], help="ODE solver")
    p.add_argument("--rtol", type=float, default=1e-6, help="dopri5 relative tolerance (radit App. C.4)")
    p.add_argument("--atol", type=float, default=1e-6, help="dopri5 absolute tolerance (radit App. C.4)")
    p.add_argument("--steps", type=int, default=32, help="Euler steps")
    p.add_argument("--chunk", type=int, default=8192, help="rows per ODE solve")
    p.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["train", "sample", "intervene", "counterfactual", "evaluate"]
    if not argv or argv[0] not in commands + ["-h", "--help"]:
        argv = ["train"] + argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("train", help="train the flow SCM (default; `flow_scm.py train --help` lists its flags)")
    p = inference_parser(sub, "sample", "ancestral samples (radit Eq. 9-10) -> cohort.csv")
    p.add_argument("--n", type=int, default=1000, help="rows")
    p.add_argument("--out", default="cohort.csv", help="output CSV (FORMAT.md §2 columns)")
    p = inference_parser(sub, "intervene", "samples under do(--set) -> cohort.csv")
    p.add_argument("--set", required=True, help='intervention, e.g. "age=80" or "sex=F,Pneumonia=1"')
    p.add_argument("--n", type=int, default=1000, help="rows")
    p.add_argument("--out", default="cohort.csv", help="output CSV")
    p = inference_parser(sub, "counterfactual", "abduction-action-prediction profiles of real rows (radit Eq. 11)")
    p.add_argument("--data", default="data/phantom", help="dataset folder with meta.csv")
    p.add_argument("--set", default="", help='intervention for every selected row, e.g. "sex=F"')
    p.add_argument("--interventions", default="", help="edit plan CSV (id, source_id, intervention per row), e.g. "
                   "E/meta.csv of rectified_flow.py edit --plan-only: one counterfactual per row, same ids")
    p.add_argument("--ids", default="", help="comma-separated ids or @file (default: the rows of --split)")
    p.add_argument("--split", default="test", help='split to use without --ids ("all": every row)')
    p.add_argument("--out", default="profiles.csv", help="output CSV (same columns and ids as meta.csv)")
    p = inference_parser(sub, "evaluate", "compare with the phantom's true SCM (info.json['scm'])")
    p.add_argument("--data", default="data/phantom", help="phantom dataset folder (meta.csv with seeds, info.json)")
    p.add_argument("--split", default="test", help="units for counterfactual accuracy")
    p.add_argument("--n", type=int, default=10000, help="learned samples per distribution")
    p.add_argument("--n-truth", type=int, default=200000, help="true-SCM units for the reference distributions")
    p.add_argument("--n-cf", type=int, default=2000, help="units for counterfactual accuracy")
    p.add_argument("--min-group", type=int, default=200, help="smallest parent configuration evaluated")
    p.add_argument("--max-groups", type=int, default=12, help="most frequent parent configurations per child")
    p.add_argument("--per-group", type=int, default=500, help="learned draws per parent configuration")
    p.add_argument("--interventions", default="age=80;sex=F;Pneumonia=1;Cardiomegaly=1",
                   help="';'-separated do() settings")
    p.add_argument("--json", default="", help="output JSON (default RUN/evaluate.json)")
    if argv[0] == "train":                                       # the cli piece's parser of Config
        return train(parse_config(argv[1:]))
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    check_inference_counts(args)
    if args.cmd in ("sample", "intervene"):
        return cmd_sample(args)
    if args.cmd == "counterfactual":
        return cmd_counterfactual(args)
    return cmd_evaluate(args)


if __name__ == "__main__":
    main()

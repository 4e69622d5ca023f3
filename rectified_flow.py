"""rectified_flow.py: RadiT, rectified-flow transformers for chest radiographs (radit §4, §4.2, App. B.2, C.3).

A SiT/DiT transformer with adaLN-Zero, QK-RMSNorm and SwiGLU (radit App. B.2, Table 5), conditioned on the 19
metadata variables of FORMAT.md §5 (radit §4.2 Eq. 3), trained with the rectified-flow objective (radit Eq. 1:
x_t = (1 - t) x_0 + t eps, target v = eps - x_0, logit-normal t with the shift of radit Table 11), sampled with
Euler, Heun or adaptive Dormand-Prince 5(4) ODE solvers with classifier-free guidance, and used for
counterfactual editing by abduction (ODE to noise) / action (new metadata) / prediction (ODE back) (radit §5.3).
`--arch unet` swaps the transformer for RadUNet, EDM2's magnitude-preserving U-Net (radit §4.2, App. B.2 Table 6;
Karras et al. 2024b): MP convolutions with forced weight normalisation, mp_silu, mp_sum / mp_cat skips, cosine
attention, learned gains, time through MP Fourier features, the 19 variables through radit Eq. 3 in MP layers;
everything else (objective, time density, CFG, solvers, editing, checkpoints) is shared.

This repository's additions, not in radit: condition dropout for classifier-free guidance (--p-drop-var 0.1,
--p-drop-all 0.1), guidance itself (sample / edit --cfg, default 1 = none, as the paper; the training grids of a
model trained with condition dropout use 2), and the EMA warm-up min(ema, (1 + step) / (10 + step)) (--ema-warmup).
The paper states none of them: its recipes (radit Table 11 for RadiT, Table 12 for RadUNet) list optimizer, lr,
warm-up, batch, weight decay, betas, clipping, EMA rate, shift, dequantisation and steps, and no condition dropout,
no guidance scale and no EMA warm-up; §4.2 conditions on the 19 variables (Eq. 3) and names no null condition, and
§5.3 / App. C.4 describe sampling and editing with no guidance (the paper's text never mentions either). Our
decision: the paper presets (B, XL, unet-pixel, unet-latent) train exactly as those tables say, so they set
--p-drop-var 0 --p-drop-all 0 --no-ema-warmup (a model trained so has no unconditional branch: --cfg other than 1
then extrapolates towards an input it never saw). The other presets (tiny, S, L, unet-tiny: not in the paper)
keep the additions, which make the CPU demos' guided grids and --cfg experiments possible; any preset takes them
back with the flags.

Time convention: data at t = 0, noise at t = 1 (radit Eq. 1 as written); sampling integrates t from 1 to 0, abduction
from 0 to 1. flow_scm.py runs the other way (noise at t = 0, data at t = 1), as its docstring says.

Train (no subcommand means train; the run folder holds ckpt.safetensors, log.jsonl, config.json, grids/):
    python rectified_flow.py --size tiny --max-steps 1000            # CPU, ~10 min, on data/phantom
    torchrun --nproc_per_node=8 rectified_flow.py --size xl --micro-batch 16 --data D --out runs/xl   # 1.3B
    python rectified_flow.py --size xl --dry-run                     # parameter count on the meta device
    WORLD_SIZE=32 python rectified_flow.py --size xl --micro-batch 16 --dry-run   # + GPU memory per rank
    python rectified_flow.py --arch unet --size unet-tiny --max-steps 1000   # RadUNet on the phantom (CPU)
    python rectified_flow.py --size unet-latent --dry-run            # 0.498B (radit Table 6: 0.5B)
    python rectified_flow.py --size unet-pixel --dry-run             # 0.366B at 512 px (Table 6 says 0.3B, see PRESETS)
    python rectified_flow.py --size xl --bench --batch-size 16 --compile   # tokens/s, MFU, memory per GPU;
                                       # kernels.attention vs SDPA, eager and compiled (16 = 512 / 32 GPUs)
Sample (EMA weights; PNGs + meta.csv in the FORMAT.md §2 schema; resumable; sharded under torchrun):
    python rectified_flow.py sample --ckpt runs/rf --n 1000 --cond "Cardiomegaly=1,sex=F,age=70,view=PA" \
        --solver euler --steps 50 --cfg 4.0 --out fake/ --seed 0
    python rectified_flow.py sample --ckpt runs/rf --cond data/phantom/meta.csv --out fake/   # one image a row
    torchrun --nproc_per_node=8 rectified_flow.py sample --ckpt runs/xl --num-images 50000 --out fake/  # (not --n)
Counterfactual edit (radit §5.3; --profile takes the full profiles computed by flow_scm.py):
    python rectified_flow.py edit --ckpt runs/rf --set "Cardiomegaly=1" --n 8 --out edits/    # 8 test images
    python rectified_flow.py edit --ckpt runs/rf --data D --ids ID1,ID2 --profile scm_profiles.csv --out edits/
The editing protocol of radit App. C.4 (per test image one attribute set to a random different value, the rest of the
profile from the flow SCM's counterfactual), as a pipeline of files; the plan comes first because the SCM's
counterfactual depends on each row's intervention:
    python rectified_flow.py edit --ckpt runs/rf --data D --n 500 --random-edit sex --plan-only --out E/  # E/meta.csv
    python flow_scm.py counterfactual --ckpt runs/scm --data D --interventions E/meta.csv --out cf.csv
    python rectified_flow.py edit --ckpt runs/rf --data D --interventions E/meta.csv --profile cf.csv --out E/
(`edit --random-edit sex --out E/` alone edits with the rest of the profile unchanged.) --random-edit is one of sex,
race, age, view, dataset, finding (rules in `random_edit`); the N test patients (one image each: patient_subset) and
their edits are a function of --seed. Targeted edits of random samples (radit §5.3, Fig. 12): the same plan and
profiles, no image read; per source id one fixed noise sampled under its observed profile (F/original/) and under the
edit's (F/), scored with the samples as the originals:
    python rectified_flow.py edit --ckpt runs/rf --data D --interventions E/meta.csv --profile cf.csv --from-noise \
        --out F/
    python downstream.py edit-eval --original F/original --edited F --predictor PRED/real/run0 --out eval_F
E/ holds <id>.png (16-bit), <id>_grid.png and meta.csv: the FORMAT.md §2 columns with the full new profile, id = the
source id, plus `source_id` and `intervention` ("sex=F", "Pleural Effusion=1": the --set syntax), which
`prep_data.py counterfactual --interventions E/meta.csv` and `downstream.py --task edit-eval --edited E` read.

Space. Pixel space reads DATA/shards/*.safetensors (`images` uint16 [N, 1, S, S] -> [-1, 1], uniformly
dequantised in training, radit Table 11). Latent space reads DATA/latents/<vae>/, the folder vae.py `encode`
writes, laid out as:
    info.json   {"format_version": 1, "shape": [C, h, w], "mean": [C floats], "std": [C floats],
                 "decoder_safetensors": "decoder.safetensors", "decoder": "decoder.pt2"}   (paths in this folder)
    shards/{shard:05d}.safetensors   `latents` float32/float16/bfloat16 [N, C, h, w]: row `index` of shard
                 `shard` is the image of the meta.csv row with the same shard and index
The model sees (latent - mean) / std per channel. Decoders map raw latents [B, C, h, w] to images [B, 1, S, S] in
[-1, 1]. A decoder is loaded only when images are decoded (sample, edit; training grids with --sample-every > 0),
never to train. decoder.safetensors (weights and a JSON spec, nothing unpickled, read by load_radvae_decoder) is
preferred; sample and edit fall back to decoder.pt2, a `torch.export` program (torch.export.load), only when the
folder has no decoder.safetensors, and say so in one line: a .pt2 program is code, load only decoders you wrote or
trust. Training grids never run a .pt2 (without decoder.safetensors they show latent channel 0). Our choice: a
decoder path in info.json that leaves the latent folder (absolute, or through '..') is refused, not followed: a
shared dataset folder must not make your run load a file from elsewhere; copy the decoder into the folder instead.
`--space auto` trains on latents when DATA/latents/ holds one (or --vae NAME), else on pixels.

Output folders (FORMAT.md §8 for generated images): training, `sample` and `edit` claim --out with OUT/output.json,
the record of what decides their outputs (training: the command; sample: checkpoint sha256, condition, seed, solver
and its steps or tolerances, guidance, decoder; edit: checkpoint, data, profile, solver, guidance, decoder). A rerun
with the same record resumes (images already written are kept); another record, a folder holding anything else (a
dataset, another command's outputs) or a file is refused with one line, and nothing in it is touched. File names
built from ids (edit's <id>.png) stay inside --out: an id with '/', '\\', a NUL or a leading '.' is refused.

Checkpoint: one safetensors file, written atomically: `model.*`, `ema.*` and `optim.*` tensors, and in its
metadata the resolved config, step and samples seen. There is no RNG state to store: every random draw is a
function of (seed, step) (training) or (seed, image index) (sampling), so a resumed run continues exactly.
"""
import argparse
import copy
import csv
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property, lru_cache

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kernels import attention, rms_norm

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


CXR7 = "MIMIC-CXR,CheXpert-Plus,ReXGradient-160K,PadChest,VinDr-CXR,ChestX-ray14,BRAX"   # radit §3


@dataclass
class Config:
    """Model and training configuration; stored in every checkpoint."""
    data: str = arg("data/phantom", "dataset folder (FORMAT.md §1)")
    out: str = arg("runs/rf", "run folder: ckpt.safetensors, log.jsonl, config.json, env.json, grids/")
    space: str = arg("auto", "pixel | latent | auto (latent when DATA/latents/<vae>/ exists)")
    vae: str = arg("", "latent folder DATA/latents/<vae> to train on (default: the only one)")
    size: str = arg("tiny", "preset: tiny | S | B | L | XL (radit Table 5: B 0.3B, XL 1.3B) | unet-tiny | unet-pixel "
                            "| unet-latent (radit Table 6: 0.3B, 0.5B)")
    arch: str = arg("transformer", "backbone: transformer (RadiT, radit Table 5) | unet (RadUNet, the EDM2 U-Net, "
                                   "radit Table 6); the unet-* presets set unet")
    hidden: int = arg(128, "transformer width")
    depth: int = arg(4, "number of transformer blocks")
    heads: int = arg(4, "attention heads (radit Table 5: head dim 64)")
    channels: int = arg(32, "U-Net model channels (radit Table 6: 32 pixel, 256 latent)")
    mults: str = arg("1,2,3,4", "U-Net channel multipliers, one per resolution level (radit Table 6)")
    blocks: int = arg(3, "U-Net residual blocks per level (radit Table 6: 3)")
    attn_res: str = arg("16,8", "U-Net resolutions with self-attention, besides the bottleneck's (radit Table 6)")
    head_channels: int = arg(64, "U-Net channels per attention head (radit Table 6: 64)")
    dropout: float = arg(0.0, "U-Net dropout in the residual branches (radit Table 6: 0 pixel, 0.1 latent)")
    patch: int = arg(0, "patch size; 0: 2 in latent space, 16 at 512 px, and at least an 8x8 token grid")
    in_channels: int = arg(0, "input channels; 0: from the data (32 without data, radit Table 5)")
    image_size: int = arg(0, "input side in pixels or latent cells; 0: from the data (64 without data)")
    datasets: str = arg(CXR7, "dataset names for codes 1..K; replaced by the data's info.json when training")
    attn: str = arg("kernels", "attention: kernels (kernels.attention) | sdpa (PyTorch)")
    shift: float = arg(0.0, "timestep shift s; 0: 3.0 in pixel space, 1.0 in latent space (radit Table 11)")
    p_drop_var: float = arg(0.1, "CFG training: probability of nulling each variable independently (this "
                                 "repository's addition: radit states no condition dropout; 0 trains as its tables, "
                                 "and the paper presets B, XL, unet-pixel, unet-latent set 0)")
    p_drop_all: float = arg(0.1, "CFG training: probability of nulling all 19 variables (this repository's addition, "
                                 "as --p-drop-var; the paper presets set 0)")
    batch_size: int = arg(32, "global batch size (radit Table 11: 72 for B, 512 for XL)")
    micro_batch: int = arg(0, "per-process micro-batch; 0: the whole per-process batch (no accumulation)")
    max_steps: int = arg(1000, "optimizer steps")
    optimizer: str = arg("adam", "adam | adamw (decoupled weight decay; radit Table 12: AdamW for RadUNet pixel)")
    lr: float = arg(1e-3, "learning rate (radit Table 11 and App. C.3: 1e-4, constant, no warm-up; Table 12: 1e-4 "
                          "pixel, 1e-2 latent)")
    warmup: int = arg(0, "linear learning-rate warm-up steps (radit Table 11: 0; Table 12: 4000 pixel, 50K latent)")
    lr_decay: int = arg(0, "EDM2's inverse-square-root decay: lr / sqrt(max(step / N, 1)) for N > 0; 0: none")
    beta1: float = arg(0.9, "Adam beta1 (radit Table 11)")
    beta2: float = arg(0.999, "Adam beta2 (radit Table 11; Table 12: 0.99)")
    weight_decay: float = arg(0.0, "weight decay (radit Table 11: 0; Table 12: 1e-4 pixel with AdamW, 0 latent)")
    clip: float = arg(1.0, "gradient-norm clipping (radit Table 11)")
    ema: float = arg(0.999, "EMA decay (radit Tables 11, 12: 0.9999)")
    ema_warmup: bool = arg(True, "EMA decay warmed up as min(ema, (1 + step) / (10 + step)) (this repository's "
                                 "addition: radit states none; the paper presets turn it off)")
    seed: int = arg(0, "seed of the initialisation, data order and noise")
    device: str = arg("", "cpu | cuda (default: cuda when available)")
    compile: bool = arg(False, "torch.compile the model")
    grad_ckpt: bool = arg(False, "activation checkpointing, block by block")
    resume: bool = arg(True, "continue from OUT/ckpt.safetensors when it exists (--no-resume starts over)")
    log_every: int = arg(50, "steps between log lines")
    ckpt_every: int = arg(500, "steps between checkpoints")
    sample_every: int = arg(500, "steps between sample grids (EMA, fixed noise and conditions); 0: none")
    bench: bool = arg(False, "time training steps on random tensors (kernels.attention vs SDPA) and exit")
    bench_steps: int = arg(10, "timed steps per --bench variant")
    dry_run: bool = arg(False, "build the model (meta device), print config, parameter count and planned GPU "
                        "memory per rank (WORLD_SIZE=N: N processes), exit")


# radit Table 5 (B, XL) and Table 11; S and L follow DiT's widths. tiny is for tests and the CPU demo.
PRESETS = {
    "tiny": dict(hidden=128, depth=4, heads=4, batch_size=32, lr=1e-3, ema=0.999, max_steps=1000),
    "S": dict(hidden=384, depth=12, heads=6, batch_size=72, lr=1e-4, ema=0.9999, max_steps=1_000_000),
    "B": dict(hidden=1024, depth=16, heads=16, batch_size=72, lr=1e-4, ema=0.9999, max_steps=1_000_000),
    "L": dict(hidden=1024, depth=24, heads=16, batch_size=72, lr=1e-4, ema=0.9999, max_steps=1_000_000),
    "XL": dict(hidden=1536, depth=32, heads=24, batch_size=512, lr=1e-4, ema=0.9999, max_steps=3_000_000),
}
for _p in ("S", "B", "L", "XL"):
    PRESETS[_p].update(log_every=100, ckpt_every=5000, sample_every=5000)
# RadUNet: architecture from radit Table 6, training recipe from Table 12. unet-pixel is the paper's 512 px model (a
# dataset of another size needs --image-size 0). unet-latent follows "the EDM2-M setup" (radit App. C.3), so it keeps
# EDM2-M's inverse-square-root decay with t_ref = 70K steps (EDM2's edm2-img512-m); Table 12 lists no decay, and
# with forced weight normalisation a constant lr 1e-2 for 1M steps never anneals (Karras et al. 2024b, "controlling
# effective learning rate"): our reading. The pixel model ("a more conservative training setup", App. C.3) keeps
# lr 1e-4 after its warm-up (no decay: our reading of Table 12). Sizes: unet-latent is 0.498B (Table 6: 0.5B);
# unet-pixel is 0.366B where Table 6 says 0.3B: its settings in EDM2's block design (the same count gives EDM2's
# published XS-XL sizes) cannot give 0.3B; 2 blocks per level would (0.285B). We keep Table 6's settings.
PRESETS.update({
    "unet-tiny": dict(arch="unet", channels=32, mults="1,2,2", blocks=1, attn_res="16,8", head_channels=32,
                      batch_size=32, lr=1e-2, warmup=100, beta2=0.99, ema=0.999, max_steps=1000),
    "unet-pixel": dict(arch="unet", space="pixel", image_size=512, channels=32, mults="1,2,4,8,16,32", blocks=3,
                       attn_res="32,16", head_channels=64, dropout=0.0, optimizer="adamw", lr=1e-4, warmup=4000,
                       batch_size=72, weight_decay=1e-4, beta2=0.99, clip=1.0, shift=3.0, ema=0.9999,
                       max_steps=2_000_000),
    "unet-latent": dict(arch="unet", space="latent", channels=256, mults="1,2,3,4", blocks=3, attn_res="16,8",
                        head_channels=64, dropout=0.1, optimizer="adam", lr=1e-2, warmup=50_000, lr_decay=70_000,
                        batch_size=72, weight_decay=0.0, beta2=0.99, clip=1.0, shift=1.0, ema=0.9999,
                        max_steps=1_000_000),
})
for _p in ("unet-pixel", "unet-latent"):
    PRESETS[_p].update(log_every=100, ckpt_every=5000, sample_every=5000)
# The paper's own presets train as radit Tables 11 and 12 say: no condition dropout, no EMA warm-up (this
# repository's additions; the module docstring gives the decision and its reading of the paper).
PAPER_PRESETS = ("B", "XL", "unet-pixel", "unet-latent")
for _p in PAPER_PRESETS:
    PRESETS[_p].update(p_drop_var=0.0, p_drop_all=0.0, ema_warmup=False)
ARCH = ("arch", "hidden", "depth", "heads", "channels", "mults", "blocks", "attn_res", "head_channels", "patch",
        "in_channels", "image_size", "datasets")                                           # must match to resume


@dataclass
class InferConfig:
    """Options of the `sample` and `edit` subcommands (the model's own config comes from the checkpoint)."""
    ckpt: str = arg("runs/rf", "run folder or checkpoint file (EMA weights are used)")
    out: str = arg("fake", "output folder: PNGs and meta.csv")
    n: int = arg(0, "number of images, at least 1; left out: one per --cond CSV row, else 16 (edit: 16 test rows "
                    "when no --ids); under torchrun spell it --num-images (torchrun's parser claims --n)",
                 alias="--num-images")
    cond: str = arg("", "conditions: a meta.csv, or 'Var=value,...' (e.g. 'Cardiomegaly=1,sex=F'); '': none",
                    only="sample")
    data: str = arg("", "dataset to edit (default: the checkpoint's training data)", only="edit")
    ids: str = arg("", "comma-separated meta.csv ids to edit", only="edit")
    set: str = arg("", "intervention 'Var=value,...' applied to each image's metadata", only="edit")
    profile: str = arg("", "CSV of full counterfactual profiles (id + variable columns, e.g. from flow_scm.py)",
                       only="edit")
    random_edit: str = arg("", "sex | race | age | view | dataset | finding: each image gets one random different "
                                "value, deterministic in --seed (radit App. C.4; rules in random_edit)", only="edit")
    interventions: str = arg("", "edit plan CSV (id, source_id, intervention), e.g. OUT/meta.csv of --plan-only: "
                                  "edit exactly those", only="edit")
    plan_only: bool = arg(False, "write OUT/meta.csv (edits and new profiles) and stop before any ODE solve",
                          only="edit")
    from_noise: bool = arg(False, "targeted edits of random samples (radit §5.3, Fig. 12): per source id one fixed "
                                  "noise (the identity, from --seed) sampled under the source's profile "
                                  "(OUT/original/) and under the edit's; no abduction", only="edit")
    solver: str = arg("dopri5", "euler | heun | dopri5 (radit App. C.3: dopri5, rtol = atol = 1e-5)")
    steps: int = arg(50, "steps of euler / heun")
    rtol: float = arg(1e-5, "dopri5 relative tolerance")
    atol: float = arg(1e-5, "dopri5 absolute tolerance")
    cfg: float = arg(1.0, "classifier-free guidance scale w: v_u + w (v_c - v_u); 1 = no guidance, as radit "
                          "(guidance is this repository's addition)")
    guide: str = arg("", "comma-separated variables to guide on (the unconditional branch nulls only those); "
                         "'': all 19")
    batch_size: int = arg(16, "images per forward pass, per process, at least 1; left out: sample 16, edit 32 for "
                              "the RadiT XL, unet-pixel and unet-latent checkpoints (radit App. C.4), else 16 (App. "
                              "C.4: RadiT B)")
    seed: int = arg(0, "noise seed: image i always gets the same noise (edit: seed of --random-edit's draws and of "
                       "--from-noise's identities)")
    device: str = arg("", "cpu | cuda (default: cuda when available)")


def parse_config(argv):
    """Config = dataclass defaults, then the --size preset, then the flags given explicitly."""
    given = vars(build_parser(Config, "rectified_flow.py [train]", __doc__).parse_args(argv))
    if given.get("arch", "transformer") not in ("transformer", "unet"):
        raise SystemExit(f"--arch {given['arch']!r}: expected transformer or unet")
    default = "unet-tiny" if given.get("arch") == "unet" else Config.size    # --arch unet alone: the tiny U-Net
    size = {k.lower(): k for k in PRESETS}.get(given.get("size", default).lower())
    if size is None:
        raise SystemExit(f"--size {given['size']!r}: expected one of {list(PRESETS)}")
    arch = PRESETS[size].get("arch", "transformer")
    if given.get("arch", arch) != arch:
        raise SystemExit(f"--arch {given['arch']} --size {size}: {size} is a {arch} preset; expected one of "
                         f"{[k for k, v in PRESETS.items() if v.get('arch', 'transformer') == given['arch']]}")
    cfg = Config(**{**PRESETS[size], **given, "size": size})
    check_counts(cfg, positive=TRAIN_POSITIVE, non_negative=TRAIN_NON_NEGATIVE)
    return cfg


# Counting flags of training (check_counts). Our choice of which may be 0: --sample-every 0 (no grids),
# --micro-batch 0 (no accumulation), --warmup / --lr-decay 0 (none), --patch / --in-channels / --image-size 0 (from
# the data); every other count needs at least 1 (--max-steps 0 would end before its first checkpoint).
TRAIN_POSITIVE = ("batch_size", "max_steps", "log_every", "ckpt_every", "bench_steps", "hidden", "depth", "heads",
                  "channels", "blocks", "head_channels")
TRAIN_NON_NEGATIVE = ("micro_batch", "sample_every", "warmup", "lr_decay", "patch", "in_channels", "image_size")
INFER_POSITIVE = ("steps",)                                      # --n, --batch-size: see parse_infer


def parse_infer(cmd, argv):
    """InferConfig of `sample` / `edit` from argv. --n left out means its default (one image per --cond row, else
    16), --batch-size left out the subcommand's (batch_of); given explicitly each must be at least 1 (our choice:
    `--n 0` is refused rather than read as 'the default')."""
    parser = build_parser(InferConfig, f"rectified_flow.py {cmd}", (sample if cmd == "sample" else edit).__doc__, cmd)
    given = vars(parser.parse_args(argv))
    icfg = InferConfig(**given)
    if cmd == "edit" and "batch_size" not in given:
        icfg.batch_size = 0                                      # edit's default depends on the checkpoint (batch_of)
    check_counts(icfg, positive=INFER_POSITIVE + tuple(k for k in ("n", "batch_size") if k in given))
    for name in ("rtol", "atol"):
        if not getattr(icfg, name) > 0:                          # also NaN: a zero tolerance never accepts a step
            raise SystemExit(f"--{name} {getattr(icfg, name)}: expected a tolerance > 0")
    return icfg


# ----------------------------------------------------------------------------------------------------------------
# Model: SiT/DiT with adaLN-Zero, QK-RMSNorm, SwiGLU and metadata conditioning (radit §4.2, App. B.2, Table 5)


def fourier(x, dim=256, max_period=10_000):
    """Sinusoidal features of a scalar per row (DiT's timestep embedding; x in [0, 1] is scaled by 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = 1000 * x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(dim, gh, gw, base, device):
    """Fixed 2D sin-cos positions; a grid other than `base` x `base` is stretched onto it (interpolation)."""
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    def axis(n):
        pos = torch.arange(n, device=device, dtype=torch.float32) * (base / n)
        return torch.cat([torch.sin(pos[:, None] * omega), torch.cos(pos[:, None] * omega)], dim=1)
    eh, ew = axis(gh), axis(gw)
    return torch.cat([eh[:, None].expand(gh, gw, -1), ew[None].expand(gh, gw, -1)], dim=-1).reshape(gh * gw, dim)


class ScalarEmbedder(nn.Module):
    """Fourier features -> MLP, for the time t and for age / 100 (radit §4.2: the same parameterisation)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x):
        return self.mlp(fourier(x, self.mlp[0].in_features))


class MetadataEmbedder(nn.Module):
    """The 19 variables -> one vector: c = sum_i e_i(y_i) / sqrt(19), magnitude-preserving (radit §4.2 Eq. 3)."""

    def __init__(self, dim, n_datasets):
        super().__init__()
        sizes = [4] * 14 + [3, 4, 4, n_datasets + 1]                 # class 0 of every table is null / missing
        self.register_buffer("offsets", torch.tensor([0] + sizes[:-1]).cumsum(0), persistent=False)
        self.table = nn.Embedding(sum(sizes), dim)                   # the 18 tables stacked: one lookup
        self.age = ScalarEmbedder(dim)
        self.age_null = nn.Parameter(torch.zeros(dim))               # learned embedding of a missing age

    def forward(self, cond):
        cat = self.table(cond[:, :18].long() + self.offsets)         # [B, 18, D]
        age = cond[:, 18]
        e_age = torch.where(age.isnan()[:, None], self.age_null, self.age(age.nan_to_num() / 100))
        return (cat.sum(1) + e_age) / math.sqrt(19)


class SwiGLU(nn.Module):
    """SwiGLU MLP, hidden = 8/3 x width rounded up to a multiple of 64 (radit Table 5)."""

    def __init__(self, dim):
        super().__init__()
        hidden = 64 * math.ceil(8 * dim / 3 / 64)
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Transformer block: adaLN-Zero, attention with QK-RMSNorm (radit App. B.2), SwiGLU MLP."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.attn_impl = heads, "kernels"
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.Parameter(torch.ones(dim // heads)), nn.Parameter(torch.ones(dim // heads))
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(dim)
        self.ada = nn.Linear(dim, 6 * dim)                           # zero-initialised: the block starts as identity

    def attend(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rms_norm(q, self.q_norm), rms_norm(k, self.k_norm)    # QK-RMSNorm (radit §4.2, Esser et al. 2024)
        o = F.scaled_dot_product_attention(q, k, v) if self.attn_impl == "sdpa" else attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, L, D))

    def forward(self, x, c):
        s1, g1, a1, s2, g2, a2 = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)
        x = x + a1 * self.attend(modulate(self.norm1(x), s1, g1))
        return x + a2 * self.mlp(modulate(self.norm2(x), s2, g2))


class RadiT(nn.Module):
    """Rectified-flow transformer v(x_t, t, y) over patches of pixels or latents (radit §4.2, Table 5)."""

    def __init__(self, cfg):
        super().__init__()
        D, p, C = cfg.hidden, cfg.patch, cfg.in_channels
        assert D % cfg.heads == 0 and D % 4 == 0, f"hidden {D} must divide by heads {cfg.heads} and by 4"
        self.patch, self.channels, self.base_grid, self.grad_ckpt = p, C, cfg.image_size // p, cfg.grad_ckpt
        self.x_embed = nn.Conv2d(C, D, p, stride=p)
        self.t_embed = ScalarEmbedder(D)
        self.y_embed = MetadataEmbedder(D, len(cfg.datasets.split(",")))
        self.blocks = nn.ModuleList(Block(D, cfg.heads) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out, self.out = nn.Linear(D, 2 * D), nn.Linear(D, p * p * C)
        self.set_attention(cfg.attn)
        self.init_weights()

    def init_weights(self):
        """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, zeros for adaLN and the output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embed.weight.view(self.x_embed.weight.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        for emb in (self.t_embed, self.y_embed.age):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        nn.init.normal_(self.y_embed.age_null, std=0.02)
        for lin in [b.ada for b in self.blocks] + [self.ada_out, self.out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def set_attention(self, impl):
        if impl not in ("kernels", "sdpa"):
            raise SystemExit(f"--attn {impl!r}: expected kernels or sdpa")
        for b in self.blocks:
            b.attn_impl = impl

    def forward(self, x, t, cond):
        """x [B, C, H, W], t [B] in [0, 1] (0 data, 1 noise), cond [B, 19] codes -> velocity [B, C, H, W]."""
        B, C, H, W = x.shape
        p, gh, gw = self.patch, H // self.patch, W // self.patch
        h = self.x_embed(x).flatten(2).transpose(1, 2).float()      # the residual stream stays fp32 under autocast
        h = h + sincos_2d(h.shape[-1], gh, gw, self.base_grid, x.device)
        with torch.autocast(x.device.type, enabled=False):           # time / metadata embeddings in fp32
            c = self.t_embed(t) + self.y_embed(cond)
        for blk in self.blocks:
            if self.grad_ckpt and self.training:
                h = torch.utils.checkpoint.checkpoint(blk, h, c, use_reentrant=False)
            else:
                h = blk(h, c)
        shift, scale = self.ada_out(F.silu(c))[:, None].chunk(2, dim=-1)
        h = self.out(modulate(self.norm_out(h), shift, scale))       # [B, L, p * p * C]
        return h.view(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


# ----------------------------------------------------------------------------------------------------------------
# Model: RadUNet, the EDM2 magnitude-preserving U-Net (radit §4.2, App. B.2 Table 6; Karras et al. 2024b, Fig. 21)
# "We adopt the EDM2 backbone without modification, except for extending the channel multiplier schedule from 4 to
# 6 levels" (radit §4.2). Every layer keeps unit-magnitude activations under unit-magnitude inputs; the velocity
# target and the conditioning interface (t, the 19 codes) are those of RadiT.


def normalize(x, dim=None, eps=1e-4):
    """x scaled to unit RMS over `dim` (all dimensions but the first by default), norms in fp32 or wider (EDM2)."""
    dim = list(range(1, x.ndim)) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=wide(x.dtype))
    norm = torch.add(eps, norm, alpha=1 / math.sqrt(math.prod(x.shape[d] for d in dim)))   # RMS, not L2
    return x / norm.to(x.dtype)


def wide(dtype):
    """fp32, or the dtype itself when wider (the MP layers run in float64 for the tests)."""
    return torch.promote_types(dtype, torch.float32)


def mp_silu(x):
    """SiLU divided by its RMS under a unit Gaussian input, 0.596 (EDM2 Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): unit magnitude for independent unit inputs (EDM2 Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenation with a share t for b, scaled so that the result keeps unit magnitude (EDM2 Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """Fixed random Fourier features sqrt(2) cos(f x + phase), f ~ N(0, (2 pi)^2): unit RMS (EDM2 Eq. 75)."""

    def __init__(self, n, bandwidth=1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(n) * bandwidth)   # buffers: saved, never trained
        self.register_buffer("phases", 2 * math.pi * torch.rand(n))

    def forward(self, x):
        dt = wide(x.dtype)
        return (x.to(dt)[:, None] * self.freqs.to(dt) + self.phases.to(dt)).cos() * math.sqrt(2)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel > 0) or linear layer (kernel 0): EDM2 Eq. 47, weight-normalised."""

    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.weight = nn.Parameter(torch.randn((cout, cin, kernel, kernel) if kernel else (cout, cin)))
        self.renormalize_()

    def effective_weight(self, gain=1.0):
        """Unit-RMS rows (traditional weight normalisation) divided by sqrt(fan-in): unit output magnitude."""
        w = normalize(self.weight.to(wide(self.weight.dtype)))
        return w * (gain / math.sqrt(w[0].numel()))

    @torch.no_grad()
    def renormalize_(self):
        """Forced weight normalisation (EDM2 Eq. 66): the stored weights back to unit RMS rows. The optimizer
        calls it after every step (make_optimizer), so the raw weights never grow and the effective learning
        rate stays the one set (EDM2 does it inside a training forward; done here it keeps DDP and
        activation checkpointing free of in-place writes to parameters)."""
        self.weight.copy_(normalize(self.weight.to(wide(self.weight.dtype))))

    def forward(self, x, gain=1.0):
        w = self.effective_weight(gain).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class MPMetadataEmbedder(nn.Module):
    """The 19 variables -> c = sum_i e_i(y_i) / sqrt(19) (radit Eq. 3), each e_i of unit RMS (MP layers)."""

    def __init__(self, dim, n_datasets, fourier_dim):
        super().__init__()
        sizes = [4] * 14 + [3, 4, 4, n_datasets + 1]                 # class 0 of every table is null / missing
        self.register_buffer("offsets", torch.tensor([0] + sizes[:-1]).cumsum(0), persistent=False)
        # The 18 tables stacked, rows forced to unit RMS: the lookup EDM2's label MPConv makes of a one-hot.
        self.table = nn.Parameter(torch.randn(sum(sizes), dim))
        # Age / 100: the time embedding's Fourier features, then an MLP (radit §4.2), in MP layers.
        self.age_fourier = MPFourier(fourier_dim)
        self.age_in, self.age_out = MPConv(fourier_dim, dim, 0), MPConv(dim, dim, 0)
        self.age_null = nn.Parameter(torch.randn(dim))               # learned embedding of a missing age
        self.renormalize_()

    @torch.no_grad()
    def renormalize_(self):
        """Forced weight normalisation of the table rows and of the null age (see MPConv.renormalize_)."""
        self.table.copy_(normalize(self.table.to(wide(self.table.dtype)), dim=-1))
        self.age_null.copy_(normalize(self.age_null.to(wide(self.age_null.dtype)), dim=-1))

    def forward(self, cond):
        cat = normalize(self.table, dim=-1)[cond[:, :18].long() + self.offsets]      # [B, 18, D]
        age = cond[:, 18]
        e_age = self.age_out(mp_silu(self.age_in(self.age_fourier(age.nan_to_num() / 100))))
        e_age = torch.where(age.isnan()[:, None], normalize(self.age_null, dim=-1), e_age)
        return (cat.sum(1) + e_age) / math.sqrt(19)


class UNetBlock(nn.Module):
    """EDM2 U-Net block (Fig. 21): resample, two MP 3x3 convs modulated by the embedding, mp_sum, cosine attention."""

    def __init__(self, cin, cout, cemb, flavor, res, resample="keep", attention=False, head_channels=64,
                 dropout=0.0, res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        if attention and (cout < head_channels or cout % head_channels):
            raise SystemExit(f"--head-channels {head_channels}: must divide the {cout} channels of the attention "
                             f"level at resolution {res}")
        self.flavor, self.res, self.resample, self.dropout = flavor, res, resample, dropout
        self.heads, self.attn_impl = (cout // head_channels if attention else 0), "kernels"
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))                # learned gain: the block starts unmodulated
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, 3)
        self.emb_linear = MPConv(cemb, cout, 0)
        self.conv_res1 = MPConv(cout, cout, 3)
        self.conv_skip = MPConv(cin, cout, 1) if cin != cout else None
        self.attn_qkv = MPConv(cout, 3 * cout, 1) if self.heads else None
        self.attn_proj = MPConv(cout, cout, 1) if self.heads else None

    def attend(self, x):
        """Cosine attention: q, k, v normalised per head and position (EDM2), through kernels.attention."""
        B, C, H, W = x.shape
        qkv = self.attn_qkv(x).reshape(B, self.heads, C // self.heads, 3, H * W)
        q, k, v = (t.contiguous() for t in normalize(qkv, dim=2).permute(3, 0, 1, 4, 2))   # 3 x [B, heads, L, D]
        o = F.scaled_dot_product_attention(q, k, v) if self.attn_impl == "sdpa" else attention(q, k, v)
        return self.attn_proj(o.transpose(-1, -2).reshape(B, C, H, W))

    def forward(self, x, emb):
        if self.resample == "down":                                  # EDM2's [1, 1] filter: a 2 x 2 box
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":                                  # ... and its transpose: nearest neighbour
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)                                  # pixel norm of the encoder's main branch
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1             # per-channel scale from t and the metadata
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.heads:
            x = mp_sum(x, self.attend(x), self.attn_balance)
        return x.clamp(-self.clip_act, self.clip_act)                # EDM2's activation clipping

    def flops(self):
        """Forward multiply-adds x 2 of one image (convolutions at the output resolution, attention)."""
        convs = [m for m in (self.conv_res0, self.conv_res1, self.conv_skip, self.attn_qkv, self.attn_proj) if m]
        n = 2 * sum(m.weight.numel() for m in convs) * self.res ** 2 + 2 * self.emb_linear.weight.numel()
        return n + (4 * self.res ** 4 * self.conv_res1.weight.shape[0] if self.heads else 0)   # q k^T and p v


def int_list(text, flag, empty=False):
    """'1,2,4' -> [1, 2, 4]; a one-line error otherwise ('' is [] when `empty`)."""
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        out = None
    if out is None or any(v <= 0 for v in out) or not (out or empty):
        raise SystemExit(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 1,2,4")
    return out


class RadUNet(nn.Module):
    """EDM2 U-Net velocity field v(x_t, t, y) over pixels or latents (radit §4.2, App. B.2 Table 6)."""

    def __init__(self, cfg):
        super().__init__()
        mults, attn_res = int_list(cfg.mults, "--mults"), set(int_list(cfg.attn_res, "--attn-res", empty=True))
        S, C, levels = cfg.image_size, cfg.in_channels, len(mults)
        if S % 2 ** (levels - 1):
            raise SystemExit(f"--mults {cfg.mults}: {levels} levels need an input side divisible by "
                             f"{2 ** (levels - 1)}; the input is {S}")
        sides = [S >> level for level in range(levels)]
        if attn_res and not attn_res & set(sides):
            raise SystemExit(f"--attn-res {cfg.attn_res}: none is a resolution of this U-Net {sides}")
        if not 0 <= cfg.dropout < 1:
            raise SystemExit(f"--dropout {cfg.dropout}: expected a probability in [0, 1)")
        cblock = [cfg.channels * m for m in mults]
        cnoise, cemb = cblock[0], max(cblock)                        # EDM2's defaults for both widths
        self.grad_ckpt, self.levels = cfg.grad_ckpt, levels
        self.label_balance, self.concat_balance = 0.5, 0.5           # EDM2's defaults
        kw = dict(head_channels=cfg.head_channels, dropout=cfg.dropout)
        self.emb_fourier = MPFourier(cnoise)                         # the time t in [0, 1] directly (our choice)
        self.emb_noise = MPConv(cnoise, cemb, 0)
        self.emb_label = MPMetadataEmbedder(cemb, len(cfg.datasets.split(",")), cnoise)
        self.enc, cout = nn.ModuleDict(), C + 1                      # + a constant channel (EDM2's bias stand-in)
        self.conv_in = MPConv(cout, cblock[0], 3)
        cout = cblock[0]
        for level, ch in enumerate(cblock):
            res = sides[level]
            if level:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, cemb, "enc", res, "down", **kw)
            for i in range(cfg.blocks):
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cout, ch, cemb, "enc", res, attention=res in attn_res,
                                                             **kw)
                cout = ch
        skips = [cblock[0]] + [b.conv_res1.weight.shape[0] for b in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, ch in reversed(list(enumerate(cblock))):
            res = sides[level]
            if level == levels - 1:                                  # the bottleneck: attention always (EDM2)
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, cemb, "dec", res, attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, cemb, "dec", res, **kw)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, cemb, "dec", res, "up", **kw)
            for i in range(cfg.blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cout + skips.pop(), ch, cemb, "dec", res,
                                                             attention=res in attn_res, **kw)
                cout = ch
        self.conv_out = MPConv(cout, C, 3)
        self.out_gain = nn.Parameter(torch.zeros([]))                # zero output at init, as EDM2
        self.set_attention(cfg.attn)

    def set_attention(self, impl):
        if impl not in ("kernels", "sdpa"):
            raise SystemExit(f"--attn {impl!r}: expected kernels or sdpa")
        for m in self.modules():
            if isinstance(m, UNetBlock):
                m.attn_impl = impl

    def renormalize_(self):
        """Forced weight normalisation of every MP layer (after each optimizer step; EDM2 Eq. 66)."""
        for m in self.modules():
            if isinstance(m, (MPConv, MPMetadataEmbedder)):
                m.renormalize_()

    def block(self, blk, x, emb):
        if self.grad_ckpt and self.training:
            return torch.utils.checkpoint.checkpoint(blk, x, emb, use_reentrant=False)
        return blk(x, emb)

    def forward(self, x, t, cond):
        """x [B, C, H, W], t [B] in [0, 1] (0 data, 1 noise), cond [B, 19] codes -> velocity [B, C, H, W]."""
        f = 2 ** (self.levels - 1)
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"RadUNet: input {list(x.shape[-2:])} must divide by {f} ({self.levels} levels)")
        with torch.autocast(x.device.type, enabled=False):           # time / metadata embeddings in fp32
            emb = self.emb_noise(self.emb_fourier(t))
            emb = mp_silu(mp_sum(emb, self.emb_label(cond), self.label_balance))
        x = self.conv_in(torch.cat([x, torch.ones_like(x[:, :1])], dim=1))
        skips = [x]
        for blk in self.enc.values():
            x = self.block(blk, x, emb)
            skips.append(x)
        for name, blk in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = self.block(blk, x, emb)
        return self.conv_out(x, gain=self.out_gain)

    def flops(self, side):
        """Forward FLOPs of one image at the training side (2 per multiply-add)."""
        n = 2 * (self.conv_in.weight.numel() + self.conv_out.weight.numel()) * side ** 2
        return n + sum(m.flops() for m in self.modules() if isinstance(m, UNetBlock))


def build_model(cfg):
    """The backbone of `cfg.arch`: RadiT (radit Table 5) or RadUNet (radit Table 6)."""
    if cfg.arch not in ("transformer", "unet"):
        raise SystemExit(f"--arch {cfg.arch!r}: expected transformer or unet")
    return RadUNet(cfg) if cfg.arch == "unet" else RadiT(cfg)


def model_name(cfg):
    return f"{'RadUNet' if cfg.arch == 'unet' else 'RadiT'}-{cfg.size}"


@lru_cache(maxsize=8)
def _unet_flops(cfg_json):
    cfg = Config(**json.loads(cfg_json))
    with torch.device("meta"):
        return RadUNet(cfg).flops(cfg.image_size)


def train_flops(n_params, cfg, tokens_per_image, images):
    """Analytic training FLOPs. RadiT: 6 x params x tokens (matmuls, fwd + bwd) + attention scores (12 L^2 D per
    layer); RadUNet: 3 x the forward FLOPs of its convolutions and attention."""
    if cfg.arch == "unet":
        return images * 3 * _unet_flops(json.dumps(asdict(cfg)))
    return images * (6 * n_params * tokens_per_image + 12 * cfg.depth * tokens_per_image ** 2 * cfg.hidden)


# ----------------------------------------------------------------------------------------------------------------
# Method: rectified-flow path, timestep density, loss, guidance, ODE solvers (radit Eq. 1, §4.2, App. C.3)


def shift_time(t, s):
    """t' = s t / (1 + (s - 1) t): s > 1 moves time towards noise, for high resolutions (radit §4.2, Table 11)."""
    return s * t / (1 + (s - 1) * t)


def sample_time(n, shift, generator, device):
    """Logit-normal(0, 1) t (Esser et al. 2024), then shifted (radit Table 11)."""
    return shift_time(torch.sigmoid(torch.randn(n, generator=generator, device=device)), shift)


def flow_loss(model, x0, eps, t, cond):
    """Per-sample MSE to the rectified-flow target: x_t = (1 - t) x_0 + t eps, v = eps - x_0 (radit Eq. 1)."""
    tb = t.view(-1, 1, 1, 1)
    pred = model((1 - tb) * x0 + tb * eps, t, cond)
    return (pred.float() - (eps - x0)).pow(2).mean(dim=(1, 2, 3))


def guided_velocity(model, x, t, cond, scale=1.0, guide=None):
    """Classifier-free guidance v_u + w (v_c - v_u) on every output channel; v_u nulls `guide` (default all 19).
    t: one time for the batch, or a [B] tensor, a time per row (dopri5)."""
    if torch.is_tensor(t) and t.ndim:
        tt = t.to(x.device, torch.float32)
    else:
        tt = torch.full((x.shape[0],), float(t), device=x.device)
    if scale == 1.0:                                             # no guidance: skip the unconditional branch
        return model(x, tt, cond).float()
    v = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, null_cond(cond, guide)])).float()
    v_c, v_u = v.chunk(2)
    return v_u + scale * (v_c - v_u)


@torch.no_grad()
def condition_gap(model, x0, eps, t, cond, other):
    """v(x_t, t, cond) - v(x_t, t, other) [B, C, H, W] on x_t = (1 - t) x_0 + t eps: how far a change of condition
    moves the velocity (the conditioning probe of issue 28; `other` = null_cond(cond, mask) gives the signal that
    guidance on those variables amplifies). Reference at t = 1: x_1 = eps, so the ideal field v = eps - E[x_0 | y]
    (radit Eq. 1's regression target, averaged) gives a gap of E[x_0 | other] - E[x_0 | cond] whatever eps is:
    averaged over rows it is a difference of the data's class means, a closed form to hold a model against."""
    tt = torch.full((x0.shape[0],), float(t), device=x0.device)
    xt = (1 - t) * x0 + t * eps
    v = model(torch.cat([xt, xt]), torch.cat([tt, tt]), torch.cat([cond, other])).float()
    v_c, v_o = v.chunk(2)
    return v_c - v_o


def fixed_step(f, x, ts, heun=False):
    """Euler (first order) or Heun (second order) along the time grid ts; returns (x, model evaluations)."""
    nfe = 0
    for t0, t1 in zip(ts[:-1], ts[1:]):
        k1 = f(t0, x)
        if heun:
            k2 = f(t1, x + (t1 - t0) * k1)
            x = x + (t1 - t0) * (k1 + k2) / 2
        else:
            x = x + (t1 - t0) * k1
        nfe += 2 if heun else 1
    return x, nfe


# Dormand & Prince (1980) 5(4) tableau; the 5th-order weights are the 7th stage's row (first same as last).
DP_C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1]
DP_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]]
DP_B = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
DP_B4 = [5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
DP_E = [b5 - b4 for b5, b4 in zip(DP_B + [0], DP_B4)]


def dopri5(f, x, t0, t1, rtol=1e-5, atol=1e-5, max_steps=100_000):
    """Adaptive Dormand-Prince 5(4) from t0 to t1 (either direction) with step control per row of x (per image):
    each row has its own time, step size, embedded error estimate with RMS norm over the row and tolerance
    atol + rtol |x| (as torchdiffeq, which radit App. C.3 used), Hairer's first step and accept / reject decisions,
    so a row's solution does not depend on the other rows in the batch: an image is a function of its own noise and
    condition (a norm over the whole batch let one stiff image set every image's steps). f(t, x) gets t as a [B]
    float64 tensor, one time per row; a row that has reached t1 takes steps of size 0 and stays put while the others
    finish. Step factor 0.9 err^(-1/5) in [0.2, 10]. Returns (x, evaluations of f, each on the whole batch)."""
    B = x.shape[0]
    rows = (B,) + (1,) * (x.ndim - 1)                          # a [B] vector broadcast over a row's elements

    def rms(v):                                                  # per row, in float64
        return v.double().reshape(B, -1).pow(2).mean(1).sqrt()

    def per_row(v):
        return v.view(rows).to(x.dtype)

    direction, span = (1.0 if t1 > t0 else -1.0), abs(t1 - t0)
    t = torch.full((B,), float(t0), dtype=torch.float64, device=x.device)
    k1, nfe = f(t, x), 1
    scale = atol + rtol * x.abs()                    # first step: Hairer, Norsett & Wanner (1993) II.4
    d0, d1 = rms(x / scale), rms(k1 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    d2 = rms((f(t + direction * h0, x + per_row(direction * h0) * k1) - k1) / scale) / h0
    nfe += 1
    d12 = torch.maximum(d1, d2)
    h1 = torch.where(d12 <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / d12) ** 0.2)
    h = torch.clamp(torch.minimum(100 * h0, h1), max=span)
    done = torch.zeros(B, dtype=torch.float64, device=x.device)
    for _ in range(max_steps):
        active = span - done > 1e-12 * max(1.0, span)
        if not bool(active.any()):
            return x, nfe
        last = h >= span - done
        h = torch.where(active, torch.minimum(h, span - done), h)
        dt = direction * torch.where(active, h, 0.0)           # finished rows: a step of size 0
        ks = [k1]
        for c, a in zip(DP_C[1:], DP_A[1:]):
            ks.append(f(t + c * dt, x + per_row(dt) * sum(ai * ki for ai, ki in zip(a, ks) if ai)))
        x5 = x + per_row(dt) * sum(b * k for b, k in zip(DP_B, ks) if b)
        k7 = f(t + dt, x5)
        nfe += 6
        err = per_row(dt) * sum(e * k for e, k in zip(DP_E, ks + [k7]) if e)
        en = rms(err / (atol + rtol * torch.maximum(x.abs(), x5.abs())))
        accept = active & (en <= 1.0)
        done = torch.where(accept, torch.where(last, span, done + h), done)
        t = torch.where(accept, torch.where(last, float(t1), t + dt), t)
        x, k1 = torch.where(accept.view(rows), x5, x), torch.where(accept.view(rows), k7, k1)
        factor = torch.where(en > 0, torch.clamp(0.9 * en ** -0.2, 0.2, 10.0), 10.0)
        h = torch.where(active, h * factor, h)
    raise RuntimeError(f"dopri5: no convergence in {max_steps} steps (rtol {rtol}, atol {atol})")


def solve(f, x, t0, t1, solver="dopri5", steps=50, rtol=1e-5, atol=1e-5, shift=1.0):
    """Integrate dx/dt = f(t, x) from t0 to t1; fixed-step grids are shifted like the training times."""
    if solver == "dopri5":
        return dopri5(f, x, t0, t1, rtol, atol)
    if solver not in ("euler", "heun"):
        raise SystemExit(f"--solver {solver!r}: expected euler, heun or dopri5")
    ts = [shift_time(t0 + (t1 - t0) * i / steps, shift) for i in range(steps + 1)]
    return fixed_step(f, x, ts, heun=solver == "heun")


# ----------------------------------------------------------------------------------------------------------------
# Data: the 19 metadata codes (FORMAT.md §5, radit §4.2), pixel or latent datasets, per-rank batches

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]
VARIABLES = LABELS + ["sex", "race", "view", "dataset", "age"]                # cond[:, i] is VARIABLES[i]
VALUES = {**{lab: ["0", "1", "-1"] for lab in LABELS},                       # csv value -> code: index + 1
          "sex": ["F", "M"], "race": ["ASIAN", "BLACK", "WHITE"], "view": ["PA", "AP", "LATERAL"]}
NULL = [0.0] * 18 + [float("nan")]                                            # code 0 = missing; age NaN
META_REQUIRED = VARIABLES + ["shard", "index"]                                 # the columns CXRData reads
META_COLUMNS = (["id", "patient_id", "study_id", "split", "dataset", "view", "sex", "age", "race"] + LABELS +
                ["report", "findings", "shard", "index", "source_path"])


def encode_row(row, datasets, where):
    """A meta.csv-style dict (values as in FORMAT.md §5) -> the 19 codes; missing keys are missing values."""
    out = []
    for var in VARIABLES:
        s = str(row.get(var) or "").strip()
        if var == "age":                                         # one rule everywhere: years in AGE_RANGE
            out.append(check_age(s, where))
            continue
        choices = datasets if var == "dataset" else VALUES[var]
        if var in LABELS and s:
            s = {"1.0": "1", "0.0": "0", "-1.0": "-1"}.get(s, s)
        if s and s not in choices:
            raise SystemExit(f"{where}: {var}={s!r}; expected one of {choices} or empty")
        out.append(float(choices.index(s) + 1) if s else 0.0)
    return out


def decode_row(codes, datasets):
    """The 19 codes -> meta.csv values (inverse of encode_row)."""
    row = {}
    for var, c in zip(VARIABLES, codes):
        if var == "age":
            row[var] = "" if math.isnan(c) else f"{c:g}"
        else:
            choices = datasets if var == "dataset" else VALUES[var]
            row[var] = choices[int(c) - 1] if int(c) > 0 else ""
    return row


def parse_assignments(text, where):
    """'Cardiomegaly=1, sex=F' -> {'Cardiomegaly': '1', 'sex': 'F'}; variable names case-insensitive."""
    names, out = {v.lower(): v for v in VARIABLES}, {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key.strip().lower() not in names:
            raise SystemExit(f"{where}: {part!r}; expected Variable=value with Variable one of {VARIABLES}")
        out[names[key.strip().lower()]] = value.strip()
    return out


def null_cond(cond, variables=None):
    """Replace the given variables (all 19 by default) by their null value: the unconditional branch of CFG."""
    mask = torch.ones(19, dtype=torch.bool, device=cond.device) if variables is None else variables
    return torch.where(mask, torch.tensor(NULL, device=cond.device), cond)


def variable_mask(names, device="cpu"):
    """Comma-separated variable names -> a [19] bool mask ('' -> None: all variables)."""
    if not names.strip():
        return None
    picked = parse_assignments(",".join(n + "=" for n in names.split(",")), "--guide")
    return torch.tensor([v in picked for v in VARIABLES], device=device)


def generator(*keys, device="cpu"):
    """A torch.Generator seeded by a tuple of integers, e.g. (seed, purpose, step)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def read_json(path, what):
    """A JSON object from a file; one line when it is missing or not a JSON object."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected {what}")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"{path}: not readable JSON ({e}); expected {what}") from None
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: holds a {type(obj).__name__}; expected {what} (a JSON object)")
    return obj


def latent_folder(root, vae=""):
    """DATA/latents/<vae> (the only one when vae is ''), or None when the dataset has no latents."""
    base = os.path.join(root, "latents")
    names = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))) if os.path.isdir(base) else []
    if vae:
        if vae not in names:
            raise SystemExit(f"{os.path.join(base, vae)}: no such latent folder; found {names}")
        return os.path.join(base, vae)
    if len(names) > 1:
        raise SystemExit(f"{base}: several latent folders {names}; choose one with --vae")
    return os.path.join(base, names[0]) if names else None


def latent_info(folder):
    """The latent folder's info.json: shape, per-channel mean / std, and the decoders' paths (None when absent):
    decoder.safetensors (info.json's "decoder_safetensors", else that name when the file is there) and the .pt2
    program ("decoder"). The paths are not checked here: only a decoder that is loaded must lie in the folder."""
    path = os.path.join(folder, "info.json")
    li = read_json(path, "the latent folder's info.json (written by vae.py encode)")
    try:
        shape = tuple(int(v) for v in li["shape"])
        mean = torch.tensor([float(v) for v in li["mean"]]).view(-1, 1, 1)
        std = torch.tensor([float(v) for v in li["std"]]).view(-1, 1, 1)
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"{path}: no valid shape / mean / std ({type(e).__name__}: {e}); expected vae.py "
                         f"encode's info.json (FORMAT.md §7)") from None
    if len(shape) != 3 or not len(mean) == len(std) == shape[0] or not bool((std > 0).all()):
        raise SystemExit(f"{path}: shape {list(shape)} with {len(mean)} means and {len(std)} stds; expected [C, h, "
                         f"w] and C of each, stds > 0")
    safe = li.get("decoder_safetensors") or ("decoder.safetensors" if os.path.isfile(
        os.path.join(folder, "decoder.safetensors")) else "")
    return dict(shape=shape, mean=mean, std=std, decoder_safetensors=safe or None, decoder=li.get("decoder") or None)


class CXRData:
    """One split of a FORMAT.md §1 dataset: 19 codes per row in memory, pixels or latents read on demand. The rows
    are arrays (meta_columns: from DIR/meta_index.safetensors when it is fresh, else parsed from meta.csv), never a
    dict per row: a million rows take ~100 MB per process. `rows` (every column, as dicts) is read on first use,
    for edit; training never reads it."""

    def __init__(self, root, space="auto", vae="", split="train"):
        if space not in ("auto", "pixel", "latent"):
            raise SystemExit(f"--space {space!r}: expected auto, pixel or latent")
        path = os.path.join(root, "meta.csv")
        what = f"a dataset folder (meta.csv, shards/, info.json), e.g. from `python prep_data.py phantom --out {root}`"
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: no such file; expected {what}")
        self.info = read_json(os.path.join(root, "info.json"), "the dataset's info.json")
        self.datasets = list(self.info.get("datasets") or [])
        # Every column the model reads is required (our choice, one rule with flow_scm.py): a missing sex or label
        # column is an error naming the columns, never silently all-missing; `split` is required to select one.
        # Every row is coded (a value outside FORMAT.md §5 in any split stops the run at start).
        cols = meta_columns(root, self.datasets, split, what)
        if not len(cols["age"]):
            raise SystemExit(f"{path}: no rows with split={split!r}")
        self.meta_path, self.split, self.source = path, split, cols["source"]
        self.shard, self.index, self.position = cols["shard"], cols["index"], cols["position"]
        # [n, 19] float32 as encode_row codes a row: 18 integer codes, then age (NaN missing)
        self.cond = torch.cat([torch.from_numpy(cols["codes"]).float(), torch.from_numpy(cols["age"])[:, None]], 1)
        lat = latent_folder(root, vae) if space in ("auto", "latent") else None
        if space == "latent" and lat is None:
            raise SystemExit(f"{os.path.join(root, 'latents')}: no latent folder; run vae.py encode or use "
                             f"--space pixel")
        self.space, self.root, self.folder = ("latent" if lat else "pixel"), root, lat or root
        if self.space == "latent":
            li = latent_info(lat)
            self.shape, self.mean, self.std = li["shape"], li["mean"], li["std"]
        else:
            try:
                side = int(self.info["size"])
            except (KeyError, TypeError, ValueError):
                raise SystemExit(f"{root}/info.json: size {self.info.get('size')!r}; expected the image side in "
                                 f"pixels (FORMAT.md §4)") from None
            self.shape = (1, side, side)
        self.key = "latents" if self.space == "latent" else "images"
        self.check_shard_files(cols)
        self._open = lru_cache(maxsize=64)(lambda p: safe_open(p, "pt"))

    def check_shard_files(self, cols):
        """At start, not mid-training: every shard the rows name exists, stores `images` uint16 (latents: float32,
        float16 or bfloat16) rows of this shape, and holds each row's index (check_shard_arrays)."""
        dtypes = ("F32", "F16", "BF16") if self.space == "latent" else "U16"    # FORMAT.md §3, §7
        check_shard_arrays(self.folder, cols, self.key, dtypes, self.shape, where=self.meta_path)

    @cached_property
    def rows(self):
        """This split's meta.csv rows as dicts of strings (every column), in the order of the arrays; read on first
        use (edit's ids, sources and profiles), so that training holds no per-row strings."""
        rows, _ = read_meta(self.meta_path)
        return [rows[int(k)] for k in self.position]

    def shard_path(self, shard):
        path = os.path.join(self.folder, "shards", f"{shard:05d}.safetensors")
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: no such shard")
        return path

    def __len__(self):
        return len(self.shard)

    def load(self, idx):
        """Rows idx -> float32 [n, C, S, S] in model units: pixels (v + 0.5) / 2^16 in [-1, 1], latents normalised."""
        xs = []
        for i in idx:
            shard, j = int(self.shard[int(i)]), int(self.index[int(i)])
            xs.append(self._open(self.shard_path(shard)).get_slice(self.key)[j:j + 1])
        x = torch.cat(xs).float()
        return (x + 0.5) / 32768 - 1 if self.space == "pixel" else (x - self.mean) / self.std


def batch_rows(step, n, batch, lo, hi, seed):
    """Dataset rows at global positions [step B + lo, step B + hi) of an endless stream of seeded permutations:
    ranks take disjoint slices of each global batch, and a resumed run continues from the same sample."""
    pos = torch.arange(step * batch + lo, step * batch + hi)
    return torch.stack([permutation(n, seed, int(e))[o] for e, o in zip(pos // n, pos % n)])


@lru_cache(maxsize=4)
def permutation(n, seed, epoch):
    return torch.randperm(n, generator=generator(seed, 1, epoch))


def to_uint16(x):
    """[-1, 1] -> uint16 numpy (the inverse of CXRData.load's pixel mapping)."""
    v = ((x.float().clamp(-1, 1) + 1) * 32768).floor().clamp(0, 65535)
    return v.to(torch.int32).cpu().numpy().astype(np.uint16)


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

# --- skeleton: radvae_decoder (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def load_radvae_decoder(path, device="cpu"):
    """decoder.safetensors written by vae.py encode -> (decode, spec); decode(z): raw latents [B, C, h, w] ->
    images [B, 1, f h, f w] in [-1, 1]. The weights have the magnitude-preserving normalisations baked in."""
    import json
    import math

    import torch
    import torch.nn.functional as F
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt", device=str(device)) as fh:
            spec = json.loads((fh.metadata() or {}).get("spec", "{}"))
            w = {k: fh.get_tensor(k).float() for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable decoder.safetensors ({e}); expected vae.py encode's") from None
    if spec.get("format") != "radvae-decoder/1":
        raise SystemExit(f"{path}: decoder format {spec.get('format')!r}; expected 'radvae-decoder/1' (vae.py encode)")

    def conv(x, name):
        return F.conv2d(x, w[name], padding=w[name].shape[-1] // 2)

    def mp_silu(x):
        return F.silu(x) / 0.596

    def mp_sum(a, b, t):
        return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)

    def pixel_norm(x, dim):
        return x / (1e-4 + torch.linalg.vector_norm(x, dim=dim, keepdim=True) / math.sqrt(x.shape[dim]))

    def decode(z):
        x = conv(torch.cat([z.float(), torch.ones_like(z[:, :1], dtype=torch.float32)], 1), "conv_in")
        for i, b in enumerate(spec["blocks"]):
            p = f"blocks.{i}."
            if b["resample"] == "up":
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            y = conv(mp_silu(conv(mp_silu(x), p + "conv_res0")), p + "conv_res1")
            x = mp_sum(conv(x, p + "conv_skip") if b["cin"] != b["cout"] else x, y, spec["res_balance"])
            if b["heads"]:
                B, C, H, W = x.shape
                qkv = conv(x, p + "attn_qkv").reshape(B, b["heads"], C // b["heads"], 3, H * W)
                q, k, v = pixel_norm(qkv, 2).unbind(3)
                o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
                x = mp_sum(x, conv(o.transpose(-1, -2).reshape(B, C, H, W), p + "attn_proj"), spec["attn_balance"])
            x = x.clamp(-spec["clip_act"], spec["clip_act"])
        return conv(x, "conv_out").clamp(-1, 1)
    return decode, spec
# --- end skeleton: radvae_decoder ---


# --- skeleton: latent_decoder (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def latent_folder_file(folder, info, key):
    """The file that a latent folder's info.json `key` names, inside the folder ('' when it names none). Our
    choice: a path that resolves outside the folder (absolute, through '..' or a link) is refused in one line, never
    followed: info.json comes with a shared dataset, and the file it names may be a program (a .pt2)."""
    name = str(info.get(key) or "")
    if not name:
        return ""
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(folder, name))
    if os.path.commonpath([root, path]) != root:
        raise SystemExit(f"{os.path.join(folder, 'info.json')}: {key} {name!r} is outside the latent folder; "
                         f"expected a file in {folder} (files elsewhere are not followed)")
    return path


def decoder_files(folder, info):
    """-> (decoder.safetensors path, decoder.pt2 path) that the latent folder's info.json names ("decoder_safetensors",
    "decoder"; FORMAT.md §7), each inside the folder; '' for none."""
    return latent_folder_file(folder, info, "decoder_safetensors"), latent_folder_file(folder, info, "decoder")


def has_decoder(folder, info):
    return any(p and os.path.isfile(p) for p in decoder_files(folder, info))


def load_latent_decoder(folder, info, mean, std, device, allow_program=True):
    """A latent folder's decoder as normalised latents [B, C, h, w] -> images [B, 1, S, S] in [-1, 1]: the latents
    are denormalised by the per-channel `mean` / `std` [C, 1, 1] first (the decoders take raw latents, FORMAT.md §7).
    decoder.safetensors when there is one (load_radvae_decoder: tensors only, nothing unpickled); else, only when
    `allow_program`, the torch.export decoder.pt2, said in one printed line first because loading a .pt2 can run
    code. None when there is no decoder.safetensors and programs are not allowed; one line when there is neither."""
    safe, prog = decoder_files(folder, info)
    if safe and os.path.isfile(safe):
        dec = load_radvae_decoder(safe, device)[0]
    elif not allow_program:
        return None
    elif prog and os.path.isfile(prog):
        print(f"{prog}: the decoder, a torch.export program (.pt2), which can run code when loaded: load only latent "
              f"folders you made or trust (no decoder.safetensors in {folder}; vae.py encode writes one)", flush=True)
        try:
            dec = torch.export.load(prog).module().to(device)
        except Exception as e:                                  # torch.export.load raises many kinds on a bad file
            raise SystemExit(f"{prog}: not a loadable torch.export program ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}); expected vae.py encode's") from None
    else:
        raise SystemExit(f"{os.path.join(folder, 'info.json')}: no decoder found (decoder_safetensors {safe!r}, "
                         f"decoder {prog!r}); expected the decoder files written by vae.py encode")
    mean, std = mean.to(device), std.to(device)
    return torch.no_grad()(lambda z: dec(z.float() * std + mean).float())
# --- end skeleton: latent_decoder ---


def write_csv(path, rows, columns=META_COLUMNS):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_json(path, obj):
    def fn(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_save(path, fn)


def save_png16(path, x):
    """One image [1, S, S] in [-1, 1] -> a 16-bit greyscale PNG, atomically."""
    atomic_save(path, lambda tmp: Image.fromarray(to_uint16(x[0])).save(tmp, format="PNG"))


def save_grid(path, images, ncol, labels=()):
    """Images [N, 1, S, S] in [-1, 1] -> an 8-bit grid PNG, >= 128 px cells, column labels on top."""
    x = ((images[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    cell = max(128, x.shape[-1])
    x = F.interpolate(x[:, None].float(), size=(cell, cell), mode="nearest")[:, 0].to(torch.uint8)
    nrow, top = math.ceil(len(x) / ncol), (14 if labels else 0)
    grid = Image.new("L", (ncol * cell, nrow * cell + top), 0)
    for i, img in enumerate(x):
        grid.paste(Image.fromarray(img.numpy()), ((i % ncol) * cell, top + (i // ncol) * cell))
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(labels):
        draw.text((j * cell + 2, 1), text[: cell // 6], fill=255)
    atomic_save(path, lambda tmp: grid.save(tmp, format="PNG"))


def load_decoder(folder, device, allow_program=True):
    """The decoder of a latent folder as normalised latents -> [-1, 1] images (None: pixel space, or no decoder
    that may be loaded): the latent_decoder block, decoder.safetensors first, else decoder.pt2 only when
    `allow_program` (sample, edit). Training grids pass allow_program=False and show latent channel 0 instead."""
    if folder is None:
        return None
    li = latent_info(folder)                                     # decoder names: info.json's (decoder.safetensors
                                                                 # by default, latent_info), as the block reads them
    decode = load_latent_decoder(folder, li, li["mean"], li["std"], device, allow_program)
    if decode is None:
        print(f"{folder}: no decoder.safetensors; grids show latent channel 0 (training never runs decoder.pt2)")
    return decode


# ----------------------------------------------------------------------------------------------------------------
# Training loop: DDP, bf16 autocast, grad accumulation, clipping, EMA, atomic checkpoints, resume, logging

# Columns of the training sample grids. Our choice, from the conditioning study (RESULTS.md, "Conditioning,
# measured"): view and the findings that change the most pixels take first (after 1000 CPU steps a predictor
# reads view, No Finding and Pleural Effusion from the samples well above chance, sex and Support Devices not
# yet), so a newcomer's first grid shows columns that differ; Support Devices stays as the slow one.
GRID_CONDS = ["", "view=PA", "view=AP", "view=LATERAL", "No Finding=1", "Cardiomegaly=1", "Pleural Effusion=1",
              "Support Devices=1"]
GRID_CFG = 2.0          # mild guidance (our choice: at 1000 steps w = 4 breaks the lateral views into patches)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}   # bf16 dense


def peak_flops(device):
    """Dense bf16 peak of a known GPU (for MFU), else None."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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


def resolve(cfg, data=None):
    """Fill what the data decides: channels, resolution, dataset names, patch, shift (radit Table 5, 11)."""
    space = data.space if data else ("pixel" if cfg.space == "pixel" else "latent")
    if data:
        c, s = data.shape[0], data.shape[-1]
    else:                                                        # no data: radit Table 5's 32 x 64 x 64 latents
        c, s = cfg.in_channels or (1 if space == "pixel" else 32), cfg.image_size or 64
    if data and cfg.image_size and cfg.image_size != s:
        raise SystemExit(f"{data.folder}: images are {s} x {s}; expected --image-size {cfg.image_size}")
    patch = cfg.patch or (1 if cfg.arch == "unet" else 2 if space == "latent" else max(1, min(16, s // 8)))
    if s % patch:
        raise SystemExit(f"--patch {patch}: must divide the input size {s}")
    return Config(**{**asdict(cfg), "space": space, "in_channels": c, "image_size": s, "patch": patch,
                     "datasets": ",".join(data.datasets) if data else cfg.datasets,
                     "vae": os.path.basename(data.folder) if data and space == "latent" else cfg.vae,
                     "shift": cfg.shift or (3.0 if space == "pixel" else 1.0)})


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


def save_checkpoint(path, raw, ema, opt, cfg, step):
    """model.*, ema.*, optim.* tensors + config/step metadata in one safetensors file, written atomically."""
    tensors, groups = optimizer_tensors(opt)
    tensors.update({f"model.{k}": v for k, v in raw.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    meta = {"config": json.dumps(asdict(cfg)), "step": str(step), "samples": str(step * cfg.batch_size),
            "param_groups": json.dumps(groups)}
    write_checkpoint(path, tensors, meta, "rectified_flow/1")


def read_checkpoint(path, prefixes=("model.", "ema.", "optim.")):
    """-> (config dict, step, {prefix: {name: tensor}}, param_groups, path); a run folder means RUN/ckpt.safetensors."""
    path = os.path.join(path, "ckpt.safetensors") if os.path.isdir(path) else path
    what = "a rectified_flow.py checkpoint (a run folder or a .safetensors file from training)"
    meta, parts = open_checkpoint(path, "rectified_flow/1", what, prefixes)
    return json.loads(meta["config"]), int(meta["step"]), parts, json.loads(meta["param_groups"]), path


def check_compatible(cfg, saved, path):
    for k in ARCH:                               # a field missing in an older checkpoint had its default
        if getattr(cfg, k) != saved.get(k, getattr(Config, k)):
            raise SystemExit(f"{path}: checkpoint has {k}={saved.get(k)!r} but this run has {k}={getattr(cfg, k)!r} "
                             f"(another preset or dataset); use another --out or --no-resume")


def sample_grid(ema, cfg, noise, conds, device, path, decode=None):
    """EMA samples of the fixed grid noise and conditions (Euler, 16 steps, CFG 2; CFG 1 for a model trained
    without condition dropout, which has no unconditional branch to guide with), one column per condition."""
    scale = GRID_CFG if cfg.p_drop_var > 0 or cfg.p_drop_all > 0 else 1.0
    f = lambda t, x: guided_velocity(ema, x, t, conds, scale)
    with torch.no_grad(), autocast(device):
        x, _ = solve(f, noise, 1.0, 0.0, "euler", steps=16, shift=cfg.shift)
        x = decode(x) if decode else x[:, :1]                    # no decoder: latent channel 0
    save_grid(path, x, ncol=len(GRID_CONDS), labels=[c or "unconditional" for c in GRID_CONDS])


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


def lr_at(step, cfg):
    """Learning rate of optimizer step `step` (0-based): cfg.lr, EDM2's inverse-square-root decay
    lr / sqrt(max(step / lr_decay, 1)) when lr_decay > 0, times a linear warm-up min((step + 1) / warmup, 1)
    (EDM2 training_loop.learning_rate_schedule; radit Table 12 warm-up steps)."""
    lr = cfg.lr
    if cfg.lr_decay:
        lr /= math.sqrt(max(step / cfg.lr_decay, 1.0))
    if cfg.warmup:
        lr *= min((step + 1) / cfg.warmup, 1.0)
    return lr


def make_optimizer(raw, cfg, device):
    """Adam or AdamW over raw's parameters (radit Tables 11, 12), with hooks: before each step the learning rate
    of lr_at; after it EDM2's forced weight normalisation (RadUNet). The step count is the optimizer's own state,
    so a resumed run continues the schedule. Dropout (RadUNet) draws from torch's global generator, reseeded
    before each training forward from (seed, step, forward, rank): a resumed run draws the same masks."""
    if cfg.optimizer not in ("adam", "adamw"):
        raise SystemExit(f"--optimizer {cfg.optimizer!r}: expected adam or adamw")
    if cfg.warmup < 0 or cfg.lr_decay < 0:
        raise SystemExit(f"--warmup {cfg.warmup} --lr-decay {cfg.lr_decay}: expected step counts >= 0")
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = cls(raw.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
              fused=device.type == "cuda")
    steps = []                                   # [optimizer steps taken, forwards since the last step]

    def count():
        if not steps:                            # first use: the (possibly loaded) state's step count
            steps.extend([max([int(s["step"]) for s in opt.state.values() if "step" in s] or [0]), 0])
        return steps

    def before_step(o, args, kwargs):
        for g in o.param_groups:
            g["lr"] = lr_at(count()[0], cfg)

    def after_step(o, args, kwargs):
        count()[0] += 1
        steps[1] = 0
        if hasattr(raw, "renormalize_"):
            raw.renormalize_()

    def seed_dropout(module, args):
        if module.training:
            s = count()
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, 5, s[0], s[1], int(os.environ.get("RANK", 0))])
                                  .generate_state(1)[0]))
            s[1] += 1

    opt.register_step_pre_hook(before_step)
    opt.register_step_post_hook(after_step)
    if cfg.dropout and cfg.arch == "unet":
        raw.register_forward_pre_hook(seed_dropout)
    return opt


def train(cfg):
    rank, world, device = setup_distributed(cfg.device)
    data = CXRData(cfg.data, cfg.space, cfg.vae)
    cfg = resolve(cfg, data)
    ckpt_path = os.path.join(cfg.out, "ckpt.safetensors")
    saved = read_checkpoint(ckpt_path) if cfg.resume and os.path.isfile(ckpt_path) else None
    if saved:
        check_compatible(cfg, saved[0], ckpt_path)
    micro, accum, per_rank = batch_split(cfg.batch_size, cfg.micro_batch, world)

    torch.manual_seed(cfg.seed)                                  # the same initial weights on every rank
    raw = build_model(cfg).to(device)
    ema = copy.deepcopy(raw).requires_grad_(False).eval()       # fp32 EMA (radit Table 11)
    opt = make_optimizer(raw, cfg, device)                       # lr schedule, forced weight normalisation
    step = 0
    if saved:
        _, step, parts, groups, _ = saved
        try:
            raw.load_state_dict(parts["model."])
            ema.load_state_dict(parts["ema."])
            load_optimizer(opt, parts["optim."], groups)
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise SystemExit(f"{ckpt_path}: its tensors do not fit its config ({type(e).__name__}: {first}); use "
                             f"another --out or --no-resume") from None
        for g in opt.param_groups:                               # the flags of this run win over the saved ones
            g.update(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    # Everything is checked; now claim the run folder (every rank checks, rank 0 writes output.json): a dataset or
    # another command's folder is refused, a folder with our checkpoint (a run from before output.json) is ours.
    # claim_output also removes the .tmp-* a killed checkpoint write left (clean_temporaries, rank 0).
    claim_output(cfg.out, {"command": "rectified_flow.py train"}, mine=("ckpt.safetensors",), write=rank == 0)
    model = torch.compile(raw) if cfg.compile else raw          # load, then compile, then wrap in DDP
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in raw.parameters())
    tokens = (cfg.image_size // cfg.patch) ** 2
    peak = peak_flops(device)
    # A decoder only for the grids, never a .pt2 program: training a shared dataset runs nobody's code.
    grids = rank == 0 and cfg.sample_every > 0
    decode = load_decoder(data.folder, device, allow_program=False) if grids and data.space == "latent" else None
    if rank == 0:
        # Log records carry the step they end (1..max_steps), checkpoints the steps done: keep the records up to the
        # checkpoint's step (0 for a fresh start) and drop what a killed run logged after it, or a half line.
        resume_log(os.path.join(cfg.out, "log.jsonl"), step)
        os.makedirs(os.path.join(cfg.out, "grids"), exist_ok=True)
        write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
        write_json(os.path.join(cfg.out, "env.json"), environment(device, world))
        print(json.dumps(asdict(cfg)))
        print(f"{model_name(cfg)}: {n_params / 1e6:.2f}M parameters, {tokens} tokens/image, {cfg.space} space, "
              f"{len(data)} training images, {world} process(es) x {accum} micro-batch(es) of {micro}"
              + (f", resuming at step {step}" if step else ""), flush=True)

    health, stopping = HealthCheck(world, device, ckpt_path), False   # SIGTERM: save at the next check
    noise_grid = torch.randn((4 * len(GRID_CONDS), *data.shape), generator=generator(cfg.seed, 3)).to(device)
    cond_grid = torch.tensor([encode_row(parse_assignments(c, "grid"), data.datasets, "grid") for c in GRID_CONDS])
    cond_grid = cond_grid.repeat(4, 1).to(device)
    null = torch.tensor(NULL, device=device)
    lo = rank * per_rank
    pool = ThreadPoolExecutor(1)                                 # reads the next batch while this one trains
    def fetch(s):
        rows = batch_rows(s, len(data), cfg.batch_size, lo, lo + per_rank, cfg.seed)
        return rows, pool.submit(lambda: data.load(rows).to(device, non_blocking=True))
    nxt = fetch(step)
    acc = torch.zeros(3 + 8, device=device)                      # loss sum, count, grad-norm sum, 4 bins: sum, count
    bad = torch.full((), -1, dtype=torch.long, device=device)    # first step with a non-finite loss
    t_log, t_start, step0, last_log = time.time(), time.time(), step, step
    while step < cfg.max_steps:
        rows, x0 = nxt[0], nxt[1].result()
        nxt = fetch(step + 1)
        # Every rank draws the whole global batch's randomness from one (seed, step) generator and keeps its
        # slice: the run is the same for any number of processes and any accumulation.
        g = generator(cfg.seed, 0, step, device=device)
        eps = torch.randn((cfg.batch_size, *data.shape), generator=g, device=device)[lo:lo + per_rank]
        t = sample_time(cfg.batch_size, cfg.shift, g, device)[lo:lo + per_rank]
        drop = torch.rand((cfg.batch_size, 19), generator=g, device=device) < cfg.p_drop_var
        drop |= torch.rand((cfg.batch_size, 1), generator=g, device=device) < cfg.p_drop_all
        cond = torch.where(drop[lo:lo + per_rank], null, data.cond[rows].to(device))
        if data.space == "pixel":                                # uniform dequantisation (radit Table 11)
            u = torch.rand((cfg.batch_size, *data.shape), generator=g, device=device)[lo:lo + per_rank]
            x0 = x0 + (u - 0.5) / 32768
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            sync = nullcontext() if world == 1 or m == accum - 1 else model.no_sync()
            with sync:
                with autocast(device):
                    losses = flow_loss(model, x0[sl], eps[sl], t[sl], cond[sl])
                (losses.mean() / accum).backward()
            b = (t[sl] * 4).long().clamp(max=3)
            acc[3:7].index_add_(0, b, losses.detach())
            acc[7:11].index_add_(0, b, torch.ones_like(losses))
            acc[0] += losses.detach().sum()
            acc[1] += len(losses)
            bad = torch.where((bad < 0) & ~losses.isfinite().all(), step + 1, bad)
        gnorm = nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip)
        acc[2] += gnorm
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = ema_decay(step, cfg.ema) if cfg.ema_warmup else cfg.ema   # warm-up: early grids are not the init
        torch._foreach_lerp_(list(ema.parameters()), list(raw.parameters()), 1 - decay)
        step += 1

        log_now = step % cfg.log_every == 0 or step == cfg.max_steps
        ckpt_now = step % cfg.ckpt_every == 0 or step == cfg.max_steps
        if log_now or ckpt_now or step % 10 == 0:                # health check: NaN and SIGTERM, all ranks agree
            stopping = health(step, bad, [*raw.parameters(), *ema.parameters()])
            ckpt_now |= stopping
        if log_now:
            if world > 1:
                dist.all_reduce(acc)
            a, dt = acc.tolist(), time.time() - t_log
            n_steps, last_log = step - last_log, step
            images = n_steps * cfg.batch_size
            rec = {"step": step, "loss": a[0] / max(a[1], 1),
                   "loss_t": [s / c if c else None for s, c in zip(a[3:7], a[7:11])],     # t in quarters of [0, 1]
                   "grad_norm": a[2] / max(n_steps * world, 1), "lr": opt.param_groups[0]["lr"],
                   "img_s": images / dt, "tok_s": images * tokens / dt,
                   "mfu": train_flops(n_params, cfg, tokens, images) / dt / (peak * world) if peak else None,
                   "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                   "eta_s": (cfg.max_steps - step) * (time.time() - t_start) / (step - step0)}
            if rank == 0:
                bins = "/".join("-" if v is None else f"{v:.3f}" for v in rec["loss_t"])    # t in quarters
                write_log(os.path.join(cfg.out, "log.jsonl"), rec, log_line(rec, cfg.max_steps, [("t-bins", bins)]))
            acc.zero_()
            t_log = time.time()
        t_io = time.time()                                       # grids and checkpoints do not count in img/s
        if rank == 0 and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            grid_path = os.path.join(cfg.out, "grids", f"{step:07d}.png")
            sample_grid(ema, cfg, noise_grid, cond_grid, device, grid_path, decode if data.space == "latent" else None)
        if ckpt_now and rank == 0:
            save_checkpoint(ckpt_path, raw, ema, opt, cfg, step)
        t_log += time.time() - t_io
        if stopping:
            break
    pool.shutdown()
    health.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(f"{'stopped by SIGTERM' if stopping else 'done'} at step {step}; checkpoint {ckpt_path}", flush=True)
    return cfg


def bench(cfg):
    """Training steps on random tensors: tokens/s, MFU, peak memory; kernels.attention vs SDPA in the same run,
    each eager and (with --compile) compiled."""
    _, _, device = setup_distributed(cfg.device)
    cfg = resolve(cfg)
    model = build_model(cfg).to(device)
    opt = make_optimizer(model, cfg, device)
    B, tokens = cfg.micro_batch or cfg.batch_size, (cfg.image_size // cfg.patch) ** 2
    n_params, peak = sum(p.numel() for p in model.parameters()), peak_flops(device)
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    cond = torch.cat([torch.randint(0, 3, (B, 18)).float(), 100 * torch.rand(B, 1)], 1).to(device)
    print(f"bench {model_name(cfg)}: {n_params / 1e6:.1f}M params, batch {B}, {cfg.in_channels}x{cfg.image_size}^2 "
          f"input, patch {cfg.patch}, {tokens} tokens/image, {device}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    results, sync = {}, (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for compiled in (False, True) if cfg.compile else (False,):
        for impl in ("kernels", "sdpa"):
            model.set_attention(impl)
            fwd = torch.compile(model) if compiled else model
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for i in range(cfg.bench_steps + 2):                 # 2 warm-up steps (compilation, autotuning)
                if i == 2:
                    sync()
                    t0 = time.time()
                with autocast(device):
                    loss = flow_loss(fwd, x, torch.randn_like(x), torch.rand(B, device=device), cond).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
            dt = (time.time() - t0) / cfg.bench_steps
            name = impl + ("+compile" if compiled else "")
            results[name] = B * tokens / dt
            mfu = train_flops(n_params, cfg, tokens, B) / dt / peak if peak else None
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            print(f"  {name:16s} {B * tokens / dt:12.0f} tokens/s  {B / dt:8.2f} img/s  "
                  + (f"MFU {mfu:.1%}  " if mfu else "MFU n/a (no GPU peak known)  ")
                  + (f"peak mem {mem:.2f} GB" if mem else "peak mem n/a (CPU)"), flush=True)
    print(f"  kernels / sdpa throughput: {results['kernels'] / results['sdpa']:.3f}")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Sampling and counterfactual editing subcommands


def load_for_inference(icfg):
    """EMA model and config from a checkpoint; validates the guidance options."""
    if icfg.cfg < 0:
        raise SystemExit(f"--cfg {icfg.cfg}: expected a guidance scale >= 0")
    if icfg.solver not in ("euler", "heun", "dopri5"):
        raise SystemExit(f"--solver {icfg.solver!r}: expected euler, heun or dopri5")
    variable_mask(icfg.guide)                                    # --guide checked before anything is written
    rank, world, device = setup_distributed(icfg.device)
    saved, _, parts, _, path = read_checkpoint(icfg.ckpt, prefixes=("ema.",))
    try:
        cfg = Config(**saved)
    except TypeError as e:
        raise SystemExit(f"{path}: its config does not fit this rectified_flow.py ({e})") from None
    model = build_model(cfg)
    try:
        model.load_state_dict(parts["ema."])
    except RuntimeError as e:
        raise SystemExit(f"{path}: EMA weights do not fit its own config ({str(e).splitlines()[0]})") from None
    return cfg, model.to(device).eval().requires_grad_(False), rank, world, device, path


def solver_record(icfg):
    """What decides an image besides its condition and noise: the solver, its steps (euler, heun) or tolerances
    (dopri5; the flag that does not apply is left out, so it cannot refuse a resume), and the guidance."""
    knobs = {"rtol": icfg.rtol, "atol": icfg.atol} if icfg.solver == "dopri5" else {"steps": icfg.steps}
    return {"solver": icfg.solver, **knobs, "cfg": icfg.cfg, "guide": icfg.guide}


def decoder_record(folder):
    """The sha256 of the decoder file a latent folder decodes with (None in pixel space): another decoder, other
    images."""
    if folder is None:
        return None
    li = latent_info(folder)
    for path in decoder_files(folder, li):
        if path and os.path.isfile(path):
            return file_sha256(path)
    return None


EDIT_BATCH = {"XL": 32, "unet-pixel": 32, "unet-latent": 32}    # radit App. C.4; every other checkpoint: 16


def batch_of(icfg, cfg, cmd):
    """Images per forward pass: --batch-size, or for 0 (edit without --batch-size, parse_infer; InferConfig's own
    default stays 16, the sampling batch kernels/model_calls.py plans with) the subcommand's default: `edit` as
    radit App. C.4 ("a batch size of 32 for RadiT XL, RadUNet [pixel and latent], and a batch size of 16 for RadiT
    B"; the other presets: 16, our choice), `sample` 16 (our choice; the paper gives none). Only speed and memory
    depend on it: the solvers control steps per row, so an image does not depend on its batch beyond float
    rounding."""
    if icfg.batch_size:
        return icfg.batch_size
    return EDIT_BATCH.get(cfg.size, 16) if cmd == "edit" else 16


def velocity_fn(model, cond, icfg, device):
    guide = variable_mask(icfg.guide, device)
    def f(t, x):
        with torch.no_grad(), autocast(device):
            return guided_velocity(model, x, t, cond, icfg.cfg, guide)
    return f


def sample(icfg):
    """Images from noise under given conditions; PNG i from noise (seed, i); resumes into its own folder."""
    cfg, model, rank, world, device, ckpt = load_for_inference(icfg)
    datasets = cfg.datasets.split(",")
    if icfg.cond.endswith(".csv"):
        # a meta.csv of conditions (our choice: all 19 variable columns, as in FORMAT.md §2; empty = missing)
        rows, _ = read_meta(icfg.cond, required=VARIABLES, what="a meta.csv of conditions (--cond)")
        if not rows:
            raise SystemExit(f"--cond {icfg.cond}: no rows")
        n = icfg.n or len(rows)
        condition = {"cond_csv_sha256": file_sha256(icfg.cond)}
        def code(i):
            return encode_row(rows[i % len(rows)], datasets, f"{icfg.cond} row {i % len(rows) + 2}")

        def source(i):                 # the row image i was conditioned on (FORMAT.md §8; metrics.py --privacy)
            return rows[i % len(rows)]["id"]
    else:
        n = icfg.n or 16
        one = encode_row(parse_assignments(icfg.cond, "--cond"), datasets, "--cond")
        condition = {"cond": icfg.cond}

        def code(i):
            return one

        def source(i):
            return ""
    codes = [code(i) for i in range(n)]
    folder = latent_folder(cfg.data, cfg.vae) if cfg.space == "latent" else None
    decode = load_decoder(folder, device)
    # Image i is a function of (checkpoint, condition i, seed, i, solver, decoder): that is the record; --n is
    # not in it (a larger --n adds images), nor --batch-size (per-row step control: an image ignores its batch).
    record = {"command": "rectified_flow.py sample", "ckpt_sha256": file_sha256(ckpt), **condition,
              "seed": icfg.seed, **solver_record(icfg), "decoder_sha256": decoder_record(folder)}
    claim_output(icfg.out, record, write=rank == 0)
    if world > 1:                # every rank has checked --out (rank 0 claimed it) before any writes there
        dist.barrier()
    meta_path = os.path.join(icfg.out, "meta.csv")
    listed = len(read_meta(meta_path)[0]) if os.path.isfile(meta_path) else 0
    names = [f"{i:06d}.png" for i in range(n)]
    if rank == 0:                # conditions of every image, known up front; a smaller --n keeps the images listed
        kept = [i for i in range(n, listed) if os.path.exists(os.path.join(icfg.out, f"{i:06d}.png"))]
        meta = [{**{c: "" for c in META_COLUMNS}, **decode_row(code(i), datasets), "id": f"{i:06d}", "split": "test",
                 "source_path": f"{i:06d}.png", "source_id": source(i)} for i in list(range(n)) + kept]
        atomic_save(meta_path, lambda tmp: write_csv(tmp, meta, META_COLUMNS + ["source_id"]))
    todo = [i for i in range(rank, n, world) if not os.path.exists(os.path.join(icfg.out, names[i]))]
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    t0, nfe = time.time(), 0
    batch = batch_of(icfg, cfg, "sample")
    for k in range(0, len(todo), batch):
        idx = todo[k:k + batch]
        x = torch.stack([torch.randn(shape, generator=generator(icfg.seed, 2, i)) for i in idx]).to(device)
        cond = torch.tensor([codes[i] for i in idx], device=device)
        x, used = solve(velocity_fn(model, cond, icfg, device), x, 1.0, 0.0, icfg.solver, icfg.steps,
                        icfg.rtol, icfg.atol, cfg.shift)
        nfe += used
        with torch.no_grad():
            x = decode(x) if decode else x
        for i, img in zip(idx, x):
            save_png16(os.path.join(icfg.out, names[i]), img)
        print(f"rank {rank}: {k + len(idx)}/{len(todo)} images, {nfe} model evaluations, "
              f"{(k + len(idx)) / (time.time() - t0):.2f} img/s", flush=True)
    if world > 1:
        dist.barrier()
    return len(todo)


EDITS = ("sex", "race", "age", "view", "dataset", "finding")     # radit §5.3 / App. C.4: the six edit experiments
AGE_GAP = 10                                   # years between old and new age (our choice; radit: "different")


def random_edit(row, kind, rng, choices, ages):
    """One random edit of a meta.csv row (radit App. C.4: "a random value that is different from the initial one")
    -> 'Var=value'. sex: the other one; race / view / dataset: uniform over the other values in `choices`; age: a
    uniform integer in `ages` (lo, hi) at least AGE_GAP years from the old age (any other integer when none is);
    finding: a uniform one of the 14 labels, positive -> negative, anything else (negative, uncertain, missing) ->
    positive. A missing sex / race / view / dataset / age draws from all values."""
    if kind == "finding":
        lab = LABELS[int(rng.integers(len(LABELS)))]
        return f"{lab}={'0' if str(row.get(lab) or '').strip() in ('1', '1.0') else '1'}"
    old = str(row.get(kind) or "").strip()
    if kind == "age":
        pool = list(range(ages[0], ages[1] + 1))
        if old:
            pool = [a for a in pool if abs(a - float(old)) >= AGE_GAP] or [a for a in pool if a != float(old)]
    else:
        pool = [c for c in choices[kind] if c != old]
    if not pool:
        raise SystemExit(f"--random-edit {kind}: row {row.get('id')!r} has {kind}={old!r} and the data holds no "
                         f"other value ({choices.get(kind, ages)})")
    return f"{kind}={pool[int(rng.integers(len(pool)))]}"


def test_rows(data):
    """Positions of the test split's rows, the images `edit` picks without --ids; one line when there are none."""
    test = [k for k, r in enumerate(data.rows) if r.get("split") == "test"]
    if not test:
        raise SystemExit(f"{data.root}/meta.csv: no rows with split 'test' (or no split column); expected test rows "
                         f"to edit, or give --ids / --interventions")
    return test


def patient_subset(data, test, n, seed):
    """The random test subset of the editing protocol, drawn by patients (radit App. C.4: "a randomly selected
    subset of 5K patients from the test split"): n patients uniformly without replacement, then one image of each,
    uniform over that patient's test images (our choice: the paper edits each patient's profile once, and does not
    say which image). A patient is (dataset, patient_id), the key of prep_data.py's patient-level split;
    an empty patient_id is the row's own id (FORMAT.md §2). Deterministic in the seed, and per patient: a patient's
    image is drawn from its own stream (seed, its first row), so a larger n keeps every earlier pick. -> row
    positions in file order."""
    patients = {}
    for k in test:
        r = data.rows[k]
        patients.setdefault((r.get("dataset") or "", (r.get("patient_id") or "").strip() or r["id"]), []).append(k)
    groups = list(patients.values())                             # in order of each patient's first row
    if n > len(groups):
        print(f"--n {n}: the test split holds {len(groups)} patients ({len(test)} rows); editing one image of each")
    pick = np.random.default_rng([seed, 15]).permutation(len(groups))[:n]
    return sorted(g[int(np.random.default_rng([seed, 16, g[0]]).integers(len(g)))] for g in (groups[p] for p in pick))


def edit_plan(icfg, data, datasets):
    """[(output id, source row index, intervention text)]: from --interventions, or --random-edit, or --set."""
    by_id = {r["id"]: i for i, r in enumerate(data.rows)}
    if icfg.interventions:
        if icfg.random_edit or icfg.set or icfg.ids:
            raise SystemExit("--interventions: the plan names the edits; drop --random-edit, --set and --ids")
        # the ids name output files: read_meta refuses an id that is not a file name or appears twice
        plan, _ = read_meta(icfg.interventions, required=("source_id", "intervention"),
                            what="an edit plan CSV (id, source_id, intervention), e.g. from `edit --random-edit sex "
                                 "--plan-only`")
        if not plan:
            raise SystemExit(f"--interventions {icfg.interventions}: no rows; expected one edit per row")
        for e in plan:
            if e["source_id"] not in by_id:
                raise SystemExit(f"--interventions {icfg.interventions}: source_id {e['source_id']!r} (edit "
                                 f"{e['id']!r}) is not in {data.root}/meta.csv")
        return [(e["id"], by_id[e["source_id"]], e["intervention"]) for e in plan]
    ids = [s.strip() for s in icfg.ids.split(",") if s.strip()]
    for i in ids:
        if i not in by_id:
            raise SystemExit(f"{data.root}/meta.csv: no row with id {i!r}")
    if not icfg.random_edit:
        if not ids and icfg.profile:
            ids = [r["id"] for r in read_meta(icfg.profile, what="a CSV of profiles (id + variable columns)")[0]]
            for i in ids:
                if i not in by_id:
                    raise SystemExit(f"--profile {icfg.profile}: id {i!r} is not in {data.root}/meta.csv")
        ids = ids or [data.rows[k]["id"] for k in test_rows(data)][: icfg.n or 16]
        return [(i, by_id[i], icfg.set) for i in ids]
    if icfg.random_edit not in EDITS:
        raise SystemExit(f"--random-edit {icfg.random_edit!r}: expected one of {', '.join(EDITS)}")
    if icfg.set:
        raise SystemExit("--random-edit draws the intervention; drop --set")
    rows = [by_id[i] for i in ids] or patient_subset(data, test_rows(data), icfg.n or 16, icfg.seed)
    choices = {v: [c for c in (datasets if v == "dataset" else VALUES[v]) if any(r.get(v) == c for r in data.rows)]
               for v in ("sex", "race", "view", "dataset")}
    years = [float(r["age"]) for r in data.rows if str(r.get("age") or "").strip()]
    ages = (math.floor(min(years)), math.ceil(max(years))) if years else (18, 90)
    # each source row draws from its own stream (seed, row index): the same image gets the same edit for any --n
    return [(data.rows[k]["id"], k, random_edit(data.rows[k], icfg.random_edit,
                                                np.random.default_rng([icfg.seed, 14, k]), choices, ages))
            for k in rows]


def claim_edit_output(out, record, write):
    """claim_output for `edit`, with one addition for the pipeline of radit App. C.4 (--plan-only, then
    --interventions OUT/meta.csv into the same OUT): a folder claimed by --plan-only (it holds a plan, no image) is
    taken over by an edit of the same data, which writes its own record. Whether existing images agree with this
    run's plan is checked row by row (check_edit_rows)."""
    path = os.path.join(out, "output.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None                                               # absent or unreadable: claim_output decides
    if (isinstance(old, dict) and old.get("plan_only") is True and not record["plan_only"]
            and {k: old.get(k) for k in ("command", "data")} == {k: record[k] for k in ("command", "data")}):
        if write:
            atomic_save(path, lambda tmp: write_json_file(tmp, record))
        return
    claim_output(out, record, write=write)


EDIT_KEYS = ["source_id", "intervention"] + VARIABLES            # what decides an edited image, besides the record


def identity_noise(seed, source_id, shape):
    """The exogenous noise of one identity for `edit --from-noise` (radit §5.3: "we fix an exogenous noise vector
    representing a distinct identity"): a function of (seed, source id) only, so every edit of one source row, in
    any plan, any --n and any batch, starts from the same noise (purpose 4: the other draws use 0-3)."""
    words = np.frombuffer(hashlib.sha256(source_id.encode()).digest()[:16], np.uint32)
    return torch.randn(shape, generator=generator(seed, 4, *words))


def check_edit_rows(out, rows):
    """Images already in OUT are kept only when OUT/meta.csv made them with this run's edit: per image id the
    source, the intervention and the full new profile. -> OUT/meta.csv's rows (for the ones this run keeps listed);
    one line naming the first image that another edit made."""
    path = os.path.join(out, "meta.csv")
    old = {r["id"]: r for r in read_meta(path)[0]} if os.path.isfile(path) else {}
    for r in rows:
        if not os.path.exists(file_in(out, r["id"], ".png")):
            continue
        if r["id"] not in old:
            raise SystemExit(f"{file_in(out, r['id'], '.png')}: exists but {path} does not list it; use a new --out")
        for k in EDIT_KEYS:
            if (old[r["id"]].get(k) or "") != (r.get(k) or ""):
                raise SystemExit(f"--out {out}: {r['id']}.png was edited with {k} = {old[r['id']].get(k)!r}, this "
                                 f"run has {r.get(k)!r}; use a new --out (or the same edit to resume)")
    return list(old.values())


def write_originals_meta(folder, out_rows, observed, datasets, kept):
    """OUT/original/meta.csv of `edit --from-noise`: per edit id its original sample's profile (the source row's,
    decoded from the codes it was sampled with), rows of originals kept from earlier runs (`kept` ids) listed too.
    The folder of PNGs + meta.csv that downstream.py reads as a sampler's output (its --original)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "meta.csv")
    old = {r["id"]: r for r in read_meta(path)[0]} if os.path.isfile(path) else {}
    rows = [{**r, **decode_row(o, datasets), "intervention": ""} for r, o in zip(out_rows, observed)]
    rows += [r for i, r in old.items() if i in kept]
    atomic_save(path, lambda tmp: write_csv(tmp, rows, META_COLUMNS + ["source_id", "intervention"]))


def edit(icfg):
    """Counterfactual editing (radit §5.3): abduction (ODE data -> noise under the observed metadata), action
    (set the intervened variables or the full --profile), prediction (ODE noise -> data under the new metadata).
    OUT/meta.csv: per edit the full new profile, id, source_id and intervention; OUT/<id>.png, OUT/<id>_grid.png.
    Resumable: images already in OUT from the same edit are kept.

    --from-noise: targeted edits of random samples (radit §5.3, Fig. 12). The plan and the profiles are the same
    (--ids / --random-edit / --interventions, --profile from flow_scm.py counterfactual), but no image is read: the
    identity is a fixed noise per source id (identity_noise; --seed), sampled noise -> data under the source row's
    observed profile (the original, OUT/original/<id>.png with OUT/original/meta.csv, the folder
    `downstream.py edit-eval --original OUT/original --edited OUT` pairs by id) and under the edit's new profile
    (OUT/<id>.png). No abduction: each pair costs two sampling solves and none data -> noise, "half the ODE solving
    time" of the paper's pairs. A null intervention gives the same profile, so the same computation: the edit is
    the original bit for bit."""
    cfg, model, rank, world, device, ckpt = load_for_inference(icfg)
    data = CXRData(icfg.data or cfg.data, cfg.space, cfg.vae, split=None)
    datasets = cfg.datasets.split(",")
    if data.datasets != datasets or data.shape != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise SystemExit(f"{data.folder}: data of shape {list(data.shape)} with datasets {data.datasets}; the "
                         f"checkpoint expects {[cfg.in_channels, cfg.image_size, cfg.image_size]} and {datasets}")
    profiles = {}
    if icfg.profile:                                             # ids unique and file names (read_meta)
        profiles = {r["id"]: r for r in read_meta(icfg.profile, what="a CSV of profiles (id + variable columns)")[0]}
    plan = edit_plan(icfg, data, datasets)
    check_ids([i for i, _, _ in plan], "the edit plan (--ids)")  # an id twice would overwrite its own image
    new = []
    for i, k, text in plan:                                      # all checked before any ODE is solved
        src, change = data.rows[k], parse_assignments(text, f"intervention of {i}")
        prof = {v: p for v, p in profiles.get(i, {}).items() if v in VARIABLES}
        if icfg.profile and i not in profiles:
            raise SystemExit(f"--profile {icfg.profile}: no row with id {i!r}; expected one profile per edit")
        said = (profiles.get(i, {}).get("intervention") or "").strip()
        if said and said != text.strip():
            raise SystemExit(f"--profile {icfg.profile}: id {i!r} is the counterfactual of {said!r}, the edit is "
                             f"{text!r}; compute it with flow_scm.py counterfactual --interventions OUT/meta.csv")
        codes = encode_row({**src, **prof, **change}, datasets, f"--set/--profile for {i}")
        if prof and (icfg.random_edit or icfg.interventions):    # (--set on top of --profile overrides it)
            before = encode_row({**src, **prof}, datasets, f"--profile for {i}")
            for v in change:
                a, b = before[VARIABLES.index(v)], codes[VARIABLES.index(v)]
                if not (a == b or (math.isnan(a) and math.isnan(b))):
                    raise SystemExit(f"--profile {icfg.profile}: id {i!r} has {v}={prof.get(v)!r} but the edit sets "
                                     f"{v}={change[v]!r}; compute the profiles of this plan with flow_scm.py "
                                     f"counterfactual --interventions OUT/meta.csv")
        new.append(codes)
    # --from-noise: the originals' profiles, encoded like the edits' (the same code path, so a null edit is equal)
    observed = [encode_row(data.rows[k], datasets, f"{data.root}/meta.csv row {data.rows[k]['id']}")
                for _, k, _ in plan] if icfg.from_noise else []
    ids, src_rows = [i for i, _, _ in plan], [k for _, k, _ in plan]
    out_rows = [{**{c: data.rows[k].get(c, "") for c in META_COLUMNS}, **decode_row(c, datasets), "id": i,
                 "shard": "", "index": "", "source_path": f"{i}.png", "source_id": data.rows[k]["id"],
                 "intervention": text} for (i, k, text), c in zip(plan, new)]
    folder = data.folder if data.space == "latent" else None
    decode = None if icfg.plan_only else load_decoder(folder, device)
    # The record: what decides every image besides its own row (checked per image by check_edit_rows); --n, --ids,
    # --seed and --profile only choose rows and profiles, so a larger --n or more profiles resume.
    record = {"command": "rectified_flow.py edit", "data": os.path.realpath(data.folder), "plan_only": icfg.plan_only}
    if not icfg.plan_only:
        record.update({"ckpt_sha256": file_sha256(ckpt), **solver_record(icfg),
                       "decoder_sha256": decoder_record(folder)})
        if icfg.from_noise:                   # (keys only when set: the records of real-image edits stay as they were)
            record.update({"from_noise": True, "seed": icfg.seed})
    claim_edit_output(icfg.out, record, write=False)             # check it is ours, then the images, then write
    old_rows = check_edit_rows(icfg.out, out_rows)
    originals = os.path.join(icfg.out, "original")
    if icfg.from_noise and os.path.exists(originals) and not os.path.isdir(originals):
        raise SystemExit(f"--from-noise: {originals} is a file; expected the folder of original samples (or none)")
    claim_edit_output(icfg.out, record, write=rank == 0)
    if world > 1:                # every rank has checked --out (rank 0 claimed it) before any writes there
        dist.barrier()
    if rank == 0:                 # this plan's rows, then the rows of images kept from earlier runs of other --ids
        planned = set(ids)
        kept = [r for r in old_rows if r["id"] not in planned and os.path.exists(file_in(icfg.out, r["id"], ".png"))]
        atomic_save(os.path.join(icfg.out, "meta.csv"),
                    lambda tmp: write_csv(tmp, out_rows + kept, META_COLUMNS + ["source_id", "intervention"]))
        print(f"{len(plan)} edits planned in {os.path.join(icfg.out, 'meta.csv')}")
        if icfg.from_noise and not icfg.plan_only:
            write_originals_meta(originals, out_rows, observed, datasets, {r["id"] for r in kept})
    if icfg.plan_only:
        return out_rows

    def done(j):
        made = [file_in(icfg.out, ids[j], end) for end in (".png", "_grid.png")]
        return all(map(os.path.exists, made + [file_in(originals, ids[j], ".png")] * icfg.from_noise))
    mine = [j for j in range(rank, len(ids), world) if not done(j)]    # under torchrun each rank edits its share
    batch = batch_of(icfg, cfg, "edit")
    for k in range(0, len(mine), batch):
        chunk = mine[k:k + batch]
        rows = [src_rows[j] for j in chunk]
        cf = torch.tensor([new[j] for j in chunk], device=device)
        if icfg.from_noise:                              # the original: a sample of the identity's noise
            z = torch.stack([identity_noise(icfg.seed, data.rows[k]["id"], data.shape) for k in rows]).to(device)
            obs = torch.tensor([observed[j] for j in chunk], device=device)
            x0, n1 = solve(velocity_fn(model, obs, icfg, device), z, 1.0, 0.0, icfg.solver, icfg.steps, icfg.rtol,
                           icfg.atol, cfg.shift)
        else:
            x0, obs = data.load(rows).to(device), data.cond[rows].to(device)
            z, n1 = solve(velocity_fn(model, obs, icfg, device), x0, 0.0, 1.0, icfg.solver, icfg.steps, icfg.rtol,
                          icfg.atol, cfg.shift)          # abduction: the sampling grid, reversed
        x1, n2 = solve(velocity_fn(model, cf, icfg, device), z, 1.0, 0.0, icfg.solver, icfg.steps, icfg.rtol,
                       icfg.atol, cfg.shift)             # prediction under the intervened metadata
        with torch.no_grad():
            a, b = (decode(x0), decode(x1)) if decode else (x0, x1)
        for j, xa, xb in zip(chunk, a, b):
            if icfg.from_noise:                          # before the edit: done() needs both
                save_png16(file_in(originals, ids[j], ".png"), xa)
            save_png16(file_in(icfg.out, ids[j], ".png"), xb)     # file_in: never outside --out
            save_grid(file_in(icfg.out, ids[j], "_grid.png"), torch.stack([xa, xb, (xb - xa).abs() * 2 - 1]),
                      ncol=3, labels=["original sample" if icfg.from_noise else "original", "edit", "|difference|"])
        print(f"rank {rank}: edited {k + len(chunk)}/{len(mine)} ({n1} + {n2} model evaluations)", flush=True)
    if world > 1:
        dist.barrier()
    return out_rows


# ----------------------------------------------------------------------------------------------------------------
# --dry-run: GPU memory per rank, planned on the meta device

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


def plan_memory(cfg):
    """The memory_plan of one training micro-batch of `cfg` (bf16 autocast, Adam, fp32 EMA of the whole model,
    as train() runs on a GPU); the micro-batch is train()'s for WORLD_SIZE processes (1 unless set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = batch_split(cfg.batch_size, cfg.micro_batch, world)[0]

    def build(grad_ckpt):
        c = replace(cfg, grad_ckpt=grad_ckpt)
        with torch.device("meta"):
            model = build_model(c).train()

        def loss_fn():              # the inputs of a micro-batch, on the meta device (see train())
            x0 = torch.randn(micro, c.in_channels, c.image_size, c.image_size, device="meta")
            t, cond = torch.rand(micro, device="meta"), torch.zeros(micro, 19, device="meta")
            return flow_loss(model, x0, torch.randn_like(x0), t, cond).mean()
        return model, loss_fn
    return memory_plan(build, micro, world)


# ----------------------------------------------------------------------------------------------------------------
# main: subcommand dispatch (train is the default)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in ("train", "sample", "edit") else "train"
    if cmd in ("sample", "edit"):
        return (sample if cmd == "sample" else edit)(parse_infer(cmd, argv))
    cfg = parse_config(argv)
    if cfg.dry_run:
        data = CXRData(cfg.data, cfg.space, cfg.vae) if os.path.isfile(os.path.join(cfg.data, "meta.csv")) else None
        cfg = resolve(cfg, data)
        with torch.device("meta"):
            n = sum(p.numel() for p in build_model(cfg).parameters())
        print(json.dumps(asdict(cfg)))
        where = "" if cfg.arch == "unet" else f", patch {cfg.patch}"
        print(f"{model_name(cfg)}: {n:,} parameters ({n / 1e9:.3f}B) at {cfg.in_channels}x{cfg.image_size}x"
              f"{cfg.image_size}{where}" + ("" if data else f" (no dataset: radit Table {6 if where == '' else 5} "
                                                           f"input size)"))
        print_memory_plan(plan_memory(cfg))
        return n
    return bench(cfg) if cfg.bench else train(cfg)


if __name__ == "__main__":
    main()

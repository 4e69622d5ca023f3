"""vae.py: RadVAE, a chest X-ray autoencoder with EDM2 magnitude-preserving blocks (radit §4.1, App. B.1, C.2).

An encoder / decoder built from EDM2's magnitude-preserving layers (Karras et al. 2024: MP convolutions with forced
weight normalisation, mp_silu, mp_sum residuals, pixel norm), 1 image channel, 16 latent channels, f = 8 (64 x 64
latents at 512 px), attention at the bottleneck of both encoder and decoder, MP 1x1 convolutions into and out of the
bottleneck, no encoder-decoder skips (radit App. B.1, Table 4). A diagonal-Gaussian posterior with a KL weight
(0 in radit Table 7). Trained with L1 (or L2) reconstruction plus a perceptual loss in the token space of a frozen
Rad-DINO / DINOv2 (radit Eq. 2, §4.1), AdamW 1e-4, 4000 warm-up steps, EMA 0.9999 (radit Table 7).

Train (no subcommand means train; the run folder holds ckpt.safetensors, log.jsonl, config.json, grids/):
    python vae.py --size tiny --perceptual none --max-steps 2000           # CPU demo on data/phantom
    torchrun --nproc_per_node=8 vae.py --size radvae --data D --out runs/radvae   # radit Table 7 (needs Rad-DINO)
    python vae.py --size radvae --dry-run                                  # parameter count (~88M, radit B.1)
    python vae.py --size radvae --bench --batch-size 8 --image-size 512    # img/s, MFU, encode/decode throughput
Evaluate (EMA weights; PSNR, SSIM, reconstruction FD as in radit Table 2, with the bicubic x8 baseline):
    python vae.py evaluate --ckpt runs/vae --data data/phantom --split test --fd-features raddino
Encode a whole dataset for the latent models, decode any latent file:
    python vae.py encode --ckpt runs/vae --data data/phantom --name radvae       # -> data/phantom/latents/radvae/
    python vae.py decode --latents samples.safetensors --decoder data/phantom/latents/radvae --out pngs/
The paper's latent space, the released FLUX.2 autoencoder (radit §5.1; ae.safetensors of
huggingface.co/black-forest-labs/FLUX.2-dev in DIR, read here without diffusers; grey repeated to RGB in, the RGB
prediction averaged out, --to-gray luma for radit Table 8's weights):
    python vae.py encode --vae flux2 --weights DIR --data data/phantom          # -> data/phantom/latents/flux2/
    python vae.py decode --vae flux2 --weights DIR --latents samples.safetensors --out pngs/

Latent folder (FORMAT.md §7), D/latents/<name>/, read by rectified_flow.py, dit_text2img.py, controlnet.py,
ldm_multicond.py:
    info.json   {"format_version": 1, "vae": name, "vae_id": fingerprint of the weights, "shape": [C, h, w],
                 "mean": [C], "std": [C] (per channel, over the train-split rows), "image_size": S,
                 "decoder": "decoder.pt2", "decoder_safetensors": "decoder.safetensors", "encoder": "encoder.pt2",
                 ...}
    shards/{k:05d}.safetensors   `latents` float32 [N, C, h, w]: row i is the posterior mean of image row i of the
                 dataset's shards/{k:05d}.safetensors, i.e. of the meta.csv row with shard = k, index = i.
Both decoder files map RAW latents [B, C, h, w] (not normalised by mean / std) to images [B, 1, 8h, 8w] in [-1, 1]:
- decoder.safetensors: the decoder's weights with the magnitude-preserving normalisations and gains baked in, and
  a JSON spec in the file's metadata. `load_radvae_decoder` below (the marked radvae_decoder block) reads it with
  torch + safetensors only: copy that block into any script. Nothing is unpickled: safe for files from others.
- decoder.pt2: the same decoder as a `torch.export` program (dynamic batch), loaded with torch.export.load, as
  rectified_flow.py does today. torch.export.load can unpickle: load only .pt2 files you made or trust.
encoder.pt2 maps images [B, 1, S, S] in [-1, 1] to RAW posterior-mean latents [B, C, h, w] (torch.export, dynamic
batch, fp32): controlnet.py encodes its condition maps with it, as ChexGen encodes masks with the images' VAE.
Any other autoencoder works with the latent models if its latents are written in this layout.

Checkpoint: one safetensors file written atomically: `model.*`, `ema.*`, `optim.*` tensors, and in its metadata the
resolved config and step. Every random draw is a function of (seed, step), so a resumed run continues exactly.
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
import sys
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property, lru_cache

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
    """Model and training configuration; stored in every checkpoint."""
    data: str = arg("data/phantom", "dataset folder (FORMAT.md §1)")
    out: str = arg("runs/vae", "run folder: ckpt.safetensors, log.jsonl, config.json, env.json, grids/")
    size: str = arg("tiny", "preset: tiny | radvae (radit Table 4: 128 x [1,2,3,4], 3 blocks, ~88M)")
    channels: int = arg(16, "model channels of the first stage (radit Table 4: 128)")
    mults: str = arg("1,2,2,4", "channel multiplier per stage; stages - 1 halvings (radit Table 4: 1,2,3,4 -> f8)")
    blocks: int = arg(1, "residual blocks per stage (radit Table 4: 3)")
    latent_channels: int = arg(16, "latent channels (radit B.1: 16)")
    head_channels: int = arg(32, "channels per attention head at the bottleneck (radit Table 4: 64)")
    res_balance: float = arg(0.3, "mp_sum balance of the residual branches (radit Table 4)")
    attn_balance: float = arg(0.3, "mp_sum balance of the attention branches (radit Table 4)")
    logvar_init: float = arg(-8.0, "initial posterior log-variance (a learned per-channel offset)")
    image_size: int = arg(0, "training side in pixels; 0: the dataset's side; smaller: random crops (patches)")
    rec: str = arg("l1", "reconstruction loss: l1 | l2")
    kl_weight: float = arg(0.0, "KL weight beta (radit Table 7: 0)")
    perceptual: str = arg("raddino", "perceptual network: raddino | dinov2 | <transformers id or folder> | none")
    perceptual_weight: float = arg(250.0, "perceptual loss weight (radit Table 7: Rad-LPIPS weight 250)")
    perceptual_size: int = arg(0, "side the perceptual network sees; 0: its processor's crop size, else 224")
    perceptual_layers: str = arg("", "comma-separated hidden-state indices used (1 = first block); '': all blocks")
    batch_size: int = arg(16, "global batch size (radit Table 7: 192)")
    micro_batch: int = arg(0, "per-process micro-batch; 0: the whole per-process batch (no accumulation)")
    max_steps: int = arg(2000, "optimizer steps (radit C.2: 630K)")
    lr: float = arg(2e-3, "AdamW learning rate after warm-up (radit Table 7: 1e-4)")
    warmup: int = arg(50, "linear learning-rate warm-up steps (radit Table 7: 4000)")
    beta1: float = arg(0.9, "AdamW beta1 (radit Table 7)")
    beta2: float = arg(0.999, "AdamW beta2 (radit Table 7)")
    weight_decay: float = arg(1e-4, "AdamW weight decay (radit Table 7)")
    clip: float = arg(1.0, "gradient-norm clipping")
    ema: float = arg(0.99, "EMA decay (radit Table 7: 0.9999)")
    seed: int = arg(0, "seed of the initialisation, data order and posterior noise")
    device: str = arg("", "cpu | cuda (default: cuda when available)")
    compile: bool = arg(False, "torch.compile the model")
    grad_ckpt: bool = arg(False, "activation checkpointing, block by block")
    resume: bool = arg(True, "continue from OUT/ckpt.safetensors when it exists (--no-resume starts over)")
    log_every: int = arg(50, "steps between log lines")
    ckpt_every: int = arg(500, "steps between checkpoints")
    sample_every: int = arg(500, "steps between reconstruction grids (EMA, fixed validation images; 0: none)")
    bench: bool = arg(False, "time training, encoding and decoding on random tensors and exit")
    bench_steps: int = arg(5, "timed steps per --bench measurement")
    dry_run: bool = arg(False, "build the model (meta device), print config and parameter count, exit")


# radit Table 4 (architecture) and Table 7 (training). tiny is for tests and the CPU demo.
PRESETS = {
    "tiny": dict(channels=16, mults="1,2,2,4", blocks=1, head_channels=32, batch_size=16, lr=2e-3, warmup=50,
                 ema=0.99, max_steps=2000),
    "radvae": dict(channels=128, mults="1,2,3,4", blocks=3, head_channels=64, batch_size=192, lr=1e-4, warmup=4000,
                   ema=0.9999, max_steps=630_000, log_every=100, ckpt_every=5000, sample_every=5000),
}
ARCH = ("channels", "mults", "blocks", "latent_channels", "head_channels", "res_balance", "attn_balance")


@dataclass
class InferConfig:
    """Options of the `evaluate`, `encode` and `decode` subcommands (the model's config comes from the checkpoint)."""
    ckpt: str = arg("runs/vae", "run folder or checkpoint file (EMA weights are used)", only="evaluate,encode")
    data: str = arg("data/phantom", "dataset folder (FORMAT.md §1)", only="evaluate,encode")
    split: str = arg("test", "meta.csv split to evaluate ('' = all rows)", only="evaluate")
    n: int = arg(0, "evaluate at most this many images (0: all of the split)", only="evaluate")
    fd_features: str = arg("raddino", "feature space of the reconstruction FD (metrics.py name; 'none' skips it)",
                           only="evaluate")
    weights_dir: str = arg("", "folder searched first for feature-network weights (metrics.py)", only="evaluate")
    name: str = arg("", "latent folder name: DATA/latents/<name>/ ('': the --vae's name)", only="encode")
    vae: str = arg("radvae", "autoencoder: radvae (a vae.py run, --ckpt) | flux2 (the released FLUX.2 autoencoder, "
                   "--weights; radit §5.1)", only="encode,decode")
    weights: str = arg("", "--vae flux2: folder holding ae.safetensors of huggingface.co/black-forest-labs/FLUX.2-dev "
                       "(or the file)", only="encode,decode")
    to_gray: str = arg("mean", "--vae flux2: decoder RGB -> grey: mean (radit §5.1) | luma (radit Table 8's "
                       "ablation)", only="encode,decode")
    latents: str = arg("", "safetensors file with `latents` [N, C, h, w] to decode", only="decode")
    decoder: str = arg("", "latent folder or decoder.safetensors (default: found next to --latents); --vae flux2: "
                       "the latent folder whose mean / std --normalised uses", only="decode")
    normalised: bool = arg(False, "the latents are (z - mean) / std (as the latent models sample them)", only="decode")
    out: str = arg("", "output: evaluate -> results JSON folder ('' = none); decode -> PNG folder",
                   only="evaluate,decode")
    batch_size: int = arg(16, "images per forward pass, per process")
    device: str = arg("", "cpu | cuda (default: cuda when available)")


def parse_config(argv):
    """Config = dataclass defaults, then the --size preset, then the flags given explicitly."""
    given = vars(build_parser(Config, "vae.py [train]", __doc__).parse_args(argv))
    size = {k.lower(): k for k in PRESETS}.get(given.get("size", Config.size).lower())
    if size is None:
        raise SystemExit(f"--size {given['size']!r}: expected one of {list(PRESETS)}")
    return Config(**{**PRESETS[size], **given, "size": size})


def mults_of(cfg):
    try:
        m = [int(s) for s in str(cfg.mults).split(",")]
    except ValueError:
        raise SystemExit(f"--mults {cfg.mults!r}: expected comma-separated integers, e.g. 1,2,3,4") from None
    if not m or min(m) < 1:
        raise SystemExit(f"--mults {cfg.mults!r}: expected positive integers")
    return m


def factor_of(cfg):
    """Spatial down-sampling factor: one halving between consecutive stages (radit B.1: 4 stages -> f = 8)."""
    return 2 ** (len(mults_of(cfg)) - 1)


# ----------------------------------------------------------------------------------------------------------------
# Model: EDM2 magnitude-preserving encoder / decoder (Karras et al. 2024; radit App. B.1, Table 4)


def normalize(x, dim=None, eps=1e-4):
    """x scaled to unit RMS over `dim` (all but dim 0 by default): EDM2's normalize, computed in fp32."""
    dim = list(range(1, x.ndim)) if dim is None else [dim] if isinstance(dim, int) else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    norm = torch.add(eps, norm, alpha=1 / math.sqrt(math.prod(x.shape[d] for d in dim)))   # RMS, not L2
    return x / norm.to(x.dtype)


def mp_silu(x):
    """SiLU divided by its output RMS under unit-Gaussian input (EDM2 Eq. 81: 0.596)."""
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): a blend that keeps unit magnitude (EDM2 Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenation weighted so that each part contributes (1 - t) / t of the total and the magnitude stays 1."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPConv(nn.Module):
    """Magnitude-preserving convolution: weights normalised to unit norm per output channel at every forward."""

    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))

    def effective_weight(self, gain=1.0):
        w = normalize(self.weight.float())                       # EDM2 "traditional" weight normalisation
        return w * (gain / math.sqrt(w[0].numel()))               # unit norm per output channel: fan-in scaling

    @torch.no_grad()
    def renormalize_(self):
        """Forced weight normalisation (EDM2 §2.3): rescale the stored weights in place, called after every
        optimizer step, so the raw weights never grow and the effective learning rate does not decay."""
        self.weight.copy_(normalize(self.weight.float()))

    def forward(self, x, gain=1.0):
        w = self.effective_weight(gain).to(x.dtype)
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """EDM2 residual block without the noise embedding: resample, MP 3x3 convs, mp_sum, optional attention."""

    def __init__(self, cin, cout, flavor, resample="keep", heads=0, res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        self.flavor, self.resample, self.heads = flavor, resample, heads
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, 3)
        self.conv_res1 = MPConv(cout, cout, 3)
        self.conv_skip = MPConv(cin, cout, 1) if cin != cout else None
        self.attn_qkv = MPConv(cout, cout * 3, 1) if heads else None
        self.attn_proj = MPConv(cout, cout, 1) if heads else None

    def spec(self):
        if self.conv_skip is not None:
            cin = self.conv_skip.weight.shape[1]
        else:
            cin = self.conv_res1.weight.shape[0]
        return dict(cin=cin, cout=self.conv_res1.weight.shape[0], flavor=self.flavor, resample=self.resample,
                    heads=self.heads)

    def forward(self, x):
        if self.resample == "down":                               # EDM2 resample filter [1, 1]: box / nearest
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)                               # pixel norm (EDM2 encoder blocks)
        y = self.conv_res1(mp_silu(self.conv_res0(mp_silu(x))))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.heads:
            B, C, H, W = x.shape
            qkv = normalize(self.attn_qkv(x).reshape(B, self.heads, C // self.heads, 3, H * W), dim=2)
            q, k, v = (t.transpose(-1, -2).contiguous() for t in qkv.unbind(3))   # [B, heads, L, D]
            o = attention(q, k, v)                                # cosine attention: q, k pixel-normed (EDM2)
            x = mp_sum(x, self.attn_proj(o.transpose(-1, -2).reshape(B, C, H, W)), self.attn_balance)
        return x.clamp(-self.clip_act, self.clip_act)            # EDM2 activation clipping


def run_blocks(blocks, x, ckpt=False):
    for b in blocks:
        x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False) if ckpt and x.requires_grad else b(x)
    return x


class Encoder(nn.Module):
    """Image [B, 1, S, S] -> posterior mean and log-variance [B, C, S/f, S/f]; attention at the bottleneck."""

    def __init__(self, cfg):
        super().__init__()
        ch = [cfg.channels * m for m in mults_of(cfg)]
        kw = dict(res_balance=cfg.res_balance, attn_balance=cfg.attn_balance)
        self.conv_in = MPConv(2, ch[0], 3)                        # image + a constant channel (EDM2's bias stand-in)
        self.blocks, cout = nn.ModuleList(), ch[0]
        for level, c in enumerate(ch):
            if level > 0:
                self.blocks.append(Block(cout, cout, "enc", "down", **kw))
            for _ in range(cfg.blocks):
                self.blocks.append(Block(cout, c, "enc", **kw))
                cout = c
        # radit B.1: bottleneck attention in the encoder too (EDM2 has it only in the decoder's first blocks)
        self.blocks.append(Block(cout, cout, "enc", heads=max(1, cout // cfg.head_channels), **kw))
        self.blocks.append(Block(cout, cout, "enc", **kw))
        self.conv_out = MPConv(cout, 2 * cfg.latent_channels, 1)   # radit B.1: MP 1x1 into the bottleneck
        self.logvar_offset = nn.Parameter(torch.full((cfg.latent_channels,), float(cfg.logvar_init)))
        self.grad_ckpt = cfg.grad_ckpt

    def forward(self, img):
        x = self.conv_in(mp_cat(img, torch.ones_like(img)))
        x = self.conv_out(run_blocks(self.blocks, x, self.grad_ckpt and self.training))
        mean, logvar = x.float().chunk(2, dim=1)
        return mean, (logvar + self.logvar_offset.view(1, -1, 1, 1)).clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """Latents [B, C, h, w] -> image [B, 1, f h, f w]; attention at the bottleneck, no skips from the encoder."""

    def __init__(self, cfg):
        super().__init__()
        ch = [cfg.channels * m for m in mults_of(cfg)]
        kw = dict(res_balance=cfg.res_balance, attn_balance=cfg.attn_balance)
        cout = ch[-1]
        self.conv_in = MPConv(cfg.latent_channels + 1, cout, 1)  # radit B.1: MP 1x1 out of the bottleneck
        self.blocks = nn.ModuleList([Block(cout, cout, "dec", heads=max(1, cout // cfg.head_channels), **kw),
                                     Block(cout, cout, "dec", **kw)])            # EDM2 decoder in0 / in1
        for level in reversed(range(len(ch))):
            if level < len(ch) - 1:
                self.blocks.append(Block(cout, cout, "dec", "up", **kw))
            for _ in range(cfg.blocks):
                self.blocks.append(Block(cout, ch[level], "dec", **kw))
                cout = ch[level]
        self.conv_out = MPConv(cout, 1, 3)
        self.out_gain = nn.Parameter(torch.zeros([]))            # EDM2: learned output gain, zero at init
        self.grad_ckpt = cfg.grad_ckpt

    def forward(self, z):
        x = self.conv_in(mp_cat(z, torch.ones_like(z[:, :1])))
        x = run_blocks(self.blocks, x, self.grad_ckpt and self.training)
        return self.conv_out(x, gain=self.out_gain)


class RadVAE(nn.Module):
    """Encoder + decoder with a diagonal-Gaussian posterior (radit §4.1, App. B.1)."""

    def __init__(self, cfg):
        super().__init__()
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    def forward(self, img, noise=None):
        """-> reconstruction, posterior mean, log-variance; z = mean + std * noise (noise None: z = mean)."""
        mean, logvar = self.encoder(img)
        z = mean if noise is None else mean + (0.5 * logvar).exp() * noise
        return self.decoder(z.to(img.dtype)), mean, logvar

    @torch.no_grad()
    def renormalize_(self):
        for m in self.modules():
            if isinstance(m, MPConv):
                m.renormalize_()


def vae_id(model):
    """A fingerprint of the weights, written into every latent file and decoder file to catch mix-ups."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# The FLUX.2 autoencoder (issue 26 item 4): radit's latent space (radit §5.1, App. B.2 Tables 5-6: 32 x 64 x 64
# latents of a FLUX.2 VAE at 512 px). Written here from the architecture of BFL's reference code
# (github.com/black-forest-labs/flux2, src/flux2/autoencoder.py; diffusers' AutoencoderKLFlux2 agrees), with the
# module names of the released checkpoint (ae.safetensors of huggingface.co/black-forest-labs/FLUX.2-dev), so that
# checkpoint loads unchanged (strict names and shapes). A GroupNorm / SiLU / 3x3-convolution autoencoder with
# single-head attention at the bottleneck of the encoder and of the decoder, f = 8, a diagonal-Gaussian posterior
# of 32 channels, and a BatchNorm2d (no affine) whose running statistics normalise 2x2-patchified latents.

FLUX2_WEIGHTS = "ae.safetensors"                       # the file name in the release and in BFL's loader
FLUX2_REPO = "black-forest-labs/FLUX.2-dev"
FLUX2_GROUPS = 32                                      # GroupNorm groups everywhere (BFL autoencoder.py)
FLUX2_GN_EPS = 1e-6                                    # GroupNorm eps (BFL autoencoder.py)
FLUX2_BN_EPS = 1e-4                                    # the latent BatchNorm's eps (BFL: bn_eps)
FLUX2_PATCH = 2                                        # 2x2 patches before the BatchNorm (BFL: ps = [2, 2])
# radit §5.1: "we repeat the input 3 times and average the decoder's RGB predictions" (equal weights, the paper's
# setting); App. C / Table 8 ablates Luma coefficients (0.29894, 0.58704, 0.11402) instead.
GRAY_WEIGHTS = {"mean": (1 / 3, 1 / 3, 1 / 3), "luma": (0.29894, 0.58704, 0.11402)}


@dataclass(frozen=True)
class Flux2Config:
    """The autoencoder's shape; the defaults are the published configuration (BFL AutoEncoderParams)."""
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    in_channels: int = 3
    out_ch: int = 3


def flux2_norm(c):
    return nn.GroupNorm(FLUX2_GROUPS, c, eps=FLUX2_GN_EPS, affine=True)


class Flux2ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, plus the input (through a 1x1 `nin_shortcut` when the width changes)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = flux2_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = flux2_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Flux2Attn(nn.Module):
    """One attention head over all positions, the full width per head (1x1 q, k, v, proj_out), plus the input.
    Through torch's scaled_dot_product_attention, not kernels.attention: the head is 512 wide at the published
    width, beyond the Triton kernel's 256 (our choice)."""

    def __init__(self, c):
        super().__init__()
        self.norm = flux2_norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(-1, -2) for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)                  # scale 1 / sqrt(C)
        return x + self.proj_out(o.transpose(-1, -2).reshape(B, C, H, W))


class Flux2Down(nn.Module):
    """A stride-2 3x3 conv after zero padding right and bottom only (BFL pads (0, 1, 0, 1) by hand)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Flux2Up(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Flux2Mid(nn.Module):
    """The bottleneck: residual block, attention, residual block (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    def __init__(self, c):
        super().__init__()
        self.block_1 = Flux2ResBlock(c, c)
        self.attn_1 = Flux2Attn(c)
        self.block_2 = Flux2ResBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Flux2Level(nn.Module):
    """One resolution: `block` (residual blocks) and, except at the last level, `downsample` / `upsample`. The
    release's empty `attn` lists hold no tensors and are left out."""

    def __init__(self, widths, resample=None):
        super().__init__()
        self.block = nn.ModuleList([Flux2ResBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        if resample is not None:
            setattr(self, resample[0], resample[1])

    def forward(self, x):
        for b in self.block:
            x = b(x)
        return x


class Flux2Encoder(nn.Module):
    """RGB [B, 3, S, S] in [-1, 1] -> moments [B, 2 z, S/f, S/f] (mean, then log-variance), after `quant_conv`."""

    def __init__(self, c: Flux2Config):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down, cin = nn.ModuleList(), c.ch
        for i, w in enumerate(widths):
            down = ("downsample", Flux2Down(w)) if i < len(widths) - 1 else None      # none after the last level
            self.down.append(Flux2Level([cin] + [w] * c.num_res_blocks, down))
            cin = w
        self.mid = Flux2Mid(cin)
        self.norm_out = flux2_norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * c.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.z_channels, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        x = self.conv_out(F.silu(self.norm_out(self.mid(x))))
        return self.quant_conv(x)


class Flux2Decoder(nn.Module):
    """Raw latents [B, z, h, w] -> RGB [B, 3, f h, f w] (`post_quant_conv` first). `up[i]` is level i counted from
    the full resolution, so the decoder runs up[L-1] ... up[0], each with num_res_blocks + 1 residual blocks."""

    def __init__(self, c: Flux2Config):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)
        cin = widths[-1]
        self.conv_in = nn.Conv2d(c.z_channels, cin, 3, padding=1)
        self.mid = Flux2Mid(cin)
        levels = {}
        for i in reversed(range(len(widths))):
            w = widths[i]
            levels[i] = Flux2Level([cin] + [w] * (c.num_res_blocks + 1), ("upsample", Flux2Up(w)) if i else None)
            cin = w
        self.up = nn.ModuleList([levels[i] for i in range(len(widths))])
        self.norm_out = flux2_norm(cin)
        self.conv_out = nn.Conv2d(cin, c.out_ch, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            x = level(x)
            if hasattr(level, "upsample"):
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


def patchify(z, p=FLUX2_PATCH):
    """[B, C, h, w] -> [B, C p p, h/p, w/p]; channel c p^2 + i p + j holds z[c, p y + i, p x + j] (BFL's order)."""
    B, C, H, W = z.shape
    return z.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4).reshape(B, C * p * p, H // p, W // p)


def unpatchify(z, p=FLUX2_PATCH):
    B, C, H, W = z.shape
    return z.reshape(B, C // (p * p), p, p, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // (p * p), H * p, W * p)


class Flux2AE(nn.Module):
    """encoder, decoder and `bn` (BatchNorm2d over z p^2 channels, no affine; only its running statistics are
    used). `encode` / `decode` give and take RAW latents [B, z, S/8, S/8] (what the latent folder stores, radit
    §5.1: 32 x 64 x 64); `normalize` / `inv_normalize` are BFL's own latent normalisation (2x2 patches, then the
    BatchNorm statistics), which FLUX.2's transformer was trained on."""

    def __init__(self, c: Flux2Config = Flux2Config()):
        super().__init__()
        self.config = c
        self.encoder, self.decoder = Flux2Encoder(c), Flux2Decoder(c)
        self.bn = nn.BatchNorm2d(c.z_channels * FLUX2_PATCH ** 2, eps=FLUX2_BN_EPS, affine=False)

    @property
    def factor(self):
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, rgb):
        """RGB in [-1, 1] -> the posterior mean (BFL's encode keeps only the mean: no sampling)."""
        return self.encoder(rgb)[:, :self.config.z_channels]

    def decode(self, z):
        return self.decoder(z)

    def normalize(self, z):
        """Raw latents [B, z, h, w] -> [B, 4 z, h/2, w/2]: (patchify(z) - running_mean) / sqrt(running_var + eps)."""
        m, v = self.bn.running_mean.view(1, -1, 1, 1), self.bn.running_var.view(1, -1, 1, 1)
        return (patchify(z) - m) / torch.sqrt(v + FLUX2_BN_EPS)

    def inv_normalize(self, zn):
        m, v = self.bn.running_mean.view(1, -1, 1, 1), self.bn.running_var.view(1, -1, 1, 1)
        return unpatchify(zn * torch.sqrt(v + FLUX2_BN_EPS) + m)


def gray_to_rgb(x):
    """CXR [B, 1, S, S] -> [B, 3, S, S]: the grey value in each channel (radit §5.1: "repeat the input 3 times")."""
    return x.expand(-1, 3, -1, -1)


def rgb_to_gray(rgb, weights):
    """[B, 3, S, S] -> [B, 1, S, S] in [-1, 1]: each channel clamped to [-1, 1] (the range FLUX.2's images are
    written in) and then averaged with `weights` (3 numbers, GRAY_WEIGHTS; our choice of order: the average of the
    RGB images FLUX.2 would output)."""
    w = torch.as_tensor(weights, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb.clamp(-1, 1) * w).sum(1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------
# The method: reconstruction + perceptual loss in a frozen ViT's token space + KL (radit Eq. 2, Table 7)

HF_ALIASES = {"raddino": "microsoft/rad-dino", "dinov2": "facebook/dinov2-base"}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


class Perceptual(nn.Module):
    """LPIPS-style distance between token features of a frozen ViT (radit Eq. 2 with Rad-DINO; Hansen-Estruch 2025)."""

    def __init__(self, net, mean, std, size, layers):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.size, self.layers = size, layers
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def features(self, img):
        """[-1, 1] radiographs [B, 1, S, S] -> unit-normalised token features of the chosen layers."""
        x = ((img.float() + 1) / 2).expand(-1, 3, -1, -1)        # greyscale repeated to RGB (radit §5.1)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        hs = self.net(pixel_values=(x - self.mean) / self.std, output_hidden_states=True).hidden_states
        return [normalize(hs[i].float(), dim=-1) for i in self.layers]   # LPIPS: unit length per token

    def forward(self, rec, img):
        """Per-image distance: mean over layers, tokens and channels of squared differences of unit features."""
        with torch.no_grad():
            target = self.features(img)
        return sum(((a - b) ** 2).mean((1, 2)) for a, b in zip(self.features(rec), target)) / len(self.layers)


def load_perceptual(cfg, device):
    """The frozen perceptual network through transformers, or None for --perceptual none."""
    if cfg.perceptual == "none" or cfg.perceptual_weight == 0:
        return None
    repo = HF_ALIASES.get(cfg.perceptual, cfg.perceptual)
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    transformers.logging.set_verbosity_error()
    offline = os.path.isdir(repo) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    try:
        net = AutoModel.from_pretrained(repo, local_files_only=offline)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--perceptual {cfg.perceptual}: transformers model {repo!r} not found locally and not "
                         f"downloadable ({type(e).__name__}); save it with save_pretrained and pass --perceptual "
                         f"DIR, or train without it: --perceptual none") from None
    mean, std, size = *IMAGENET, 224
    try:                                                          # the network's own normalisation and input size
        proc = AutoImageProcessor.from_pretrained(repo, local_files_only=True)
        mean, std = list(proc.image_mean), list(proc.image_std)
        crop = getattr(proc, "crop_size", None) or {}
        size = int(crop.get("height", size)) if isinstance(crop, dict) else size
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    n = AutoConfig.from_pretrained(repo, local_files_only=True).num_hidden_layers
    layers = [int(s) for s in cfg.perceptual_layers.split(",")] if cfg.perceptual_layers else list(range(1, n + 1))
    if not all(0 <= i <= n for i in layers):
        raise SystemExit(f"--perceptual-layers {cfg.perceptual_layers!r}: expected indices in 0..{n} for {repo}")
    return Perceptual(net, mean, std, cfg.perceptual_size or size, layers).to(device)


def vae_loss(model, img, noise, cfg, perceptual=None):
    """Per-image losses [B, 4]: total, reconstruction, perceptual, KL (reductions in fp32)."""
    rec, mean, logvar = model(img, noise)
    diff = rec.float() - img.float()
    l_rec = (diff.abs() if cfg.rec == "l1" else diff ** 2).mean((1, 2, 3))
    l_per = perceptual(rec, img) if perceptual is not None else torch.zeros_like(l_rec)
    l_kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean((1, 2, 3))   # KL(q(z|x) || N(0, I)) per element
    total = l_rec + cfg.perceptual_weight * l_per + cfg.kl_weight * l_kl
    return torch.stack([total, l_rec, l_per, l_kl], 1)


def bicubic_baseline(img, f):
    """The benchmark baseline: bicubic down-sampling by f and back (1 value per f^2 pixels)."""
    small = F.interpolate(img.float(), scale_factor=1 / f, mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(small, size=img.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Data: FORMAT.md §1 datasets (uint16 image shards); per-rank slices of a seeded permutation


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
        raise SystemExit(f"{path}: not readable JSON ({e}); expected {what}") from None


class CXRData:
    """One split of a FORMAT.md §1 dataset ('' or None: every row): shard and index per row as arrays (meta_columns:
    from DIR/meta_index.safetensors when it is fresh, else parsed from meta.csv; no dict per row), uint16 pixels
    read on demand. Every shard the rows name is checked at start (dtype, side, that each row's index is inside
    it): bad data stops before training, not with a size mismatch mid-run. `rows` (dicts) is read on first use."""

    def __init__(self, root, split="train", factor=8):
        path = os.path.join(root, "meta.csv")
        what = f"a dataset folder (meta.csv, shards/, info.json), e.g. from `python prep_data.py phantom --out {root}`"
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: no such file; expected {what}")
        self.info = read_json(os.path.join(root, "info.json"), "the dataset's info.json")
        # the VAE reads pixels only: the 19 variables are not required (codes=False), as before
        cols = meta_columns(root, list(self.info.get("datasets") or []), split or None, what, codes=False)
        if not len(cols["shard"]):
            raise SystemExit(f"{path}: no rows with split={split!r}")
        self.meta_path, self.source = path, cols["source"]
        self.shard, self.index, self.position = cols["shard"], cols["index"], cols["position"]
        self.split_codes, self.splits = cols["split"], cols["splits"]     # split of row k: splits[split_codes[k]]
        self.root, self.folder, self.key = root, root, "images"
        size = int(self.info.get("size", 0))
        if size <= 0 or size % factor:
            raise SystemExit(f"{root}/info.json: images are {size} px; expected a side divisible by {factor} "
                             f"(the VAE down-samples by {factor})")
        self.shape = (1, size, size)
        check_shard_arrays(root, cols, self.key, "U16", self.shape)
        self._open = lru_cache(maxsize=64)(lambda p: safe_open(p, "pt"))

    @cached_property
    def rows(self):
        """This split's meta.csv rows as dicts of strings (every column), in the order of the arrays; read on first
        use only."""
        rows, _ = read_meta(self.meta_path)
        return [rows[int(k)] for k in self.position]

    def in_split(self, name):
        """Bool [n]: which rows are of split `name`."""
        return self.split_codes == (self.splits.index(name) if name in self.splits else -1)

    def shard_path(self, shard):
        path = os.path.join(self.folder, "shards", f"{shard:05d}.safetensors")
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: no such shard")
        return path

    def __len__(self):
        return len(self.shard)

    def load(self, idx):
        """Rows idx -> float32 [n, 1, S, S] in [-1, 1]: (v + 0.5) / 2^15 - 1 for uint16 v."""
        xs = []
        for i in idx:
            shard = self._open(self.shard_path(int(self.shard[int(i)])))
            index = int(self.index[int(i)])
            xs.append(shard.get_slice(self.key)[index:index + 1])
        return to_float(torch.cat(xs))


def to_float(x):
    """uint16 pixels -> [-1, 1] (the mapping rectified_flow.py uses)."""
    return (x.float() + 0.5) / 32768 - 1


def batch_rows(step, n, batch, lo, hi, seed):
    """Dataset rows at global positions [step B + lo, step B + hi) of an endless stream of seeded permutations:
    ranks take disjoint slices of each global batch, and a resumed run continues from the same sample."""
    pos = torch.arange(step * batch + lo, step * batch + hi)
    return torch.stack([permutation(n, seed, int(e))[o] for e, o in zip(pos // n, pos % n)])


@lru_cache(maxsize=4)
def permutation(n, seed, epoch):
    return torch.randperm(n, generator=generator(seed, 1, epoch))


def crop(x, size, offsets=None):
    """size x size crops: at the given per-image (row, col) offsets (patch training), else centred."""
    if not size or size == x.shape[-1]:
        return x
    if offsets is None:
        o = (x.shape[-1] - size) // 2
        return x[..., o:o + size, o:o + size]
    return torch.stack([im[..., r:r + size, c:c + size] for im, (r, c) in zip(x, offsets.tolist())])


def to_uint16(x):
    """[-1, 1] -> uint16 numpy (the inverse of to_float)."""
    levels = ((x.float().clamp(-1, 1) + 1) * 32768).floor().clamp(0, 65535)
    return levels.to(torch.int32).cpu().numpy().astype(np.uint16)


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


# ----------------------------------------------------------------------------------------------------------------
# Training loop: DDP, bf16 autocast, grad accumulation, clipping, EMA, atomic checkpoints, resume, logging

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}   # bf16 dense


def peak_flops(device):
    """The device's dense bf16 peak (FLOP/s) from PEAK_FLOPS, or None (CPU, or a GPU not listed): MFU's denominator."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


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
    """Fill what the data decides (the training side) and check the shapes fit the down-sampling factor."""
    f, s = factor_of(cfg), cfg.image_size or (data.shape[-1] if data else 256)
    if s % f or (data and s > data.shape[-1]):
        limit = f" of at most the data's {data.shape[-1]} px" if data else ""
        raise SystemExit(f"--image-size {s}: expected a multiple of {f}{limit}")
    if cfg.rec not in ("l1", "l2"):
        raise SystemExit(f"--rec {cfg.rec!r}: expected l1 or l2")
    return Config(**{**asdict(cfg), "image_size": s})


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
    write_checkpoint(path, tensors, meta, "vae/1")


def ckpt_file(path):
    """--ckpt: a run folder means RUN/ckpt.safetensors."""
    return os.path.join(path, "ckpt.safetensors") if os.path.isdir(path) else path


def read_checkpoint(path, prefixes=("model.", "ema.", "optim.")):
    """-> (config dict, step, {prefix: {name: tensor}}, param_groups, path); a run folder means RUN/ckpt.safetensors."""
    path = ckpt_file(path)
    what = "a vae.py checkpoint (a run folder or a .safetensors file from training)"
    meta, parts = open_checkpoint(path, "vae/1", what, prefixes)
    return json.loads(meta["config"]), int(meta["step"]), parts, json.loads(meta["param_groups"]), path


def check_compatible(cfg, saved, path):
    for k in ARCH:
        if getattr(cfg, k) != saved.get(k):
            raise SystemExit(f"{path}: checkpoint has {k}={saved.get(k)!r} but this run has {k}={getattr(cfg, k)!r} "
                             f"(another preset); use another --out or --no-resume")


def sample_grid(ema, images, device, path):
    """EMA reconstructions of fixed validation images: rows of original | reconstruction | |difference|."""
    with torch.no_grad(), autocast(device):
        rec = ema(images)[0].float().clamp(-1, 1)
    grid = torch.stack([images, rec, (rec - images).abs() * 2 - 1], 1).flatten(0, 1)
    save_grid(path, grid, ncol=3, labels=["original", "reconstruction", "|difference|"])


def train_flops(model, image_size, device):
    """Training FLOPs per image (3 x forward, counted by torch's FlopCounterMode on one image)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, image_size, image_size, device=device))
    return 3 * counter.get_total_flops()


def lr_at(cfg, step):
    """Linear warm-up to --lr over --warmup steps, then constant (radit Table 7)."""
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))


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


# Counting flags: --sample-every 0 means no grids, --micro-batch 0 the whole per-process batch, --image-size 0 the
# data's side, --warmup 0 none; every other count must be at least 1 (a 0 would divide by zero or do nothing).
POSITIVE = ("batch_size", "max_steps", "log_every", "ckpt_every", "bench_steps", "channels", "blocks",
            "latent_channels", "head_channels")
NON_NEGATIVE = ("micro_batch", "sample_every", "image_size", "warmup")


def train(cfg):
    check_counts(cfg, POSITIVE, NON_NEGATIVE)
    rank, world, device = setup_distributed(cfg.device)
    data = CXRData(cfg.data, "train", factor_of(cfg))
    cfg = resolve(cfg, data)
    ckpt_path = os.path.join(cfg.out, "ckpt.safetensors")
    # A run folder holds this command's checkpoint (or output.json); a dataset or another command's outputs are
    # refused before anything is written. Every rank checks, rank 0 writes (and removes stale .tmp-* files).
    claim_output(cfg.out, {"command": "vae.py train"}, mine=("ckpt.safetensors",), write=rank == 0)
    saved = read_checkpoint(ckpt_path) if cfg.resume and os.path.isfile(ckpt_path) else None
    if saved:
        check_compatible(cfg, saved[0], ckpt_path)
    micro, accum, per_rank = batch_split(cfg.batch_size, cfg.micro_batch, world)

    torch.manual_seed(cfg.seed)                                  # the same initial weights on every rank
    raw = RadVAE(cfg).to(device)
    raw.renormalize_()
    ema = copy.deepcopy(raw).requires_grad_(False).eval()       # fp32 EMA (radit Table 7)
    opt = torch.optim.AdamW(raw.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    step = 0
    if saved:
        _, step, parts, groups, _ = saved
        raw.load_state_dict(parts["model."])
        ema.load_state_dict(parts["ema."])
        load_optimizer(opt, parts["optim."], groups)
        for g in opt.param_groups:                               # the flags of this run win over the saved ones
            g.update(betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    perceptual = load_perceptual(cfg, device)
    model = torch.compile(raw) if cfg.compile else raw          # load, then compile, then wrap in DDP
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in raw.parameters())
    peak = peak_flops(device)
    flops = train_flops(raw, cfg.image_size, device) if peak else None
    if rank == 0:
        os.makedirs(os.path.join(cfg.out, "grids"), exist_ok=True)
        # log.jsonl records are numbered like the checkpoint (the step after the update): keep those up to the
        # step resumed from, drop what a killed run logged after its last checkpoint (all of it on a fresh start)
        resume_log(os.path.join(cfg.out, "log.jsonl"), step)
        write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
        write_json(os.path.join(cfg.out, "env.json"), environment(device, world))
        print(json.dumps(asdict(cfg)))
        print(f"RadVAE-{cfg.size}: {n_params / 1e6:.2f}M parameters, f = {factor_of(cfg)}, "
              f"{cfg.latent_channels} latent channels, {cfg.image_size} px, "
              f"perceptual {cfg.perceptual if perceptual else 'none'}, {len(data)} training images, "
              f"{world} process(es) x {accum} micro-batch(es) of {micro}"
              + (f", resuming at step {step}" if step else ""), flush=True)

    health, stopping = HealthCheck(world, device, ckpt_path), False   # SIGTERM: save at the next check
    val = CXRData(cfg.data, "", factor_of(cfg))                  # fixed grid images: the first 8 non-train rows
    grid_rows = np.flatnonzero(~val.in_split("train"))[:8].tolist() or list(range(min(8, len(val))))
    grid_images = crop(val.load(grid_rows), cfg.image_size).to(device)
    lo = rank * per_rank
    pool = ThreadPoolExecutor(1)                                 # reads the next batch while this one trains
    def fetch(s):
        rows = batch_rows(s, len(data), cfg.batch_size, lo, lo + per_rank, cfg.seed)
        # Patch training when --image-size is below the data's side: random crops, a function of (seed, step).
        offsets = torch.randint(0, data.shape[-1] - cfg.image_size + 1, (cfg.batch_size, 2),
                                generator=generator(cfg.seed, 2, s))[lo:lo + per_rank]
        return rows, pool.submit(lambda: crop(data.load(rows), cfg.image_size, offsets).to(device, non_blocking=True))
    nxt = fetch(step)
    acc = torch.zeros(6, device=device)                          # loss, rec, perceptual, kl sums, count, grad norm
    bad = torch.full((), -1, dtype=torch.long, device=device)    # first step with a non-finite loss
    zshape = (cfg.latent_channels, cfg.image_size // factor_of(cfg), cfg.image_size // factor_of(cfg))
    t_log, t_start, step0, last_log = time.time(), time.time(), step, step
    while step < cfg.max_steps:
        x0 = nxt[1].result()
        nxt = fetch(step + 1)
        # Every rank draws the whole global batch's posterior noise from one (seed, step) generator and keeps its
        # slice: the run is the same for any number of processes and any accumulation.
        g = generator(cfg.seed, 0, step, device=device)
        noise = torch.randn((cfg.batch_size, *zshape), generator=g, device=device)[lo:lo + per_rank]
        for grp in opt.param_groups:
            grp["lr"] = lr_at(cfg, step)
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            sync = nullcontext() if world == 1 or m == accum - 1 else model.no_sync()
            with sync:
                with autocast(device):
                    losses = vae_loss(model, x0[sl], noise[sl], cfg, perceptual)
                (losses[:, 0].mean() / accum).backward()
            acc[:4] += losses.detach().sum(0)
            acc[4] += len(losses)
            bad = torch.where((bad < 0) & ~losses.isfinite().all(), step + 1, bad)
        gnorm = nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip)
        acc[5] += gnorm
        opt.step()
        opt.zero_grad(set_to_none=True)
        raw.renormalize_()                                       # forced weight normalisation (EDM2 §2.3)
        decay = ema_decay(step, cfg.ema)                         # warm-up: early grids are not the init
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
            n_steps, last_log, cnt = step - last_log, step, max(a[4], 1)
            rec = {"step": step, "loss": a[0] / cnt, "rec": a[1] / cnt, "perceptual": a[2] / cnt, "kl": a[3] / cnt,
                   "grad_norm": a[5] / max(n_steps * world, 1), "lr": opt.param_groups[0]["lr"],
                   "img_s": n_steps * cfg.batch_size / dt, "px_s": n_steps * cfg.batch_size * cfg.image_size ** 2 / dt,
                   "mfu": flops * n_steps * cfg.batch_size / dt / (peak * world) if peak else None,
                   "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                   "eta_s": (cfg.max_steps - step) * (time.time() - t_start) / (step - step0)}
            if rank == 0:
                fields = [("rec", f"{rec['rec']:.4f}"), ("perc", f"{rec['perceptual']:.5f}"),
                          ("kl", f"{rec['kl']:.3f}")]
                write_log(os.path.join(cfg.out, "log.jsonl"), rec, log_line(rec, cfg.max_steps, fields))
            acc.zero_()
            t_log = time.time()
        if rank == 0 and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps):   # 0: never
            sample_grid(ema, grid_images, device, os.path.join(cfg.out, "grids", f"{step:07d}.png"))
        if ckpt_now and rank == 0:
            save_checkpoint(ckpt_path, raw, ema, opt, cfg, step)
        if stopping:                                             # the all-reduced flag: the one the save used
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
    """Training steps, encoding and decoding on random tensors: img/s, MFU, peak memory."""
    check_counts(cfg, POSITIVE, NON_NEGATIVE)
    _, _, device = setup_distributed(cfg.device)
    cfg = resolve(cfg)
    model = RadVAE(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    B, n_params, s = cfg.micro_batch or cfg.batch_size, sum(p.numel() for p in model.parameters()), cfg.image_size
    x = torch.rand(B, 1, s, s, device=device) * 2 - 1
    peak = peak_flops(device)
    flops = train_flops(model, s, device)
    fwd = torch.compile(model) if cfg.compile else model
    print(f"bench RadVAE-{cfg.size}: {n_params / 1e6:.1f}M params, batch {B}, {s} px, {device}"
          + (", torch.compile" if cfg.compile else "") + " (perceptual loss not included)")

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(cfg.bench_steps + 2):                     # 2 warm-up steps (compilation, autotuning)
            if i == 2:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.time()
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return (time.time() - t0) / cfg.bench_steps, peak_gb

    def step():
        with autocast(device):
            side = s // factor_of(cfg)
            noise = torch.randn(B, cfg.latent_channels, side, side, device=device)
            loss = vae_loss(fwd, x, noise, cfg)
        loss[:, 0].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.renormalize_()
    results = {}
    dt, mem = timed(step)
    results["train_img_s"] = B / dt
    print(f"  train  {B / dt:10.2f} img/s  " + (f"MFU {flops * B / dt / peak:.1%}  " if peak else "MFU n/a  ")
          + (f"peak mem {mem:.2f} GB" if mem else "peak mem n/a (CPU)"), flush=True)
    model.eval()
    with torch.no_grad(), autocast(device):
        z = model.encoder(x)[0]
        for name, fn in (("encode", lambda: model.encoder(x)), ("decode", lambda: model.decoder(z))):
            dt, mem = timed(fn)
            results[f"{name}_img_s"] = B / dt
            print(f"  {name} {B / dt:10.2f} img/s  " + (f"peak mem {mem:.2f} GB" if mem else ""), flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Inference: evaluate (radit Table 2), encode datasets to latent shards, the standalone decoder, decode


def load_for_inference(icfg):
    """EMA model and config from a checkpoint."""
    check_counts(icfg, positive=("batch_size",), non_negative=("n",))          # --n 0: the whole split
    rank, world, device = setup_distributed(icfg.device)
    saved, step, parts, _, path = read_checkpoint(icfg.ckpt, prefixes=("ema.",))
    cfg = Config(**saved)
    model = RadVAE(cfg)
    try:
        model.load_state_dict(parts["ema."])
    except RuntimeError as e:
        raise SystemExit(f"{path}: EMA weights do not fit its own config ({str(e).splitlines()[0]})") from None
    return cfg, model.to(device).eval().requires_grad_(False), rank, world, device, step


def reconstruct(model, x, device):
    with torch.no_grad(), autocast(device):
        return model(x.to(device))[0].float().clamp(-1, 1)


def fmt_fd(v):
    return "-" if v is None else f"{v:.4f}"


def evaluate(icfg):
    """PSNR, SSIM and reconstruction FD of EMA reconstructions vs the originals, and the bicubic x f baseline."""
    import metrics                                               # evaluation only: psnr / ssim / FD from metrics.py
    # --out: a results folder, this command's or new. Checked here, before the work; claimed (output.json written)
    # at the end, so a refused input leaves nothing behind. (A missing checkpoint is load_for_inference's error.)
    record = None
    if icfg.out and os.path.isfile(ckpt_file(icfg.ckpt)):
        record = {"command": "vae.py evaluate", "ckpt_sha256": file_sha256(ckpt_file(icfg.ckpt)), "data": icfg.data,
                  "split": icfg.split, "n": icfg.n, "fd_features": icfg.fd_features}
        claim_output(icfg.out, record, write=False)
    cfg, model, rank, world, device, step = load_for_inference(icfg)
    f = factor_of(cfg)
    data = CXRData(icfg.data, icfg.split, f)
    n = min(icfg.n or len(data), len(data))
    res = {"model": {"psnr": [], "ssim": [], "fake": []}, f"bicubic x{f}": {"psnr": [], "ssim": [], "fake": []}}
    real = []
    for k in range(0, n, icfg.batch_size):
        x = data.load(range(k, min(n, k + icfg.batch_size)))
        outs = {"model": reconstruct(model, x, device).cpu(), f"bicubic x{f}": bicubic_baseline(x, f)}
        x01 = (x + 1) / 2
        real.append(x01)
        for name, y in outs.items():                             # metrics on [0, 1] images, data_range 1
            y01 = (y + 1) / 2
            res[name]["psnr"].append(torch.atleast_1d(metrics.psnr(x01, y01)))
            if x.shape[-1] >= 11:                  # SSIM's 11-pixel window
                ssim = torch.atleast_1d(metrics.ssim(x01, y01))
            else:
                ssim = torch.full((len(x),), float("nan"))
            res[name]["ssim"].append(ssim)
            res[name]["fake"].append(y01)
    rows, fd_note = {}, ""
    ex = None
    if icfg.fd_features != "none":
        try:
            ex = metrics.get_extractor(icfg.fd_features, icfg.weights_dir, device=device)
        except metrics.WeightsMissing as e:
            fd_note = f"rFD skipped: {e}"
    if ex is not None:
        fr = metrics.extract_features(torch.cat(real), ex, batch_size=icfg.batch_size)
    for name, r in res.items():
        fd = None
        if ex is not None:
            fake = metrics.extract_features(torch.cat(r["fake"]), ex, batch_size=icfg.batch_size)
            fd = float(metrics.frechet_distance(fr, fake))
        rows[name] = {"psnr": float(torch.cat(r["psnr"]).double().mean()),
                      "ssim": float(torch.cat(r["ssim"]).double().mean()),
                      "rfd": fd}
    out = {"ckpt": icfg.ckpt, "step": step, "data": icfg.data, "split": icfg.split, "n": n,
           "image_size": data.shape[-1], "fd_features": icfg.fd_features if ex is not None else None, "rows": rows}
    print(f"| Model | rFD ({icfg.fd_features}) | PSNR | SSIM |   "
          f"[{n} {icfg.split or 'all'} images, {data.shape[-1]} px, step {step}]")
    print("|---|---|---|---|")
    for name, r in rows.items():
        label = f"RadVAE-{cfg.size}" if name == "model" else name
        print(f"| {label} | {fmt_fd(r['rfd'])} | {r['psnr']:.3f} | {r['ssim']:.4f} |")
    if fd_note:
        print(fd_note)
    if record:
        claim_output(icfg.out, record, write=rank == 0)
        if rank == 0:
            write_json(os.path.join(icfg.out, "vae_eval.json"), out)
    return out


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


def decoder_spec(cfg, model, name):
    return {"format": "radvae-decoder/1", "vae": name, "vae_id": vae_id(model), "latent_channels": cfg.latent_channels,
            "factor": factor_of(cfg), "res_balance": cfg.res_balance, "attn_balance": cfg.attn_balance, "clip_act": 256,
            "blocks": [b.spec() for b in model.decoder.blocks], "config": asdict(cfg)}


def baked_decoder_weights(dec):
    """Effective weights of every MPConv of the decoder: normalised, fan-in scaled, gains and mp_cat folded in."""
    out = {}
    for name, m in dec.named_modules():
        if isinstance(m, MPConv):
            out[name] = m.effective_weight(dec.out_gain.float() if name == "conv_out" else 1.0).detach().float()
    c = dec.conv_in.weight.shape[1] - 1                          # mp_cat(z, ones) = cat(wa z, wb 1): fold wa, wb
    s = math.sqrt((c + 1) / 0.5)
    out["conv_in"] = torch.cat([out["conv_in"][:, :c] * (s / math.sqrt(c) * 0.5), out["conv_in"][:, c:] * (s * 0.5)], 1)
    return {k: v.cpu().contiguous() for k, v in out.items()}


class ExportDecoder(nn.Module):
    """The decoder as torch.export sees it: raw latents -> images in [-1, 1] (fp32, reference attention on CPU)."""

    def __init__(self, dec):
        super().__init__()
        self.dec = dec

    def forward(self, z):
        return self.dec(z.float()).clamp(-1, 1)


class ExportEncoder(nn.Module):
    """The encoder as torch.export sees it: images in [-1, 1] -> raw posterior-mean latents (fp32)."""

    def __init__(self, enc):
        super().__init__()
        self.enc = enc

    def forward(self, img):
        return self.enc(img.float())[0]


def write_encoder(folder, cfg, model, side):
    """encoder.pt2 (torch.export, dynamic batch) in the folder: images [B, 1, side, side] -> raw latents, as
    controlnet.py encodes its condition maps (ChexGen encodes masks with the images' VAE)."""
    enc = ExportEncoder(copy.deepcopy(model.encoder).cpu().float().eval())
    x = torch.zeros(2, 1, side, side)
    prog = torch.export.export(enc, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    atomic_save(os.path.join(folder, "encoder.pt2"), lambda tmp: torch.export.save(prog, tmp))


def write_decoders(folder, cfg, model, name, side):
    """decoder.safetensors (baked weights + spec; safe to load) and decoder.pt2 (torch.export) in the folder. The
    .pt2 program is exported for the folder's latent side (`side` x `side`) with a dynamic batch size."""
    spec = decoder_spec(cfg, model, name)
    weights = baked_decoder_weights(model.decoder)
    atomic_save(os.path.join(folder, "decoder.safetensors"),
                lambda tmp: save_file(weights, tmp, metadata={"spec": json.dumps(spec)}))
    dec = ExportDecoder(copy.deepcopy(model.decoder).cpu().float().eval())
    z = torch.zeros(2, cfg.latent_channels, side, side)
    prog = torch.export.export(dec, (z,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    atomic_save(os.path.join(folder, "decoder.pt2"),
                lambda tmp: torch.export.save(prog, tmp, extra_files={"radvae_decoder.json": json.dumps(spec)}))
    return spec


# ----------------------------------------------------------------------------------------------------------------
# The released FLUX.2 autoencoder from a local folder (issue 26 item 4): names and shapes checked, nothing renamed

FLUX2_GET = (f"the FLUX.2 autoencoder weights {FLUX2_WEIGHTS} of huggingface.co/{FLUX2_REPO} (a gated repository: "
             f"accept its licence there, then `hf download {FLUX2_REPO} {FLUX2_WEIGHTS} --local-dir DIR` and pass "
             f"--weights DIR)")


def flux2_weights_file(weights):
    """--weights: a folder holding ae.safetensors, or a .safetensors file itself."""
    if not weights:
        raise SystemExit(f"--weights: not given; expected the folder holding {FLUX2_GET}")
    if weights.endswith((".safetensors", ".sft")) and not os.path.isdir(weights):
        return weights
    return os.path.join(weights, FLUX2_WEIGHTS)


def flux2_layout(c):
    """{name: shape} of every tensor of the autoencoder at config `c` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Flux2AE(c)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def flux2_config_of(shapes, path):
    """The Flux2Config a checkpoint's tensor shapes imply (the release: the published config; tests: tiny ones)."""
    try:
        ch, cin = shapes["encoder.conv_in.weight"][:2]
        levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
        blocks = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
        mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
        return Flux2Config(ch=ch, ch_mult=mult, num_res_blocks=blocks, z_channels=shapes["decoder.conv_in.weight"][1],
                           in_channels=cin, out_ch=shapes["decoder.conv_out.weight"][0])
    except (KeyError, ValueError, IndexError) as e:
        raise SystemExit(f"{path}: not the FLUX.2 autoencoder's layout ({type(e).__name__}: {e}); expected "
                         f"{FLUX2_GET}") from None


def load_flux2(weights, device="cpu"):
    """-> (Flux2AE in eval mode, fp32, on `device`; the weights file; its sha256). The file's tensors must be exactly
    the model's names and shapes (the release's; `bn.num_batches_tracked` may be absent: it is never read)."""
    path = flux2_weights_file(weights)
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such file; expected {FLUX2_GET}")
    try:
        with safe_open(path, "pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            cfg = flux2_config_of(shapes, path)
            want = flux2_layout(cfg)
            want_names = set(want) - ({"bn.num_batches_tracked"} - set(shapes))
            missing, extra = sorted(want_names - set(shapes)), sorted(set(shapes) - want_names)
            wrong = [k for k in sorted(want_names & set(shapes)) if want[k] != shapes[k]]
            if missing or extra or wrong:
                raise SystemExit(f"{path}: not the FLUX.2 autoencoder's layout ({len(missing)} missing, e.g. "
                                 f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}; {len(wrong)} of another "
                                 f"shape, e.g. {wrong[:2]}); expected {FLUX2_GET}")
            sd = {k: fh.get_tensor(k) for k in shapes}
    except (SafetensorError, OSError) as e:
        raise SystemExit(f"{path}: not a readable safetensors file ({e}); expected {FLUX2_GET}") from None
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}   # released dtype -> fp32 (ours)
    sd.setdefault("bn.num_batches_tracked", torch.tensor(0))
    with torch.device("meta"):
        model = Flux2AE(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False), path, file_sha256(path)


def gray_weights_of(name):
    if name not in GRAY_WEIGHTS:
        raise SystemExit(f"--to-gray {name!r}: expected one of {list(GRAY_WEIGHTS)} (radit §5.1, Table 8)")
    return GRAY_WEIGHTS[name]


class Flux2ExportDecoder(nn.Module):
    """decoder.pt2 of a FLUX.2 latent folder: raw latents [B, 32, h, w] -> grey images [B, 1, 8h, 8w] in [-1, 1]."""

    def __init__(self, ae, weights):
        super().__init__()
        self.decoder = ae.decoder
        self.register_buffer("gray", torch.tensor(weights, dtype=torch.float32))

    def forward(self, z):
        return rgb_to_gray(self.decoder(z.float()), self.gray)


class Flux2ExportEncoder(nn.Module):
    """encoder.pt2 of a FLUX.2 latent folder: grey images [B, 1, S, S] in [-1, 1] -> raw posterior means."""

    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def forward(self, img):
        return self.ae.encode(gray_to_rgb(img.float()))


def write_flux2_programs(folder, ae, weights, side):
    """decoder.pt2 and encoder.pt2 (torch.export, dynamic batch) of the FLUX.2 autoencoder, at `side` px: the
    readers of a latent folder (rectified_flow.py sample / edit, controlnet.py) run them unchanged."""
    ae = copy.deepcopy(ae).cpu().float().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    z = torch.zeros(2, ae.config.z_channels, side // ae.factor, side // ae.factor)
    prog = torch.export.export(Flux2ExportDecoder(ae, weights), (z,), dynamic_shapes=({0: batch},))
    atomic_save(os.path.join(folder, "decoder.pt2"), lambda tmp: torch.export.save(prog, tmp))
    x = torch.zeros(2, 1, side, side)
    prog = torch.export.export(Flux2ExportEncoder(ae), (x,), dynamic_shapes=({0: batch},))
    atomic_save(os.path.join(folder, "encoder.pt2"), lambda tmp: torch.export.save(prog, tmp))


@dataclass
class LatentSource:
    """What `encode` needs of an autoencoder (a vae.py run or the released FLUX.2 one)."""
    encode: object          # images [B, 1, S, S] in [-1, 1] -> raw posterior means [B, C, S/f, S/f]
    vid: str                # the fingerprint written into info.json and every latent shard
    channels: int
    factor: int
    write_files: object     # (folder, name, image side) -> writes the decoder / encoder files of the folder
    info: dict              # this autoencoder's info.json entries (decoder file names, where the weights are)
    files: str              # the files write_files writes, for the closing line
    rank: int
    world: int
    device: object


def radvae_source(icfg):
    """A vae.py checkpoint (EMA weights): decoder.safetensors, decoder.pt2 and encoder.pt2 in the folder."""
    cfg, model, rank, world, device, step = load_for_inference(icfg)
    f = factor_of(cfg)

    def write_files(folder, name, side):
        write_decoders(folder, cfg, model, name, side // f)
        write_encoder(folder, cfg, model, side)
    info = {"decoder": "decoder.pt2", "encoder": "encoder.pt2", "decoder_safetensors": "decoder.safetensors",
            "ckpt": os.path.abspath(icfg.ckpt), "step": step}
    return LatentSource(lambda x: model.encoder(x)[0], vae_id(model), cfg.latent_channels, f, write_files, info,
                        "decoders decoder.safetensors + decoder.pt2, encoder encoder.pt2", rank, world, device)


def flux2_source(icfg):
    """The released FLUX.2 autoencoder (--weights): grey repeated to RGB on the way in (radit §5.1); the folder gets
    decoder.pt2 (RGB prediction -> grey by --to-gray) and encoder.pt2, and no decoder.safetensors: its format is
    RadVAE's decoder. The readers then take decoder.pt2 (said in one line), and info.json names the weights file
    and its sha256, from which `vae.py decode --vae flux2 --weights DIR` decodes with nothing unpickled."""
    check_counts(icfg, positive=("batch_size",))
    gray = gray_weights_of(icfg.to_gray)
    rank, world, device = setup_distributed(icfg.device)
    ae, path, sha = load_flux2(icfg.weights, device)
    info = {"decoder": "decoder.pt2", "encoder": "encoder.pt2", "decoder_safetensors": None,
            "ckpt": os.path.abspath(path), "step": None, "vae_type": "flux2", "weights": os.path.abspath(path),
            "weights_sha256": sha, "flux2_config": asdict(ae.config), "to_gray": icfg.to_gray,
            "gray_weights": list(gray), "input": "grey repeated to RGB (radit §5.1)"}
    return LatentSource(lambda x: ae.encode(gray_to_rgb(x)), flux2_id(sha), ae.config.z_channels, ae.factor,
                        lambda folder, name, side: write_flux2_programs(folder, ae, gray, side), info,
                        f"decoder decoder.pt2 (FLUX.2, RGB {icfg.to_gray} -> grey), encoder encoder.pt2", rank, world,
                        device)


def flux2_id(sha):
    """The vae_id of FLUX.2 latents: from the weights file's sha256 (the latents depend on nothing else)."""
    return "flux2-" + sha[:16]


def encode(icfg):
    """Posterior means of every meta.csv row -> DATA/latents/<name>/ (FORMAT.md §7); resumable, shards per rank."""
    if icfg.vae not in ("radvae", "flux2"):
        raise SystemExit(f"--vae {icfg.vae!r}: expected radvae (a vae.py run, --ckpt) or flux2 (--weights)")
    name = icfg.name or icfg.vae
    # DATA/latents/<name>/ by design (FORMAT.md §7); the name must stay a folder name inside DATA/latents/
    folder = file_in(os.path.join(icfg.data, "latents"), name, where="--name")
    src = radvae_source(icfg) if icfg.vae == "radvae" else flux2_source(icfg)
    rank = src.rank
    world = src.world
    device = src.device
    f = src.factor
    vid = src.vid
    data = CXRData(icfg.data, "", f)
    info_path = os.path.join(folder, "info.json")
    if os.path.isfile(info_path) and read_json(info_path, "").get("vae_id") != vid:
        raise SystemExit(f"{info_path}: holds latents of another VAE (vae_id {read_json(info_path, '').get('vae_id')}, "
                         f"this checkpoint {vid}); use another --name or delete the folder")
    s = data.shape[-1]
    shape = [src.channels, s // f, s // f]
    if rank == 0:
        src.write_files(folder, name, s)
    shards = sorted(set(data.shard.tolist()))
    meta = {"format": "vae.py-latents/1", "vae": name, "vae_id": vid}
    t0, done = time.time(), 0
    for shard in shards[rank::world]:
        path = os.path.join(folder, "shards", f"{shard:05d}.safetensors")
        if os.path.isfile(path):
            with safe_open(path, "pt") as fh:
                if (fh.metadata() or {}).get("vae_id") == vid:
                    continue                                     # written by an earlier run of this encode
        with safe_open(data.shard_path(shard), "pt") as fh:
            imgs = fh.get_slice("images")
            n = imgs.get_shape()[0]
            zs = []
            for k in range(0, n, icfg.batch_size):
                x = to_float(imgs[k:min(n, k + icfg.batch_size)]).to(device)
                with torch.no_grad(), autocast(device):
                    zs.append(src.encode(x).float().cpu())
        z = torch.cat(zs).contiguous()
        atomic_save(path, lambda tmp: save_file({"latents": z}, tmp, metadata=meta))
        done += n
        rate = done / (time.time() - t0)
        print(f"rank {rank}: shard {shard:05d} ({n} images) -> {path}; {rate:.1f} img/s", flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:                                                # stats from the shards themselves (float64)
        by_shard = {}
        train = data.in_split("train")
        stats_all = not train.any()                              # no train rows: the stats of all rows
        for k in np.flatnonzero(train | stats_all).tolist():
            by_shard.setdefault(int(data.shard[k]), []).append(int(data.index[k]))
        s1 = torch.zeros(shape[0], dtype=torch.float64)
        s2, cnt = s1.clone(), 0
        for shard, idx in by_shard.items():
            with safe_open(os.path.join(folder, "shards", f"{shard:05d}.safetensors"), "pt") as fh:
                z = fh.get_tensor("latents")[torch.tensor(idx)].double()
            s1 += z.sum((0, 2, 3))
            s2 += (z ** 2).sum((0, 2, 3))
            cnt += z.shape[0] * z.shape[2] * z.shape[3]
        mean = s1 / cnt
        std = (s2 / cnt - mean ** 2).clamp_min(0).sqrt()
        write_json(info_path, {"format_version": 1, "vae": name, "vae_id": vid, "shape": shape,
                               "mean": mean.tolist(), "std": std.tolist(),
                               "stats_rows": "all" if stats_all else "train",
                               "image_size": s, "factor": f, "n": len(data), **src.info,
                               "dtype": "float32", "posterior": "mean"})
        print(f"wrote {folder}: {len(data)} latents of shape {shape}, per-channel mean/std over "
              f"{cnt // (shape[1] * shape[2])} train rows, {src.files}", flush=True)
    return folder


def decoder_candidates(icfg):
    """--decoder, else the folder of the --latents file and the one above it (where a latent folder would be)."""
    if icfg.decoder:
        return [icfg.decoder]
    here = os.path.dirname(os.path.abspath(icfg.latents))
    return [here, os.path.dirname(here)]


def find_decoder(icfg):
    """--decoder (a latent folder or decoder.safetensors), else the latent folder the --latents file lives in."""
    cands = decoder_candidates(icfg)
    for c in cands:
        p = os.path.join(c, "decoder.safetensors") if os.path.isdir(c) else c
        if os.path.isfile(p):
            return p
    raise SystemExit(f"--decoder {icfg.decoder or '(not given)'}: no decoder.safetensors found in {cands}; "
                     f"expected a latent folder written by vae.py encode")


def flux2_decoder(icfg, device):
    """--vae flux2: the decoder read from the --weights safetensors (nothing unpickled) -> (decode, spec, weights
    file); decode(z): raw latents [B, 32, h, w] -> grey images [B, 1, 8h, 8w] in [-1, 1] (RGB by --to-gray)."""
    gray = gray_weights_of(icfg.to_gray)
    ae, path, sha = load_flux2(icfg.weights, device)
    spec = {"vae": "flux2", "vae_id": flux2_id(sha), "latent_channels": ae.config.z_channels}
    return (lambda z: rgb_to_gray(ae.decode(z), gray)), spec, path


def flux2_latent_folder(icfg):
    """The latent folder whose info.json holds the mean / std of --normalised FLUX.2 latents: --decoder (a folder),
    else the folder of --latents or the one above it (as find_decoder looks)."""
    cands = decoder_candidates(icfg)
    for c in cands:
        if os.path.isfile(os.path.join(c, "info.json")):
            return c
    raise SystemExit(f"--normalised: no latent folder info.json (mean, std) in {cands}; pass --decoder LATENT_FOLDER")


def decode(icfg):
    """Latent file -> 16-bit PNGs through decoder.safetensors (--vae flux2: the FLUX.2 weights); rows split across
    ranks, existing PNGs skipped."""
    if not icfg.latents or not os.path.isfile(icfg.latents):
        raise SystemExit(f"--latents {icfg.latents!r}: no such file; expected a safetensors file with `latents` "
                         f"[N, C, h, w]")
    if not icfg.out:
        raise SystemExit("--out: expected the output folder for the PNGs")
    check_counts(icfg, positive=("batch_size",))
    rank, world, device = setup_distributed(icfg.device)
    if icfg.vae == "flux2":
        dec, spec, path = flux2_decoder(icfg, device)
    elif icfg.vae == "radvae":
        path = find_decoder(icfg)
        try:
            dec, spec = load_radvae_decoder(path, device)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    else:
        raise SystemExit(f"--vae {icfg.vae!r}: expected radvae (decoder.safetensors) or flux2 (--weights)")
    try:
        with safe_open(icfg.latents, "pt") as fh:
            meta, keys = fh.metadata() or {}, list(fh.keys())
            key = None                                           # `latents`, else the file's only tensor
            if "latents" in keys:
                key = "latents"
            elif len(keys) == 1:
                key = keys[0]
            if key is None:
                raise SystemExit(f"{icfg.latents}: tensors {keys}; expected one named `latents`")
            z = fh.get_tensor(key).float()
    except (SafetensorError, OSError) as e:
        raise SystemExit(f"{icfg.latents}: not a readable safetensors file ({e}); expected `latents` [N, C, h, w]") \
            from None
    if meta.get("vae_id") and meta["vae_id"] != spec["vae_id"]:
        raise SystemExit(f"{icfg.latents}: latents of another VAE (vae_id {meta['vae_id']}, {meta.get('vae')!r}); "
                         f"the decoder {path} is vae_id {spec['vae_id']} ({spec['vae']!r})")
    if z.ndim != 4 or z.shape[1] != spec["latent_channels"]:
        raise SystemExit(f"{icfg.latents}: `{key}` has shape {list(z.shape)}; "
                         f"expected [N, {spec['latent_channels']}, h, w]")
    if icfg.normalised:
        folder = os.path.dirname(path) if icfg.vae == "radvae" else flux2_latent_folder(icfg)
        info = read_json(os.path.join(folder, "info.json"), "the latent folder's info.json (mean, std)")
        z = z * torch.tensor(info["std"]).view(1, -1, 1, 1) + torch.tensor(info["mean"]).view(1, -1, 1, 1)
    # The PNG folder records what decides its images (the latents' and the decoder's bytes, --normalised): a rerun
    # with other inputs is refused instead of keeping old PNGs beside new ones under the same names.
    record = {"command": "vae.py decode", "latents_sha256": file_sha256(icfg.latents),
              "decoder_sha256": file_sha256(path), "normalised": icfg.normalised}
    if icfg.vae == "flux2":
        record["to_gray"] = icfg.to_gray                         # the grey conversion decides the images too
    claim_output(icfg.out, record, write=rank == 0)
    if world > 1:                # every rank has checked --out (rank 0 claimed it) before any writes there
        dist.barrier()
    os.makedirs(icfg.out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(icfg.latents))[0]
    todo = [i for i in range(rank, len(z), world) if not os.path.exists(os.path.join(icfg.out, f"{stem}_{i:06d}.png"))]
    for k in range(0, len(todo), icfg.batch_size):
        idx = todo[k:k + icfg.batch_size]
        with torch.no_grad():
            x = dec(z[idx].to(device)).cpu()
        for i, img in zip(idx, x):
            save_png16(os.path.join(icfg.out, f"{stem}_{i:06d}.png"), img)
    if world > 1:
        dist.barrier()
    print(f"rank {rank}: decoded {len(todo)} latents to {icfg.out}", flush=True)
    return len(todo)


# ----------------------------------------------------------------------------------------------------------------
# --dry-run's memory plan (issue 21 item 4)

# The input side of the two aliased perceptual networks when their processor is not here: the crop_size of their
# preprocessor_config.json on the Hub (our reading; load_perceptual takes it from the processor when it is local).
PLAN_PERCEPTUAL_SIDE = {"raddino": 518, "dinov2": 224}


def plan_perceptual(cfg):
    """-> (the frozen perceptual network built from its config on the meta device, or None; a line saying what was
    planned). Offline the weights are not needed, only the config: a local one (as load_perceptual reads it), else
    for the aliases transformers' Dinov2Config defaults (ViT-B/14, 768 wide, 12 blocks: the shape of DINOv2-B and
    of Rad-DINO, whose CLS embedding is 768-dimensional, radit §5)."""
    if cfg.perceptual == "none" or cfg.perceptual_weight == 0:
        return None, "perceptual network: none (--perceptual none)"
    repo = HF_ALIASES.get(cfg.perceptual, cfg.perceptual)
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, Dinov2Config
    transformers.logging.set_verbosity_error()
    try:
        config, where = AutoConfig.from_pretrained(repo, local_files_only=True), "its local config"
    except (OSError, ValueError):
        if cfg.perceptual not in HF_ALIASES:
            return None, f"perceptual network {repo}: NOT planned (no local config; the total below lacks it)"
        config, where = Dinov2Config(), "transformers' Dinov2Config defaults (not found locally)"
    size = PLAN_PERCEPTUAL_SIDE.get(cfg.perceptual, 224)
    try:                                                          # as load_perceptual: the processor's crop size
        crop = getattr(AutoImageProcessor.from_pretrained(repo, local_files_only=True), "crop_size", None) or {}
        size = int(crop.get("height", size)) if isinstance(crop, dict) else size
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    size = cfg.perceptual_size or size
    n = config.num_hidden_layers
    layers = [int(s) for s in cfg.perceptual_layers.split(",")] if cfg.perceptual_layers else list(range(1, n + 1))
    if not all(0 <= i <= n for i in layers):
        raise SystemExit(f"--perceptual-layers {cfg.perceptual_layers!r}: expected indices in 0..{n} for {repo}")
    with torch.device("meta"):
        net = AutoModel.from_config(config)
        perceptual = Perceptual(net, *IMAGENET, size, layers)
    return perceptual, f"perceptual network {repo}: frozen, from {where}, at {size} px, {len(layers)} layer(s)"


class _PlanVAE(nn.Module):
    """What a rank keeps on the GPU in train(): the trained VAE and the frozen perceptual network (no
    discriminator: radit Eq. 2 has no adversarial term)."""

    def __init__(self, vae, perceptual):
        super().__init__()
        self.vae, self.perceptual = vae, perceptual


def plan_memory(cfg, perceptual):
    """The memory_plan of one training micro-batch of `cfg` as train() runs it on a GPU: bf16 autocast, AdamW, an
    fp32 EMA of the VAE, the frozen `perceptual` network (plan_perceptual) in the loss. The micro-batch is train()'s
    for WORLD_SIZE processes (1 unless set). Every block is walked (cut=False): the perceptual loss reads the
    network's hidden states by index, which a truncated list would not have."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro, f = batch_split(cfg.batch_size, cfg.micro_batch, world)[0], factor_of(cfg)

    def build(grad_ckpt):
        c = Config(**{**asdict(cfg), "grad_ckpt": grad_ckpt})
        with torch.device("meta"):
            model = _PlanVAE(RadVAE(c), perceptual).train()
        if perceptual is not None:
            perceptual.eval()                                      # as load_perceptual: frozen, in eval mode

        def loss_fn():                                            # a micro-batch on the meta device (see train())
            img = torch.randn(micro, 1, cfg.image_size, cfg.image_size, device="meta")
            side = cfg.image_size // f
            noise = torch.randn(micro, cfg.latent_channels, side, side, device="meta")
            return vae_loss(model.vae, img, noise, cfg, perceptual)[:, 0].mean()
        return model, loss_fn
    return memory_plan(build, micro, world, cut=False)


# ----------------------------------------------------------------------------------------------------------------
# main: subcommand dispatch (train is the default)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in ("train", "evaluate", "encode", "decode") else "train"
    if cmd != "train":
        fn = {"evaluate": evaluate, "encode": encode, "decode": decode}[cmd]
        icfg = InferConfig(**vars(build_parser(InferConfig, f"vae.py {cmd}", fn.__doc__, cmd).parse_args(argv)))
        return fn(icfg)
    cfg = parse_config(argv)
    if cfg.dry_run:
        cfg = resolve(cfg)
        with torch.device("meta"):
            model = RadVAE(cfg)
        n = sum(p.numel() for p in model.parameters())
        print(json.dumps(asdict(cfg)))
        n_encoder = sum(p.numel() for p in model.encoder.parameters())
        n_decoder = sum(p.numel() for p in model.decoder.parameters())
        print(f"RadVAE-{cfg.size}: {n:,} parameters ({n / 1e6:.1f}M: encoder {n_encoder / 1e6:.1f}M, "
              f"decoder {n_decoder / 1e6:.1f}M), f = {factor_of(cfg)}, "
              f"{cfg.latent_channels} latent channels")
        if os.environ.get("MEMORY_PLAN", "1") != "0":             # (the perceptual config is read for the plan only)
            perceptual, line = plan_perceptual(cfg)
            print(f"{line}; VAE at {cfg.image_size} px, no discriminator")
            print_memory_plan(plan_memory(cfg, perceptual))
        else:
            print_memory_plan(None)
        return n
    return bench(cfg) if cfg.bench else train(cfg)


if __name__ == "__main__":
    main()

"""ldm_multicond.py: latent diffusion with the multi-conditional unit (multicond-ldm §3.1-3.2, Fig. 1, App. A.1-A.2).

A U-Net denoiser in the LDM design (Rombach et al. 2022: residual blocks with a timestep embedding, spatial
transformers with self- and cross-attention, down / up paths with skips) predicts the noise (multicond Eq. 2) under
a conditioning sequence C from the multi-conditional unit (multicond §3.2 Eq. 3, App. A.1):
    L: a trainable MLP from the 17-d label vector to one token;
    I: a frozen transformers vision model (ELIXR-C in the paper, not public; e.g. microsoft/rad-dino), its pooled
       feature cached by `embed-images`, then a trainable MLP to one token;
    T: a frozen BERT-style encoder (Bio_ClinicalBERT), the report truncated to 128 tokens, all final hidden states
       cached by `embed-text`;
    each output replaced by its fixed null token with p_L = 0.4, p_I = 0.5, p_T = 0.4, independently (App. A.2);
    tau: a transformer (3 layers, 8 heads, 768 wide, FF 2048) over [L; I; T] -> C of 1 + 1 + 128 = 130 tokens.
DDPM with T = 1000 and betas 0.0015 -> 0.0295 (App. A.2), DDIM sampling, 75 steps, guidance 4 (App. A.2) under any
subset of the three conditions (Table 1), the unconditional branch all three nulls (or a chosen subset).

Embeddings (run once per dataset; training never runs the frozen encoders):
    python ldm_multicond.py embed-text --data data/phantom --text-encoder emilyalsentzer/Bio_ClinicalBERT
    python ldm_multicond.py embed-images --data data/phantom --image-encoder microsoft/rad-dino
Train (no subcommand means train; the run folder holds ckpt.safetensors, log.jsonl, config.json, grids/):
    python ldm_multicond.py --size tiny --max-steps 2000                     # CPU demo on data/phantom
    torchrun --nproc_per_node=8 ldm_multicond.py --size paper --data D --out runs/ldm   # 64x64 latents of vae.py
    python ldm_multicond.py --size tiny --modalities L,T                      # a model without the image encoder
    python ldm_multicond.py --size paper --dry-run                            # parameters, GPU memory per rank
    python ldm_multicond.py --size paper --bench --batch-size 16              # img/s, tokens/s, MFU, peak memory
Sample (EMA weights; 16-bit PNGs + meta.csv with the subset used; resumable; sharded under torchrun):
    python ldm_multicond.py sample --ckpt runs/ldm --cond data/phantom/meta.csv --split train --use L,I,T \
        --cfg 4 --steps 75 --out fake/                          # multicond Table 1: L,I,T | L | I | T | L,T | L,I
    python ldm_multicond.py sample --ckpt runs/ldm --cond D/meta.csv --use L,I,T --guide-against I --out fake/

The 17-d label vector (App. A.1; this file's encoding): the 14 labels in FORMAT.md §5 order as 1 positive,
0 negative, -1 uncertain, a missing label 0 (as "absent", the paper's coding has no separate missing value);
age / 100 (missing -> 0); sex F -1, M +1 (missing 0); race ASIAN 1/3, BLACK 2/3, WHITE 1 (missing 0).
Conditioning image (App. A.1 leaves it open): `--cond-image same-study` takes another image of the same study,
else of the same patient, else the image itself (the phantom has one image per patient: the image itself);
`same-image` always the image itself.
Caches, rows aligned with meta.csv by (shard, index):
    DATA/text/<name>/    info.json {encoder, max_length, hidden_size, column}; shards/*.safetensors `hidden`
                         [n, L_s, C] (zero beyond each text), `lengths` [n], `n_tokens` [n] (dit_text2img.py's layout)
    DATA/images/<name>/  info.json {encoder, dim, size}; shards/*.safetensors `features` float32 [n, F]
Latents DATA/latents/<vae>/ are the ones vae.py `encode` writes. Decoding (sampling, and training grids when
--sample-every is not 0) prefers their decoder.safetensors (plain tensors, the radvae_decoder block: nothing is
unpickled) and falls back to the torch.export decoder.pt2 only when there is none, saying so in one line (a .pt2
program is code: load only decoders you wrote or trust); training with --sample-every 0 opens no decoder. Our
choice: a decoder path in info.json that is absolute or leaves the latent folder is refused, never followed.
Bad input stops with one line before anything is written: a sample --out (or training --out) holding a dataset or
another command's outputs is refused; sample --out records what decides its images (output.json: checkpoint
sha256, seed, --cond file, split, subsets, guidance, steps) and resumes only with the same record.
Checkpoint: one safetensors file, written atomically: model.*, ema.*, optim.* and the config; every random draw is a
function of (seed, step) in training and of (seed, image index) in sampling, so resumes and sharding change nothing.
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
import socket
import sys
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
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


BIOCLINICALBERT = "emilyalsentzer/Bio_ClinicalBERT"          # multicond App. A.1 text encoder
RAD_DINO = "microsoft/rad-dino"                              # stands in for ELIXR-C (not public)


@dataclass
class Config:
    """Model and training configuration; stored in every checkpoint."""
    data: str = arg("data/phantom", "dataset folder (FORMAT.md §1)")
    out: str = arg("runs/ldm", "run folder: ckpt.safetensors, log.jsonl, config.json, env.json, grids/")
    space: str = arg("auto", "pixel | latent | auto (latent when DATA/latents/<vae>/ exists)")
    vae: str = arg("", "latent folder DATA/latents/<vae> to train on (default: the only one)")
    size: str = arg("tiny", "preset: tiny | paper (the LDM/SD-1 U-Net of Rombach et al., multicond App. A.1)")
    channels: int = arg(32, "U-Net base channels")
    channel_mult: str = arg("1,2", "channel multiplier per resolution level")
    res_blocks: int = arg(1, "residual blocks per level")
    attn_levels: str = arg("1", "levels (0 = full resolution) with spatial transformers")
    heads: int = arg(4, "attention heads in the U-Net's spatial transformers")
    dim: int = arg(64, "width of the condition tokens and of tau (multicond App. A.1: 768)")
    tau_layers: int = arg(2, "integration transformer layers (multicond App. A.1: 3)")
    tau_heads: int = arg(4, "integration transformer heads (multicond App. A.1: 8)")
    tau_ff: int = arg(128, "integration transformer feed-forward width (multicond App. A.1: 2048)")
    modalities: str = arg("L,I,T", "conditions the model is trained with (a subset of L,I,T); absent ones stay null")
    text: str = arg("", "text cache DATA/text/<name> (default: the only one)")
    images: str = arg("", "image-feature cache DATA/images/<name> (default: the only one)")
    text_encoder: str = arg("", "expected encoder of the text cache ('': whatever it holds; recorded)")
    image_encoder: str = arg("", "expected encoder of the image cache ('': whatever it holds; recorded)")
    text_dim: int = arg(0, "text encoder width; 0: from the cache (Bio_ClinicalBERT: 768)")
    image_dim: int = arg(0, "image feature width; 0: from the cache (ELIXR-C: 1376, rad-dino: 768)")
    max_length: int = arg(128, "report tokens (multicond App. A.1: the first 128)")
    cond_image: str = arg("same-study", "conditioning image: same-study (another image of the study) | same-image")
    p_l: float = arg(0.4, "probability of the null label token (multicond App. A.2)")
    p_i: float = arg(0.5, "probability of the null image token (multicond App. A.2)")
    p_t: float = arg(0.4, "probability of the null text tokens (multicond App. A.2)")
    schedule: str = arg("sqrt-linear", "betas: sqrt-linear (LDM's 'linear') | linear (the literal reading)")
    beta_start: float = arg(0.0015, "first beta (multicond App. A.2)")
    beta_end: float = arg(0.0295, "last beta (multicond App. A.2)")
    timesteps: int = arg(1000, "diffusion steps T (multicond App. A.2)")
    in_channels: int = arg(0, "input channels; 0: from the data (3 without data, multicond App. A.2)")
    image_size: int = arg(0, "input side in pixels or latent cells; 0: from the data (64 without data)")
    attn: str = arg("kernels", "attention: kernels (kernels.attention) | sdpa (PyTorch)")
    batch_size: int = arg(32, "global batch size")
    micro_batch: int = arg(0, "per-process micro-batch; 0: the whole per-process batch (no accumulation)")
    max_steps: int = arg(1000, "optimizer steps")
    lr: float = arg(5e-4, "AdamW learning rate, constant (multicond App. A.2: 5e-5)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.999, "AdamW beta2")
    weight_decay: float = arg(0.0, "weight decay")
    clip: float = arg(1.0, "gradient-norm clipping")
    ema: float = arg(0.999, "EMA decay")
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


# multicond App. A.1: "the same design as Rombach et al." -- the SD-1 / LDM text-to-image U-Net (320 channels,
# multipliers 1,2,4,4, 2 res blocks, attention at the three finest levels, 8 heads, 768-wide context), tau of
# App. A.1, lr 5e-5 (App. A.2). tiny is for tests and the CPU demo.
PRESETS = {
    "tiny": dict(channels=32, channel_mult="1,2", res_blocks=1, attn_levels="1", heads=4, dim=64, tau_layers=2,
                 tau_heads=4, tau_ff=128, batch_size=32, lr=5e-4, ema=0.999, max_steps=1000),
    "paper": dict(channels=320, channel_mult="1,2,4,4", res_blocks=2, attn_levels="0,1,2", heads=8, dim=768,
                  tau_layers=3, tau_heads=8, tau_ff=2048, batch_size=256, lr=5e-5, ema=0.9999, max_steps=500_000,
                  log_every=100, ckpt_every=5000, sample_every=5000),
}
ARCH = ("channels", "channel_mult", "res_blocks", "attn_levels", "heads", "dim", "tau_layers", "tau_heads", "tau_ff",
        "modalities", "text_dim", "image_dim", "max_length", "in_channels", "image_size", "schedule", "beta_start",
        "beta_end", "timesteps")                                 # must match to resume


@dataclass
class InferConfig:
    """Options of the `sample` subcommand (the model's own config comes from the checkpoint)."""
    ckpt: str = arg("runs/ldm", "run folder or checkpoint file (EMA weights are used)")
    out: str = arg("fake", "output folder: PNGs and meta.csv")
    cond: str = arg("", "meta.csv of the conditions (one image a row; its folder holds the caches); '': none")
    split: str = arg("", "use only the --cond rows of this split ('': all rows)")
    n: int = arg(0, "number of images; 0: one per --cond row (else 16); rows are cycled")
    use: str = arg("L,I,T", "conditions used: a subset of L,I,T (multicond Table 1); the others are null")
    guide_against: str = arg("", "conditions kept in the unconditional branch of CFG ('': all null)")
    cfg: float = arg(4.0, "classifier-free guidance scale w: e_u + w (e_c - e_u) (multicond App. A.2: 4)")
    steps: int = arg(75, "DDIM steps (multicond App. A.2: 75)")
    eta: float = arg(0.0, "DDIM eta (0: deterministic)")
    batch_size: int = arg(16, "images per forward pass, per process")
    seed: int = arg(0, "noise seed: image i always gets the same noise")
    device: str = arg("", "cpu | cuda (default: cuda when available)")


@dataclass
class EmbedConfig:
    """Options of `embed-text` and `embed-images`: cache frozen-encoder outputs for every meta.csv row."""
    data: str = arg("data/phantom", "dataset folder (FORMAT.md §1)")
    text_encoder: str = arg(BIOCLINICALBERT, "transformers text encoder: hub id or local folder", only="embed-text")
    image_encoder: str = arg(RAD_DINO, "transformers vision model: hub id or local folder", only="embed-images")
    name: str = arg("", "cache name under DATA/text/ or DATA/images/ (default: from the encoder)")
    max_length: int = arg(128, "tokens kept (multicond App. A.1: 128)", only="embed-text")
    column: str = arg("report", "meta.csv text column", only="embed-text")
    batch_size: int = arg(64, "rows per encoder call")
    device: str = arg("", "cpu | cuda (default: cuda when available)")


def parse_config(argv):
    """Config = dataclass defaults, then the --size preset, then the flags given explicitly."""
    given = vars(build_parser(Config, "ldm_multicond.py [train]", __doc__).parse_args(argv))
    size = {k.lower(): k for k in PRESETS}.get(given.get("size", Config.size).lower())
    if size is None:
        raise SystemExit(f"--size {given['size']!r}: expected one of {list(PRESETS)}")
    cfg = Config(**{**PRESETS[size], **given, "size": size})
    # counts: 0 means 'off' / 'from the data' only where the help says so (micro-batch, sample-every, the sizes
    # resolved from the data); a zero step count or interval would divide by zero or train nothing
    check_counts(cfg, positive=("batch_size", "max_steps", "log_every", "ckpt_every", "bench_steps", "max_length",
                                "channels", "res_blocks", "heads", "dim", "tau_layers", "tau_heads", "tau_ff",
                                "timesteps"),
                 non_negative=("micro_batch", "sample_every", "in_channels", "image_size", "text_dim", "image_dim"))
    return cfg


def modality_mask(text, where, allowed="L,I,T"):
    """'L,T' -> [True, False, True]; every name must be one of `allowed`."""
    names = [s.strip().upper() for s in text.split(",") if s.strip()]
    ok = [s.strip() for s in allowed.split(",") if s.strip()]
    for s in names:
        if s not in ok:
            raise SystemExit(f"{where} {text!r}: {s!r} is not one of {ok}" + (
                " (the checkpoint was trained without it)" if s in "LIT" else ""))
    return [m in names for m in "LIT"]


# ----------------------------------------------------------------------------------------------------------------
# Model: the multi-conditional unit (multicond §3.2, App. A.1) and the LDM U-Net (Rombach et al. 2022)


def timestep_features(t, dim, max_period=10_000):
    """Sinusoidal features of integer timesteps (LDM's timestep_embedding: cos then sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def attend(q, k, v, key_lengths, impl):
    """softmax(q k^T / sqrt(d)) v over [B, H, L, d] with keys past key_lengths masked: kernels.attention or SDPA."""
    if impl == "sdpa":
        mask = None if key_lengths is None else \
            (torch.arange(k.shape[2], device=k.device)[None] < key_lengths[:, None])[:, None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attention(q, k, v, key_lengths=key_lengths)


class Attention(nn.Module):
    """Multi-head attention of x over ctx (x itself when ctx is None), LDM's CrossAttention (no q/k/v bias)."""

    def __init__(self, dim, ctx_dim, heads):
        super().__init__()
        self.heads, self.impl = heads, "kernels"
        self.q, self.k, self.v = (nn.Linear(d, dim, bias=False) for d in (dim, ctx_dim, ctx_dim))
        self.out = nn.Linear(dim, dim)

    def forward(self, x, ctx=None, key_lengths=None):
        ctx = x if ctx is None else ctx
        B, L, D = x.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, D // self.heads).transpose(1, 2)
        o = attend(split(self.q(x)), split(self.k(ctx)), split(self.v(ctx)), key_lengths, self.impl)
        return self.out(o.transpose(1, 2).reshape(B, L, D))


class TauBlock(nn.Module):
    """Pre-LN transformer layer of the integration transformer tau (multicond App. A.1: 8 heads, FF 2048)."""

    def __init__(self, dim, heads, ff):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))

    def forward(self, x, key_lengths):
        x = x + self.attn(self.norm1(x), key_lengths=key_lengths)
        return x + self.ff(self.norm2(x))


class MultiCondUnit(nn.Module):
    """[L(l); I(i); T(r)] with fixed null tokens -> tau -> C [B, 1 + 1 + n_T, dim] (multicond §3.2 Eq. 3)."""

    def __init__(self, cfg):
        super().__init__()
        D, self.n_text = cfg.dim, cfg.max_length
        self.use = modality_mask(cfg.modalities, "--modalities")
        # L_theta (17-d -> 1 token) and the MLP after the frozen I, each ending in a LayerNorm (our choice; App. A.1
        # says only "MLP"): the token enters tau at the scale of the text encoder's states (BERT's last LayerNorm,
        # ~1 per element). A default-initialised MLP's token is ~0.15 per element, which tau's residual stream washed
        # out: on the 2-class toy, label-only conditioning moved eps by < 1e-5 RMS after 300 steps (RESULTS.md,
        # "Conditioning on the 2-class toy").
        self.label = nn.Sequential(nn.Linear(17, D), nn.SiLU(), nn.Linear(D, D), nn.LayerNorm(D))
        self.image = nn.Sequential(nn.Linear(cfg.image_dim or 1, D), nn.SiLU(), nn.Linear(D, D), nn.LayerNorm(D)) \
            if self.use[1] else None
        # the frozen T's states enter tau as they are when they are dim wide (Bio_ClinicalBERT: 768); another
        # encoder's width gets a trainable linear map (not in the paper, which has no width mismatch)
        self.text = (nn.Identity() if cfg.text_dim == D else nn.Linear(cfg.text_dim, D)) if self.use[2] else None
        # fixed-value null tokens (multicond §3.2): zeros, not trained; tau's position embedding tells them apart
        self.register_buffer("null_l", torch.zeros(1, D))
        self.register_buffer("null_i", torch.zeros(1, D))
        self.register_buffer("null_t", torch.zeros(self.n_text, D))
        self.pos = nn.Parameter(torch.randn(2 + self.n_text, D) * 0.02)
        self.tau = nn.ModuleList(TauBlock(D, cfg.tau_heads, cfg.tau_ff) for _ in range(cfg.tau_layers))
        self.norm = nn.LayerNorm(D)

    def forward(self, labels, img, text, lengths, drop):
        """labels [B, 17], img [B, F] or None, text [B, n_T, C] or None, lengths [B], drop [B, 3] bool (True: null).
        -> C [B, 2 + n_T, dim] fp32 and its valid key count [B]: 2 + the report's length, or 2 + 1 for a null
        report. multicond §3.2 replaces T(r) by "a fixed null token": one valid key (our reading). n_T valid null
        keys outweighed the single label token n_T:1 in every cross-attention, where a real report counts only its
        own tokens (issue 28)."""
        B, n = drop.shape[0], self.n_text
        drop = drop | ~torch.tensor(self.use, device=drop.device)       # a modality the model lacks is always null
        tokens, valid = [], torch.ones((B,), device=drop.device, dtype=torch.long)
        for j, (enc, null, x) in enumerate(((self.label, self.null_l, labels), (self.image, self.null_i, img))):
            e = null.expand(B, 1, -1) if enc is None or x is None else enc(x.float())[:, None]
            tokens.append(torch.where(drop[:, j, None, None], null, e))
        if self.text is None or text is None:
            tokens.append(self.null_t.expand(B, n, -1))
        else:
            pad = torch.arange(n, device=text.device)[None] < lengths[:, None]
            e = self.text(text.float()) * pad[..., None]
            tokens.append(torch.where(drop[:, 2, None, None], self.null_t, e))
            valid = torch.where(drop[:, 2], valid, lengths.long())
        h, key_lengths = torch.cat(tokens, 1) + self.pos, valid + 2
        for blk in self.tau:
            h = blk(h, key_lengths)
        return self.norm(h), key_lengths


def group_norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-5)             # LDM's GroupNorm32 (fewer groups when narrow)


class ResBlock(nn.Module):
    """LDM ResBlock: GN-SiLU-conv, + the timestep embedding, GN-SiLU-conv (zero-initialised), 1x1 skip."""

    def __init__(self, cin, cout, tdim):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(tdim, cout))
        self.out_layers = nn.Sequential(group_norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)

    def forward(self, x, temb):
        h = self.in_layers(x) + self.emb_layers(temb)[:, :, None, None].to(x.dtype)
        return self.skip(x) + self.out_layers(h)


class SpatialTransformer(nn.Module):
    """LDM SpatialTransformer: GN, proj_in, [self-attn, cross-attn to C, GEGLU FF], proj_out (zero), residual."""

    def __init__(self, ch, heads, ctx_dim):
        super().__init__()
        self.norm, self.proj_in = group_norm(ch), nn.Linear(ch, ch)
        self.norm1, self.attn1 = nn.LayerNorm(ch), Attention(ch, ch, heads)
        self.norm2, self.attn2 = nn.LayerNorm(ch), Attention(ch, ctx_dim, heads)
        self.norm3, self.ff_in, self.ff_out = nn.LayerNorm(ch), nn.Linear(ch, 8 * ch), nn.Linear(4 * ch, ch)
        self.proj_out = nn.Linear(ch, ch)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, ctx, key_lengths):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), ctx.to(h.dtype), key_lengths)
        a, g = self.ff_in(self.norm3(h)).chunk(2, dim=-1)
        h = h + self.ff_out(a * F.gelu(g))                               # GEGLU (LDM's FeedForward)
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Conv2d):
    """Strided 3x3 convolution (LDM Downsample)."""

    def __init__(self, ch):
        super().__init__(ch, ch, 3, stride=2, padding=1)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 convolution (LDM Upsample)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def run_layers(layers, h, temb, ctx, key_lengths):
    for layer in layers:
        if isinstance(layer, ResBlock):
            h = layer(h, temb)
        elif isinstance(layer, SpatialTransformer):
            h = layer(h, ctx, key_lengths)
        else:
            h = layer(h)
    return h


class UNet(nn.Module):
    """LDM U-Net eps_theta(z_t, t, C): down path, middle (res, transformer, res), up path with skips."""

    def __init__(self, cfg):
        super().__init__()
        ch, mult = cfg.channels, [int(m) for m in cfg.channel_mult.split(",")]
        attn_levels = {int(a) for a in cfg.attn_levels.split(",") if a.strip()}
        tdim, self.ch, self.grad_ckpt = 4 * ch, ch, cfg.grad_ckpt
        st = lambda c: SpatialTransformer(c, cfg.heads, cfg.dim)
        self.time_embed = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.input_conv = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down, chans, cur = nn.ModuleList(), [ch], ch
        for lvl, m in enumerate(mult):
            for _ in range(cfg.res_blocks):
                layers = [ResBlock(cur, m * ch, tdim)] + ([st(m * ch)] if lvl in attn_levels else [])
                cur = m * ch
                self.down.append(nn.ModuleList(layers))
                chans.append(cur)
            if lvl < len(mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                chans.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, tdim), st(cur), ResBlock(cur, cur, tdim)])
        self.up = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(mult))):
            for j in range(cfg.res_blocks + 1):
                layers = [ResBlock(cur + chans.pop(), m * ch, tdim)] + ([st(m * ch)] if lvl in attn_levels else [])
                cur = m * ch
                if lvl and j == cfg.res_blocks:
                    layers.append(Upsample(cur))
                self.up.append(nn.ModuleList(layers))
        self.out = nn.Sequential(group_norm(cur), nn.SiLU(), nn.Conv2d(cur, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, ctx, key_lengths):
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):      # timestep embedding in fp32
            temb = self.time_embed(timestep_features(t, self.ch))
        def block(layers, h):
            if self.grad_ckpt and self.training:
                return torch.utils.checkpoint.checkpoint(run_layers, layers, h, temb, ctx, key_lengths,
                                                         use_reentrant=False)
            return run_layers(layers, h, temb, ctx, key_lengths)
        h = self.input_conv(x)
        hs = [h]
        for layers in self.down:
            h = block(layers, h)
            hs.append(h)
        h = block(self.mid, h)
        for layers in self.up:
            h = block(layers, torch.cat([h, hs.pop()], 1))
        return self.out(h)


class MultiCondLDM(nn.Module):
    """The U-Net denoiser and the multi-conditional unit trained together (multicond App. A.1)."""

    def __init__(self, cfg):
        super().__init__()
        self.cond, self.unet = MultiCondUnit(cfg), UNet(cfg)
        self.set_attention(cfg.attn)

    def set_attention(self, impl):
        if impl not in ("kernels", "sdpa"):
            raise SystemExit(f"--attn {impl!r}: expected kernels or sdpa")
        for m in self.modules():
            if isinstance(m, Attention):
                m.impl = impl

    def forward(self, x, t, labels, img, text, lengths, drop):
        """x [B, C, H, W], integer t [B], conditions (see MultiCondUnit) -> predicted noise [B, C, H, W]."""
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):
            ctx, key_lengths = self.cond(labels, img, text, lengths, drop)
        return self.unet(x, t, ctx, key_lengths)


def train_flops(cfg, shape, inputs):
    """Training FLOPs of one image, counted once on the meta device: 3 x the forward (fwd + bwd)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        m = MultiCondLDM(cfg)
        m.set_attention("sdpa")
        one = [None if a is None else torch.zeros_like(a[:1], device="meta") for a in inputs]
        with FlopCounterMode(display=False) as fc:
            m(torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long), *one, torch.zeros(1, 3, dtype=torch.bool))
    return 3 * fc.get_total_flops()


# ----------------------------------------------------------------------------------------------------------------
# Method: DDPM schedule and loss (multicond Eq. 1-2, App. A.2), null assignment, guidance, DDIM


class Schedule:
    """T = 1000 betas from 0.0015 to 0.0295 (multicond App. A.2), alpha-bar in float64. 'linear' in the LDM codebase
    (make_beta_schedule) is linear in sqrt(beta) -- diffusers calls it scaled_linear -- and is the default here;
    `--schedule linear` is the literal reading, linear in beta."""

    def __init__(self, T=1000, beta_start=0.0015, beta_end=0.0295, kind="sqrt-linear"):
        if kind == "sqrt-linear":
            self.betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        elif kind == "linear":
            self.betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        else:
            raise SystemExit(f"--schedule {kind!r}: expected sqrt-linear or linear")
        self.T, self.alphas_cumprod = T, torch.cumprod(1 - self.betas, 0)

    def ab(self, t, device):
        """alpha-bar at integer timesteps t, as float32 [B, 1, 1, 1] on device."""
        return self.alphas_cumprod[t.cpu()].float().to(device).view(-1, 1, 1, 1)


def schedule_of(cfg):
    return Schedule(cfg.timesteps, cfg.beta_start, cfg.beta_end, cfg.schedule)


def draw_step(cfg, sched, step, shape, device):
    """The global batch's randomness of one step from one (seed, step) generator: noise, t ~ U{0..T-1}, and the null
    assignment of each modality, independent Bernoulli(p_L), (p_I), (p_T) (multicond §3.2, App. A.2). Ranks slice
    it: any world size and accumulation give one run."""
    g = generator(cfg.seed, 0, step, device=device)
    eps = torch.randn((cfg.batch_size, *shape), generator=g, device=device)
    t = torch.randint(0, sched.T, (cfg.batch_size,), generator=g, device=device)
    p = torch.tensor([cfg.p_l, cfg.p_i, cfg.p_t], device=device)
    drop = torch.rand((cfg.batch_size, 3), generator=g, device=device) < p
    return eps, t, drop, g


def diffusion_loss(model, sched, x0, eps, t, inputs, drop):
    """Per-sample ||eps - eps_theta(z_t, t, C)||^2 (multicond Eq. 2) at z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps."""
    ab = sched.ab(t, x0.device)
    out = model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, *inputs, drop)
    return (out.float() - eps).pow(2).mean(dim=(1, 2, 3))


def guided_eps(model, x, t, inputs, use, against, scale):
    """e_u + w (e_c - e_u) on every channel; e_c nulls the modalities outside `use`, e_u those outside `against`
    (all three by default: the unconditional model)."""
    B = x.shape[0]
    tt = torch.full((B,), int(t), device=x.device, dtype=torch.long)
    keep_c = torch.tensor(use, device=x.device).expand(B, 3)
    if scale == 1.0:
        return model(x, tt, *inputs, ~keep_c).float()
    keep_u = torch.tensor(against, device=x.device).expand(B, 3)
    both = [None if a is None else torch.cat([a, a]) for a in inputs]
    out = model(torch.cat([x, x]), torch.cat([tt, tt]), *both, ~torch.cat([keep_c, keep_u])).float()
    c, u = out.chunk(2)
    return u + scale * (c - u)


def respace(T, steps):
    """`steps` timesteps spread evenly over [0, T - 1], both ends included."""
    if not 1 <= steps <= T:
        raise SystemExit(f"--steps {steps}: expected 1..{T}")
    return sorted(set(np.round(np.linspace(0, T - 1, steps)).astype(int).tolist()))


def ddim_sample(eps_fn, sched, x, steps=75, eta=0.0, gens=None, clip=False):
    """DDIM (Song et al. 2021): x' = sqrt(ab') x0_hat + sqrt(1 - ab' - s^2) e + s z, s = eta sqrt((1 - ab') /
    (1 - ab)) sqrt(1 - ab / ab'), float64 coefficients; x0_hat clipped to [-1, 1] in pixel space (Ho et al. 2020)."""
    ts = respace(sched.T, steps)
    for i in reversed(range(len(ts))):
        ab, ab_prev = float(sched.alphas_cumprod[ts[i]]), float(sched.alphas_cumprod[ts[i - 1]]) if i else 1.0
        e = eps_fn(x, ts[i])
        x0 = (x - math.sqrt(1 - ab) * e) / math.sqrt(ab)
        if clip:
            x0 = x0.clamp(-1, 1)
            e = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * e
        if sigma > 0:
            x = x + sigma * torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)
    return x


def sample_batch(model, sched, noise, inputs, use, against, scale=4.0, steps=75, eta=0.0, gens=None, clip=False):
    """Noise -> samples under the given conditions, with guidance (multicond App. A.2: DDIM 75 steps, w = 4)."""
    def eps_fn(x, t):
        with torch.no_grad(), autocast(x.device):
            return guided_eps(model, x, t, inputs, use, against, scale)
    return ddim_sample(eps_fn, sched, noise, steps, eta, gens, clip)


# ----------------------------------------------------------------------------------------------------------------
# Encoders: frozen transformers text and vision models, and the DATA/text/<name>/, DATA/images/<name>/ caches


def encoder_source(name, flag):
    """A local folder (made absolute) or a hub id; a path that does not exist is a one-line error."""
    if os.path.isdir(name):
        return os.path.abspath(name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SystemExit(f"{flag} {name}: no such folder; expected a transformers model folder (config.json, weights)")
    return name


def hub_online(host="huggingface.co"):
    """False under HF_HUB_OFFLINE=1 / CXR_OFFLINE=1 or when the hub does not resolve: fail fast, no retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("CXR_OFFLINE") == "1":
        return False
    try:
        return bool(socket.getaddrinfo(host, 443))
    except OSError:
        return False


def load_encoder(name, flag, vision=False, device="cpu"):
    """(tokenizer or image preprocessing, frozen encoder) from transformers; safetensors or the library's own
    loader, trust_remote_code off. Offline, a hub id missing from the local cache is a one-line error."""
    src = encoder_source(name, flag)
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        transformers.utils.logging.disable_progress_bar()
        kw = {} if os.path.isdir(src) else {"local_files_only": not hub_online()}
        conf = AutoConfig.from_pretrained(src, **kw)
        if vision:
            conf = getattr(conf, "vision_config", None) or conf
            enc = AutoModel.from_pretrained(src, **kw)
            enc = getattr(enc, "vision_model", enc)                    # CLIP-style: the vision tower only
            size, mean, std = getattr(conf, "image_size", 224), [0.5] * 3, [0.5] * 3
            try:                                                       # the model's own normalisation when shipped
                from transformers import AutoImageProcessor
                proc = AutoImageProcessor.from_pretrained(src, **kw)
                mean, std = list(proc.image_mean), list(proc.image_std)
                s = getattr(proc, "crop_size", None) or proc.size
                size = int(s.get("height") or s.get("shortest_edge")) if isinstance(s, dict) else int(s)
            except (OSError, ValueError, AttributeError, TypeError, KeyError):
                pass
            pre = dict(size=size, mean=mean, std=std, channels=int(getattr(conf, "num_channels", 3)))
        else:
            pre = AutoTokenizer.from_pretrained(src, **kw)
            pre.padding_side = "right"
            enc = AutoModel.from_pretrained(src, **kw)
            enc = enc.get_encoder() if getattr(enc.config, "is_encoder_decoder", False) else enc
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag} {name}: cannot load it ({str(e).splitlines()[0][:200]}); offline, download it "
                         f"where you are online and pass the local folder with {flag} PATH") from None
    return pre, enc.to(device).eval().requires_grad_(False)


def encoder_width(enc):
    return int(getattr(enc.config, "d_model", None) or enc.config.hidden_size)


def tokenize(tok, texts, max_length):
    """-> input ids [n, max_length], valid lengths [n] after truncation, token counts [n] before truncation."""
    n_tokens = torch.tensor([len(ids) for ids in tok(list(texts), truncation=False)["input_ids"]])
    b = tok(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return b["input_ids"], b["attention_mask"].sum(1), n_tokens


def encode_text(enc, ids, lengths):
    """All final hidden states [n, L, C] float32 with the padding zeroed (multicond App. A.1)."""
    dev = next(enc.parameters()).device
    mask = (torch.arange(ids.shape[1], device=dev)[None] < lengths.to(dev)[:, None])
    h = enc(input_ids=ids.to(dev), attention_mask=mask.long()).last_hidden_state.float()
    return h * mask[..., None]


def preprocess_images(x, pre):
    """Model units [n, 1, S, S] in [-1, 1] -> the vision model's input: resized, channels repeated, normalised."""
    x = (x.float() + 1) / 2
    x = F.interpolate(x, size=(pre["size"], pre["size"]), mode="bilinear", antialias=True, align_corners=False)
    x = x.expand(-1, pre["channels"], -1, -1)
    mean = torch.tensor(pre["mean"][:pre["channels"]], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"][:pre["channels"]], device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def encode_images(enc, x):
    """The pooled feature (pooler_output, else the CLS state) [n, F] float32 (multicond App. A.1)."""
    out = enc(pixel_values=x)
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out.last_hidden_state[:, 0]
    return pooled.flatten(1).float()


def cache_folder(root, kind, name="", encoder=""):
    """DATA/<kind>/<name> (when name is '': the only one, or the only one of `encoder`), or None when the dataset
    has no such cache."""
    base = os.path.join(root, kind)
    names = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))) if os.path.isdir(base) else []
    if name:
        if name not in names:
            raise SystemExit(f"{os.path.join(base, name)}: no such cache; found {names} (run embed-{kind})")
        return os.path.join(base, name)
    if len(names) > 1 and encoder:
        info = lambda d: os.path.join(base, d, "info.json")
        names = [d for d in names if os.path.isfile(info(d)) and read_json(info(d), "")["encoder"] == encoder] or names
    if len(names) > 1:
        raise SystemExit(f"{base}: several caches {names}; choose one with --{kind}")
    return os.path.join(base, names[0]) if names else None


def embed(ecfg, kind):
    """Cache a frozen encoder's outputs for every meta.csv row in DATA/<kind>/<name>/, aligned by shard and index;
    resumable (finished shards are kept), sharded over processes under torchrun."""
    check_counts(ecfg, positive=("max_length", "batch_size"))
    rank, world, device = setup_distributed(ecfg.device)
    path = os.path.join(ecfg.data, "meta.csv")
    vision = kind == "images"
    rows = read_meta(path, required=("shard", "index") + (() if vision else (ecfg.column,)))[0]
    if not rows:
        raise SystemExit(f"{path}: no rows; expected one a dataset image")
    check_shards(ecfg.data, rows, "images", "U16", where=path)
    name_in = ecfg.image_encoder if vision else ecfg.text_encoder
    key = os.path.abspath(name_in) if os.path.isdir(name_in) else name_in
    name = ecfg.name or (os.path.basename(key) if os.path.isdir(name_in) else name_in.replace("/", "--"))
    folder = file_in(os.path.join(ecfg.data, kind), name, where="--name")      # the cache stays under DATA/<kind>
    info_path = os.path.join(folder, "info.json")
    want = {"encoder": key} if vision else {"encoder": key, "max_length": ecfg.max_length, "column": ecfg.column}
    if os.path.isfile(info_path):
        old = read_json(info_path, "")
        if any(old.get(k) != v for k, v in want.items()):
            raise SystemExit(f"{info_path}: a cache of {[old.get(k) for k in want]}, not {list(want.values())}; "
                             f"choose another --name or delete it")
    pre, enc = load_encoder(name_in, "--image-encoder" if vision else "--text-encoder", vision, device)
    shards = {}
    for r in rows:
        shards.setdefault(int(r["shard"]), []).append((int(r["index"]), r.get(ecfg.column) or ""))
    t0, done = time.time(), 0
    for s in sorted(shards)[rank::world]:
        out = os.path.join(folder, "shards", f"{s:05d}.safetensors")
        if os.path.exists(out):
            continue
        items = sorted(shards[s])
        n, at = items[-1][0] + 1, torch.tensor([i for i, _ in items])
        if vision:
            with safe_open(os.path.join(ecfg.data, "shards", f"{s:05d}.safetensors"), "pt") as f:
                imgs = f.get_tensor("images")[at]
            feats = []
            for k in range(0, len(items), ecfg.batch_size):
                x = preprocess_images((imgs[k:k + ecfg.batch_size].float() + 0.5) / 32768 - 1, pre).to(device)
                with torch.no_grad(), autocast(device):
                    feats.append(encode_images(enc, x).cpu())
            feats = torch.cat(feats)
            table = torch.zeros(n, feats.shape[1])
            table[at] = feats
            tensors = {"features": table}
        else:
            ids, lengths, n_tok = tokenize(pre, [t for _, t in items], ecfg.max_length)
            L = max(int(lengths.max()), 1)                         # the shard's longest text: the rest is padding
            feats = []
            for k in range(0, len(items), ecfg.batch_size):
                with torch.no_grad(), autocast(device):
                    feats.append(encode_text(enc, ids[k:k + ecfg.batch_size, :L],
                                             lengths[k:k + ecfg.batch_size]).cpu())
            hidden = torch.zeros(n, L, encoder_width(enc), dtype=torch.bfloat16)
            full_len, full_tok = torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
            hidden[at], full_len[at], full_tok[at] = torch.cat(feats).to(torch.bfloat16), lengths.int(), n_tok.int()
            tensors = {"hidden": hidden, "lengths": full_len, "n_tokens": full_tok}
        atomic_save(out, lambda tmp: save_file(tensors, tmp))
        done += len(items)
        print(f"rank {rank}: shard {s}: {len(items)} rows, {done / (time.time() - t0):.1f} rows/s", flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:
        if vision:
            meta = {"format_version": 1, **want, "dim": int(tensors["features"].shape[1]) if done else None,
                    "size": pre["size"], "n": len(rows)}
            if meta["dim"] is None:
                done_path = os.path.join(folder, "shards", f"{min(shards):05d}.safetensors")
                meta["dim"] = int(shard_tensor_shape(done_path, "features", "F32")[1])   # one line if unreadable
        else:
            meta = {"format_version": 1, **want, "hidden_size": encoder_width(enc), "dtype": "bfloat16",
                    "n": len(rows)}
        write_json(info_path, meta)
        print(f"wrote {folder}: {len(rows)} rows", flush=True)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Data: FORMAT.md §1 datasets (pixels or latents/<vae>/), the 17-d label vector, cached text and image features

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]
META_COLUMNS = (["id", "patient_id", "study_id", "split", "dataset", "view", "sex", "age", "race"] + LABELS +
                ["report", "findings", "shard", "index", "source_path"])
SAMPLE_COLUMNS = META_COLUMNS + ["cond_use", "guide_against", "source_id"]
SEX, RACE = {"F": -1.0, "M": 1.0}, {"ASIAN": 1 / 3, "BLACK": 2 / 3, "WHITE": 1.0}
LABEL_COLUMNS = tuple(LABELS) + ("age", "sex", "race")          # what L reads: required columns when L is used


def label_cell(k, cell, where):
    """The k-th entry of the 17-d vector (LABEL_COLUMNS[k]) from its meta.csv cell (None or '': missing)."""
    var, s = LABEL_COLUMNS[k], str(cell or "").strip()
    if k < len(LABELS):
        s = {"1.0": "1", "0.0": "0", "-1.0": "-1"}.get(s, s)
        if s not in ("", "0", "1", "-1"):
            raise SystemExit(f"{where}: {var}={s!r}; expected 1, 0, -1 or empty")
        return float(s) if s else 0.0
    if var == "age":
        years = check_age(s, where)                              # the one age rule: 0-120 years, or empty
        return 0.0 if math.isnan(years) else years / 100
    table = SEX if var == "sex" else RACE
    if s and s not in table:
        raise SystemExit(f"{where}: {var}={s!r}; expected one of {list(table)} or empty")
    return table.get(s, 0.0)


def label_vector(row, where):
    """A meta.csv row -> the 17-d vector of multicond App. A.1 (encoding in the module docstring)."""
    return [label_cell(k, row.get(c), where) for k, c in enumerate(LABEL_COLUMNS)]


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


def latent_info(folder):
    """The latent folder's info.json: shape, per-channel mean / std, and the info itself (its decoder names are
    resolved by the latent_decoder block, only when a decoder is loaded)."""
    li = read_json(os.path.join(folder, "info.json"), "the latent folder's info.json (written by vae.py encode)")
    return dict(shape=tuple(li["shape"]), mean=torch.tensor(li["mean"], dtype=torch.float32).view(-1, 1, 1),
                std=torch.tensor(li["std"], dtype=torch.float32).view(-1, 1, 1), info=li)


LATENT_DTYPES = ("F32", "F16", "BF16")                           # FORMAT.md §7: float32, also float16 / bfloat16


def check_cache(folder, cols, keys, where):
    """A cache's shards (text/, images/) against the rows that read them (`cols`: their shard, index, position
    arrays; `where`: the meta.csv they come from): each key's dtype, and a row for every (shard, index): one line at
    start instead of an IndexError mid-run."""
    for key, dtype in keys:
        try:
            check_shard_arrays(folder, cols, key, dtype, where=where)
        except SystemExit as e:
            raise SystemExit(f"{folder} (a cache of {where}; re-run embed): {e}") from None


def shard_path(folder, shard):
    path = os.path.join(folder, "shards", f"{shard:05d}.safetensors")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such shard")
    return path


def meta_cells(path, columns, positions):
    """Yield the cells of `columns` ('' where meta.csv has no such column) of the meta.csv rows at `positions`
    (ascending, 0-based, blank lines skipped: meta_columns' "position"), one row at a time: a streaming read, so that
    the strings of a million rows are never held at once."""
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


def other_in_group(group, rank):
    """For each row, the row of least `rank` among the other rows of its group (group -1: none), else -1."""
    order = np.lexsort((rank, group))                            # by group, then rank
    g = group[order]
    start = np.concatenate([[0], np.flatnonzero(g[1:] != g[:-1]) + 1]).astype(np.int64)
    size = np.diff(np.concatenate([start, [len(g)]]))
    first, second = order[start], np.where(size > 1, order[np.minimum(start + 1, len(g) - 1)], -1)
    at = np.repeat(np.arange(len(start)), size)                  # each sorted row's group
    out = np.empty(len(group), np.int64)
    out[order] = np.where(first[at] == order, second[at], first[at])
    out[group < 0] = -1
    return out


def conditioning_rows(ids, studies, patients, cond_image):
    """Each row's conditioning image (multicond App. A.1), as a row number: 'same-study' the other image of its
    study with the least id, else of its patient, else itself; 'same-image' itself. ids, studies, patients: one
    string a row, '' for no study / patient."""
    if cond_image not in ("same-study", "same-image"):
        raise SystemExit(f"--cond-image {cond_image!r}: expected same-study or same-image")
    own = np.arange(len(ids), dtype=np.int64)
    if cond_image == "same-image" or not len(ids):
        return own
    rank = np.empty(len(ids), np.int64)
    rank[np.argsort(np.asarray(ids), kind="stable")] = own
    out = own.copy()
    for names in (patients, studies):                            # the study wins: applied last
        names = np.asarray(names)
        uniq, group = np.unique(names, return_inverse=True)
        group = np.where(names == "", -1, group.reshape(-1))
        other = other_in_group(group, rank)
        out = np.where(other >= 0, other, out)
    return out


def dict_columns(rows, all_rows, cond_image, where):
    """Rows as dicts (sampling's --cond rows, tests) -> the arrays CondSource reads (see CondSource)."""
    def number(r, key):
        try:
            return int(r.get(key))
        except (TypeError, ValueError):
            return -1                                            # check_cache names the row when it is read
    position = {id(r): k for k, r in enumerate(all_rows)}
    def arrays(rs):
        return {"shard": np.array([number(r, "shard") for r in rs], np.int64),
                "index": np.array([number(r, "index") for r in rs], np.int64),
                "position": np.array([position.get(id(r), k) for k, r in enumerate(rs)], np.int64)}
    choice = conditioning_rows([r.get("id", "") for r in all_rows], [r.get("study_id") or "" for r in all_rows],
                               [r.get("patient_id") or "" for r in all_rows], cond_image)
    return {"labels": torch.tensor([label_vector(r, f"{where} row id={r.get('id')}") for r in rows]),
            "rows": arrays(rows), "images": arrays([all_rows[choice[position.get(id(r), k)]]
                                                    for k, r in enumerate(rows)]),
            "ids": lambda ks: [rows[k].get("id") for k in ks],
            "reports": (lambda: [r["report"] for r in rows]) if rows and "report" in rows[0] else None}


class CondSource:
    """The conditions of meta.csv rows: 17-d labels, cached image features of each row's conditioning image and
    cached (or freshly encoded) report states, checked against the encoders a model expects. `rows` are dicts
    (sampling's --cond), or `columns` holds their arrays (MultiCondData): "labels" [n, 17], "rows" and "images"
    ({shard, index, position} of the rows and of their conditioning images), "ids" (row numbers -> ids) and
    "reports" (a function giving the reports, read only to encode them without a cache; None: no such column)."""

    def __init__(self, root, rows, cfg, need, cond_image="same-study", all_rows=None, columns=None):
        self.root, self.max_length = root, cfg.max_length
        self.meta = os.path.join(root, "meta.csv")
        if columns is None:
            columns = dict_columns(rows, all_rows or rows, cond_image if need[1] else "same-image", self.meta)
        self.labels, self.cols = columns["labels"], columns["rows"]
        self.columns = columns
        self.img = self.text = None
        self._open = lru_cache(maxsize=64)(lambda p: safe_open(p, "pt"))
        if need[1]:
            self.img = self.image_features(cfg, columns["images"])
        if need[2]:
            self.text_setup(cfg)

    def image_features(self, cfg, chosen):
        folder = cache_folder(self.root, "images", cfg.images, cfg.image_encoder)
        if folder is None:
            raise SystemExit(f"{os.path.join(self.root, 'images')}: no cached image features; run `python "
                             f"ldm_multicond.py embed-images --data {self.root}` (or leave I out)")
        info = read_json(os.path.join(folder, "info.json"), "the image cache's info.json (from embed-images)")
        if cfg.image_encoder and info["encoder"] != cfg.image_encoder or cfg.image_dim and info["dim"] != cfg.image_dim:
            raise SystemExit(f"{folder}: features of {info['encoder']!r} ({info['dim']} wide); expected "
                             f"{cfg.image_encoder!r} ({cfg.image_dim} wide): embed with that encoder")
        self.image_info = info
        check_cache(folder, chosen, (("features", "F32"),), self.meta)
        feats = []
        for s, k in zip(chosen["shard"].tolist(), chosen["index"].tolist()):
            feats.append(self._open(shard_path(folder, s)).get_slice("features")[k:k + 1])
        return torch.cat(feats).float()

    def text_setup(self, cfg):
        folder = cache_folder(self.root, "text", cfg.text, cfg.text_encoder)
        if folder is None:                                       # no cache: encode the reports now
            if not len(self.labels) or self.columns["reports"] is None:
                raise SystemExit(f"{self.root}/meta.csv: no 'report' column, and T (the report) was requested")
            reports = self.columns["reports"]()
            empty = [k for k, r in enumerate(reports) if not (r or "").strip()]
            if empty:
                raise SystemExit(f"{self.root}/meta.csv: row id={self.columns['ids'](empty[:1])[0]} has no report "
                                 f"text, and T was requested ({len(empty)} such rows); leave T out (--use) or fill "
                                 f"the report column")
            if not cfg.text_encoder:
                raise SystemExit(f"{self.root}: no text cache and no --text-encoder to encode the reports with")
            tok, enc = load_encoder(cfg.text_encoder, "--text-encoder")
            ids, lengths, _ = tokenize(tok, reports, cfg.max_length)
            del reports
            with torch.no_grad():
                self.text = encode_text(enc, ids, lengths)
            self.lengths, self.text_info = lengths, {"encoder": cfg.text_encoder, "hidden_size": encoder_width(enc)}
            return
        info = read_json(os.path.join(folder, "info.json"), "the text cache's info.json (from embed-text)")
        if cfg.text_encoder and info["encoder"] != cfg.text_encoder or cfg.text_dim and info["hidden_size"] != \
                cfg.text_dim or int(info["max_length"]) != cfg.max_length:
            raise SystemExit(f"{folder}: states of {info['encoder']!r} ({info['hidden_size']} wide, "
                             f"{info['max_length']} tokens); expected {cfg.text_encoder!r} ({cfg.text_dim} wide, "
                             f"{cfg.max_length} tokens)")
        check_cache(folder, self.cols, (("hidden", "BF16"), ("lengths", "I32")), self.meta)
        self.text, self.text_folder, self.text_info = "cache", folder, info
        lengths = np.zeros(len(self.cols["shard"]), np.int64)
        for s in np.unique(self.cols["shard"]).tolist():         # a shard's lengths at once, not a read a row
            at = np.flatnonzero(self.cols["shard"] == s)
            with safe_open(shard_path(folder, s), "np") as f:
                lengths[at] = f.get_tensor("lengths")[self.cols["index"][at]]
        self.lengths = torch.from_numpy(lengths)

    def inputs(self, idx, device):
        """Rows idx -> (labels [n, 17], image features [n, F] | None, text [n, max_length, C] | None, lengths [n])."""
        idx = [int(i) for i in idx]
        img = None if self.img is None else self.img[idx].to(device)
        text = lengths = None
        if isinstance(self.text, torch.Tensor):
            text, lengths = self.text[idx], self.lengths[idx]
        elif self.text == "cache":
            text = torch.zeros(len(idx), self.max_length, int(self.text_info["hidden_size"]))
            for j, i in enumerate(idx):
                s, k = int(self.cols["shard"][i]), int(self.cols["index"][i])
                h = self._open(shard_path(self.text_folder, s)).get_slice("hidden")[k:k + 1][0][:self.max_length]
                text[j, :h.shape[0]] = h.float()
            lengths = self.lengths[idx]
        if text is None:
            lengths = torch.zeros(len(idx), dtype=torch.long)
        return (self.labels[idx].to(device), img, None if text is None else text.to(device), lengths.to(device))


class MultiCondData:
    """The training split of a FORMAT.md §1 dataset: images or latents read on demand, and their conditions. The rows
    are arrays (meta_columns: DIR/meta_index.safetensors when fresh, else meta.csv), never a dict per row: one
    streamed pass over meta.csv gives the 17-d labels (label_vector, row by row as before), each row's conditioning
    image (ids, studies and patients of every split, held only for that pass) and, only when T has no cache, the
    reports to encode."""

    def __init__(self, cfg, split="train"):
        root = cfg.data
        path = os.path.join(root, "meta.csv")
        what = f"a dataset folder (meta.csv, shards/, info.json), e.g. from `python prep_data.py phantom --out {root}`"
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: no such file; expected {what}")
        self.info = read_json(os.path.join(root, "info.json"), "the dataset's info.json")
        use = modality_mask(cfg.modalities, "--modalities")
        # all splits (conditioning images of a study); the columns read_meta required before: split, shard, index,
        # and what L reads when L is used (not every variable of FORMAT.md §5)
        cols = meta_columns(root, list(self.info.get("datasets") or []), "all", what, codes=False)
        absent = [c for c in ("split",) + (LABEL_COLUMNS if use[0] else ()) if c not in cols["columns"]]
        if absent:
            raise SystemExit(f"{path}: no column(s) {', '.join(absent)}; expected FORMAT.md §2 columns")
        code = cols["splits"].index(split) if split in cols["splits"] else -1
        chosen = np.flatnonzero(cols["split"] == code)
        if not len(chosen):
            raise SystemExit(f"{path}: no rows with split={split!r}")
        self.meta_path, self.source = path, cols["source"]
        self.shard = cols["shard"][chosen]                       # the split's shard, index, meta.csv position
        self.index = cols["index"][chosen]
        self.position = cols["position"][chosen]
        if cfg.space not in ("auto", "pixel", "latent"):
            raise SystemExit(f"--space {cfg.space!r}: expected auto, pixel or latent")
        lat = None
        if cfg.space in ("auto", "latent"):
            base = os.path.join(root, "latents")
            names = sorted(os.listdir(base)) if os.path.isdir(base) else []
            if cfg.vae and cfg.vae not in names:
                raise SystemExit(f"{os.path.join(base, cfg.vae)}: no such latent folder; found {names}")
            if not cfg.vae and len(names) > 1:
                raise SystemExit(f"{base}: several latent folders {names}; choose one with --vae")
            lat = os.path.join(base, cfg.vae or names[0]) if names else None
        if cfg.space == "latent" and lat is None:
            raise SystemExit(f"{os.path.join(root, 'latents')}: no latent folder; run vae.py encode or use "
                             f"--space pixel")
        self.space, self.root, self.folder = ("latent" if lat else "pixel"), root, lat or root
        if self.space == "latent":
            li = latent_info(lat)
            self.shape, self.mean, self.std = li["shape"], li["mean"], li["std"]
        else:
            self.shape = (1, int(self.info["size"]), int(self.info["size"]))
        self.key = "latents" if self.space == "latent" else "images"
        self._open = lru_cache(maxsize=64)(lambda p: safe_open(p, "pt"))
        # every shard the rows name, checked now (dtype, row shape, row count): not a crash mid-training
        mine = {"shard": self.shard, "index": self.index, "position": self.position}
        check_shard_arrays(self.folder, mine, self.key, LATENT_DTYPES if lat else "U16", self.shape, where=path)
        self.use = use
        self.cond = CondSource(root, None, cfg, self.use, cfg.cond_image, columns=self.conditions(cfg, cols, chosen))

    def conditions(self, cfg, cols, chosen):
        """CondSource's arrays for the split rows `chosen` (of cols: every row), from one streamed meta.csv pass."""
        from array import array
        image = bool(self.use[1])
        reports_needed = self.use[2] and cache_folder(self.root, "text", cfg.text, cfg.text_encoder) is None
        if image:                                                # checked before the pass, not after it
            conditioning_rows([], [], [], cfg.cond_image)
        in_split = np.zeros(len(cols["shard"]), bool)
        in_split[chosen] = True
        columns = LABEL_COLUMNS + ("id", "study_id", "patient_id", "report")
        labels, reports = array("f"), []
        values = [{} for _ in LABEL_COLUMNS]                     # each column's distinct cells -> label_cell's value
        ids = []                                                 # every row's id, study and patient: for the
        studies = []                                             # conditioning images only, this pass only
        patients = []
        positions = cols["position"] if image else cols["position"][chosen]
        for k, cells in zip(np.arange(len(cols["shard"])) if image else chosen,
                            meta_cells(self.meta_path, columns, positions)):
            if image:
                ids.append(cells[17])
                studies.append(cells[18])
                patients.append(cells[19])
            if in_split[k]:                                      # label_vector, a cell at a time, in its order
                for j, cell in enumerate(cells[:len(LABEL_COLUMNS)]):
                    v = values[j].get(cell)
                    if v is None:
                        v = values[j][cell] = label_cell(j, cell, f"{self.meta_path} row id={cells[17]}")
                    labels.append(v)
                if reports_needed:
                    reports.append(cells[20])
        mine = {"shard": self.shard, "index": self.index, "position": self.position}
        images = mine                                            # same-image, or I unused
        if image:
            pick = conditioning_rows(ids, studies, patients, cfg.cond_image)[chosen]
            del ids, studies, patients
            images = {k: cols[k][pick] for k in ("shard", "index", "position")}
        n = len(chosen)
        return {"labels": torch.from_numpy(np.frombuffer(labels, np.float32).reshape(n, 17).copy()), "rows": mine,
                "images": images, "ids": lambda ks: meta_ids(self.meta_path, self.position[np.asarray(ks, np.int64)]),
                "reports": (lambda: reports) if "report" in cols["columns"] else None}

    def __len__(self):
        return len(self.shard)

    def load(self, idx):
        """Rows idx -> float32 [n, C, S, S]: pixels (v + 0.5) / 2^15 - 1 in [-1, 1], or normalised latents."""
        xs = []
        for i in idx:
            shard, k = int(self.shard[int(i)]), int(self.index[int(i)])
            xs.append(self._open(shard_path(self.folder, shard)).get_slice(self.key)[k:k + 1])
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
    """[-1, 1] -> uint16 numpy (the inverse of the pixel mapping of MultiCondData.load)."""
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


def load_decoder(folder, device):
    """A latent folder's decoder as normalised latents -> [-1, 1] images (None: pixel space): the latent_decoder
    block (decoder.safetensors, else decoder.pt2 said in one line). Called only when images are decoded."""
    if folder is None:
        return None
    li = latent_info(folder)
    return load_latent_decoder(folder, li["info"], li["mean"], li["std"], device)


# ----------------------------------------------------------------------------------------------------------------
# Training loop: DDP, bf16 autocast, grad accumulation, clipping, EMA, atomic checkpoints, resume, logging

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}   # bf16 dense
GRID_USES = ["L,I,T", "L", "I", "T", ""]                          # grid columns: the subsets of multicond Table 1
GRID_ROWS = 4


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
    """Fill what the data decides: channels, resolution, latent folder, encoder names and widths."""
    use = modality_mask(cfg.modalities, "--modalities")
    if data is None:                                             # no data: multicond App. A.2's 64 x 64 x 3 latents
        return Config(**{**asdict(cfg), "space": "latent" if cfg.space == "auto" else cfg.space,
                         "in_channels": cfg.in_channels or 3, "image_size": cfg.image_size or 64,
                         "text_dim": cfg.text_dim or 768, "image_dim": cfg.image_dim or 1376})
    c, s = data.shape[0], data.shape[-1]
    if cfg.image_size and cfg.image_size != s:
        raise SystemExit(f"{data.folder}: inputs are {s} x {s}; expected --image-size {cfg.image_size}")
    if s % 2 ** (len(cfg.channel_mult.split(",")) - 1):
        raise SystemExit(f"{data.folder}: side {s} does not halve {len(cfg.channel_mult.split(',')) - 1} times")
    ti, ii = getattr(data.cond, "text_info", {}), getattr(data.cond, "image_info", {})
    return Config(**{**asdict(cfg), "space": data.space, "in_channels": c, "image_size": s,
                     "vae": os.path.basename(data.folder) if data.space == "latent" else cfg.vae,
                     "text_encoder": ti.get("encoder", cfg.text_encoder) if use[2] else "",
                     "text_dim": int(ti.get("hidden_size", cfg.text_dim)) if use[2] else 0,
                     "image_encoder": ii.get("encoder", cfg.image_encoder) if use[1] else "",
                     "image_dim": int(ii.get("dim", cfg.image_dim)) if use[1] else 0})


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
    write_checkpoint(path, tensors, meta, "ldm_multicond/1")


def read_checkpoint_path(path):
    """A run folder means RUN/ckpt.safetensors."""
    return os.path.join(path, "ckpt.safetensors") if os.path.isdir(path) else path


def read_checkpoint(path, prefixes=("model.", "ema.", "optim.")):
    """-> (config dict, step, {prefix: {name: tensor}}, param_groups, path); a run folder means RUN/ckpt.safetensors."""
    path = os.path.join(path, "ckpt.safetensors") if os.path.isdir(path) else path
    what = "an ldm_multicond.py checkpoint (a run folder or a .safetensors file from training)"
    meta, parts = open_checkpoint(path, "ldm_multicond/1", what, prefixes)
    return json.loads(meta["config"]), int(meta["step"]), parts, json.loads(meta["param_groups"]), path


def check_compatible(cfg, saved, path):
    for k in ARCH:
        if getattr(cfg, k) != saved.get(k):
            raise SystemExit(f"{path}: checkpoint has {k}={saved.get(k)!r} but this run has {k}={getattr(cfg, k)!r} "
                             f"(another preset or dataset); use another --out or --no-resume")


def sample_grid(ema, sched, cfg, noise, inputs, device, path, decode=None):
    """EMA samples of fixed noise and training conditions, one column per condition subset (DDIM 25 steps, w = 4)."""
    cols = []
    for use in GRID_USES:
        x = sample_batch(ema, sched, noise, inputs, modality_mask(use, "grid"), [False] * 3, 4.0, 25,
                         clip=decode is None)
        cols.append(decode(x) if decode else x[:, :1])
    x = torch.stack(cols, 1).flatten(0, 1)                       # row-major: one row per condition set
    save_grid(path, x, ncol=len(GRID_USES), labels=[f"C({u or 'none'})" for u in GRID_USES])


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


def train(cfg):
    rank, world, device = setup_distributed(cfg.device)
    data = MultiCondData(cfg)
    cfg = resolve(cfg, data)
    sched = schedule_of(cfg)
    ckpt_path = os.path.join(cfg.out, "ckpt.safetensors")
    saved = read_checkpoint(ckpt_path) if cfg.resume and os.path.isfile(ckpt_path) else None
    if saved:
        check_compatible(cfg, saved[0], ckpt_path)
    micro, accum, per_rank = batch_split(cfg.batch_size, cfg.micro_batch, world)
    # The run folder: new, empty, or this command's (its checkpoint or output.json); a dataset is refused. Every
    # rank checks (rank 0 writes output.json and removes stale .tmp-* of a killed checkpoint write).
    claim_output(cfg.out, {"command": "ldm_multicond.py train"}, mine=("ckpt.safetensors",), write=rank == 0)

    torch.manual_seed(cfg.seed)                                  # the same initial weights on every rank
    raw = MultiCondLDM(cfg).to(device)
    ema = copy.deepcopy(raw).requires_grad_(False).eval()       # fp32 EMA
    opt = torch.optim.AdamW(raw.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    step = 0
    if saved:
        _, step, parts, groups, _ = saved
        try:
            raw.load_state_dict(parts["model."])
            ema.load_state_dict(parts["ema."])
        except RuntimeError as e:
            raise SystemExit(f"{ckpt_path}: weights do not fit this model ({str(e).splitlines()[0]})") from None
        load_optimizer(opt, parts["optim."], groups)
        for g in opt.param_groups:                               # the flags of this run win over the saved ones
            g.update(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    model = torch.compile(raw) if cfg.compile else raw          # load, then compile, then wrap in DDP
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in raw.parameters())
    tokens, peak = cfg.image_size ** 2, peak_flops(device)      # tokens: input positions of one image
    if rank == 0:                                                # records past the starting step are from a killed
        resume_log(os.path.join(cfg.out, "log.jsonl"), step)     # run (log steps count optimizer steps, as ckpts)
    # The decoder only when grids are drawn (rank 0, --sample-every > 0): never opened otherwise (a .pt2 is code)
    decode = None
    if rank == 0 and cfg.sample_every and data.space == "latent":
        if has_decoder(data.folder, latent_info(data.folder)["info"]):
            decode = load_decoder(data.folder, device)
    if rank == 0:
        os.makedirs(os.path.join(cfg.out, "grids"), exist_ok=True)
        env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
               "triton": importlib.util.find_spec("triton") and importlib.metadata.version("triton"),
               "device": str(device), "world": world, "argv": sys.argv,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
        write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
        write_json(os.path.join(cfg.out, "env.json"), env)
        print(json.dumps(asdict(cfg)))
        print(f"MultiCondLDM-{cfg.size}: {n_params / 1e6:.2f}M trainable parameters, {cfg.space} space "
              f"{cfg.in_channels}x{cfg.image_size}^2, conditions {cfg.modalities}, {len(data)} training images, "
              f"{world} process(es) x {accum} micro-batch(es) of {micro}" + (f", resuming at step {step}" if step
                                                                              else ""), flush=True)

    health, stopping = HealthCheck(world, device, ckpt_path), False   # SIGTERM: save at the next check
    grid_idx = list(range(min(GRID_ROWS, len(data))))
    noise_grid = torch.randn((len(grid_idx), *data.shape), generator=generator(cfg.seed, 3)).to(device)
    inputs_grid = data.cond.inputs(grid_idx, device)
    lo = rank * per_rank
    pool = ThreadPoolExecutor(1)                                 # reads the next batch while this one trains
    def fetch(s):
        rows = batch_rows(s, len(data), cfg.batch_size, lo, lo + per_rank, cfg.seed)
        return rows, pool.submit(lambda: (data.load(rows).to(device), data.cond.inputs(rows, device)))
    nxt = fetch(step)
    flops = train_flops(cfg, data.shape, inputs_grid) if peak else None
    acc = torch.zeros(3 + 8, device=device)                      # loss sum, count, grad-norm sum, 4 bins: sum, count
    bad = torch.full((), -1, dtype=torch.long, device=device)    # first step with a non-finite loss
    t_log, t_start, step0, last_log = time.time(), time.time(), step, step
    while step < cfg.max_steps:
        x0, inputs = nxt[1].result()
        nxt = fetch(step + 1)
        # Every rank draws the whole global batch's randomness from one (seed, step) generator and keeps its
        # slice: the run is the same for any number of processes and any accumulation.
        eps, t, drop, g = draw_step(cfg, sched, step, data.shape, device)
        eps, t, drop = eps[lo:lo + per_rank], t[lo:lo + per_rank], drop[lo:lo + per_rank]
        if data.space == "pixel":                                # uniform dequantisation of the 16-bit pixels
            u = torch.rand((cfg.batch_size, *data.shape), generator=g, device=device)[lo:lo + per_rank]
            x0 = x0 + (u - 0.5) / 32768
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            sync = nullcontext() if world == 1 or m == accum - 1 else model.no_sync()
            with sync:
                with autocast(device):
                    losses = diffusion_loss(model, sched, x0[sl], eps[sl], t[sl],
                                            [None if a is None else a[sl] for a in inputs], drop[sl])
                (losses.mean() / accum).backward()
            b = (t[sl] * 4 // sched.T).long()
            acc[3:7].index_add_(0, b, losses.detach())
            acc[7:11].index_add_(0, b, torch.ones_like(losses))
            acc[0] += losses.detach().sum()
            acc[1] += len(losses)
            bad = torch.where((bad < 0) & ~losses.isfinite().all(), step + 1, bad)
        gnorm = nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip)
        acc[2] += gnorm
        opt.step()
        opt.zero_grad(set_to_none=True)
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
            n_steps, last_log = step - last_log, step
            images = n_steps * cfg.batch_size
            rec = {"step": step, "loss": a[0] / max(a[1], 1),
                   "loss_t": [s / c if c else None for s, c in zip(a[3:7], a[7:11])],     # t in quarters of [0, T)
                   "grad_norm": a[2] / max(n_steps * world, 1), "lr": opt.param_groups[0]["lr"],
                   "img_s": images / dt, "tok_s": images * tokens / dt,
                   "mfu": flops * images / dt / (peak * world) if peak else None,
                   "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                   "eta_s": (cfg.max_steps - step) * (time.time() - t_start) / (step - step0)}
            if rank == 0:
                bins = "/".join("-" if v is None else f"{v:.3f}" for v in rec["loss_t"])    # t in quarters
                write_log(os.path.join(cfg.out, "log.jsonl"), rec, log_line(rec, cfg.max_steps, [("t-bins", bins)]))
            acc.zero_()
            t_log = time.time()
        t_io = time.time()                                       # grids and checkpoints do not count in img/s
        if rank == 0 and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            sample_grid(ema, sched, cfg, noise_grid, inputs_grid, device,
                        os.path.join(cfg.out, "grids", f"{step:07d}.png"), decode if data.space == "latent" else None)
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
    """Training steps on random tensors: img/s, tokens/s, MFU, peak memory; kernels.attention vs SDPA in the same
    run, each eager and (with --compile) compiled."""
    _, _, device = setup_distributed(cfg.device)
    cfg = resolve(cfg)
    model = MultiCondLDM(cfg).to(device)
    sched = schedule_of(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    B, S, tokens = cfg.micro_batch or cfg.batch_size, cfg.image_size, cfg.image_size ** 2
    n_params, peak = sum(p.numel() for p in model.parameters()), peak_flops(device)
    x = torch.randn(B, cfg.in_channels, S, S, device=device)
    inputs = (torch.randn(B, 17, device=device), torch.randn(B, cfg.image_dim, device=device),
              torch.randn(B, cfg.max_length, cfg.text_dim, device=device),
              torch.randint(1, cfg.max_length + 1, (B,), device=device))
    flops = train_flops(cfg, x.shape[1:], inputs)
    print(f"bench MultiCondLDM-{cfg.size}: {n_params / 1e6:.1f}M params, batch {B}, {cfg.in_channels}x{S}^2 input, "
          f"{flops / 1e9:.1f} GFLOP/image (fwd + bwd), {device}, "
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
                eps, t, drop, _ = draw_step(cfg, sched, i, x.shape[1:], device)
                with autocast(device):
                    loss = diffusion_loss(fwd, sched, x, eps[:B], t[:B], inputs, drop[:B]).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
            dt = (time.time() - t0) / cfg.bench_steps
            name = impl + ("+compile" if compiled else "")
            results[name] = B / dt
            mfu = flops * B / dt / peak if peak else None
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            print(f"  {name:16s} {B * tokens / dt:12.0f} tokens/s  {B / dt:8.2f} img/s  "
                  + (f"MFU {mfu:.1%}  " if mfu else "MFU n/a (no GPU peak known)  ")
                  + (f"peak mem {mem:.2f} GB" if mem else "peak mem n/a (CPU)"), flush=True)
    print(f"  kernels / sdpa throughput: {results['kernels'] / results['sdpa']:.3f}")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Sampling subcommand: any subset of the three conditions (multicond Table 1)


def load_for_inference(icfg):
    """EMA model and config from a checkpoint; validates the condition subsets against what it was trained with."""
    if icfg.cfg < 0:
        raise SystemExit(f"--cfg {icfg.cfg}: expected a guidance scale >= 0")
    rank, world, device = setup_distributed(icfg.device)
    saved, _, parts, _, path = read_checkpoint(icfg.ckpt, prefixes=("ema.",))
    cfg = Config(**saved)
    use = modality_mask(icfg.use, f"{path}: --use", cfg.modalities)
    against = modality_mask(icfg.guide_against, f"{path}: --guide-against", cfg.modalities)
    if any(a and not u for a, u in zip(against, use)):
        raise SystemExit(f"--guide-against {icfg.guide_against!r}: expected a subset of --use {icfg.use!r}")
    model = MultiCondLDM(cfg)
    try:
        model.load_state_dict(parts["ema."])
    except RuntimeError as e:
        raise SystemExit(f"{path}: EMA weights do not fit its own config ({str(e).splitlines()[0]})") from None
    return cfg, model.to(device).eval().requires_grad_(False), use, against, rank, world, device


def sample(icfg):
    """Images from noise under a subset of the conditions of --cond rows; PNG i from noise (seed, i); skips images
    already written. meta.csv copies each condition row's labels / demographics / report and records the subset."""
    check_counts(icfg, positive=("steps", "batch_size"), non_negative=("n",))
    if icfg.eta < 0:
        raise SystemExit(f"--eta {icfg.eta}: expected >= 0")
    cfg, model, use, against, rank, world, device = load_for_inference(icfg)
    if icfg.cond:
        # ids are checked (a file name each, unique), the label columns required when L is used, split when given
        need = LABEL_COLUMNS if use[0] else ()
        all_rows = read_meta(icfg.cond, required=need, what="a meta.csv of conditions (--cond)")[0]
        if icfg.split:
            read_meta(icfg.cond, split=icfg.split, what="a meta.csv with a split column (--split)")
        rows = [r for r in all_rows if not icfg.split or r["split"] == icfg.split]
        if not rows:
            raise SystemExit(f"--cond {icfg.cond}: no rows" + (f" with split={icfg.split!r}" if icfg.split else ""))
        root = os.path.dirname(os.path.abspath(icfg.cond))
        if use[1] and not all(r.get("shard", "") != "" for r in rows):
            raise SystemExit(f"--cond {icfg.cond}: rows without shard/index; I needs the dataset's cached features")
        src = CondSource(root, rows, Config(**{**asdict(cfg), "text": "", "images": ""}), use, cfg.cond_image,
                         all_rows)
    elif any(use):
        raise SystemExit(f"--use {icfg.use!r} without --cond: give a meta.csv of conditions, or --use ''")
    else:
        rows, src = [{}], None
    n = icfg.n or (len(rows) if icfg.cond else 16)
    sched, lat = schedule_of(cfg), None
    if cfg.space == "latent":
        lat = os.path.join(cfg.data, "latents", cfg.vae)
        decoder_files(lat, latent_info(lat)["info"])             # a decoder path outside the folder: refused now
    # What decides the images (not --n, --batch-size, --out, --device): another checkpoint, seed, condition file
    # or subset into the same --out is refused instead of keeping old images under new conditions
    record = {"command": "ldm_multicond.py sample", "ckpt_sha256": file_sha256(read_checkpoint_path(icfg.ckpt)),
              "seed": icfg.seed, "cond_sha256": file_sha256(icfg.cond) if icfg.cond else "", "split": icfg.split,
              "use": ",".join(m for m, u in zip("LIT", use) if u),
              "guide_against": ",".join(m for m, u in zip("LIT", against) if u), "cfg": icfg.cfg,
              "steps": icfg.steps, "eta": icfg.eta}
    claim_output(icfg.out, record, write=rank == 0)
    if world > 1:                # every rank has checked --out (rank 0 claimed it) before any writes there
        dist.barrier()
    decode = load_decoder(lat, device)                           # None in pixel space
    os.makedirs(icfg.out, exist_ok=True)
    names = [f"{i:06d}.png" for i in range(n)]
    tag_use = ",".join(m for m, u in zip("LIT", use) if u)
    tag_against = ",".join(m for m, u in zip("LIT", against) if u)
    if rank == 0:
        meta = [{**{c: "" for c in SAMPLE_COLUMNS}, **{k: v for k, v in rows[i % len(rows)].items()
                                                       if k in META_COLUMNS},
                 "id": nm[:-4], "split": "test", "shard": "", "index": "", "source_path": nm, "cond_use": tag_use,
                 "guide_against": tag_against, "source_id": rows[i % len(rows)].get("id", "")}
                for i, nm in enumerate(names)]
        atomic_save(os.path.join(icfg.out, "meta.csv"), lambda tmp: write_csv(tmp, meta, SAMPLE_COLUMNS))
    todo = [i for i in range(rank, n, world) if not os.path.exists(os.path.join(icfg.out, names[i]))]
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    t0 = time.time()
    for k in range(0, len(todo), icfg.batch_size):
        idx = todo[k:k + icfg.batch_size]
        x = torch.stack([torch.randn(shape, generator=generator(icfg.seed, 2, i)) for i in idx]).to(device)
        gens = [generator(icfg.seed, 4, i) for i in idx]
        if src is None:
            inputs = (torch.zeros(len(idx), 17, device=device), None, None, torch.zeros(len(idx), dtype=torch.long))
        else:
            inputs = src.inputs([i % len(rows) for i in idx], device)
        x = sample_batch(model, sched, x, inputs, use, against, icfg.cfg, icfg.steps, icfg.eta, gens,
                         clip=cfg.space == "pixel")
        with torch.no_grad():
            x = decode(x) if decode else x
        for i, img in zip(idx, x):
            save_png16(os.path.join(icfg.out, names[i]), img)
        print(f"rank {rank}: {k + len(idx)}/{len(todo)} images under C({tag_use or 'none'}), "
              f"{(k + len(idx)) / (time.time() - t0):.2f} img/s", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return len(todo)


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
    """The memory_plan of one training micro-batch of `cfg` as train() runs it on a GPU: bf16 autocast, AdamW, an
    fp32 EMA of the whole model, every modality present (labels, image features, a full-length cached text); the
    micro-batch is train()'s for WORLD_SIZE processes (1 unless set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = batch_split(cfg.batch_size, cfg.micro_batch, world)[0]

    def build(grad_ckpt):
        with torch.device("meta"):
            model = MultiCondLDM(replace(cfg, grad_ckpt=grad_ckpt)).train()

        def loss_fn():              # diffusion_loss on meta inputs (its alpha-bar lookup is a CPU table)
            x0 = torch.randn(micro, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta")
            eps, ab = torch.randn_like(x0), torch.rand(micro, 1, 1, 1, device="meta")
            t = torch.zeros(micro, dtype=torch.long, device="meta")
            inputs = (torch.randn(micro, 17, device="meta"), torch.randn(micro, cfg.image_dim, device="meta"),
                      torch.randn(micro, cfg.max_length, cfg.text_dim, device="meta"),
                      torch.full((micro,), cfg.max_length, device="meta"))
            drop = torch.zeros(micro, 3, dtype=torch.bool, device="meta")
            out = model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, *inputs, drop)
            return (out.float() - eps).pow(2).mean()
        return model, loss_fn
    return memory_plan(build, micro, world)


# ----------------------------------------------------------------------------------------------------------------
# main: subcommand dispatch (train is the default)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in ("train", "sample", "embed-text", "embed-images") else "train"
    if cmd == "sample":
        parser = build_parser(InferConfig, "ldm_multicond.py sample", sample.__doc__)
        return sample(InferConfig(**vars(parser.parse_args(argv))))
    if cmd.startswith("embed-"):
        parser = build_parser(EmbedConfig, f"ldm_multicond.py {cmd}", embed.__doc__, cmd)
        return embed(EmbedConfig(**vars(parser.parse_args(argv))), cmd[len("embed-"):])
    cfg = parse_config(argv)
    if cfg.dry_run:
        data = MultiCondData(cfg) if os.path.isfile(os.path.join(cfg.data, "meta.csv")) else None
        cfg = resolve(cfg, data)
        with torch.device("meta"):
            model = MultiCondLDM(cfg)
        n, n_unit = (sum(p.numel() for p in m.parameters()) for m in (model, model.cond))
        print(json.dumps(asdict(cfg)))
        print(f"MultiCondLDM-{cfg.size}: {n:,} trainable parameters ({n / 1e6:.1f}M; multi-conditional unit "
              f"{n_unit / 1e6:.1f}M) at {cfg.in_channels}x{cfg.image_size}x{cfg.image_size}"
              + ("" if data else " (no dataset: multicond App. A.2's 64x64x3 latents)"))
        print_memory_plan(plan_memory(cfg))
        return n
    return bench(cfg) if cfg.bench else train(cfg)


if __name__ == "__main__":
    main()

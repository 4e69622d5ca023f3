"""The canonical training skeleton (README.md, Common flags): each piece between `# --- skeleton: NAME ---` and
`# --- end skeleton: NAME ---` is copied, marked the same way, into every training script that uses it, because the
scripts import nothing from each other. tests/check_copies.py fails when a copy differs from this file, and
`python tests/check_copies.py --fix` rewrites the copies from it: change a piece here, then run the fix.

This module imports like a script does, so the pieces are also tested here directly (tests/test_skeleton.py)."""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import field, fields

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# Which pieces each training script holds (a missing marker is an error, not a silent pass).
ALL = ("atomic_save", "setup_distributed", "batch_split", "health_check", "environment")
PIECES = {
    "rectified_flow.py": ALL + ("ema_decay", "checkpoint_io", "log_line", "cli"),
    "flow_scm.py": ALL + ("ema_decay",),
    "vae.py": ALL + ("ema_decay", "checkpoint_io", "log_line", "cli"),
    "dit_text2img.py": ALL + ("ema_decay", "checkpoint_io", "log_line", "cli"),
    "controlnet.py": ALL + ("ema_decay", "checkpoint_io", "log_line", "cli"),
    "ldm_multicond.py": ALL + ("ema_decay", "checkpoint_io", "log_line", "cli"),
    "downstream.py": ALL + ("checkpoint_io", "log_line"),
}


PRESETS = {}                                                     # each script's presets and Config


class Config:
    """Stands for each script's configuration dataclass (build_parser notes the fields its presets set)."""


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


# --- skeleton: atomic_save (copied from tests/skeleton_reference.py; check: python tests/check_copies.py) ---
def atomic_save(path, save_fn):
    """Write through a temporary file in the same folder, fsync, then os.replace: readers never see half a file and
    a crash leaves the old one. The file gets the mode that open() would give it (0o666 less the umask)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        save_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0o022)                                  # read the umask (set and restored at once)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                            # mkstemp's 0600 is too strict for outputs
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
# --- end skeleton: atomic_save ---


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
            raise SystemExit(f"non-finite {what}; stopped, the last checkpoint {self.ckpt_path} is intact")
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
    except SafetensorError as e:
        raise SystemExit(f"{path}: not a readable safetensors file ({e}); expected {what}") from None
    return meta, parts
# --- end skeleton: checkpoint_io ---


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
# --- end skeleton: log_line ---

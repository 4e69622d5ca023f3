"""The canonical training skeleton (README.md, Common flags): each piece between `# --- skeleton: NAME ---` and
`# --- end skeleton: NAME ---` is copied, marked the same way, into every training script that uses it, because the
scripts import nothing from each other. tests/check_copies.py fails when a copy differs from this file, and
`python tests/check_copies.py --fix` rewrites the copies from it: change a piece here, then run the fix.

This module imports like a script does, so the pieces are also tested here directly (tests/test_skeleton.py)."""
import argparse
import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import sys
import tempfile
import weakref
from contextlib import nullcontext
from dataclasses import field, fields

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# Which pieces each training script holds (a missing marker is an error, not a silent pass).
ALL = ("atomic_save", "setup_distributed", "batch_split", "health_check", "environment", "safe_names",
       "output_folder", "meta_table")
LATENT = ("radvae_decoder",)                                     # scripts that decode latents of vae.py
# "latent_decoder" (a latent folder's decoder file, inside it; .pt2 only as a fallback): the four latent models.
# vae.py reads decoder.safetensors itself (decode), with load_radvae_decoder alone.
PLAN = ("memory_plan",)                                          # --dry-run plans GPU memory per rank
PIECES = {
    "rectified_flow.py": ALL + LATENT + PLAN + ("latent_decoder", "ema_decay", "checkpoint_io", "log_line", "cli",
                                                "meta_index"),
    "flow_scm.py": ALL + PLAN + ("ema_decay", "checkpoint_io", "log_line", "cli", "meta_index"),
    "vae.py": ALL + LATENT + PLAN + ("ema_decay", "checkpoint_io", "log_line", "cli", "meta_index"),
    "dit_text2img.py": ALL + LATENT + PLAN + ("latent_decoder", "ema_decay", "checkpoint_io", "log_line", "cli",
                                              "meta_index"),
    "controlnet.py": ALL + LATENT + PLAN + ("latent_decoder", "ema_decay", "checkpoint_io", "log_line", "cli",
                                            "meta_index"),
    "ldm_multicond.py": ALL + LATENT + PLAN + ("latent_decoder", "ema_decay", "checkpoint_io", "log_line", "cli",
                                               "meta_index"),
    "downstream.py": ALL + PLAN + ("checkpoint_io", "log_line", "meta_index"),
    "prep_data.py": ("atomic_save", "safe_names", "output_folder", "meta_table", "meta_index"),   # not training
    "metrics.py": ("atomic_save", "safe_names", "meta_table"),   # scripts: the pieces they need
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

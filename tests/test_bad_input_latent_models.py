"""The bad-input table of the latent-model scripts, controlnet.py, dit_text2img.py and ldm_multicond.py (issue 19;
README.md "What is guaranteed"): each case is an input a careless or hostile user could give, the one-line error it
must get (tests/bad_input.py: no traceback, no exit 0), and the folders whose files must be unchanged afterwards.
Then the promises that are not a single refusal: ids from data write nothing outside --out, a .pt2 program is never
opened by training with sampling off, sampling decodes with decoder.safetensors, output folders resume only with the
settings that wrote them, stale temporaries and log records past the checkpoint are removed on resume.

Cheap on purpose (CI has 2 cores): one 64-image 32 px phantom, tiny random encoders, reduced models trained 2 steps,
and nearly every case is refused at start-up, before a model runs."""
import csv
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file as load_pt
from safetensors.torch import save_file as save_pt

import controlnet as cn
import dit_text2img as dt
import ldm_multicond as lm
import prep_data
from bad_input import confined, expect_refusal, one_line_refusal
from tiny_text import phantom_texts, write_tiny_bert

DIT = ["--hidden", "32", "--depth", "2", "--heads", "2", "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9",
       "--sample-every", "0", "--log-every", "1"]
CN = ["--control-blocks", "1", "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9", "--sample-every", "0",
      "--log-every", "1", "--cond-masks", "Lungs,Pleural Effusion"]
LDM = ["--channels", "16", "--dim", "32", "--heads", "2", "--tau-layers", "1", "--tau-heads", "2", "--tau-ff", "64",
       "--batch-size", "8", "--max-length", "24", "--lr", "2e-3", "--ema", "0.9", "--sample-every", "0",
       "--log-every", "1"]
TRAVERSAL = ["../../X", "/abs/X", ".hidden", "a\\b"]            # '/abs/X' is made absolute inside the watched tmp


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# The world the cases run in: datasets, runs and outputs, made once (module scope)


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames)


def write_rows(path, rows, columns):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def radvae_decoder_file(path, channels=4, width=8, ups=2):
    """A decoder.safetensors in vae.py's format (baked weights + spec, 'radvae-decoder/1'), random weights: latents
    [B, C, h, w] -> images [B, 1, 4h, 4w]."""
    g = torch.Generator().manual_seed(0)
    w = {"conv_in.weight": torch.randn(width, channels + 1, 3, 3, generator=g) * 0.1,
         "conv_out.weight": torch.randn(1, width, 3, 3, generator=g) * 0.1}
    blocks = []
    for i in range(ups):
        blocks.append({"resample": "up", "cin": width, "cout": width, "heads": 0})
        for name in ("conv_res0", "conv_res1"):
            w[f"blocks.{i}.{name}"] = torch.randn(width, width, 3, 3, generator=g) * 0.1
    w = {k[:-len(".weight")] if k.endswith(".weight") else k: v for k, v in w.items()}
    spec = {"format": "radvae-decoder/1", "blocks": blocks, "res_balance": 0.3, "attn_balance": 0.3, "clip_act": 256}
    save_pt(w, path, metadata={"spec": json.dumps(spec)})


class ToyEncoder(torch.nn.Module):
    """Image [B, 1, 32, 32] -> 4 x 8 x 8 latents (4 x 4 means, scaled copies): the condition-map encoder.pt2."""
    def forward(self, x):
        p = torch.nn.functional.avg_pool2d(x, 4)
        return torch.cat([p * (c + 1) for c in range(4)], 1)


def add_latents(data):
    """data/latents/toy/ as vae.py encode writes it: float32 latents, decoder.safetensors, a real encoder.pt2 and a
    decoder.pt2 that is not a program at all (opening it fails: it must never be opened when a safetensors decoder
    exists, nor during training with sampling off)."""
    folder = os.path.join(data, "latents", "toy")
    os.makedirs(os.path.join(folder, "shards"))
    zs = []
    for name in sorted(n for n in os.listdir(os.path.join(data, "shards")) if n.endswith(".safetensors")):
        img = load_np(os.path.join(data, "shards", name))["images"].astype(np.float32) / 32768 - 1
        with torch.no_grad():
            z = ToyEncoder()(torch.from_numpy(img)).numpy()
        save_np({"latents": z}, os.path.join(folder, "shards", name))
        zs.append(z)
    z = np.concatenate(zs).astype(np.float64)
    with open(os.path.join(folder, "decoder.pt2"), "wb") as f:
        f.write(b"crafted: not a torch.export program")
    radvae_decoder_file(os.path.join(folder, "decoder.safetensors"))
    batch = {"x": {0: torch.export.Dim("b")}}
    ep = torch.export.export(ToyEncoder(), (torch.randn(2, 1, 32, 32),), dynamic_shapes=batch)
    torch.export.save(ep, os.path.join(folder, "encoder.pt2"))
    info = {"format_version": 1, "shape": [4, 8, 8], "mean": z.mean((0, 2, 3)).tolist(),
            "std": z.std((0, 2, 3)).tolist(), "decoder": "decoder.pt2", "decoder_safetensors": "decoder.safetensors",
            "encoder": "encoder.pt2"}
    with open(os.path.join(folder, "info.json"), "w") as f:
        json.dump(info, f)
    return folder


def train_ok(main, argv):
    """main(argv) must run through (a SystemExit fails the test): -> what it returns."""
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Datasets (text: reports cached for dit / controlnet; multi: text and image caches for ldm; latent copies),
    runs of each script (2 steps), a sample folder of each sampler, and a folder of bad checkpoint files."""
    from transformers import ViTConfig, ViTModel
    root = tmp_path_factory.mktemp("badlat")
    ns = SimpleNamespace(root=str(root))
    bert, vit = str(root / "bert"), str(root / "vit")
    write_tiny_bert(bert, phantom_texts(), layers=1, max_positions=160)
    ViTModel(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=24, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=48)).save_pretrained(vit)
    ns.bert = bert
    phantom = str(root / "phantom")
    prep_data.make_phantom(phantom, n=64, size=32, seed=0)
    ns.text = str(root / "text")
    shutil.copytree(phantom, ns.text)
    dt.main(["embed-text", "--data", ns.text, "--text-encoder", bert, "--name", "bert"])
    ns.multi = str(root / "multi")
    shutil.copytree(phantom, ns.multi)
    lm.main(["embed-text", "--data", ns.multi, "--text-encoder", bert, "--name", "bert", "--max-length", "24"])
    lm.main(["embed-images", "--data", ns.multi, "--image-encoder", vit, "--name", "vit"])
    ns.dit = str(root / "dit")
    train_ok(dt.main, ["--data", ns.text, "--out", ns.dit, *DIT, "--max-steps", "2"])
    ns.cn = str(root / "cn")
    train_ok(cn.main, ["--data", ns.text, "--backbone", ns.dit, "--out", ns.cn, *CN, "--max-steps", "2"])
    ns.box = str(root / "box")
    train_ok(cn.main, ["--data", ns.text, "--backbone", ns.dit, "--out", ns.box, *CN[:-2], "--cond-type", "box",
                       "--max-steps", "1"])
    ns.ldm = str(root / "ldm")
    train_ok(lm.main, ["--data", ns.multi, "--out", ns.ldm, *LDM, "--max-steps", "2"])
    # checkpoints that are not: truncated, empty, not safetensors, another script's
    bad = root / "bad"
    bad.mkdir()
    whole = open(os.path.join(ns.dit, "ckpt.safetensors"), "rb").read()
    (bad / "truncated.safetensors").write_bytes(whole[:len(whole) // 2])
    (bad / "empty.safetensors").write_bytes(b"")
    (bad / "text.safetensors").write_text("not a checkpoint\n")
    ns.bad = {k: str(bad / f"{k}.safetensors") for k in ("truncated", "empty", "text")}
    # the prompts / conditions the samplers read, and one finished sample folder of each
    ns.prompts = str(root / "prompts.txt")
    with open(ns.prompts, "w") as f:
        f.write("no acute process\n")
    ns.prompts2 = str(root / "prompts2.txt")
    with open(ns.prompts2, "w") as f:
        f.write("severe cardiomegaly\n")
    ns.boxes = str(root / "boxes.json")
    with open(ns.boxes, "w") as f:
        json.dump({"a": {"Pleural Effusion": [0.5, 0.5, 1.0, 0.9]}}, f)
    ns.boxes2 = str(root / "boxes2.json")
    with open(ns.boxes2, "w") as f:
        json.dump({"a": {"Pleural Effusion": [0.0, 0.0, 0.5, 0.5]}}, f)
    ns.dit_fake = str(root / "dit_fake")
    train_ok(dt.main, dit_sample(ns, ns.dit_fake))
    ns.cn_fake = str(root / "cn_fake")
    train_ok(cn.main, cn_sample(ns, ns.cn_fake))
    ns.ldm_fake = str(root / "ldm_fake")
    train_ok(lm.main, ldm_sample(ns, ns.ldm_fake))
    ns.file = str(root / "a_file")
    with open(ns.file, "w") as f:
        f.write("a file, not a folder\n")
    ns.foreign = str(root / "foreign")                           # another command's outputs: no output.json
    os.makedirs(ns.foreign)
    with open(os.path.join(ns.foreign, "notes.txt"), "w") as f:
        f.write("mine\n")
    ns.counter = 0
    return ns


def dit_sample(w, out, *extra):
    return ["sample", "--ckpt", w.dit, "--prompts", w.prompts, "--n-per-prompt", "1", "--steps", "2", "--out", out,
            *extra]


def cn_sample(w, out, *extra, ckpt=None):
    return ["sample", "--ckpt", ckpt or w.box, "--boxes", w.boxes, "--prompt", "effusion", "--n-per-cond", "1",
            "--steps", "2", "--out", out, "--text-encoder", w.bert, *extra]


def evaluate_argv(w, out, *extra):
    return ["evaluate", "--ckpt", w.cn, "--seg-ckpt", w.seg, "--data", w.text, "--n", "1", "--n-per-cond", "1",
            "--steps", "2", "--fid-features", "none", "--text-encoder", w.bert, "--out", out, *extra]


def ldm_sample(w, out, *extra, cond=None):
    return ["sample", "--ckpt", w.ldm, "--cond", cond or os.path.join(w.multi, "meta.csv"), "--n", "1", "--steps", "2",
            "--out", out, *extra]


def swap(argv, flag, value):
    """argv with the value of `flag` replaced by `value` under the flag `flag` (or another one: 'old=new')."""
    old, _, new = flag.partition("=")
    i = argv.index(old)
    return argv[:i] + [new or old, value] + argv[i + 2:]


def new_dir(w, name):
    """A fresh folder name under the world's root (not created)."""
    w.counter += 1
    return os.path.join(w.root, f"{name}{w.counter}")


def variant(w, base, meta=None, shards=None, cache=None):
    """A copy of dataset `base` that differs in one thing, sharing the rest by symlinks: meta(rows, columns) ->
    (rows, columns) rewrites meta.csv; shards(tensors) -> tensors rewrites every image shard; cache = (folder
    relative to the dataset, fn(tensors) -> tensors) rewrites a derived cache's shards."""
    out = new_dir(w, "variant")
    os.makedirs(out)
    for name in os.listdir(base):
        if name in ("meta.csv", "info.json"):
            shutil.copy(os.path.join(base, name), out)
        elif not name.startswith("."):
            os.symlink(os.path.join(base, name), os.path.join(out, name))
    if meta:
        rows, columns = meta(*read_rows(os.path.join(base, "meta.csv")))
        write_rows(os.path.join(out, "meta.csv"), rows, columns)
    for sub, fn in ([("shards", shards)] if shards else []) + ([cache] if cache else []):
        parts = sub.split("/")                                   # replace the symlinks on the way by real folders
        for k in range(1, len(parts) + 1):
            here = os.path.join(out, *parts[:k])
            if os.path.islink(here):
                os.remove(here)
                src = os.path.join(base, *parts[:k])
                os.makedirs(here)
                for name in os.listdir(src):
                    os.symlink(os.path.join(src, name), os.path.join(here, name))
        folder = os.path.join(out, sub)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                tensors = fn(load_pt(os.path.join(folder, name)))      # torch: text caches are bfloat16
                os.remove(os.path.join(folder, name))
                save_pt({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, name))
    return out


def broken_info(data):
    """The dataset's info.json cut in half (a careless edit)."""
    text = open(os.path.join(data, "info.json")).read()
    with open(os.path.join(data, "info.json"), "w") as f:
        f.write(text[:len(text) // 2])
    return data


def edit_rows(fn):
    """meta= editor applying fn(rows) -> rows, columns unchanged."""
    return lambda rows, columns: (fn(rows), columns)


def drop_column(name):
    return lambda rows, columns: ([{k: v for k, v in r.items() if k != name} for r in rows],
                                  [c for c in columns if c != name])


def set_first(**values):
    """meta= editor: the first train row gets these values."""
    def fn(rows):
        first = next(i for i, r in enumerate(rows) if r["split"] == "train")
        rows[first] = {**rows[first], **values}
        return rows
    return edit_rows(fn)


def duplicate_id(rows):
    rows[1] = {**rows[1], "id": rows[0]["id"]}
    return rows


def cast(key, dtype):
    return lambda t: {**t, key: t[key].to(dtype)}


def first_rows(key, n):
    return lambda t: {**t, key: t[key][:n]}


def rename(key, new):
    return lambda t: {(new if k == key else k): v for k, v in t.items()}


# ----------------------------------------------------------------------------------------------------------------
# The table: (id, builder(w) -> (main, argv, watched paths), pattern of the one-line error)

def dit_train(data_fn, *extra, out=None):
    def build(w):
        data = data_fn(w)
        o = out(w) if out else new_dir(w, "dit_run")
        return dt.main, ["--data", data, "--out", o, *DIT, "--max-steps", "2", *extra], [data, o]
    return build


def ldm_train(data_fn, *extra, out=None):
    def build(w):
        data = data_fn(w)
        o = out(w) if out else new_dir(w, "ldm_run")
        return lm.main, ["--data", data, "--out", o, *LDM, "--max-steps", "2", *extra], [data, o]
    return build


def cn_train(data_fn, *extra, out=None, backbone=None):
    def build(w):
        data = data_fn(w)
        o = out(w) if out else new_dir(w, "cn_run")
        bb = backbone(w) if backbone else w.dit
        return cn.main, ["--data", data, "--backbone", bb, "--out", o, *CN, "--max-steps", "2", *extra], [data, o, bb]
    return build


TEXT = lambda w: w.text                                          # noqa: E731 (the table reads better this way)
MULTI = lambda w: w.multi                                        # noqa: E731
DATA_CASES = [  # (name, meta / shards / cache edit for a text dataset, for a multi dataset, pattern)
    ("duplicate-id", dict(meta=edit_rows(duplicate_id)), "appears more than once"),
    ("no-split-column", dict(meta=drop_column("split")), r"no column\(s\) split"),
    ("no-shard-column", dict(meta=drop_column("shard")), r"no column\(s\) shard"),
    ("index-past-end", dict(meta=set_first(index="64")), r"has index 64; shard 0 holds rows 0\.\.63"),
    ("index-minus-one", dict(meta=set_first(index="-1")), r"has index -1"),
    ("index-not-integer", dict(meta=set_first(index="x")), r"expected integers"),
    ("absent-shard", dict(meta=set_first(shard="7")), r"00007.safetensors: no such shard|names shard 7"),
    ("images-float32", dict(shards=cast("images", torch.float32)), r"'images' stored as F32; expected U16"),
    ("images-uint8", dict(shards=cast("images", torch.uint8)), r"'images' stored as U8; expected U16"),
    ("wrong-tensor-key", dict(shards=rename("images", "image")), r"no tensor 'images'"),
    ("fewer-shard-rows", dict(shards=lambda t: {k: v[:10] for k, v in t.items()}), r"holds rows 0\.\.9"),
]
CASES = []
for name, edit, pattern in DATA_CASES:
    CASES.append((f"dit-train-{name}", dit_train(lambda w, e=edit: variant(w, w.text, **e)), pattern))
    CASES.append((f"ldm-train-{name}", ldm_train(lambda w, e=edit: variant(w, w.multi, **e)), pattern))
    CASES.append((f"cn-train-{name}", cn_train(lambda w, e=edit: variant(w, w.text, **e)), pattern))
CASES += [
    ("dit-train-info-not-json", dit_train(lambda w: broken_info(variant(w, w.text))), r"info.json: not readable JSON"),
    ("ldm-train-info-not-json", ldm_train(lambda w: broken_info(variant(w, w.multi))), r"info.json: not readable JSON"),
    ("cn-train-info-not-json", cn_train(lambda w: broken_info(variant(w, w.text))), r"info.json: not readable JSON"),
    ("dit-train-no-report-column", dit_train(lambda w: variant(w, w.text, meta=drop_column("report"))),
     r"no column\(s\) report"),
    ("cn-train-no-report-column", cn_train(lambda w: variant(w, w.text, meta=drop_column("report"))),
     r"no column\(s\) report"),
    ("ldm-train-no-age-column", ldm_train(lambda w: variant(w, w.multi, meta=drop_column("age"))),
     r"no column\(s\) age"),
    ("ldm-train-age-minus-5", ldm_train(lambda w: variant(w, w.multi, meta=set_first(age="-5"))), r"age '-5'"),
    ("ldm-train-age-1e9", ldm_train(lambda w: variant(w, w.multi, meta=set_first(age="1e9"))), r"age '1e9'"),
    ("cn-train-masks-float", cn_train(lambda w: variant(w, w.text, shards=cast("masks", torch.float32))),
     r"'masks' stored as F32; expected U8"),
    ("dit-train-text-fewer-rows", dit_train(lambda w: variant(w, w.text, cache=(
        "text/bert/shards", lambda t: {k: v[:10] for k, v in t.items()}))), r"text cache.*holds rows 0\.\.9"),
    ("cn-train-text-fewer-rows", cn_train(lambda w: variant(w, w.text, cache=(
        "text/bert/shards", lambda t: {k: v[:10] for k, v in t.items()}))), r"text cache.*holds rows 0\.\.9"),
    ("ldm-train-text-fewer-rows", ldm_train(lambda w: variant(w, w.multi, cache=(
        "text/bert/shards", lambda t: {k: v[:10] for k, v in t.items()}))), r"re-run embed.*holds rows 0\.\.9"),
    ("ldm-train-image-features-fewer-rows", ldm_train(lambda w: variant(w, w.multi, cache=(
        "images/vit/shards", first_rows("features", 10)))), r"re-run embed.*holds rows 0\.\.9"),
    ("ldm-train-image-features-float16", ldm_train(lambda w: variant(w, w.multi, cache=(
        "images/vit/shards", cast("features", torch.float16)))), r"'features' stored as F16; expected F32"),
    ("dit-train-text-lengths-float", dit_train(lambda w: variant(w, w.text, cache=(
        "text/bert/shards", cast("lengths", torch.float32)))), r"'lengths' stored as F32; expected I32"),
    # --out: a file, a dataset, another command's outputs
    ("dit-train-out-file", dit_train(TEXT, out=lambda w: w.file), r"a file; expected a folder"),
    ("ldm-train-out-file", ldm_train(MULTI, out=lambda w: w.file), r"a file; expected a folder"),
    ("cn-train-out-file", cn_train(TEXT, out=lambda w: w.file), r"a file; expected a folder"),
    ("dit-train-out-dataset", dit_train(TEXT, out=lambda w: w.multi), r"holds files this command did not write"),
    ("ldm-train-out-dataset", ldm_train(MULTI, out=lambda w: w.text), r"holds files this command did not write"),
    ("cn-train-out-dataset", cn_train(TEXT, out=lambda w: w.multi), r"holds files this command did not write"),
    ("dit-train-out-foreign", dit_train(TEXT, out=lambda w: w.foreign), r"holds files this command did not write"),
    ("dit-train-out-sample-folder", dit_train(TEXT, out=lambda w: w.dit_fake), r"--out .*: written with"),
    ("ldm-train-out-other-run", ldm_train(MULTI, out=lambda w: w.dit), r"written with command|not an ldm"),
    ("cn-train-out-other-run", cn_train(TEXT, out=lambda w: w.ldm), r"written with command|not a controlnet.py"),
]
for flag, value in (("--batch-size", "0"), ("--max-steps", "-1"), ("--max-steps", "0"), ("--log-every", "0"),
                    ("--ckpt-every", "0"), ("--micro-batch", "-1"), ("--sample-every", "-1")):
    pattern = f"{flag} {value}: expected"
    CASES.append((f"dit-train{flag}={value}", dit_train(TEXT, flag, value), pattern))
    CASES.append((f"ldm-train{flag}={value}", ldm_train(MULTI, flag, value), pattern))
    CASES.append((f"cn-train{flag}={value}", cn_train(TEXT, flag, value), pattern))
CASES += [("cn-train--control-blocks=0", cn_train(TEXT, "--control-blocks", "0"), "--control-blocks 0: expected"),
          ("ldm-train--timesteps=0", ldm_train(MULTI, "--timesteps", "0"), "--timesteps 0: expected")]


def resume_from(kind):
    """A run folder holding a bad ckpt.safetensors (it would be resumed from)."""
    def out(w):
        o = new_dir(w, "resume")
        os.makedirs(o)
        shutil.copy(w.bad[kind], os.path.join(o, "ckpt.safetensors"))
        return o
    return out


for kind, pattern in (("truncated", "not a readable safetensors file"), ("empty", "not a readable safetensors"),
                      ("text", "not a readable safetensors")):
    CASES.append((f"dit-train-resume-{kind}", dit_train(TEXT, out=resume_from(kind)), pattern))
    CASES.append((f"ldm-train-resume-{kind}", ldm_train(MULTI, out=resume_from(kind)), pattern))
    CASES.append((f"cn-train-resume-{kind}", cn_train(TEXT, out=resume_from(kind)), pattern))
    CASES.append((f"dit-train-init-from-{kind}", dit_train(TEXT, "--init-from", f"BAD:{kind}"), pattern))
    CASES.append((f"cn-train-backbone-{kind}", cn_train(TEXT, backbone=lambda w, k=kind: w.bad[k]), pattern))
CASES += [
    ("dit-train-init-from-ldm-checkpoint", dit_train(TEXT, "--init-from", "BAD:ldm"),
     r"not a dit_text2img.py checkpoint"),
    ("cn-train-backbone-ldm-checkpoint", cn_train(TEXT, backbone=lambda w: w.ldm), r"not a dit_text2img.py checkpoint"),
    ("ldm-train-resume-dit-checkpoint", ldm_train(MULTI, out=lambda w: w.dit), r"written with command|not an ldm"),
]


def set_row0(**values):
    """meta= editor: the first row (the one a 1-image sample reads) gets these values."""
    return edit_rows(lambda rows: [{**rows[0], **values}] + rows[1:])


def dit_cond(meta_edit):
    """dit_text2img.py sample argv with --cond a meta.csv edited by meta_edit (instead of --prompts)."""
    def fn(w, out):
        cond = os.path.join(variant(w, w.text, meta=meta_edit), "meta.csv")
        return swap(dit_sample(w, out), "--prompts=--cond", cond)
    return fn


def ldm_cond(meta_edit, *extra):
    """ldm_multicond.py sample argv with --cond a meta.csv edited by meta_edit (its caches beside it)."""
    def fn(w, out):
        return ldm_sample(w, out, *extra, cond=os.path.join(variant(w, w.multi, meta=meta_edit), "meta.csv"))
    return fn


def embed(main, sub, base, meta_edit, *extra):
    """An embed subcommand on a copy of dataset `base` whose meta.csv is edited (None: the dataset itself)."""
    def build(w):
        data = variant(w, getattr(w, base), meta=meta_edit) if meta_edit else getattr(w, base)
        return main, [sub, "--data", data, *extra], [data]
    return build


def sampler(main, argv_fn, watch_fn=lambda w: []):
    """A sampler case: argv_fn(w, out) with a fresh --out (watched)."""
    def build(w):
        out = new_dir(w, "fake")
        return main, argv_fn(w, out), [out, *watch_fn(w)]
    return build


def into(main, argv_fn, folder):
    """A sampler case writing into an existing folder (watched): argv_fn(w, folder(w))."""
    def build(w):
        out = folder(w)
        return main, argv_fn(w, out), [out, w.text, w.multi]
    return build


def bad_ckpt(argv_fn, kind):
    """argv with --ckpt replaced by a bad checkpoint file of `kind` (or another script's run)."""
    def fn(w, out):
        argv = argv_fn(w, out)
        i = argv.index("--ckpt")
        return argv[:i + 1] + [w.bad.get(kind) or getattr(w, kind)] + argv[i + 2:]
    return fn


for kind, pattern in (("truncated", "not a readable safetensors"), ("empty", "not a readable safetensors"),
                      ("text", "not a readable safetensors")):
    CASES += [(f"dit-sample-ckpt-{kind}", sampler(dt.main, bad_ckpt(dit_sample, kind)), pattern),
              (f"ldm-sample-ckpt-{kind}", sampler(lm.main, bad_ckpt(ldm_sample, kind)), pattern),
              (f"cn-sample-ckpt-{kind}", sampler(cn.main, bad_ckpt(cn_sample, kind)), pattern)]
CASES += [
    ("dit-sample-ckpt-of-ldm", sampler(dt.main, bad_ckpt(dit_sample, "ldm")), r"not a dit_text2img.py checkpoint"),
    ("ldm-sample-ckpt-of-dit", sampler(lm.main, bad_ckpt(ldm_sample, "dit")), r"not an ldm_multicond.py checkpoint"),
    ("cn-sample-ckpt-of-dit", sampler(cn.main, bad_ckpt(cn_sample, "dit")), r"not a controlnet.py run folder"),
]
for flag, value in (("--n", "-3"), ("--batch-size", "0"), ("--steps", "0")):
    CASES += [(f"dit-sample{flag}={value}", sampler(dt.main, lambda w, o, f=flag, v=value: dit_sample(w, o, f, v)),
               f"{flag} {value}: expected"),
              (f"ldm-sample{flag}={value}", sampler(lm.main, lambda w, o, f=flag, v=value: ldm_sample(w, o, f, v)),
               f"{flag} {value}: expected"),
              (f"cn-sample{flag}={value}", sampler(cn.main, lambda w, o, f=flag, v=value: cn_sample(w, o, f, v)),
               f"{flag} {value}: expected")]
CASES += [
    ("dit-sample--n-per-prompt=0", sampler(dt.main, lambda w, o: dit_sample(w, o, "--n-per-prompt", "0")),
     "--n-per-prompt 0"),
    ("cn-sample--n-per-cond=0", sampler(cn.main, lambda w, o: cn_sample(w, o, "--n-per-cond", "0")), "--n-per-cond 0"),
    # --out: a dataset, another command's outputs, a file, a training run
    ("dit-sample-out-dataset", into(dt.main, dit_sample, lambda w: w.text), r"holds files this command did not write"),
    ("ldm-sample-out-dataset", into(lm.main, ldm_sample, lambda w: w.multi), r"holds files this command did not"),
    ("cn-sample-out-dataset", into(cn.main, cn_sample, lambda w: w.text), r"holds files this command did not write"),
    ("dit-sample-out-foreign", into(dt.main, dit_sample, lambda w: w.foreign), r"holds files this command did not"),
    ("ldm-sample-out-run", into(lm.main, ldm_sample, lambda w: w.ldm), r"--out .*: written with"),
    ("cn-sample-out-file", into(cn.main, cn_sample, lambda w: w.file), r"a file; expected a folder"),
    ("dit-sample-out-file", into(dt.main, dit_sample, lambda w: w.file), r"a file; expected a folder"),
    ("ldm-sample-out-file", into(lm.main, ldm_sample, lambda w: w.file), r"a file; expected a folder"),
    # resuming a sample folder with other settings: refused, naming the first difference
    ("dit-sample-resume-other-seed", into(dt.main, lambda w, o: dit_sample(w, o, "--seed", "1"),
                                          lambda w: w.dit_fake), r"written with seed = 0, this run has 1"),
    ("dit-sample-resume-other-prompts", into(dt.main, lambda w, o: swap(dit_sample(w, o), "--prompts", w.prompts2),
                                             lambda w: w.dit_fake), r"written with prompts"),
    ("dit-sample-resume-other-ckpt", into(dt.main, lambda w, o: bad_ckpt(dit_sample, "dit2")(w, o),
                                          lambda w: w.dit_fake), r"written with ckpt_sha256"),
    ("dit-sample-resume-other-sampler", into(dt.main, lambda w, o: dit_sample(w, o, "--sampler", "ddpm"),
                                             lambda w: w.dit_fake), r"written with sampler"),
    ("ldm-sample-resume-other-seed", into(lm.main, lambda w, o: ldm_sample(w, o, "--seed", "1"),
                                          lambda w: w.ldm_fake), r"written with seed = 0, this run has 1"),
    ("ldm-sample-resume-other-cond", into(lm.main, ldm_cond(edit_rows(lambda r: r[::-1])), lambda w: w.ldm_fake),
     r"written with cond_sha256"),
    ("ldm-sample-resume-other-use", into(lm.main, lambda w, o: ldm_sample(w, o, "--use", "L"), lambda w: w.ldm_fake),
     r"written with use"),
    ("ldm-sample-resume-other-ckpt", into(lm.main, lambda w, o: bad_ckpt(ldm_sample, "ldm2")(w, o),
                                          lambda w: w.ldm_fake), r"written with ckpt_sha256"),
    ("cn-sample-resume-other-seed", into(cn.main, lambda w, o: cn_sample(w, o, "--seed", "1"), lambda w: w.cn_fake),
     r"written with seed = 0, this run has 1"),
    ("cn-sample-resume-other-boxes", into(cn.main, lambda w, o: swap(cn_sample(w, o), "--boxes", w.boxes2),
                                          lambda w: w.cn_fake), r"written with boxes_sha256"),
    ("cn-sample-resume-other-prompt", into(cn.main, lambda w, o: cn_sample(w, o, "--prompt", "edema"),
                                           lambda w: w.cn_fake), r"written with prompt"),
    ("cn-sample-resume-other-ckpt", into(cn.main, lambda w, o: cn_sample(w, o, ckpt=w.box2), lambda w: w.cn_fake),
     r"written with ckpt_sha256"),
    # conditions from a meta.csv: duplicate ids, a split asked of a table without one, ages, label columns
    ("dit-sample-cond-duplicate-id", sampler(dt.main, dit_cond(edit_rows(duplicate_id))), "appears more than once"),
    ("dit-sample-cond-no-report", sampler(dt.main, dit_cond(drop_column("report"))), r"no column\(s\) report"),
    ("ldm-sample-cond-duplicate-id", sampler(lm.main, ldm_cond(edit_rows(duplicate_id))), "appears more than once"),
    ("ldm-sample-split-without-column", sampler(lm.main, ldm_cond(drop_column("split"), "--split", "test")),
     r"no column\(s\) split"),
    ("ldm-sample-cond-age-minus-5", sampler(lm.main, ldm_cond(set_row0(age="-5"))), r"age '-5'"),
    ("ldm-sample-cond-no-sex-column", sampler(lm.main, ldm_cond(drop_column("sex"), "--use", "L")),
     r"no column\(s\) sex"),
    ("ldm-sample-cond-index-past-end", sampler(lm.main, ldm_cond(set_row0(index="99"), "--use", "I")),
     r"has index 99"),
    ("cn-sample-masks-hidden-file", sampler(cn.main, lambda w, o: masks_argv(w, o)), r"'\.hidden' is not usable"),
    # embed subcommands
    ("dit-embed-text--batch-size=0", embed(dt.main, "embed-text", "text", None, "--text-encoder", "x",
                                           "--batch-size", "0"), "--batch-size 0"),
    ("dit-embed-text-duplicate-id", embed(dt.main, "embed-text", "text", edit_rows(duplicate_id), "--text-encoder",
                                          "x", "--name", "b2"), "appears more than once"),
    ("dit-embed-text-index-past-end", embed(dt.main, "embed-text", "text", set_first(index="64"), "--text-encoder",
                                            "x", "--name", "b2"), r"has index 64"),
    ("ldm-embed-text--max-length=0", embed(lm.main, "embed-text", "multi", None, "--text-encoder", "x",
                                           "--max-length", "0"), "--max-length 0"),
    ("ldm-embed-images--batch-size=0", embed(lm.main, "embed-images", "multi", None, "--image-encoder", "x",
                                             "--batch-size", "0"), "--batch-size 0"),
    ("ldm-embed-images-index-past-end", embed(lm.main, "embed-images", "multi", set_first(index="64"),
                                              "--image-encoder", "x", "--name", "v2"), r"has index 64"),
    ("dit-embed-text-name-traversal", embed(dt.main, "embed-text", "text", None, "--text-encoder", "x", "--name",
                                            "../../x"), r"'\.\./\.\./x' is not usable as a file name"),
    ("ldm-embed-images-name-traversal", embed(lm.main, "embed-images", "multi", None, "--image-encoder", "x",
                                              "--name", "../x"), r"'\.\./x' is not usable as a file name"),
    ("ldm-embed-text-duplicate-id", embed(lm.main, "embed-text", "multi", edit_rows(duplicate_id), "--text-encoder",
                                          "x", "--name", "t2"), "appears more than once"),
    ("cn-evaluate--n=-1", sampler(cn.main, lambda w, o: evaluate_argv(w, o, "--n", "-1")), "--n -1: expected"),
    ("cn-evaluate-out-dataset", into(cn.main, evaluate_argv, lambda w: w.multi), r"holds files this command did not"),
    ("cn-evaluate-resume-other-seed", into(cn.main, lambda w, o: evaluate_argv(w, o, "--seed", "3"), lambda w: w.ev),
     r"written with seed = 0, this run has 3"),
    ("cn-evaluate-resume-other-split", into(cn.main, lambda w, o: evaluate_argv(w, o, "--split", "val"),
                                            lambda w: w.ev), r"written with split"),
]


def masks_argv(w, out):
    """A --masks folder with a hidden file among the masks (its id would be '.hidden')."""
    d = new_dir(w, "masks")
    os.makedirs(d)
    for stem in ("c", ".hidden"):
        for k in range(2):
            from PIL import Image
            Image.fromarray(np.full((32, 32), 255 * k, np.uint8)).save(os.path.join(d, f"{stem}_{k}.png"))
    return ["sample", "--ckpt", w.cn, "--masks", d, "--prompt", "x", "--n-per-cond", "1", "--steps", "2", "--out", out,
            "--text-encoder", w.bert]


@pytest.fixture(scope="module")
def w2(w):
    """A second checkpoint of each script (other seeds), and the run names the table uses for them."""
    w.dit2 = os.path.join(w.root, "dit2")
    train_ok(dt.main, ["--data", w.text, "--out", w.dit2, *DIT, "--max-steps", "1", "--seed", "1"])
    w.ldm2 = os.path.join(w.root, "ldm2")
    train_ok(lm.main, ["--data", w.multi, "--out", w.ldm2, *LDM, "--max-steps", "1", "--seed", "1"])
    w.box2 = os.path.join(w.root, "box2")
    train_ok(cn.main, ["--data", w.text, "--backbone", w.dit, "--out", w.box2, *CN[:-2], "--cond-type", "box",
                       "--max-steps", "1", "--seed", "1"])
    w.bad.update(dit2=w.dit2, ldm2=w.ldm2)
    # a downstream.py segment checkpoint as that script writes it (random U-Net: evaluate's refusals come first),
    # and one finished evaluate folder
    w.seg = os.path.join(w.root, "seg.safetensors")
    config = {"task": "segment", "width": 8, "mask": "Pleural Effusion", "img_size": 32}
    unet = {f"model.{k}": v.contiguous() for k, v in cn.UNet(1, width=8).state_dict().items()}
    save_pt(unet, w.seg, metadata={"format": "downstream/1", "config": json.dumps(config)})
    w.ev = os.path.join(w.root, "ev")
    train_ok(cn.main, evaluate_argv(w, w.ev))
    return w



# Cases that were refused in one line already at commit ea9b5b8 (open_checkpoint and batch_split were in use, the
# format tag of a checkpoint was checked): kept as guards of items 9 and 7, in their own test, since every case of
# the main table failed on that commit (checked by running this file against `git archive ea9b5b8`).
ALREADY_REFUSED = {
    "dit-train-absent-shard",
    "ldm-train-absent-shard",
    "ldm-train-out-other-run",
    "cn-train-out-other-run",
    "dit-train--batch-size=0",
    "ldm-train--batch-size=0",
    "cn-train--batch-size=0",
    "cn-train--control-blocks=0",
    "dit-train-resume-truncated",
    "ldm-train-resume-truncated",
    "cn-train-resume-truncated",
    "dit-train-init-from-truncated",
    "dit-train-resume-empty",
    "ldm-train-resume-empty",
    "cn-train-resume-empty",
    "dit-train-init-from-empty",
    "dit-train-resume-text",
    "ldm-train-resume-text",
    "cn-train-resume-text",
    "dit-train-init-from-text",
    "dit-train-init-from-ldm-checkpoint",
    "cn-train-backbone-ldm-checkpoint",
    "ldm-train-resume-dit-checkpoint",
    "dit-sample-ckpt-truncated",
    "ldm-sample-ckpt-truncated",
    "cn-sample-ckpt-truncated",
    "dit-sample-ckpt-empty",
    "ldm-sample-ckpt-empty",
    "cn-sample-ckpt-empty",
    "dit-sample-ckpt-text",
    "ldm-sample-ckpt-text",
    "cn-sample-ckpt-text",
    "dit-sample-ckpt-of-ldm",
    "ldm-sample-ckpt-of-dit",
    "cn-sample-ckpt-of-dit",
    "dit-sample--n-per-prompt=0",
    "cn-sample--n-per-cond=0",
}
FIXED = [c for c in CASES if c[0] not in ALREADY_REFUSED]
GUARDS = [c for c in CASES if c[0] in ALREADY_REFUSED]


def run_case(w2, build, pattern):
    main, argv, watch = build(w2)
    argv = [(w2.bad.get(a[4:]) or getattr(w2, a[4:])) if a.startswith("BAD:") else a for a in argv]
    expect_refusal(main, argv, pattern, watch=[p for p in watch if p])


@pytest.mark.parametrize("build,pattern", [c[1:] for c in FIXED], ids=[c[0] for c in FIXED])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(w2, build, pattern):
    run_case(w2, build, pattern)


@pytest.mark.parametrize("build,pattern", [c[1:] for c in GUARDS], ids=[c[0] for c in GUARDS])
def test_bad_input_refused_before_issue_19_stays_refused(w2, build, pattern):
    run_case(w2, build, pattern)


# ----------------------------------------------------------------------------------------------------------------
# Ids from data name files only inside --out (item 1): every writer, every kind of traversal id


def traversal_table(w, bad_id, column_rows):
    """A meta.csv under w.root/cases/ whose first row's id is `bad_id` (the rest of the dataset's table)."""
    rows, columns = read_rows(os.path.join(column_rows, "meta.csv"))
    rows[0] = {**rows[0], "id": bad_id}
    d = new_dir(w, "cond")
    os.makedirs(d)
    for name in os.listdir(column_rows):                         # the caches beside it (ldm reads them from there)
        if name not in ("meta.csv", "info.json") and not name.startswith("."):
            os.symlink(os.path.join(column_rows, name), os.path.join(d, name))
    write_rows(os.path.join(d, "meta.csv"), rows[:3], columns)
    return os.path.join(d, "meta.csv")


@pytest.mark.parametrize("bad_id", TRAVERSAL)
def test_ids_from_data_write_nothing_outside_out(w2, bad_id, tmp_path):
    """--boxes keys (controlnet), --cond ids (dit_text2img, ldm_multicond): refused, nothing written anywhere. The
    outside watched is the whole tmp folder the output is in (the ids climb two levels from --out)."""
    outside = tmp_path / "a" / "b"
    outside.mkdir(parents=True)
    out = outside / "out"
    if bad_id.startswith("/"):                                   # an absolute id where `confined` can see it
        bad_id = str(tmp_path / bad_id[1:])
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({bad_id: {"Pleural Effusion": [0.1, 0.1, 0.5, 0.5]}, "ok": {}}))
    argv = swap(cn_sample(w2, str(out)), "--boxes", str(boxes))
    code = confined(cn.main, argv, out, tmp_path)
    one_line_refusal(code, "is not usable as a file name")
    cond = traversal_table(w2, bad_id, w2.text)
    argv = swap(dit_sample(w2, str(out)), "--prompts=--cond", cond)
    one_line_refusal(confined(dt.main, argv, out, tmp_path), "is not usable as a file name")
    cond = traversal_table(w2, bad_id, w2.multi)
    one_line_refusal(confined(lm.main, ldm_sample(w2, str(out), cond=cond), out, tmp_path),
                     "is not usable as a file name")
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "abs")


# ----------------------------------------------------------------------------------------------------------------
# .pt2 programs (item 3): never opened by training with sampling off; sampling decodes with decoder.safetensors


@pytest.fixture(scope="module")
def latent(w2):
    """Latent copies of the two datasets (float32 latents, decoder.safetensors, a crafted decoder.pt2 that is no
    program, a real encoder.pt2) and a dit_text2img backbone trained on them."""
    ns = SimpleNamespace()
    for name, base in (("text", w2.text), ("multi", w2.multi)):
        d = os.path.join(w2.root, f"latent_{name}")
        os.makedirs(d)
        for entry in os.listdir(base):
            if entry in ("meta.csv", "info.json"):
                shutil.copy(os.path.join(base, entry), d)
            elif not entry.startswith("."):
                os.symlink(os.path.join(base, entry), os.path.join(d, entry))
        add_latents(d)
        setattr(ns, name, d)
    return ns


def recording_export_load(monkeypatch):
    """torch.export.load, recording the files it is asked to open."""
    opened, real = [], torch.export.load

    def load(path, *a, **k):
        opened.append(os.path.basename(str(path)))
        return real(path, *a, **k)
    monkeypatch.setattr(torch.export, "load", load)
    return opened


def test_pt2_never_opened_by_training_and_sampling_uses_safetensors(w2, latent, monkeypatch, tmp_path, capsys):
    opened = recording_export_load(monkeypatch)
    dit = str(tmp_path / "dit")
    train_ok(dt.main, ["--data", latent.text, "--out", dit, *DIT, "--max-steps", "2"])       # --sample-every 0
    ldm = str(tmp_path / "ldm")
    train_ok(lm.main, ["--data", latent.multi, "--out", ldm, *LDM, "--max-steps", "1"])
    cnr = str(tmp_path / "cn")
    train_ok(cn.main, ["--data", latent.text, "--backbone", dit, "--out", cnr, *CN, "--max-steps", "1"])
    assert opened == ["encoder.pt2"]                 # controlnet's condition encoder only: it is needed every step
    assert "encoder.pt2: the condition-map encoder, a torch.export program (.pt2), which can run code" in \
        capsys.readouterr().out
    # sampling: decoder.safetensors (the crafted decoder.pt2 would fail to load), images of the decoder's size
    from PIL import Image
    fake = str(tmp_path / "fake_dit")
    train_ok(dt.main, ["sample", "--ckpt", dit, "--prompts", w2.prompts, "--n-per-prompt", "1", "--steps", "2",
                       "--out", fake])
    fake_l = str(tmp_path / "fake_ldm")
    train_ok(lm.main, ["sample", "--ckpt", ldm, "--cond", os.path.join(latent.multi, "meta.csv"), "--n", "1",
                       "--steps", "2", "--out", fake_l])
    masks = tmp_path / "m"
    masks.mkdir()
    for k in range(2):
        Image.fromarray(np.full((32, 32), 255 * k, np.uint8)).save(masks / f"c_{k}.png")
    fake_c = str(tmp_path / "fake_cn")
    train_ok(cn.main, ["sample", "--ckpt", cnr, "--masks", str(masks), "--prompt", "no acute process",
                       "--n-per-cond", "1", "--steps", "2", "--out", fake_c, "--text-encoder", w2.bert])
    assert opened == ["encoder.pt2"] * 2
    for path in (os.path.join(fake, "prompt00000.png"), os.path.join(fake_l, "000000.png"),
                 os.path.join(fake_c, "c.png")):
        assert np.asarray(Image.open(path)).shape == (32, 32)   # decoded: 8 x 8 latents -> 32 px by the safetensors
    # no decoder.safetensors: the .pt2 is used, said in one line (here it is no program: a one-line error)
    info_path = os.path.join(latent.text, "latents", "toy", "info.json")
    info = json.load(open(info_path))
    try:
        json.dump({k: v for k, v in info.items() if k != "decoder_safetensors"}, open(info_path, "w"))
        msg = expect_refusal(dt.main, ["sample", "--ckpt", dit, "--prompts", w2.prompts, "--n-per-prompt", "1",
                                       "--steps", "2", "--out", str(tmp_path / "f2")], "not a loadable torch.export")
        assert "decoder.pt2" in msg
        assert "a torch.export program (.pt2), which can run code" in capsys.readouterr().out
        # a decoder path leaving the latent folder (or absolute) is refused, not followed
        for where in ("/tmp/elsewhere/decoder.pt2", "../../decoder.pt2"):
            json.dump({**info, "decoder_safetensors": where}, open(info_path, "w"))
            expect_refusal(dt.main, ["sample", "--ckpt", dit, "--prompts", w2.prompts, "--out",
                                     str(tmp_path / "f3")], "is outside the latent folder", watch=[tmp_path / "f3"])
    finally:
        json.dump(info, open(info_path, "w"))


# ----------------------------------------------------------------------------------------------------------------
# Output folders (items 4, 5, 11): same settings resume; stale temporaries and log records past the checkpoint go


def test_sample_folders_resume_with_the_same_settings(w2):
    """The finished sample folders of the fixture: the same command again has nothing left to do (and keeps its
    files), so the records are what decides the images, not the paths or --batch-size."""
    for main, argv, folder in ((dt.main, dit_sample(w2, w2.dit_fake, "--batch-size", "3"), w2.dit_fake),
                               (lm.main, ldm_sample(w2, w2.ldm_fake, "--batch-size", "5"), w2.ldm_fake)):
        pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
        assert main(argv) == 0 and sorted(f for f in os.listdir(folder) if f.endswith(".png")) == pngs
    assert cn.main(cn_sample(w2, w2.cn_fake)) == ["a"]
    assert cn.main(evaluate_argv(w2, w2.ev))["n_conditions"] == 1
    record = json.load(open(os.path.join(w2.cn_fake, "output.json")))
    assert record["command"] == "controlnet.py sample" and len(record["ckpt_sha256"]) == 64


@pytest.mark.parametrize("script", ["dit", "ldm", "cn"])
def test_resume_removes_temporaries_and_log_records_past_the_checkpoint(w2, script, tmp_path):
    main, flags = {"dit": (dt.main, ["--data", w2.text, *DIT]), "ldm": (lm.main, ["--data", w2.multi, *LDM]),
                   "cn": (cn.main, ["--data", w2.text, "--backbone", w2.dit, *CN])}[script]
    run = str(tmp_path / "run")
    shutil.copytree(getattr(w2, script), run)                   # 2 steps, checkpoint at 2, log records 1, 2
    os.remove(os.path.join(run, "output.json"))                 # a run folder from before output.json: its ckpt
    stale = os.path.join(run, ".tmp-abc123ckpt.safetensors")    # a killed checkpoint write
    with open(stale, "wb") as f:
        f.write(b"\0" * 1000)
    with open(os.path.join(run, "log.jsonl"), "a") as f:        # a killed run's records after its checkpoint
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    train_ok(main, [*flags, "--out", run, "--max-steps", "3"])
    assert not os.path.exists(stale)
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "log.jsonl"))]
    assert steps == [1, 2, 3]
    assert json.load(open(os.path.join(run, "output.json")))["command"].endswith(" train")


@pytest.mark.parametrize("script", ["dit", "ldm", "cn"])
def test_nan_on_a_fresh_run_says_no_checkpoint_was_written(w2, script, tmp_path):
    main, flags = {"dit": (dt.main, ["--data", w2.text, *DIT]), "ldm": (lm.main, ["--data", w2.multi, *LDM]),
                   "cn": (cn.main, ["--data", w2.text, "--backbone", w2.dit, *CN])}[script]
    out = tmp_path / "nan"
    expect_refusal(main, [*flags, "--out", out, "--max-steps", "2", "--ckpt-every", "100", "--lr", "1e30"],
                   r"non-finite .*stopped before the first checkpoint \(.*ckpt.safetensors not written\)")
    assert not os.path.exists(out / "ckpt.safetensors")

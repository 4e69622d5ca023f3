"""Bad-input table of vae.py, flow_scm.py and downstream.py (issue 19; README.md "What is guaranteed"): each case is a
command a careless or hostile user could give, the one-line error it must stop with, and the folders that must be
unchanged afterwards (tests/bad_input.py runs it in this process). Most cases are refused at start-up, before any
model is built; the few that need a checkpoint share tiny module-scoped ones. Below the table: the housekeeping
promises (log truncation on resume, stale temporaries, file modes, a NaN stop on a fresh run)."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import downstream as D
import flow_scm as fs
import vae
from bad_input import confined, expect_refusal, one_line_refusal, run_main

LABELS3 = "Cardiomegaly,Pleural Effusion,Pneumothorax"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread avoids OpenMP spin-waits on a shared 2-core machine; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: variants of the session phantom (its shards hard-linked, never written), bad checkpoints, a tiny decoder


def read_table(path):
    with open(path) as f:
        lines = f.read().splitlines()
    return lines[0].split(","), lines[1:]


def variant(base, out, edit=None, drop=(), shard=None):
    """A copy of dataset `base` in `out`: meta.csv through edit(header, rows) / without the `drop` columns (a naive
    comma split is enough: the edited columns come before the quoted report text), shards hard-linked unless
    shard(tensors) gives new shard 0 tensors."""
    os.makedirs(os.path.join(out, "shards"))
    shutil.copy(os.path.join(base, "info.json"), out)
    for name in os.listdir(os.path.join(base, "shards")):
        src, dst = os.path.join(base, "shards", name), os.path.join(out, "shards", name)
        if shard and name == "00000.safetensors":
            with safe_open(src, "pt") as f:
                save_file(shard({k: f.get_tensor(k) for k in f.keys()}), dst)
        else:
            os.link(src, dst)
    with open(os.path.join(base, "meta.csv")) as f:
        lines = f.read().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",", len(header) - 1) for line in lines[1:]]
    if edit:
        edit(header, rows)
    keep = [i for i, c in enumerate(header) if c not in drop]
    with open(os.path.join(out, "meta.csv"), "w") as f:
        for cells in [header] + rows:
            f.write(",".join(cells[i] for i in keep) + "\n")
    return out


def set_cell(column, row, value):
    def edit(header, rows):
        rows[row][header.index(column)] = value
    return edit


def dup_id(header, rows):
    rows[1][0] = rows[0][0]


@pytest.fixture(scope="module")
def data(phantom_dir, tmp_path_factory):
    """name -> dataset folder: the phantom itself ('ok', never written) and one variant per kind of bad data."""
    root = tmp_path_factory.mktemp("bad_data")
    d = {"ok": phantom_dir}
    specs = {
        "dup_ids": dict(edit=dup_id),
        "no_split": dict(drop=("split",)),
        "no_shard": dict(drop=("shard",)),
        "no_label": dict(drop=("Pneumonia",)),
        "no_sex": dict(drop=("sex",)),
        "index_past": dict(edit=set_cell("index", 3, "99999")),
        "index_neg": dict(edit=set_cell("index", 3, "-1")),
        "bad_age": dict(edit=set_cell("age", 0, "999")),
        "float_shard": dict(shard=lambda t: {**t, "images": t["images"].float()}),
        "uint8_shard": dict(shard=lambda t: {**t, "images": (t["images"].to(torch.int32) // 256).to(torch.uint8)}),
        "wrong_key": dict(shard=lambda t: {"pixels": t["images"], "masks": t["masks"]}),
        "short_shard": dict(shard=lambda t: {k: v[:100].contiguous() for k, v in t.items()}),
        "float_masks": dict(shard=lambda t: {**t, "masks": t["masks"].float()}),
    }
    for name, spec in specs.items():
        d[name] = variant(phantom_dir, str(root / name), **spec)
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad checkpoint files: empty, truncated safetensors, not safetensors, truncated .pth, a JSON that is not."""
    root = tmp_path_factory.mktemp("bad_files")
    good = str(root / "good.safetensors")
    save_file({"w": torch.zeros(64, 64)}, good, metadata={"format": "rectified_flow/1", "config": "{}"})
    out = {"rf": good}
    with open(good, "rb") as f:
        head = f.read(200)
    for name, data in (("empty", b""), ("truncated", head), ("text", b"hello, not a checkpoint\n")):
        out[name] = str(root / f"{name}.safetensors")
        with open(out[name], "wb") as f:
            f.write(data)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(root / "full.pth"))
    with open(root / "full.pth", "rb") as f:
        pth = f.read()
    out["pth"] = str(root / "truncated.pth")
    with open(out["pth"], "wb") as f:
        f.write(pth[:len(pth) // 2])
    out["a_file"] = str(root / "a_file")
    with open(out["a_file"], "w") as f:
        f.write("not a folder\n")
    return out


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A tiny RadVAE decoder.safetensors (untrained, as vae.py encode bakes it) and latent files of its vae_id."""
    root = tmp_path_factory.mktemp("decoder")
    cfg = vae.resolve(vae.parse_config(["--channels", "8", "--mults", "1,2", "--latent-channels", "4",
                                        "--head-channels", "8", "--perceptual", "none"]))
    torch.manual_seed(0)
    model = vae.RadVAE(cfg).eval()
    spec = vae.decoder_spec(cfg, model, "tiny")
    save_file(vae.baked_decoder_weights(model.decoder), str(root / "decoder.safetensors"),
              metadata={"spec": json.dumps(spec)})
    meta = {"vae_id": spec["vae_id"], "vae": "tiny"}
    for name, seed in (("a", 1), ("b", 2)):
        z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
        save_file({"latents": z}, str(root / f"{name}.safetensors"), metadata=meta)
    with open(root / "a.safetensors", "rb") as f:
        head = f.read(100)
    with open(root / "cut.safetensors", "wb") as f:
        f.write(head)
    return str(root)


@pytest.fixture(scope="module")
def scm_run(phantom_dir, tmp_path_factory):
    """A flow_scm.py run of 2 tiny steps (checkpoint at step 2) and an edit plan over its test rows."""
    root = tmp_path_factory.mktemp("scm")
    run = str(root / "run")
    fs.main(["--size", "tiny", "--data", phantom_dir, "--out", run, "--max-steps", "2", "--batch-size", "16",
             "--log-every", "1", "--ckpt-every", "2", "--device", "cpu"])
    return run


def plan(folder, rows):
    """An edit plan CSV (id, source_id, intervention) in `folder`."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "plan.csv")
    with open(path, "w") as f:
        f.write("id,source_id,intervention\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------
# The table: (id, script, argv builder, pattern, watched folders). A builder gets a context of the fixtures and a
# fresh tmp folder; watched folders are names in that context ("data:<variant>", "tmp", or a path key).

def ctx_path(c, key):
    kind, _, name = key.partition(":")
    return c["data"][name] if kind == "data" else key.format(tmp=c["tmp"]) if "{" in key else c[key]


VAE_TRAIN = ["--perceptual", "none", "--max-steps", "1", "--sample-every", "0", "--device", "cpu"]
SCM_TRAIN = ["--size", "tiny", "--max-steps", "1", "--batch-size", "16", "--device", "cpu"]
DS_TRAIN = ["--labels", LABELS3, "--batch-size", "16", "--max-steps", "1", "--eval-every", "1", "--n-boot", "0",
            "--width", "8", "--device", "cpu"]


def vae_train(name, *extra):
    return lambda c: ["--data", c["data"][name], "--out", c["tmp"] + "/run", *VAE_TRAIN, *extra]


def scm_train(name, *extra):
    return lambda c: ["--data", c["data"][name], "--out", c["tmp"] + "/run", *SCM_TRAIN, *extra]


def ds_train(name, split="train", *extra):
    return lambda c: ["--train", f"real={c['data'][name]}:{split}", "--val", f"{c['data']['ok']}:val",
                      "--test", f"t={c['data']['ok']}:test", "--out", c["tmp"] + "/out", *DS_TRAIN, *extra]


def scm(cmd, *extra):
    return lambda c: [cmd, "--ckpt", c["scm"], "--device", "cpu", *extra]


CASES = [
    # --- vae.py: data checked at start (items 6, 7, 10) ---
    ("vae-dup-ids", "vae", vae_train("dup_ids"), r"id '\w+' appears more than once", ["data:dup_ids"]),
    ("vae-no-split", "vae", vae_train("no_split"), r"no column\(s\) split", ["data:no_split"]),
    ("vae-no-shard-column", "vae", vae_train("no_shard"), r"no column\(s\) shard", ["data:no_shard"]),
    ("vae-index-past-end", "vae", vae_train("index_past"), r"index 99999; shard 0 holds rows", ["data:index_past"]),
    ("vae-index-negative", "vae", vae_train("index_neg"), r"index -1; shard 0 holds rows", ["data:index_neg"]),
    ("vae-float-shard", "vae", vae_train("float_shard"), r"'images' stored as F32; expected U16", ["data:float_shard"]),
    ("vae-uint8-shard", "vae", vae_train("uint8_shard"), r"'images' stored as U8; expected U16", ["data:uint8_shard"]),
    ("vae-wrong-key", "vae", vae_train("wrong_key"), r"no tensor 'images'", ["data:wrong_key"]),
    ("vae-fewer-shard-rows", "vae", vae_train("short_shard"), r"has index \d+; shard 0 holds rows 0\.\.99",
     ["data:short_shard"]),
    # --- vae.py: counts (item 7), output folders (items 4, 10) ---
    ("vae-batch-0", "vae", vae_train("ok", "--batch-size", "0"), r"--batch-size 0: expected a positive", ["data:ok"]),
    ("vae-max-steps-neg", "vae", vae_train("ok", "--max-steps", "-1"), r"--max-steps -1: expected", ["data:ok"]),
    ("vae-log-every-0", "vae", vae_train("ok", "--log-every", "0"), r"--log-every 0: expected", ["data:ok"]),
    ("vae-ckpt-every-0", "vae", vae_train("ok", "--ckpt-every", "0"), r"--ckpt-every 0: expected", ["data:ok"]),
    ("vae-train-out-dataset", "vae", lambda c: ["--data", c["data"]["ok"], "--out", c["data"]["dup_ids"], *VAE_TRAIN],
     r"holds files this command did not write", ["data:dup_ids"]),
    ("vae-train-out-file", "vae", lambda c: ["--data", c["data"]["ok"], "--out", c["files"]["a_file"], *VAE_TRAIN],
     r"a file; expected a folder", ["a_file"]),
    ("vae-evaluate-out-dataset", "vae", lambda c: ["evaluate", "--ckpt", c["files"]["truncated"], "--out",
                                                   c["data"]["bad_age"], "--data", c["data"]["ok"]],
     r"holds files this command did not write", ["data:bad_age"]),
    ("vae-evaluate-n-neg", "vae", lambda c: ["evaluate", "--ckpt", c["files"]["empty"], "--n", "-1"],
     r"--n -1: expected an integer >= 0", []),
    # --- vae.py: checkpoints and latents (item 9) ---
    ("vae-decode-latents-truncated", "vae", lambda c: ["decode", "--latents", c["dec"] + "/cut.safetensors",
                                                       "--decoder", c["dec"], "--out", c["tmp"] + "/png"],
     r"cut\.safetensors: not a readable safetensors", ["dec"]),
    ("vae-decode-batch-0", "vae", lambda c: ["decode", "--latents", c["dec"] + "/a.safetensors", "--out",
                                             c["tmp"] + "/png", "--batch-size", "0"], r"--batch-size 0", ["dec"]),
    ("vae-decode-out-dataset", "vae", lambda c: ["decode", "--latents", c["dec"] + "/a.safetensors", "--out",
                                                 c["data"]["bad_age"], "--device", "cpu"],
     r"holds files this command did not write", ["data:bad_age", "dec"]),
    ("vae-decode-out-file", "vae", lambda c: ["decode", "--latents", c["dec"] + "/a.safetensors", "--out",
                                              c["files"]["a_file"], "--device", "cpu"], r"a file; expected a folder",
     ["a_file", "dec"]),
    # --- flow_scm.py: data (items 6, 7), counts, outputs ---
    ("scm-dup-ids", "scm", scm_train("dup_ids"), r"id '\w+' appears more than once", ["data:dup_ids"]),
    ("scm-no-split", "scm", scm_train("no_split"), r"no column\(s\) split", ["data:no_split"]),
    ("scm-no-label", "scm", scm_train("no_label"), r"no column\(s\) Pneumonia", ["data:no_label"]),
    ("scm-meta-age-999", "scm", scm_train("bad_age"), r"age '999'; expected years in 0-120", ["data:bad_age"]),
    ("scm-batch-0", "scm", scm_train("ok", "--batch-size", "0"), r"--batch-size 0: expected a positive integer",
     ["data:ok"]),
    ("scm-max-steps-neg", "scm", scm_train("ok", "--max-steps", "-1"), r"--max-steps -1: expected", ["data:ok"]),
    ("scm-log-every-0", "scm", scm_train("ok", "--log-every", "0"), r"--log-every 0: expected", ["data:ok"]),
    ("scm-ckpt-every-0", "scm", scm_train("ok", "--ckpt-every", "0"), r"--ckpt-every 0: expected", ["data:ok"]),
    ("scm-train-out-dataset", "scm", lambda c: ["--data", c["data"]["ok"], "--out", c["data"]["dup_ids"], *SCM_TRAIN],
     r"holds files this command did not write", ["data:dup_ids"]),
    ("scm-train-out-file", "scm", lambda c: ["--data", c["data"]["ok"], "--out", c["files"]["a_file"], *SCM_TRAIN],
     r"a file; expected a folder", ["a_file"]),
    ("scm-sample-n-0", "scm", scm("sample", "--n", "0", "--out", "{tmp}/x.csv"), r"--n 0: expected a positive",
     ["tmp"]),
    ("scm-sample-n-neg", "scm", scm("sample", "--n", "-3", "--out", "{tmp}/x.csv"), r"--n -3: expected", ["tmp"]),
    ("scm-sample-steps-0", "scm", scm("sample", "--solver", "euler", "--steps", "0", "--out", "{tmp}/x.csv"),
     r"--steps 0: expected", ["tmp"]),
    ("scm-sample-out-in-dataset", "scm", lambda c: scm("sample", "--n", "2", "--out",
                                                       c["data"]["bad_age"] + "/meta.csv")(c),
     r"its folder holds info.json", ["data:bad_age", "scm"]),
    ("scm-sample-out-other-outputs", "scm", lambda c: scm("sample", "--n", "2", "--out",
                                                          other_outputs(c) + "/x.csv")(c),
     r"its folder holds output.json", ["tmp"]),
    ("scm-sample-out-folder", "scm", scm("sample", "--n", "2", "--out", "{tmp}"), r"a folder; expected a file",
     ["tmp"]),
    ("scm-intervene-age-neg", "scm", scm("intervene", "--set", "age=-5", "--n", "2", "--out", "{tmp}/x.csv"),
     r"--set: age '-5'; expected years in 0-120", ["tmp"]),
    ("scm-intervene-age-huge", "scm", scm("intervene", "--set", "age=1e9", "--n", "2", "--out", "{tmp}/x.csv"),
     r"--set: age '1e9'; expected years", ["tmp"]),
    ("scm-intervene-age-nan", "scm", scm("intervene", "--set", "age=nan", "--n", "2", "--out", "{tmp}/x.csv"),
     r"cannot set a value to missing", ["tmp"]),
    ("scm-counterfactual-age", "scm", lambda c: scm("counterfactual", "--data", c["data"]["ok"], "--set", "age=200",
                                                    "--out", c["tmp"] + "/x.csv")(c),
     r"age '200'; expected years", ["tmp", "data:ok"]),
    ("scm-plan-age", "scm", lambda c: scm("counterfactual", "--data", c["data"]["ok"], "--interventions",
                                          plan(c["tmp"] + "/p", [("e1", c["id0"], "age=-5")]), "--out",
                                          c["tmp"] + "/x.csv")(c), r"age '-5'; expected years", ["tmp"]),
    ("scm-plan-dup-ids", "scm", lambda c: scm("counterfactual", "--data", c["data"]["ok"], "--interventions",
                                              plan(c["tmp"] + "/p", [("e1", c["id0"], "sex=F")] * 2), "--out",
                                              c["tmp"] + "/x.csv")(c), r"id 'e1' appears more than once", ["tmp"]),
    ("scm-plan-traversal-id", "scm", lambda c: scm("counterfactual", "--data", c["data"]["ok"], "--interventions",
                                                   plan(c["tmp"] + "/p", [("../e1", c["id0"], "sex=F")]), "--out",
                                                   c["tmp"] + "/x.csv")(c), r"id '\.\./e1' is not usable", ["tmp"]),
    ("scm-plan-out-is-plan", "scm", lambda c: scm("counterfactual", "--data", c["data"]["ok"], "--interventions",
                                                  plan(c["tmp"] + "/p", [("e1", c["id0"], "sex=F")]), "--out",
                                                  c["tmp"] + "/p/plan.csv")(c), r"is the input", ["tmp"]),
    ("scm-counterfactual-no-split", "scm", lambda c: scm("counterfactual", "--data", c["data"]["no_split"], "--set",
                                                         "sex=F", "--out", c["tmp"] + "/x.csv")(c),
     r"no column\(s\) split|--split test: meta.csv has no split column", ["tmp", "data:no_split"]),
    ("scm-ids-file-missing", "scm", lambda c: scm("counterfactual", "--data", c["data"]["ok"], "--set", "sex=F",
                                                  "--ids", "@" + c["tmp"] + "/nope.txt", "--out",
                                                  c["tmp"] + "/x.csv")(c), r"--ids @.*cannot read", ["tmp"]),
    # --- flow_scm.py: its own checkpoint form (item 9) ---
    ("scm-ckpt-rf", "scm", lambda c: ["sample", "--ckpt", c["files"]["rf"], "--n", "2", "--out", c["tmp"] + "/x.csv"],
     r"good\.safetensors: not a flow_scm.py checkpoint", ["tmp"]),
    ("scm-ckpt-empty", "scm", lambda c: ["sample", "--ckpt", c["files"]["empty"], "--n", "2", "--out",
                                         c["tmp"] + "/x.csv"], r"empty\.safetensors: not a readable", ["tmp"]),
    ("scm-ckpt-truncated", "scm", lambda c: ["sample", "--ckpt", c["files"]["truncated"], "--n", "2", "--out",
                                             c["tmp"] + "/x.csv"], r"truncated\.safetensors: not a readable", ["tmp"]),
    ("scm-latest-bad-json", "scm", lambda c: ["sample", "--ckpt", broken_run(c, "json"), "--n", "2", "--out",
                                              c["tmp"] + "/x.csv"], r"latest.json: not readable JSON", ["tmp"]),
    ("scm-latest-no-entry", "scm", lambda c: ["sample", "--ckpt", broken_run(c, "entry"), "--n", "2", "--out",
                                              c["tmp"] + "/x.csv"], r"latest.json: name None", ["tmp"]),
    ("scm-latest-missing-ckpt", "scm", lambda c: ["sample", "--ckpt", broken_run(c, "gone"), "--n", "2", "--out",
                                                  c["tmp"] + "/x.csv"], r"latest.json: names .* does not exist",
     ["tmp"]),
    ("scm-resume-truncated-pt", "scm", lambda c: ["--data", c["data"]["ok"], "--out", broken_run(c, "pt"),
                                                  *SCM_TRAIN[:2], "--max-steps", "3", "--batch-size", "16"],
     r"ckpt-0000002\.pt: not a readable optimizer state", ["{tmp}/run/ckpt-0000002.pt",
                                                            "{tmp}/run/ckpt-0000002.safetensors"]),
    # --- downstream.py: data (items 6, 7, 10), counts, outputs, checkpoints (item 9) ---
    ("ds-dup-ids", "ds", ds_train("dup_ids"), r"id '\w+' appears more than once", ["data:dup_ids", "tmp"]),
    ("ds-no-split", "ds", ds_train("no_split"), r"no column\(s\) split", ["data:no_split", "tmp"]),
    ("ds-no-shard-column", "ds", ds_train("no_shard"), r"no column\(s\) shard", ["data:no_shard", "tmp"]),
    ("ds-index-past-end", "ds", ds_train("index_past", "all"), r"index 99999; shard 0 holds", ["tmp"]),
    ("ds-index-negative", "ds", ds_train("index_neg", "all"), r"index -1; shard 0 holds", ["tmp"]),
    ("ds-float-shard", "ds", ds_train("float_shard"), r"'images' stored as F32; expected U16", ["tmp"]),
    ("ds-wrong-key", "ds", ds_train("wrong_key"), r"no tensor 'images'", ["tmp"]),
    ("ds-fewer-shard-rows", "ds", ds_train("short_shard", "all"), r"shard 0 holds rows 0\.\.99", ["tmp"]),
    ("ds-float-masks", "ds", lambda c: ["segment", "--train", f"real={c['data']['float_masks']}:train", "--val",
                                        f"{c['data']['ok']}:val", "--test", f"t={c['data']['ok']}:test", "--out",
                                        c["tmp"] + "/out", *DS_TRAIN[2:]], r"'masks' stored as F32; expected U8",
     ["tmp", "data:float_masks"]),
    ("ds-fairness-no-sex", "ds", lambda c: ["fairness", *ds_train("ok")(c)[:4], "--test",
                                            f"t={c['data']['no_sex']}:test", "--out", c["tmp"] + "/out", *DS_TRAIN],
     r"no column\(s\) sex; fairness", ["tmp"]),
    ("ds-predictor-age", "ds", lambda c: ["predict-metadata", *ds_train("bad_age", "all")(c), "--labels", "sex,age"],
     r"age '999'; expected years in 0-120", ["tmp", "data:bad_age"]),
    ("ds-batch-0", "ds", ds_train("ok", "train", "--batch-size", "0"), r"--batch-size 0: expected a positive integer",
     ["tmp"]),
    ("ds-max-steps-0", "ds", ds_train("ok", "train", "--max-steps", "0"), r"--max-steps 0: expected", ["tmp"]),
    ("ds-eval-every-0", "ds", ds_train("ok", "train", "--eval-every", "0"), r"--eval-every 0: expected", ["tmp"]),
    ("ds-log-every-0", "ds", ds_train("ok", "train", "--log-every", "0"), r"--log-every 0: expected", ["tmp"]),
    ("ds-ckpt-every-0", "ds", ds_train("ok", "train", "--ckpt-every", "0"), r"--ckpt-every 0: expected", ["tmp"]),
    ("ds-runs-0", "ds", ds_train("ok", "train", "--runs", "0"), r"--runs 0: expected", ["tmp"]),
    ("ds-out-dataset", "ds", lambda c: ds_train("ok")(c)[:6] + ["--out", c["data"]["bad_age"], *DS_TRAIN],
     r"holds files this command did not write", ["data:bad_age"]),
    ("ds-out-file", "ds", lambda c: ds_train("ok")(c)[:6] + ["--out", c["files"]["a_file"], *DS_TRAIN],
     r"a file; expected a folder", ["a_file"]),
    ("ds-roc-plot-over-meta", "ds", lambda c: ds_train("ok")(c) + ["--roc-plot", c["data"]["bad_age"] + "/meta.csv"],
     r"--roc-plot .*: expected a .png file name outside any dataset folder", ["data:bad_age", "tmp"]),
    ("ds-init-truncated-pth", "ds", ds_train("ok", "train", "--init", "imagenet:{pth}"),
     r"truncated\.pth: not a readable state_dict", ["tmp"]),
]


def other_outputs(c):
    """A folder holding another command's outputs (its output.json)."""
    folder = c["tmp"] + "/decoded"
    os.makedirs(folder)
    with open(folder + "/output.json", "w") as f:
        json.dump({"command": "vae.py decode"}, f)
    return folder


# Cases the pieces of ea9b5b8 already refused (checkpoint_io's open_checkpoint): kept as guards, not as fixes.
GUARDS = [
    ("vae-ckpt-empty", "vae", lambda c: ["evaluate", "--ckpt", c["files"]["empty"], "--data", c["data"]["ok"],
                                         "--device", "cpu"], r"empty\.safetensors: not a readable safetensors", []),
    ("vae-ckpt-truncated", "vae", lambda c: ["encode", "--ckpt", c["files"]["truncated"], "--data", c["data"]["ok"],
                                             "--device", "cpu"], r"truncated\.safetensors: not a readable",
     ["data:ok"]),
    ("vae-ckpt-rf", "vae", lambda c: ["encode", "--ckpt", c["files"]["rf"], "--data", c["data"]["ok"], "--device",
                                      "cpu"], r"not a vae.py checkpoint .*rectified_flow/1", ["data:ok"]),
    ("ds-eval-ckpt-truncated", "ds", lambda c: ["--eval", "--ckpt", c["files"]["truncated"], "--test",
                                                f"t={c['data']['ok']}:test", "--val", f"{c['data']['ok']}:val",
                                                "--out", c["tmp"] + "/out", "--device", "cpu"],
     r"truncated\.safetensors: not a readable safetensors", ["tmp"]),
]


def broken_run(c, how):
    """A copy of the flow_scm run with latest.json broken (bad JSON, no name, naming a missing file) or its .pt cut."""
    run = c["tmp"] + "/run"
    shutil.copytree(c["scm"], run)
    latest = os.path.join(run, "latest.json")
    if how == "json":
        with open(latest, "w") as f:
            f.write("{\"step\": 2, \"na")
    elif how == "entry":
        with open(latest, "w") as f:
            json.dump({"step": 2}, f)
    elif how == "gone":
        os.remove(os.path.join(run, "ckpt-0000002.safetensors"))
    else:
        pt = os.path.join(run, "ckpt-0000002.pt")
        with open(pt, "rb") as f:
            head = f.read(300)
        with open(pt, "wb") as f:
            f.write(head)
    return run


MAINS = {"vae": vae.main, "scm": fs.main, "ds": D.main}


@pytest.mark.parametrize("case", CASES + GUARDS, ids=[c[0] for c in CASES + GUARDS])
def test_bad_input_is_refused_in_one_line(case, data, files, decoder, scm_run, tmp_path):
    _, script, build, pattern, watch = case
    c = {"data": data, "files": files, "dec": decoder, "scm": scm_run, "tmp": str(tmp_path), "a_file": files["a_file"],
         "id0": read_table(os.path.join(data["ok"], "meta.csv"))[1][0].split(",")[0]}
    argv = [a.format(tmp=c["tmp"], pth=files["pth"]) for a in build(c)]
    expect_refusal(MAINS[script], argv, pattern, watch=[ctx_path(c, w) for w in watch])


# ---------------------------------------------------------------------------------------------------------------
# Names from data stay inside their output folder (item 1)


def test_vae_encode_name_cannot_leave_the_latents_folder(data, files, tmp_path):
    ds = variant(data["ok"], str(tmp_path / "d"))
    code = confined(vae.main, ["encode", "--ckpt", files["empty"], "--data", ds, "--name", "../../escape"],
                    os.path.join(ds, "latents"), str(tmp_path))
    one_line_refusal(code, r"--name: id '\.\./\.\./escape' is not usable as a file name")


def test_downstream_row_names_cannot_leave_out(data, tmp_path):
    out = str(tmp_path / "nest" / "out")
    argv = ["--train", f"..={data['ok']}:train", "--val", f"{data['ok']}:val", "--test", f"t={data['ok']}:test",
            "--out", out, *DS_TRAIN]
    code = confined(D.main, argv, out, str(tmp_path))
    one_line_refusal(code, r"--train: id '\.\.' is not usable as a file name")


# ---------------------------------------------------------------------------------------------------------------
# Folder outputs record what decided them (items 4, 5)


def test_vae_decode_refuses_other_latents_in_its_folder(decoder, tmp_path):
    out = str(tmp_path / "png")
    assert run_main(vae.main, ["decode", "--latents", decoder + "/a.safetensors", "--out", out, "--device",
                               "cpu"])[0] == 2                     # two PNGs
    before = sorted(os.listdir(out))
    assert "output.json" in before and len(before) == 3
    assert run_main(vae.main, ["decode", "--latents", decoder + "/a.safetensors", "--out", out])[0] == 0   # resumed
    expect_refusal(vae.main, ["decode", "--latents", decoder + "/b.safetensors", "--decoder", decoder, "--out", out],
                   r"written with latents_sha256 = ", watch=[out])


def test_downstream_out_refuses_another_experiment(data, tmp_path):
    """A rerun into the same --out with other training data is refused (before: the run folders were resumed and
    the results labelled with the new data); the same command resumes."""
    out = str(tmp_path / "out")
    base = ["--val", f"{data['ok']}:val", "--test", f"t={data['ok']}:test", "--out", out, *DS_TRAIN]
    D.main(["--train", f"real={data['ok']}:train", *base])
    assert json.load(open(os.path.join(out, "output.json")))["command"] == "downstream.py classify"
    expect_refusal(D.main, ["--train", f"real={data['ok']}:all", *base], r"written with train = ", watch=[out])


# ---------------------------------------------------------------------------------------------------------------
# Housekeeping (item 11): log truncation on resume, stale temporaries, modes, a NaN stop on a fresh run


def read_steps(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


def test_flow_scm_resume_truncates_log_cleans_temporaries_keeps_modes(scm_run, data, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(scm_run, run)
    log = os.path.join(run, "log.jsonl")
    assert read_steps(log) == [1, 2]
    with open(log, "a") as f:                                    # a killed run: logged step 3, then half a line
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + "{\"step\": 4, \"lo")
    stale = os.path.join(run, ".tmp-abcckpt-0000004.safetensors")
    open(stale, "wb").write(b"x" * 1000)
    umask = os.umask(0o022)
    try:
        fs.main(["--size", "tiny", "--data", data["ok"], "--out", run, "--max-steps", "3", "--batch-size", "16",
                 "--log-every", "1", "--ckpt-every", "3", "--device", "cpu"])
    finally:
        os.umask(umask)
    assert read_steps(log) == [1, 2, 3]
    assert not os.path.exists(stale)
    for name in ("latest.json", "ckpt-0000003.safetensors", "ckpt-0000003.pt", "config.json", "log.jsonl"):
        assert os.stat(os.path.join(run, name)).st_mode & 0o777 == 0o644, name


def test_flow_scm_nan_on_a_fresh_run_says_no_checkpoint(data, tmp_path):
    """A guard: the health_check piece of ea9b5b8 already says so; flow_scm.py passes it latest.json, the file that
    makes a run folder resumable, so the message names the file that was not written."""
    run = str(tmp_path / "run")
    msg = expect_refusal(fs.main, ["--size", "tiny", "--data", data["ok"], "--out", run, "--max-steps", "3",
                                   "--batch-size", "16", "--log-every", "1", "--lr", "inf", "--device", "cpu"],
                         r"non-finite .* stopped before the first checkpoint", watch=[data["ok"]])
    assert "latest.json not written" in msg and not os.path.exists(os.path.join(run, "latest.json"))


def test_downstream_resume_truncates_log(data, tmp_path):
    out = str(tmp_path / "out")
    base = ["--train", f"real={data['ok']}:train", "--val", f"{data['ok']}:val", "--test", f"t={data['ok']}:test",
            "--out", out, *DS_TRAIN, "--log-every", "1", "--patience", "0"]
    D.main(base + ["--max-steps", "2"])
    run = os.path.join(out, "real", "run0")
    with open(os.path.join(run, "log.jsonl"), "a") as f:         # a killed run's records after its checkpoint
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + "{\"step\"")
    open(os.path.join(run, ".tmp-xckpt.safetensors"), "wb").write(b"x")
    D.main(base + ["--max-steps", "3"])
    assert read_steps(os.path.join(run, "log.jsonl")) == [1, 2, 3]
    assert not os.path.exists(os.path.join(run, ".tmp-xckpt.safetensors"))

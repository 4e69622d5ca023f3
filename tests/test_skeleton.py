"""The training skeleton's promises (DESIGN.md §3, item 6), one test per promise, parametrised over the seven
training loops: SIGTERM saves a checkpoint that resumes to the losses of the uninterrupted run; a non-finite loss
stops the run with the step named and the last good checkpoint intact; a resumed run reproduces the uninterrupted
one. Reduced tiny models on the 32 px phantom of conftest.py, one thread, a few steps each.

The reference is always an independent uninterrupted run of the same script and settings in this process (one
thread, same CPU, same order): the losses and weights are bit-identical, so they are compared exactly."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

import controlnet
import dit_text2img
import downstream
import flow_scm
import ldm_multicond
import rectified_flow
import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS3 = "Cardiomegaly,Pleural Effusion,Pneumothorax"
WORDS = ["-", ".", ",", "acute", "atelectasis", "basilar", "bilateral", "cardiomediastinal", "cardiomegaly",
         "cardiopulmonary", "consolidation", "devices", "edema", "effusion", "focal", "fracture", "in", "left", "lung",
         "mild", "moderate", "no", "nodule", "of", "opacity", "place", "pleural", "pneumonia", "pneumothorax",
         "possible", "process", "pulmonary", "rib", "right", "severe", "sided", "silhouette", "support", "the",
         "thickening", "widening"]
DIT = ["--hidden", "32", "--depth", "2", "--heads", "2", "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9",
       "--sample-every", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as in the SIGTERM subprocess (OMP_NUM_THREADS=1): the same reduction order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# One spec per training loop: its module, reduced tiny flags, where its run folder and checkpoint step are


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny random BERT (1 layer, 32 wide) and a tiny random ViT (1 layer, 24 wide) saved as transformers folders."""
    from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTModel
    d = tmp_path_factory.mktemp("enc")
    bert, vit = str(d / "bert"), str(d / "vit")
    os.makedirs(bert)
    with open(os.path.join(bert, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizerFast(vocab_file=os.path.join(bert, "vocab.txt"), do_lower_case=True).save_pretrained(bert)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=160)).save_pretrained(bert)
    ViTModel(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=24, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=48)).save_pretrained(vit)
    return bert, vit


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, phantom_dir, encoders):
    """Per script, the 32 px phantom with what it reads besides images: report embeddings (dit_text2img,
    controlnet), report and image embeddings (ldm_multicond), a 2-step dit_text2img backbone (controlnet)."""
    root = tmp_path_factory.mktemp("skeleton")
    text = str(root / "text")
    shutil.copytree(phantom_dir, text, ignore=shutil.ignore_patterns("text", "latents"))
    dit_text2img.main(["embed-text", "--data", text, "--text-encoder", encoders[0], "--name", "bert"])
    multi = str(root / "multi")
    shutil.copytree(phantom_dir, multi, ignore=shutil.ignore_patterns("text", "images", "latents"))
    ldm_multicond.main(["embed-text", "--data", multi, "--text-encoder", encoders[0], "--name", "bert",
                        "--max-length", "24"])
    ldm_multicond.main(["embed-images", "--data", multi, "--image-encoder", encoders[1], "--name", "vit"])
    backbone = str(root / "backbone")
    dit_text2img.main(["--data", text, "--out", backbone, *DIT, "--max-steps", "2", "--log-every", "2"])
    return {"pixels": phantom_dir, "text": text, "multi": multi, "backbone": backbone}


def safetensors_step(run):
    with safe_open(os.path.join(run, "ckpt.safetensors"), "pt") as f:
        return int(json.loads(f.metadata()["step"]))


def safetensors_tensors(run):
    with safe_open(os.path.join(run, "ckpt.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def flow_scm_step(run):
    with open(os.path.join(run, "latest.json")) as f:
        return json.load(f)["step"]


def flow_scm_tensors(run):
    """Weights and EMA (safetensors) and the optimizer state (.pt) of the newest checkpoint."""
    path = flow_scm.checkpoint_path(run)
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = torch.load(path[:-len(".safetensors")] + ".pt", weights_only=True)
    for i, st in state["opt"]["state"].items():
        tensors.update({f"optim.{i}.{k}": torch.as_tensor(v) for k, v in st.items()})
    return tensors


SPECS = {
    "rectified_flow": dict(
        module=rectified_flow,
        flags=lambda data: ["--data", data["pixels"], "--hidden", "64", "--depth", "2", "--heads", "2", "--batch-size", "8",
                            "--lr", "2e-3", "--ema", "0.9", "--sample-every", "0"],
        nan_flags=["--lr", "1e30"]),
    "flow_scm": dict(
        module=flow_scm,
        flags=lambda data: ["--size", "tiny", "--data", data["pixels"]],
        ckpt_step=flow_scm_step, ckpt_tensors=flow_scm_tensors,
        nan_flags=["--lr", "1e8", "--warmup", "1"]),
    "vae": dict(
        module=vae,
        flags=lambda data: ["--data", data["pixels"], "--channels", "8", "--mults", "1,2,2,2", "--head-channels", "8",
                            "--perceptual", "none", "--batch-size", "4", "--warmup", "3", "--kl-weight", "0.01",
                            "--sample-every", "0"],
        nan_flags=["--lr", "1e30"]),
    "dit_text2img": dict(
        module=dit_text2img,
        flags=lambda data: ["--data", data["text"], *DIT],
        nan_flags=["--lr", "1e30"]),
    "controlnet": dict(
        module=controlnet,
        flags=lambda data: ["--data", data["text"], "--backbone", data["backbone"], "--control-blocks", "1",
                            "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9", "--sample-every", "0"],
        nan_flags=["--lr", "1e30"]),
    "ldm_multicond": dict(
        module=ldm_multicond,
        flags=lambda data: ["--data", data["multi"], "--channels", "16", "--dim", "32", "--heads", "2",
                            "--tau-layers", "1", "--tau-heads", "2", "--tau-ff", "64", "--batch-size", "8",
                            "--max-length", "24", "--lr", "2e-3", "--ema", "0.9", "--sample-every", "0"],
        nan_flags=["--lr", "1e30"]),
    "downstream": dict(
        module=downstream,
        flags=lambda data: ["--train", f"real={data['pixels']}:train", "--labels", LABELS3, "--batch-size", "16",
                            "--schedule", "constant", "--eval-every", "1000", "--patience", "0", "--n-boot", "0",
                            "--width", "8"],
        run_dir=lambda out: os.path.join(out, "real", "run0"),
        nan_flags=["--lr", "1e30"]),
}
SCRIPTS = list(SPECS)


def flags(name, data, out, *extra):
    return [*SPECS[name]["flags"](data), "--out", out, *extra]


def run_dir(name, out):
    return SPECS[name].get("run_dir", lambda o: o)(out)


def ckpt_step(name, out):
    return SPECS[name].get("ckpt_step", safetensors_step)(run_dir(name, out))


def ckpt_tensors(name, out):
    return SPECS[name].get("ckpt_tensors", safetensors_tensors)(run_dir(name, out))


def losses(name, out):
    """(step, loss) of every log line of the run."""
    with open(os.path.join(run_dir(name, out), "log.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def train(name, data, out, *extra):
    return SPECS[name]["module"].main(flags(name, data, out, *extra))


EVERY = ["--log-every", "4", "--ckpt-every", "100000"]   # health checks at log lines and every 10 steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory, datasets):
    """reference(name, n): the folder of an uninterrupted run of n steps with EVERY, made once per (name, n)."""
    runs = {}

    def get(name, n):
        if (name, n) not in runs:
            out = str(tmp_path_factory.mktemp(f"ref_{name}_{n}") / "run")
            train(name, datasets, out, "--max-steps", str(n), *EVERY)
            runs[name, n] = out
        return runs[name, n]
    return get


def same_run(name, a, b):
    """Losses of every log line and every checkpoint tensor (model, EMA, optimizer state) bit-identical."""
    assert losses(name, a) == losses(name, b)
    ta, tb = ckpt_tensors(name, a), ckpt_tensors(name, b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


# ----------------------------------------------------------------------------------------------------------------
# The promises


@pytest.mark.parametrize("name", SCRIPTS)
def test_sigterm_saves_a_checkpoint_that_resumes_to_the_uninterrupted_run(name, datasets, reference, tmp_path):
    out = str(tmp_path / "term")
    cmd = [sys.executable, os.path.join(ROOT, f"{name}.py"), *flags(name, datasets, out, "--max-steps", "100000",
                                                                    *EVERY)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    log_path = os.path.join(run_dir(name, out), "log.jsonl")
    try:
        for _ in range(2400):                                    # wait for the first log line (or an early exit)
            if proc.poll() is not None or (os.path.exists(log_path) and losses(name, out)):
                break
            time.sleep(0.02)
        # The signal lands in step 5, 6 or 7, which have no health check: a loop that breaks on the raw flag there
        # exits without the checkpoint; the skeleton saves at the next health check (step 8) and then exits.
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "stopped by SIGTERM" in text, text[-2000:]
    assert os.path.isfile(os.path.join(run_dir(name, out), "ckpt.safetensors")) or name == "flow_scm", text[-2000:]
    step = ckpt_step(name, out)
    assert 4 < step <= 20 and (step % 4 == 0 or step % 10 == 0), (step, text[-2000:])
    train(name, datasets, out, "--max-steps", str(step + 2), *EVERY)              # resumes at `step`
    same_run(name, reference(name, step + 2), out)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(
    strict=True, reason="vae.py's checkpoint after step 2 holds inf gains (out_gain, logvar_offset): the health "
                        "check looks at the loss only")) if n == "vae" else n for n in SCRIPTS])
def test_non_finite_loss_stops_with_the_step_named_and_the_last_checkpoint_intact(name, datasets, tmp_path):
    out = str(tmp_path / "run")                # a huge learning rate: an early update overflows the weights
    with pytest.raises(SystemExit) as e:
        train(name, datasets, out, "--max-steps", "6", "--log-every", "1", "--ckpt-every", "1",
              *SPECS[name]["nan_flags"])
    message = str(e.value)
    found = re.fullmatch(r"non-finite loss( or gradient)? at step (\d+); stopped, the last checkpoint (in )?(\S+) "
                         r"is intact", message)
    assert found and "\n" not in message and found[4].startswith(run_dir(name, out)), message
    bad_step = int(found[2])
    assert 2 <= bad_step <= 6 and ckpt_step(name, out) == bad_step - 1, message
    logged = losses(name, out)                                  # every step before it logged a finite loss
    assert [s for s, _ in logged] == list(range(1, bad_step)) and all(math.isfinite(v) for _, v in logged)
    tensors = ckpt_tensors(name, out)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    assert tensors and not bad, bad[:5]


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_reproduces_the_uninterrupted_run(name, datasets, reference, tmp_path):
    b = str(tmp_path / "b")
    train(name, datasets, b, "--max-steps", "8", *EVERY)       # the final checkpoint at step 8
    train(name, datasets, b, "--max-steps", "10", *EVERY)      # resumes at step 8
    assert [s for s, _ in losses(name, b)] == [4, 8, 10]
    same_run(name, reference(name, 10), b)
    c = str(tmp_path / "c")                                     # the comparison can fail: another seed differs
    train(name, datasets, c, "--max-steps", "4", *EVERY, "--seed", "1")
    assert losses(name, c)[0] != losses(name, reference(name, 10))[0]

"""The training skeleton's promises (DESIGN.md §3, item 6), one test per promise, parametrised over the seven
training loops: SIGTERM saves a checkpoint that resumes to the losses of the uninterrupted run; a non-finite loss
stops the run with the step named and the last good checkpoint intact; a resumed run reproduces the uninterrupted
one. Reduced tiny models on the 32 px phantom of conftest.py, one thread, a few steps each.

The reference is always an independent uninterrupted run of the same script and settings in this process (one
thread, same CPU, same order): the losses and weights are bit-identical, so they are compared exactly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

import downstream
import rectified_flow
import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS3 = "Cardiomegaly,Pleural Effusion,Pneumothorax"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as in the SIGTERM subprocess (OMP_NUM_THREADS=1): the same reduction order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# One spec per training loop: its module, reduced tiny flags, where its run folder and checkpoint step are


def safetensors_step(run):
    with safe_open(os.path.join(run, "ckpt.safetensors"), "pt") as f:
        return int(json.loads(f.metadata()["step"]))


def safetensors_tensors(run):
    with safe_open(os.path.join(run, "ckpt.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


SPECS = {
    "rectified_flow": dict(
        module=rectified_flow,
        flags=lambda data: ["--data", data, "--hidden", "64", "--depth", "2", "--heads", "2", "--batch-size", "8",
                            "--lr", "2e-3", "--ema", "0.9", "--sample-every", "0"],
        nan_flags=["--lr", "1e30"]),
    "vae": dict(
        module=vae,
        flags=lambda data: ["--data", data, "--channels", "8", "--mults", "1,2,2,2", "--head-channels", "8",
                            "--perceptual", "none", "--batch-size", "4", "--warmup", "3", "--kl-weight", "0.01",
                            "--sample-every", "0"],
        nan_flags=["--lr", "1e30"]),
    "downstream": dict(
        module=downstream,
        flags=lambda data: ["--train", f"real={data}:train", "--labels", LABELS3, "--batch-size", "16",
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


@pytest.fixture(scope="module")
def data(phantom_dir):
    return phantom_dir


def same_run(name, a, b):
    """Losses of every step and every checkpoint tensor (model, EMA, optimizer state) bit-identical."""
    assert losses(name, a) == losses(name, b)
    ta, tb = ckpt_tensors(name, a), ckpt_tensors(name, b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


# ----------------------------------------------------------------------------------------------------------------
# The promises


@pytest.mark.parametrize("name", SCRIPTS)
def test_sigterm_saves_a_checkpoint_that_resumes_to_the_uninterrupted_run(name, data, tmp_path):
    out = str(tmp_path / "term")
    every = ["--log-every", "5", "--ckpt-every", "100000"]        # health checks at log lines (and every 10 steps)
    cmd = [sys.executable, os.path.join(ROOT, f"{name}.py"), *flags(name, data, out, "--max-steps", "100000", *every)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    log_path = os.path.join(run_dir(name, out), "log.jsonl")
    try:
        for _ in range(2400):                                    # wait for the first log line (or an early exit)
            if proc.poll() is not None or (os.path.exists(log_path) and losses(name, out)):
                break
            time.sleep(0.05)
        # The signal lands in step 6, 7 or 8, which have no health check: a loop that breaks on the raw flag there
        # exits without the checkpoint; the skeleton saves at the next health check (step 10) and then exits.
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "stopped by SIGTERM" in text, text[-2000:]
    assert os.path.isfile(os.path.join(run_dir(name, out), "ckpt.safetensors")), text[-2000:]
    step = ckpt_step(name, out)
    assert step % 5 == 0 and 10 <= step <= 20 and step == losses(name, out)[-1][0], (step, losses(name, out)[-1])
    train(name, data, out, "--max-steps", str(step + 2), *every)               # resumes at `step`
    ref = str(tmp_path / "ref")
    train(name, data, ref, "--max-steps", str(step + 2), *every)
    assert [s for s, _ in losses(name, out)] == list(range(5, step + 1, 5)) + [step + 2]
    same_run(name, ref, out)

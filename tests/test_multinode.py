"""Multi-node launch, on one machine: two torchrun launches of one process each, joined by a c10d rendezvous as two
nodes would be (README.md, "Several nodes"), train exactly as one process with the same global batch; and sampling
under torchrun, killed and resumed, writes each image once and the images of a one-process run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

import rectified_flow as rf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--hidden", "64", "--depth", "2", "--heads", "2", "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9"]
SMALL = MODEL + ["--max-steps", "3", "--ckpt-every", "100", "--p-drop-var", "0.3", "--log-every", "1",
                 "--sample-every", "0"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_state(out):
    with safe_open(os.path.join(out, "ckpt.safetensors"), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("model.", "ema."))}
    with open(os.path.join(out, "log.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    return weights, losses


def test_two_nodes_by_c10d_rendezvous_equal_one_process(tmp_path, phantom_dir):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    rf.main(["--data", phantom_dir, "--out", one, *SMALL, "--micro-batch", "4"])   # 2 accumulated micro-batches
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "test", os.path.join(ROOT, "rectified_flow.py"), "--data", phantom_dir,
                               "--out", two, *SMALL],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert all(p.returncode == 0 for p in nodes), "\n".join(text[-2000:] for text in logs)
    (w1, l1), (w2, l2) = run_state(one), run_state(two)
    assert len(l1) == len(l2) == 3
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5      # the same losses: one global batch, two nodes
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert not torch.equal(w1["model.out.weight"], torch.zeros_like(w1["model.out.weight"]))   # it trained


def pngs(folder):
    """{name: (inode, mtime_ns)} of the PNGs in a folder: a file rewritten in place or replaced changes either."""
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".png") and not name.startswith("."):
            st = os.stat(os.path.join(folder, name))
            found[name] = (st.st_ino, st.st_mtime_ns)
    return found


def test_sample_on_two_processes_killed_and_resumed_writes_each_image_once(tmp_path, phantom_dir):
    run, ref, two = str(tmp_path / "run"), str(tmp_path / "ref"), str(tmp_path / "two")
    rf.main(["--data", phantom_dir, "--out", run, *MODEL, "--max-steps", "2", "--sample-every", "0"])
    sampling = ["--ckpt", run, "--solver", "euler", "--steps", "8", "--seed", "3"]
    rf.main(["sample", *sampling, "--n", "200", "--batch-size", "50", "--out", ref])   # one process, uninterrupted
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "rectified_flow.py"), "sample", *sampling, "--batch-size", "4", "--num-images", "200",
           "--out", two]
    first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 240
    while len(pngs(two)) < 30 and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)                                       # kill -9 both ranks mid-run
    first.wait()
    before = pngs(two)
    assert 0 < len(before) < 200, f"the kill came too late to test a resume ({len(before)} images)"
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    after = pngs(two)
    assert sorted(after) == sorted(pngs(ref)) and len(after) == 200
    assert all(after[name] == before[name] for name in before)                 # finished images were not rewritten
    for name in after:                                                          # and all equal the one-process run
        a = np.asarray(Image.open(os.path.join(two, name)), np.int64)
        b = np.asarray(Image.open(os.path.join(ref, name)), np.int64)
        # Same noise, same weights; float32 GEMMs of other batch shapes may differ in the last bits, which 8
        # Euler steps can carry to a level or two of 65535 (16-bit PNGs): allow 4.
        assert np.abs(a - b).max() <= 4, name

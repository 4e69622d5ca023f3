"""Multi-node launch, on one machine: two torchrun launches of one process each, joined by a c10d rendezvous as two
nodes would be (README.md, "Several nodes"), train exactly as one process with the same global batch."""
import json
import os
import socket
import subprocess
import sys

import torch
from safetensors import safe_open

import rectified_flow as rf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--hidden", "64", "--depth", "2", "--heads", "2", "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9",
         "--max-steps", "3", "--ckpt-every", "100", "--p-drop-var", "0.3", "--log-every", "1", "--sample-every", "0"]


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

"""Shared pytest set-up: CPU only, few threads (CI has 2 cores), repository root importable."""
import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

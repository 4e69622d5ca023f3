"""Shared pytest set-up: CPU only, few threads (CI has 2 cores), repository root importable."""
import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("MEMORY_PLAN", "0")     # --dry-run skips the memory walk (tests/test_memory_plan.py runs it)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

import pytest  # noqa: E402


def _make_phantom(tmp_path_factory, name, n, size):
    import prep_data
    out = str(tmp_path_factory.mktemp(name) / "phantom")
    prep_data.make_phantom(out, n=n, size=size, seed=0)
    return out


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """A small phantom dataset (512 images, 32 px, with masks) in the FORMAT.md format, made once per run."""
    return _make_phantom(tmp_path_factory, "phantom32", 512, 32)


@pytest.fixture(scope="session")
def phantom64_dir(tmp_path_factory):
    """A small phantom dataset (256 images, 64 px, with masks), made once per run."""
    return _make_phantom(tmp_path_factory, "phantom64", 256, 64)


@pytest.fixture(scope="session")
def toy2_dir(tmp_path_factory):
    """The 2-class toy dataset of tests/toy_cond.py (256 images, 32 px): the condition fully determines the image."""
    import toy_cond
    out = str(tmp_path_factory.mktemp("toy2") / "toy2")
    toy_cond.make_toy2(out, n=256, size=32, seed=0)
    return out

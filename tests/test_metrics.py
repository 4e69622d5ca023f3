"""Tests of metrics.py against independent references: closed forms, scipy, float64 numpy re-implementations,
hand-computed point sets, and the published checkpoint layouts (written out here). CPU only, offline."""
import csv
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.stats
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file

import metrics as M

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["CXR_OFFLINE"] = "1"


# ---------------------------------------------------------------------------------------------------------------
# published layouts


def _conv_bn(name, cin, cout, kh, kw):
    return {f"{name}.conv.weight": (cout, cin, kh, kw), **{f"{name}.bn.{p}": (cout,) for p in
                                                            ("weight", "bias", "running_mean", "running_var")}}


def expected_inception_layout():
    """pytorch-fid pt_inception-2015-12-05-6726825d.pth: torchvision Inception3 names, 1008 classes, no AuxLogits."""
    e = {}
    for n, cin, cout, k in [("Conv2d_1a_3x3", 3, 32, 3), ("Conv2d_2a_3x3", 32, 32, 3), ("Conv2d_2b_3x3", 32, 64, 3),
                            ("Conv2d_3b_1x1", 64, 80, 1), ("Conv2d_4a_3x3", 80, 192, 3)]:
        e.update(_conv_bn(n, cin, cout, k, k))
    for n, cin, pf in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)]:
        for b, ci, co, k in [("branch1x1", cin, 64, 1), ("branch5x5_1", cin, 48, 1), ("branch5x5_2", 48, 64, 5),
                             ("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3),
                             ("branch3x3dbl_3", 96, 96, 3), ("branch_pool", cin, pf, 1)]:
            e.update(_conv_bn(f"{n}.{b}", ci, co, k, k))
    for b, ci, co, k in [("branch3x3", 288, 384, 3), ("branch3x3dbl_1", 288, 64, 1), ("branch3x3dbl_2", 64, 96, 3),
                         ("branch3x3dbl_3", 96, 96, 3)]:
        e.update(_conv_bn(f"Mixed_6a.{b}", ci, co, k, k))
    for n, c7 in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
        for b, ci, co, kh, kw in [("branch1x1", 768, 192, 1, 1), ("branch7x7_1", 768, c7, 1, 1),
                                  ("branch7x7_2", c7, c7, 1, 7), ("branch7x7_3", c7, 192, 7, 1),
                                  ("branch7x7dbl_1", 768, c7, 1, 1), ("branch7x7dbl_2", c7, c7, 7, 1),
                                  ("branch7x7dbl_3", c7, c7, 1, 7), ("branch7x7dbl_4", c7, c7, 7, 1),
                                  ("branch7x7dbl_5", c7, 192, 1, 7), ("branch_pool", 768, 192, 1, 1)]:
            e.update(_conv_bn(f"{n}.{b}", ci, co, kh, kw))
    for b, ci, co, kh, kw in [("branch3x3_1", 768, 192, 1, 1), ("branch3x3_2", 192, 320, 3, 3),
                              ("branch7x7x3_1", 768, 192, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7),
                              ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)]:
        e.update(_conv_bn(f"Mixed_7a.{b}", ci, co, kh, kw))
    for n, cin in [("Mixed_7b", 1280), ("Mixed_7c", 2048)]:
        for b, ci, co, kh, kw in [("branch1x1", cin, 320, 1, 1), ("branch3x3_1", cin, 384, 1, 1),
                                  ("branch3x3_2a", 384, 384, 1, 3), ("branch3x3_2b", 384, 384, 3, 1),
                                  ("branch3x3dbl_1", cin, 448, 1, 1), ("branch3x3dbl_2", 448, 384, 3, 3),
                                  ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1),
                                  ("branch_pool", cin, 192, 1, 1)]:
            e.update(_conv_bn(f"{n}.{b}", ci, co, kh, kw))
    e["fc.weight"], e["fc.bias"] = (1008, 2048), (1008,)
    return e


def expected_xrv_layout():
    """torchxrayvision densenet121-res224-all: features.* of DenseNet-121 with 1 input channel, 18 classes."""
    bn = lambda n, c: {f"{n}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")}  # noqa: E731
    e = {"features.conv0.weight": (64, 1, 7, 7), **bn("features.norm0", 64)}
    c = 64
    for i, n in enumerate((6, 12, 24, 16)):
        for j in range(n):
            p, cin = f"features.denseblock{i + 1}.denselayer{j + 1}", c + 32 * j
            e.update({**bn(p + ".norm1", cin), p + ".conv1.weight": (128, cin, 1, 1), **bn(p + ".norm2", 128),
                      p + ".conv2.weight": (32, 128, 3, 3)})
        c += 32 * n
        if i < 3:
            e.update({**bn(f"features.transition{i + 1}.norm", c),
                      f"features.transition{i + 1}.conv.weight": (c // 2, c, 1, 1)})
            c //= 2
    e.update({**bn("features.norm5", 1024), "classifier.weight": (18, 1024), "classifier.bias": (18,)})
    return e


def _layout(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_inception_layout_and_forward():
    net = M.FIDInceptionV3()
    assert _layout(net) == expected_inception_layout()
    # torchvision inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696) and fc 1000 -> 1008 classes
    assert sum(p.numel() for p in net.parameters()) == 27161264 - 3326696 + 8 * 2049
    ex = M.get_extractor("inception", allow_random_weights=True, offline=True)
    f = ex(torch.rand(2, 1, 80, 80))  # resized to 299 inside
    assert f.shape == (2, 2048) and ex.random_weights and torch.isfinite(f).all() and f.std() > 0


def test_xrv_layout_forward_and_convert(tmp_path):
    net = M.XRVDenseNet()
    assert _layout(net) == expected_xrv_layout()
    assert sum(p.numel() for p in net.parameters()) == 7978856 - 6272 - 1025000 + 18450  # torchvision d121: 7,978,856
    net.eval()
    with torch.no_grad():
        x = torch.rand(2, 1, 64, 64) * 2048 - 1024
        assert net.embed(x).shape == (2, 1024) and net(x).shape == (2, 18)
    # torchxrayvision pickles the whole module object: weights_only=True refuses it; convert-xrv reads the tensors
    pt = str(tmp_path / "xrv.pt")
    torch.save(net, pt)
    with pytest.raises(Exception):
        torch.load(pt, weights_only=True)
    dst = M.main(["convert-xrv", pt, "--dst", str(tmp_path / M.XRV_SAFE)])
    net2 = M.load_into(M.XRVDenseNet(), M.load_state(dst), dst)
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(a, b), k
    ex = M.get_extractor("xrv", weights_dir=str(tmp_path), offline=True)  # the converted file is found by name
    assert not ex.random_weights and ex.weights == dst
    torch.testing.assert_close(ex(torch.rand(1, 1, 64, 64)).shape, torch.Size([1, 1024]))


def test_resnet_reid_layout():
    net = M.SiameseReID()
    # torchvision resnet50: 25,557,032 parameters; fc 1000 -> 128 outputs, plus fc_end (128 -> 1)
    assert sum(p.numel() for p in net.parameters()) == 25557032 - 2049000 + 2048 * 128 + 128 + 129
    assert tuple(net.state_dict()["model.layer3.0.downsample.0.weight"].shape) == (1024, 512, 1, 1)
    with torch.no_grad():
        s = net(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64))
    assert s.shape == (2,) and ((s > 0) & (s < 1)).all()


def test_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(M.WeightsMissing, match="pt_inception-2015-12-05-6726825d.pth.*--weights-dir"):
        M.get_extractor("inception", offline=True)
    with pytest.raises(M.WeightsMissing, match="densenet121.*--weights-dir"):
        M.get_extractor("xrv", offline=True)
    with pytest.raises(M.WeightsMissing, match="microsoft/rad-dino.*--weights-dir"):
        M.get_extractor("raddino", offline=True)


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance, KID, PRDC


def _fid_scipy(x, y):
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean)


def test_frechet_closed_form():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))  # common rotation: the covariances commute
    a, b = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
    m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
    want = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = M.frechet_distance_from_stats(m1, q @ np.diag(a) @ q.T, m2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-10)
    assert M.frechet_distance_from_stats([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(4 + 1)  # 1-D: (2-1)^2


def test_frechet_vs_scipy_sqrtm_and_identity():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 16)) @ rng.standard_normal((16, 16))
    y = rng.standard_normal((150, 16)) * 1.3 + 0.2
    assert M.frechet_distance(x, y) == pytest.approx(_fid_scipy(x, y), rel=1e-6)
    assert abs(M.frechet_distance(x, x)) < 1e-8 * np.trace(np.cov(x, rowvar=False))
    # N < D: singular covariances, the warning is raised and scipy still agrees
    x, y = rng.standard_normal((20, 32)), rng.standard_normal((25, 32)) + 0.1
    with pytest.warns(UserWarning, match="N=20 < feature dim 32"):
        got = M.frechet_distance(x, y)
    assert got == pytest.approx(_fid_scipy(x, y), rel=1e-6)


@pytest.mark.parametrize("n_x, n_y", [(40, 60), (40, 400)])   # both sets N <= D, and only one
def test_frechet_exact_when_a_set_has_fewer_rows_than_dimensions(n_x, n_y):
    """Closed forms at N <= D, where the covariances are singular: y = c x gives S_y = c^2 S_x, so
    tr sqrt(S_x S_y) = c tr S_x and FD = (1 - c)^2 (|mu_x|^2 + tr S_x); and an independent y checked against
    the nuclear norm of A B^T / sqrt((n_x - 1)(n_y - 1)) in float64. The symmetric-square-root path was 2e-7 to
    7e-6 off here (round-off eigenvalues of the singular covariance, each ~ sqrt(eps))."""
    rng = np.random.default_rng(7)
    d, c = 200, 0.7
    x = rng.standard_normal((n_x, d)) * rng.uniform(0.1, 2.0, d) + rng.standard_normal(d)
    a = x - x.mean(0)
    want = (1 - c) ** 2 * ((x.mean(0) ** 2).sum() + (a * a).sum() / (n_x - 1))
    with pytest.warns(UserWarning, match="rank-deficient"):
        assert M.frechet_distance(x, c * x) == pytest.approx(want, rel=1e-11)
        assert M.frechet_distance(x.astype(np.float32), (c * x).astype(np.float32)) == pytest.approx(want, rel=1e-6)
        y = rng.standard_normal((n_y, d)) * 1.5 + 0.3
        got = M.frechet_distance(x, y)
    b = y - y.mean(0)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n_x - 1) * (n_y - 1))
    want = ((x.mean(0) - y.mean(0)) ** 2).sum() + (a * a).sum() / (n_x - 1) + (b * b).sum() / (n_y - 1) - 2 * nuclear
    assert got == pytest.approx(want, rel=1e-11)
    assert got == pytest.approx(M.frechet_distance(y, x), rel=1e-12)   # symmetric


def _kid_numpy(x, y):
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    kxy = k(x, y)
    return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_unbiased_and_reference():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((60, 8)), rng.standard_normal((60, 8)) + 0.3
    mean, std = M.kid(x, y, subsets=3, subset_size=1000)  # subset = whole set: every draw is a permutation
    assert mean == pytest.approx(_kid_numpy(x, y), rel=1e-10) and std < 1e-12
    vals = [M.kid(rng.standard_normal((100, 8)), rng.standard_normal((100, 8)), subsets=5, subset_size=50,
                  seed=s)[0] for s in range(40)]
    assert abs(np.mean(vals)) < 3 * np.std(vals) / math.sqrt(len(vals))  # unbiased: expectation 0
    assert np.mean(vals) + 6 * np.std(vals) / math.sqrt(40) < _kid_numpy(x, y)  # a real shift is far above
    assert M.kid(x, y, seed=5) == M.kid(x, y, seed=5)


def _kid_torch_fidelity_loop(x, y, subsets, m, seed=2020):
    """torch-fidelity's KID loop re-implemented (RandomState(seed); per subset choice(n1) then choice(n2), without
    replacement; unbiased MMD^2 of the three kernel matrices), in float64."""
    rng, vals = np.random.RandomState(seed), []
    for _ in range(subsets):
        a, b = x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
        vals.append(_kid_numpy(a, b))
    return np.mean(vals), np.std(vals)


def test_kid_torch_fidelity_sampler_one_gram_and_per_subset():
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((300, 16)), rng.standard_normal((260, 16)) * 1.1 + 0.1
    for subsets in (2, 12):  # 2 subsets: one Gram per subset; 12: one Gram over the union of their rows
        want = _kid_torch_fidelity_loop(x, y, subsets, 100)
        for mem in (256, 0.01):  # one chunk, chunks of a few rows
            got = M.kid(x, y, subsets, 100, sampler="torch-fidelity", mem_mb=mem)
            assert got == pytest.approx(want, rel=1e-9), (subsets, mem)
    assert M.kid(x, y, 12, 100) != pytest.approx(want, rel=1e-3)  # the default sampler draws other subsets
    ix, iy = M.kid_subsets(300, 260, 100, 1, sampler="torch-fidelity")[0]
    rs = np.random.RandomState(2020)
    assert (ix == rs.choice(300, 100, replace=False)).all() and (iy == rs.choice(260, 100, replace=False)).all()
    with pytest.raises(ValueError, match="KID sampler 'tf'"):
        M.kid(x, y, sampler="tf")


def _prdc_numpy(r, f, k):
    d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))  # noqa: E731
    rr, ff = d(r, r), d(f, f)
    rf = d(r, f)
    np.fill_diagonal(rr, np.inf), np.fill_diagonal(ff, np.inf)
    r_r, r_f = np.sort(rr, 1)[:, k - 1], np.sort(ff, 1)[:, k - 1]
    return {"precision": (rf < r_r[:, None]).any(0).mean(), "recall": (rf < r_f[None]).any(1).mean(),
            "density": (rf < r_r[:, None]).sum(0).mean() / k, "coverage": (rf.min(1) < r_r).mean()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prdc_hand_computed_with_ties_and_duplicates(dtype):
    pad = lambda v: np.stack([np.asarray(v, dtype), np.zeros(len(v), dtype)], 1)  # noqa: E731
    # k=1. radii real 0,1,2,10 -> 1,1,1,8; fake 0.5,1,9,20 -> .5,.5,8,11; real 2 / fake 1 tie at 1 (strict <)
    got = M.prdc(pad([0, 1, 2, 10]), pad([0.5, 1, 9, 20]), k=1)
    assert got == pytest.approx({"precision": 0.75, "recall": 0.75, "density": 1.0, "coverage": 0.75})
    # duplicated real point: its radius is 0, so the fake copy at 0 lies in no ball (0 < 0 is false)
    got = M.prdc(pad([0, 0, 3, 3.5]), pad([0, 3.25]), k=1)
    assert got == pytest.approx({"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5})


def test_prdc_matches_numpy_and_chunking():
    rng = np.random.default_rng(3)
    r, f = rng.standard_normal((300, 8)), rng.standard_normal((250, 8)) * 1.2 + 0.1
    want = _prdc_numpy(r, f, 5)
    assert M.prdc(r, f, k=5) == pytest.approx(want, abs=1e-12)
    assert M.prdc(r, f, k=5, mem_mb=0.01) == pytest.approx(want, abs=1e-12)  # one-row chunks
    with pytest.raises(ValueError, match="at least 6"):
        M.prdc(r[:5], f, k=5)


def test_prdc_float32_equals_full_matrix_baseline():
    """float32 features (as extractors give them), GEMM in float32, chunked several ways: the same four numbers as
    the bench's baseline (float64 full matrices, np.partition), k = 3 and 5, duplicates included."""
    rng = np.random.default_rng(9)
    mix = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    r = np.maximum(rng.standard_normal((400, 64)).astype(np.float32) @ mix, 0)
    f = np.maximum((rng.standard_normal((350, 64)).astype(np.float32) * 1.1 + 0.05) @ mix, 0)
    f[:20] = r[:20]  # exact copies: distance 0 to a real point
    for k in (3, 5):
        want = M._prdc_full_matrix(r, f, k)
        for mem in (256, 0.3, 0.02):  # one chunk, chunks of ~100 rows, of ~6 rows
            assert M.prdc(r, f, k=k, mem_mb=mem) == want, (k, mem)


def _prdc_counts_int64(r, f, k):
    """Brute-force PRDC in exact integer arithmetic: int64 squared distances, strict '<', the four counts."""
    r, f = np.asarray(r, np.int64), np.asarray(f, np.int64)
    d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)  # noqa: E731
    rr, ff = d(r, r), d(f, f)
    rf = d(r, f)
    np.fill_diagonal(rr, np.iinfo(np.int64).max), np.fill_diagonal(ff, np.iinfo(np.int64).max)
    r_r, r_f = np.sort(rr, 1)[:, k - 1], np.sort(ff, 1)[:, k - 1]
    inside = rf < r_r[:, None]
    return int(inside.any(0).sum()), int((rf < r_f[None]).any(1).sum()), int(inside.sum()), int(inside.any(1).sum())


@pytest.mark.parametrize("levels,dim", [(3, 8), (16, 24)])
def test_prdc_exact_on_integer_features_with_ties(levels, dim):
    """Quantised features (few levels: many exact ties d = r) and duplicated images: the four numbers are the
    exact integer counts, whatever the chunking, for int64 input and for the same values as float32."""
    rng = np.random.default_rng(levels)
    r, f = rng.integers(0, levels, (260, dim)), rng.integers(0, levels, (230, dim))
    f[:25], r[40:50] = r[:25], r[50:60]  # copies across the sets and duplicates within the real set
    for k in (1, 5):
        c = dict(zip(("precision", "recall", "density", "coverage"), _prdc_counts_int64(r, f, k)))
        want = {"precision": c["precision"] / len(f), "recall": c["recall"] / len(r),
                "density": c["density"] / (k * len(f)), "coverage": c["coverage"] / len(r)}
        for x, y, mem in ((r, f, 256), (r, f, 0.03), (r.astype(np.float32), f.astype(np.float32), 0.1)):
            assert M.prdc(x, y, k=k, mem_mb=mem) == want, (k, mem, x.dtype)  # ratios of the same integers


# ---------------------------------------------------------------------------------------------------------------
# SSIM, MS-SSIM, PSNR


def _ssim_ref(x, y, L=1.0):
    """float64 SSIM with scipy: separable Gaussian (11, 1.5), 'valid' region, K1=.01, K2=.03."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()

    def filt(a):
        a = scipy.ndimage.correlate1d(scipy.ndimage.correlate1d(a, g, axis=0), g, axis=1)
        return a[5:-5, 5:-5]
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    mx, my = filt(x), filt(y)
    vx, vy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2
    cxy = filt(x * y) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    return ((2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs).mean(), cs.mean()


def _ms_ssim_ref(x, y):
    w = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    out = 1.0
    for i in range(5):
        s, cs = _ssim_ref(x, y)
        out *= (cs if i < 4 else s) ** w[i]
        x = x.reshape(x.shape[0] // 2, 2, -1, 2).mean((1, 3))
        y = y.reshape(y.shape[0] // 2, 2, -1, 2).mean((1, 3))
    return out


def test_ssim_msssim_psnr_hand_checked():
    rng = np.random.default_rng(4)
    x = rng.random((192, 192))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    assert float(M.ssim(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(_ssim_ref(x, y)[0], rel=1e-9)
    assert float(M.ms_ssim(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(_ms_ssim_ref(x, y), rel=1e-9)
    t = torch.from_numpy(x)
    assert float(M.ssim(t, t)) == pytest.approx(1.0, abs=1e-12) and float(M.ms_ssim(t, t)) == pytest.approx(1.0)
    assert math.isinf(float(M.psnr(t, t)))
    a, b = (torch.full((1, 1, 176, 176), v, dtype=torch.float64) for v in (0.2, 0.5))
    lum = (2 * 0.2 * 0.5 + 1e-4) / (0.2 ** 2 + 0.5 ** 2 + 1e-4)  # constant images: contrast-structure term is 1
    assert float(M.ssim(a, b)) == pytest.approx(lum, rel=1e-12)
    assert float(M.ms_ssim(a, b)) == pytest.approx(lum ** 0.1333, rel=1e-12)  # only the coarsest scale's l counts
    assert float(M.psnr(torch.zeros(8, 8), torch.full((8, 8), 0.1))) == pytest.approx(20.0)
    assert float(M.psnr(torch.zeros(8, 8), torch.full((8, 8), 6553.5), data_range=65535.0)) == pytest.approx(20.0)
    assert M.ms_ssim_scales(161) == 5 and M.ms_ssim_scales(160) == 4 and M.ms_ssim_scales(64) == 3
    small = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    assert M.ms_ssim(small, small).shape == (2,)


def _ms_ssim_pytorch_msssim(x, y):
    """pytorch-msssim 1.0's ms_ssim re-implemented in float64: between scales, avg_pool2d(kernel 2, padding = side
    % 2), i.e. an odd side gets one zero on both ends and the zeros count in the 2x2 mean."""
    w, vals = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333], []
    for i in range(5):
        s, cs = _ssim_ref(x, y)
        vals.append(max(cs if i < 4 else s, 0.0))
        pads = [(a % 2, a % 2) for a in x.shape]
        x, y = (np.pad(a, pads) for a in (x, y))
        x, y = (a[:a.shape[0] // 2 * 2, :a.shape[1] // 2 * 2].reshape(a.shape[0] // 2, 2, -1, 2).mean((1, 3))
                for a in (x, y))
    return float(np.prod(np.array(vals) ** np.array(w)))


def test_ms_ssim_odd_sizes_follow_pytorch_msssim_padding():
    rng = np.random.default_rng(13)
    for h, w in ((171, 171), (175, 193)):  # odd at several scales: 171 -> 86 -> 43 -> 22 -> 11
        x = rng.random((h, w))
        y = np.clip(x + 0.15 * rng.standard_normal(x.shape), 0, 1)
        want = _ms_ssim_pytorch_msssim(x, y)
        assert float(M.ms_ssim(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# resize conventions of the peer tools, re-implemented in float64


def _bilinear_ref(img, size, half_pixel):
    """Separable linear interpolation in float64: pixel-centre mapping (i + 0.5) s - 0.5 clamped at 0 (PyTorch,
    align_corners=False) or TF1's i * s; upper neighbour clamped to the last pixel."""
    def along(a, n_out):
        n, s = a.shape[0], a.shape[0] / n_out
        src = (np.arange(n_out) + 0.5) * s - 0.5 if half_pixel else np.arange(n_out) * s
        src = np.maximum(src, 0)
        lo = np.floor(src).astype(int)
        f = (src - lo)[:, None]
        return a[lo] * (1 - f) + a[np.minimum(lo + 1, n - 1)] * f
    return along(along(img.astype(np.float64), size).T, size).T


def _pil_bicubic_ref(img, size):
    """PIL's antialiased bicubic resize (a = -0.5; support 2 x max(scale, 1); weights normalised per output pixel;
    horizontal then vertical pass), float64."""
    def cubic(t):
        t = np.abs(t)
        return np.where(t < 1, (1.5 * t - 2.5) * t * t + 1, np.where(t < 2, ((-0.5 * t + 2.5) * t - 4) * t + 2, 0))

    def along(a, n_out):
        n = a.shape[0]
        scale = n / n_out
        fs = max(scale, 1.0)
        out = np.empty((n_out,) + a.shape[1:])
        for i in range(n_out):
            c = (i + 0.5) * scale
            lo, hi = max(int(c - 2 * fs + 0.5), 0), min(int(c + 2 * fs + 0.5), n)
            wts = cubic((np.arange(lo, hi) - c + 0.5) / fs)
            out[i] = (wts / wts.sum()) @ a[lo:hi]
        return out
    return along(along(img.astype(np.float64).T, size).T, size)


def test_resize_conventions_match_float64_references_torch_and_pil():
    rng = np.random.default_rng(14)
    img = rng.random((37, 52)).astype(np.float32)  # non-square: the peers squash, they do not crop
    for size in (23, 80):  # down and up
        t = torch.from_numpy(img.astype(np.float64))[None, None]
        torch_ref = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(_bilinear_ref(img, size, True), torch_ref, atol=1e-12)  # the reference itself
        np.testing.assert_allclose(M.resize_as(img, size, "pytorch-fid"), torch_ref, atol=1e-5)  # float32
        np.testing.assert_allclose(M.resize_as(img, size, "tf1"), _bilinear_ref(img, size, False), atol=1e-5)
        pil = np.asarray(Image.fromarray(img * 255, mode="F").resize((size, size), Image.BICUBIC), np.float64)
        np.testing.assert_allclose(_pil_bicubic_ref(img * 255, size), pil, atol=2e-3)  # the reference vs PIL
        np.testing.assert_allclose(M.resize_as(img, size, "clean"), np.clip(_pil_bicubic_ref(img, size), 0, 1),
                                   atol=1e-5)
    even = rng.random((64, 64)).astype(np.float32)
    np.testing.assert_allclose(M.resize_as(even, 32, "tf1"), even[::2, ::2], atol=1.2e-7)  # TF1: no half-pixel
    # offset, so exactly 1/2 samples every other pixel (up to one rounding of x 255 and back)
    np.testing.assert_allclose(M.resize_as(even, 32, "pytorch-fid"), even.reshape(32, 2, 32, 2).mean((1, 3)),
                               atol=1e-6)  # half-pixel bilinear at exactly 1/2: the 2x2 mean
    with pytest.raises(ValueError, match="resize mode 'lanczos'"):
        M.resize_as(img, 8, "lanczos")


class _Capture(torch.nn.Module):
    def forward(self, x):
        self.x = x
        return x.mean((2, 3))

    def embed(self, x):
        return self.forward(x)


def test_extractor_conventions_squash_normalise_and_xrv_crop():
    img = np.random.default_rng(15).random((40, 61)).astype(np.float32)
    for mode, lo in (("antialias", -1.0), ("pytorch-fid", -1.0), ("clean", -1.0), ("tf1", -1.0)):
        ex = M.Extractor("inception", _Capture(), 299, 3, "p", "w", False, torch.device("cpu"), resize=mode)
        prepared = ex.prepare(img)
        want = M.resize(img[:, 10:50], 299) if mode == "antialias" else M.resize_as(img, 299, mode)  # crop vs squash
        np.testing.assert_allclose(prepared, want, atol=1e-6)
        ex([np.zeros((299, 299), np.float32)])
        assert float(ex.net.x.min()) == (lo if mode in ("antialias", "pytorch-fid") else -1.0)
        ex([np.ones((299, 299), np.float32)])  # 2x - 1 gives 1; (255 - 128) / 128 = 0.9921875 (TF graph)
        assert float(ex.net.x.max()) == pytest.approx(1.0 if mode in ("antialias", "pytorch-fid") else 127 / 128)
    # XRayCenterCrop starts at w // 2 - s // 2: one column later than (w - s) // 2 for w = 10, s = 7
    a = np.arange(70, dtype=np.float32).reshape(7, 10)
    np.testing.assert_array_equal(M.square(a, "crop", "xrv"), a[:, 2:9])
    np.testing.assert_array_equal(M.square(a, "crop"), a[:, 1:8])
    ex = M.Extractor("xrv", _Capture(), 224, 1, "p", "w", False, torch.device("cpu"), resize="model")
    np.testing.assert_allclose(ex.prepare(a / 70), M.resize(a[:, 2:9] / 70, 224), atol=1e-6)


def _xrv_resizer_ref(img, size):
    """xrv's documented XRayCenterCrop + XRayResizer re-implemented in float64 on xrv-normalised values: per
    downsampled axis a zero-padded Gaussian of sigma (factor - 1) / 2 truncated at 4 sigma, then linear
    interpolation at (i + 0.5) f - 0.5 with zeros outside the image, clipped to the input's range."""
    h, w = img.shape
    s = min(h, w)
    v = img[h // 2 - s // 2:h // 2 - s // 2 + s, w // 2 - s // 2:w // 2 - s // 2 + s].astype(np.float64) * 2048 - 1024

    def along(a):
        n, f = a.shape[0], a.shape[0] / size
        if f > 1:
            sigma = (f - 1) / 2
            r = int(4 * sigma + 0.5)
            g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
            pad = np.concatenate([np.zeros((r,) + a.shape[1:]), a, np.zeros((r,) + a.shape[1:])])
            a = sum(g[j] / g.sum() * pad[j:j + n] for j in range(2 * r + 1))
        src = (np.arange(size) + 0.5) * f - 0.5
        lo = np.floor(src).astype(int)
        t = (src - lo)[:, None]
        get = lambda i: np.where(((i >= 0) & (i < n))[:, None], a[np.clip(i, 0, n - 1)], 0.0)  # noqa: E731
        return get(lo) * (1 - t) + get(lo + 1) * t
    out = np.clip(along(along(v).T).T, v.min(), v.max())
    return (out + 1024) / 2048


def test_xrv_documented_resizer_against_float64_reimplementation():
    rng = np.random.default_rng(16)
    for shape, size in (((90, 120), 32), ((12, 13), 30)):  # down (sigma 1.3) and up (zero outside, no filter)
        img = (0.6 + 0.3 * rng.random(shape)).astype(np.float32)  # range excludes xrv's 0: the clip matters
        h, w = shape
        s = min(h, w)
        cropped = M.square(img, "crop", "xrv")
        assert cropped.shape == (s, s)
        got = M.xrv_skimage_resize(cropped, size)
        np.testing.assert_allclose(got, _xrv_resizer_ref(img, size), atol=1e-6)
        ex = M.Extractor("xrv", _Capture(), size, 1, "p", "w", False, torch.device("cpu"), resize="skimage")
        np.testing.assert_allclose(ex.prepare(img), got, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# data, privacy, per-condition, CLI


def _write_dataset(root, imgs, rows):
    """A FORMAT.md §1 dataset: meta.csv + shards/00000.safetensors (uint16 [N,1,S,S])."""
    os.makedirs(os.path.join(root, "shards"), exist_ok=True)
    save_file({"images": imgs}, os.path.join(root, "shards", "00000.safetensors"))
    cols = ["id", "patient_id", "study_id", "split", "dataset", "view", "sex", "age", "race"] + M.LABELS + [
        "report", "findings", "shard", "index", "source_path"]
    with open(os.path.join(root, "meta.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({c: "" for c in cols} | {"shard": 0, "index": i} | r)


def _labels(pos):
    return {lab: ("1" if lab in pos else "0") for lab in M.LABELS}


def test_condition_groups():
    meta = [_labels(["Edema"]), _labels(["No Finding"]), _labels(["Edema", "Fracture"]), {}, _labels([])]
    g = M.condition_groups(meta)
    assert g["Edema"] == [0, 2] and g["Fracture"] == [2] and g["No Finding"] == [1] and g["Finding"] == [0, 2]
    assert g["Pneumonia"] == [] and M.condition_groups([{"id": "x"}]) is None


def test_loading_formats_and_bad_input(tmp_path):
    d = tmp_path / "imgs"
    (d / "Sub").mkdir(parents=True)
    a16 = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)
    Image.fromarray(a16).save(d / "Sub" / "b.PNG")
    Image.fromarray((a16 >> 8).astype(np.uint8)).convert("RGB").save(d / "a.JpG", quality=100)
    (d / "c.png").write_bytes(b"not an image")
    s = M.ImageSet(str(d))
    assert s.ids == ["Sub/b", "a", "c"]  # recursive, sorted, case-insensitive extensions
    assert np.allclose(s.load(0), a16 / 65535.0, atol=1e-7)  # 16-bit precision kept
    assert np.abs(s.load(1) - (a16 >> 8) / 255.0).max() < 0.05 and s.load(2) is None
    sq = M.prepare(s.load(0), 20)
    assert sq.shape == (20, 20)
    assert np.allclose(M.square(s.load(0))[:, 0], s.load(0)[:, 10])  # centre crop keeps the aspect ratio
    assert M.prepare(s.load(0), 0, compat=True).shape == (299, 299)
    with pytest.raises(SystemExit, match="unreadable image .*c.png"):
        list(M.iter_images(s, [0, 1, 2], 16, strict=True))
    batches = list(M.iter_images(s, [0, 1, 2], 16))
    assert [k for k, _ in batches] == [[0, 1]] and s.skipped == {2}
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images in .*empty"):
        M.ImageSet(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    (bad / "shards").mkdir(parents=True)
    (bad / "meta.csv").write_text("id,split\nx,test\n")
    with pytest.raises(SystemExit, match=r"meta.csv: no column\(s\) shard, index"):  # read_meta's message
        M.ImageSet(str(bad))


def test_dataset_split_rows(tmp_path):
    imgs = np.arange(6 * 16 * 16, dtype=np.uint16).reshape(6, 1, 16, 16) * 11
    _write_dataset(str(tmp_path), imgs, [{"id": f"i{i}", "split": "test" if i % 2 else "train"} for i in range(6)])
    s = M.ImageSet(str(tmp_path), split="test")
    assert s.ids == ["i1", "i3", "i5"]
    assert np.allclose(s.load(2), imgs[5, 0] / 65535.0, rtol=0, atol=1e-7)


def test_nearest_neighbours_and_planted_duplicate(tmp_path):
    rng = np.random.default_rng(5)
    q, bank = rng.random((7, 30)), rng.random((50, 30))
    d, j = M.nearest_neighbours(q, [bank[:13], bank[13:40], bank[40:]])
    full = np.sqrt(((q[:, None] - bank[None]) ** 2).sum(-1))
    assert np.array_equal(j, full.argmin(1)) and np.allclose(d, full.min(1), rtol=1e-12)
    train, fake = tmp_path / "train", tmp_path / "fake"
    train.mkdir(), fake.mkdir()
    imgs = (rng.random((30, 40, 48)) * 65535).astype(np.uint16)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(train / f"t{i:02d}.png")
    for i in range(5):
        Image.fromarray((rng.random((40, 48)) * 65535).astype(np.uint16)).save(fake / f"f{i}.png")
    near = np.clip(imgs[17].astype(np.int64) + rng.integers(-300, 300, imgs[17].shape), 0, 65535).astype(np.uint16)
    Image.fromarray(near).save(fake / "f9_copy.png")
    cfg = M.Config(privacy_size=32, grid=str(tmp_path / "grid.png"), grid_pairs=3, workers=1)
    res = M.privacy(M.ImageSet(str(fake)), M.ImageSet(str(train)), cfg)["pixel"]
    assert res["closest"][0]["fake"] == "f9_copy" and res["closest"][0]["train"] == "t17"
    assert res["count_under_threshold"] == 1 and res["rms_min"] < 0.005 < 0.1 < res["closest"][1]["rms"]
    assert Image.open(tmp_path / "grid.png").size == (68, 96)
    blocks = M.privacy(M.ImageSet(str(fake)), M.ImageSet(str(train)), dataclasses.replace(cfg, privacy_block=2))
    assert blocks["pixel"] == res  # synthetic images searched 2 at a time (3 passes over the training set): the same


def _tiny_hf(root):
    """A tiny Dinov2 saved locally (random weights) with its image processor: a fast offline feature space."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, image_size=32)).save_pretrained(root)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


def test_extractor_features_own_their_memory(tmp_path):
    """A transformers feature is pooler_output, a view of the [B, tokens, D] hidden state: stored as it was, every
    batch's hidden states stayed alive and memory grew with N (issue 21 item 5). Each batch's features must own
    exactly their own bytes."""
    ex = M.get_extractor(_tiny_hf(str(tmp_path / "hf")), device="cpu")
    f = ex(torch.rand(3, 1, 32, 32))
    assert f.shape == (3, 32) and f.untyped_storage().nbytes() == f.numel() * f.element_size()


def test_hf_extractor_clip_and_cache(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    clip = str(tmp_path / "clip")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    ex = M.get_extractor(clip)
    assert ex(torch.rand(3, 1, 40, 50)).shape == (3, 32)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        Image.fromarray((np.random.default_rng(i).random((36, 36)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    cache = str(tmp_path / "cache")
    first = M.extract_features(M.ImageSet(str(d)), ex, cache_dir=cache, progress=False)  # (features, kept, cache)
    again = M.extract_features(M.ImageSet(str(d)), ex, cache_dir=cache, progress=False)
    assert (first[2], again[2]) == ("miss", "hit") and np.array_equal(first[0], again[0])
    assert first[1] == again[1] == [0, 1, 2, 3]
    os.utime(d / "2.png", (1, 1))  # a changed mtime invalidates the entry
    assert M.extract_features(M.ImageSet(str(d)), ex, cache_dir=cache, progress=False)[2] == "miss"


def test_cli_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    rng = np.random.default_rng(6)
    n = 24
    imgs = (rng.random((n, 1, 48, 48)) * 65535).astype(np.uint16)
    pos = [[["Edema"], ["No Finding"], ["Edema", "Fracture"]][i % 3] for i in range(n)]
    _write_dataset(str(tmp_path / "real"), imgs, [{"id": f"x{i:02d}", "split": "test", **_labels(pos[i])}
                                                  for i in range(n)])
    fake = tmp_path / "fake"
    fake.mkdir()
    rows = []
    for i in range(n):  # half reconstructions of the real images (paired by id), 4 images per prompt
        a = imgs[i, 0] if i % 2 == 0 else (rng.random((48, 48)) * 65535).astype(np.uint16)
        Image.fromarray(a).save(fake / f"x{i:02d}.png")
        rows.append({"id": f"x{i:02d}", "prompt": f"p{i // 4}", **_labels(pos[(i + 1) % n])})
    with open(fake / "meta.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    hf = _tiny_hf(str(tmp_path / "tinydino"))
    out = str(tmp_path / "res.json")
    M.main(["--real", str(tmp_path / "real"), "--fake", str(fake), "--train", str(tmp_path / "real"),
            "--train-split", "", "--features", f"inception,{hf}", "--offline", "--out", out, "--kid-subsets", "5",
            "--pixel-size", "48", "--privacy-size", "24", "--cache-dir", str(tmp_path / "c"), "--workers", "1",
            "--device", "cpu", "--kid-sampler", "torch-fidelity"])
    text = capsys.readouterr()
    res = json.load(open(out))
    assert res["features"][hf]["kid_sampler"] == "torch-fidelity" and res["features"][hf]["resize"] == "processor"
    assert "16-bit" in text.err and any("clips them" in s for s in res["notes"])  # peers clip 16-bit files
    assert "pt_inception-2015-12-05-6726825d.pth" in res["skipped_features"]["inception"]
    assert "skipping inception" in text.err and "paired: n 24" in text.out
    f = res["features"][hf]
    assert f["n_real"] == f["n_fake"] == n and f["dim"] == 32 and f["kid_subset_size"] == n
    assert {"fd", "kid_mean", "precision", "recall", "density", "coverage"} <= set(f)
    cond = res["conditions"][hf]
    assert (cond["Edema"]["n_real"], cond["Edema"]["n_fake"]) == (16, 16)  # labels of real i, of fake i+1
    assert (cond["Fracture"]["n_real"], cond["No Finding"]["n_fake"], cond["Finding"]["n_real"]) == (8, 8, 16)
    assert "fd" not in cond["Pneumonia"]  # empty group: reported with N, metrics skipped
    assert res["paired"]["n_identical"] == 12 and res["diversity"]["groups"] == 6
    assert res["diversity"]["scales"] == 3 and "not comparable" in res["diversity"]["note"]
    assert res["diversity"]["convention"] == "pytorch-msssim"
    p = res["privacy"]["pixel"]
    assert p["n_train"] == n and p["count_under_threshold"] == 12 and p["rms_min"] == 0.0
    assert res["privacy"]["latent"]["count_under_threshold"] >= 12 and os.path.isfile(p["grid"])
    assert {"torch", "numpy", "metrics.py"} <= set(res["versions"])
    pf = res["prevalence_fidelity"][hf]  # App. A.3 on the three pathologies with an FD; counts of the --train set
    assert pf["counts_of"] == "train" and pf["n"] == 3
    t = {r["pathology"]: r for r in pf["table"]}
    assert {k: t[k]["count"] for k in t} == {"Edema": 16, "No Finding": 8, "Fracture": 8}
    assert t["Edema"]["prevalence_rank"] == 1 and t["Fracture"]["prevalence_rank"] == 2.5  # a tie: mean rank
    fd = {g: cond[g]["fd"] for g in t}
    assert pf["correlation"] == pytest.approx(scipy.stats.spearmanr([-t[g]["count"] for g in t],
                                                                    [fd[g] for g in t])[0], abs=1e-12)
    assert "prevalence-fidelity rank correlation" in text.out


def test_cli_vocabulary_help_and_bad_values(tmp_path):
    assert all(f.metadata.get("help") for f in dataclasses.fields(M.Config))  # --help comes from the fields
    text = M.build_parser().format_help()
    assert "Inception input convention" in text and "cpu | cuda" in text and "torch-fidelity" in text
    for flag, value, expected in (("--device", "gpu", "cpu, cuda"), ("--resize", "bicubic", "pytorch-fid, clean"),
                                  ("--xrv-resize", "cv2", "model, skimage"), ("--kid-sampler", "tf", "cxr-gen")):
        with pytest.raises(SystemExit, match=f"metrics: {flag} '{value}'; expected one of .*{expected}"):
            M.main(["--fake", str(tmp_path), flag, value])
    cfg = M.Config(**vars(M.build_parser().parse_args(["--device", "auto"])))  # the older spelling still parses
    assert cfg.device == "auto" and M.Config().device == ""


def test_cli_on_phantom(phantom64_dir, tmp_path, capsys):
    hf = _tiny_hf(str(tmp_path / "tinydino"))
    out = str(tmp_path / "r.json")
    M.main(["--real", phantom64_dir, "--split", "test", "--fake", phantom64_dir, "--fake-split", "val",
            "--features", hf, "--metrics", "fd,kid,prdc,conditions", "--offline", "--no-cache", "--out", out,
            "--kid-subsets", "5"])
    res = json.load(open(out))
    f = res["features"][hf]
    rows = list(csv.DictReader(open(os.path.join(phantom64_dir, "meta.csv"))))
    assert f["n_real"] == sum(r["split"] == "test" for r in rows) and f["n_fake"] == sum(r["split"] == "val"
                                                                                        for r in rows)
    nf = sum(r["split"] == "test" and r["No Finding"] == "1" for r in rows)
    assert res["conditions"][hf]["No Finding"]["n_real"] == nf
    assert f["fd"] > 0 and 0 <= f["coverage"] <= 1
    assert hf in capsys.readouterr().out


def test_reid_and_factual_correctness(tmp_path):
    from safetensors.torch import save_file as save_pt
    rng = np.random.default_rng(7)
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir(), fake.mkdir()
    for i in range(3):  # synthetic images identical to their paired real ones
        a = (rng.random((40, 40)) * 255).astype(np.uint8)
        Image.fromarray(a).save(real / f"{i}.png"), Image.fromarray(a).save(fake / f"{i}.png")
    net = M.SiameseReID()
    with torch.no_grad():  # |e1 - e2| weighted negatively: an identical pair scores highest, sigmoid(bias)
        net.fc_end.weight.fill_(-10.0), net.fc_end.bias.fill_(2.0)
    save_pt({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "reid.safetensors"))
    top = 1 / (1 + math.exp(-2.0))
    cfg = M.Config(reid_weights=str(tmp_path / "reid.safetensors"), reid_threshold=top - 1e-4, workers=1)
    r = M.reid_scores(M.ImageSet(str(fake)), M.ImageSet(str(real)), cfg, torch.device("cpu"))
    assert r["max"] == pytest.approx(top, abs=1e-6) and r["count_over_threshold"] == 3 and r["n_train"] == 3
    cfg = M.Config(classifier="xrv", allow_random_weights=True, offline=True, workers=1)
    rs, fs = M.ImageSet(str(real)), M.ImageSet(str(fake))
    f = M.factual(rs, fs, M.paired_ids(rs, fs), cfg, torch.device("cpu"))
    assert f["n"] == 3 and f["random_weights"] and f["pearson"] == pytest.approx(1.0, abs=1e-9)


def test_factual_mimic_classifier_named_outputs_and_pearson_vs_numpy(tmp_path, monkeypatch):
    """--classifier xrv_mimic (chexgen's factual correctness): torchxrayvision's densenet121-res224-mimic_ch file,
    converted to its own safetensors (not the 'all' model's), its 11 named outputs of 18 after sigmoid + op_norm;
    Pearson of the flattened N x 11 matrices equals numpy's corrcoef on predictions made here by hand. The input
    side is shrunk to 64 px for speed (the DenseNet is fully convolutional up to its global pool)."""
    monkeypatch.setattr(M, "XRV_SIZE", 64)
    assert M.XRV_MIMIC_FILE == "mimic_ch-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
    named = [0, 1, 3, 4, 7, 8, 10, 14, 15, 16, 17]  # torchxrayvision model_urls['mimic_ch']['labels'] != ''
    rng = np.random.default_rng(5)
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir(), fake.mkdir()
    for i in range(2):
        a = rng.random((40, 32))
        Image.fromarray((a * 255).astype(np.uint8)).save(real / f"{i}.png")
        b = np.clip(a + 0.3 * rng.standard_normal(a.shape), 0, 1)  # related, not identical
        Image.fromarray((b * 255).astype(np.uint8)).save(fake / f"{i}.png")
    torch.manual_seed(3)
    net = M.XRVDenseNet().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    x = torch.from_numpy(np.stack([M.prepare(M.read_image(str(d / f"{i}.png")), 64) for d in (real, fake)
                                   for i in range(2)]))[:, None]
    with torch.no_grad():  # a classifier whose logits spread around -2 on these images (no saturated sigmoid)
        e = net.embed(x * 2048 - 1024)
        net.classifier.weight.copy_(torch.randn(18, 1024) / (e.std(0, keepdim=True) + 1e-6) / 32)
        net.classifier.bias.copy_(-2.0 - net.classifier.weight @ e.mean(0))
        logits = net.classifier(e).double().numpy()
    wd = tmp_path / "w"
    wd.mkdir()
    torch.save(net.state_dict(), wd / M.XRV_MIMIC_FILE)  # a tensor-only pickle under the released name
    rs, fs = M.ImageSet(str(real)), M.ImageSet(str(fake))
    cfg = M.Config(classifier="xrv_mimic", weights_dir=str(wd), offline=True, workers=1)
    f = M.factual(rs, fs, M.paired_ids(rs, fs), cfg, torch.device("cpu"))
    assert os.path.isfile(wd / M.XRV_MIMIC_SAFE) and not os.path.exists(wd / M.XRV_SAFE)
    assert f["outputs"] == ["Atelectasis", "Consolidation", "Pneumothorax", "Edema", "Effusion", "Pneumonia",
                            "Cardiomegaly", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]
    thr = np.array(M.XRV_OP_THRESHS["mimic_ch"], np.float64)
    p = 1 / (1 + np.exp(-logits))
    out = np.full_like(p, 0.5)  # xrv op_norm, element by element
    for r, c in np.ndindex(p.shape):
        if not np.isnan(thr[c]):
            out[r, c] = p[r, c] / (2 * thr[c]) if p[r, c] < thr[c] else 1 - (1 - p[r, c]) / (2 * (1 - thr[c]))
    ra, fa = out[:2, named], out[2:, named]
    assert ra.std() > 0.05 and fa.std() > 0.05  # predictions that vary: the correlation is not degenerate
    assert f["pearson"] == pytest.approx(np.corrcoef(ra.ravel(), fa.ravel())[0, 1], abs=1e-5)
    assert f["n"] == 2 and f["prediction"] == "sigmoid + xrv op_norm"


# ---------------------------------------------------------------------------------------------------------------
# LPIPS-style feature distance (radit App. C.1 Eq. 13-14), --paired identity metrics


def _tiny_dino(root, layers=4, short=32):
    """A tiny random Dinov2 (the Rad-DINO / DINOv2 layout) with a processor resizing to `short`, cropping 32."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, image_size=32)).save_pretrained(root)
    BitImageProcessor(size={"shortest_edge": short}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


def _eq13_float64(root, x, y, layers):
    """Eq. 13 from scratch in float64: processor normalisation by hand, hidden states of the float64 model,
    patch tokens unit-normalised, squared distance summed over channels, mean over positions, mean over layers."""
    from transformers import AutoImageProcessor, Dinov2Model
    proc, net = AutoImageProcessor.from_pretrained(root), Dinov2Model.from_pretrained(root).double().eval()
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (proc.image_mean, proc.image_std))
    with torch.no_grad():
        hx, hy = (net(pixel_values=(t.double().expand(-1, 3, -1, -1) - mean) / std, output_hidden_states=True)
                  .hidden_states for t in (x, y))
    out = np.zeros(len(x))
    for layer in layers:
        a, b = hx[layer][:, 1:].numpy(), hy[layer][:, 1:].numpy()
        a, b = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
        out += ((a - b) ** 2).sum(-1).mean(-1) / len(layers)
    return out


def test_feature_lpips_eq13_identity_noise_and_layers(tmp_path):
    root = _tiny_dino(str(tmp_path / "dino"))
    lp = M.FeatureLPIPS(root, offline=True)
    assert lp.layers == (1, 2, 3, 4) and lp.size == 32 and not lp.random_weights
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    d = lp.distance(x, y)
    assert d.shape == (6,) and d.dtype == torch.float64
    np.testing.assert_allclose(d.numpy(), _eq13_float64(root, x, y, (1, 2, 3, 4)), rtol=2e-4)
    np.testing.assert_allclose(M.FeatureLPIPS(root, layers=[2], offline=True).distance(x, y).numpy(),
                               _eq13_float64(root, x, y, (2,)), rtol=2e-4)
    assert torch.equal(lp.distance(x, x), torch.zeros(6, dtype=torch.float64))  # identical images: exactly 0
    e = torch.randn(x.shape, generator=g)
    means = [float(lp.distance(x, (x + s * e).clamp(0, 1)).mean()) for s in (0.01, 0.03, 0.1, 0.3)]
    assert all(a < b for a, b in zip(means, means[1:])) and means[0] > 0, means  # grows with the noise
    xg = x.clone().requires_grad_(True)  # differentiable when asked (e.g. as a perceptual loss)
    lp.distance(xg, y).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    assert M.FeatureLPIPS(_tiny_dino(str(tmp_path / "d12"), layers=12), offline=True).layers == (3, 6, 9, 12)
    with pytest.raises(ValueError, match=r"layers \[5\] outside 1..4"):
        M.FeatureLPIPS(root, layers=[5], offline=True)
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        lp.distance(x, y[:3])


def test_feature_lpips_processor_twin_and_missing_weights(tmp_path, monkeypatch):
    from transformers import AutoImageProcessor
    root = _tiny_dino(str(tmp_path / "dino"), short=40)  # resize shortest edge to 40, centre crop 32
    lp = M.FeatureLPIPS(root, offline=True)
    u8 = (np.random.default_rng(1).random((3, 48, 60)) * 255).astype(np.uint8)
    want = AutoImageProcessor.from_pretrained(root)(images=[np.repeat(a[:, :, None], 3, 2) for a in u8],
                                                    return_tensors="pt")["pixel_values"]
    got = lp.pixel_values(torch.from_numpy(u8 / 255.0).float()[:, None])
    assert got.shape == want.shape == (3, 3, 32, 32)
    assert (got - want).abs().mean() < 0.02  # PIL bicubic vs torch antialiased bicubic: same up to interpolation
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(M.WeightsMissing, match="microsoft/rad-dino.*--weights-dir"):
        M.FeatureLPIPS("raddino", offline=True)
    rad = M.FeatureLPIPS("raddino", allow_random_weights=True, offline=True)  # Rad-DINO's ViT-B/14 layout, random
    assert rad.random_weights and rad.layers == (3, 6, 9, 12) and rad.size == 224 and rad.skip == 1
    x = torch.rand(1, 1, 64, 64)
    assert float(rad.distance(x, x)[0]) == 0.0 and float(rad.distance(x, 1 - x)[0]) > 0


def test_relative_lpips_of_random_pairs_is_one(tmp_path):
    lp = M.FeatureLPIPS(_tiny_dino(str(tmp_path / "dino")), offline=True)
    x = torch.rand(24, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    i, j = M.random_pairs(24, 200, seed=0)
    assert (i != j).all() and i.min() >= 0 and max(i.max(), j.max()) < 24 and len(set(zip(i, j))) > 150
    d0 = M.random_pair_distance(lp, x, 200, seed=0)
    assert d0 == pytest.approx(float(lp.distance(x[i], x[j]).mean()), rel=1e-12)
    # Eq. 14 by construction: the reference pairs themselves average exactly 1, fresh random pairs about 1
    assert float(M.relative_lpips(lp.distance(x[i], x[j]), d0).mean()) == pytest.approx(1.0, rel=1e-12)
    i2, j2 = M.random_pairs(24, 200, seed=1)
    assert float(M.relative_lpips(lp.distance(x[i2], x[j2]), d0).mean()) == pytest.approx(1.0, abs=0.1)
    assert float(M.relative_lpips(lp.distance(x, x), d0).max()) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        M.random_pairs(1)
    with pytest.raises(ValueError, match="> 0"):
        M.relative_lpips(torch.ones(2), 0.0)


def test_paired_cli_identity_table(tmp_path, capsys):
    rng = np.random.default_rng(8)
    orig, edit = tmp_path / "orig", tmp_path / "edit"
    orig.mkdir(), edit.mkdir()
    imgs = (rng.random((10, 48, 48)) * 65535).astype(np.uint16)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(orig / f"p{i}.png")
        b = a if i < 5 else np.clip(a + rng.normal(0, 3000, a.shape), 0, 65535).astype(np.uint16)
        Image.fromarray(b).save(edit / f"p{i}.png")  # 5 untouched, 5 edited by noise
    Image.fromarray(imgs[0]).save(edit / "stray.png")  # an id the originals lack: left out, counted
    root = _tiny_dino(str(tmp_path / "dino"))
    out = str(tmp_path / "id.json")
    M.main(["--paired", "--real", str(orig), "--fake", str(edit), "--lpips", root, "--random-pairs", "40",
            "--pixel-size", "48", "--workers", "1", "--out", out])
    text = capsys.readouterr()
    res = json.load(open(out))
    p, lpd = res["paired"], res["paired"]["lpips"][root]
    assert p["n"] == 10 and p["n_identical"] == 5 and res["fake"]["unpaired"] == 1 and "stray" in text.err
    assert res["features"] == {} and "diversity" not in res  # identity metrics only
    # independent recomputation with the library functions on the same preprocessed pixels
    lp = M.FeatureLPIPS(root, offline=True)
    load = lambda d: torch.from_numpy(np.stack([M.prepare(M.read_image(str(d / f"p{i}.png")), 32)  # noqa: E731
                                                for i in range(10)]))[:, None]
    xo, xe = load(orig), load(edit)
    d = lp.distance(xo, xe).numpy()
    d0 = M.random_pair_distance(lp, xo, 40, seed=0)
    assert np.all(d[:5] == 0) and np.all(d[5:] > 0)
    assert lpd["mean"] == pytest.approx(d.mean(), rel=1e-6)
    assert lpd["random_pairs_mean"] == pytest.approx(d0, rel=1e-6)
    assert lpd["rlpips_mean"] == pytest.approx((d / d0).mean(), rel=1e-6) and lpd["layers"] == [1, 2, 3, 4]
    i, j = M.random_pairs(10, 40, 0)
    po = torch.from_numpy(np.stack([M.read_image(str(orig / f"p{k}.png")) for k in range(10)]))[:, None].double()
    assert p["random_pairs"]["ssim_mean"] == pytest.approx(float(M.ssim(po[i], po[j]).mean()), abs=1e-6)  # fp32
    assert "| random real pairs | 40 |" in text.out and "| paired (real, fake) | 10 |" in text.out
    with pytest.raises(SystemExit, match="have no id in"):
        other = tmp_path / "other"
        other.mkdir()
        Image.fromarray(imgs[0]).save(other / "zzz.png")
        M.main(["--paired", "--real", str(orig), "--fake", str(other), "--lpips", root, "--workers", "1"])


# ---------------------------------------------------------------------------------------------------------------
# Diversity groups (cond_id / source_id before prompt text); honest offline behaviour; the result table


def test_diversity_groups_by_source_id_never_span_sources():
    rng = np.random.default_rng(0)
    src = [f"s{int(v)}" for v in rng.integers(0, 4, 40)]
    meta = [{"id": f"{i}", "prompt": "one text shared by every patient", "source_id": s} for i, s in enumerate(src)]
    meta[5]["source_id"] = ""  # no source: in no group (not one condition with the other empty rows)
    meta[6]["source_id"] = ""
    assert M._group_column(meta, "auto") == "source_id"
    assert M._group_column([{"prompt": "p", "cond_id": "c0", "source_id": "s"}], "auto") == "cond_id"
    groups = M.diversity_groups(meta, "source_id")
    assert sorted(i for g in groups for i in g) == [i for i in range(40) if i not in (5, 6)]
    assert len(groups) == len(set(src[i] for i in range(40) if i not in (5, 6)))
    for max_pairs in (3, 1000):  # random pairs of large groups and every pair of small ones
        for g in groups:
            pairs = M.diversity_pairs(g, max_pairs, np.random.default_rng(1))
            assert pairs and all(a != b and meta[a]["source_id"] == meta[b]["source_id"] != "" for a, b in pairs)
            assert len(pairs) == min(max_pairs, len(g) * (len(g) - 1) // 2) or max_pairs == 3
    by_prompt = M.diversity_groups(meta, "prompt")  # what the old default did: one group across all patients
    assert len(by_prompt) == 1 and len({meta[i]["source_id"] for i in by_prompt[0]}) > 1


def test_no_weights_says_so_at_the_top_and_exits_nonzero(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CXR_OFFLINE", "1")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / d / f"{i}.png")
    out = str(tmp_path / "r.json")
    with pytest.raises(SystemExit) as e:
        M.main(["--real", str(tmp_path / "a"), "--fake", str(tmp_path / "b"), "--features", "inception,xrv,raddino",
                "--metrics", "fd,kid,prdc", "--offline", "--no-cache", "--out", out, "--weights-dir", "W"])
    assert e.value.code == M.EXIT_NO_FIDELITY == 3
    text = capsys.readouterr()
    first = text.out.splitlines()
    assert first[0].startswith("!! NO FIDELITY METRIC COMPUTED") and "inception, xrv, raddino" in first[0]
    guide = "\n".join(first[:8])
    for needed in (M.FID_FILE, M.FID_URL, M.XRV_FILE, M.XRV_URL, "W/microsoft--rad-dino/", "fetch-weights",
                   "https://huggingface.co/microsoft/rad-dino", "--weights-dir W"):
        assert needed in guide, needed
    assert "NO FIDELITY METRIC COMPUTED" in text.err
    res = json.load(open(out))  # written all the same, saying what is missing
    assert res["features"] == {} and "NO FIDELITY" in res["no_fidelity"]
    res = M.evaluate(M.Config(real=str(tmp_path / "a"), fake=str(tmp_path / "b"), features="", metrics="diversity",
                              no_cache=True))
    assert "no_fidelity" not in res  # no fidelity metric asked for: nothing to warn about


def test_fetch_weights_offline_names_files_and_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_OFFLINE", "1")  # no network at test time: _online() is False before any lookup
    with pytest.raises(SystemExit) as e:
        M.main(["fetch-weights", "--weights-dir", str(tmp_path / "w"), "--only", "inception,xrv,raddino"])
    msg = str(e.value)
    assert "offline" in msg and "nothing was downloaded" in msg
    for needed in (M.FID_FILE, M.FID_URL, M.XRV_FILE, M.XRV_URL, "microsoft--rad-dino", "huggingface.co/microsoft"):
        assert needed in msg, needed
    assert not os.path.exists(tmp_path / "w")
    with pytest.raises(SystemExit, match="--only 'resnet'; expected some of inception"):
        M.main(["fetch-weights", "--only", "resnet"])


def test_table_columns_apart_for_any_magnitude():
    base = {"n_real": 123456, "n_fake": 654321}
    rows = {"huge": {"fd": 1184.369, "kid_mean": 3.02, "kid_std": 0.22, "precision": 0.5, "recall": 1.0,
                     "density": 12345.678, "coverage": 0.25},
            "tiny": {"fd": -1.5e-13, "kid_mean": -1.234e-9, "kid_std": 4.56e-9, "precision": 0.0, "recall": 0.0,
                     "density": 0.0, "coverage": 1.0},
            "vast": {"fd": 9.87e15, "kid_mean": -6.5e9, "kid_std": 1.2e10, "precision": 1.0, "recall": 1.0,
                     "density": 1e12, "coverage": 1.0}}
    res = {"real": {"path": "r", "n": 123456}, "fake": {"path": "f", "n": 654321}, "skipped_features": {},
           "features": {k: base | v for k, v in rows.items()}}
    lines = M.format_table(res).splitlines()
    for name, d in rows.items():
        cells = next(line for line in lines if line.startswith(name)).split()
        assert len(cells) == 8 and float(cells[1]) == pytest.approx(d["fd"], rel=1e-3)  # 1 label + 7 columns
        kid_mean, kid_std = cells[2].split("+-")
        assert float(kid_mean) == pytest.approx(d["kid_mean"] * 1e3, rel=1e-2) and float(kid_std) > 0
        assert cells[-1] == "123456/654321"


def test_header_count_equals_table_count_when_files_are_skipped(tmp_path, capsys):
    rng = np.random.default_rng(2)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(6):
            Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / d / f"{i}.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    hf = _tiny_hf(str(tmp_path / "dino"))
    M.main(["--real", str(tmp_path / "a"), "--fake", str(tmp_path / "b"), "--features", hf, "--metrics", "fd",
            "--offline", "--no-cache", "--workers", "1", "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    assert "fake " in out[0] and "(N=6, 1 of 7 unreadable, skipped)" in out[0] and "(N=6)" in out[0]
    assert next(line for line in out if line.startswith("dino")).split()[-1] == "6/6"


# ---------------------------------------------------------------------------------------------------------------
# Rank correlations of chexgenbench App. A.3 (Table 9) and A.4 (Table 10)

TABLE9 = {"No Finding": (78939, 110.75), "Support Devices": (71537, 109.77), "Pleural Effusion": (56433, 130.45),
          "Lung Opacity": (53513, 133.77), "Atelectasis": (47704, 114.28), "Cardiomegaly": (46602, 114.89),
          "Edema": (28601, 130.75), "Pneumonia": (16832, 146.69), "Consolidation": (11290, 172.14),
          "Pneumothorax": (10971, 172.15), "Enlarged Cardiomediastinum": (7454, 188.95),
          "Lung Lesion": (6491, 194.99), "Fracture": (4671, 211.58), "Pleural Other": (2024, 227.43)}
TABLE9_FIDELITY_RANK = [2, 1, 5, 7, 3, 4, 6, 8, 9, 10, 11, 12, 13, 14]


def test_prevalence_fidelity_reproduces_table9():
    out = M.prevalence_fidelity({k: v[0] for k, v in TABLE9.items()}, {k: v[1] for k, v in TABLE9.items()})
    assert [r["prevalence_rank"] for r in out["table"]] == list(range(1, 15))
    assert [r["fidelity_rank"] for r in out["table"]] == TABLE9_FIDELITY_RANK
    d2 = sum((a - b) ** 2 for a, b in zip(range(1, 15), TABLE9_FIDELITY_RANK))  # Spearman's closed form, no ties
    assert d2 == 24 and out["correlation"] == pytest.approx(1 - 6 * d2 / (14 * (14 ** 2 - 1)), abs=1e-12)
    assert round(out["correlation"], 3) == 0.947  # the paper's number
    assert "skipped" in M.prevalence_fidelity({"Edema": 3, "Fracture": 1}, {"Edema": 1.0, "Fracture": 2.0})


def test_fidelity_utility_reproduces_table10_and_scipy(tmp_path, capsys):
    fid = [8, 6, 10, 11, 4, 2, 1, 5, 7, 9, 3]  # Table 10's ranks as printed (its tied ranks used as given)
    cls, seg = [1, 1, 4, 4, 1, 1, 1, 2, 2, 2, 1], [6, 6, 9, 8, 2, 1, 1, 2, 2, 2, 1]
    assert round(M.rank_correlation(fid, cls), 2) == 0.77 and round(M.rank_correlation(fid, seg), 2) == 0.78
    assert M.rank_correlation(fid, cls) == pytest.approx(np.corrcoef(fid, cls)[0, 1], abs=1e-12)
    rng = np.random.default_rng(0)
    v = np.round(rng.random(12), 1)  # ties
    assert np.array_equal(M.ranks(v), scipy.stats.rankdata(v)) and M.ranks(v, True)[np.argmax(v)] <= 1.5
    fd, auc = rng.random(9) * 100, np.round(rng.random(9), 1)
    names = [f"m{i}" for i in range(9)]
    out = M.fidelity_utility(dict(zip(names, fd)), dict(zip(names, auc)))
    assert out["correlation"] == pytest.approx(scipy.stats.spearmanr(fd, -auc)[0], abs=1e-12)
    rows = []
    for n, f in zip(names, fd):  # the CLI reads metrics.py's own results.json files
        path = tmp_path / f"{n}.json"
        path.write_text(json.dumps({"features": {"raddino": {"fd": float(f)}},
                                    "conditions": {"raddino": {lab: {"fd": float(f) + k} for k, lab in
                                                               enumerate(M.LABELS[:4])}}}))
        rows.append(f"{path},{auc[names.index(n)]}")
    (tmp_path / "u.csv").write_text("results,utility\n" + "\n".join(rows) + "\n")
    got = M.main(["correlate", "--utility", str(tmp_path / "u.csv"), "--out", str(tmp_path / "c.json")])
    assert got["correlation"] == pytest.approx(out["correlation"], abs=1e-12) and got["n"] == 9
    assert json.load(open(tmp_path / "c.json"))["n"] == 9 and "rank correlation" in capsys.readouterr().out
    (tmp_path / "p.csv").write_text("pathology,utility\n" + "\n".join(
        f"{lab},{u}" for lab, u in zip(M.LABELS[:4], (0.9, 0.8, 0.85, 0.7))) + "\n")
    per = M.main(["correlate", "--utility", str(tmp_path / "p.csv"), "--results", str(tmp_path / "m0.json")])
    assert per["correlation"] == pytest.approx(scipy.stats.spearmanr([0, 1, 2, 3], [-0.9, -0.8, -0.85, -0.7])[0])
    (tmp_path / "bad.csv").write_text("results,utility\n" + str(tmp_path / "m0.json") + ",high\n")
    with pytest.raises(SystemExit, match="utility 'high'; expected a number"):
        M.main(["correlate", "--utility", str(tmp_path / "bad.csv")])

"""Bad-input table of prep_data.py and metrics.py (issue 19; harness: tests/bad_input.py): each case is an input a
careless or hostile user could give; the script must stop with one line matching the pattern, and the watched files
(the existing datasets, the files outside --root, the folders it would write) must be unchanged. Every case is
refused at start-up or at ingestion, before anything is written, so the table is cheap (tiny trees, no network).

Below the table: the writers that name files from data (confined), --allow-outside-root, and the seeded random
weights of metrics.py with the feature cache keyed by the weights' hash (issue 19 item 12)."""
import copy
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

import metrics as M
import prep_data as P
from bad_input import confined, expect_refusal, one_line_refusal, run_main

S = 32                                                   # image side of the tiny trees


def write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def png(path, seed=0, dtype=np.uint8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    top = 255 if dtype == np.uint8 else 65535
    Image.fromarray((np.random.default_rng(seed).random((S, S)) * top).astype(dtype)).save(path)


def generic_root(root, paths, ids=None):
    """A generic source: ROOT/meta.csv with `path` (and `id`) columns; images exist for paths inside ROOT."""
    for i, p in enumerate(paths):
        full = os.path.join(root, p)
        if not os.path.isabs(p) and os.path.realpath(full).startswith(os.path.realpath(root) + os.sep):
            png(full, i)
    header = ["path"] + (["id"] if ids else [])
    write_csv(os.path.join(root, "meta.csv"), header, [[p] + ([i] if ids else []) for p, i in
                                                        zip(paths, ids or paths)])
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Shared inputs (never changed by a case, which the watches check): a tiny prepared dataset, a tiny phantom,
    a file outside every --root, image folders for metrics.py, a tiny local transformers feature space."""
    t = tmp_path_factory.mktemp("bad_input")
    d = {"tmp": t, "secret": str(t / "outside" / "secret.png")}
    png(d["secret"], 99)                                 # an image outside --root: reading it must be refused
    d["dataset"] = str(t / "ds")
    P.main(["generic", "--root", generic_root(str(t / "src"), [f"i/{i}.png" for i in range(4)]),
            "--out", d["dataset"], "--size", str(S), "--shard-size", "2", "--dataset-name", "Tiny"])
    d["phantom"] = str(t / "phantom")
    P.make_phantom(d["phantom"], n=4, size=S, seed=0, masks=False)
    for name in ("real", "fake"):
        for i in range(3):
            png(str(t / name / f"{name}{i}.png"), i + (10 if name == "fake" else 0))
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    d["hf"] = str(t / "tinydino")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 patch_size=8, image_size=16)).save_pretrained(d["hf"])
    BitImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(d["hf"])
    return d


def copy_dataset(src, dst, edit_meta=None, shard=None):
    """A copy of a prepared dataset; edit_meta(rows) changes its meta.csv rows, shard replaces shard 0's tensors."""
    import shutil
    shutil.copytree(src, dst)
    path = os.path.join(dst, "meta.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0])
    if edit_meta:
        edit_meta(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    if shard is not None:
        save_file(shard, os.path.join(dst, "shards", "00000.safetensors"))
    return dst


# ---------------------------------------------------------------------------------------------------------------
# The table: (id, build(tree, tmp) -> (main, argv, watched paths), pattern)


def _generic_path(path_of):
    """generic with one CSV row whose `path` leaves --root (path_of(tree, root) gives it)."""
    def build(t, tmp):
        root = str(tmp / "root")
        generic_root(root, ["ok/0.png"])
        bad = path_of(t, root)
        write_csv(os.path.join(root, "meta.csv"), ["path"], [["ok/0.png"], [bad]])
        return P.main, ["generic", "--root", root, "--out", tmp / "out", "--size", S], [tmp / "out", t["secret"]]
    return build


def _symlink_out(t, root):
    os.symlink(t["secret"], os.path.join(root, "ok", "link.png"))      # a link under --root to a file outside it
    return "ok/link.png"


def _generic_ids(ids, png16=True):
    def build(t, tmp):
        named = [i.replace("/abs", str(tmp / "abs")) for i in ids]    # an absolute id inside the watched tree
        root = generic_root(str(tmp / "root"), [f"i/{k}.png" for k in range(len(ids))], named)
        return P.main, ["generic", "--root", root, "--out", tmp / "out", "--size", S] + ["--png16"] * png16, \
            [tmp / "out", root]
    return build


def _chexpert_traversal(t, tmp):
    """A train.csv `Path` climbing out of --root to the secret (the folder it climbs through exists)."""
    root = str(tmp / "chexpert")
    os.makedirs(os.path.join(root, "CheXpert-v1.0"))
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + P.LABELS
    climb = "CheXpert-v1.0/../" + os.path.relpath(t["secret"], root)
    write_csv(os.path.join(root, "train.csv"), header, [[climb, "Female", "60", "Frontal", "PA"] + [""] * 14])
    write_csv(os.path.join(root, "valid.csv"), header, [])
    return P.main, ["chexpert", "--root", root, "--out", tmp / "out", "--size", S], [tmp / "out", t["secret"]]


def _brax_absolute(t, tmp):
    root = str(tmp / "brax")
    write_csv(os.path.join(root, "master_spreadsheet_update.csv"),
              ["PngPath", "PatientID", "PatientSex", "PatientAge", "ViewPosition"] + P.LABELS,
              [[t["secret"], "1", "F", "40-44", "PA"] + [""] * 14])
    return P.main, ["brax", "--root", root, "--out", tmp / "out", "--size", S], [tmp / "out", t["secret"]]


def _nih_symlink(t, tmp):
    root = str(tmp / "nih")
    os.makedirs(os.path.join(root, "images"))
    os.symlink(t["secret"], os.path.join(root, "images", "00000001_000.png"))
    write_csv(os.path.join(root, "Data_Entry_2017_v2020.csv"),
              ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position"], [["00000001_000.png", "No Finding", "0", "1", "58", "M", "PA"]])
    return P.main, ["nih-cxr14", "--root", root, "--out", tmp / "out", "--size", S], [tmp / "out", t["secret"]]


def _merge_with(edit_meta=None, shard=None):
    def build(t, tmp):
        bad = copy_dataset(t["dataset"], str(tmp / "bad"), edit_meta, shard)
        return P.main, ["merge", "--inputs", t["dataset"], bad, "--out", tmp / "merged"], \
            [tmp / "merged", t["dataset"], bad]
    return build


def _rename_all(rows):
    for i, r in enumerate(rows):
        r["id"] = f"other{i}"


def _dup_in_input(rows):
    _rename_all(rows)
    rows[1]["id"] = rows[0]["id"]


def _index_past_end(rows):
    _rename_all(rows)
    rows[0]["index"] = "7"


def _counterfactual(setting):
    def build(t, tmp):
        return P.main, ["counterfactual", "--data", t["phantom"], "--set", setting, "--out", tmp / "cf"], \
            [tmp / "cf", t["phantom"]]
    return build


def _interventions(ids):
    def build(t, tmp):
        with open(os.path.join(t["phantom"], "meta.csv"), newline="") as f:
            source = next(csv.DictReader(f))["id"]
        table = str(tmp / "E" / "meta.csv")
        write_csv(table, ["id", "source_id", "intervention"], [[i, source, "sex=F"] for i in ids])
        return P.main, ["counterfactual", "--data", t["phantom"], "--interventions", table, "--out", tmp / "cf"], \
            [tmp / "cf", t["phantom"], table]
    return build


def _extract_labels_over_input(t, tmp):
    table = str(tmp / "t.csv")
    write_csv(table, ["id", "report"], [["a", "No acute findings."]])
    return P.main, ["extract-labels", "--csv", table, "--out", table], [table]


def _extract_labels_over_dataset(t, tmp):
    return P.main, ["extract-labels", "--csv", os.path.join(t["dataset"], "meta.csv"), "--out",
                    os.path.join(t["dataset"], "meta.csv")], [t["dataset"]]


def _prep_flags(*argv):
    def build(t, tmp):
        return P.main, [a(t, tmp) if callable(a) else a for a in argv], [t["dataset"], tmp]
    return build


def _file_at(t, tmp):
    path = tmp / "afile"
    path.write_text("not a folder")
    return path


def _metrics(*extra, real=None, fake=None, setup=None, watch_cache=False):
    """metrics.py on the tiny folders (or what real / fake / setup build), offline, cache in tmp (watched when
    watch_cache: otherwise a refusal at the fake set may keep the real set's good features there)."""
    def build(t, tmp):
        r = real(t, tmp) if real else str(t["tmp"] / "real")
        f = fake(t, tmp) if fake else str(t["tmp"] / "fake")
        more = setup(t, tmp) if setup else []
        argv = ["--real", r, "--fake", f, "--offline", "--cache-dir", tmp / "cache", "--workers", "0",
                "--device", "cpu", "--out", tmp / "res.json"] + [a(t, tmp) if callable(a) else a for a in extra]
        return M.main, argv + more, [r, f, tmp / "res.json", tmp / "weights"] + [tmp / "cache"] * watch_cache
    return build


def _nan_tiff(t, tmp):
    d = tmp / "nanfake"
    d.mkdir()
    for i in range(3):
        a = np.random.default_rng(i).random((S, S)).astype(np.float32)
        a[3, 4] = np.nan if i == 1 else a[3, 4]
        Image.fromarray(a, mode="F").save(d / f"f{i}.tif")
    return str(d)


def _float_shard(t, tmp):
    with open(os.path.join(t["dataset"], "meta.csv"), newline="") as f:
        n = sum(r["shard"] == "0" for r in csv.DictReader(f))
    images = np.full((n, 1, S, S), np.nan, np.float32)
    return copy_dataset(t["dataset"], str(tmp / "floatds"), shard={"images": images})


def _dataset_with(edit):
    return lambda t, tmp: copy_dataset(t["dataset"], str(tmp / "edited"), edit)


def _dup_ids(rows):
    rows[1]["id"] = rows[0]["id"]


def _folder_meta_dup(t, tmp):
    import shutil
    d = str(tmp / "fakemeta")
    shutil.copytree(str(t["tmp"] / "fake"), d)
    write_csv(os.path.join(d, "meta.csv"), ["id", "prompt"], [["fake0", "a"], ["fake1", "b"], ["fake0", "c"]])
    return d


def _weights(name, content):
    def setup(t, tmp):
        wd = tmp / "weights"
        wd.mkdir()
        (wd / name).write_bytes(content)
        return ["--features", "inception", "--weights-dir", wd]
    return setup


def _truncated_safetensors():
    import io
    from safetensors.numpy import save
    whole = save({"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32)})
    return io.BytesIO(whole).read()[:len(whole) // 2]


def _corrupt_cache(t, tmp):
    """Fill the cache with one run, then truncate every entry (as a full disk or a copy gone wrong could)."""
    argv = ["--real", str(t["tmp"] / "real"), "--fake", str(t["tmp"] / "fake"), "--offline", "--cache-dir",
            tmp / "cache", "--workers", "0", "--device", "cpu", "--features", t["hf"], "--metrics", "fd"]
    assert isinstance(run_main(M.main, argv)[0], dict)          # a whole run: main returns its results
    for name in os.listdir(tmp / "cache"):
        with open(tmp / "cache" / name, "r+b") as f:
            f.truncate(40)
    return ["--features", t["hf"], "--metrics", "fd"]


def _unreadable_folder(t, tmp):
    d = tmp / "broken"
    d.mkdir()
    for i in range(3):
        (d / f"b{i}.png").write_bytes(b"not a png")
    return str(d)


def _empty(t, tmp):
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


FILE_NAME = r"is not usable as a file name"
OUTSIDE = r"is outside --root"
CASES = [
    # item 1: ids that would leave the output folder (generic --png16 names OUT/png/<id>.png)
    ("png16-id-parent", _generic_ids(["../../X", "b"]), r"meta\.csv row 2: id '\.\./\.\./X' " + FILE_NAME),
    ("png16-id-absolute", _generic_ids(["a", "/abs/X"]), r"row 3: id '/\S+/abs/X' " + FILE_NAME),
    ("png16-id-hidden", _generic_ids([".hidden"]), FILE_NAME),
    ("png16-id-backslash", _generic_ids(["a\\b"]), FILE_NAME),
    ("id-traversal-without-png16", _generic_ids(["../X"], png16=False), FILE_NAME),   # meta.csv ids name files later
    # item 2: reads outside --root, in generic and in the other converters
    ("generic-path-parent", _generic_path(lambda t, root: "../../../../etc/passwd"), r"row 3: path .*" + OUTSIDE),
    ("generic-path-absolute", _generic_path(lambda t, root: t["secret"]), OUTSIDE),
    ("generic-path-symlink", _generic_path(_symlink_out), r"resolves to .*secret\.png"),
    ("chexpert-path-parent", _chexpert_traversal, r"train\.csv row 2: path .*" + OUTSIDE),
    ("brax-path-absolute", _brax_absolute, r"master_spreadsheet_update\.csv row 2: .*" + OUTSIDE),
    ("nih-image-symlink", _nih_symlink, r"Data_Entry_2017_v2020\.csv row 2: .*" + OUTSIDE),
    # item 6: duplicate ids at ingestion, named, before anything is written
    ("generic-duplicate-id", _generic_ids(["a", "b", "a"], png16=False),
     r"row 4: id 'a' appears more than once \(first at .*row 2\)"),
    ("merge-duplicate-in-an-input", _merge_with(_dup_in_input), r"bad/meta\.csv: id 'other0' appears more than once"),
    ("merge-duplicate-across-inputs", _merge_with(), r"already in an earlier input"),
    ("merge-index-past-shard-end", _merge_with(_index_past_end), r"has index 7; shard 0 holds rows 0\.\.1"),
    ("merge-float-shard", _merge_with(_rename_all, {"images": np.zeros((2, 1, S, S), np.float32)}),
     r"stored as F32; expected U16"),
    ("interventions-duplicate-id", _interventions(["e1", "e2", "e1"]), r"meta\.csv: id 'e1' appears more than once"),
    ("interventions-traversal-id", _interventions(["../e1"]), FILE_NAME),
    # item 7: ages of an intervention (check_age), counts
    ("counterfactual-age-negative", _counterfactual("age=-5"), r"--set: age '-5'; expected years in 0-120"),
    ("counterfactual-age-huge", _counterfactual("age=1e9"), r"age '1e9'; expected years in 0-120"),
    ("counterfactual-age-nan", _counterfactual("age=nan"), r"age='nan'; expected years in 0-120"),
    ("sheet-cols-0", _prep_flags("sheet", "--data", lambda t, tmp: t["dataset"], "--cols", "0", "--out",
                                 lambda t, tmp: tmp / "s.png"), r"--cols 0: expected an integer >= 1"),
    ("phantom-shard-size-negative", _prep_flags("phantom", "--n", "4", "--shard-size", "-1", "--out",
                                                lambda t, tmp: tmp / "ph"), r"--shard-size -1: expected"),
    # a dataset is never overwritten; an --out that cannot be a folder is one line
    ("extract-labels-over-its-input", _extract_labels_over_input, r"the input table or a dataset's meta\.csv"),
    ("extract-labels-over-a-dataset", _extract_labels_over_dataset, r"a dataset is never overwritten"),
    ("sheet-over-a-dataset", _prep_flags("sheet", "--data", lambda t, tmp: t["dataset"], "--out",
                                         lambda t, tmp: os.path.join(t["dataset"], "meta.csv")),
     r"meta\.csv: exists and is not a PNG file"),
    ("phantom-out-is-a-file", _prep_flags("phantom", "--n", "4", "--size", "32", "--out", _file_at),
     r"afile.*(Not a directory|File exists)"),
    # items 9/10: metrics.py inputs
    ("metrics-nan-image", _metrics("--features", lambda t, tmp: t["hf"], "--metrics", "fd", fake=_nan_tiff),
     r"f1\.tif: NaN or infinite pixel values"),
    ("metrics-float-shard", _metrics("--split", "", real=_float_shard), r"00000\.safetensors: 'images' stored as F32"),
    ("metrics-duplicate-dataset-ids", _metrics("--split", "", real=_dataset_with(_dup_ids)),
     r"meta\.csv: id '\w+' appears more than once"),
    ("metrics-duplicate-folder-ids", _metrics(fake=_folder_meta_dup), r"id 'fake0' appears more than once"),
    ("metrics-index-past-end", _metrics("--split", "", real=_dataset_with(lambda rows: rows[0].update(index="9"))),
     r"has index 9; shard 0 holds rows"),
    ("metrics-truncated-weights", _metrics(setup=_weights("pt_inception-2015-12-05.safetensors",
                                                          _truncated_safetensors())),
     r"pt_inception-2015-12-05\.safetensors: not a readable weights file"),
    ("metrics-text-as-weights", _metrics(setup=_weights("pt_inception-2015-12-05-6726825d.pth", b"hello\n" * 9)),
     r"6726825d\.pth: not a readable weights file"),
    ("metrics-truncated-cache", _metrics(setup=_corrupt_cache, watch_cache=True), r"feature cache .*: not readable"),
    ("metrics-all-unreadable", _metrics("--features", lambda t, tmp: t["hf"], "--metrics", "fd",
                                        fake=_unreadable_folder), r"no readable image in .*broken"),
    ("metrics-real-is-a-file", _metrics(real=lambda t, tmp: _file_at(t, tmp)), r"afile is not a folder"),
    ("metrics-empty-folder", _metrics(fake=_empty), r"no images in .*empty"),
    ("metrics-batch-size-0", _metrics("--batch-size", "0"), r"--batch-size 0: expected an integer >= 1"),
    ("metrics-k-0", _metrics("--k", "0"), r"--k 0: expected an integer >= 1"),
    ("metrics-out-is-a-folder", _metrics(setup=lambda t, tmp: ["--out", t["tmp"] / "real"]),
     r"--out .*real: a folder; expected a file path"),
]


@pytest.mark.parametrize("build,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(tree, tmp_path, build, pattern):
    main, argv, watch = build(tree, tmp_path)
    shared = [tree["dataset"], tree["phantom"], tree["secret"], str(tree["tmp"] / "real"), str(tree["tmp"] / "fake")]
    expect_refusal(main, argv, pattern, watch=[*watch, *shared])


# ---------------------------------------------------------------------------------------------------------------
# Writers naming files from data: nothing outside the output folder, whatever the id


@pytest.mark.parametrize("bad", ["../../X", "/abs/X", ".hidden", "a\\b"])
def test_png16_writes_nothing_outside_its_output_folder(tmp_path, bad):
    bad = bad.replace("/abs", str(tmp_path / "abs"))             # an absolute id inside the watched tree
    root = generic_root(str(tmp_path / "in" / "root"), ["i/0.png", "i/1.png"], ["ok", bad])
    out = tmp_path / "in" / "out"
    code = confined(P.main, ["generic", "--root", root, "--out", out, "--size", S, "--png16"], out, tmp_path)
    one_line_refusal(code, FILE_NAME)
    assert not out.exists()                                      # refused at ingestion: nothing written at all


def test_allow_outside_root_reads_the_file_outside(tree, tmp_path):
    root = str(tmp_path / "root")
    generic_root(root, ["ok/0.png"])
    write_csv(os.path.join(root, "meta.csv"), ["path", "id"], [["ok/0.png", "in"], [tree["secret"], "out"]])
    out = str(tmp_path / "out")
    P.main(["generic", "--root", root, "--out", out, "--size", str(S), "--allow-outside-root"])
    rows = {r["id"]: r for r in P.read_dataset_meta(out)}
    secret = np.asarray(Image.open(tree["secret"]), np.float64)
    got = P.load_pixels(out, [rows["out"]])[0, 0].astype(np.float64)
    want = (secret - secret.min()) / (secret.max() - secret.min()) * 65535    # same size: min-max to 16 bits only
    assert np.abs(want - got).max() <= 1.0                     # the pipeline quantises in float32: within a level


# ---------------------------------------------------------------------------------------------------------------
# metrics.py --allow-random-weights: seeded weights, cache keyed by the weights' hash (issue 19 item 12)


def _fd_run(tree, tmp_path, name, seed):
    torch.manual_seed(seed)                                      # a different global RNG state before each run
    out = tmp_path / f"{name}.json"
    M.main(["--real", str(tree["tmp"] / "real"), "--fake", str(tree["tmp"] / "fake"), "--features", "xrv",
            "--metrics", "fd", "--allow-random-weights", "--offline", "--cache-dir", str(tmp_path / name),
            "--workers", "0", "--device", "cpu", "--out", str(out)])
    return json.load(open(out))["features"]["xrv"]


def test_random_weights_two_clean_runs_give_the_same_fd(tree, tmp_path):
    a, b = _fd_run(tree, tmp_path, "one", 1), _fd_run(tree, tmp_path, "two", 2)
    assert a["random_weights"] and a["random_weights_seed"] == M.RANDOM_WEIGHTS_SEED
    assert a["weights_sha256"] == b["weights_sha256"]
    assert np.isfinite(a["fd"]) and a["fd"] == pytest.approx(b["fd"], rel=1e-9)   # same weights, same arithmetic


def test_feature_cache_is_not_shared_between_weight_sets(tree, tmp_path):
    ex = M.get_extractor("xrv", allow_random_weights=True, offline=True)
    other = copy.deepcopy(ex)                                    # another random init, also labelled 'random'
    with torch.no_grad():
        other.net.features.conv0.weight.mul_(-1.0)
    assert other.weights == ex.weights == "random"
    images, cache = M.ImageSet(str(tree["tmp"] / "real")), str(tmp_path / "cache")
    f1, _, s1 = M.extract_features(images, ex, cache_dir=cache, progress=False, workers=0)
    f2, _, s2 = M.extract_features(images, other, cache_dir=cache, progress=False, workers=0)
    f3, _, s3 = M.extract_features(images, ex, cache_dir=cache, progress=False, workers=0)
    assert (s1, s2, s3) == ("miss", "miss", "hit")               # the second weight set did not read the first's
    assert not np.allclose(f1, f2) and np.array_equal(f1, f3)

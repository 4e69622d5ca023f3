"""Columnar metadata (issue 21 item 1): DIR/meta_index.safetensors that prep_data.py writes beside meta.csv, and
rectified_flow.py's CXRData, which keeps arrays instead of a dict per row. The reference is the per-row path the
scripts used before (read_meta's dicts coded by encode_row, shard and index read with int()): the index path and
the meta.csv path must give exactly its codes, shards, indices and rows, hence the same batches and losses.
Cheap: the 32 px phantom of conftest.py (512 rows), folders sharing its shards through a link, 2 training steps."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

import prep_data
import rectified_flow as rf

SMALL = ["--hidden", "32", "--depth", "1", "--heads", "2", "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9",
         "--log-every", "1", "--sample-every", "0", "--max-steps", "2"]


def copy_folder(src, dst, index=True):
    """meta.csv and info.json copied, shards/ linked (the pixels are never written), the index copied or not."""
    os.makedirs(dst)
    for name in ("meta.csv", "info.json") + ((rf.INDEX_FILE,) if index else ()):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    os.symlink(os.path.abspath(os.path.join(src, "shards")), os.path.join(dst, "shards"))
    return dst


def reference(folder, split):
    """The per-row path: (codes [n, 19] float32, shard [n], index [n], ids) from read_meta and encode_row."""
    rows, _ = rf.read_meta(os.path.join(folder, "meta.csv"), split=split)
    with open(os.path.join(folder, "info.json")) as f:
        datasets = json.load(f)["datasets"]
    cond = torch.tensor([rf.encode_row(r, datasets, "ref") for r in rows])
    return cond, np.array([int(r["shard"]) for r in rows]), np.array([int(r["index"]) for r in rows]), rows


def same(a, b):
    """Tensors equal value for value, NaN (a missing age) equal to NaN."""
    return a.shape == b.shape and torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0)) and \
        torch.equal(a.isnan(), b.isnan())


def rewrite_meta(folder, change):
    """meta.csv rewritten with change(rows) (a list of dicts); the index beside it is left as it was."""
    rows, columns = rf.read_meta(os.path.join(folder, "meta.csv"))
    rf.write_csv(os.path.join(folder, "meta.csv"), change(rows), columns)


def test_index_and_meta_csv_paths_equal_the_per_row_path(tmp_path, phantom_dir, capsys):
    assert os.path.isfile(os.path.join(phantom_dir, rf.INDEX_FILE))       # make_phantom wrote it
    bare = copy_folder(phantom_dir, str(tmp_path / "bare"), index=False)
    for split in ("train", "test", None):
        cond, shard, index, rows = reference(phantom_dir, split)
        a, b = rf.CXRData(phantom_dir, split=split), rf.CXRData(bare, split=split)
        assert (a.source, b.source) == ("index", "meta.csv")
        for d in (a, b):
            assert same(d.cond, cond) and d.cond.dtype == torch.float32
            assert np.array_equal(d.shard, shard) and np.array_equal(d.index, index) and len(d) == len(rows)
            assert [r["id"] for r in d.rows] == [r["id"] for r in rows]  # edit's full rows, read on demand
        assert bool(cond[:, 18].isnan().any()) or split == "test"          # the phantom has missing ages
    assert capsys.readouterr().err == ""                                 # a fresh index is read without a note
    # the arrays in the file are meta.csv's, split codes named in its metadata
    cols = rf.meta_arrays(os.path.join(bare, "meta.csv"), rf.CXRData(bare).datasets)
    got = rf.read_meta_index(phantom_dir, rf.CXRData(bare).datasets)
    for k in ("codes", "age", "shard", "index", "split"):
        assert got[k].dtype == cols[k].dtype and np.array_equal(got[k], cols[k], equal_nan=k == "age")
    assert got["splits"] == cols["splits"] and set(got["splits"]) == {"train", "val", "test"}


def test_training_batches_and_losses_equal_on_both_paths(tmp_path, phantom_dir):
    bare = copy_folder(phantom_dir, str(tmp_path / "bare"), index=False)
    a, b = rf.CXRData(phantom_dir), rf.CXRData(bare)
    for step in (0, 1, 70):                                               # step 70: a later epoch's permutation
        rows = rf.batch_rows(step, len(a), 8, 0, 8, seed=0)
        assert torch.equal(a.load(rows), b.load(rows)) and torch.equal(a.cond[rows], b.cond[rows])
    logs = []
    for data, name in ((phantom_dir, "a"), (bare, "b")):
        out = str(tmp_path / name)
        rf.main(["--data", data, "--out", out, *SMALL])
        with open(os.path.join(out, "log.jsonl")) as f:
            logs.append([json.loads(line)["loss"] for line in f])
    assert len(logs[0]) == 2 and logs[0] == logs[1]                       # the same computation: equal bits


def test_stale_or_corrupt_index_is_ignored_and_rebuilt(tmp_path, phantom_dir, capsys):
    d = copy_folder(phantom_dir, str(tmp_path / "d"))
    first = rf.CXRData(d).rows[0]["id"]
    rewrite_meta(d, lambda rows: [{**r, "sex": "M" if r["sex"] == "F" else "F"} if r["id"] == first else r
                                  for r in rows])
    data = rf.CXRData(d)                                                  # the edit is seen, not the stale index
    assert data.source == "meta.csv" and same(data.cond, reference(d, "train")[0])
    assert "another meta.csv (edited since); ignored, reading meta.csv" in capsys.readouterr().err
    assert prep_data.main(["index", "--data", d]) is None                # the subcommand rebuilds it
    data = rf.CXRData(d)
    assert data.source == "index" and same(data.cond, reference(d, "train")[0])
    # info.json's datasets reordered: the index's dataset codes are not these; meta.csv is coded again
    with open(os.path.join(d, "info.json")) as f:
        info = json.load(f)
    info["datasets"] = info["datasets"][::-1]
    with open(os.path.join(d, "info.json"), "w") as f:
        json.dump(info, f)
    data = rf.CXRData(d)
    assert data.source == "meta.csv" and same(data.cond, reference(d, "train")[0])
    assert "dataset codes of" in capsys.readouterr().err
    prep_data.main(["index", "--data", d])
    # a truncated file, and a whole file whose codes leave FORMAT.md §5: notes, and the meta.csv path
    path = os.path.join(d, rf.INDEX_FILE)
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[: len(whole) // 2])
    assert rf.CXRData(d).source == "meta.csv" and "not a readable index" in capsys.readouterr().err
    with open(path, "wb") as f:
        f.write(whole)
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    with safe_open(path, "numpy") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["codes"][0, 15] = 9                                           # race code 9: no such race
    save_file(tensors, path, metadata=meta)
    data = rf.CXRData(d)
    assert data.source == "meta.csv" and same(data.cond, reference(d, "train")[0])
    assert "codes outside FORMAT.md §5" in capsys.readouterr().err


def refused(fn, pattern):
    """fn() stops with one line matching `pattern`. -> the line."""
    with pytest.raises(SystemExit) as e:
        fn()
    message = str(e.value.code)
    assert "\n" not in message and re.search(pattern, message), message
    return message


@pytest.mark.parametrize("row, change, message", [
    (3, {"race": "OTHER"}, r"row id={id}: race='OTHER'; expected one of \['ASIAN', 'BLACK', 'WHITE'\]"),
    (5, {"age": "130"}, r"row id={id}: age '130'; expected years in 0-120"),
    (6, {"id": "../x"}, r"id '../x' is not usable as a file name"),
    (7, {"shard": "2.5"}, r"row '{id}' has shard '2.5', index '\d+'; expected integers"),
])
def test_bad_values_are_refused_by_the_index_and_by_training(tmp_path, phantom_dir, row, change, message):
    d = copy_folder(phantom_dir, str(tmp_path / "d"), index=False)
    rewrite_meta(d, lambda rows: [{**r, **change} if k == row else r for k, r in enumerate(rows[:16])])
    ident = rf.read_meta(os.path.join(phantom_dir, "meta.csv"))[0][row]["id"]
    pattern = message.replace("{id}", ident)
    refused(lambda: prep_data.main(["index", "--data", d]), pattern)
    assert not os.path.exists(os.path.join(d, rf.INDEX_FILE))
    refused(lambda: rf.CXRData(d, split=None), pattern)


def test_duplicate_ids_and_shard_mismatches_stop_at_start_on_the_index_path(tmp_path, phantom_dir):
    d = copy_folder(phantom_dir, str(tmp_path / "d"), index=False)
    rewrite_meta(d, lambda rows: rows[:16] + rows[:1])
    refused(lambda: prep_data.main(["index", "--data", d]), r"meta.csv: id '\w+' appears more than once")
    first = rf.read_meta(os.path.join(phantom_dir, "meta.csv"))[0][:16]
    k = next(k for k, r in enumerate(first) if r["split"] == "train" and k > 0)   # not the first row of its split
    for n, (change, message) in enumerate((
            ({"shard": "7"}, r"meta.csv: row '{id}' names shard 7, which does not exist"),
            ({"index": "99999"}, r"meta.csv: row '{id}' has index 99999; shard 0 holds rows 0\.\."))):
        columns = rf.read_meta(os.path.join(phantom_dir, "meta.csv"))[1]
        rf.write_csv(os.path.join(d, "meta.csv"), [{**r, **change} if j == k else r for j, r in enumerate(first)],
                     columns)
        prep_data.main(["index", "--data", d])                             # the index holds rows, not shards
        assert rf.read_meta_index(d, rf.read_json(os.path.join(d, "info.json"), "")["datasets"]) is not None
        said = refused(lambda: rf.CXRData(d), message.replace("{id}", first[k]["id"]))
        bare = copy_folder(d, str(tmp_path / f"bare{n}"), index=False)
        assert refused(lambda: rf.CXRData(bare), ".") == said.replace(d, bare)   # the meta.csv path: same words


def test_vae_data_rows_on_both_paths_and_without_variable_columns(tmp_path, phantom_dir):
    import vae
    bare = copy_folder(phantom_dir, str(tmp_path / "bare"), index=False)
    for split in ("train", ""):
        _, shard, index, rows = reference(phantom_dir, split or None)
        a, b = vae.CXRData(phantom_dir, split), vae.CXRData(bare, split)
        assert (a.source, b.source) == ("index", "meta.csv")
        for d in (a, b):
            assert np.array_equal(d.shard, shard) and np.array_equal(d.index, index)
            assert [r["id"] for r in d.rows] == [r["id"] for r in rows]
            assert list(np.flatnonzero(d.in_split("test"))) == [k for k, r in enumerate(rows) if r["split"] == "test"]
        assert torch.equal(a.load([0, 5]), b.load([0, 5]))
    # the VAE reads pixels only: a meta.csv without the variable columns is still a VAE dataset (as before)
    rows, columns = rf.read_meta(os.path.join(bare, "meta.csv"))
    rf.write_csv(os.path.join(bare, "meta.csv"), rows, [c for c in columns if c not in ("sex", "age", "Edema")])
    assert np.array_equal(vae.CXRData(bare, "train").index, reference(phantom_dir, "train")[2])
    refused(lambda: rf.CXRData(bare), r"no column\(s\) Edema, sex, age;")     # the flow model needs them


# ------------------------------------------------------------------------------------------------------ flow_scm.py


def scm_reference(folder, split):
    """flow_scm.py's per-row path before issue 21: read_rows' dicts, dataset_names, encode_rows -> (datasets,
    float32 [n, 19] in VARIABLES order)."""
    import flow_scm as fs
    rows, _ = fs.read_rows(folder, split)
    datasets = fs.dataset_names(folder, rows)
    codes = fs.encode_rows(rows, datasets, f"{folder}/meta.csv")
    return datasets, torch.stack([torch.from_numpy(codes[v]).float() for v in fs.VARIABLES], 1)


def test_flow_scm_codes_and_batches_equal_the_per_row_path(tmp_path, phantom_dir):
    import flow_scm as fs
    bare = copy_folder(phantom_dir, str(tmp_path / "bare"), index=False)
    nameless = copy_folder(phantom_dir, str(tmp_path / "nameless"), index=False)     # no info.json: names sorted
    os.remove(os.path.join(nameless, "info.json"))
    shutil.copy(os.path.join(phantom_dir, rf.INDEX_FILE), nameless)                  # an index it cannot check
    for split in ("train", "test", None):
        datasets, want = scm_reference(phantom_dir, split)
        for folder, source in ((phantom_dir, "index"), (bare, "meta.csv"), (nameless, "meta.csv")):
            got_datasets, codes, got_source = fs.read_codes(folder, split)
            assert (got_source, got_datasets) == (source, datasets) and codes.dtype == np.float32
            assert same(torch.from_numpy(codes), want)
        assert bool(want[:, 18].isnan().any()) or split == "test"          # missing ages are in it
    # case-insensitive values, labels written as floats, a dataset name in another case: encode's rules
    rewrite_meta(bare, lambda rows: [{**r, "sex": r["sex"].lower(), "view": r["view"].lower(),
                                      "dataset": r["dataset"].upper(),
                                      "Edema": {"1": "1.0", "0": "0.0"}.get(r["Edema"], r["Edema"])} for r in rows])
    assert same(torch.from_numpy(fs.read_codes(bare, "train")[1]), scm_reference(phantom_dir, "train")[1])
    # the training batches: the same rows at every step, so the same losses (2 steps, both paths)
    logs = []
    for folder, name in ((phantom_dir, "a"), (copy_folder(phantom_dir, str(tmp_path / "b"), index=False), "b")):
        out = str(tmp_path / ("run-" + name))
        fs.main(["--size", "tiny", "--data", folder, "--out", out, "--max-steps", "2", "--batch-size", "16",
                 "--log-every", "1", "--device", "cpu"])
        with open(os.path.join(out, "log.jsonl")) as f:
            logs.append([json.loads(line)["loss_by_var"] for line in f])
    assert len(logs[0]) == 2 and logs[0] == logs[1]


@pytest.mark.parametrize("change, message", [
    ({"race": "other"}, r"meta.csv row id='{id}': race='other'; expected one of \['ASIAN', 'BLACK', 'WHITE'\]"),
    ({"age": "130"}, r"meta.csv row id='{id}': age '130'; expected years in 0-120"),
    ({"dataset": "nowhere"}, r"meta.csv row id='{id}': dataset='nowhere'; expected one of \['phantom-a'"),
    ({"id": "../x"}, r"id '../x' is not usable as a file name"),
])
def test_flow_scm_bad_values_are_refused_in_the_words_of_the_per_row_path(tmp_path, phantom_dir, change, message):
    import flow_scm as fs
    d = copy_folder(phantom_dir, str(tmp_path / "d"), index=False)
    rows = rf.read_meta(os.path.join(phantom_dir, "meta.csv"))[0][:16]
    k = next(k for k, r in enumerate(rows) if r["split"] == "train" and k > 2)
    rewrite_meta(d, lambda rows: [{**r, **change} if j in (k, k + 1) else r for j, r in enumerate(rows[:16])])
    old = refused(lambda: scm_reference(d, "train"), message.replace("{id}", rows[k]["id"]))
    assert refused(lambda: fs.read_codes(d, "train"), ".") == old


# ---------------------------------------------------------------------------------------------------- downstream.py


def ds_reference(folder, split, labels, policy, views=(), datasets=()):
    """downstream.py's per-row Source before issue 21: read_meta's dicts of `split`, the --views filter, targets
    by var_value row by row, shard and index by int(). -> (rows, targets, shard, index)."""
    import downstream as D
    rows, _ = D.read_meta(os.path.join(folder, "meta.csv"), split=split)
    rows = [r for r in rows if (r.get("view") or "").upper() in views] if views else rows
    y = np.array([[D.var_value(v, r.get(v), policy, "ref", datasets) for v in labels] for r in rows], np.float64)
    return rows, y.reshape(len(rows), len(labels)), [int(r["shard"]) for r in rows], [int(r["index"]) for r in rows]


def test_downstream_columns_and_targets_equal_the_per_row_path(tmp_path, phantom_dir):
    import downstream as D
    bare = copy_folder(phantom_dir, str(tmp_path / "bare"), index=False)
    names = json.load(open(os.path.join(phantom_dir, "info.json")))["datasets"]
    variables = D.LABELS + D.META
    for split, views, policy in (("train", "", "ignore"), ("test", "PA,ap", "ones"), ("all", "", "zeros")):
        cfg = D.Config(task="predict-metadata", views=views, uncertain=policy)
        want = ds_reference(phantom_dir, None if split == "all" else split, variables, policy,
                            views.upper().split(",") if views else (), names)
        rows, y = want[:2]
        for folder, source in ((phantom_dir, "index"), (bare, "meta.csv")):
            s = D.Source(f"x={folder}:{split}", cfg)
            assert s.source == source and len(s) == len(rows)
            assert [r["id"] for r in s.rows] == [r["id"] for r in rows]              # the dicts, on demand
            assert list(s.shard) == want[2] and list(s.index) == want[3]
            assert np.array_equal(s.targets(variables, policy, names), y, equal_nan=True)
            half = s.subset(np.arange(0, len(s), 2))
            assert [r["id"] for r in half.rows] == [r["id"] for r in rows[::2]]
            assert np.array_equal(half.targets(variables, policy, names), y[::2], equal_nan=True)
            assert torch.equal(half.images([0, 1]), s.images([0, 2]))
    # cells in another case, labels written as floats: var_value's rules, as before
    rewrite_meta(bare, lambda rows: [{**r, "sex": r["sex"].lower(), "view": r["view"].lower(),
                                      "Edema": {"1": "1.0", "0": "0.0"}.get(r["Edema"], r["Edema"])} for r in rows])
    cfg = D.Config(task="predict-metadata", views="PA")
    want = ds_reference(phantom_dir, "train", variables, "ignore", ["PA"], names)[1]
    assert np.array_equal(D.Source(f"x={bare}:train", cfg).targets(variables, "ignore", names), want, equal_nan=True)
    # a bad cell: the per-row path's words, at its first row
    rewrite_meta(bare, lambda rows: [{**r, "Edema": "2"} if k in (5, 9) else r for k, r in enumerate(rows)])
    ident = rf.read_meta(os.path.join(bare, "meta.csv"))[0][5]["id"]
    refused(lambda: D.Source(f"x={bare}:all", D.Config()).targets(["Edema"], "ignore"),
            rf"meta.csv row {ident} Edema: Edema '2'; expected 1, 0, -1 or empty")
    # the training batches on both paths: the same rows of the stream, images and targets at each step
    cfg = D.Config(task="classify", batch_size=8)
    labels = ["Cardiomegaly", "Pleural Effusion"]
    pools = [D.Pool([D.Source(f"real={folder}:train", cfg)], cfg, labels, 32) for folder in (phantom_dir, bare)]
    streams = [D.TrainStream(pool, cfg, 0) for pool in pools]
    for step in (0, 1, 60):                                               # step 60: a later epoch's permutation
        rows = [stream.rows(step).numpy() for stream in streams]
        assert np.array_equal(rows[0], rows[1])
        assert torch.equal(pools[0].fetch(rows[0]), pools[1].fetch(rows[1]))
        assert np.array_equal(pools[0].y[rows[0]], pools[1].y[rows[1]], equal_nan=True)


# -------------------------------------------------------------------------------------------------------- benchmark

BENCH = """import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath({script!r})))
import importlib.util
spec = importlib.util.spec_from_file_location("script", {script!r})
script = importlib.util.module_from_spec(spec)
sys.modules["script"] = script                         # vae.py's dataclasses (postponed annotations) look it up
spec.loader.exec_module(script)
import torch
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
D = {data!r}
rss, t0, c0 = status("VmRSS:"), time.time(), time.process_time()
{load}
print(f"{{time.time() - t0:.1f}} {{time.process_time() - c0:.1f}} {{status('VmRSS:') - rss:.0f}} "
      f"{{status('VmHWM:') - rss:.0f}} {{n}} {{source}}")
"""
# What each script's training keeps of the train split: `data` (held until the numbers are printed), its row count
# `n` and `source`. Before (old): flow_scm.py's train() kept read_rows' dicts, encode_rows' float64 arrays and
# their float32 copies; after: read_codes' one float32 array. downstream.py: the Source of its --train folder.
LOADS = {
    "rectified_flow": ("data = script.CXRData(D, space='pixel')\n"
                       "n, source = len(data), getattr(data, 'source', 'rows')", None),
    "vae": ("data = script.CXRData(D, 'train')\nn, source = len(data), getattr(data, 'source', 'rows')", None),
    "flow_scm": ("rows = script.read_rows(D, 'train')[0]\n"
                 "codes = script.encode_rows(rows, script.dataset_names(D, rows), D + '/meta.csv')\n"
                 "data = rows, codes, {v: torch.from_numpy(a).float() for v, a in codes.items()}\n"
                 "n, source = len(rows), 'rows'",
                 "datasets, codes, source = script.read_codes(D, 'train')\n"
                 "data = torch.from_numpy(codes)\nn = len(codes)"),
    "downstream": ("cfg = script.Config(task='classify')\n"
                   "data = script.Source('real=' + D + ':train', cfg)\n"
                   "data.y = data.targets(script.resolve_labels(cfg), cfg.uncertain)\n"
                   "n, source = len(data), getattr(data, 'source', 'rows')", None),
}


def bench(data, old_script, name="rectified_flow"):
    """Load time (wall, CPU) and memory (resident after, peak) of what `name`.py's training keeps of the train split
    (LOADS; rectified_flow: CXRData with space='pixel'), each in a fresh process, in one run: the script before
    issue 21 (`old_script`, a dict per row), the index, and meta.csv alone (a folder beside `data` whose meta.csv,
    info.json and shards are links: no index)."""
    import subprocess
    import sys
    bare = data.rstrip("/") + "-noindex"
    if not os.path.isdir(bare):
        os.makedirs(bare)
        for entry in ("meta.csv", "info.json", "shards"):
            os.symlink(os.path.abspath(os.path.join(data, entry)), os.path.join(bare, entry))
    new = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), f"{name}.py")
    old_load, new_load = LOADS[name]
    print("path            wall s  CPU s  +RSS MB  +peak MB  rows  source")
    for label, script, folder, load in (("before (rows)", old_script, data, old_load), ("index", new, data, new_load),
                                        ("meta.csv only", new, bare, new_load)):
        code = BENCH.format(script=script, data=folder, load=load or old_load)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise SystemExit(f"{label}: {out.stderr.strip().splitlines()[-1]}")
        wall, cpu, rss, peak, n, source = out.stdout.split()
        print(f"{label:14s}  {float(wall):6.1f}  {float(cpu):5.1f}  {int(rss):7d}  {int(peak):8d}  {n}  {source}",
              flush=True)


def loader(folder, n=512, seconds=5.0):
    """Issue 21 item 2: images per second that one thread reads the way CXRData.load does (per-row get_slice on a
    memory-mapped shard, then float32 in model units), at 512 px uint16 ([1, 512, 512]) and at its latent size
    (vae.py f = 8, 16 channels: float32 [16, 64, 64]); cold (each shard's pages dropped from the page cache with
    posix_fadvise DONTNEED before the pass: only these files, nothing else on the machine) and warm (read once
    before). Random rows in batches of 32, as a training step draws them. Writes two shards of n rows in `folder`."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    cases = (("pixels 512 px uint16", "images", (1, 512, 512), np.uint16),
             ("latents 16x64x64 float32", "latents", (16, 64, 64), np.float32))
    print(f"{'data':26s}  {'MB/image':>8s}  {'cold img/s':>10s}  {'warm img/s':>10s}  img per CPU-s cold, warm "
          f"(one thread, batches of 32)")
    for name, key, shape, dtype in cases:
        path = os.path.join(folder, f"{key}.safetensors")
        if not os.path.isfile(path):
            x = rng.integers(0, 65535, (n, *shape)).astype(dtype) if dtype == np.uint16 else \
                rng.standard_normal((n, *shape), dtype=np.float32)
            save_file({key: x}, path)
            del x
        rates = []
        for cold in (True, False):
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd) if cold else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED) if cold else None
            os.close(fd)
            f = safe_open(path, "pt")
            done, t0, c0 = 0, time.time(), time.process_time()
            order = rng.permutation(n)
            while done < n or (not cold and time.time() - t0 < seconds):   # cold: one pass; warm: `seconds`
                idx = order[done % n:done % n + 32]
                xs = [f.get_slice(key)[int(j):int(j) + 1] for j in idx]
                x = torch.cat(xs).float()
                x = (x + 0.5) / 32768 - 1 if dtype == np.uint16 else x
                done += len(idx)
            rates.append((done / (time.time() - t0), done / max(time.process_time() - c0, 1e-9)))
        mb = np.prod(shape) * np.dtype(dtype).itemsize / 2 ** 20
        print(f"{name:26s}  {mb:8.3f}  {rates[0][0]:10.0f}  {rates[1][0]:10.0f}  {rates[0][1]:.0f}, {rates[1][1]:.0f}",
              flush=True)


if __name__ == "__main__":  # python tests/test_meta_index.py DATA OLD_SCRIPT [NAME: a key of LOADS] | loader FOLDER
    import sys
    import time
    if sys.argv[1] == "loader":
        loader(sys.argv[2])
    else:
        bench(*sys.argv[1:4])

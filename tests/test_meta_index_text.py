"""Columnar metadata in the text-conditioned scripts (issue 21 item 1): dit_text2img.py's TextImageData,
controlnet.py's ControlData and ldm_multicond.py's MultiCondData keep arrays (meta_columns: the index or meta.csv)
and what training needs of the reports and boxes (lengths, token ids, the text cache's token counts, flat box arrays,
17-d labels), never a dict per row. The reference is the per-row path the script used before (read_meta's dicts,
the filters of roentgen §3 and the No Finding cap applied row by row): both new paths must give exactly its rows,
token counts, token ids and text features, hence the same batches and losses. Cheap: the 32 px phantom of
conftest.py (512 rows), folders sharing its shards and text cache through links, a tiny BERT, 2 training steps."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

import controlnet as cn
import dit_text2img as dt
import ldm_multicond as lm
from test_dit_text2img import bert  # noqa: F401  (the tiny random BERT fixture, a vocabulary of the phantom words)

SMALL = ["--hidden", "32", "--depth", "1", "--heads", "2", "--batch-size", "8", "--lr", "2e-3", "--ema", "0.9",
         "--log-every", "1", "--sample-every", "0", "--max-steps", "2"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory, phantom_dir, bert):  # noqa: F811
    """(a folder with the index and a text cache of the tiny BERT, the same folder without the index)."""
    d = str(tmp_path_factory.mktemp("text") / "indexed")
    os.makedirs(d)
    for name in ("meta.csv", "info.json", dt.INDEX_FILE):
        shutil.copy(os.path.join(phantom_dir, name), os.path.join(d, name))
    os.symlink(os.path.abspath(os.path.join(phantom_dir, "shards")), os.path.join(d, "shards"))
    dt.main(["embed-text", "--data", d, "--text-encoder", bert, "--name", "bert"])
    bare = d + "-bare"
    os.makedirs(bare)
    for name in ("meta.csv", "info.json", "shards", "text"):
        os.symlink(os.path.join(d, name), os.path.join(bare, name))
    return d, bare


def cached_text(folder, row):
    """(hidden states, token count) of a meta.csv row in the folder's text cache, read straight from its shard file
    (FORMAT.md text caches: text/<name>/shards/NNNNN.safetensors, `hidden` and `lengths` at the row's index)."""
    path = os.path.join(folder, "text", "bert", "shards", f"{int(row['shard']):05d}.safetensors")
    with safe_open(path, "pt") as f:
        return f.get_tensor("hidden")[int(row["index"])], int(f.get_tensor("lengths")[int(row["index"])])


def dit_reference(folder, cfg, tok=None):
    """The per-row path (TextImageData before issue 21): -> (kept rows as dicts, their token counts)."""
    rows = dt.read_meta(os.path.join(folder, "meta.csv"), required=("report", "shard", "index"), split="train")[0]
    if tok is None:
        n_tokens = []
        for r in rows:
            with safe_open(os.path.join(folder, "text", "bert", "shards", f"{int(r['shard']):05d}.safetensors"),
                           "pt") as f:
                n_tokens.append(int(f.get_tensor("n_tokens")[int(r["index"])]))
    else:
        n_tokens = dt.tokenize(tok, [r["report"] for r in rows], cfg.max_length)[2].tolist()
    limit = cfg.max_length if cfg.max_tokens < 0 else cfg.max_tokens
    keep = [i for i, r in enumerate(rows) if len(r["report"].strip()) >= cfg.min_chars
            and (not limit or n_tokens[i] <= limit)]
    nf = [i for i in keep if rows[i].get("No Finding", "").strip() in ("1", "1.0")]
    if cfg.cap_no_finding:
        other = len(keep) - len(nf)
        cap = min(len(nf), int(cfg.cap_no_finding * other / (1 - cfg.cap_no_finding)))
        chosen = set(nf[j] for j in torch.randperm(len(nf), generator=dt.generator(cfg.seed, 4))[:cap].tolist())
        keep = [i for i in keep if i not in set(nf) or i in chosen]
    return [rows[i] for i in keep], [n_tokens[i] for i in keep]


def test_dit_rows_token_counts_and_text_equal_the_per_row_path(texts, bert):  # noqa: F811
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(bert)
    indexed, bare = texts
    window = 24                                                   # shorter than about half the phantom's reports
    for extra, use_tok in (({}, False), ({"min_chars": 60, "max_tokens": 20, "cap_no_finding": 0.3}, False),
                           ({"max_length": window, "max_tokens": -1}, True), ({"max_length": window}, True)):
        ref, n_tok = dit_reference(indexed, dt.Config(data=indexed, **extra), tok if use_tok else None)
        assert 0 < len(ref) and (len(ref) < 407) == ("max_tokens" in extra)   # of 407: the filters drop some
        for folder, source in ((indexed, "index"), (bare, "meta.csv")):
            data = dt.TextImageData(dt.Config(data=folder, **extra), tok if use_tok else None)
            assert data.source == source and len(data) == len(ref)
            assert dt.meta_ids(os.path.join(folder, "meta.csv"), data.position) == [r["id"] for r in ref]
            assert np.array_equal(data.shard, [int(r["shard"]) for r in ref])
            assert np.array_equal(data.index, [int(r["index"]) for r in ref])
            assert data.n_tokens.tolist() == n_tok
            per_row = [k for k, v in vars(data).items() if isinstance(v, (list, tuple, dict)) and len(v) >= len(data)]
            assert per_row == []                                  # no container of a value a row (rows: unread)
            batch = dt.batch_rows(3, len(data), 8, 0, 8, seed=0)  # a training batch: the order is len's alone
            want = torch.cat([dt.TextImageData.load(data, [i]) for i in batch])
            assert torch.equal(data.load(batch), want)
            if use_tok:                                           # the ids tokenize gives the reports, no strings
                ids, lengths = dt.tokenize(tok, [ref[int(i)]["report"] for i in batch], window)[:2]
                got = data.token_ids(batch)
                assert torch.equal(got[0], ids) and torch.equal(got[1], lengths)
            else:                                                 # the cache rows of the same (shard, index)
                feats, lengths = data.load_text(batch)
                for j, i in enumerate(batch.tolist()):
                    h, n = cached_text(folder, ref[i])
                    assert int(lengths[j]) == n and torch.equal(feats[j, :h.shape[0]], h.float())
            assert data.reports(batch[:3]) == [ref[int(i)]["report"] for i in batch[:3]]   # grid labels
            assert [r["id"] for r in data.rows] == [r["id"] for r in ref]                  # read on demand


def test_dit_training_losses_equal_on_both_paths(tmp_path, texts):
    logs = []
    for folder, name in zip(texts, "ab"):
        out = str(tmp_path / name)
        dt.main(["--data", folder, "--out", out, *SMALL, "--cap-no-finding", "0.3"])
        with open(os.path.join(out, "log.jsonl")) as f:
            logs.append([json.loads(line)["loss"] for line in f])
    assert len(logs[0]) == 2 and logs[0] == logs[1]                       # the same computation: equal bits


def test_controlnet_rows_boxes_masks_and_text_equal_the_per_row_path(texts, bert):  # noqa: F811
    indexed, bare = texts
    dcfg = dt.Config(space="pixel", in_channels=1, image_size=32, text_encoder=os.path.abspath(bert), max_length=120,
                     text_dim=32)
    for cond_type, min_chars, split in (("box", 60, "train"), ("mask", 7, "test")):
        cfg = cn.Config(data=indexed, cond_type=cond_type, min_chars=min_chars)
        # the per-row path (ControlData before issue 21): read_meta's dicts, the length filter, boxes parsed a row
        need = ("report", "shard", "index") + (("boxes",) if cond_type == "box" else ())
        ref = [r for r in cn.read_meta(os.path.join(indexed, "meta.csv"), required=need, split=split)[0]
               if len(r["report"].strip()) >= min_chars]
        boxes = [cn.parse_boxes(cn.read_boxes_cell(r["boxes"], "ref"), "ref") for r in ref]
        assert 0 < len(ref) < (407 if split == "train" else 512) and sum(map(len, boxes)) > 0
        loaded = []
        for folder, source in ((indexed, "index"), (bare, "meta.csv")):
            data = cn.ControlData(cn.Config(**{**cn.asdict(cfg), "data": folder}), dcfg, split)
            assert data.source == source and len(data) == len(ref)
            assert dt.meta_ids(os.path.join(folder, "meta.csv"), data.position) == [r["id"] for r in ref]
            assert np.array_equal(data.shard, [int(r["shard"]) for r in ref])
            assert np.array_equal(data.index, [int(r["index"]) for r in ref])
            batch = dt.batch_rows(2, len(data), 8, 0, 8, seed=0)
            maps = data.load_cond(batch)
            if cond_type == "box":
                assert data.cond_names == sorted({c for b in boxes for c in b})
                assert [data.boxes(i) for i in range(len(data))] == [{c: v for c, v in b.items() if v} for b in boxes]
                want = np.stack([cn.rasterize_boxes(boxes[int(i)], data.cond_names, 32, strict=False) for i in batch])
                assert np.array_equal(maps.numpy(), want) and maps.sum() > 0
            else:                                                 # the masks at each row's (shard, index)
                with safe_open(os.path.join(folder, "shards", "00000.safetensors"), "np") as f:
                    want = np.stack([f.get_slice("masks")[int(ref[int(i)]["index"])] for i in batch]) > 0
                assert all(r["shard"] == "0" for r in ref) and np.array_equal(maps.numpy(), want.astype(np.uint8))
            assert data.read_column("report", batch[:3]) == [ref[int(i)]["report"] for i in batch[:3]]
            per_row = [k for k, v in vars(data).items() if isinstance(v, (list, tuple, dict)) and len(v) >= len(data)]
            assert per_row == []
            loaded.append((data.load(batch), *data.load_text(batch), maps))
        assert all(torch.equal(a, b) for a, b in zip(*loaded))        # the same batch on both paths


@pytest.fixture(scope="module")
def ldm_texts(tmp_path_factory, phantom_dir, bert):  # noqa: F811
    """(a folder whose rows share studies and patients, with its index and ldm_multicond.py's text and image caches,
    the same folder without the index)."""
    import prep_data
    from transformers import ViTConfig, ViTModel
    d = str(tmp_path_factory.mktemp("ldm") / "indexed")
    os.makedirs(d)
    shutil.copy(os.path.join(phantom_dir, "info.json"), os.path.join(d, "info.json"))
    os.symlink(os.path.abspath(os.path.join(phantom_dir, "shards")), os.path.join(d, "shards"))
    rows, columns = lm.read_meta(os.path.join(phantom_dir, "meta.csv"))
    for k in range(0, 120, 2):                                    # pairs of one study, across splits too
        rows[k + 1]["study_id"] = rows[k]["study_id"]
    for k in range(120, 240, 3):                                  # triples of one patient, studies their own
        rows[k + 1]["patient_id"] = rows[k + 2]["patient_id"] = rows[k]["patient_id"]
    rows[241]["study_id"] = rows[242]["study_id"] = ""            # no study: the patient's, else itself
    rows[241]["patient_id"] = rows[243]["patient_id"]
    lm.write_csv(os.path.join(d, "meta.csv"), rows, columns)
    prep_data.main(["index", "--data", d])
    vit = str(tmp_path_factory.mktemp("vit"))
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=24, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=48)).save_pretrained(vit)
    lm.main(["embed-text", "--data", d, "--text-encoder", bert, "--name", "bert", "--max-length", "24"])
    lm.main(["embed-images", "--data", d, "--image-encoder", vit, "--name", "vit"])
    bare = d + "-bare"
    os.makedirs(bare)
    for name in ("meta.csv", "info.json", "shards", "text", "images"):
        os.symlink(os.path.join(d, name), os.path.join(bare, name))
    return d, bare


def ldm_reference(folder, split, cond_image):
    """The per-row path (MultiCondData and CondSource before issue 21): (split rows as dicts, labels [n, 17], each
    row's conditioning row as a dict)."""
    all_rows = lm.read_meta(os.path.join(folder, "meta.csv"), required=("split", "shard", "index"))[0]
    rows = [r for r in all_rows if r["split"] == split]
    labels = torch.tensor([lm.label_vector(r, "ref") for r in rows])
    studies, patients = {}, {}
    for r in all_rows:
        if r.get("study_id"):
            studies.setdefault(r["study_id"], []).append(r)
        if r.get("patient_id"):
            patients.setdefault(r["patient_id"], []).append(r)
    chosen = []
    for r in rows:
        c = r
        if cond_image == "same-study":
            for g in (studies.get(r.get("study_id"), []), patients.get(r.get("patient_id"), [])):
                others = sorted((o for o in g if o["id"] != r["id"]), key=lambda o: o["id"])
                if others:
                    c = others[0]
                    break
        chosen.append(c)
    return rows, labels, chosen


def test_ldm_rows_labels_conditioning_images_and_text_equal_the_per_row_path(ldm_texts, bert):  # noqa: F811
    indexed, bare = ldm_texts
    for split, cond_image in (("train", "same-study"), ("val", "same-image")):
        rows, labels, chosen = ldm_reference(indexed, split, cond_image)
        assert sum(c is not r for c, r in zip(rows, chosen)) > (20 if cond_image == "same-study" else -1)
        feats = []
        for c in chosen:                                          # the cache rows of each conditioning image
            with safe_open(os.path.join(indexed, "images", "vit", "shards", f"{int(c['shard']):05d}.safetensors"),
                           "pt") as f:
                feats.append(f.get_tensor("features")[int(c["index"])])
        feats = torch.stack(feats)
        loaded = []
        for folder, source in ((indexed, "index"), (bare, "meta.csv")):
            cfg = lm.Config(data=folder, modalities="L,I,T", max_length=24, cond_image=cond_image)
            data = lm.MultiCondData(cfg, split)
            assert data.source == source and len(data) == len(rows)
            assert dt.meta_ids(os.path.join(folder, "meta.csv"), data.position) == [r["id"] for r in rows]
            assert np.array_equal(data.shard, [int(r["shard"]) for r in rows])
            assert np.array_equal(data.index, [int(r["index"]) for r in rows])
            assert torch.equal(data.cond.labels, labels) and torch.equal(data.cond.img, feats)
            batch = lm.batch_rows(1, len(data), 8, 0, 8, seed=0)
            lab, img, text, lengths = data.cond.inputs(batch, "cpu")
            for j, i in enumerate(batch.tolist()):
                h, n = cached_text(folder, rows[i])
                assert int(lengths[j]) == n and torch.equal(text[j, :h.shape[0]], h.float())
            per_row = [k for k, v in vars(data).items() if isinstance(v, (list, tuple, dict)) and len(v) >= len(data)]
            assert per_row == []
            loaded.append((data.load(batch), lab, img, text, lengths))
        assert all(torch.equal(a, b) for a, b in zip(*loaded))        # the same batch on both paths


def test_ldm_bad_label_stops_with_label_vectors_words(tmp_path, phantom_dir):
    d = str(tmp_path / "d")
    os.makedirs(d)
    shutil.copy(os.path.join(phantom_dir, "info.json"), os.path.join(d, "info.json"))
    os.symlink(os.path.abspath(os.path.join(phantom_dir, "shards")), os.path.join(d, "shards"))
    rows, columns = lm.read_meta(os.path.join(phantom_dir, "meta.csv"))
    k = next(k for k, r in enumerate(rows) if r["split"] == "train" and k > 5)
    rows[k]["race"] = "OTHER"                                     # the first bad row: its id and words
    rows[k + 40]["Edema"] = "2"
    lm.write_csv(os.path.join(d, "meta.csv"), rows, columns)
    with pytest.raises(SystemExit) as want:
        lm.label_vector(rows[k], f"{os.path.join(d, 'meta.csv')} row id={rows[k]['id']}")
    with pytest.raises(SystemExit) as got:
        lm.MultiCondData(lm.Config(data=d, modalities="L"))
    assert str(got.value) == str(want.value) and "race='OTHER'" in str(got.value)


# -------------------------------------------------------------------------------------------------------- benchmark

BENCH = """import os, sys, time
sys.path.insert(0, {repo!r})
import importlib.util
spec = importlib.util.spec_from_file_location("script", {script!r})
script = importlib.util.module_from_spec(spec)
sys.modules["script"] = script                         # dataclasses with postponed annotations look it up
spec.loader.exec_module(script)
import dit_text2img
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
rss, t0, c0 = status("VmRSS:"), time.time(), time.process_time()
if {kind!r} == "controlnet":
    dcfg = dit_text2img.Config(space="pixel", in_channels=1, image_size={size}, text_encoder={encoder!r},
                               max_length=120, text_dim={width})
    data = script.ControlData(script.Config(data={data!r}, cond_type="box"), dcfg)
elif {kind!r} == "ldm":
    data = script.MultiCondData(script.Config(data={data!r}, modalities="L"))
else:
    data = script.TextImageData(script.Config(data={data!r}))
print(f"{{time.time() - t0:.1f}} {{time.process_time() - c0:.1f}} {{status('VmRSS:') - rss:.0f}} "
      f"{{status('VmHWM:') - rss:.0f}} {{len(data)}} {{getattr(data, 'source', 'rows')}}")
"""


def bench(big, old_script, kind="controlnet", work="/tmp/meta-index-text"):
    """Load time (wall, CPU) and memory (resident after, peak) of controlnet.py's ControlData (box conditions, the
    train split), dit_text2img.py's TextImageData (cached text, the train split) or ldm_multicond.py's MultiCondData
    (the labels alone, --modalities L: no caches; the train split) on the folder `big`, each in a
    fresh process, in one run: the script before issue 21 (`old_script`, a dict per row), the index, and meta.csv
    alone. The text cache: dit_text2img.py embed-text with a tiny random BERT of the folder whose rows `big` repeats
    (`big`/../src: the same shards, so every (shard, index) has its row), linked into folders under `work` beside
    links to `big`'s meta.csv, info.json, shards (and index): encoding a million reports is not what is measured."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(os.path.dirname(os.path.abspath(big)), "src")
    encoder, cache = os.path.join(work, "bert"), os.path.join(work, "src")
    if not os.path.isdir(cache):                                 # the text cache of the source rows, once
        from tiny_text import phantom_texts, write_tiny_bert
        write_tiny_bert(encoder, phantom_texts(), layers=2, max_positions=128)
        os.makedirs(cache)
        for name in ("meta.csv", "info.json", "shards"):
            os.symlink(os.path.join(src, name), os.path.join(cache, name))
        dt.main(["embed-text", "--data", cache, "--text-encoder", encoder, "--name", "bert"])
    folders = {}
    for name, index in (("m1", True), ("m1-noindex", False)):
        folders[name] = os.path.join(work, name)
        if not os.path.isdir(folders[name]):
            os.makedirs(folders[name])
            for f in ("meta.csv", "info.json", "shards") + ((dt.INDEX_FILE,) if index else ()):
                os.symlink(os.path.abspath(os.path.join(big, f)), os.path.join(folders[name], f))
            os.symlink(os.path.join(cache, "text"), os.path.join(folders[name], "text"))
    with open(os.path.join(big, "info.json")) as f:
        size = json.load(f)["size"]
    new = os.path.join(repo, {"controlnet": "controlnet.py", "dit": "dit_text2img.py", "ldm": "ldm_multicond.py"}[kind])
    print(f"{kind}: path  wall s  CPU s  +RSS MB  +peak MB  rows  source")
    for name, script, folder in (("before (rows)", old_script, folders["m1"]), ("index", new, folders["m1"]),
                                 ("meta.csv only", new, folders["m1-noindex"])):
        code = BENCH.format(repo=repo, script=os.path.abspath(script), kind=kind, data=folder, size=size,
                            encoder=os.path.abspath(encoder), width=32)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise SystemExit(f"{name}: {out.stderr.strip().splitlines()[-1]}")
        wall, cpu, rss, peak, n, source = out.stdout.split()[-6:]
        print(f"{name:14s}  {float(wall):6.1f}  {float(cpu):5.1f}  {int(rss):7d}  {int(peak):8d}  {n}  {source}",
              flush=True)


if __name__ == "__main__":  # python tests/test_meta_index_text.py BIG OLD_SCRIPT [controlnet|dit|ldm]
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    bench(*sys.argv[1:4])

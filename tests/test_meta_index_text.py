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
                    path = os.path.join(folder, "text", "bert", "shards", f"{int(ref[i]['shard']):05d}.safetensors")
                    with safe_open(path, "pt") as f:
                        h = f.get_tensor("hidden")[int(ref[i]["index"])]
                        n = int(f.get_tensor("lengths")[int(ref[i]["index"])])
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

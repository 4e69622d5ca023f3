"""metrics.py's alignment score (chexgenbench: BioViL-T image-text cosine): the released layouts written out here
from hi-ml-multimodal's modules (names and shapes), random weights of that layout saved under the released file
names and loaded unchanged, forward parts against float64 numpy re-implementations, the missing-file messages.
CPU only, offline; the BERT is a tiny config, the image model is the full published one (its sizes are fixed)."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import erf

import metrics as M

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["CXR_OFFLINE"] = "1"

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
WORDS = ["no", "pleural", "effusion", "small", "left", "pneumothorax", "cardiomegaly", "normal", "chest", ".", ","]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def expected_biovil_t_image_layout():
    """{key: shape} of biovil_t_image_model_proj_size_128.pt as hi-ml's ImageModel('resnet50_multi_image', 128)
    strict-loads it: encoder.encoder = torchvision ResNet-50 (fc included), backbone_to_vit 2048 -> 256,
    vit_pooler (3 blocks, q / k / v without bias, type_embed [2, 1, 256]), missing_previous_emb, projector MLP with
    1x1 convs 512 -> 128 -> 128. The sine pos_embed is a non-persistent buffer: not in the file."""
    e = {"encoder.encoder.conv1.weight": (64, 3, 7, 7), **{f"encoder.encoder.bn1.{s}": (64,) for s in BN[:4]}}
    cin = 64
    for li, (n, w) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), 1):
        for b in range(n):
            p = f"encoder.encoder.layer{li}.{b}."
            for j, (ci, co, k) in enumerate([(cin, w, 1), (w, w, 3), (w, 4 * w, 1)], 1):
                e[p + f"conv{j}.weight"] = (co, ci, k, k)
                e.update({p + f"bn{j}.{s}": (co,) for s in BN[:4]})
            if b == 0:
                e[p + "downsample.0.weight"] = (4 * w, cin, 1, 1)
                e.update({p + f"downsample.1.{s}": (4 * w,) for s in BN[:4]})
            cin = 4 * w
    e |= {"encoder.encoder.fc.weight": (1000, 2048), "encoder.encoder.fc.bias": (1000,),
          "encoder.backbone_to_vit.weight": (256, 2048, 1, 1), "encoder.missing_previous_emb": (1, 256, 1, 1),
          "encoder.vit_pooler.type_embed": (2, 1, 256), "encoder.vit_pooler.norm_post.weight": (256,),
          "encoder.vit_pooler.norm_post.bias": (256,), "projector.model.0.weight": (128, 512, 1, 1),
          "projector.model.3.weight": (128, 128, 1, 1), "projector.model.3.bias": (128,),
          **{f"projector.model.1.{s}": (128,) for s in BN[:4]}}
    for b in range(3):
        p = f"encoder.vit_pooler.blocks.{b}."
        e |= {p + "norm1.weight": (256,), p + "norm1.bias": (256,), p + "norm2.weight": (256,),
              p + "norm2.bias": (256,),
              p + "attn.proj_q.weight": (256, 256), p + "attn.proj_k.weight": (256, 256),
              p + "attn.proj_v.weight": (256, 256), p + "attn.proj.weight": (256, 256), p + "attn.proj.bias": (256,),
              p + "mlp.fc1.weight": (256, 256), p + "mlp.fc1.bias": (256,), p + "mlp.fc2.weight": (256, 256),
              p + "mlp.fc2.bias": (256,)}
    return e


def _randomise(net, seed=0):
    """Random weights of the layout, with BatchNorm statistics away from (0, 1) so a dropped BN would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=g) * (0.05 if v.ndim > 1 else 0.2))
    return net.eval()


@pytest.fixture(scope="module", autouse=True)
def flush_denormals():
    """Random ResNet-50 activations reach subnormal floats, which this CPU computes about 3x slower; flushing them
    to zero changes nothing these tests compare (tolerances >= 1e-6). Restored afterwards."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def image_net():
    torch.manual_seed(0)
    return _randomise(M.BioViLTImageModel())


def test_image_layout_is_the_published_one(image_net):
    sd = {k: tuple(v.shape) for k, v in image_net.state_dict().items() if not k.endswith("num_batches_tracked")}
    want = expected_biovil_t_image_layout()
    assert sd == want
    assert sum(k.startswith("encoder.encoder.") for k in image_net.state_dict()) == 320  # torchvision resnet50's


def _np_bn(x, bn):
    p = {s: bn[s].double().numpy()[:, None, None] for s in ("weight", "bias", "running_mean", "running_var")}
    return (x - p["running_mean"]) / np.sqrt(p["running_var"] + 1e-5) * p["weight"] + p["bias"]


def test_global_embedding_and_cosine_against_float64(image_net):
    """Projection (1x1 conv, BN in eval, ReLU, 1x1 conv + bias), mean over positions, L2 norm and the cosine,
    written in float64 numpy from the trunk's feature map (hi-ml ImageModel.forward_post_encoder)."""
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got = image_net(x).double().numpy()
        t = image_net.encoder.encoder.trunk(x).double().numpy()                       # [2, 2048, 2, 2]
    sd = {k: v.double() for k, v in image_net.state_dict().items() if not k.startswith("encoder.encoder.")}
    z = np.einsum("oc,bchw->bohw", sd["encoder.backbone_to_vit.weight"][:, :, 0, 0].numpy(), t)
    miss = np.broadcast_to(sd["encoder.missing_previous_emb"].numpy(), z.shape)
    fused = np.concatenate([z, miss], 1)
    p = np.einsum("oc,bchw->bohw", sd["projector.model.0.weight"][:, :, 0, 0].numpy(), fused)
    bn = {s: sd[f"projector.model.1.{s}"] for s in BN[:4]}      # the projector's BatchNorm (eval statistics)
    p = np.stack([_np_bn(q, bn) for q in p])                     # image by image
    p = np.maximum(p, 0)                                         # ReLU
    p = np.einsum("oc,bchw->bohw", sd["projector.model.3.weight"][:, :, 0, 0].numpy(), p)
    p = p + sd["projector.model.3.bias"].numpy()[:, None, None]
    g = p.mean((2, 3))
    want = g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=2e-6)
    text = np.random.default_rng(0).standard_normal((2, 128))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    cos = [float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(want, text)]
    np.testing.assert_allclose((torch.from_numpy(got) * torch.from_numpy(text)).sum(-1).numpy(), cos, atol=2e-6)


def _np_sine_embedding(h, w, dim):
    """hi-ml SinePositionEmbedding(embedding_dim=dim // 2, normalize=True) on a ones mask, element by element."""
    half, out = dim // 2, np.zeros((h, w, dim))
    for i in range(h):
        for j in range(w):
            for c in range(half):
                t = 10000 ** (2 * (c // 2) / half)
                ya, xa = (i + 1) / (h + 1e-6) * 2 * math.pi / t, (j + 1) / (w + 1e-6) * 2 * math.pi / t
                out[i, j, c] = math.sin(ya) if c % 2 == 0 else math.cos(ya)
                out[i, j, half + c] = math.sin(xa) if c % 2 == 0 else math.cos(xa)
    return out.reshape(1, h * w, dim)


def _np_layer_norm(x, w, b, eps):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def test_temporal_pooler_against_float64(image_net):
    """The prior-image path (hi-ml VisionTransformerPooler): embedding added to the normed tokens that feed q, k, v;
    8 heads; GELU MLP; norm_post; the current image's tokens returned. Float64 numpy, on a 3 x 3 grid."""
    pooler = image_net.encoder.vit_pooler
    np.testing.assert_allclose(pooler.pos_embed.numpy(), _np_sine_embedding(14, 14, 256), atol=1e-5)
    small = M.sine_position_embedding(3, 3, 256)
    np.testing.assert_allclose(small.numpy(), _np_sine_embedding(3, 3, 256), atol=1e-5)
    cur, prev = torch.randn(1, 256, 3, 3), torch.randn(1, 256, 3, 3)
    saved = pooler.pos_embed
    pooler.pos_embed = small
    try:
        with torch.no_grad():
            got = pooler(cur, prev).double().numpy()
    finally:
        pooler.pos_embed = saved
    sd = {k: v.double().numpy() for k, v in pooler.state_dict().items()}
    x = np.concatenate([cur.double().numpy().reshape(256, 9).T, prev.double().numpy().reshape(256, 9).T])
    pos = small.double().numpy()[0]
    emb = np.concatenate([pos + sd["type_embed"][0], pos + sd["type_embed"][1]])
    for b in range(3):
        p = f"blocks.{b}."
        h = _np_layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6) + emb
        qkv = {n: h @ sd[p + f"attn.proj_{n}.weight"].T for n in "qkv"}
        heads = []
        for i in range(8):
            sl = slice(32 * i, 32 * (i + 1))
            a = qkv["q"][:, sl] @ qkv["k"][:, sl].T / math.sqrt(32)
            a = np.exp(a - a.max(1, keepdims=True))
            heads.append((a / a.sum(1, keepdims=True)) @ qkv["v"][:, sl])
        x = x + np.concatenate(heads, 1) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = _np_layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6) @ sd[p + "mlp.fc1.weight"].T
        h = h + sd[p + "mlp.fc1.bias"]
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    want = _np_layer_norm(x, sd["norm_post.weight"], sd["norm_post.bias"], 1e-6)[:9].T.reshape(1, 256, 3, 3)
    np.testing.assert_allclose(got, want, atol=1e-4)


def _tiny_cxr_bert(root, image_net, seed=0):
    """A BioViL-T folder as the Hub holds it, with random weights: config.json of model_type cxr-bert (tiny BERT),
    vocab.txt, tokenizer_config.json, pytorch_model.bin = CXRBertModel's state dict (BertForMaskedLM's names,
    MLM head included, + cls_projection_head.*), biovil_t_image_model_proj_size_128.pt = the image state dict."""
    from transformers import BertConfig, BertForMaskedLM
    os.makedirs(root, exist_ok=True)
    cfg = dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=37, max_position_embeddings=24)
    torch.manual_seed(seed)
    mlm = BertForMaskedLM(BertConfig(**cfg)).eval()
    p = 128  # projection_size: the joint space the image model projects to (hidden_size 32 -> 128)
    head = {"cls_projection_head.dense_to_hidden.weight": torch.randn(p, 32) * 0.3,
            "cls_projection_head.dense_to_hidden.bias": torch.randn(p) * 0.1,
            "cls_projection_head.LayerNorm.weight": 1 + torch.randn(p) * 0.1,
            "cls_projection_head.LayerNorm.bias": torch.randn(p) * 0.1,
            "cls_projection_head.dense_to_output.weight": torch.randn(p, p) * 0.1,
            "cls_projection_head.dense_to_output.bias": torch.randn(p) * 0.1}
    sd = {k: v.clone() for k, v in mlm.state_dict().items()} | head
    torch.save(sd, os.path.join(root, "pytorch_model.bin"))
    torch.save(image_net.state_dict(), os.path.join(root, M.BIOVIL_T_IMAGE_FILE))
    with open(os.path.join(root, "config.json"), "w") as fh:
        json.dump(cfg | {"model_type": "cxr-bert", "architectures": ["CXRBertModel"], "projection_size": p,
                         "auto_map": {"AutoModel": "modeling_cxrbert.CXRBertModel"}}, fh)
    with open(os.path.join(root, "tokenizer_config.json"), "w") as fh:
        json.dump({"do_lower_case": True, "tokenizer_class": "CXRBertTokenizer"}, fh)
    with open(os.path.join(root, "vocab.txt"), "w") as fh:
        fh.write("\n".join(SPECIAL + WORDS) + "\n")
    return mlm, head


@pytest.fixture(scope="module")
def released(image_net, tmp_path_factory):
    """(--weights-dir, the transformers BertForMaskedLM, the head tensors, the first load_biovil_t's result):
    the folder is written and loaded once for the tests below (the first load converts to safetensors)."""
    wd = str(tmp_path_factory.mktemp("weights"))
    mlm, head = _tiny_cxr_bert(M.biovil_t_folder_name(wd), image_net)
    return {"wd": wd, "mlm": mlm, "head": head, "nets": M.load_biovil_t(M.find_biovil_t(wd))}


def test_released_names_load_unchanged_and_text_embedding_float64(image_net, released):
    mlm, nets = released["mlm"], released["nets"]
    head = released["head"]
    txt, files = nets.text, nets.files
    # every key of the released file except the MLM head, unchanged; converted once to safetensors beside it
    want = {k for k in mlm.state_dict() if k.startswith("bert.") and "position_ids" not in k} | set(head)
    assert set(txt.state_dict()) == want
    assert files["image"].endswith("biovil_t_image_model_proj_size_128.safetensors") and os.path.isfile(files["text"])
    for k, v in image_net.state_dict().items():
        assert torch.equal(nets.image.state_dict()[k], v), k
    enc, n_long = M.cxr_bert_inputs(nets.tokenizer, ["No pleural effusion.", "Small left pneumothorax!"])
    assert n_long == 0 and enc["input_ids"][0].tolist()[:5] == [2, 5, 6, 7, 3]  # [CLS] no pleural effusion [SEP]
    with torch.no_grad():
        got = txt(**enc).double().numpy()
        cls = mlm(**enc, output_hidden_states=True).hidden_states[-1][:, 0]
    h = {k.split(".", 1)[1]: v.double().numpy() for k, v in head.items()}
    z = cls.double().numpy() @ h["dense_to_hidden.weight"].T + h["dense_to_hidden.bias"]
    z = 0.5 * z * (1 + erf(z / math.sqrt(2)))
    z = _np_layer_norm(z, h["LayerNorm.weight"], h["LayerNorm.bias"], 1e-12)
    z = z @ h["dense_to_output.weight"].T + h["dense_to_output.bias"]
    np.testing.assert_allclose(got, z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-5)
    again = M.load_biovil_t(M.find_biovil_t(released["wd"]))  # the second run reads the converted safetensors
    assert again.files["text"].endswith(".safetensors")
    with torch.no_grad():
        np.testing.assert_allclose(again.text(**enc).numpy(), got, atol=1e-6)
    enc, n_long = M.cxr_bert_inputs(nets.tokenizer, [" ".join(["chest"] * 40)], max_length=24)
    assert n_long == 1 and enc["input_ids"].shape[1] == 24


def test_missing_files_are_named_on_one_line(tmp_path):
    with pytest.raises(M.WeightsMissing) as e:
        M.find_biovil_t(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "microsoft--BiomedVLP-BioViL-T" in msg and "fetch-weights --only biovil_t" in msg
    root = M.biovil_t_folder_name(str(tmp_path))
    os.makedirs(root)
    for f in ("config.json", "vocab.txt", "pytorch_model.bin"):
        open(os.path.join(root, f), "w").close()
    with pytest.raises(M.WeightsMissing, match="biovil_t_image_model_proj_size_128.pt missing from"):
        M.find_biovil_t(str(tmp_path))


def test_preprocessing_follows_hi_ml_transform():
    """Shorter side to 512 (longer int(512 * 30 / 20) = 768), crop offsets int(round(32)) = 32 and 160, min-max to
    uint8 first: the hand-computed numbers fed to PIL directly."""
    rng = np.random.default_rng(0)
    img = (0.2 + 0.4 * rng.random((30, 20))).astype(np.float32)
    got = M.biovil_prepare(img)
    u8 = ((img - img.min()) / (img - img.min()).max() * 255).astype(np.uint8)
    ref = Image.fromarray(u8).resize((512, 768), Image.BILINEAR).crop((32, 160, 32 + 448, 160 + 448))
    assert got.shape == (448, 448) and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.asarray(ref, np.float32) / 255)
    assert got.max() > 0.95 and got.min() < 0.05                                   # the full range after min-max
    assert not M.biovil_prepare(np.full((8, 8), 0.3, np.float32)).any()             # constant image: zeros


def test_cli_alignment_per_image_and_per_pathology(released, tmp_path, monkeypatch, capsys):
    """End to end on 5 images (input shrunk to 32 px for speed): the overall mean and each pathology's mean
    equal numpy means of per-image cosines computed image by image; absent weights named by `--metrics alignment`
    give exit status 3 and the fetch-weights line at the top."""
    monkeypatch.setattr(M, "BIOVIL_T_RESIZE", 32)
    monkeypatch.setattr(M, "BIOVIL_T_CROP", 32)
    wd, nets = released["wd"], released["nets"]
    fake = tmp_path / "fake"
    fake.mkdir()
    rng = np.random.default_rng(1)
    reports = ["No pleural effusion.", "Small left pneumothorax.", "No pleural effusion.", "Cardiomegaly.", ""]
    rows = []
    for i, rep in enumerate(reports):
        Image.fromarray((rng.random((40, 48)) * 255).astype(np.uint8)).save(fake / f"s{i}.png")
        rows.append({"id": f"s{i}", "report": rep, "Pleural Effusion": "0", "Pneumothorax": "1" if i in (1, 3) else "0",
                     "Cardiomegaly": "1" if i == 3 else ""})
    with open(fake / "meta.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader(), w.writerows(rows)
    out = tmp_path / "r.json"
    M.main(["--real", str(fake), "--fake", str(fake), "--metrics", "alignment", "--weights-dir", wd,
            "--out", str(out), "--no-cache", "--workers", "1", "--batch-size", "2"])
    res = json.loads(out.read_text())["alignment"]
    cos = []
    for i in range(4):  # one at a time: no batching, no prompt de-duplication
        x = torch.from_numpy(M.biovil_prepare(M.read_image(str(fake / f"s{i}.png"))))[None, None].expand(1, 3, -1, -1)
        enc, _ = M.cxr_bert_inputs(nets.tokenizer, [reports[i]])
        with torch.no_grad():
            cos.append(float((nets.image(x) * nets.text(**enc)).sum()))
    assert res["n"] == 4 and res["n_without_text"] == 1 and res["n_prompts"] == 3
    assert res["mean"] == pytest.approx(np.mean(cos), abs=1e-6)
    assert set(res["per_pathology"]) == {"Pneumothorax", "Cardiomegaly"}
    assert res["per_pathology"]["Pneumothorax"]["mean"] == pytest.approx((cos[1] + cos[3]) / 2, abs=1e-6)
    assert res["per_pathology"]["Cardiomegaly"] == {"mean": pytest.approx(cos[3], abs=1e-6), "n": 1}
    assert "alignment (BioViL-T image-text cosine)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        M.main(["--real", str(fake), "--fake", str(fake), "--metrics", "alignment", "--weights-dir",
                str(tmp_path / "none"), "--no-cache", "--workers", "1"])
    assert e.value.code == M.EXIT_NO_FIDELITY
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("!! NO ALIGNMENT SCORE COMPUTED") and any("fetch-weights" in p for p in printed[:4])


def test_alignment_on_the_phantom_test_split(released, phantom_dir, monkeypatch):
    """End to end on the phantom's test rows (a dataset folder: reports and CheXpert labels in its meta.csv): every
    row scored, each pathology's N the number of its label-1 rows, reports longer than the tiny BERT's 24 positions
    truncated and counted, cosines in [-1, 1]."""
    monkeypatch.setattr(M, "BIOVIL_T_RESIZE", 32)
    monkeypatch.setattr(M, "BIOVIL_T_CROP", 32)
    with open(os.path.join(phantom_dir, "meta.csv"), newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    cfg = M.Config(workers=1, batch_size=64)
    res = M.alignment(M.ImageSet(phantom_dir, "test"), cfg, "cpu", models=released["nets"])
    assert res["n"] == len(rows) and res["n_without_text"] == 0 and res["n_truncated"] > 0
    want = {lab: sum(r[lab] in ("1", "1.0") for r in rows) for lab in M.LABELS}
    assert {lab: d["n"] for lab, d in res["per_pathology"].items()} == {k: v for k, v in want.items() if v}
    assert -1 <= res["mean"] <= 1 and all(-1 <= d["mean"] <= 1 for d in res["per_pathology"].values())
